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

    def readme_telnyx_args(self):
        """The arguments the README's Telnyx walk-through gives the fake Telnyx."""
        import re
        import shlex

        from voicecall.testing import telnyx

        with open(os.path.join(ROOT, "README.rst")) as f:
            text = f.read()
        command = re.search(r"python -m voicecall\.testing\.telnyx (.*?)\n\s*\.venv/bin/twistd", text, re.S).group(1)
        return telnyx._parse(shlex.split(command.replace("\\\n", " ")))

    def test_telnyx_walkthrough_callee_answers_questions(self):
        """
        The README's fake Telnyx answers each question once, however early the daemon starts
        transcribing: the daemon's real timing starts it after the question has played, where its
        old `--say "" --say "It's Alice"` spent "" on the first question, which then waited forever.
        """
        from voicecall.testing import telnyx

        def call(name, *prompts):
            speaks = [SimpleNamespace(text=p) for p in prompts]
            return SimpleNamespace(call_control_id=name, speaks=speaks, last_speak=prompts[-1] if prompts else None)

        greeting, q1, q2 = "Hello, this is your assistant", "Who am I speaking with?", "Is now a good time?"
        answer = telnyx.scripted_utterances(self.readme_telnyx_args())
        # Transcription starts once each question has played (the daemon over real HTTP).
        late = call("late", greeting, q1)
        heard = [answer(late)]
        late.speaks.append(SimpleNamespace(text=q2))
        heard.append(answer(late))
        self.assertEqual(heard, ["It's Alice", "Yes, thanks"])
        # Transcription starts during the pause after the greeting: silence, then each question once.
        early = call("early", greeting)
        self.assertIsNone(answer(early))
        early.speaks.append(SimpleNamespace(text=q1))
        self.assertEqual([answer(early), answer(early)], ["It's Alice", None])

    def test_telnyx_walkthrough_answers_each_question(self):
        """The README's fake Telnyx answers the walk-through's two questions through the daemon's call path, in every call."""
        import shutil
        import tempfile

        from twisted.internet.defer import Deferred

        from voicecall.testing import telnyx
        from voicecall.testing.stack import CALLEE, Stack

        args = self.readme_telnyx_args()
        directory = tempfile.mkdtemp(prefix="vc-docs-")
        self.addCleanup(shutil.rmtree, directory, True)
        stack = Stack.build("telnyx", directory, transcript_timeout_ms=30_000)
        self.addCleanup(stack.close)
        stack.carrier.fake.scenario = telnyx.Scenario(
            answer_after=0.5, speech_delay=0.3, say_seconds_per_char=0.01, utterances=telnyx.scripted_utterances(args)
        )
        for _ in range(2):  # each call starts again at the first phrase
            d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Hello, this is your assistant", "conversation"))
            stack.pump()
            call_id = self.successResultOf(d)
            heard = []
            for question in ("Who am I speaking with?", "Is now a good time?"):
                d = Deferred.fromCoroutine(stack.manager.continue_call(call_id, question))
                stack.advance(10)
                heard.append(self.successResultOf(d))
            self.assertEqual(heard, ["It's Alice", "Yes, thanks"])
            self.successResultOf(Deferred.fromCoroutine(stack.manager.end_call(call_id)))
            stack.advance(2)

    def test_fake_on_a_busy_port_says_so_in_one_line(self):
        """A fake carrier started on a port in use (a second demo) exits 1 with one line naming the port, no traceback."""
        import socket
        import subprocess
        import sys

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        for module, credentials in (
            ("twilio", ["--account-sid", "AC" + "0" * 32, "--auth-token", "t"]),
            ("telnyx", ["--api-key", "KEY_fake"]),
            ("plivo", ["--auth-id", "MA" + "X" * 18, "--auth-token", "t"]),
        ):
            child = subprocess.run(
                [sys.executable, "-m", f"voicecall.testing.{module}", "--port", port, *credentials],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            self.assertEqual(child.returncode, 1, (module, child.stderr))
            self.assertEqual(len(child.stderr.splitlines()), 1, (module, child.stderr))
            self.assertIn(f"127.0.0.1:{port} is in use", child.stderr)
            self.assertEqual(child.stdout, "")
