"""The documentation a newcomer follows: README.rst renders cleanly, and every example config loads."""
from __future__ import annotations

import glob
import os
from types import SimpleNamespace

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

    def test_walkthrough_events_have_ids(self):
        """Every mock event the README posts with curl carries an `id`, and shell completion is documented."""
        import re

        with open(os.path.join(ROOT, "README.rst")) as f:
            text = f.read()
        posts = re.findall(r"curl -s localhost:3334/voice/webhook.*?}}'", text, re.S)
        self.assertGreaterEqual(len(posts), 2)
        for post in posts:
            if '"callId": "nope"' not in post:  # the example of a refusal
                self.assertIn('"id": "ev-', post)
        self.assertIn("_VOICECALL_COMPLETE=bash_source", text)

    def test_example_configs_load(self):
        """Every config in examples/ is valid."""
        paths = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json5")))
        self.assertGreaterEqual(len(paths), 4)
        for path in paths:
            load_config(path, {"HOME": "/nonexistent"})

    def test_real_carrier_examples(self):
        """examples/{twilio,telnyx,plivo,twilio-streaming}.json5 load with placeholders and no env, on the real APIs."""
        cases = {
            "twilio": ("twilio", "twilio"),
            "twilio-streaming": ("twilio", "twilio"),
            "telnyx": ("telnyx", "telnyx"),
            "plivo": ("plivo", "plivo"),
        }
        for name, (provider, section) in cases.items():
            config = load_config(os.path.join(ROOT, "examples", f"{name}.json5"), {"HOME": "/nonexistent"})
            self.assertEqual(config.provider, provider, name)
            self.assertEqual(getattr(config, section).base_url, f"https://api.{provider}.com", name)
            self.assertTrue(config.public_url.startswith("https://"), name)
            self.assertEqual(config.streaming.enabled, name == "twilio-streaming", name)
        with open(os.path.join(ROOT, "examples", "twilio.json5")) as f:
            self.assertIn("your-twilio-auth-token", f.read())

    def test_fake_examples_run_beside_make_run(self):
        """Each examples/*-fake.json5 has its own port and store, so it never clashes with `make run` (mock.json5)."""
        names = ["mock", "twilio-fake", "telnyx-fake", "plivo-fake"]
        configs = [load_config(os.path.join(ROOT, "examples", f"{n}.json5"), {"HOME": "/nonexistent"}) for n in names]
        self.assertEqual(len({c.serve.port for c in configs}), len(names), [c.serve.port for c in configs])
        self.assertEqual(len({c.store for c in configs}), len(names))
        for config in configs[1:]:
            self.assertIn(f":{config.serve.port}/", config.public_url)

    def test_fake_callees_answer_every_call(self):
        """The demo fakes' --say answers start again at the first phrase for each call (a second demo call is not silent)."""
        from voicecall.testing import plivo, twilio

        def twilio_call(sid, question=True):
            action = "http://x/voice/webhook?turnToken=t" if question else "http://x/voice/webhook"
            return SimpleNamespace(sid=sid, gathers=[SimpleNamespace(action_url=action)])

        def plivo_call(uuid, question=True):
            return SimpleNamespace(call_uuid=uuid, inputs=[SimpleNamespace(turn_token="t" if question else None)])

        for module, call, credentials in (
            (twilio, twilio_call, ["--account-sid", "AC" + "0" * 32, "--auth-token", "t"]),
            (plivo, plivo_call, ["--auth-id", "MA" + "X" * 18, "--auth-token", "t"]),
        ):
            args = module._parse([*credentials, "--answer-questions-only", "--say", "It's Alice", "--say", "Yes"])
            answer = module.scripted_utterances(args)
            first, second = call("one"), call("two")
            self.assertIsNone(answer(call("one", question=False)))
            heard = [answer(first), answer(first), answer(first), answer(second), answer(second)]
            self.assertEqual(heard, ["It's Alice", "Yes", None, "It's Alice", "Yes"], module.__name__)
            plain = module.scripted_utterances(module._parse([*credentials, "--say", "", "--say", "Hi"]))
            self.assertEqual(plain, [None, "Hi"])  # a list: each call keeps its own position in it
