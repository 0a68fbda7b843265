"""
Tests for voicecall.control.cli (with voicecall.client and voicecall.control.tool): the admin CLI of SPEC §17 run
with click's CliRunner. Its one seam into the reactor (twisted.internet.task.react, which `run`
imports when a command runs) is replaced by a synchronous stand-in on a MemoryReactorClock that
either refuses the UNIX connection (no daemon) or joins it with iosim to a real RpcFactory over a
real CallManager (STYLE.md §15). FootprintTests start the CLI in a fresh Python instead.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from click.testing import CliRunner
from twisted.internet import error, task
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import BASE_CONFIG, make_workdir, run_cli, spawn_daemon
from voicecall.control import cli
from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.domain.model import CallEvent, CallRecord
from voicecall.providers.mock import MockProvider
from voicecall.control.rpc import RpcFactory, RpcMethods
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter

TO = "+15550001234"
ACTIONS = ["initiate_call", "continue_call", "speak_to_user", "end_call", "get_status", "send_dtmf", "transfer_call"]


class CliTestsBase(SynchronousTestCase):
    config_extra: dict = {}

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.store_dir = os.path.join(self.home, "store")
        self.config = os.path.join(self.home, "voicecall.json")
        with open(self.config, "w") as f:
            json.dump({"store": self.store_dir, **self.config_extra}, f)
        self.daemon: RpcFactory | None = None
        self.connects: list[str] = []
        self.reacted = 0
        self.on_idle = None
        #: What to do each time everything is quiet: a callable, or seconds to advance the clock by.
        self.idle_steps: list = []
        self.pumps: list = []
        self.signals: list = []
        self.patch(task, "react", self.react)
        self.patch(cli, "watch_signals", lambda reactor, on_signal: self.signals.append(on_signal))

    # -- the reactor seam -------------------------------------------------------------------------

    def react(self, main, argv=()):
        """Run `main` like twisted.internet.task.react would, synchronously, then exit like it."""
        self.reacted += 1
        reactor = MemoryReactorClock()
        finished = ensureDeferred(main(reactor, *argv))
        pumps = []
        for _ in range(10_000):
            moved = False
            while reactor.unixClients:
                path, factory, _timeout, _pid = reactor.unixClients.pop(0)
                self.connects.append(path)
                moved = True
                if self.daemon is None:
                    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError("no daemon")))
                    continue
                client = factory.buildProtocol(UNIXAddress(path))
                server = self.daemon.buildProtocol(UNIXAddress(path))
                pumps.append(
                    iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False)
                )
                self.pumps.append(pumps[-1])
            for pump in pumps:
                moved = pump.pump() or moved
            if not moved:
                if self.idle_steps:
                    step = self.idle_steps.pop(0)
                    if callable(step):
                        step()
                    else:
                        reactor.advance(step)
                    continue
                if self.on_idle is None:
                    break
                hook, self.on_idle = self.on_idle, None
                hook()
        outcome: list = []
        finished.addBoth(outcome.append)
        if not outcome:
            raise AssertionError("the command never finished")
        if isinstance(outcome[0], Failure):
            if outcome[0].check(SystemExit):
                raise outcome[0].value
            outcome[0].raiseException()
        raise SystemExit(0)

    # -- a daemon ---------------------------------------------------------------------------------

    def start_daemon(self, **settings) -> None:
        """Serve RPC from a real CallManager whose store is the config's store directory."""
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.provider = MockProvider(clock=self.clock)
        self.manager = CallManager(
            provider=self.provider,
            voice=self.provider,
            store=self.open_store(),
            clock=self.clock,
            settings=ManagerSettings(
                provider_name="mock",
                from_number="+15550000000",
                max_concurrent_calls=3,
                default_mode="notify",
                **settings,
            ),
        )
        self.manager.set_webhook_url("http://127.0.0.1:3334/voice/webhook")
        methods = RpcMethods(manager=self.manager, clock=self.clock, default_to=None)
        self.daemon = RpcFactory(methods.table(), self.manager.subscribe, clock=self.clock)

    def stop_daemon(self) -> None:
        """The daemon goes away: its connections close and new ones are refused."""
        self.daemon = None
        for pump in self.pumps:
            pump.serverIO.loseConnection()

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Deliver `signum` the way the CLI's signal handler would."""
        self.signals[-1](signum)

    def open_store(self) -> CallStore:
        if getattr(self, "store", None) is None:
            writer = SynchronousWriter()
            self.store = CallStore(self.store_dir, writer)
            self.successResultOf(writer.start())
            self.successResultOf(self.store.open())
            self.addCleanup(lambda: self.successResultOf(self.store.close()))
        return self.store

    def event(self, kind: str, call_id: str, **fields) -> None:
        fields.setdefault("id", str(uuid.uuid4()))
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        self.successResultOf(Deferred.fromCoroutine(self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields))))

    def place(self) -> str:
        call_id = self.successResultOf(Deferred.fromCoroutine(self.manager.initiate(TO)))
        self.event("call.answered", call_id)
        return call_id

    def record(self, call_id: str, state: str = "completed", metadata: dict | None = None, **kw) -> CallRecord:
        """Write a call straight into the store, as an earlier daemon run would have."""
        record = CallRecord(
            call_id=call_id,
            provider="mock",
            direction="outbound",
            state=state,
            from_number="+15550000000",
            to_number=TO,
            started_at=1_700_000_000_000,
            provider_call_id=f"mock-{call_id}",
            metadata=metadata or {},
            **kw,
        )
        self.successResultOf(self.open_store().write(record, event_keys=[f"key-{call_id}"]))
        return record

    # -- running the CLI --------------------------------------------------------------------------

    def invoke(self, *args: str, env: dict | None = None):
        environment = {"VOICECALL_SOCKET": None, "VOICECALL_CONFIG": None}
        environment.update(env or {})
        return CliRunner().invoke(cli.main, ["--config", self.config, *args], env=environment)

    def ok(self, *args: str, **kw):
        """Run a command that must succeed; returns its JSON output."""
        result = self.invoke(*args, **kw)
        self.assertEqual(result.exit_code, 0, (result.stdout, result.stderr, result.exception))
        return json.loads(result.stdout)

    def fails(self, *args: str, **kw):
        result = self.invoke(*args, **kw)
        self.assertNotEqual(result.exit_code, 0, result.stdout)
        self.assertIsInstance(result.exception, SystemExit)
        return result


class ToolSchemaTests(CliTestsBase):
    """`voicecall tool-schema` prints the voice_call tool (SPEC §18.1)."""

    def test_schema(self):
        """The schema names the tool and offers the five actions plus the legacy shape, 2-space indented."""
        result = self.invoke("tool-schema")
        self.assertEqual(result.exit_code, 0)
        self.assertTrue(result.stdout.startswith('{\n  "name": '), result.stdout[:40])
        schema = json.loads(result.stdout)
        self.assertEqual((schema["name"], schema["label"]), ("voice_call", "Voice Call"))
        self.assertEqual(schema["description"], "Make phone calls and have voice conversations via the voice-call plugin.")
        variants = schema["parameters"]["anyOf"]
        actions = [v["properties"]["action"]["const"] for v in variants if "action" in v["properties"]]
        self.assertEqual(actions, ACTIONS)
        required = {v["properties"]["action"]["const"]: v["required"] for v in variants if "action" in v["properties"]}
        self.assertEqual(
            required,
            {
                "initiate_call": ["action", "message"],
                "continue_call": ["action", "callId", "message"],
                "speak_to_user": ["action", "callId", "message"],
                "end_call": ["action", "callId"],
                "get_status": ["action", "callId"],
                "send_dtmf": ["action", "callId", "digits"],
                "transfer_call": ["action", "callId", "to"],
            },
        )
        self.assertEqual(self.reacted, 0)

    def test_issue_17_params(self):
        """initiate_call offers the per-call choices, continue_call `input`, end_call a goodbye; their enums are the daemon's."""
        from voicecall.control import tool
        from voicecall.domain.model import ANSWERING_MACHINE_POLICIES, TURN_INPUTS

        variants = {v["properties"]["action"]["const"]: v["properties"] for v in json.loads(self.invoke("tool-schema").stdout)["parameters"]["anyOf"] if "action" in v["properties"]}
        initiate = variants["initiate_call"]
        self.assertLessEqual({"from", "voice", "greeting", "objective", "maxDurationSeconds", "answeringMachine", "record"}, set(initiate))
        self.assertEqual((initiate["maxDurationSeconds"]["type"], initiate["record"]["type"]), ("integer", "boolean"))
        self.assertEqual(initiate["answeringMachine"]["enum"], list(ANSWERING_MACHINE_POLICIES))
        self.assertEqual(variants["continue_call"]["input"]["enum"], list(TURN_INPUTS))
        self.assertIn("message", variants["end_call"])
        self.assertEqual(set(variants["transfer_call"]), {"action", "callId", "to", "message"})
        self.assertEqual(set(variants["send_dtmf"]), {"action", "callId", "digits"})
        self.assertEqual(set(tool.RPC_METHODS), set(ACTIONS))
        self.assertEqual((tool.RPC_METHODS["send_dtmf"], tool.RPC_METHODS["transfer_call"]), ("voicecall.dtmf", "voicecall.transfer"))

    def test_every_action_has_an_rpc_method(self):
        """Each action maps onto a method the daemon serves."""
        from voicecall.control import tool

        served = RpcMethods(manager=None, clock=None).table()
        for action, method in tool.RPC_METHODS.items():
            self.assertIn(method, served, action)


class ValidationTests(CliTestsBase):
    """Bad options are refused before anything connects."""

    def test_since_must_be_decimal(self):
        """`tail --since 0x10` fails with `Invalid numeric value for --since: 0x10`."""
        result = self.fails("tail", "--since", "0x10")
        self.assertIn("Invalid numeric value for --since: 0x10", result.stderr)
        self.assertEqual((self.reacted, self.connects), (0, []))

    def test_other_numbers_must_be_decimal(self):
        """`--poll` and `--last` reject non-decimal values the same way."""
        self.assertIn("Invalid numeric value for --poll: 1e3", self.fails("tail", "--poll", "1e3").stderr)
        self.assertIn("Invalid numeric value for --last: -5", self.fails("latency", "--last", "-5").stderr)

    def test_only_ascii_digits(self):
        """Digit-like characters that are not ASCII decimals are refused cleanly, not with a crash."""
        for value in ("\u00b2", "\u0661\u0660", "\uff11"):
            result = self.invoke("tail", "--since", value)
            self.assertEqual(result.exit_code, 2, (value, result.exception))
            self.assertIn(f"Invalid numeric value for --since: {value}", result.stderr)

    def test_call_needs_a_number(self):
        """`call` without --to and without a configured toNumber fails with the SPEC text."""
        result = self.fails("call", "-m", "Hello")
        self.assertIn("Missing --to and no toNumber configured", result.stderr)
        self.assertEqual((self.reacted, self.connects), (0, []))

    def test_unknown_mode_is_a_usage_error(self):
        """`call --mode notfy` and `start --mode x` exit 2 naming the valid modes, and place nothing."""
        self.start_daemon()
        for args in (("call", "--to", TO, "-m", "Hi", "--mode", "notfy"), ("start", "--to", TO, "--mode", "x")):
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 2, (args, result.stdout))
            self.assertIn("'notify', 'conversation'", result.stderr)
        self.assertEqual(self.connects, [])

    def test_empty_message_refused(self):
        """An empty or blank message is a usage error (exit 2) for call, start, continue and speak."""
        self.start_daemon()
        for args in (
            ("call", "--to", TO, "-m", ""),
            ("call", "--to", TO, "-m", "   "),
            ("start", "--to", TO, "--message", ""),
            ("continue", "--call-id", "x", "-m", ""),
            ("speak", "--call-id", "x", "--message", " "),
        ):
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 2, (args, result.stdout))
            self.assertIn("must not be empty", result.stderr)
        self.assertEqual(self.connects, [])

    def test_empty_call_id_refused(self):
        """An empty --call-id is a usage error everywhere; `status --call-id ""` listed every active call instead."""
        self.start_daemon()
        self.place()
        for command in ("status", "end", "continue", "speak"):
            args = (command, "--call-id", " ") + (("-m", "Hi") if command in ("continue", "speak") else ())
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 2, (args, result.stdout))
            self.assertIn("--call-id", result.stderr)
            self.assertIn("must not be empty", result.stderr)
        self.assertEqual(self.connects, [])

    def test_numeric_options_show_their_type(self):
        """`--help` shows numeric options as integer ranges, not TEXT."""
        for command, option in (("tail", "--since"), ("tail", "--poll"), ("latency", "--last"), ("expose", "--port")):
            result = self.invoke(command, "--help")
            self.assertEqual(result.exit_code, 0, result.stderr)
            line = next(text for text in result.stdout.splitlines() if text.strip().startswith(option))
            self.assertIn("INTEGER RANGE", line, (command, line))

    def test_out_of_range_refused(self):
        """`latency --last 0` and `tail --poll 10` are usage errors naming the range, not silently raised to the minimum."""
        for args, option, bound in ((("latency", "--last", "0"), "--last", "x>=1"), (("tail", "--poll", "10"), "--poll", "x>=50")):
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 2, (args, result.stdout))
            self.assertIn(option, result.stderr)
            self.assertIn(bound, result.stderr)
        self.assertEqual((self.reacted, self.connects), (0, []))

    def test_bad_number_said_once(self):
        """`--last abc` says what was wrong once, not twice."""
        result = self.invoke("latency", "--last", "abc")
        self.assertEqual(result.exit_code, 2)
        self.assertIn("Error: Invalid numeric value for --last: abc", result.stderr)
        self.assertEqual(result.stderr.count("abc"), 1, result.stderr)

    def test_version_and_short_help(self):
        """`--version` prints the version; `-h` is `--help`, for the group and its commands."""
        from voicecall import __version__

        result = self.invoke("--version")
        self.assertEqual((result.exit_code, result.stdout), (0, f"voicecall, version {__version__}\n"))
        for args in (("-h",), ("call", "-h"), ("continue", "-h")):
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 0, (args, result.stderr))
            self.assertIn("Usage: ", result.stdout)
        self.assertIn("-m, --message", self.invoke("continue", "-h").stdout)
        self.assertIn("-m, --message", self.invoke("speak", "-h").stdout)

    def test_call_needs_a_message(self):
        """`call` without a message is a usage error."""
        result = self.fails("call", "--to", TO)
        self.assertIn("--message", result.stderr)
        self.assertEqual(self.connects, [])


class DaemonCommandTests(CliTestsBase):
    """Commands sent to a running daemon over RPC."""

    def setUp(self):
        super().setUp()
        self.start_daemon()

    def test_call(self):
        """`call` places the call and prints `{callId}`; the default mode is conversation."""
        output = self.ok("call", "--to", TO, "-m", "Hello there")
        self.assertEqual(set(output), {"callId"})
        record = self.manager.find(output["callId"])
        self.assertEqual(record.to_number, TO)
        self.assertEqual(record.metadata, {"mode": "conversation", "initialMessage": "Hello there"})

    def test_call_limit_says_how_to_free_a_slot(self):
        """At maxConcurrentCalls, `call` says how to see the active calls and end one (mock calls nobody ends stay up)."""
        for _ in range(3):
            self.ok("call", "--to", TO, "-m", "Hi")
        result = self.fails("call", "--to", TO, "-m", "Hi")
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("Maximum concurrent calls (3) reached", result.stderr)
        self.assertIn("`voicecall status`", result.stderr)
        self.assertIn("`voicecall end --call-id ID`", result.stderr)

    def test_call_mode(self):
        """`call --mode notify` is honoured, in any case."""
        notify = self.ok("call", "--to", TO, "-m", "Hi", "--mode", "notify")["callId"]
        upper = self.ok("call", "--to", TO, "-m", "Hi", "--mode", "Conversation")["callId"]
        self.assertEqual(self.manager.find(notify).metadata["mode"], "notify")
        self.assertEqual(self.manager.find(upper).metadata["mode"], "conversation")

    def test_start_without_message(self):
        """`start --to` places a call with no initial message."""
        call_id = self.ok("start", "--to", TO)["callId"]
        self.assertNotIn("initialMessage", self.manager.find(call_id).metadata)

    def test_default_socket(self):
        """Without --socket the CLI connects to <store>/voicecall.sock, or $VOICECALL_SOCKET, or --socket."""
        self.ok("start", "--to", TO)
        self.ok("start", "--to", TO, env={"VOICECALL_SOCKET": "/run/vc/env.sock"})
        result = CliRunner().invoke(
            cli.main,
            ["--config", self.config, "--socket", "/run/vc/flag.sock", "status"],
            env={"VOICECALL_SOCKET": "/run/vc/env.sock", "VOICECALL_CONFIG": None},
        )
        self.assertEqual(result.exit_code, 0, result.stderr)
        self.assertEqual(
            self.connects, [os.path.join(self.store_dir, "voicecall.sock"), "/run/vc/env.sock", "/run/vc/flag.sock"]
        )

    def test_speak_and_end(self):
        """`speak` and `end` print `{success: true}` and act on the call."""
        call_id = self.place()
        self.assertEqual(self.ok("speak", "--call-id", call_id, "--message", "One moment"), {"success": True})
        self.assertIn(("speak", f"mock-{call_id}", "One moment"), self.provider.actions)
        self.assertEqual(self.ok("end", "--call-id", call_id), {"success": True})
        self.assertIsNone(self.manager.find(call_id))

    def test_continue(self):
        """`continue` prints the manager result `{success, transcript}` once the caller answers."""
        call_id = self.place()
        self.on_idle = lambda: self.event("call.speech", call_id, transcript="Tuesday works")
        output = self.ok("continue", "--call-id", call_id, "--message", "Which day?")
        self.assertEqual(output, {"success": True, "transcript": "Tuesday works"})

    def test_short_message_option(self):
        """`continue` and `speak` take `-m` like `call`."""
        call_id = self.place()
        self.assertEqual(self.ok("speak", "--call-id", call_id, "-m", "One moment"), {"success": True})
        self.on_idle = lambda: self.event("call.speech", call_id, transcript="Sure")
        self.assertEqual(self.ok("continue", "--call-id", call_id, "-m", "Ready?")["transcript"], "Sure")

    def test_ended_call_says_it_ended(self):
        """`speak`/`continue` on an ended call say it ended and why, not `Call not found`."""
        call_id = self.place()
        self.event("call.ended", call_id, reason="hangup-user")
        for command in ("speak", "continue"):
            result = self.fails(command, "--call-id", call_id, "-m", "Still there?")
            self.assertEqual(
                (result.exit_code, result.stderr.strip()), (1, f"Error: Call {call_id} has ended (hangup-user)")
            )

    def test_ctrl_c_on_continue_is_quiet(self):
        """Ctrl-C while `continue` waits exits 130 without an error message."""
        call_id = self.place()
        self.on_idle = lambda: self.interrupt(signal.SIGINT)
        result = self.invoke("continue", "--call-id", call_id, "-m", "Which day?")
        self.assertEqual((result.exit_code, result.stdout, result.stderr), (130, "", ""))

    def test_sigterm_on_tail_is_quiet(self):
        """SIGTERM while `tail` follows the daemon exits 143 without an error message."""
        self.place()
        self.on_idle = lambda: self.interrupt(signal.SIGTERM)
        result = self.invoke("tail")
        self.assertEqual((result.exit_code, result.stderr), (143, ""))
        self.assertIn('"type": "call.state"', result.stdout)

    def test_tail_survives_a_daemon_restart(self):
        """`tail` follows the store while the daemon is down and reconnects when it is back."""
        first = self.place()
        factory = self.daemon
        second: list[str] = []

        def restart():
            self.daemon = factory

        def live_event():
            second.append(self.successResultOf(Deferred.fromCoroutine(self.manager.initiate(TO))))

        self.idle_steps = [
            self.stop_daemon,
            lambda: self.event("call.ended", first, reason="hangup-user"),  # written while "down"
            0.3, 0.3, restart, 0.3, 0.3, live_event, lambda: self.interrupt(signal.SIGINT),
        ]  # fmt: skip
        result = self.invoke("tail", "--since", "0")
        self.assertEqual(result.exit_code, 130, result.stderr)
        events = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(
            [(e["type"], e["callId"]) for e in events],
            [("call.state", first), ("call.ended", first), ("call.created", second[0])],
        )
        self.assertIn("following the store", result.stderr)
        self.assertIn("reconnected", result.stderr)

    def test_tail_prints_one_shape(self):
        """Events `tail` read from the store and live ones have the same fields: no store `seq` (README)."""
        call_id = self.place()
        self.idle_steps = [lambda: self.event("call.ended", call_id, reason="hangup-user"), lambda: self.interrupt(signal.SIGINT)]
        result = self.invoke("tail")
        self.assertEqual(result.exit_code, 130, result.stderr)
        events = [json.loads(line) for line in result.stdout.splitlines()]
        # call.created and answered come from the store, hanging up is live.
        self.assertEqual([e["type"] for e in events], ["call.created", "call.state", "call.state", "call.ended"], result.stdout)
        self.assertEqual(sorted(events[1]), sorted(events[2]))
        self.assertEqual([e for e in events if "seq" in e], [])

    def test_tail_into_a_closed_pipe_is_quiet(self):
        """A live event `tail` cannot print (`voicecall tail | head -1` after head is gone) ends it quietly, exit 141."""
        call_id = self.place()
        echo = cli.click.echo

        def closed_stdout(message=None, file=None, nl=True, err=False, color=None):
            if not err:
                raise BrokenPipeError(32, "Broken pipe")
            echo(message, file, nl, err, color)

        self.idle_steps = [lambda: self.patch(cli.click, "echo", closed_stdout),
                           lambda: self.event("call.ended", call_id, reason="hangup-user")]  # fmt: skip
        result = self.invoke("tail", "--since", "0")
        self.assertEqual((result.exit_code, result.stderr), (141, ""))

    def test_daemon_error(self):
        """A daemon error is printed on stderr as `Error: <text>` with exit status 1."""
        result = self.fails("speak", "--call-id", "nope", "--message", "hi")
        self.assertEqual((result.exit_code, result.stderr.strip(), result.stdout), (1, "Error: Call not found", ""))

    def test_status_of_live_call(self):
        """`status --call-id` prints the daemon's record of the call."""
        call_id = self.place()
        output = self.ok("status", "--call-id", call_id)
        self.assertEqual((output["callId"], output["state"]), (call_id, "answered"))

    def test_status_lists_active_calls(self):
        """`status` without --call-id prints the daemon's active calls."""
        call_id = self.place()
        self.assertEqual([c["callId"] for c in self.ok("status")["calls"]], [call_id])


class NoDaemonTests(CliTestsBase):
    """Commands when nothing answers on the socket."""

    def test_status_from_store(self):
        """`status --call-id` prints the stored record when the daemon is not running."""
        self.record("abc", state="completed", end_reason="completed", ended_at=1_700_000_060_000)
        output = self.ok("status", "--call-id", "abc")
        self.assertEqual(self.connects, [os.path.join(self.store_dir, "voicecall.sock")])
        self.assertEqual(
            (output["callId"], output["state"], output["endReason"], output["to"]), ("abc", "completed", "completed", TO)
        )
        self.assertNotIn("processedEventIds", output)

    def test_status_by_provider_id_from_store(self):
        """The stored record is also found by the carrier's call id."""
        self.record("abc")
        self.assertEqual(self.ok("status", "--call-id", "mock-abc")["callId"], "abc")

    def test_status_unknown(self):
        """`status --call-id` of an unknown call prints `{"found": false}` and exits 1."""
        self.record("abc")
        result = self.invoke("status", "--call-id", "zzz")
        self.assertEqual((result.exit_code, result.stdout), (1, '{\n  "found": false\n}\n'))
        self.assertIn("Error: no call zzz", result.stderr)

    def test_status_without_store(self):
        """With no store at all, `status --call-id` prints `{"found": false}`, exits 1 and says there is no store."""
        result = self.invoke("status", "--call-id", "zzz")
        self.assertEqual((result.exit_code, json.loads(result.stdout)), (1, {"found": False}))
        self.assertIn(f"no store at {self.store_dir}", result.stderr)

    def test_status_says_it_read_the_store(self):
        """When the daemon is down, `status` says on stderr that it read the store instead."""
        self.record("live", state="answered")
        result = self.invoke("status")
        self.assertEqual(result.exit_code, 0, result.stderr)
        self.assertEqual([c["callId"] for c in json.loads(result.stdout)["calls"]], ["live"])
        self.assertIn("daemon not running", result.stderr)
        self.assertIn(f"read the store at {self.store_dir}", result.stderr)

    def test_status_lists_stored_live_calls(self):
        """`status` without --call-id lists the calls the store holds as live."""
        self.record("done", state="completed")
        self.record("live", state="answered")
        output = self.ok("status")
        self.assertEqual([c["callId"] for c in output["calls"]], ["live"])

    def test_commands_need_the_daemon(self):
        """Commands that need the daemon fail with exit 1 and say it is not running."""
        result = self.fails("speak", "--call-id", "abc", "--message", "hi")
        self.assertEqual(result.exit_code, 1)
        self.assertIn("voicecall daemon is not running", result.stderr)
        result = self.fails("call", "--to", TO, "-m", "Hi")
        self.assertIn("voicecall daemon is not running", result.stderr)

    def test_tail_without_store_or_daemon_says_how_to_start(self):
        """`tail` with neither a store nor a daemon fails in one line naming both and how to start the daemon."""
        result = self.fails("tail")
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(f"no store at {self.store_dir}", result.stderr)
        self.assertIn("make run", result.stderr)

    def test_latency_without_store_says_so(self):
        """`latency` with no store prints zeros and says on stderr that there is no store to read."""
        result = self.invoke("latency")
        self.assertEqual((result.exit_code, json.loads(result.stdout)["recordsScanned"]), (0, 0))
        self.assertIn(f"no store at {self.store_dir}", result.stderr)

    def test_not_running_names_a_runnable_command(self):
        """The hint names `make run` and the twistd installed beside this Python, not a bare `twistd`."""
        result = self.fails("speak", "--call-id", "abc", "-m", "hi")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.assertIn("make run", result.stderr)
        self.assertIn(f"{twistd} -n --pidfile= voicecall --config {self.config}", result.stderr)
        self.assertNotIn("`twistd -n voicecall`", result.stderr)


class ConfiguredNumberTests(CliTestsBase):
    """`call` falls back to the configured toNumber."""

    config_extra = {"toNumber": "+15550009999"}

    def test_call_uses_to_number(self):
        """`call` without --to dials the configured toNumber."""
        self.start_daemon()
        call_id = self.ok("call", "-m", "Hi")["callId"]
        self.assertEqual(self.manager.find(call_id).to_number, "+15550009999")


def nearest_rank(values: list[int], p: float) -> int:
    """SPEC §17: sorted[ceil(p/100 * n) - 1], clamped."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


class LatencyTests(CliTestsBase):
    """`voicecall latency` summarises turn latencies from the store (SPEC §17)."""

    def test_statistics(self):
        """Counts, min, max, average and nearest-rank p50/p95 over the calls that have each metric."""
        turn = [900, 100, 300, 700, 200, 1000, 400, 800, 600, 500]
        for n, latency in enumerate(turn):
            metadata = {"lastTurnLatencyMs": latency, "turnCount": 1}
            if n < 3:
                metadata["lastTurnListenWaitMs"] = [40, 10, 30][n]
            self.record(f"call-{n}", metadata=metadata)
        self.record("no-turns", metadata={"mode": "notify"})
        output = self.ok("latency")
        self.assertEqual(
            output,
            {
                "recordsScanned": 11,
                "turnLatency": {"count": 10, "minMs": 100, "maxMs": 1000, "avgMs": 550, "p50Ms": 500, "p95Ms": 1000},
                "listenWait": {"count": 3, "minMs": 10, "maxMs": 40, "avgMs": 27, "p50Ms": 30, "p95Ms": 40},
            },
        )
        self.assertEqual((nearest_rank(turn, 50), nearest_rank(turn, 95)), (500, 1000))

    def test_percentiles_are_nearest_rank(self):
        """Over 1..20 ms the p50 is the 10th value and the p95 the 19th (no interpolation)."""
        for n in range(1, 21):
            self.record(f"call-{n}", metadata={"lastTurnLatencyMs": n})
        stats = self.ok("latency")["turnLatency"]
        self.assertEqual((stats["p50Ms"], stats["p95Ms"]), (10, 19))

    def test_last(self):
        """`--last N` scans only the N most recent calls."""
        for n, latency in enumerate([5000, 10, 20]):
            self.record(f"call-{n}", metadata={"lastTurnLatencyMs": latency})
        output = self.ok("latency", "--last", "2")
        self.assertEqual(output["recordsScanned"], 2)
        self.assertEqual((output["turnLatency"]["count"], output["turnLatency"]["maxMs"]), (2, 20))

    def test_empty(self):
        """Without a store every statistic is zero."""
        zeros = {"count": 0, "minMs": 0, "maxMs": 0, "avgMs": 0, "p50Ms": 0, "p95Ms": 0}
        self.assertEqual(self.ok("latency"), {"recordsScanned": 0, "turnLatency": zeros, "listenWait": zeros})


class NoConfigTests(SynchronousTestCase):
    """A command run where no config file is found says so."""

    def invoke_without_config(self, *args: str):
        """Run the CLI with `args` in an empty directory under an empty HOME; (result, HOME)."""
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        self.patch(task, "react", lambda main, argv=(): CliTestsBase.react(self, main, argv))
        self.patch(cli, "watch_signals", lambda reactor, on_signal: None)
        self.daemon, self.connects, self.reacted, self.on_idle, self.idle_steps, self.pumps = None, [], 0, None, [], []
        runner = CliRunner()
        with runner.isolated_filesystem(temp_dir=home):
            result = runner.invoke(cli.main, list(args), env={"VOICECALL_SOCKET": None, "VOICECALL_CONFIG": None, "HOME": home})
        return result, home

    def test_status_says_no_config_was_found(self):
        """`status` in a directory without a config names the paths it searched, on stderr."""
        result, home = self.invoke_without_config("status")
        self.assertIn("no config file found", result.stderr)
        self.assertIn("voicecall.json5", result.stderr)
        self.assertIn(os.path.join(home, ".config", "voicecall", "voicecall.json5"), result.stderr)

    def test_not_running_without_config_says_where_to_run(self):
        """
        Run from another directory than the checkout where `make run` serves, the CLI finds no config
        and tries the default socket; it says the daemon may be running elsewhere, and how to reach it.
        """
        result, _ = self.invoke_without_config("end", "--call-id", "x")
        self.assertEqual(result.exit_code, 1)
        error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        self.assertEqual(len(error), 1, result.stderr)
        self.assertIn("voicecall daemon is not running", error[0])
        self.assertIn("--config", error[0])
        self.assertIn("directory", error[0])


class BadConfigTests(SynchronousTestCase):
    """A command run with a bad config prints each problem as the daemon does: file, key, value."""

    def test_problems_one_per_line(self):
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        path = os.path.join(home, "voicecall.json5")
        with open(path, "w") as f:
            json.dump({"provider": "twillio", "twilio": {"acountSid": "AC1"}}, f)
        os.chmod(path, 0o600)
        self.patch(task, "react", lambda main, argv=(): CliTestsBase.react(self, main, argv))
        self.patch(cli, "watch_signals", lambda reactor, on_signal: None)
        self.daemon, self.connects, self.reacted, self.on_idle, self.idle_steps, self.pumps = None, [], 0, None, [], []
        result = CliRunner().invoke(cli.main, ["--config", path, "status"], env={"VOICECALL_SOCKET": None, "HOME": home})
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(
            result.stderr.splitlines(),
            ["Error: the config is not valid:",
             f'  {path}: provider: expected one of "telnyx", "twilio", "plivo", "mock" (got "twillio") (did you mean "twilio"?)',
             f'  {path}: twilio.acountSid: unknown key (did you mean "accountSid"?)'],
        )  # fmt: skip
        self.assertNotIn("plugins.entries", result.stderr)


def console_script() -> str:
    """The `voicecall` console script installed beside this Python."""
    return os.path.join(os.path.dirname(sys.executable), "voicecall")


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: SigCgt of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


class ScriptTests(SynchronousTestCase):
    """The `voicecall` console script in a fresh process, as a shell runs it."""

    def setUp(self):
        # Short, so the store's socket path fits a UNIX socket address (107 bytes).
        self.home = tempfile.mkdtemp(prefix="vc-cli-")
        self.addCleanup(shutil.rmtree, self.home, ignore_errors=True)
        self.config = os.path.join(self.home, "voicecall.json")
        with open(self.config, "w") as f:
            json.dump({"store": os.path.join(self.home, "store")}, f)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECALL_")}
        self.env.update(HOME=self.home)

    def spawn(self, *args: str, **kw) -> subprocess.Popen:
        child = subprocess.Popen([console_script(), "--config", self.config, *args], cwd=self.home, env=self.env,
                                 stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip
        self.addCleanup(lambda: child.poll() is None and child.kill())
        return child

    def interrupted(self, socket_path: str, delay: float, after_ready: bool) -> tuple[bool, int, str]:
        """
        Run `status` against `socket_path` and send SIGINT `delay` seconds after the process
        exists, or after it is ready (the CLI caught SIGTERM: its first instruction has run).
        Returns whether it was ready when the signal went, its exit status and its stderr.
        """
        child = self.spawn("--socket", socket_path, "status", stdout=subprocess.DEVNULL)
        if after_ready:
            for _ in range(6000):
                if child.poll() is not None or catches(child.pid, signal.SIGTERM):
                    break
                time.sleep(0.005)
        time.sleep(delay)
        ready = child.poll() is None and catches(child.pid, signal.SIGTERM)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
        return ready, child.returncode, stderr

    maxDiff = None

    def test_ctrl_c_at_start_is_quiet(self):
        """
        Ctrl-C at any moment of a CLI run (its imports, click, the config, the reactor's start, the
        wait for an answer) exits 130 without a traceback or click's "Aborted!". The first thing
        the script does is catch SIGINT and SIGTERM; from then on (SigCgt shows SIGTERM caught,
        which Python alone leaves to the default) the exit must be exactly 130 and silent. A
        signal that comes earlier finds the interpreter still starting, which no code of ours
        runs in: it must not show our code or click, whatever the interpreter says.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        path = os.path.join(self.home, "silent.sock")
        listener.bind(path)
        listener.listen(16)  # a "daemon" that never answers, so `status` waits until interrupted
        moments = [(d, False) for d in (0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)] + [(d, True) for d in (0, 0.02, 0.1, 1.0)]
        strict = 0
        for delay, after_ready in moments:
            ready, status, stderr = self.interrupted(path, delay, after_ready)
            if ready:
                strict += 1
                self.assertEqual((delay, after_ready, status, stderr), (delay, after_ready, 130, ""))
            else:
                for noise in ("Aborted!", f"{os.sep}voicecall{os.sep}", f"{os.sep}click{os.sep}"):  # our frames, click's
                    self.assertNotIn(noise, stderr, (delay, status, stderr))
        self.assertGreaterEqual(strict, 4)  # at least every moment after the CLI was ready

    def write_events(self, count: int) -> None:
        """`count` events in the config's store, as a daemon would have left them."""
        writer = SynchronousWriter()
        store = CallStore(os.path.join(self.home, "store"), writer)
        self.successResultOf(writer.start())
        self.successResultOf(store.open())
        events = [{"type": "call.state", "callId": "c1", "at": 1_700_000_000_000 + i, "state": "ringing"} for i in range(count)]
        self.successResultOf(store.write(None, events=events))
        self.successResultOf(store.close())

    def test_tail_ends_when_its_reader_goes(self):
        """
        `voicecall tail | head -2`: once head has its lines and goes, tail ends (exit 141, quietly)
        while following, without waiting for one more event to fail to print.
        """
        self.write_events(3)
        child = self.spawn("tail", "--poll", "50", stdout=subprocess.PIPE)
        self.assertEqual([json.loads(child.stdout.readline())["at"] for _ in range(3)], [1_700_000_000_000 + i for i in range(3)])
        # Marker that tail has printed its history and is following (closing stdout earlier
        # would end it on a failed write instead, a different path).
        self.assertEqual(child.stderr.readline(), "(daemon not running; following the store at {})\n".format(os.path.join(self.home, "store")))
        child.stdout.close()
        self.assertEqual(child.wait(timeout=60), 141)
        self.assertEqual(child.stderr.read(), "")

    def test_tail_into_a_closed_pipe_is_quiet(self):
        """`voicecall tail | head -0`: the reader is gone before the history is printed; exit 141, no traceback."""
        self.write_events(3)
        read, write = os.pipe()
        os.close(read)
        try:
            child = self.spawn("tail", stdout=write)
        finally:
            os.close(write)
        _, stderr = child.communicate(timeout=60)
        self.assertEqual((child.returncode, stderr), (141, ""))


class FootprintTests(SynchronousTestCase):
    """
    The `voicecall` console script loads only what the CLI uses (issue 15): the server side (the
    RPC server, the domain, the web, media, carrier and speech adapters) stays out of a CLI run.
    Each case starts a fresh Python, as a user's shell does, and lists its sys.modules at exit.
    """

    SERVER_SIDE = ("voicecall.domain", "voicecall.control.rpc", "voicecall.web", "voicecall.media", "voicecall.providers", "voicecall.speech")

    def loaded(self, code: str, *args: str) -> set[str]:
        """The modules a fresh `python -c code args...` has loaded when it exits (it must exit 0)."""
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        with open(os.path.join(home, "voicecall.json"), "w") as f:
            json.dump({"store": os.path.join(home, "store")}, f)
        listing = os.path.join(home, "modules.json")
        report = f"import atexit, json, sys; atexit.register(lambda: json.dump(sorted(sys.modules), open({listing!r}, 'w')))\n"
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECALL_")}
        env.update(HOME=home, PYTHONPATH=checkout, VOICECALL_CONFIG=os.path.join(home, "voicecall.json"))
        child = subprocess.run([sys.executable, "-c", report + code, *args], cwd=home, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(child.returncode, 0, child.stderr)
        with open(listing) as f:
            return set(json.load(f))

    def test_import(self):
        """`import voicecall.control.cli` loads no server-side module, nor the config loader or the reactor."""
        modules = self.loaded("import voicecall.control.cli")
        self.assertEqual(sorted(m for m in modules if m.startswith(self.SERVER_SIDE)), [])
        self.assertNotIn("voicecall.config", modules)
        self.assertNotIn("twisted.internet.reactor", modules)

    def test_help(self):
        """`voicecall --help` (the console script's entry point) loads no server-side module, nor the config loader or the reactor."""
        modules = self.loaded("import sys; from voicecall.control.cli import main; sys.exit(main())", "--help")
        self.assertEqual(sorted(m for m in modules if m.startswith(self.SERVER_SIDE)), [])
        self.assertNotIn("voicecall.config", modules)
        self.assertNotIn("twisted.internet.reactor", modules)

    def test_status_without_daemon(self):
        """`voicecall status` with no daemon reads the store, and still loads nothing else of the server side."""
        modules = self.loaded("import sys; from voicecall.control.cli import main; sys.exit(main())", "status")
        self.assertIn("voicecall.domain.store", modules)
        allowed = {"voicecall.domain", "voicecall.domain.store", "voicecall.domain.model"}
        self.assertEqual(sorted(m for m in modules if m.startswith(self.SERVER_SIDE) and m not in allowed), [])


class ClusterStatusWhileDownTests(TestCase):
    """`voicecall status --cluster` with this node's daemon down reads the nodes from the PostgreSQL store."""

    timeout = 90

    async def test_nodes_read_from_the_store(self):
        from tests.pgserver import postgres_server

        url = postgres_server(self).new_database(self).replace("voicecall@", "voicecall:s3cretPW@")
        config = {**BASE_CONFIG, "store": url, "publicUrl": "https://a.example/voice/webhook", "cluster": {"nodeId": "node-a"}}
        workdir = make_workdir(self, raw=json.dumps(config))
        empty = await run_cli(self, workdir, "status", "--cluster")  # no node ever started on it
        self.assertEqual((empty.code, empty.json()), (0, {"nodes": []}), empty.err)
        daemon = await spawn_daemon(self, workdir)
        await daemon.stop()
        down = await run_cli(self, workdir, "status", "--cluster")
        self.assertEqual(down.code, 0, down.err)
        [node] = down.json()["nodes"]
        self.assertEqual((node["nodeId"], node["publicUrl"], node["alive"], node["stopped"], node["calls"]),
                         ("node-a", "https://a.example/voice/webhook", False, True, 0))  # fmt: skip
        self.assertIn("read the store at postgresql://voicecall:***@127.0.0.1:", down.err)
        self.assertNotIn("s3cretPW", down.out + down.err)

    async def test_not_a_cluster(self):
        workdir = make_workdir(self)
        result = await run_cli(self, workdir, "status", "--cluster")
        self.assertEqual(result.code, 1)
        self.assertIn("not a cluster: the store is not PostgreSQL", result.err)
