"""The daemon exposing itself at start (SPEC §1 step 6) and `voicecall expose`, with stand-in tools."""
from __future__ import annotations

import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.harness import make_workdir, run_cli, spawn_daemon

FAKEBIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakebin")


def tool_env(state: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([FAKEBIN, os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    return {"PATH": path, "FAKE_STATE": state, **extra}


def runs(state: str, tool: str) -> list[list[str]]:
    try:
        with open(os.path.join(state, f"{tool}.jsonl")) as f:
            return [json.loads(line)["argv"] for line in f if line.strip()]
    except FileNotFoundError:
        return []


class ExposureWiringTests(TestCase):
    timeout = 40

    async def test_ngrok_tunnel_at_start(self):
        """With tunnel.provider ngrok the daemon announces the tunnel's URL and stops ngrok when it stops."""
        workdir = make_workdir(self, {"tunnel": {"provider": "ngrok", "ngrokAuthToken": "secret-token"}})
        daemon = await spawn_daemon(self, workdir, env=tool_env(workdir.path, FAKE_NGROK_URL="https://tunnel.example.ngrok-free.app"))
        self.assertEqual(daemon.webhook_url, "https://tunnel.example.ngrok-free.app/voice/webhook")
        argvs = runs(workdir.path, "ngrok")
        self.assertEqual(argvs[0][:3], ["config", "add-authtoken", "secret-token"])
        port = daemon.process.stdout.split("Webhook URL: http://127.0.0.1:")[1].split("/")[0]
        self.assertEqual(argvs[1][:2], ["http", port])
        await daemon.stop()
        self.assertNotIn("secret-token", daemon.process.stdout + daemon.process.stderr)

    async def test_tunnel_failure_is_not_fatal(self):
        """A tunnel that fails to start is logged and the daemon serves on its local URL."""
        workdir = make_workdir(self, {"tunnel": {"provider": "ngrok"}})
        daemon = await spawn_daemon(self, workdir, env=tool_env(workdir.path, FAKE_NGROK_HTTP="exit"))
        self.assertTrue(daemon.webhook_url.startswith("http://127.0.0.1:"), daemon.webhook_url)
        self.assertIn("[voice-call] Tunnel setup failed: ngrok exited unexpectedly with code", daemon.process.stdout)

    async def test_expose_command(self):
        """`voicecall expose --mode serve` prints the SPEC §17 object with the Tailscale URL."""
        workdir = make_workdir(self)
        result = await run_cli(self, workdir, "expose", "--mode", "serve", "--port", "3334", env=tool_env(workdir.path))
        self.assertEqual(result.code, 0, result.err)
        self.assertEqual(
            result.json(),
            {
                "ok": True,
                "mode": "serve",
                "path": "/voice/webhook",
                "localUrl": "http://127.0.0.1:3334",
                "publicUrl": "https://voicebox.tail1234.ts.net/voice/webhook",
            },
        )
