"""
Unit tests for the Twilio adapter's webhook side: verification against the configured public
URL, parsing into normalised events (SPEC §7.1.2) and the TwiML answer policy (§7.1.3).
"""
from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.model import EventType
from voicecall.providers.base import WebhookContext
from voicecall.providers.twilio import TwilioProvider
from voicecall.testing.twilio import sign_request

TOKEN = "token"
PUBLIC = "https://voice.example.com/voice/webhook"
EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def ctx(params: dict, query: str = "", signature: str | None = None, url: str | None = None) -> WebhookContext:
    path_and_query = "/voice/webhook" + query
    body = urlencode(params).encode()
    full = url or PUBLIC + query
    headers = {"content-type": "application/x-www-form-urlencoded", "host": "127.0.0.1:3334"}
    headers["x-twilio-signature"] = signature if signature is not None else sign_request(TOKEN, full, params)
    q = dict(p.split("=", 1) for p in query.lstrip("?").split("&") if "=" in p)
    return WebhookContext(
        method="POST",
        path="/voice/webhook",
        path_and_query=path_and_query,
        query=q,
        headers=headers,
        raw_body=body,
        remote_ip="127.0.0.1",
        url="https://127.0.0.1" + path_and_query,
    )


class TwilioWebhookTests(SynchronousTestCase):
    def setUp(self):
        self.provider = self.make_provider()

    def make_provider(self, **hooks):
        return TwilioProvider(http=None, clock=Clock(), account_sid="AC1", auth_token=TOKEN, public_url=PUBLIC, **hooks)

    def parse(self, params, query=""):
        context = ctx(params, query)
        verdict = self.provider.verify_webhook(context)
        self.assertTrue(verdict.ok, verdict.reason)
        return self.provider.parse_webhook(context, verdict.request_key)

    def test_verified_against_public_url(self):
        """A request signed over the public URL (with the request's own query) verifies; the same over another host does not."""
        params = {"CallSid": "CA1", "CallStatus": "ringing"}
        self.assertTrue(self.provider.verify_webhook(ctx(params, "?callId=c1")).ok)
        forged = ctx(params, "?callId=c1", signature=sign_request(TOKEN, "https://evil.example/voice/webhook?callId=c1", params))
        verdict = self.provider.verify_webhook(forged)
        self.assertFalse(verdict.ok)
        self.assertEqual(verdict.reason, "Invalid signature for URL: " + PUBLIC + "?callId=c1")

    def test_speech_result_wins(self):
        """SpeechResult makes a final speech event with the query's callId and turn token and the confidence."""
        parsed = self.parse(
            {"CallSid": "CA1", "SpeechResult": "  yes please ", "Confidence": "0.87", "Digits": "1", "CallStatus": "in-progress", "Direction": "outbound-api"},
            "?callId=c1&turnToken=t1",
        )
        (event,) = parsed.events
        self.assertEqual(
            (event.type, event.call_id, event.provider_call_id, event.transcript, event.confidence, event.turn_token, event.direction.value),
            (EventType.SPEECH, "c1", "CA1", "yes please", 0.87, "t1", "outbound"),
        )
        # Its identity is the Gather's turn (the same however a retry is signed); the request key is an alias.
        self.assertEqual((event.dedupe_key, event.aliases), ("twilio:gather:CA1:t1:", (event.id,)))

    def test_confidence_must_be_a_plain_decimal(self):
        """A Confidence that is not a plain decimal falls back to 0.9."""
        for raw in ("1e-3", "nan", "-0.5", "0x1"):
            (event,) = self.parse({"CallSid": "CA1", "SpeechResult": "hi", "Confidence": raw}, "?callId=c1").events
            self.assertEqual(event.confidence, 0.9, raw)

    def test_blank_speech_then_digits(self):
        """A blank SpeechResult is ignored; Digits make a DTMF event."""
        (event,) = self.parse({"CallSid": "CA1", "SpeechResult": "   ", "Digits": "42"}).events
        self.assertEqual((event.type, event.digits, event.call_id), (EventType.DTMF, "42", "CA1"))

    def test_status_mapping(self):
        """CallStatus values map to progress events and terminal statuses to ended with their reason."""
        expected = {
            "initiated": (EventType.INITIATED, None),
            "ringing": (EventType.RINGING, None),
            "in-progress": (EventType.ANSWERED, None),
            "completed": (EventType.ENDED, "completed"),
            "busy": (EventType.ENDED, "busy"),
            "no-answer": (EventType.ENDED, "no-answer"),
            "failed": (EventType.ENDED, "failed"),
            "canceled": (EventType.ENDED, "hangup-bot"),
        }
        for status, (kind, reason) in expected.items():
            (event,) = self.parse({"CallSid": "CA1", "CallStatus": status}, "?callId=c1&type=status").events
            self.assertEqual((event.type, event.reason), (kind, reason), status)
        self.assertEqual(self.parse({"CallSid": "CA1", "CallStatus": "queued"}, "?type=status").events, ())

    def test_inbound_without_status_is_initiated(self):
        """An inbound request with nothing else is a call.initiated carrying the caller, then answered by our TwiML."""
        initiated, answered = self.parse({"CallSid": "CA9", "Direction": "inbound", "From": "+15550001234", "To": "+15550000000"}).events
        self.assertEqual(
            (initiated.type, initiated.direction.value, initiated.from_number, initiated.to_number),
            (EventType.INITIATED, "inbound", "+15550001234", "+15550000000"),
        )
        self.assertEqual(answered.type, EventType.ANSWERED)
        self.assertNotEqual(answered.key, initiated.key)

    def test_screened_inbound_caller_is_rejected(self):
        """A caller the inbound policy turns away gets <Reject/>, and the later hang-up makes no second REST call."""
        self.provider = self.make_provider(inbound_screen=lambda caller: caller == "+15550001234")
        parsed = self.parse({"CallSid": "CA9", "Direction": "inbound", "CallStatus": "ringing", "From": "+15559999999"})
        self.assertIn(b"<Reject/>", parsed.response.body)
        self.assertEqual([e.type for e in parsed.events], [EventType.RINGING])
        accepted = self.parse({"CallSid": "CA8", "Direction": "inbound", "CallStatus": "ringing", "From": "+15550001234"})
        self.assertNotIn(b"<Reject/>", accepted.response.body)

    def test_status_callback_gets_empty_twiml(self):
        """A status callback is answered with exactly the empty TwiML document."""
        parsed = self.parse({"CallSid": "CA1", "CallStatus": "ringing", "Direction": "outbound-api"}, "?callId=c1&type=status")
        self.assertEqual(parsed.response.body.decode(), EMPTY)
        self.assertEqual(parsed.response.headers["Content-Type"], "application/xml")

    def test_stream_twiml_when_streaming(self):
        """With a stream available an outbound fetch (and an inbound call) get the stream TwiML."""
        self.provider = self.make_provider(stream_twiml=lambda sid, direction, **_: f"<stream {sid} {direction.value}>")
        out = self.parse({"CallSid": "CA1", "CallStatus": "ringing", "Direction": "outbound-api"}, "?callId=c1")
        self.assertEqual(out.response.body, b"<stream CA1 outbound>")
        inbound = self.parse({"CallSid": "CA2", "Direction": "inbound", "From": "+1555"})
        self.assertEqual(inbound.response.body, b"<stream CA2 inbound>")

    def test_hold_queue_when_another_stream_is_active(self):
        """An inbound caller waits in the hold queue while another call holds the stream."""
        self.provider = self.make_provider(stream_busy=lambda: True)
        parsed = self.parse({"CallSid": "CA2", "Direction": "inbound", "From": "+1555"})
        self.assertIn(b'<Enqueue waitUrl="/voice/hold-music">hold-queue</Enqueue>', parsed.response.body)

    def test_replay_gets_empty_twiml(self):
        """The replay answer is the empty document, without running the TwiML policy."""
        self.provider = self.make_provider(stream_twiml=lambda sid, direction, **_: self.fail("the builder ran for a replay"))
        response = self.provider.replay_response(ctx({"CallSid": "CA1", "Direction": "inbound"}))
        self.assertEqual((response.status, response.body.decode()), (200, EMPTY))

    def test_missing_signature_header_gate(self):
        """The pre-auth gate wants X-Twilio-Signature."""
        self.assertFalse(self.provider.has_signature_headers({"host": "x"}))
        self.assertTrue(self.provider.has_signature_headers({"x-twilio-signature": "abc"}))


class StreamResumeTests(SynchronousTestCase):
    """The stream TwiML's way back: its resume URL, and how the resume fetch is answered."""

    def setUp(self):
        self.calls: list = []

        def stream_twiml(sid, direction, **kwargs):
            self.calls.append((sid, direction, kwargs))
            return f"<Response><Connect/><Redirect>{kwargs['resume_url']}</Redirect></Response>"

        self.provider = TwilioProvider(
            http=None, clock=Clock(), account_sid="AC1", auth_token=TOKEN, public_url=PUBLIC, stream_twiml=stream_twiml
        )
        self.provider.set_webhook_url(PUBLIC)

    def parse(self, params, query=""):
        context = ctx(params, query)
        verdict = self.provider.verify_webhook(context)
        self.assertTrue(verdict.ok, verdict.reason)
        return self.provider.parse_webhook(context, verdict.request_key)

    def test_resume_urls(self):
        """
        An outbound call's resume URL names our callId; an inbound call's, fetched before the call
        has our id, names it by the CallSid Twilio posts. Each carries a fresh nonce.
        """
        self.parse({"CallSid": "CA1", "CallStatus": "in-progress", "Direction": "outbound-api"}, "?callId=c1")
        self.parse({"CallSid": "CA1", "CallStatus": "in-progress", "Direction": "outbound-api"}, "?callId=c1")
        self.parse({"CallSid": "CA9", "Direction": "inbound", "CallStatus": "ringing"})
        (first, second, inbound) = [kwargs["resume_url"] for _, _, kwargs in self.calls]
        self.assertRegex(first, r"^https://voice\.example\.com/voice/webhook\?callId=c1&flow=resume&n=[0-9a-f]{12}$")
        self.assertNotEqual(first, second)
        self.assertRegex(inbound, r"^https://voice\.example\.com/voice/webhook\?flow=resume&n=[0-9a-f]{12}$")
        self.assertEqual([kwargs["resuming"] for _, _, kwargs in self.calls], [False, False, False])

    def test_the_resume_fetch(self):
        """
        The resume fetch asks for a stream as a resume, its answer closes its connection, and its
        event never creates a call (no direction).
        """
        parsed = self.parse({"CallSid": "CA9", "Direction": "inbound", "CallStatus": "in-progress"}, "?flow=resume&n=abc")
        [(sid, _, kwargs)] = self.calls
        self.assertEqual((sid, kwargs["resuming"]), ("CA9", True))
        self.assertEqual(parsed.response.headers.get("Connection"), "close")
        (event,) = parsed.events
        self.assertEqual((event.type, event.direction, event.provider_call_id), (EventType.ANSWERED, None, "CA9"))

    def test_resume_base_url(self):
        """`resume_base_url` (a cluster's entry URL) replaces this daemon's webhook URL in resume URLs only."""
        self.provider = TwilioProvider(
            http=None, clock=Clock(), account_sid="AC1", auth_token=TOKEN, public_url=PUBLIC,
            stream_twiml=lambda sid, direction, **kwargs: kwargs["resume_url"],
            resume_base_url="https://any.example.com/voice/webhook",
        )
        self.provider.set_webhook_url(PUBLIC)
        self.assertEqual(self.provider.resume_base_url(), "https://any.example.com/voice/webhook")
        body = self.parse({"CallSid": "CA1", "CallStatus": "in-progress", "Direction": "outbound-api"}, "?callId=c1").response.body
        self.assertTrue(body.startswith(b"https://any.example.com/voice/webhook?callId=c1&flow=resume&n="), body)
