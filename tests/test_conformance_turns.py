"""
Conformance gaps of issue 13 on the turn path: a max-duration hang-up the carrier refuses,
the gateway responder's `sessionKey`, `responseModel`'s provider part, and `voicecall latency`
counting every turn.
"""
from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from voicecall.config import ConfigError, parse_config
from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.domain.model import CallEvent, EventType
from voicecall.domain.carrier import ProviderError
from voicecall.providers.mock import MockProvider
from voicecall.control.rpc import GatewayResponders, RpcFactory, RpcMethods
from voicecall.speech.responder import model_name
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter

from tests import test_cli as cli_tests

TO = "+15550001234"


class _CarrierDown(MockProvider):
    """A mock whose hang-ups fail the first `failures` times."""

    failures = 0

    def hangup_call(self, call, reason):
        if self.failures:
            self.failures -= 1
            self.actions.append(("hangup-failed", call.provider_call_id, reason))
            return fail(ProviderError("Mock API error: 503 carrier down", status=503))
        return super().hangup_call(call, reason)


class _Base(SynchronousTestCase):
    def manager_with(self, provider, **settings):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        writer = SynchronousWriter()
        self.store = CallStore(self.mktemp(), writer)
        self.successResultOf(writer.start())
        self.successResultOf(self.store.open())
        self.addCleanup(lambda: self.successResultOf(self.store.close()))
        provider = provider(self.clock) if isinstance(provider, type) else provider
        self.provider = provider
        manager = CallManager(
            provider=provider,
            voice=provider,
            store=self.store,
            clock=self.clock,
            settings=ManagerSettings(provider_name="mock", from_number="+15550000000", **settings),
            webhook_url="http://127.0.0.1:3334/voice/webhook",
        )
        self.manager = manager
        return manager

    def run_(self, coroutine):
        return Deferred.fromCoroutine(coroutine)

    def event(self, call_id, kind, **fields):
        fields.setdefault("id", f"{kind}-{self.clock.seconds()}-{len(self.provider.actions)}")
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        self.successResultOf(self.run_(self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields))))

    def place(self, mode="notify", **kw):
        call_id = self.successResultOf(self.run_(self.manager.initiate(TO, mode=mode, **kw)))
        self.event(call_id, EventType.ANSWERED)
        return call_id


class MaxDurationHangupTests(_Base):
    """A max-duration hang-up the carrier refuses is retried (1, 2, 4 s), then the call is ended here."""

    def test_retried_then_ended_here(self):
        manager = self.manager_with(_CarrierDown, max_concurrent_calls=1, max_duration_seconds=10)
        self.provider.failures = 99
        call_id = self.place()
        self.clock.advance(10)
        self.assertEqual(len([a for a in self.provider.actions if a[0] == "hangup-failed"]), 1)
        self.assertIsNotNone(manager.find(call_id), "still live while retries remain")
        for delay in (1, 2, 4):
            self.clock.advance(delay - 0.01)
            self.assertIsNotNone(manager.find(call_id))
            self.clock.advance(0.01)
        self.assertEqual(len([a for a in self.provider.actions if a[0] == "hangup-failed"]), 4)
        self.assertIsNone(manager.find(call_id))
        record = self.successResultOf(self.run_(manager.get_call(call_id)))
        self.assertEqual((record.state.value, record.end_reason), ("error", "error"))
        self.assertIn("max-duration hang-up failed at the carrier 4 times", record.metadata["endError"])
        self.assertIn("503 carrier down", record.metadata["endError"])
        # The slot is free again: another call can be placed (maxConcurrentCalls is 1).
        self.successResultOf(self.run_(manager.initiate(TO)))

    def test_a_retry_that_works_ends_with_timeout(self):
        manager = self.manager_with(_CarrierDown, max_concurrent_calls=1, max_duration_seconds=10)
        self.provider.failures = 2
        call_id = self.place()
        self.clock.advance(10)
        self.clock.advance(1)
        self.assertIsNotNone(manager.find(call_id))
        self.clock.advance(2)
        self.assertIsNone(manager.find(call_id))
        record = self.successResultOf(self.run_(manager.get_call(call_id)))
        self.assertEqual(record.end_reason, "timeout")
        self.assertNotIn("endError", record.metadata)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResponderSessionKeyTests(_Base):
    """`voicecall.respond` carries the call's `sessionKey`, over the RPC socket."""

    def test_session_key_reaches_the_gateway(self):
        from twisted.internet.address import UNIXAddress
        from twisted.internet.protocol import Protocol

        manager = self.manager_with(MockProvider, max_concurrent_calls=2)
        responders = GatewayResponders()
        factory = RpcFactory(RpcMethods(manager=manager, clock=self.clock, default_to=None).table(), manager.subscribe, responders, clock=self.clock)
        server = factory.buildProtocol(UNIXAddress("rpc.sock"))

        class Gateway(Protocol):
            lines: list = []

            def dataReceived(self, data):
                self.lines.extend(json.loads(line) for line in data.splitlines() if line.strip())

        gateway = Gateway()
        gateway.lines = []
        pump = iosim.connect(server, iosim.makeFakeServer(server), gateway, iosim.makeFakeClient(gateway), greet=False)
        gateway.transport.write(b'{"jsonrpc":"2.0","id":1,"method":"voicecall.responder.register"}\n')
        pump.flush()
        call_id = self.place(mode="conversation", session_key="agent:main:call-42")
        call = manager.find(call_id)
        asked = responders.ask(call, "What time is it?")
        pump.flush()
        (request,) = [m for m in gateway.lines if m.get("method") == "voicecall.respond"]
        self.assertEqual(request["params"]["sessionKey"], "agent:main:call-42")
        self.assertEqual(request["params"]["callId"], call_id)
        gateway.transport.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {"spoken": "Noon."}}).encode() + b"\n")
        pump.flush()
        self.assertEqual(self.successResultOf(asked), "Noon.")


class ResponseModelTests(SynchronousTestCase):
    """`responseModel`'s provider part is used: `openai/` is stripped, another provider is refused."""

    ENV = {"HOME": "/nonexistent"}

    def test_openai_prefix(self):
        self.assertEqual(model_name("openai/gpt-4o-mini"), "gpt-4o-mini")
        self.assertEqual(model_name("gpt-4o"), "gpt-4o")
        self.assertEqual(model_name("openai/meta-llama/Llama-3"), "meta-llama/Llama-3")

    def test_other_provider_refused_at_validation(self):
        exc = self.assertRaises(ConfigError, parse_config, {"provider": "mock", "responseModel": "anthropic/claude-3"}, self.ENV)
        self.assertTrue(any('provider "anthropic" is not supported' in p for p in exc.problems), exc.problems)
        self.assertRaises(ValueError, model_name, "anthropic/claude-3")

    def test_openai_accepted(self):
        cfg = parse_config({"provider": "mock", "responseModel": "openai/gpt-4o"}, self.ENV)
        self.assertEqual(cfg.response_model, "openai/gpt-4o")


class LatencyCountsEveryTurnTests(cli_tests.CliTestsBase):
    """`voicecall latency` counts every turn of a call, not only its last."""

    def test_every_turn(self):
        self.start_daemon()
        call_id = self.successResultOf(Deferred.fromCoroutine(self.manager.initiate(TO, mode="conversation")))
        self.event("call.answered", call_id)
        for n, seconds in enumerate((1, 3, 2)):
            answer = Deferred.fromCoroutine(self.manager.continue_call(call_id, f"Question {n}?"))
            self.clock.advance(seconds)
            self.event("call.speech", call_id, transcript=f"answer {n}")
            self.assertEqual(self.successResultOf(answer), f"answer {n}")
        stats = self.ok("latency")
        self.assertEqual(stats["turnLatency"]["count"], 3)
        self.assertEqual((stats["turnLatency"]["minMs"], stats["turnLatency"]["maxMs"]), (1000, 3000))
        self.assertEqual(stats["listenWait"]["count"], 3)
        self.assertEqual(self.manager.find(call_id).metadata["turnLatenciesMs"], [1000, 3000, 2000])


class _FailingStore:
    """A store whose next `fail_writes` writes fail (a full disk)."""

    def __init__(self, store):
        self._store = store
        self.fail_writes = 0

    def write(self, *args, **kwargs):
        if self.fail_writes:
            self.fail_writes -= 1
            return fail(OSError("disk full"))
        return self._store.write(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


class FailedWriteOnTheTurnPathTests(_Base):
    """A continue or speak whose store write fails leaves the record in memory as the store has it."""

    def setUp(self):
        self.manager_with(MockProvider, max_concurrent_calls=2, transcript_timeout_ms=5000)
        self.failing = _FailingStore(self.store)
        self.manager._store = self.failing

    def check(self, operation, fail_writes):
        call_id = self.place(mode="conversation", message="Hi")
        before = self.manager.find(call_id)
        state, transcript = before.state, list(before.transcript)
        self.failing.fail_writes = fail_writes
        self.clock.advance(0)
        failure = self.failureResultOf(self.run_(operation(call_id)))
        self.assertIn("Failed to persist call: disk full", str(failure.value))
        call = self.manager.find(call_id)
        stored = self.successResultOf(self.store.get_call(call_id))
        self.assertEqual((call.state, stored.state), (state, state))
        self.assertEqual(call.transcript, transcript)
        self.assertEqual(len(stored.transcript), len(transcript))
        self.assertNotIn(call_id, self.manager._waiters)

    def test_continue_first_write(self):
        self.check(lambda call_id: self.manager.continue_call(call_id, "Is now a good time?"), 1)

    def test_speak_first_write(self):
        self.check(lambda call_id: self.manager.speak(call_id, "One moment."), 1)


class RestoredTwilioCallSpeechTests(SynchronousTestCase):
    """A Twilio call restored after a restart is spoken to through the daemon's webhook URL."""

    def test_restored_call_speaks(self):
        from treq.testing import StubTreq
        from twisted.web.resource import Resource

        from voicecall.domain.model import CallRecord, Direction
        from voicecall.providers.twilio import TwilioProvider

        class Api(Resource):
            isLeaf = True

            def __init__(self):
                super().__init__()
                self.forms = []

            def render_POST(self, request):
                self.forms.append(request.args)
                request.setHeader(b"content-type", b"application/json")
                return b'{"sid": "CA1", "status": "in-progress"}'

        api, clock = Api(), Clock()
        http = StubTreq(api)
        provider = TwilioProvider(http=http, clock=clock, account_sid="AC" + "0" * 32, auth_token="t", base_url="https://api.twilio.test")
        provider.set_webhook_url("https://voice.example/voice/webhook")
        call = CallRecord(
            call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state="listening",
            from_number="+15550000000", to_number=TO, started_at=0, provider_call_id="CA1",
        )  # fmt: skip
        d = provider.speak(call, "Still there.", None)
        http.flush()
        (form,) = api.forms
        document = form[b"Twiml"][0].decode()
        self.assertIn("<Say", document)
        self.assertIn("https://voice.example/voice/webhook?callId=c1&amp;flow=spoken", document)
        self.assertNoResult(d)  # said once Twilio fetches the Redirect
        clock.advance(60)
        self.successResultOf(d)


class FailedWriteOfAnEndTests(_Base):
    """
    An end whose store write fails is not half done: the call stays active (in memory as in the
    store, holding its slot), the caller gets the error, and ending it again works. Found by
    `make soak`: the call was dropped from memory but stayed live in the store, so after a
    restart it came back and more calls were active than maxConcurrentCalls.
    """

    def setUp(self):
        self.manager_with(MockProvider, max_concurrent_calls=1)
        self.failing = _FailingStore(self.store)
        self.manager._store = self.failing

    def test_end_write_fails_then_end_again(self):
        call_id = self.place(mode="conversation", message="Hi")
        state = self.manager.find(call_id).state
        self.failing.fail_writes = 1
        failure = self.failureResultOf(self.run_(self.manager.end_call(call_id)))
        self.assertEqual(str(failure.value), "Failed to persist call: disk full")
        call = self.manager.find(call_id)
        self.assertIsNotNone(call, "still active: the store has it live")
        stored = self.successResultOf(self.store.get_call(call_id))
        self.assertEqual((call.state, stored.state, call.ended_at, call.end_reason), (state, state, None, None))
        refused = self.failureResultOf(self.run_(self.manager.initiate(TO, "Hi", "conversation")))
        self.assertIn("Maximum concurrent calls (1) reached", str(refused.value))
        self.successResultOf(self.run_(self.manager.end_call(call_id)))
        self.assertIsNone(self.manager.find(call_id))
        stored = self.successResultOf(self.store.get_call(call_id))
        self.assertEqual((stored.state.value, stored.end_reason), ("hangup-bot", "hangup-bot"))
