"""
Delivery semantics (DESIGN.md, "Delivery semantics"; issue 12 item 5, issue 13 items 2 and 3):
what happens when a carrier delivers an event. Carriers deliver at least once, in no guaranteed
order, and a redelivery carries a fresh timestamp and signature. So: an event is applied once per
carrier identity, also across a restart; a webhook answered 200 is on disk, and one answered 500
(the store could not commit) changed nothing, so the carrier's retry applies it; states only move
forward, an end is final, and an event that arrives after the end is recorded, never acted on.

Everything goes through the webhook: the real WebhookResource, provider, CallManager and store
(SQLite on a synchronous writer), on a Clock, over StubTreq; requests are signed with the fakes'
signers in voicecall/testing. A restart is the store closed and a new manager restoring from it.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import sqlite3
import subprocess
import tempfile
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource

from voicecall.domain.manager import CallError
from voicecall.domain.model import CallState
from voicecall.providers.mock import MockProvider
from voicecall.providers.plivo import PlivoProvider
from voicecall.providers.telnyx import TelnyxProvider
from voicecall.providers.twilio import TwilioProvider
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter
from voicecall.testing.plivo import signature_headers
from voicecall.testing.telnyx import Signer, envelope
from voicecall.testing.twilio import sign_request
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.webhook import WebhookResource

from tests.fixtures import build_manager

NOW = 1_700_000_000
ORIGIN = "https://voice.example.com"
PATH = "/voice/webhook"
PUBLIC = ORIGIN + PATH
OURS = "+15550000000"
CALLEE = "+15550001234"
SIGNER = Signer.from_seed(bytes(range(32)))
TWILIO_SID = "AC" + "1" * 32
TOKEN = "delivery-token"
PLIVO_ID = "MAXXXXXXXXXXXXXXXXXX"


class CarrierApi(Resource):
    """The carriers' REST side, as far as the providers need it here: dial, commands, status."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, bytes]] = []

    def render(self, request):
        path = request.path.decode()
        method = request.method.decode()
        self.requests.append((method, path, request.content.read()))
        request.setHeader(b"Content-Type", b"application/json")
        if method == "POST" and path == "/v2/calls":
            n = len(self.requests)
            data = {"call_control_id": f"v3:ctl-{n}", "call_leg_id": f"leg-{n}", "call_session_id": f"s-{n}", "is_alive": False, "record_type": "call"}
            return json.dumps({"data": data}).encode()
        if method == "GET" and path.startswith("/v2/calls/"):
            return json.dumps({"data": {"is_alive": True, "state": "answered"}}).encode()
        if method == "POST" and path.endswith("/Calls.json"):  # Twilio dial
            request.setResponseCode(201)
            return json.dumps({"sid": "CA" + "3" * 32, "status": "queued"}).encode()
        if "/Calls/" in path:  # Twilio live update / status
            return json.dumps({"sid": path.rsplit("/", 1)[1].split(".")[0], "status": "in-progress"}).encode()
        return json.dumps({"data": {"result": "ok"}, "message": "ok", "api_id": "x"}).encode()

    def commands(self, action: str) -> list[bytes]:
        return [body for method, path, body in self.requests if path.endswith("/actions/" + action)]


class DiskFullWriter:
    """A SynchronousWriter whose commits fail as SQLite's do on a full disk while `full` is set."""

    def __init__(self) -> None:
        self._inner = SynchronousWriter()
        self.full = False
        self.failed = 0

    def start(self):
        return self._inner.start()

    def stop(self):
        return self._inner.stop()

    def connect(self, opener):
        return self._inner.connect(lambda: _FullableConnection(opener(), self))

    def disconnect(self):
        return self._inner.disconnect()

    def run(self, op):
        return self._inner.run(op)


class _FullableConnection:
    def __init__(self, conn: sqlite3.Connection, writer: DiskFullWriter) -> None:
        self._conn = conn
        self._writer = writer
        self._changes = 0

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, sql, *args):
        if sql.startswith("BEGIN"):
            self._changes = self._conn.total_changes
        elif sql == "COMMIT" and self._writer.full and self._conn.total_changes != self._changes:
            self._writer.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)


class Daemon:
    """One run of the delivery path on a store directory: provider, manager, store, webhook."""

    def __init__(self, case: DeliveryCase, make_provider, writer=None) -> None:
        self.case = case
        self.api = case.api
        self.provider = make_provider()
        self.writer = writer or SynchronousWriter()
        self.store = CallStore(case.directory, self.writer)
        case.successResultOf(self.writer.start())
        case.successResultOf(self.store.open())
        self.manager = build_manager(
            self.provider,
            self.store,
            case.clock,
            webhook_url=PUBLIC,
            on_utterance=lambda call, text: self.on_utterance(call, text),
            provider_name=self.provider.name,
            from_number=OURS,
            max_concurrent_calls=5,
            max_duration_seconds=300,
            transcript_timeout_ms=60_000,
            default_mode="conversation",
            inbound_policy="allowlist",
            allow_from=(CALLEE,),
        )
        if hasattr(self.provider, "set_webhook_url"):
            self.provider.set_webhook_url(PUBLIC)
        self.heard: list[dict] = []
        self.manager.subscribe(self.heard.append)
        self.utterances: list[str] = []
        self.on_utterance = lambda call, text: self.utterances.append(text)
        self.run(self.manager.restore())
        resource = WebhookResource(
            provider=self.provider,
            manager=self.manager,
            reconstruct_url=lambda pq, headers, ip: ORIGIN + pq,
            path=PATH,
            replays=ReplayCache(case.clock),
            responses=ResponseCache(case.clock),
        )
        self.web = StubTreq(resource)
        self.closed = False
        case.addCleanup(self.close)

    def run(self, coro_or_d):
        d = Deferred.fromCoroutine(coro_or_d) if not isinstance(coro_or_d, Deferred) else coro_or_d
        self.case.http.flush()
        return self.case.successResultOf(d)

    def post(self, body: bytes, headers: dict[str, str], url: str = PUBLIC) -> tuple[int, bytes]:
        d = self.web.post(url, data=body, headers={k: [v] for k, v in headers.items()})
        for _ in range(3):
            self.web.flush()
            self.case.http.flush()
        response = self.case.successResultOf(d)
        content = response.content()
        self.web.flush()
        return response.code, self.case.successResultOf(content)

    def stored(self, call_id: str):
        return self.case.successResultOf(self.store.get_call(call_id))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.manager.stop()
            stop = getattr(self.provider, "stop", None)
            if stop is not None:
                stop()
            self.case.successResultOf(self.store.close())


class DeliveryCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.directory = self.mktemp()
        self.api = CarrierApi()
        self.http = StubTreq(self.api)

    # -- Telnyx ------------------------------------------------------------------------------------

    def telnyx(self) -> TelnyxProvider:
        return TelnyxProvider(
            http=self.http, clock=self.clock, api_key="KEY_x", connection_id="conn-1",
            public_key=SIGNER.public_key, base_url="http://telnyx.fake",
        )

    def telnyx_hook(self, daemon, call, event_type, event_id, attempt=1, delay=0, **payload):
        """Deliver one Telnyx webhook (signed now + `delay`); returns the HTTP status."""
        data = {"call_control_id": call.provider_call_id, "client_state": base64.b64encode(call.call_id.encode()).decode(), "direction": "outgoing", "from": OURS, "to": CALLEE}
        data.update(payload)
        document = json.loads(envelope(event_type, data, occurred_at="2023-11-14T22:13:20.000000Z", event_id=event_id, delivered_to=PUBLIC))
        document["meta"]["attempt"] = attempt
        body = json.dumps(document).encode()
        code, _ = daemon.post(body, {"Content-Type": "application/json", **SIGNER.headers(body, int(self.clock.seconds()) + delay)})
        return code

    def telnyx_call(self, daemon, message="Hello there"):
        """An outbound Telnyx call, dialled and answered; its greeting is being spoken."""
        call_id = daemon.run(daemon.manager.initiate(CALLEE, message, "conversation"))
        call = daemon.manager.find(call_id)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.answered", "ev-answered"), 200)
        return call

    def transcription(self, daemon, call, event_id, words, attempt=1, delay=0):
        # Telnyx echoes the client_state of the latest command that set one (a turn's token).
        sent = [json.loads(body) for _, path, body in self.api.requests if "/actions/" in path and body]
        states = [b["client_state"] for b in sent if isinstance(b, dict) and b.get("client_state")]
        return self.telnyx_hook(
            daemon, call, "call.transcription", event_id, attempt, delay,
            transcription_data={"transcript": words, "is_final": True, "confidence": 0.9},
            **({"client_state": states[-1]} if states else {}),
        )


def texts(call, speaker="user"):
    return [t.text for t in call.transcript if t.speaker.value == speaker]


class RedeliveryTests(DeliveryCase):
    """Issue 13.2: a redelivered webhook (same event id, fresh timestamp and signature) applies once."""

    def test_telnyx_redelivery_applies_once(self):
        """A `call.transcription` redelivered with meta.attempt 2 and a new signature adds no second entry."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice"), 200)
        self.clock.advance(5)
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice", attempt=2), 200)
        self.assertEqual(texts(call), ["It's Alice"])
        self.assertEqual(texts(daemon.stored(call.call_id)), ["It's Alice"])
        self.assertEqual(daemon.utterances, ["It's Alice"])

    def test_telnyx_redelivery_after_restart_applies_once(self):
        """The event identity is durable: after a restart the redelivery is still a no-op."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice"), 200)
        call_id = call.call_id
        daemon.close()
        self.clock.advance(30)
        reborn = Daemon(self, self.telnyx)
        call = reborn.manager.find(call_id)
        self.assertIsNotNone(call)
        self.assertEqual(self.transcription(reborn, call, "ev-t1", "It's Alice", attempt=3), 200)
        self.assertEqual(texts(call), ["It's Alice"])
        self.assertEqual(texts(reborn.stored(call_id)), ["It's Alice"])
        self.assertEqual(reborn.utterances, [])
        # A new event still applies.
        self.assertEqual(self.transcription(reborn, call, "ev-t2", "Goodbye"), 200)
        self.assertEqual(texts(reborn.stored(call_id)), ["It's Alice", "Goodbye"])

    def test_telnyx_redelivered_speak_ended_does_not_end_the_next_speech(self):
        """A redelivered `call.speak.ended` of the greeting leaves the question that follows it playing."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        turn = Deferred.fromCoroutine(daemon.manager.continue_call(call.call_id, "Who is this?"))
        self.http.flush()
        self.assertEqual(len(self.api.commands("speak")), 2)
        self.assertEqual(call.state, CallState.SPEAKING)
        starts = len(self.api.commands("transcription_start"))
        self.clock.advance(3)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", attempt=2, status="completed"), 200)
        self.assertEqual(call.state, CallState.SPEAKING)
        self.assertEqual(len(self.api.commands("transcription_start")), starts)
        self.assertEqual(texts(call, "bot"), ["Hello there"])
        # The question's own end does end it.
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken-2", status="completed"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        self.assertEqual(texts(call, "bot"), ["Hello there", "Who is this?"])
        self.assertNoResult(turn)
        # The continue still waits for its answer; stopping the daemon ends it, and says why.
        daemon.close()
        self.assertEqual(str(self.failureResultOf(turn, CallError).value), "voicecall is shutting down")

    def test_telnyx_speak_ended_redelivered_after_restart(self):
        """After a restart, a redelivered `call.speak.ended` from before it does not end a new speech."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        daemon.close()
        reborn = Daemon(self, self.telnyx)
        call = reborn.manager.find(call.call_id)
        turn = Deferred.fromCoroutine(reborn.manager.continue_call(call.call_id, "Who is this?"))
        self.http.flush()
        self.assertEqual(call.state, CallState.SPEAKING)
        self.assertEqual(self.telnyx_hook(reborn, call, "call.speak.ended", "ev-spoken", attempt=2, status="completed"), 200)
        self.assertEqual(call.state, CallState.SPEAKING)
        self.assertNoResult(turn)
        # The question's own end ends it; stopping the daemon then ends the wait for its answer.
        self.assertEqual(self.telnyx_hook(reborn, call, "call.speak.ended", "ev-spoken-2", status="completed"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        self.assertNoResult(turn)
        reborn.close()
        self.assertEqual(str(self.failureResultOf(turn, CallError).value), "voicecall is shutting down")

    def test_twilio_retry_signed_over_another_url_form(self):
        """
        A Gather result retried with the same I-Twilio-Idempotency-Token, signed over the URL with
        its default port written out (both forms verify), is one utterance, not two.
        """
        daemon = Daemon(self, lambda: TwilioProvider(http=self.http, clock=self.clock, account_sid=TWILIO_SID, auth_token=TOKEN, public_url=PUBLIC, base_url="http://twilio.fake"))
        sid = "CA" + "2" * 32
        inbound = {"AccountSid": TWILIO_SID, "CallSid": sid, "Direction": "inbound", "From": CALLEE, "To": OURS, "CallStatus": "ringing"}
        body = urlencode(inbound).encode()
        code, _ = daemon.post(body, {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": sign_request(TOKEN, PUBLIC, inbound), "I-Twilio-Idempotency-Token": "idem-1"})
        self.assertEqual(code, 200)
        call = daemon.manager.find(sid)
        self.assertIsNotNone(call)
        query = "?callId=" + call.call_id + "&turnToken=t-1&n=abc123"
        speech = {"AccountSid": TWILIO_SID, "CallSid": sid, "Direction": "inbound", "From": CALLEE, "To": OURS, "CallStatus": "in-progress", "SpeechResult": "I need help", "Confidence": "0.9"}
        body = urlencode(speech).encode()
        for signed_url in (PUBLIC + query, ORIGIN + ":443" + PATH + query):
            headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": sign_request(TOKEN, signed_url, speech), "I-Twilio-Idempotency-Token": "idem-2"}
            code, _ = daemon.post(body, headers, url=PUBLIC + query)
            self.assertEqual(code, 200)
        self.assertEqual(texts(call), ["I need help"])
        self.assertEqual(texts(daemon.stored(call.call_id)), ["I need help"])

    def test_plivo_retry_with_a_fresh_nonce(self):
        """A Plivo GetInput callback retried with a fresh V3 nonce (a new signature) is one utterance."""
        daemon = Daemon(self, lambda: PlivoProvider(http=self.http, clock=self.clock, auth_id=PLIVO_ID, auth_token=TOKEN, public_url=PUBLIC, base_url="http://plivo.fake"))
        uuid_ = "c0ffee00-0000-4000-8000-000000000001"
        answer = {"CallUUID": uuid_, "Direction": "inbound", "From": CALLEE.lstrip("+"), "To": OURS.lstrip("+"), "CallStatus": "ringing", "Event": "StartApp"}
        url = PUBLIC + "?provider=plivo&flow=answer"
        code, _ = daemon.post(urlencode(answer).encode(), {"Content-Type": "application/x-www-form-urlencoded", **signature_headers(TOKEN, "POST", url, list(answer.items()))}, url=url)
        self.assertEqual(code, 200)
        call = daemon.manager.find(uuid_)
        self.assertIsNotNone(call)
        url = PUBLIC + f"?provider=plivo&flow=getinput&callId={call.call_id}&n=n0nce1"
        speech = {"CallUUID": uuid_, "Direction": "inbound", "From": CALLEE.lstrip("+"), "To": OURS.lstrip("+"), "CallStatus": "in-progress", "InputType": "speech", "Speech": "Book a table"}
        for _ in range(2):
            headers = {"Content-Type": "application/x-www-form-urlencoded", **signature_headers(TOKEN, "POST", url, list(speech.items()))}
            code, _ = daemon.post(urlencode(speech).encode(), headers, url=url)
            self.assertEqual(code, 200)
        self.assertEqual(texts(call), ["Book a table"])
        self.assertEqual(texts(daemon.stored(call.call_id)), ["Book a table"])


class OrderTests(DeliveryCase):
    """Issue 13.3: out-of-order events never move a call backwards nor act after its end."""

    def late_entries(self, daemon, call_id):
        events = self.successResultOf(daemon.store.last_events(100))
        return [(e["event"], e["state"]) for e in events if e["type"] == "call.event.late" and e["callId"] == call_id]

    def test_answered_after_hangup(self):
        """`call.answered` after `call.hangup` is recorded, not acted on: no greeting, no max-duration timer."""
        daemon = Daemon(self, self.telnyx)
        call_id = daemon.run(daemon.manager.initiate(CALLEE, "Hello there", "conversation"))
        call = daemon.manager.find(call_id)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="normal_clearing"), 200)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.answered", "ev-answered"), 200)
        stored = daemon.stored(call_id)
        self.assertEqual((stored.state, stored.answered_at), (CallState.COMPLETED, None))
        self.assertEqual(self.api.commands("speak"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.late_entries(daemon, call_id), [("call.answered", "completed")])
        self.assertIn("telnyx:event:ev-answered", stored.processed_event_ids)

    def test_late_events_after_restart(self):
        """After a restart, an answer and a transcription for a call that ended are recorded, not acted on."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="normal_clearing"), 200)
        daemon.close()
        speaks = len(self.api.commands("speak"))
        reborn = Daemon(self, self.telnyx)
        self.assertIsNone(reborn.manager.find(call.call_id))
        self.assertEqual(self.telnyx_hook(reborn, call, "call.answered", "ev-answered-2"), 200)
        self.assertEqual(self.transcription(reborn, call, "ev-t-late", "Hello?"), 200)
        stored = reborn.stored(call.call_id)
        self.assertEqual(stored.state, CallState.COMPLETED)
        self.assertEqual(texts(stored), [])
        self.assertEqual(reborn.utterances, [])
        self.assertEqual(len(self.api.commands("speak")), speaks)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.late_entries(reborn, call.call_id), [("call.answered", "completed"), ("call.speech", "completed")])

    def test_transcript_after_end_resolves_nothing(self):
        """A transcription after the hang-up neither answers the waiting turn nor triggers a reply."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        turn = Deferred.fromCoroutine(daemon.manager.continue_call(call.call_id, "Who is this?"))
        self.http.flush()
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken-2", status="completed"), 200)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="normal_clearing"), 200)
        failure = self.failureResultOf(turn, CallError)
        self.assertEqual(str(failure.value), "Call ended: completed")
        self.assertEqual(self.transcription(daemon, call, "ev-t-late", "It's Alice"), 200)
        self.assertEqual(texts(daemon.stored(call.call_id)), [])
        self.assertEqual(daemon.utterances, [])
        self.assertEqual(self.late_entries(daemon, call.call_id), [("call.speech", "completed")])

    def test_speak_started_after_speak_ended(self):
        """A `call.speak.started` delivered after the speech ended (and listening began) leaves the call listening."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.started", "ev-speaking"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        self.assertEqual(daemon.stored(call.call_id).state, CallState.LISTENING)
        self.assertEqual(self.late_entries(daemon, call.call_id), [("call.speaking", "listening")])

    def test_twilio_status_callbacks_in_any_order(self):
        """
        Twilio status callbacks arriving completed, then in-progress, then ringing: the call ends once,
        the late ones are recorded and start nothing (no greeting, no timer); `completed` delivered
        again, signed over the other URL form, is the same callback (its SequenceNumber), not a late one.
        """
        daemon = Daemon(self, lambda: TwilioProvider(http=self.http, clock=self.clock, account_sid=TWILIO_SID, auth_token=TOKEN, public_url=PUBLIC, base_url="http://twilio.fake"))
        call_id = daemon.run(daemon.manager.initiate(CALLEE, "Hello there", "conversation"))
        sid = daemon.manager.find(call_id).provider_call_id
        query = f"?callId={call_id}&type=status"
        requests = len(self.api.requests)

        def status(value, seq, origin=ORIGIN):
            params = {"AccountSid": TWILIO_SID, "CallSid": sid, "Direction": "outbound-api", "From": OURS, "To": CALLEE, "CallStatus": value, "SequenceNumber": str(seq), "CallbackSource": "call-progress-events"}
            headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": sign_request(TOKEN, origin + PATH + query, params)}
            code, _ = daemon.post(urlencode(params).encode(), headers, url=PUBLIC + query)
            return code

        self.assertEqual(status("completed", 3), 200)
        self.assertEqual(status("in-progress", 2), 200)
        self.assertEqual(status("ringing", 1), 200)
        self.assertEqual(status("completed", 3, origin=ORIGIN + ":443"), 200)
        stored = daemon.stored(call_id)
        self.assertEqual((stored.state, stored.answered_at), (CallState.COMPLETED, None))
        self.assertEqual(daemon.manager.ended_counts, {"completed": 1})
        self.assertEqual(len(self.api.requests), requests)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.late_entries(daemon, call_id), [("call.answered", "completed"), ("call.ringing", "completed")])

    def test_hangup_is_final(self):
        """No event after the end changes the state back: ringing, answered, bridged all stay late."""
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="user_busy"), 200)
        for kind in ("call.ringing", "call.answered", "call.bridged", "call.initiated"):
            self.assertEqual(self.telnyx_hook(daemon, call, kind, "ev-" + kind), 200)
        self.assertEqual(daemon.stored(call.call_id).state, CallState.BUSY)
        self.assertEqual(daemon.manager.active_calls(), [])
        self.assertEqual(
            self.late_entries(daemon, call.call_id),
            [("call.ringing", "busy"), ("call.answered", "busy"), ("call.active", "busy"), ("call.initiated", "busy")],
        )


class FailedWriteTests(DeliveryCase):
    """Issue 12.5: a webhook answered 500 (the store could not commit) changed nothing; its retry applies."""

    def setUp(self) -> None:
        super().setUp()
        self.writer = DiskFullWriter()
        self.addCleanup(self.flushLoggedErrors, sqlite3.OperationalError)

    def listening(self, daemon):
        """A Telnyx call whose greeting has been spoken: listening."""
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        return call

    def test_hangup_not_stored_leaves_the_call_live(self):
        """A hang-up whose write fails is answered 500 and changes nothing; the retry ends the call durably."""
        daemon = Daemon(self, self.telnyx, self.writer)
        call = self.listening(daemon)
        turn = Deferred.fromCoroutine(daemon.manager.continue_call(call.call_id, "Who is this?"))
        self.http.flush()
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken-2", status="completed"), 200)
        heard = len(daemon.heard)
        timers = [c for c in self.clock.getDelayedCalls() if c.active()]
        before = (call.state, call.ended_at, call.end_reason, list(call.processed_event_ids), list(call.transcript))

        self.writer.full = True
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="normal_clearing"), 500)
        self.assertGreater(self.writer.failed, 0)
        self.assertIs(daemon.manager.find(call.call_id), call)
        self.assertIs(daemon.manager.find(call.provider_call_id), call)
        self.assertEqual((call.state, call.ended_at, call.end_reason, list(call.processed_event_ids), list(call.transcript)), before)
        self.assertEqual(daemon.manager.ended_counts, {})
        self.assertEqual(len(daemon.heard), heard)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], timers)
        self.assertNoResult(turn)

        self.writer.full = False  # space freed; the carrier retries (a fresh signature)
        self.clock.advance(2)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", attempt=2, hangup_cause="normal_clearing"), 200)
        self.assertEqual(str(self.failureResultOf(turn, CallError).value), "Call ended: completed")
        self.assertIsNone(daemon.manager.find(call.call_id))
        self.assertEqual(daemon.manager.ended_counts, {"completed": 1})
        self.assertEqual(daemon.stored(call.call_id).state, CallState.COMPLETED)
        daemon.close()
        reborn = Daemon(self, self.telnyx)
        self.assertEqual(reborn.manager.active_calls(), [])
        self.assertEqual(reborn.stored(call.call_id).state, CallState.COMPLETED)

    def test_answer_not_stored_starts_nothing(self):
        """An answer whose write fails starts no timer and speaks no greeting; its retry does both, once."""
        daemon = Daemon(self, self.telnyx, self.writer)
        call_id = daemon.run(daemon.manager.initiate(CALLEE, "Hello there", "conversation"))
        call = daemon.manager.find(call_id)
        self.writer.full = True
        self.assertEqual(self.telnyx_hook(daemon, call, "call.answered", "ev-answered"), 500)
        self.assertEqual((call.state, call.answered_at), (CallState.INITIATED, None))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.api.commands("speak"), [])
        self.writer.full = False
        self.assertEqual(self.telnyx_hook(daemon, call, "call.answered", "ev-answered", attempt=2, delay=1), 200)
        self.assertEqual(call.state, CallState.SPEAKING)
        self.assertEqual(len(self.api.commands("speak")), 1)
        self.assertEqual(daemon.stored(call_id).answered_at, NOW * 1000)

    def test_transcript_not_stored_resolves_nothing(self):
        """A transcription whose write fails leaves the turn waiting and the transcript as it was; its retry answers the turn once."""
        daemon = Daemon(self, self.telnyx, self.writer)
        call = self.listening(daemon)
        turn = Deferred.fromCoroutine(daemon.manager.continue_call(call.call_id, "Who is this?"))
        self.http.flush()
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken-2", status="completed"), 200)
        self.assertEqual(call.state, CallState.LISTENING)
        self.writer.full = True
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice"), 500)
        self.assertNoResult(turn)
        self.assertEqual(texts(call), [])
        self.assertNotIn("telnyx:event:ev-t1", call.processed_event_ids)
        self.writer.full = False
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice", attempt=2), 200)
        self.assertEqual(self.successResultOf(turn), "It's Alice")
        self.assertEqual(texts(daemon.stored(call.call_id)), ["It's Alice"])

    def test_effect_failing_after_the_commit_still_answers_200(self):
        """Once the event is stored the webhook is answered 200, even if what it triggers fails (and a retry changes nothing)."""
        daemon = Daemon(self, self.telnyx)
        call = self.listening(daemon)

        def broken(call, text):
            raise RuntimeError("reply hook broke")

        daemon.on_utterance = broken
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice"), 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.transcription(daemon, call, "ev-t1", "It's Alice", attempt=2), 200)
        self.assertEqual(texts(daemon.stored(call.call_id)), ["It's Alice"])

    def test_inbound_call_not_stored_is_not_created(self):
        """An inbound call whose creation cannot be stored is neither kept nor answered; the retry creates it once."""
        daemon = Daemon(self, self.telnyx, self.writer)
        self.writer.full = True

        class Inbound:
            call_id = "v3:inbound-1"
            provider_call_id = "v3:inbound-1"

        def initiated(attempt):
            return self.telnyx_hook(daemon, Inbound, "call.initiated", "ev-in", attempt, client_state=None, direction="incoming", **{"from": CALLEE, "to": OURS})

        self.assertEqual(initiated(1), 500)
        self.assertEqual(daemon.manager.active_calls(), [])
        self.assertIsNone(daemon.manager.find("v3:inbound-1"))
        self.assertEqual(self.api.commands("answer"), [])
        self.writer.full = False
        self.assertEqual(initiated(2), 200)
        (call,) = daemon.manager.active_calls()
        self.assertEqual(call.provider_call_id, "v3:inbound-1")
        self.assertEqual(len(self.api.commands("answer")), 1)


class SmallDiskTests(DeliveryCase):
    """Issue 12.5 on a real full filesystem: a tmpfs of 2 MB the test mounts (as root)."""

    def mount(self) -> str:
        if os.geteuid() != 0:
            raise SkipTest("mounting a small tmpfs needs root")
        point = tempfile.mkdtemp(prefix="vc-small-disk-", dir="/tmp")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", point], capture_output=True, text=True)
        if result.returncode != 0:
            os.rmdir(point)
            raise SkipTest(f"mount -t tmpfs is not permitted here: {result.stderr.strip()}")
        self.addCleanup(os.rmdir, point)
        self.addCleanup(subprocess.run, ["umount", "-l", point], capture_output=True)
        return point

    def fill(self, point: str) -> str:
        path = os.path.join(point, "filler")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            self.assertEqual(e.errno, errno.ENOSPC)
        finally:
            os.close(fd)
        return path

    def test_hangup_on_a_full_disk(self):
        """Full disk: the hang-up is answered 500 and the call stays live; after space is freed the retry ends it, durably."""
        point = self.mount()
        self.addCleanup(self.flushLoggedErrors, sqlite3.OperationalError)
        self.directory = os.path.join(point, "store")
        daemon = Daemon(self, self.telnyx)
        call = self.telnyx_call(daemon)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.speak.ended", "ev-spoken", status="completed"), 200)
        filler = self.fill(point)
        code = self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", hangup_cause="normal_clearing")
        self.assertEqual(code, 500)
        self.assertIs(daemon.manager.find(call.call_id), call)
        self.assertFalse(call.is_terminal)
        os.unlink(filler)
        self.assertEqual(self.telnyx_hook(daemon, call, "call.hangup", "ev-hangup", attempt=2, delay=1, hangup_cause="normal_clearing"), 200)
        self.assertIsNone(daemon.manager.find(call.call_id))
        daemon.close()
        reborn = Daemon(self, self.telnyx)
        self.assertEqual(reborn.manager.active_calls(), [])
        self.assertEqual(reborn.stored(call.call_id).state, CallState.COMPLETED)


class MockTests(DeliveryCase):
    """The mock provider plays the carrier the same way: its event `id` is the event's identity."""

    def mock(self) -> MockProvider:
        return MockProvider(clock=self.clock)

    def send(self, daemon, *events) -> int:
        code, _ = daemon.post(json.dumps({"events": list(events)}).encode(), {"Content-Type": "application/json"})
        return code

    def test_event_id_applied_once(self):
        """The same event (same `id`) redelivered in a payload written differently is applied once,
        while a new event beside it in that payload (a key press) is applied."""
        daemon = Daemon(self, self.mock)
        call_id = daemon.run(daemon.manager.initiate(CALLEE, None, "conversation"))
        self.assertEqual(self.send(daemon, {"type": "call.answered", "callId": call_id, "id": "a1"}), 200)
        speech = {"type": "call.speech", "callId": call_id, "id": "s1", "transcript": "yes please"}
        self.assertEqual(self.send(daemon, speech), 200)
        self.assertEqual(self.send(daemon, {**speech, "confidence": 0.9}, {"type": "call.dtmf", "callId": call_id, "digits": "1"}), 200)
        self.assertEqual(texts(daemon.stored(call_id)), ["yes please", "[dtmf] 1"])

    def test_end_not_stored_is_retried(self):
        """An end answered 500 leaves the call live for the mock too: its retry is applied, not refused 409."""
        self.addCleanup(self.flushLoggedErrors, sqlite3.OperationalError)
        writer = DiskFullWriter()
        daemon = Daemon(self, self.mock, writer)
        call_id = daemon.run(daemon.manager.initiate(CALLEE, None, "conversation"))
        end = {"type": "call.ended", "callId": call_id, "id": "end-1", "reason": "hangup-user"}
        writer.full = True
        self.assertEqual(self.send(daemon, end), 500)
        self.assertIsNotNone(daemon.manager.find(call_id))
        writer.full = False
        self.assertEqual(self.send(daemon, {**end, "timestamp": NOW * 1000}), 200)
        self.assertIsNone(daemon.manager.find(call_id))
        self.assertEqual(daemon.stored(call_id).state, CallState.HANGUP_USER)
        code, body = daemon.post(json.dumps({"event": {"type": "call.speech", "callId": call_id, "transcript": "hello?"}}).encode(), {})
        self.assertEqual(code, 409, body)

