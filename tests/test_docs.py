"""The documentation a newcomer follows: README.rst renders cleanly, and every example config loads."""
from __future__ import annotations

import glob
import os

import docutils.core
from twisted.trial.unittest import SynchronousTestCase

from voicecall.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DocsTests(SynchronousTestCase):
    def test_readme_is_valid_rst(self):
        """README.rst renders without a warning and shows the two commands."""
        with open(os.path.join(ROOT, "README.rst")) as f:
            text = f.read()
        docutils.core.publish_string(text, writer_name="null", settings_overrides={"report_level": 2, "halt_level": 2})
        self.assertIn("make run", text)
        self.assertIn("make test", text)

    def test_example_configs_load(self):
        """Every config in examples/ is valid."""
        paths = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json5")))
        self.assertGreaterEqual(len(paths), 4)
        for path in paths:
            load_config(path, {"HOME": "/nonexistent"})
