"""`voicecall doctor`: each check, through run_checks and through the real CLI."""
from __future__ import annotations

import json
import os
import socket
import tempfile

from click.testing import CliRunner
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.cli import main
from voicecall.doctor import run_checks
from tests.daemon import make_workdir, run_cli, start_daemon

TWILIO = {"provider": "twilio", "fromNumber": "+15550000000", "twilio": {"accountSid": "AC1", "authToken": "t"}}


class DoctorChecksTests(SynchronousTestCase):
    def checks(self, config: dict) -> dict:
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "voicecall.json")
        with open(path, "w") as f:
            json.dump({"store": directory, "serve": {"port": 1}, **config}, f)
        return {c.name: c for c in run_checks(path, os.path.join(directory, "s.sock"), {}, directory)}

    def test_mock_defaults_pass(self):
        """The mock provider needs no credentials and no public URL."""
        checks = self.checks({"provider": "mock"})
        self.assertNotIn("public URL", checks)
        self.assertTrue(checks["credentials"].ok)
        self.assertTrue(checks["state directory"].ok)

    def test_private_public_url_fails(self):
        """A loopback or private publicUrl fails with the fix."""
        for url in ("http://127.0.0.1:3334/voice/webhook", "https://10.0.0.5/voice/webhook", "https://localhost/x"):
            check = self.checks({**TWILIO, "publicUrl": url})["public URL"]
            self.assertFalse(check.ok, url)
            self.assertIn("publicUrl", check.fix)

    def test_missing_public_url_fails(self):
        """A real provider without publicUrl or a tunnel cannot be reached."""
        self.assertFalse(self.checks(TWILIO)["public URL"].ok)
        self.assertTrue(self.checks({**TWILIO, "tunnel": {"provider": "ngrok"}})["public URL"].ok)

    def test_https_public_url_passes(self):
        """A public HTTPS URL passes; plain HTTP does not."""
        self.assertTrue(self.checks({**TWILIO, "publicUrl": "https://voice.example.com/voice/webhook"})["public URL"].ok)
        self.assertFalse(self.checks({**TWILIO, "publicUrl": "http://voice.example.com/voice/webhook"})["public URL"].ok)

    def test_port_in_use(self):
        """A port another program holds fails the port check."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            check = self.checks({"provider": "mock", "serve": {"port": port}})["port"]
        self.assertFalse(check.ok)
        self.assertIn("in use", check.detail)

    def test_bad_config(self):
        """A bad config is one failing check listing its problems, and the CLI exits 1."""
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "bad.json")
        with open(path, "w") as f:
            json.dump({"provider": "twilio", "bogus": 1}, f)
        result = CliRunner().invoke(main, ["--config", path, "doctor", "--json"])
        self.assertEqual(result.exit_code, 1)
        report = json.loads(result.output)
        self.assertFalse(report["ok"])
        self.assertIn("bogus: unknown key", report["checks"][0]["detail"])
        self.assertIn("twilio.accountSid is required", report["checks"][0]["detail"])


class DoctorWithDaemonTests(TestCase):
    timeout = 40

    async def test_running_daemon(self):
        """With the daemon running, doctor reports it and its port and socket as OK."""
        workdir = make_workdir(self)
        await start_daemon(self, workdir)
        result = await run_cli(self, workdir, "doctor")
        self.assertEqual(result.code, 0, result.err)
        self.assertIn("OK    daemon: running", result.out)
