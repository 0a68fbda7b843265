"""
Unit tests for the Telnyx adapter: webhook verification and parsing (SPEC §7.2, PROVIDERS.md
§2.2), the hangup-cause map, and the REST bodies it sends (driven against the fake Telnyx through
StubTreq).
"""
from __future__ import annotations

import base64
import json
import uuid

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.test.proto_helpers import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.model import CallRecord, Direction, EventType
from voicecall.domain.carrier import ProviderError
from voicecall.providers.base import WebhookContext
from voicecall.providers.base import SPEAK_TIMEOUT_BASE
from voicecall.providers.telnyx import HANGUP_CAUSES, TelnyxProvider, decode_client_state_token, encode_client_state
from voicecall.testing.telnyx import FakeTelnyx, Signer, envelope, error_body

NOW = 1_700_000_000
API_KEY = "KEY_unit"
CONNECTION = "conn-1"
API = "http://telnyx.fake"
SIGNER = Signer.from_seed(bytes(range(32)))
CALL_ID = "6f1c2a4e-93b5-4c1e-9d0b-2f8e7a1c5d3b"
STATE = base64.b64encode(CALL_ID.encode()).decode()


def ctx(body: bytes, headers: dict | None = None, timestamp: int = NOW) -> WebhookContext:
    if headers is None:
        headers = SIGNER.headers(body, timestamp)
    return WebhookContext(
        method="POST",
        path="/voice/webhook",
        path_and_query="/voice/webhook",
        query={},
        headers={"content-type": "application/json", **headers},
        raw_body=body,
        remote_ip="127.0.0.1",
        url="https://voice.example.com/voice/webhook",
    )


def event(event_type: str, **payload) -> bytes:
    base = {"call_control_id": "v3:abc", "client_state": STATE, "from": "+15005550006", "to": "+15005550001", "direction": "outgoing"}
    base.update(payload)
    return envelope(event_type, {k: v for k, v in base.items() if v is not None}, occurred_at="2023-11-14T22:13:20.000000Z", event_id="ev-1")


class TelnyxVerificationTests(SynchronousTestCase):
    """Webhooks are checked with Ed25519 against the configured public key, at the clock's time."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.provider = TelnyxProvider(http=None, clock=self.clock, public_key=SIGNER.public_key)

    def test_signature_headers_gate(self):
        """The pre-body gate wants both the signature and the timestamp header."""
        both = SIGNER.headers(b"{}", NOW)
        self.assertTrue(self.provider.has_signature_headers(both))
        for missing in both:
            self.assertFalse(self.provider.has_signature_headers({k: v for k, v in both.items() if k != missing}))
        self.assertFalse(self.provider.has_signature_headers({k: "" for k in both}))

    def test_valid_signature(self):
        """A correctly signed webhook verifies and yields a `telnyx:` request key."""
        verdict = self.provider.verify_webhook(ctx(event("call.answered")))
        self.assertTrue(verdict.ok, verdict.reason)
        self.assertTrue(verdict.request_key.startswith("telnyx:"))

    def test_tampered_body(self):
        """A body changed after signing is refused."""
        body = event("call.answered")
        verdict = self.provider.verify_webhook(ctx(body.replace(b"answered", b"hangup"), SIGNER.headers(body, NOW)))
        self.assertEqual((verdict.ok, verdict.reason), (False, "Invalid signature"))

    def test_timestamp_window_follows_the_clock(self):
        """A timestamp 300 s away from the clock passes; 301 s is too old."""
        body = event("call.answered")
        self.assertTrue(self.provider.verify_webhook(ctx(body, timestamp=NOW - 300)).ok)
        verdict = self.provider.verify_webhook(ctx(body, timestamp=NOW - 301))
        self.assertEqual((verdict.ok, verdict.reason), (False, "Timestamp too old"))
        self.clock.advance(1)
        self.assertFalse(self.provider.verify_webhook(ctx(body, timestamp=NOW - 300)).ok)

    def test_other_key(self):
        """A webhook signed with another key is refused."""
        body = event("call.answered")
        verdict = self.provider.verify_webhook(ctx(body, Signer.generate().headers(body, NOW)))
        self.assertFalse(verdict.ok)

    def test_no_public_key(self):
        """Without a public key nothing verifies (SPEC §20 item 1)."""
        provider = TelnyxProvider(http=None, clock=self.clock)
        verdict = provider.verify_webhook(ctx(event("call.answered")))
        self.assertEqual((verdict.ok, verdict.reason), (False, "Missing telnyx.publicKey (configure to verify webhooks)"))


class TelnyxParseTests(SynchronousTestCase):
    """Webhook bodies become normalised events (SPEC §7.2, PROVIDERS.md §2.2)."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.provider = TelnyxProvider(http=None, clock=self.clock, public_key=SIGNER.public_key)

    def parse(self, body: bytes, key: str = "telnyx:key"):
        return self.provider.parse_webhook(ctx(body), key)

    def only(self, body: bytes):
        parsed = self.parse(body)
        self.assertEqual((parsed.response.status, parsed.response.body), (200, b"OK"))
        (ev,) = parsed.events
        return ev

    def test_progress_events(self):
        """initiated, ringing, answered and bridged map to their normalised types."""
        for kind, expected in [
            ("call.initiated", EventType.INITIATED),
            ("call.ringing", EventType.RINGING),
            ("call.answered", EventType.ANSWERED),
            ("call.bridged", EventType.ACTIVE),
        ]:
            self.assertEqual(self.only(event(kind)).type, expected)

    def test_common_fields(self):
        """The call id comes from client_state; the carrier id, numbers, event id and dedupe key (the event id: a redelivery has the same) are carried."""
        ev = self.only(event("call.answered"))
        self.assertEqual(
            (ev.call_id, ev.provider_call_id, ev.from_number, ev.to_number, ev.id, ev.dedupe_key, ev.timestamp),
            (CALL_ID, "v3:abc", "+15005550006", "+15005550001", "ev-1", "telnyx:event:ev-1", NOW * 1000),
        )

    def test_direction(self):
        """`incoming` is inbound, `outgoing` outbound, anything else none."""
        self.assertEqual(self.only(event("call.initiated", direction="incoming")).direction, Direction.INBOUND)
        self.assertEqual(self.only(event("call.initiated", direction="outgoing")).direction, Direction.OUTBOUND)
        self.assertIsNone(self.only(event("call.initiated", direction=None)).direction)
        self.assertIsNone(self.only(event("call.initiated", direction="sideways")).direction)

    def test_hangup_never_carries_direction(self):
        """A hang-up carries no direction, so the end of an unknown call cannot create an inbound call."""
        ev = self.only(event("call.hangup", direction="incoming", hangup_cause="normal_clearing"))
        self.assertEqual((ev.type, ev.reason, ev.direction), (EventType.ENDED, "completed", None))

    def test_client_state_fallbacks(self):
        """A client_state that is not base64 is used raw; without one the call_control_id is the call id."""
        self.assertEqual(self.only(event("call.answered", client_state="plain-id!")).call_id, "plain-id!")
        self.assertEqual(self.only(event("call.answered", client_state=base64.b64encode(b"\xff\xfe").decode())).call_id, "//4=")
        self.assertEqual(self.only(event("call.answered", client_state=None)).call_id, "v3:abc")

    def test_turn_token_in_client_state(self):
        """
        base64 of {"c": call id, "t": token} gives both; the plain form (base64 of the call id,
        as set before turn tokens existed) gives the call id and no token; a JSON object
        without a usable "c" is a call id like any other text; a bad token is no token.
        """
        def state(obj):
            return base64.b64encode(json.dumps(obj).encode()).decode()

        def body(cs):
            return event("call.transcription", client_state=cs, transcription_data={"transcript": "hi", "is_final": True})

        ev = self.only(body(encode_client_state(CALL_ID, "tok-9")))
        self.assertEqual((ev.call_id, ev.turn_token), (CALL_ID, "tok-9"))
        ev = self.only(body(STATE))
        self.assertEqual((ev.call_id, ev.turn_token), (CALL_ID, None))
        self.assertEqual(encode_client_state(CALL_ID), STATE)
        self.assertEqual(decode_client_state_token(state({"call_id": "abc123"})), ('{"call_id": "abc123"}', None))
        self.assertEqual(decode_client_state_token(state({"c": CALL_ID, "t": 5})), (CALL_ID, None))
        self.assertEqual(decode_client_state_token(state({"c": CALL_ID, "t": "x" * 500})), (CALL_ID, None))
        self.assertEqual(decode_client_state_token(state({"c": ""})), ('{"c": ""}', None))
        self.assertEqual(decode_client_state_token(base64.b64encode(b"{[").decode()), ("{[", None))
        # Only a transcription carries the token on: other events never need it.
        self.assertIsNone(self.only(event("call.answered", client_state=encode_client_state(CALL_ID, "t"))).turn_token)

    def test_no_call_at_all(self):
        """An event naming no call gives no event, and is still answered OK."""
        parsed = self.parse(event("call.answered", client_state=None, call_control_id=None))
        self.assertEqual((parsed.events, parsed.response.status), ((), 200))

    def test_speak_started_and_dtmf(self):
        """speak.started is speaking; a DTMF digit is a dtmf event."""
        self.assertEqual(self.only(event("call.speak.started")).type, EventType.SPEAKING)
        ev = self.only(event("call.dtmf.received", digit="5"))
        self.assertEqual((ev.type, ev.digits), (EventType.DTMF, "5"))

    def test_transcription_data(self):
        """A final `transcription_data` result is speech with its transcript and confidence."""
        data = {"transcript": " It's Alice ", "is_final": True, "confidence": 0.93, "transcription_track": "inbound"}
        ev = self.only(event("call.transcription", transcription_data=data))
        self.assertEqual((ev.type, ev.transcript, ev.is_final, ev.confidence), (EventType.SPEECH, "It's Alice", True, 0.93))

    def test_flat_transcription(self):
        """The flat SPEC shape (`payload.transcription`) is read too; a missing is_final means final."""
        ev = self.only(event("call.transcription", transcription="Hello", confidence=0.5))
        self.assertEqual((ev.transcript, ev.is_final, ev.confidence), ("Hello", True, 0.5))
        ev = self.only(event("call.transcription", transcription="Hi", is_final=True))
        self.assertEqual(ev.transcript, "Hi")

    def test_interim_and_empty_transcripts_are_dropped(self):
        """Interim results and empty transcripts give no event."""
        for payload in (
            {"transcription_data": {"transcript": "Hel", "is_final": False}},
            {"transcription": "Hel", "is_final": False},
            {"transcription_data": {"transcript": "  ", "is_final": True}},
        ):
            self.assertEqual(self.parse(event("call.transcription", **payload)).events, ())

    def test_unmapped_events(self):
        """Events with no normalised meaning (a playback, streaming) give no event, answered OK."""
        for kind in ("call.playback.started", "streaming.started"):
            parsed = self.parse(event(kind))
            self.assertEqual((parsed.events, parsed.response.status, parsed.response.body), ((), 200, b"OK"))

    def test_invalid_json(self):
        """A body that is not JSON is answered 400 with no events."""
        for body in (b"{not json", b"\xff\xfe", b"[" * 100_000):
            parsed = self.parse(body)
            self.assertEqual((parsed.events, parsed.response.status), ((), 400))

    def test_missing_data_or_event_type(self):
        """JSON without `data` or `event_type` is answered 200 with no events."""
        for document in ({}, {"data": None}, {"data": {"payload": {}}}, {"data": {"event_type": 7}}, [1, 2]):
            parsed = self.parse(json.dumps(document).encode())
            self.assertEqual((parsed.events, parsed.response.status, parsed.response.body), ((), 200, b"OK"))

    def test_missing_event_id(self):
        """Without `data.id` the event still gets an id."""
        body = json.dumps({"data": {"event_type": "call.answered", "payload": {"call_control_id": "v3:x"}}}).encode()
        self.assertTrue(self.only(body).id)

    def test_replays_get_the_original_answer(self):
        """A replay is answered as its original was (OK for JSON), without parsing it again."""
        self.assertEqual(self.provider.replay_response(ctx(b"{}")).status, 200)


class HangupCauseTests(SynchronousTestCase):
    """`hangup_cause` becomes the end reason (SPEC §7.2)."""

    SPEC = {
        "normal_clearing": "completed",
        "normal_unspecified": "completed",
        "originator_cancel": "hangup-bot",
        "call_rejected": "busy",
        "user_busy": "busy",
        "no_answer": "no-answer",
        "no_user_response": "no-answer",
        "destination_out_of_order": "failed",
        "network_out_of_order": "failed",
        "service_unavailable": "failed",
        "recovery_on_timer_expire": "failed",
        "machine_detected": "voicemail",
        "fax_detected": "voicemail",
        "user_hangup": "hangup-user",
        "subscriber_absent": "hangup-user",
    }

    def setUp(self):
        self.provider = TelnyxProvider(http=None, clock=Clock())

    def reason(self, cause):
        (ev,) = self.provider.parse_webhook(ctx(event("call.hangup", hangup_cause=cause)), "k").events
        return ev.reason

    def test_spec_map(self):
        """Every cause SPEC lists maps to its reason."""
        self.assertEqual({cause: self.reason(cause) for cause in self.SPEC}, self.SPEC)
        self.assertLessEqual(self.SPEC.items(), HANGUP_CAUSES.items())

    def test_causes_telnyx_documents(self):
        """The further causes Telnyx sends (PROVIDERS.md §2.2) map sensibly."""
        self.assertEqual(
            [self.reason(c) for c in ("timeout", "time_limit", "not_found", "unspecified", "USER_BUSY")],
            ["no-answer", "timeout", "failed", "completed", "busy"],
        )

    def test_unknown_cause(self):
        """An unknown or missing cause completes the call, with a warning naming it."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.reason("solar_flare"), "completed")
        self.assertEqual(self.reason(None), "completed")
        warnings = [e for e in observer if e.get("log_format") == "Unknown hangup cause: {cause}"]
        self.assertEqual([e["cause"] for e in warnings], ["solar_flare", "None"])


def record(call_id: str = CALL_ID, pid: str | None = None) -> CallRecord:
    return CallRecord(
        call_id=call_id, provider="telnyx", direction=Direction.OUTBOUND, state="answered",
        from_number="+15005550006", to_number="+15005550001", started_at=0, provider_call_id=pid,
    )


class TelnyxRestTests(SynchronousTestCase):
    """The REST requests the adapter makes, checked against the fake Telnyx's API."""

    def setUp(self):
        self.clock = Clock()
        self.fake = FakeTelnyx(self.clock, API_KEY, connection_id=CONNECTION)
        self.provider = self.make()

    def make(self, **kwargs):
        return TelnyxProvider(
            http=StubTreq(self.fake.resource()), clock=self.clock, api_key=API_KEY,
            connection_id=CONNECTION, base_url=API + "/", **kwargs,
        )

    def bodies(self, path_end=""):
        return [r.json for r in self.fake.requests if r.path.endswith(path_end)]

    def spoken(self, d, call, provider=None):
        """
        Telnyx reports the call's oldest speak ended; C{d} then has its result. The webhook is a
        C{call.spoken} event whose effect (ending the speech) runs when the manager applies it:
        parsing alone ends nothing, so a redelivery the manager drops ends nothing either.
        """
        body = event("call.speak.ended", call_control_id=call.provider_call_id, status="completed")
        (ev,) = (provider or self.provider).parse_webhook(ctx(body), "k").events
        self.assertEqual(ev.type, EventType.SPOKEN)
        self.assertNoResult(d)
        ev.on_applied()
        return self.successResultOf(d)

    def dial(self, provider=None) -> CallRecord:
        placed = self.successResultOf((provider or self.provider).initiate_call(
            call_id=CALL_ID, from_number="+15005550006", to_number="+15005550001",
            webhook_url="https://voice.example.com/voice/webhook", notify_message="Hi",
        ))
        self.clock.advance(0)  # the fake answers at once
        return record(pid=placed.provider_call_id)

    def test_dial(self):
        """Dial posts the SPEC body with Bearer auth under /v2 and returns the call_control_id."""
        call = self.dial()
        (request,) = self.fake.requests
        self.assertEqual((request.method, request.path), ("POST", "/v2/calls"))
        self.assertEqual(request.header("authorization"), f"Bearer {API_KEY}")
        self.assertTrue(request.header("content-type").startswith("application/json"))
        body = request.json
        command_id = body.pop("command_id")
        self.assertEqual(uuid.UUID(command_id).version, 4)
        self.assertEqual(body, {
            "connection_id": CONNECTION, "to": "+15005550001", "from": "+15005550006",
            "webhook_url": "https://voice.example.com/voice/webhook", "webhook_url_method": "POST",
            "client_state": STATE, "timeout_secs": 30,
        })
        self.assertIn(call.provider_call_id, self.fake.calls)

    def test_dial_error(self):
        """A refused dial fails with `Telnyx API error: <status> <body>`."""
        body = error_body("10009", "Authentication failed", "bad key")
        self.fake.fail_next(401, body)
        failure = self.failureResultOf(self.provider.initiate_call(
            call_id="c", from_number="+15005550006", to_number="+15005550001", webhook_url="https://x.example/"), ProviderError)
        self.assertEqual(str(failure.value), "Telnyx API error: 401 " + json.dumps(body))
        self.assertEqual(failure.value.status, 401)

    def test_wrong_key_is_refused(self):
        """The fake refuses a wrong key, and the error reaches the caller."""
        provider = TelnyxProvider(http=StubTreq(self.fake.resource()), clock=self.clock, api_key="nope", connection_id=CONNECTION, base_url=API)
        failure = self.failureResultOf(provider.initiate_call(
            call_id="c", from_number="+15005550006", to_number="+15005550001", webhook_url="https://x.example/"), ProviderError)
        self.assertIn('"10009"', str(failure.value))

    def test_dial_without_call_control_id(self):
        """A dial answer without a call_control_id is an error."""
        self.fake.fail_next(200, {"data": {"record_type": "call"}})
        failure = self.failureResultOf(self.provider.initiate_call(
            call_id="c", from_number="+15005550006", to_number="+15005550001", webhook_url="https://x.example/"), ProviderError)
        self.assertEqual(str(failure.value), "Telnyx API error: dial returned no call_control_id")

    def test_speak(self):
        """speak sends payload, voice (default female) and language (default en-US) with a command id."""
        call = self.dial()
        self.spoken(self.provider.speak(call, "Hello there", None), call)
        body = self.bodies("/actions/speak")[-1]
        self.assertEqual(uuid.UUID(body.pop("command_id")).version, 4)
        self.assertEqual(body, {"payload": "Hello there", "voice": "female", "language": "en-US", "client_state": STATE})
        self.assertEqual(self.fake.calls[call.provider_call_id].speak_texts, ["Hello there"])

    def test_speak_resolves_when_played(self):
        """speak waits for call.speak.ended, in order; a hang-up fails every wait (not played); a lost end times out."""
        call = self.dial()
        first, second = self.provider.speak(call, "one", None), self.provider.speak(call, "two", None)
        self.assertNoResult(first)
        self.spoken(first, call)
        self.assertNoResult(second)
        self.provider.parse_webhook(ctx(event("call.hangup", call_control_id=call.provider_call_id, hangup_cause="normal_clearing")), "k2")
        self.assertEqual(str(self.failureResultOf(second, ProviderError).value), "Call ended before the message was played")
        lost = self.provider.speak(call, "three", None)
        self.clock.advance(SPEAK_TIMEOUT_BASE - 1)
        self.assertNoResult(lost)
        self.clock.advance(1 + len("three"))
        self.successResultOf(lost)

    def test_replay_answers_without_effects(self):
        """A replayed speak.ended gets OK without ending the speech now playing; bad JSON gets 400."""
        call = self.dial()
        playing = self.provider.speak(call, "one", None)
        body = event("call.speak.ended", call_control_id=call.provider_call_id, status="completed")
        self.assertEqual(self.provider.replay_response(ctx(body)).status, 200)
        self.assertNoResult(playing)
        self.assertEqual(self.provider.replay_response(ctx(b"{nope")).status, 400)
        self.spoken(playing, call)

    def test_voices(self):
        """Telnyx voices pass through; other names (OpenAI's `alloy`) fall back to female."""
        call = self.dial()
        for voice, sent in [("male", "male"), ("AWS.Polly.Joanna-Neural", "AWS.Polly.Joanna-Neural"), ("alloy", "female"), ("", "female")]:
            self.spoken(self.provider.speak(call, "x", voice), call)
            self.assertEqual(self.bodies("/actions/speak")[-1]["voice"], sent)

    def test_language(self):
        """A configured language is spoken, and its base language is transcribed."""
        provider = self.make(language="de-DE")
        call = self.dial(provider)
        self.spoken(provider.prompt(call, "Hallo", None, None), call, provider)
        self.assertEqual(self.bodies("/actions/speak")[-1]["language"], "de-DE")
        self.assertEqual(self.bodies("/actions/transcription_start")[-1]["transcription_engine_config"]["language"], "de")

    def test_prompt(self):
        """prompt is speak then transcription_start; while transcription runs only speak is sent."""
        call = self.dial()
        self.spoken(self.provider.prompt(call, "Who is this?", None, None), call)
        actions = [r.path.rsplit("/", 1)[1] for r in list(self.fake.requests)[1:]]
        self.assertEqual(actions, ["speak", "transcription_start"])
        body = self.bodies("/actions/transcription_start")[-1]
        body.pop("command_id")
        self.assertEqual(body, {
            "transcription_engine": "Google",
            "transcription_engine_config": {"language": "en", "interim_results": False},
            "transcription_tracks": "inbound",
            "client_state": STATE,
        })
        self.spoken(self.provider.prompt(call, "And then?", None, None), call)
        self.assertEqual(self.fake.requests[-1].path.rsplit("/", 1)[1], "speak")
        self.successResultOf(self.provider.stop_listening(call))
        self.successResultOf(self.provider.start_listening(call, None))
        actions = [r.path.rsplit("/", 1)[1] for r in self.fake.requests]
        self.assertEqual(actions[-2:], ["transcription_stop", "transcription_start"])
        self.assertTrue(self.provider.wants_turn_token(call))
        self.assertTrue(self.provider.uses_turn_tokens)

    def actions(self, since=0):
        return [(r.method, r.path.rsplit("/", 1)[1], decode_client_state_token(r.json.get("client_state")) if r.json else None)
                for r in list(self.fake.requests)[since:]]

    def test_turn_token_travels_in_client_state(self):
        """
        A turn's prompt: the speak carries the plain client_state (the call id: no token), then
        transcription_start carries {"c": call id, "t": token}; the fake echoes it in the
        transcription webhook, whose parse gives the token back.
        """
        call = self.dial()
        since = len(self.fake.requests)
        self.spoken(self.provider.prompt(call, "Who is this?", None, "tok-1"), call)
        self.assertEqual(self.actions(since), [
            ("POST", "speak", (CALL_ID, None)),
            ("POST", "transcription_start", (CALL_ID, "tok-1")),
        ])
        fake_call = self.fake.calls[call.provider_call_id]
        self.assertEqual(json.loads(base64.b64decode(fake_call.client_state)), {"c": CALL_ID, "t": "tok-1"})
        body = event("call.transcription", call_control_id=call.provider_call_id, client_state=fake_call.client_state,
                     transcription_data={"transcript": "It's Alice", "is_final": True})
        ev = self.provider.parse_webhook(ctx(body), "k").events[0]
        self.assertEqual((ev.call_id, ev.turn_token, ev.transcript), (CALL_ID, "tok-1", "It's Alice"))

    def test_a_turn_restarts_transcription_left_running(self):
        """
        Transcription running from before a turn (the greeting's) is stopped before the turn's
        prompt, so an answer to an earlier question under way is never sent with the new token;
        a speak during the turn resets the plain state and listening again restores the token
        with client_state_update (a PUT, as the official SDK sends it).
        """
        call = self.dial()
        self.successResultOf(self.provider.start_listening(call, None))
        since = len(self.fake.requests)
        self.spoken(self.provider.prompt(call, "Question 3?", None, "tok-3"), call)
        self.assertEqual(self.actions(since), [
            ("POST", "transcription_stop", (None, None)),
            ("POST", "speak", (CALL_ID, None)),
            ("POST", "transcription_start", (CALL_ID, "tok-3")),
        ])
        since = len(self.fake.requests)
        self.spoken(self.provider.speak(call, "Still there?", None), call)
        self.successResultOf(self.provider.start_listening(call, "tok-3"))
        self.assertEqual(self.actions(since), [
            ("POST", "speak", (CALL_ID, None)),
            ("PUT", "client_state_update", (CALL_ID, "tok-3")),
        ])
        fake_call = self.fake.calls[call.provider_call_id]
        self.assertEqual(decode_client_state_token(fake_call.client_state), (CALL_ID, "tok-3"))
        self.assertTrue(fake_call.transcribing)

    def test_failed_speak_does_not_listen(self):
        """If speak is refused, prompt fails without starting transcription."""
        call = self.dial()
        self.fake.fail_next(500)
        self.failureResultOf(self.provider.prompt(call, "x", None, None), ProviderError)
        self.assertEqual(self.bodies("/actions/transcription_start"), [])

    def test_hangup_forgets_transcription(self):
        """After a call.hangup webhook the call's transcription is no longer taken as running."""
        call = self.dial()
        self.successResultOf(self.provider.start_listening(call, None))
        body = envelope("call.hangup", {"call_control_id": call.provider_call_id, "hangup_cause": "normal_clearing"}, occurred_at="x")
        self.provider.parse_webhook(ctx(body), "k")
        self.successResultOf(self.provider.start_listening(call, None))
        self.assertEqual(len(self.bodies("/actions/transcription_start")), 2)

    def test_answer(self):
        """answer_call answers with our call id as client_state."""
        inbound = self.fake.place_inbound_call("+15557654321", "+15005550006")
        self.clock.advance(0)
        self.successResultOf(self.provider.answer_call(record(pid=inbound.call_control_id)))
        body = self.bodies("/actions/answer")[-1]
        self.assertEqual((body["client_state"], uuid.UUID(body["command_id"]).version), (STATE, 4))
        self.clock.advance(0)
        self.assertTrue(inbound.is_answered)

    def test_hangup(self):
        """hangup posts the hangup action; an unknown call (404) and an ended call (90018) are fine."""
        call = self.dial()
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        self.assertEqual(set(self.bodies("/actions/hangup")[-1]), {"command_id"})
        self.clock.advance(0)
        self.assertFalse(self.fake.calls[call.provider_call_id].is_alive)
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        self.successResultOf(self.provider.hangup_call(record(pid="v3:unknown"), "hangup-bot"))
        self.assertEqual(len(self.bodies("/actions/hangup")), 3)

    def test_hangup_other_errors_fail(self):
        """Other hang-up errors are reported."""
        call = self.dial()
        self.fake.fail_next(500, b"boom")
        failure = self.failureResultOf(self.provider.hangup_call(call, "hangup-bot"), ProviderError)
        self.assertEqual(str(failure.value), "Telnyx API error: 500 boom")

    def test_stop_listening_tolerates_gone_calls(self):
        """transcription_stop on an unknown call is fine; speak on one is an error."""
        gone = record(pid="v3:unknown")
        self.successResultOf(self.provider.stop_listening(gone))
        failure = self.failureResultOf(self.provider.speak(gone, "x", None), ProviderError)
        self.assertTrue(str(failure.value).startswith("Telnyx API error: 404 "))

    def test_listening_on_an_ended_call(self):
        """Starting transcription on a call that already ended is not an error, and is not remembered as running."""
        call = self.dial()
        self.fake.calls[call.provider_call_id].hangup_by_callee()
        self.successResultOf(self.provider.start_listening(call, None))
        self.successResultOf(self.provider.start_listening(record(pid="v3:unknown"), None))
        self.assertEqual(len(self.bodies("/actions/transcription_start")), 2)
        self.successResultOf(self.provider.start_listening(call, None))
        self.assertEqual(len(self.bodies("/actions/transcription_start")), 3)
        failure = self.failureResultOf(self.provider.prompt(call, "x", None, None), ProviderError)
        self.assertIn('"90018"', str(failure.value))

    def test_commands_need_a_carrier_id(self):
        """A call without a carrier id cannot be commanded."""
        failure = self.failureResultOf(self.provider.speak(record(pid=None), "x", None), ProviderError)
        self.assertEqual(str(failure.value), "Call not connected")

    def test_every_command_has_its_own_id(self):
        """Each command carries a distinct uuid4 command_id."""
        call = self.dial()
        self.spoken(self.provider.speak(call, "a", None), call)
        self.spoken(self.provider.speak(call, "a", None), call)
        self.spoken(self.provider.prompt(call, "b", None, None), call)
        ids = [b["command_id"] for b in self.bodies()]
        self.assertEqual(len(ids), 5)
        self.assertEqual(len(set(ids)), 5)
        self.assertEqual(self.fake.calls[call.provider_call_id].speak_texts, ["a", "a", "b"])

    def test_status(self):
        """Status: alive is not terminal, ended is, 404 is terminal not-found; odd answers are unknown."""
        call = self.dial()
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_terminal, status.is_unknown), ("active", False, False))
        self.fake.calls[call.provider_call_id].hangup_by_callee()
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_terminal), ("ended", True))
        status = self.successResultOf(self.provider.get_call_status("v3:unknown"))
        self.assertEqual((status.status, status.is_terminal), ("not-found", True))
        self.fake.fail_next(200, {"data": {"state": "Parked"}})
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_terminal, status.is_unknown), ("parked", False, True))
        self.fake.fail_next(503)
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_unknown), ("error", True))

    def test_call_control_id_is_path_safe(self):
        """A call_control_id is put in the path with its colon kept and anything else unsafe escaped."""
        self.successResultOf(self.provider.stop_listening(record(pid="v3:a/b c")))
        self.assertEqual(self.fake.requests[-1].path, "/v2/calls/v3:a%2Fb%20c/actions/transcription_stop")
