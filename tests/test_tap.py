"""
Tests for voicecall.tap and twisted/plugins/voicecall_plugin.py: `twistd voicecall` option parsing
(the whole parsed dict, STYLE.md §13), refusal of bad or disabled configs, private UNIX endpoints,
the service tree built on a MemoryReactorClock, and the plugin's discoverability.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys

from twisted.application.service import Application, IServiceMaker
from twisted.logger import ILogObserver, LogLevel
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from voicecall import tap
from voicecall.config import DISABLED_MESSAGE
from voicecall.config.model import ServeConfig, VoiceCallConfig
from tests.harness import (
    READY,
    READY_TIMEOUT,
    ChildProcess,
    daemon_argv,
    event,
    http_client,
    make_workdir,
    run_cli,
    serve,
    spawn,
    spawn_daemon,
    webhook_client,
)

P = "plugins.entries.voice-call.config"


class TapTestsBase(SynchronousTestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.env = {"HOME": self.home}
        self.patch(os, "environ", self.env)

    def write_config(self, data, name: str = "voicecall.json5") -> str:
        path = os.path.join(self.home, name)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return path

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def refused(self, *argv: str) -> str:
        """What the refusal prints (SystemExit: twistd prints a UsageError after its usage text)."""
        exc = self.assertRaises(SystemExit, self.parse, *argv)
        self.assertIsInstance(exc.code, str)
        return exc.code


class OptionsTests(TapTestsBase):
    """Options turns the command line and config file into the values makeService needs."""

    def test_whole_dict(self):
        """With --config only, the endpoints come from the config and the store, and nothing else is set."""
        store = os.path.join(self.home, "state")
        path = self.write_config(
            "// JSON5 is fine\n"
            f'{{provider: "mock", store: "{store}", toNumber: "+15550001234",'
            ' serve: {port: 4000, bind: "127.0.0.1"},}'
        )
        options = self.parse("--config", path)
        self.assertEqual(
            dict(options),
            {
                "config": path,
                "config_path": path,
                "webhook": "tcp:4000:interface=127.0.0.1",
                "rpc": f"unix:{store}/voicecall.sock:mode=600:lockfile=1",
                "voicecall": VoiceCallConfig(
                    provider="mock",
                    store=store,
                    to_number="+15550001234",
                    serve=ServeConfig(port=4000, bind="127.0.0.1"),
                ),
            },
        )

    def test_config_from_environment(self):
        """$VOICECALL_CONFIG names the config file when --config is absent."""
        path = self.write_config({"serve": {"port": 4100}}, "elsewhere.json")
        self.env["VOICECALL_CONFIG"] = path
        options = self.parse()
        self.assertEqual((options["config_path"], options["webhook"]), (path, "tcp:4100:interface=127.0.0.1"))

    def test_socket_from_environment(self):
        """$VOICECALL_SOCKET is the default RPC socket, made private."""
        self.env["VOICECALL_SOCKET"] = "/run/voicecall/rpc.sock"
        options = self.parse("--config", self.write_config({}))
        self.assertEqual(options["rpc"], "unix:/run/voicecall/rpc.sock:mode=600:lockfile=1")

    def test_explicit_endpoints(self):
        """--webhook is used as given; a --rpc UNIX endpoint without mode or lockfile gets mode=600 and lockfile."""
        options = self.parse(
            "--config", self.write_config({}), "--webhook", "tcp:0:interface=127.0.0.1", "--rpc", "unix:/tmp/vc.sock"
        )
        self.assertEqual(
            (options["webhook"], options["rpc"]), ("tcp:0:interface=127.0.0.1", "unix:/tmp/vc.sock:mode=600:lockfile=1")
        )

    def test_explicit_mode_and_lockfile_kept(self):
        """An explicit mode= or lockfile= on the UNIX endpoint is kept; only the missing one is added."""
        path = self.write_config({})
        self.assertEqual(self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:mode=660")["rpc"], "unix:/tmp/vc.sock:mode=660:lockfile=1")
        self.assertEqual(self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:lockfile=0")["rpc"], "unix:/tmp/vc.sock:lockfile=0:mode=600")
        self.assertEqual(
            self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:lockfile=0:mode=640")["rpc"],
            "unix:/tmp/vc.sock:lockfile=0:mode=640",
        )

    def test_non_unix_rpc_untouched(self):
        """A --rpc endpoint that is not UNIX is used unchanged."""
        self.assertEqual(self.parse("--config", self.write_config({}), "--rpc", "tcp:9000:interface=127.0.0.1")["rpc"], "tcp:9000:interface=127.0.0.1")

    def test_unix_endpoint_helper(self):
        """unix_endpoint privatises `unix:` strings (address= form too) and leaves others alone."""
        self.assertEqual(tap.unix_endpoint("unix:address=/tmp/a.sock"), "unix:address=/tmp/a.sock:mode=600:lockfile=1")
        self.assertEqual(tap.unix_endpoint("systemd:domain=UNIX:index=0"), "systemd:domain=UNIX:index=0")

    def test_bad_endpoints_refused(self):
        """An endpoint string Twisted cannot parse is refused in option parsing, naming the option and the string."""
        path = self.write_config({})
        self.assertEqual(
            [self.refused("--config", path, *argv) for argv in
             (["--webhook", "tcp:abc"], ["--rpc", "bogus:x"], ["--rpc", "unix:"], ["--webhook", "tcp:0:backlog=many"])],
            ['voicecall: --webhook "tcp:abc": \'abc\' is not a number, e.g. tcp:3334:interface=127.0.0.1',
             'voicecall: --rpc "bogus:x": unknown endpoint type "bogus", e.g. unix:/path/to/voicecall.sock',
             'voicecall: --rpc "unix:": a UNIX endpoint needs a path, e.g. unix:/path/to/voicecall.sock',
             'voicecall: --webhook "tcp:0:backlog=many": \'many\' is not a number, e.g. tcp:3334:interface=127.0.0.1'],
        )  # fmt: skip

    def test_ipv6_bind_is_escaped(self):
        """serve.bind "::1" makes a webhook endpoint Twisted parses (colons escaped)."""
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        webhook = self.parse("--config", self.write_config({"serve": {"bind": "::1"}}))["webhook"]
        self.assertEqual(webhook, "tcp:3334:interface=\\:\\:1")
        self.assertEqual(serverFromString(MemoryReactor(), webhook)._interface, "::1")

    def test_malformed_config_lists_every_problem(self):
        """A config with several bad values is refused with one line per problem, each naming the file."""
        path = self.write_config(
            {"provider": "carrier-pigeon", "serve": {"port": "x"}, "maxConcurrentCalls": 0, "fromNumber": "555"}
        )
        self.assertEqual(
            self.refused("--config", path).splitlines(),
            [f'{path}: provider: expected one of "telnyx", "twilio", "plivo", "mock" (got "carrier-pigeon")',
             f'{path}: serve.port: expected an integer > 0 (got "x")',
             f"{path}: maxConcurrentCalls: expected an integer > 0 (got 0)",
             f'{path}: fromNumber: Expected E.164 format, e.g. +15550001234 (got "555")'],
        )  # fmt: skip

    def test_unparseable_config(self):
        """A file that is not JSON or JSON5 is refused with one line naming the file, line and column."""
        path = self.write_config("{provider: ")
        self.assertEqual(self.refused("--config", path), f"{path}:1:12: not valid JSON or JSON5: Unexpected end of input")

    def test_missing_config(self):
        """A --config that does not exist is refused with one line naming the file."""
        path = os.path.join(self.home, "nope.json5")
        self.assertEqual(self.refused("--config", path), f"{path}: cannot read config file: No such file or directory")

    def disabled(self, path: str) -> str:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        exc = self.assertRaises(SystemExit, self.parse, "--config", path)
        self.assertEqual(exc.code, tap.DISABLED_EXIT_STATUS)
        return stderr.getvalue()

    def test_disabled(self):
        """`enabled: false` exits with the status systemd does not restart, saying so in one line."""
        path = self.write_config({"enabled": False})
        self.assertEqual(
            self.disabled(path), f"voicecall: not starting: {path} says enabled: false ({DISABLED_MESSAGE})\n"
        )
        self.assertEqual(DISABLED_MESSAGE, "Voice call disabled. Enable the plugin entry in config.")

    def test_disabled_plugin_entry(self):
        """A whole OpenClaw config whose voice-call entry is disabled is refused the same way."""
        path = self.write_config({"plugins": {"entries": {"voice-call": {"enabled": False, "config": {}}}}})
        self.assertIn("enabled: false", self.disabled(path))


class MakeServiceTests(TapTestsBase):
    """makeService wires a named service tree without touching the network."""

    def setUp(self):
        super().setUp()
        store = os.path.join(self.home, "state")
        self.options = self.parse(
            "--config",
            self.write_config({"store": store, "staleCallReaperSeconds": 120}),
            "--webhook",
            "tcp:9999:interface=127.0.0.1",
            "--rpc",
            f"unix:{store}/rpc.sock",
        )
        self.reactor = MemoryReactorClock()
        self.service = tap.makeService(self.options, reactor=self.reactor)

    def test_named_children(self):
        """The daemon is `voicecall` with the children `reaper`, `rpc` and `webhook`."""
        self.assertEqual(self.service.name, "voicecall")
        self.assertEqual(sorted(s.name for s in self.service), ["reaper", "rpc", "webhook"])

    def test_listeners_use_the_option_endpoints(self):
        """The webhook and RPC listeners are built from the parsed endpoint strings."""
        webhook = self.service.getServiceNamed("webhook")
        rpc = self.service.getServiceNamed("rpc")
        self.assertEqual(webhook.description, "tcp:9999:interface=127.0.0.1")
        self.assertEqual(rpc.description, f"unix:{self.home}/state/rpc.sock:mode=600:lockfile=1")

    def test_nothing_listens_before_start(self):
        """Building the service binds nothing and schedules nothing."""
        self.assertEqual((self.reactor.tcpServers, self.reactor.unixServers), ([], []))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class PluginTests(SynchronousTestCase):
    """The twistd plugin is discoverable and points at voicecall.tap."""

    def test_plugin_discovered(self):
        """`voicecall` is among the IServiceMaker plugins twistd finds, backed by voicecall.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("voicecall", makers)
        maker = makers["voicecall"]
        self.assertIs(maker.options, tap.Options)
        self.assertEqual(maker.makeService, tap.makeService)


class StartupTests(TestCase):
    """`twistd voicecall` as a subprocess: what a person sees when it cannot start, and its log."""

    timeout = 60

    async def refused(self, workdir, *extra: str, status: int = 1) -> ChildProcess:
        child = spawn(self, daemon_argv(workdir) + list(extra), cwd=workdir.path)
        await child.ended(30)
        self.assertEqual(child.exit_code, status, child.describe())
        for noise in ("Usage:", "Traceback", "--help"):
            self.assertNotIn(noise, child.stdout + child.stderr)
        return child

    async def test_bad_config_prints_only_the_problems(self):
        """A bad config prints its problems on stderr, one line each, and nothing else; exit 1."""
        workdir = make_workdir(self, {"provider": "twillio", "twilio": {"acountSid": "AC1", "authToken": 7}})
        child = await self.refused(workdir)
        path = workdir.config_path
        self.assertEqual(
            child.stderr.splitlines(),
            [f'{path}: provider: expected one of "telnyx", "twilio", "plivo", "mock" (got "twillio") (did you mean "twilio"?)',
             f'{path}: twilio.acountSid: unknown key (did you mean "accountSid"?)',
             f"{path}: twilio.authToken: expected a non-empty string (got a hidden number)"],
        )  # fmt: skip
        self.assertEqual(child.stdout, "")
        self.assertEqual(sorted(os.listdir(workdir.path)), ["voicecall.json"])

    async def test_bad_json(self):
        """A JSON5 syntax error is one line with the file, line and column."""
        workdir = make_workdir(self, raw='{\n  provider: "mock",\n  serve: {port: @},\n}\n')
        child = await self.refused(workdir)
        self.assertEqual(child.stderr, f'{workdir.config_path}:3:17: not valid JSON or JSON5: Unexpected "@"\n')

    async def test_missing_and_unreadable_file(self):
        """A missing config file is one line naming it."""
        workdir = make_workdir(self)
        missing = os.path.join(workdir.path, "nope.json5")
        child = await self.refused(workdir, "--config", missing)
        self.assertEqual(child.stderr, f"{missing}: cannot read config file: No such file or directory\n")

    async def test_group_writable_config_refused(self):
        """A config file other users can write stops the daemon with one line naming it and the fix."""
        workdir = make_workdir(self)
        os.chmod(workdir.config_path, 0o646)
        child = await self.refused(workdir)
        self.assertEqual(len(child.stderr.splitlines()), 1, child.stderr)
        self.assertIn(f"{workdir.config_path}: config file is writable by other users", child.stderr)

    async def test_disabled_exits_with_the_status_systemd_does_not_restart(self):
        """`enabled: false`: one line, and the exit status the unit's RestartPreventExitStatus= names."""
        workdir = make_workdir(self, {"enabled": False})
        child = await self.refused(workdir, status=tap.DISABLED_EXIT_STATUS)
        self.assertEqual(
            child.stderr, f"voicecall: not starting: {workdir.config_path} says enabled: false ({DISABLED_MESSAGE})\n"
        )

    async def test_busy_port_is_one_line(self):
        """A second daemon on a busy webhook port says so in one line (no traceback) and exits 1."""
        first = await spawn_daemon(self, make_workdir(self))
        port = int(first.base_url.rsplit(":", 1)[1])
        workdir = make_workdir(self)
        child = await self.refused(workdir, "--webhook", f"tcp:{port}:interface=127.0.0.1")
        line = f"port {port} on 127.0.0.1 is in use (another voicecall? check `voicecall status`)"
        self.assertEqual(child.stderr, f"voicecall failed to start: {line}\n")
        self.assertNotIn("in use", child.stdout)  # the line is said once, on stderr, not logged again
        self.assertNotIn("twistd", child.stdout)
        self.assertNotIn("voicecall ready", child.stdout)

    async def test_second_daemon_on_the_same_checkout_is_one_line(self):
        """A second `make run` (same store, socket and port) prints one line, on stderr, and nothing on stdout about it."""
        workdir = make_workdir(self)
        await spawn_daemon(self, workdir)
        child = await self.refused(workdir)
        self.assertEqual(len(child.stderr.splitlines()), 1, child.stderr)
        self.assertIn("voicecall failed to start: the store", child.stderr)
        self.assertIn("is in use by another voicecall daemon", child.stderr)
        self.assertEqual(child.stdout, "")

    async def test_bad_endpoint_is_a_usage_error(self):
        """A --webhook or --rpc endpoint that does not parse is one line naming the option and the string; exit 1."""
        workdir = make_workdir(self)
        child = await self.refused(workdir, "--webhook", "tcp:abc")
        self.assertEqual(len(child.stderr.splitlines()), 1, child.stderr)
        self.assertIn('--webhook "tcp:abc"', child.stderr)
        self.assertNotIn("invalid literal", child.stderr)
        self.assertEqual(child.stdout, "")
        child = await self.refused(workdir, "--rpc", "bogus:x")
        self.assertEqual(len(child.stderr.splitlines()), 1, child.stderr)
        self.assertIn('--rpc "bogus:x"', child.stderr)
        self.assertEqual(child.stdout, "")
        self.assertEqual(sorted(os.listdir(workdir.path)), ["voicecall.json"])

    async def test_busy_rpc_socket_is_one_line(self):
        """A second daemon (on a store of its own) on the same RPC socket says the socket is in use."""
        workdir = make_workdir(self)
        await spawn_daemon(self, workdir)
        child = await self.refused(make_workdir(self), "--rpc", "unix:" + workdir.rpc_path)
        self.assertEqual(
            child.stderr,
            f"voicecall failed to start: RPC socket {workdir.rpc_path} is in use (another voicecall? check `voicecall status`)\n",
        )

    async def test_log_at_default_level(self):
        """The bare ready line, config warnings, and one line per call placed, answered and ended; no debug."""
        workdir = make_workdir(self, {"provider": "log"})
        daemon = await spawn_daemon(self, workdir)
        self.assertRegex(daemon.process.stdout, re.compile(r"^voicecall ready: webhook \S+  rpc \S+$", re.M))
        self.assertIn(f'config {workdir.config_path}: provider "log" is deprecated; use "mock" instead', daemon.process.stdout)
        placed = await run_cli(self, workdir, "call", "--to", "+15550001234", "--message", "Hi")
        call_id = placed.json()["callId"]
        web = webhook_client(self)
        await web.post(daemon.webhook_url, event("call.answered", call_id))
        await web.post(daemon.webhook_url, event("call.ended", call_id, reason="hangup-user"))
        await daemon.process.wait_for_output(re.compile(rb"ended: hangup-user"), 10, "the ended line")
        await daemon.stop()
        calls = [line.split("] ", 1)[1] for line in daemon.process.stdout.splitlines() if call_id in line]
        self.assertEqual(
            calls, [f"call {call_id} placed (conversation)", f"call {call_id} answered", f"call {call_id} ended: hangup-user"]
        )
        self.assertNotIn("#debug]", daemon.process.stdout)
        self.assertNoStartupNoise(daemon.process.stdout)

    def assertNoStartupNoise(self, stdout: str) -> None:
        """Twisted's factory and port chatter is not shown at the default level."""
        for noise in (r"starting on", r"Port .* Closed", r"Starting factory", r"Stopping factory"):
            self.assertNotRegex(stdout, noise)

    async def test_media_streams_on_twisted_default_reactor(self):
        """With media streams on, the daemon runs on Twisted's default reactor and asks for no other."""
        workdir = make_workdir(self, {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "token", "baseUrl": "http://127.0.0.1:9"},
            "publicUrl": "https://voice.example.com/voice/webhook",
            "streaming": {"enabled": True, "providers": {"openai": {"apiKey": "sk-stt"}}},
            "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts"}},
        })  # fmt: skip
        daemon = await spawn_daemon(self, workdir)
        local = re.search(r"Webhook URL: (http://\S+)/voice/webhook", daemon.process.stdout).group(1)
        stream = await http_client(self).get(local + "/voice/stream")  # served: streams are on
        await stream.content()
        await daemon.stop()
        self.assertNotEqual(stream.code, 404)
        self.assertNotIn("reactor", daemon.process.stdout)

    async def test_carrier_failure_logged_with_the_api_root(self):
        """A call the carrier API refuses is one line naming the API root, never the credentials."""
        workdir = make_workdir(
            self,
            {"provider": "twilio", "fromNumber": "+15550000000", "publicUrl": "https://voice.example.com/voice/webhook",
             "twilio": {"accountSid": "AC00000000000000000000000000000000", "authToken": "sekrit-token",
                        "baseUrl": "http://127.0.0.1:9"}},
        )  # fmt: skip
        daemon = await spawn_daemon(self, workdir)
        placed = await run_cli(self, workdir, "call", "--to", "+15550001234", "--message", "Hi")
        self.assertNotEqual(placed.code, 0)
        await daemon.process.wait_for_output(re.compile(rb"failed at the carrier"), 10, "the failure line")
        await daemon.stop()
        lines = [line for line in daemon.process.stdout.splitlines() if "failed at the carrier" in line]
        self.assertEqual(len(lines), 1, daemon.process.stdout)
        self.assertTrue(lines[0].endswith("failed at the carrier (http://127.0.0.1:9)"), lines[0])
        self.assertNotIn("ended: failed", daemon.process.stdout)
        self.assertNoStartupNoise(daemon.process.stdout)
        self.assertNotIn("sekrit", daemon.process.stdout + daemon.process.stderr)

    async def test_log_file_has_no_http_pool_chatter(self):
        """
        Under --logfile (twistd's own observer, every level) the carrier API's connections say
        nothing: no "Starting factory"/"Stopping factory" pair per connection; the daemon's lines are there.
        """
        carrier = Resource()
        carrier.isLeaf = True
        carrier.render_POST = lambda request: request.setResponseCode(500) or b'{"message": "no"}'
        base_url = await serve(self, carrier)
        workdir = make_workdir(
            self,
            {"provider": "twilio", "fromNumber": "+15550000000", "publicUrl": "https://voice.example.com/voice/webhook",
             "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "token", "baseUrl": base_url}},
        )  # fmt: skip
        logfile = os.path.join(workdir.path, "voicecall.log")
        argv = daemon_argv(workdir)
        argv.insert(argv.index("voicecall"), f"--logfile={logfile}")
        process = spawn(self, argv, cwd=workdir.path)
        await process.wait_for_output(READY, READY_TIMEOUT, "voicecall ready line")
        placed = await run_cli(self, workdir, "call", "--to", "+15550001234", "--message", "Hi")
        self.assertNotEqual(placed.code, 0)  # the carrier answered 500: a request was made
        process.send_signal("TERM")
        await process.ended()
        with open(logfile, encoding="utf-8") as f:
            log = f.read()
        self.assertIn("Webhook URL: http://127.0.0.1:", log)
        self.assertIn(f"failed at the carrier ({base_url})", log)
        self.assertNotRegex(log, r"Starting factory|Stopping factory")


class LogLevelTests(TapTestsBase):
    """Under `twistd -n` (stdout logging) debug events are dropped; a log file keeps twistd's default."""

    def service(self, twistd_options):
        self.stdout = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        options = self.parse("--config", self.write_config({"store": os.path.join(self.home, "s")}))
        options.parent = twistd_options
        return tap.makeService(options, reactor=MemoryReactorClock())

    def test_stdout_drops_debug(self):
        """With -n and no --logfile the Application's log observer keeps info and above."""
        application = Application("voicecall")
        self.service({"nodaemon": True, "logfile": None}).setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn):
            observer({"log_level": level, "log_format": "{what} line", "what": level.name, "log_namespace": "x", "log_time": 0})
        self.assertEqual([line.split("] ", 1)[1] for line in self.stdout.getvalue().splitlines()], ["info line", "warn line"])

    def test_level_from_environment(self):
        """$VOICECALL_LOG_LEVEL=debug keeps debug events."""
        self.env["VOICECALL_LOG_LEVEL"] = "debug"
        application = Application("voicecall")
        self.service({"nodaemon": True, "logfile": None}).setServiceParent(application)
        application.getComponent(ILogObserver)({"log_level": LogLevel.debug, "log_format": "d", "log_namespace": "x", "log_time": 0})
        self.assertIn("d", self.stdout.getvalue())

    def test_level_spellings(self):
        """`warning` is `warn` (Python's spelling), any case; a level Twisted does not know is said on
        stderr, naming the levels, and the daemon logs at info rather than silently."""
        def kept(level):
            self.env["VOICECALL_LOG_LEVEL"] = level
            self.stdout = None
            application = Application("voicecall")
            self.service({"nodaemon": True, "logfile": None}).setServiceParent(application)
            for name in ("debug", "info", "warn"):
                application.getComponent(ILogObserver)(
                    {"log_level": LogLevel.levelWithName(name), "log_format": name, "log_namespace": "x", "log_time": 0})
            return [line.split("] ", 1)[1] for line in self.stdout.getvalue().splitlines()]

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(kept("warning"), ["warn"])
        self.assertEqual(kept("WARN"), ["warn"])

        def said():  # stderr's lines about the level (other threads of the run may write there too)
            return [line for line in stderr.getvalue().splitlines() if "VOICECALL_LOG_LEVEL" in line]

        self.assertEqual(said(), [])
        self.assertEqual(kept("verbose"), ["info", "warn"])
        self.assertEqual(
            said(), ["voicecall: VOICECALL_LOG_LEVEL=verbose is not a level (debug, info, warn, error, critical); logging at info"]
        )

    def test_port_chatter_only_at_debug(self):
        """Twisted's "... starting on ..." and "(TCP Port ... Closed)" lines show only at debug."""
        def shown(level):
            self.env["VOICECALL_LOG_LEVEL"] = level
            application = Application("voicecall")
            self.service({"nodaemon": True, "logfile": None}).setServiceParent(application)
            for text in ("ScreenedSite starting on 3334", "(TCP Port 3334 Closed)", "(UNIX Port /s/v.sock Closed)", "hello"):
                application.getComponent(ILogObserver)(
                    {"log_level": LogLevel.info, "message": (text,), "log_format": "{log_text}", "log_text": text,
                     "log_namespace": "log_legacy", "log_time": 0})  # fmt: skip
            return [line.split("] ", 1)[1] for line in self.stdout.getvalue().splitlines()]

        self.assertEqual(shown("info"), ["hello"])
        self.assertEqual(len(shown("debug")), 4)

    def test_log_file_left_to_twistd(self):
        """With --logfile, --syslog or --logger (or outside twistd) twistd's own observer stands."""
        for parent in ({"nodaemon": True, "logfile": "/tmp/x.log"}, {"nodaemon": True, "syslog": True},
                       {"nodaemon": True, "logger": "a.b"}, None):  # fmt: skip
            application = Application("voicecall")
            self.service(parent).setServiceParent(application)
            self.assertIsNone(application.getComponent(ILogObserver, None), parent)


class _ThreadedMemoryReactor(MemoryReactorClock):
    """A MemoryReactorClock a started service's store writer thread can report to: what it hands
    back is dropped (these tests look only at start-up's log), instead of an AttributeError that
    ends the thread and prints its traceback into a later test's stderr."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        pass


class ConfigWarningEventTests(TapTestsBase):
    """A config warning is an ordinary log event: a `warning` key would make Twisted's legacy
    log bridge (and trial's observer) take it for a Python warning and fail on `filename`."""

    def test_warning_logged_without_reserved_keys(self):
        from twisted.logger import formatEvent, globalLogPublisher
        from twisted.internet.testing import EventLoggingObserver

        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = self.write_config({"provider": "log", "store": os.path.join(self.home, "s")})
        service = tap.makeService(self.parse("--config", path), reactor=_ThreadedMemoryReactor())
        service.startService()
        events = [e for e in observed if "deprecated" in formatEvent(e)]
        self.assertEqual(len(events), 1, [formatEvent(e) for e in observed])
        self.assertNotIn("warning", events[0])
        self.assertIn(f'config {path}: provider "log" is deprecated', formatEvent(events[0]))

    def test_readable_secrets_warning_names_the_file_once(self):
        """The warning about a config every user can read says `config <file>: ...` with the file once, then the fix."""
        from twisted.logger import formatEvent, globalLogPublisher
        from twisted.internet.testing import EventLoggingObserver

        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = self.write_config({
            "provider": "twilio", "fromNumber": "+15550000000", "store": os.path.join(self.home, "s"),
            "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "fake-token"},
        })  # fmt: skip
        os.chmod(path, 0o644)
        service = tap.makeService(self.parse("--config", path), reactor=_ThreadedMemoryReactor())
        service.startService()
        lines = [formatEvent(e) for e in observed if "every user can read" in formatEvent(e)]
        self.assertEqual(lines, [f"config {path}: this file holds secrets and every user can read it: chmod 600 {path}"])
