"""
Tests for voicecall.control.expose: ngrok and Tailscale exposure (SPEC §16), the `voicecall expose`
outputs (SPEC §17) and the §19 "tunnel.test / cli.test" [H] limits.

Most tests run the real reactor against the stand-in executables in tests/fakebin/ (put first on
the children's PATH, behaviour picked with FAKE_* variables); the SPEC's default time limits are
checked on a Clock with an in-memory process reactor, so nothing waits 30 s.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.control.expose import (
    ExposeError,
    expose_command,
    legacy_tailscale,
    ngrok_available,
    start_tunnel,
    tailscale_self_info,
)

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
NGROK_URL = "https://abc123.ngrok-free.app"
TS_HOST = "voicebox.tail1234.ts.net"
HINT_NOTE = "Tailscale serve/funnel may be disabled on this tailnet (or require admin enable)."


def _real_reactor():
    from twisted.internet import reactor

    return reactor


class FakeBinMixin:
    """Children see tests/fakebin first on PATH and record their argv and pid in a state dir."""

    def fake_env(self, **behaviour: str) -> dict[str, str]:
        self.state = Path(self.mktemp())
        self.state.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        python_dir = os.path.dirname(sys.executable)  # `#!/usr/bin/env python3` finds it fast
        env["PATH"] = os.pathsep.join([str(FAKEBIN), python_dir, env.get("PATH", os.defpath)])
        env["FAKE_STATE"] = str(self.state)
        env.update(behaviour)
        return env

    def calls(self, tool: str) -> list[dict]:
        path = self.state / f"{tool}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def argvs(self, tool: str) -> list[list[str]]:
        return [call["argv"] for call in self.calls(tool)]

    def assert_gone(self, pid: int) -> None:
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    def capture_logs(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def ngrok(self, env: dict, **kwargs):
        kwargs.setdefault("startup_timeout", 10.0)
        kwargs.setdefault("ngrok_auth_token", None)
        kwargs.setdefault("ngrok_domain", None)
        return await start_tunnel(
            _real_reactor(), provider="ngrok", port=3334, path="/voice/webhook", env=env, **kwargs
        )

    async def ngrok_failure(self, env: dict, **kwargs) -> str:
        try:
            tunnel = await self.ngrok(env, **kwargs)
        except ExposeError as e:
            return str(e)
        await tunnel.stop()
        self.fail(f"the tunnel started: {tunnel.public_url}")


class NgrokTunnelTests(FakeBinMixin, TestCase):
    """`ngrok http` against tests/fakebin/ngrok on the real reactor."""

    async def test_started_tunnel_line(self):
        """The `started tunnel` line (cut inside UTF-8 across reads) gives the URL; the path is added."""
        tunnel = await self.ngrok(self.fake_env())
        self.addCleanup(tunnel.stop)
        self.assertEqual(tunnel.public_url, f"{NGROK_URL}/voice/webhook")
        self.assertEqual(tunnel.provider, "ngrok")
        self.assertEqual(
            self.argvs("ngrok"), [["http", "3334", "--log", "stdout", "--log-format", "json"]]
        )

    async def test_any_line_with_addr_and_url(self):
        """Without `started tunnel`, the first line with both addr and url gives the URL."""
        env = self.fake_env(FAKE_NGROK_HTTP="addr-url", FAKE_NGROK_URL="https://other.ngrok.app")
        tunnel = await self.ngrok(env)
        self.addCleanup(tunnel.stop)
        self.assertEqual(tunnel.public_url, "https://other.ngrok.app/voice/webhook")

    async def test_domain_is_passed(self):
        """A configured ngrok domain is passed as `--domain <domain>`."""
        tunnel = await self.ngrok(self.fake_env(), ngrok_domain="calls.example.ngrok.app")
        self.addCleanup(tunnel.stop)
        self.assertEqual(tunnel.public_url, "https://calls.example.ngrok.app/voice/webhook")
        self.assertEqual(
            self.argvs("ngrok"),
            [["http", "3334", "--log", "stdout", "--log-format", "json",
              "--domain", "calls.example.ngrok.app"]],
        )  # fmt: skip

    async def test_auth_token_set_first_and_never_logged(self):
        """`ngrok config add-authtoken <token>` runs before `ngrok http`; no log event shows the token."""
        events = self.capture_logs()
        token = "2fAkeT0kenValue_ABCdef123"
        tunnel = await self.ngrok(self.fake_env(), ngrok_auth_token=token)
        await tunnel.stop()
        self.assertEqual(
            [argv[:3] for argv in self.argvs("ngrok")],
            [["config", "add-authtoken", token], ["http", "3334", "--log"]],
        )
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(token, formatEvent(event))
            self.assertNotIn(token, repr(event))

    async def test_auth_token_failure_is_redacted(self):
        """A failing add-authtoken gives `ngrok command failed: ...`, token masked, and no ngrok http."""
        token = "2fAkeT0kenValue_ABCdef123"
        env = self.fake_env(FAKE_NGROK_AUTH="fail")
        message = await self.ngrok_failure(env, ngrok_auth_token=token)
        self.assertTrue(message.startswith("ngrok command failed: "), message)
        self.assertIn("ERR_NGROK_105", message)
        self.assertNotIn(token, message)
        self.assertEqual(len(self.calls("ngrok")), 1)

    async def test_auth_token_hang_is_killed(self):
        """A hung add-authtoken (deaf to SIGTERM) is SIGKILLed at its limit; ngrok http never runs."""
        env = self.fake_env(FAKE_NGROK_AUTH="hang", FAKE_IGNORE_TERM="1")
        message = await self.ngrok_failure(env, ngrok_auth_token="tok", auth_timeout=1.0)
        self.assertEqual(message, "ngrok command timed out after 1000ms")
        [call] = self.calls("ngrok")
        self.assertEqual(call["argv"], ["config", "add-authtoken", "tok"])
        self.assert_gone(call["pid"])

    async def test_startup_timeout(self):
        """No URL in time: `ngrok startup timed out (<n>s)`, and the child (deaf to SIGTERM) is killed."""
        env = self.fake_env(FAKE_NGROK_HTTP="silent", FAKE_IGNORE_TERM="1")
        message = await self.ngrok_failure(env, startup_timeout=1.5, stop_grace=0.2)
        self.assertEqual(message, "ngrok startup timed out (1.5s)")
        [call] = self.calls("ngrok")
        self.assert_gone(call["pid"])

    async def test_err_ngrok_on_stderr(self):
        """ERR_NGROK on stderr (split across reads) fails with `ngrok error: <stderr>`; child killed."""
        message = await self.ngrok_failure(self.fake_env(FAKE_NGROK_HTTP="err"))
        self.assertTrue(message.startswith("ngrok error: ERROR:  authentication failed"), message)
        self.assertIn("ERR_NGROK_4018", message)
        [call] = self.calls("ngrok")
        self.assert_gone(call["pid"])

    async def test_early_exit(self):
        """Exiting before a URL fails with `ngrok exited unexpectedly with code <c>`."""
        env = self.fake_env(FAKE_NGROK_HTTP="exit", FAKE_NGROK_EXIT_CODE="7")
        self.assertEqual(await self.ngrok_failure(env), "ngrok exited unexpectedly with code 7")

    async def test_missing_executable(self):
        """Without an ngrok executable the failure reads `Failed to start ngrok: ...`."""
        env = self.fake_env()
        empty = Path(self.mktemp())
        empty.mkdir()
        env["PATH"] = str(empty)
        message = await self.ngrok_failure(env)
        self.assertEqual(message, "Failed to start ngrok: executable not found: ngrok")
        message = await self.ngrok_failure(env, executables={"ngrok": str(empty / "ngrok")})
        self.assertTrue(message.startswith("Failed to start ngrok: "), message)

    async def test_executables_mapping(self):
        """An explicit executables mapping is used instead of a PATH lookup."""
        env = self.fake_env()
        env["PATH"] = os.defpath
        tunnel = await self.ngrok(env, executables={"ngrok": str(FAKEBIN / "ngrok")})
        await tunnel.stop()
        self.assertEqual(tunnel.public_url, f"{NGROK_URL}/voice/webhook")

    async def test_stop_leaves_no_process(self):
        """Stopping the tunnel ends the ngrok child (reaped, pid gone); stopping again is harmless."""
        tunnel = await self.ngrok(self.fake_env())
        [call] = self.calls("ngrok")
        os.kill(call["pid"], 0)  # running
        self.assertIsNone(await tunnel.stop())
        self.assert_gone(call["pid"])
        self.assertIsNone(await tunnel.stop())

    async def test_stop_escalates_to_sigkill(self):
        """A child that ignores SIGTERM is SIGKILLed once the stop grace has passed."""
        env = self.fake_env(FAKE_IGNORE_TERM="1")
        tunnel = await self.ngrok(env, stop_grace=0.3)
        [call] = self.calls("ngrok")
        await tunnel.stop()
        self.assert_gone(call["pid"])


class NgrokAvailableTests(FakeBinMixin, TestCase):
    """The [H] `ngrok version` probe."""

    async def test_available(self):
        """`ngrok version` exiting 0 means available."""
        self.assertTrue(await ngrok_available(_real_reactor(), env=self.fake_env()))
        self.assertEqual(self.argvs("ngrok"), [["version"]])

    async def test_failing(self):
        """`ngrok version` exiting non-zero means unavailable."""
        env = self.fake_env(FAKE_NGROK_VERSION="fail")
        self.assertFalse(await ngrok_available(_real_reactor(), env=env))

    async def test_missing(self):
        """No ngrok on PATH means unavailable."""
        env = self.fake_env()
        env["PATH"] = os.defpath
        self.assertFalse(await ngrok_available(_real_reactor(), env=env))

    async def test_hanging_probe(self):
        """A hanging probe (deaf to SIGTERM) is SIGKILLed at the limit and reported unavailable."""
        env = self.fake_env(FAKE_NGROK_VERSION="hang", FAKE_IGNORE_TERM="1")
        self.assertFalse(await ngrok_available(_real_reactor(), env=env, timeout=1.0))
        [call] = self.calls("ngrok")
        self.assert_gone(call["pid"])


class TailscaleTunnelTests(FakeBinMixin, TestCase):
    """`tunnel.provider` tailscale-serve / tailscale-funnel against tests/fakebin/tailscale."""

    async def tailscale(self, env: dict, provider="tailscale-serve", path="/voice/webhook", **kw):
        return await start_tunnel(
            _real_reactor(), provider=provider, port=3334, path=path, ngrok_auth_token=None,
            ngrok_domain=None, env=env, **kw,
        )  # fmt: skip

    async def tailscale_failure(self, env: dict, **kw) -> str:
        try:
            tunnel = await self.tailscale(env, **kw)
        except ExposeError as e:
            return str(e)
        self.fail(f"the tunnel started: {tunnel.public_url}")

    async def test_serve(self):
        """serve: `status --json` DNS name (no trailing dot) + path; stop() removes the route."""
        tunnel = await self.tailscale(self.fake_env())
        self.assertEqual(tunnel.public_url, f"https://{TS_HOST}/voice/webhook")
        self.assertEqual(tunnel.provider, "tailscale-serve")
        await tunnel.stop()
        self.assertEqual(
            self.argvs("tailscale"),
            [
                ["status", "--json"],
                ["serve", "--bg", "--yes", "--set-path", "/voice/webhook",
                 "http://127.0.0.1:3334/voice/webhook"],
                ["serve", "off", "/voice/webhook"],
            ],
        )  # fmt: skip

    async def test_funnel(self):
        """funnel: the same with `tailscale funnel`, and a path without a leading slash gets one."""
        tunnel = await self.tailscale(self.fake_env(), provider="tailscale-funnel", path="hook")
        self.assertEqual(tunnel.public_url, f"https://{TS_HOST}/hook")
        await tunnel.stop()
        self.assertEqual(
            self.argvs("tailscale")[1:],
            [
                ["funnel", "--bg", "--yes", "--set-path", "/hook", "http://127.0.0.1:3334/hook"],
                ["funnel", "off", "/hook"],
            ],
        )

    async def test_status_failure(self):
        """tailscaled down, bad status or no DNS name: the SPEC text, and no route is added."""
        for behaviour in ("stopped", "garbage"):
            env = self.fake_env(FAKE_TS_STATUS=behaviour)
            self.assertEqual(
                await self.tailscale_failure(env),
                "Could not get Tailscale DNS name. Is Tailscale running?",
            )
            self.assertEqual(self.argvs("tailscale"), [["status", "--json"]])
        env = self.fake_env(FAKE_TS_DNS="")
        self.assertEqual(
            await self.tailscale_failure(env),
            "Could not get Tailscale DNS name. Is Tailscale running?",
        )

    async def test_status_hang(self):
        """A hung `status --json` is killed at its limit and reported as no DNS name."""
        env = self.fake_env(FAKE_TS_STATUS="hang", FAKE_IGNORE_TERM="1")
        message = await self.tailscale_failure(env, status_timeout=1.0)
        self.assertEqual(message, "Could not get Tailscale DNS name. Is Tailscale running?")
        [call] = self.calls("tailscale")
        self.assert_gone(call["pid"])

    async def test_route_timeout(self):
        """A route command still running at its limit is killed: `Tailscale <mode> timed out`."""
        env = self.fake_env(FAKE_TS_FUNNEL="hang", FAKE_IGNORE_TERM="1")
        message = await self.tailscale_failure(env, provider="tailscale-funnel", route_timeout=1.0)
        self.assertEqual(message, "Tailscale funnel timed out")
        self.assert_gone(self.calls("tailscale")[1]["pid"])

    async def test_route_failure(self):
        """A route command exiting non-zero fails with its code and stderr."""
        message = await self.tailscale_failure(self.fake_env(FAKE_TS_SERVE="fail"))
        self.assertEqual(
            message, "Tailscale serve failed with code 1: error: serve config: access denied"
        )

    async def test_cleanup_failure_is_quiet(self):
        """A hanging `tailscale <mode> off` is killed at its limit and stop() still succeeds."""
        env = self.fake_env(FAKE_TS_OFF="hang", FAKE_IGNORE_TERM="1")
        tunnel = await self.tailscale(env, cleanup_timeout=1.0)
        self.assertIsNone(await tunnel.stop())
        self.assert_gone(self.calls("tailscale")[-1]["pid"])

    async def test_self_info(self):
        """tailscale_self_info gives the DNS name without the trailing dot and the node ID."""
        info = await tailscale_self_info(_real_reactor(), env=self.fake_env())
        self.assertEqual((info.dns_name, info.node_id), (TS_HOST, "nTestNode1CNTRL"))

    async def test_unknown_provider(self):
        """Anything but the three providers is a programming error."""
        with self.assertRaises(ValueError):
            await self.tailscale(self.fake_env(), provider="none")


class LegacyTailscaleTests(FakeBinMixin, TestCase):
    """The legacy `tailscale.mode` helper: None instead of errors."""

    async def legacy(self, env: dict, mode: str, **kw):
        return await legacy_tailscale(
            _real_reactor(), mode=mode, port=3334, path="/ts", serve_path="/voice/webhook",
            env=env, **kw,
        )  # fmt: skip

    async def test_serve(self):
        """`tailscale.path` is the route and the public path; the target is the local serve path."""
        tunnel = await self.legacy(self.fake_env(), "serve")
        self.assertEqual(tunnel.public_url, f"https://{TS_HOST}/ts")
        await tunnel.stop()
        self.assertEqual(
            self.argvs("tailscale")[1:],
            [
                ["serve", "--bg", "--yes", "--set-path", "/ts",
                 "http://127.0.0.1:3334/voice/webhook"],
                ["serve", "off", "/ts"],
            ],
        )

    async def test_off(self):
        """Mode off runs nothing and gives None."""
        self.assertIsNone(await self.legacy(self.fake_env(), "off"))
        self.assertEqual(self.calls("tailscale"), [])

    async def test_failures_give_none(self):
        """A failing route, a missing DNS name or a hang past the limit gives None."""
        self.assertIsNone(await self.legacy(self.fake_env(FAKE_TS_FUNNEL="fail"), "funnel"))
        self.assertIsNone(await self.legacy(self.fake_env(FAKE_TS_STATUS="stopped"), "funnel"))
        env = self.fake_env(FAKE_TS_FUNNEL="hang")
        self.assertIsNone(await self.legacy(env, "funnel", timeout=1.0))
        self.assert_gone(self.calls("tailscale")[-1]["pid"])


class ExposeCommandTests(FakeBinMixin, TestCase):
    """The objects `voicecall expose` prints (SPEC §17)."""

    async def expose(self, env: dict, mode: str, **kw) -> dict:
        return await expose_command(
            _real_reactor(), mode=mode, path="/voice/webhook", port=3334,
            serve_path="/voice/webhook", env=env, **kw,
        )  # fmt: skip

    async def test_off(self):
        """off removes both the serve and the funnel route."""
        result = await self.expose(self.fake_env(), "off")
        self.assertEqual(result, {"ok": True, "mode": "off", "path": "/voice/webhook"})
        self.assertEqual(
            self.argvs("tailscale"),
            [["serve", "off", "/voice/webhook"], ["funnel", "off", "/voice/webhook"]],
        )

    async def test_serve(self):
        """serve success: ok, the local URL without path, the public URL, and no hint."""
        result = await self.expose(self.fake_env(), "serve")
        self.assertEqual(
            list(result.items()),
            [
                ("ok", True),
                ("mode", "serve"),
                ("path", "/voice/webhook"),
                ("localUrl", "http://127.0.0.1:3334"),
                ("publicUrl", f"https://{TS_HOST}/voice/webhook"),
            ],
        )
        self.assertEqual(
            self.argvs("tailscale")[1],
            ["serve", "--bg", "--yes", "--set-path", "/voice/webhook",
             "http://127.0.0.1:3334/voice/webhook"],
        )  # fmt: skip

    async def test_funnel(self):
        """funnel success, with the mode given in any case."""
        result = await self.expose(self.fake_env(), " Funnel ")
        self.assertEqual(
            result,
            {
                "ok": True,
                "mode": "funnel",
                "path": "/voice/webhook",
                "localUrl": "http://127.0.0.1:3334",
                "publicUrl": f"https://{TS_HOST}/voice/webhook",
            },
        )

    async def test_unknown_mode_is_refused(self):
        """An unknown mode (`of`, a typo of `off`) is refused: nothing runs, least of all a funnel."""
        env = self.fake_env()
        for mode in ("of", "public", ""):
            with self.assertRaises(ValueError) as caught:
                await self.expose(env, mode)
            self.assertIn("off, serve or funnel", str(caught.exception))
        self.assertEqual(self.argvs("tailscale"), [])

    async def test_missing_tailscale(self):
        """Without a tailscale executable the answer says so, with no hint about funnel being disabled."""
        env = self.fake_env()
        env["PATH"] = str(self.state)  # an empty directory
        for mode in ("funnel", "off"):
            result = await self.expose(env, mode)
            self.assertEqual(result["ok"], False, mode)
            self.assertIn("tailscale is not installed", result["error"])
            self.assertNotIn("hint", result)

    async def test_funnel_not_enabled(self):
        """A funnel the tailnet has not enabled (the command waits): ok false and the enable hint."""
        env = self.fake_env(FAKE_TS_FUNNEL="hang", FAKE_IGNORE_TERM="1")
        result = await self.expose(env, "funnel", timeout=1.0)
        self.assertEqual(
            list(result.items()),
            [
                ("ok", False),
                ("mode", "funnel"),
                ("path", "/voice/webhook"),
                ("localUrl", "http://127.0.0.1:3334"),
                ("publicUrl", None),
                ("error", "Tailscale funnel timed out"),
                (
                    "hint",
                    {
                        "note": HINT_NOTE,
                        "enableUrl": "https://login.tailscale.com/f/funnel?node=nTestNode1CNTRL",
                    },
                ),
            ],
        )
        self.assert_gone(self.calls("tailscale")[1]["pid"])

    async def test_failure_says_why(self):
        """A failed route says what failed in `error`."""
        result = await self.expose(self.fake_env(FAKE_TS_SERVE="fail"), "serve")
        self.assertEqual(result["ok"], False)
        self.assertTrue(result["error"].startswith("Tailscale serve failed with code 1"), result["error"])

    async def test_failure_without_node_id(self):
        """When Tailscale is not running the hint has a null enableUrl."""
        result = await self.expose(self.fake_env(FAKE_TS_STATUS="stopped"), "serve")
        self.assertEqual(result["ok"], False)
        self.assertIsNone(result["publicUrl"])
        self.assertEqual(result["hint"], {"note": HINT_NOTE, "enableUrl": None})


# --- SPEC default limits on a Clock ----------------------------------------------------------


class FakeProcess:
    """An in-memory child: the test writes its output and decides when it ends."""

    def __init__(self, proto, args, pid: int) -> None:
        self.proto = proto
        self.args = list(args[1:])
        self.pid = pid
        self.signals: list[str] = []
        self.ignore_term = False
        self.ended = False

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL" or not self.ignore_term:
            self.exit(None, signal=9 if name == "KILL" else 15)

    def out(self, data: bytes) -> None:
        self.proto.childDataReceived(1, data)

    def err(self, data: bytes) -> None:
        self.proto.childDataReceived(2, data)

    def exit(self, code: int | None, signal: int | None = None) -> None:
        self.ended = True
        for fd in (0, 1, 2):
            self.proto.childConnectionLost(fd)
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(code, signal)
        self.proto.processEnded(Failure(reason))


class ProcessClock(Clock):
    """A Clock that also spawns FakeProcesses."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, proto, executable, args=(), env=None, *a, **kw):
        process = FakeProcess(proto, args, pid=1000 + len(self.processes))
        self.processes.append(process)
        proto.makeConnection(process)
        return process


STARTED_URL = "https://x.ngrok-free.app"
STARTED = (
    '{"lvl":"info","msg":"started tunnel","obj":"tunnels","name":"command_line",'
    '"addr":"http://localhost:3334","url":"https://x.ngrok-free.app",'
    '"note":"caf\u00e9 \U0001F600"}\n'
).encode("utf-8")
EXECUTABLES = {"ngrok": str(FAKEBIN / "ngrok"), "tailscale": str(FAKEBIN / "tailscale")}
STATUS = json.dumps({"Self": {"DNSName": f"{TS_HOST}.", "ID": "nX"}}).encode()


class DefaultLimitTests(SynchronousTestCase):
    """The SPEC's time limits and the line handling, on a Clock."""

    def setUp(self):
        self.clock = ProcessClock()

    def ngrok(self, **kw) -> Deferred:
        kw.setdefault("ngrok_auth_token", None)
        return Deferred.fromCoroutine(
            start_tunnel(
                self.clock, provider="ngrok", port=3334, path="/voice/webhook", ngrok_domain=None,
                env={"PATH": ""}, executables=EXECUTABLES, **kw,
            )  # fmt: skip
        )

    def test_auth_token_limit_is_30s(self):
        """add-authtoken is SIGKILLed after 30 s: `ngrok command timed out after 30000ms`."""
        d = self.ngrok(ngrok_auth_token="tok")
        [auth] = self.clock.processes
        self.assertEqual(auth.args, ["config", "add-authtoken", "tok"])
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(str(failure.value), "ngrok command timed out after 30000ms")
        self.assertEqual(auth.signals, ["KILL"])
        self.assertEqual(len(self.clock.processes), 1)

    def test_startup_limit_is_30s_then_2s_grace(self):
        """No URL after 30 s: SIGTERM, SIGKILL 2 s later, then `ngrok startup timed out (30s)`."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        ngrok.ignore_term = True
        self.clock.advance(30)
        self.assertEqual(ngrok.signals, ["TERM"])
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(ngrok.signals, ["TERM", "KILL"])
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(str(failure.value), "ngrok startup timed out (30s)")

    def test_stop_grace_is_2s(self):
        """stop() sends SIGTERM and SIGKILL after 2 s to a child that ignores it."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        ngrok.out(STARTED)
        tunnel = self.successResultOf(d)
        ngrok.ignore_term = True
        stopped = tunnel.stop()
        self.assertEqual(ngrok.signals, ["TERM"])
        self.clock.advance(1.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.assertEqual(ngrok.signals, ["TERM", "KILL"])
        self.assertIsNone(self.successResultOf(stopped))

    def test_version_probe_limit_is_5s(self):
        """A hanging `ngrok version` is SIGKILLed after 5 s and reported unavailable."""
        d = Deferred.fromCoroutine(
            ngrok_available(self.clock, env={"PATH": ""}, executables=EXECUTABLES)
        )
        [probe] = self.clock.processes
        self.assertEqual(probe.args, ["version"])
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(probe.signals, ["KILL"])

    def tailscale(self, provider: str) -> Deferred:
        return Deferred.fromCoroutine(
            start_tunnel(
                self.clock, provider=provider, port=3334, path="/p", ngrok_auth_token=None,
                ngrok_domain=None, env={"PATH": ""}, executables=EXECUTABLES,
            )  # fmt: skip
        )

    def test_tailscale_status_limit_is_2_5s(self):
        """A hanging `tailscale status --json` is SIGKILLed after 2.5 s."""
        d = self.tailscale("tailscale-serve")
        [status] = self.clock.processes
        self.assertEqual(status.args, ["status", "--json"])
        self.clock.advance(2.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(status.signals, ["KILL"])
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(
            str(failure.value), "Could not get Tailscale DNS name. Is Tailscale running?"
        )

    def test_tailscale_route_limit_is_10s(self):
        """The serve/funnel command is SIGKILLed after 10 s: `Tailscale funnel timed out`."""
        d = self.tailscale("tailscale-funnel")
        status = self.clock.processes[0]
        status.out(STATUS)
        status.exit(0)
        route = self.clock.processes[1]
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(route.signals, ["KILL"])
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(str(failure.value), "Tailscale funnel timed out")

    def test_tailscale_cleanup_limit_is_5s(self):
        """`tailscale <mode> off <path>` is SIGKILLed after 5 s and stop() still fires."""
        d = self.tailscale("tailscale-serve")
        self.clock.processes[0].out(STATUS)
        self.clock.processes[0].exit(0)
        self.clock.processes[1].exit(0)
        stopped = self.successResultOf(d).stop()
        cleanup = self.clock.processes[2]
        self.assertEqual(cleanup.args, ["serve", "off", "/p"])
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.assertEqual(cleanup.signals, ["KILL"])
        self.assertIsNone(self.successResultOf(stopped))

    def test_legacy_limit_is_2_5s(self):
        """The legacy helper gives its route command 2.5 s, then None."""
        d = Deferred.fromCoroutine(
            legacy_tailscale(
                self.clock, mode="funnel", port=3334, path="/p", serve_path="/p",
                env={"PATH": ""}, executables=EXECUTABLES,
            )  # fmt: skip
        )
        self.clock.processes[0].out(STATUS)
        self.clock.processes[0].exit(0)
        route = self.clock.processes[1]
        self.clock.advance(2.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(route.signals, ["KILL"])
        self.assertIsNone(self.successResultOf(d))

    def test_log_read_byte_by_byte(self):
        """Log lines arriving one byte at a time (UTF-8 split everywhere) are reassembled."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        for i in range(len(STARTED)):
            ngrok.out(STARTED[i : i + 1])
        self.assertEqual(self.successResultOf(d).public_url, f"{STARTED_URL}/voice/webhook")

    def test_overlong_line_is_dropped(self):
        """An endless line is dropped, not buffered, and the next complete line still counts."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        for _ in range(100):
            ngrok.out(b'{"url":"https://junk.example","addr":"' + b"x" * 1000)
        ngrok.out(b'"}\n')
        self.assertNoResult(d)
        ngrok.out(STARTED)
        self.assertEqual(self.successResultOf(d).public_url, f"{STARTED_URL}/voice/webhook")

    def test_error_marker_at_end_of_stream(self):
        """An ERR_NGROK line without a newline is still seen when stderr closes, before the exit."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        ngrok.err(b"ERR_NG")
        ngrok.err(b"ROK_3200: invalid auth token")
        self.assertNoResult(d)
        ngrok.exit(1)
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(str(failure.value), "ngrok error: ERR_NGROK_3200: invalid auth token")

    def test_error_output_is_bounded(self):
        """The stderr kept for the error message is capped and marked truncated."""
        d = self.ngrok()
        [ngrok] = self.clock.processes
        for _ in range(1000):
            ngrok.err(b"noise " * 20 + b"\n")
        ngrok.err(b"ERR_NGROK_108: too many sessions\n")
        message = str(self.failureResultOf(d, ExposeError).value)
        self.assertTrue(message.startswith("ngrok error: [output truncated] "), message[:80])
        self.assertTrue(message.endswith("ERR_NGROK_108: too many sessions"))
        self.assertLess(len(message), 5000)
        self.assertEqual(ngrok.signals, ["KILL"])

    def test_killed_by_signal(self):
        """ngrok ended by a signal before a URL reports code null, as upstream did."""
        d = self.ngrok()
        self.clock.processes[0].exit(None, signal=9)
        failure = self.failureResultOf(d, ExposeError)
        self.assertEqual(str(failure.value), "ngrok exited unexpectedly with code null")

    def test_cancel_kills(self):
        """Cancelling the start kills the ngrok child."""
        d = self.ngrok()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.processes[0].signals, ["KILL"])


class ExposeCliTests(FakeBinMixin, TestCase):
    """`voicecall expose` run as a program, against tests/fakebin/tailscale."""

    async def cli(self, env: dict, *args: str) -> tuple[int, str, str]:
        from twisted.internet.utils import getProcessOutputAndValue

        config = Path(self.mktemp() + ".json")
        config.write_text(json.dumps({"store": str(config.parent / "store")}))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "voicecall.control.cli", "--config", str(config), "expose", *args], env=env
        )
        return code, out.decode(), err.decode()

    async def test_typo_of_off_is_a_usage_error(self):
        """`expose --mode of` exits 2 naming the modes, and runs no tailscale command at all."""
        code, out, err = await self.cli(self.fake_env(), "--mode", "of")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("'off', 'serve', 'funnel'", err)
        self.assertEqual(self.argvs("tailscale"), [])

    async def test_not_ok_exits_1(self):
        """A failed exposure prints its JSON and exits 1 with the reason on stderr."""
        code, out, err = await self.cli(self.fake_env(FAKE_TS_STATUS="stopped"), "--mode", "serve")
        self.assertEqual(code, 1, err)
        self.assertEqual(json.loads(out)["ok"], False)
        self.assertIn("Error: Could not get Tailscale DNS name", err)

    async def test_missing_tailscale_says_so(self):
        """Without tailscale installed, the CLI says so (exit 1) instead of hinting funnel is disabled."""
        env = self.fake_env()
        env["PATH"] = os.path.dirname(sys.executable)
        code, out, err = await self.cli(env, "--mode", "funnel")
        self.assertEqual(code, 1, err)
        self.assertIn("tailscale is not installed", err)
        self.assertNotIn("hint", json.loads(out))
