"""
The daemon's own code never imports the fakes (DESIGN.md "Dependencies"): nothing under
voicecall/ but voicecall/testing imports voicecall.testing, so an installed daemon runs without
the fake carriers' code.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import voicecall

PACKAGE = Path(voicecall.__file__).parent
FORBIDDEN = "voicecall.testing"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name a (possibly relative) `from ... import` names."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _names(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """Every module name an import statement (or importlib call with a literal) may load."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        module = _absolute(node.module, node.level, importer, is_package)
        return [module] + [f"{module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def testing_importers(root: Path) -> list[str]:
    """`file:line module` for each import of voicecall.testing outside root/testing."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        here = Path(directory)
        if here == root / "testing" or root / "testing" in here.parents:
            subdirs[:] = []
            continue
        for filename in sorted(f for f in files if f.endswith(".py")):
            path = here / filename
            importer = _module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                names = _names(node, importer, filename == "__init__.py")
                hit = next((n for n in names if n == FORBIDDEN or n.startswith(FORBIDDEN + ".")), None)
                if hit is not None:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {hit}")
    return found


class TestingIsolationTests(SynchronousTestCase):
    """voicecall/testing is for tests, benchmarks and walk-throughs only."""

    def _tree(self, files: dict[str, str]) -> Path:
        root = Path(self.mktemp()) / "voicecall"
        for name, text in {"__init__.py": "", "testing/__init__.py": "", **files}.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return root

    def test_daemon_never_imports_the_fakes(self):
        """No module of the daemon (anything under voicecall/ but voicecall/testing) imports voicecall.testing."""
        self.assertEqual(testing_importers(PACKAGE), [])

    def test_every_spelling_is_caught(self):
        """Absolute, from-package, relative and importlib imports of the fakes are all reported."""
        root = self._tree(
            {
                "a.py": "import voicecall.testing.twilio\n",
                "b.py": "from voicecall import testing\n",
                "web/__init__.py": "",
                "web/c.py": "from ..testing.chaos import Chaos\n",
                "d.py": "import importlib\nimportlib.import_module('voicecall.testing.plivo')\n",
                "e.py": "def f():\n    from voicecall.testing.telnyx_api import FakeTelnyx\n",
            }
        )
        self.assertEqual(
            testing_importers(root),
            [
                "voicecall/a.py:1 voicecall.testing.twilio",
                "voicecall/b.py:1 voicecall.testing",
                "voicecall/d.py:2 voicecall.testing.plivo",
                "voicecall/e.py:2 voicecall.testing.telnyx_api",
                "voicecall/web/c.py:1 voicecall.testing.chaos",
            ],
        )

    def test_the_fakes_and_lookalikes_may(self):
        """The fakes import each other, and a name that merely starts alike is not the fakes."""
        root = self._tree(
            {
                "testing/twilio.py": "from voicecall.testing import chaos\n",
                "testing/sub/__init__.py": "from voicecall.testing.chaos import Chaos\n",
                "f.py": "import voicecall.testing_tools\nfrom voicecall import tests\n",
            }
        )
        self.assertEqual(testing_importers(root), [])
