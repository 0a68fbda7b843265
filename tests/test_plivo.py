"""
Unit tests for the Plivo adapter (SPEC §7.3, §9.4): webhook verification and parsing, the
Plivo XML it serves, and its REST calls and transfers against the fake Plivo through StubTreq.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode, urlsplit

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from voicecall.domain.model import CallRecord, Direction, EventType
from voicecall.providers import plivoxml
from voicecall.domain.carrier import ProviderError
from voicecall.providers.base import WebhookContext
from voicecall.providers.plivo import PlivoProvider
from voicecall.testing.plivo import FakePlivo, Scenario, signature_headers

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
TOKEN = "MAXXXXXXXXXXXXXXXXXX_test_token"
PUBLIC = "https://voice.example.com/voice/webhook"
ORIGIN = "https://voice.example.com"
API = "http://api.fake"
CALLEE = "+15550001234"
KEEP_ALIVE = '<Response><Wait length="300" /></Response>'


def ctx(params, query="", *, version="v3", signed_url=None, token=TOKEN, headers=None, body=None):
    """A webhook as the resource hands it over: signed by the fake's own signer over the public URL."""
    path_and_query = "/voice/webhook" + query
    hdrs = {"content-type": "application/x-www-form-urlencoded", "host": "127.0.0.1:3334"}
    signed = signature_headers(token, "POST", signed_url or ORIGIN + path_and_query, list(params.items()), version)
    hdrs.update({k.lower(): v for k, v in signed.items()})
    hdrs.update(headers or {})
    return WebhookContext(
        method="POST",
        path="/voice/webhook",
        path_and_query=path_and_query,
        query=dict(parse_qsl(query.lstrip("?"), keep_blank_values=True)),
        headers=hdrs,
        raw_body=urlencode(params).encode() if body is None else body,
        remote_ip="127.0.0.1",
        url="https://127.0.0.1" + path_and_query,
    )


def record(call_id="c1", pid=None) -> CallRecord:
    return CallRecord(
        call_id=call_id, provider="plivo", direction=Direction.OUTBOUND, state="answered",
        from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=pid,
    )


class WebhookTests(SynchronousTestCase):
    """Verification and parsing of Plivo callbacks."""

    def setUp(self):
        self.provider = PlivoProvider(http=None, clock=Clock(), auth_id=AUTH_ID, auth_token=TOKEN, public_url=PUBLIC)

    def parse(self, context):
        verdict = self.provider.verify_webhook(context)
        self.assertTrue(verdict.ok, verdict.reason)
        return self.provider.parse_webhook(context, verdict.request_key), verdict.request_key

    def test_answer_callback(self):
        """The answer callback is call.answered with our callId, the CallUUID as provider id, and a keep-alive answer."""
        params = {"CallUUID": "uuid-1", "RequestUUID": "req-1", "CallStatus": "in-progress", "Event": "StartApp",
                  "Direction": "outbound", "From": "+15550000000", "To": CALLEE}
        parsed, key = self.parse(ctx(params, "?provider=plivo&callId=c1&flow=answer"))
        (event,) = parsed.events
        self.assertEqual(
            (event.type, event.call_id, event.provider_call_id, event.direction, event.from_number, event.to_number),
            (EventType.ANSWERED, "c1", "uuid-1", Direction.OUTBOUND, "+15550000000", CALLEE),
        )
        body = parsed.response.body.decode()
        self.assertIn("<Wait", body)
        self.assertIn('length="300"', body)
        self.assertEqual(parsed.response.headers["Content-Type"], "text/xml")

    def test_dedupe_key_is_the_event_identity(self):
        """
        The event's id is the verified request key (`plivo:v3:` for a V3 signature), kept as an
        alias; its dedupe key is what a retry (signed with a fresh nonce) shares: its type on its call.
        """
        parsed, key = self.parse(ctx({"CallUUID": "uuid-1", "CallStatus": "ringing"}, "?callId=c1"))
        self.assertTrue(key.startswith("plivo:v3:"))
        event = parsed.events[0]
        self.assertEqual((event.dedupe_key, event.id, event.aliases), ("plivo:call.ringing:uuid-1", key, (key,)))

    def test_v2_replay_key_ignores_query(self):
        """A V2 request key covers the URL without its query: the same nonce on another query is the same request."""
        self.provider = PlivoProvider(
            http=None, clock=Clock(), auth_id=AUTH_ID, auth_token=TOKEN, public_url=PUBLIC, allow_v2_signatures=True
        )
        params = {"CallUUID": "uuid-1", "CallStatus": "ringing"}
        first = ctx(params, "?callId=c1", version="v2")
        nonce = first.headers["x-plivo-signature-v2-nonce"]
        second = ctx(params, "?callId=c2&flow=answer", version="v2",
                     headers={k: first.headers[k] for k in ("x-plivo-signature-v2", "x-plivo-signature-v2-nonce")})
        self.assertEqual(second.headers["x-plivo-signature-v2-nonce"], nonce)
        one, two = self.provider.verify_webhook(first), self.provider.verify_webhook(second)
        self.assertTrue(one.ok and two.ok)
        self.assertTrue(one.request_key.startswith("plivo:v2:"))
        self.assertEqual(one.request_key, two.request_key)

    def test_forged_requests_refused(self):
        """A tampered body, a signature over another host, a wrong token and no signature all fail verification."""
        params = {"CallUUID": "uuid-1", "CallStatus": "completed"}
        good = ctx(params, "?callId=c1")
        tampered = ctx({**params, "CallStatus": "busy"}, "?callId=c1", headers={
            k: good.headers[k] for k in ("x-plivo-signature-v3", "x-plivo-signature-v3-nonce")})
        other_host = ctx(params, "?callId=c1", signed_url="https://evil.example/voice/webhook?callId=c1")
        wrong_token = ctx(params, "?callId=c1", token="not-the-token")
        unsigned = ctx(params, "?callId=c1", version="none")
        reasons = [self.provider.verify_webhook(c).reason for c in (tampered, other_host, wrong_token, unsigned)]
        self.assertEqual(reasons, ["Invalid Plivo V3 signature"] * 3 + ["Missing Plivo signature headers (V3 or V2)"])

    def test_verified_against_request_url_without_public_url(self):
        """Without a public URL the reconstructed URL itself is verified."""
        provider = PlivoProvider(http=None, clock=Clock(), auth_id=AUTH_ID, auth_token=TOKEN)
        params = {"CallUUID": "uuid-1"}
        self.assertFalse(provider.verify_webhook(ctx(params, "?a=1")).ok)
        self.assertTrue(provider.verify_webhook(ctx(params, "?a=1", signed_url="https://127.0.0.1/voice/webhook?a=1")).ok)

    def test_signature_header_gate(self):
        """The pre-auth gate wants a V3 signature with its nonce; a V2 pair only when V2 is allowed."""
        gate = self.provider.has_signature_headers
        self.assertFalse(gate({"host": "x"}))
        self.assertFalse(gate({"x-plivo-signature-v3": "a"}))
        self.assertFalse(gate({"x-plivo-signature-v2-nonce": "1"}))
        self.assertTrue(gate({"x-plivo-signature-v3": "a", "x-plivo-signature-v3-nonce": "1"}))
        self.assertFalse(gate({"x-plivo-signature-v2": "a", "x-plivo-signature-v2-nonce": "1"}))
        allowing = PlivoProvider(http=None, clock=Clock(), auth_id=AUTH_ID, auth_token=TOKEN, allow_v2_signatures=True)
        self.assertTrue(allowing.has_signature_headers({"x-plivo-signature-v2": "a", "x-plivo-signature-v2-nonce": "1"}))

    def test_v2_only_refused_by_default(self):
        """A callback signed with V2 only is refused unless V2 is allowed, even when the V2 signature is right."""
        params = {"CallUUID": "uuid-1", "CallStatus": "completed", "Event": "Hangup"}
        v2_only = ctx(params, "?callId=c1&flow=hangup", version="v2")
        verdict = self.provider.verify_webhook(v2_only)
        self.assertFalse(verdict.ok)
        self.assertIn("plivo.allowV2Signatures", verdict.reason)
        allowing = PlivoProvider(
            http=None, clock=Clock(), auth_id=AUTH_ID, auth_token=TOKEN, public_url=PUBLIC, allow_v2_signatures=True
        )
        self.assertTrue(allowing.verify_webhook(v2_only).ok)

    def test_transcript_precedence(self):
        """The transcript is the first non-blank of Speech, Transcription, TranscriptionText, SpeechResult, RecognizedSpeech, Text."""
        fields = ["Speech", "Transcription", "TranscriptionText", "SpeechResult", "RecognizedSpeech", "Text"]
        for i, name in enumerate(fields):
            params = {"CallUUID": "uuid-1", "CallStatus": "in-progress"}
            params.update({f: " " for f in fields[:i]})
            params.update({f: f"from {f}" for f in fields[i:]})
            parsed, _ = self.parse(ctx(params, "?callId=c1&flow=getinput&turnToken=t1"))
            (event,) = parsed.events
            self.assertEqual((event.type, event.transcript, event.is_final, event.turn_token),
                             (EventType.SPEECH, f"from {name}", True, "t1"), name)

    def test_speech_confidence_and_digits(self):
        """SpeechConfidenceScore becomes the confidence (plain decimals only); Digits win as DTMF."""
        parsed, _ = self.parse(ctx({"CallUUID": "u", "Speech": " yes ", "SpeechConfidenceScore": "0.87"}, "?callId=c1&flow=getinput"))
        self.assertEqual((parsed.events[0].transcript, parsed.events[0].confidence), ("yes", 0.87))
        parsed, _ = self.parse(ctx({"CallUUID": "u", "Speech": "yes", "SpeechConfidenceScore": "nan"}, "?callId=c1&flow=getinput"))
        self.assertIsNone(parsed.events[0].confidence)
        parsed, _ = self.parse(ctx({"CallUUID": "u", "Speech": "yes", "Digits": "42"}, "?callId=c1&flow=getinput"))
        self.assertEqual((parsed.events[0].type, parsed.events[0].digits), (EventType.DTMF, "42"))

    def test_getinput_without_speech(self):
        """A GetInput result with nothing heard is no event (not a second answer) and gets the keep-alive."""
        parsed, _ = self.parse(ctx({"CallUUID": "u", "CallStatus": "in-progress", "Speech": ""}, "?callId=c1&flow=getinput"))
        self.assertEqual(parsed.events, ())
        self.assertEqual(parsed.response.body.decode(), KEEP_ALIVE)

    def test_status_mapping(self):
        """Hang-up statuses end the call with their reason; ringing is ringing; the hang-up answer is empty XML."""
        expected = {"completed": "completed", "busy": "busy", "no-answer": "no-answer", "failed": "failed",
                    "timeout": "no-answer", "cancel": "hangup-bot"}
        for status, reason in expected.items():
            parsed, _ = self.parse(ctx({"CallUUID": "u", "CallStatus": status, "Event": "Hangup"}, "?callId=c1&flow=hangup"))
            self.assertEqual((parsed.events[0].type, parsed.events[0].reason), (EventType.ENDED, reason), status)
            self.assertEqual(parsed.response.body.decode(), "<Response></Response>")
        parsed, _ = self.parse(ctx({"RequestUUID": "r", "CallStatus": "ringing"}, "?callId=c1"))
        self.assertEqual((parsed.events[0].type, parsed.events[0].provider_call_id), (EventType.RINGING, "r"))

    def test_inbound_answer(self):
        """An inbound answer-URL fetch (ringing, StartApp, no callId) is answered, keyed by CallUUID, and kept alive."""
        params = {"CallUUID": "in-1", "CallStatus": "ringing", "Event": "StartApp", "Direction": "inbound", "From": "+15551230000"}
        parsed, _ = self.parse(ctx(params))
        (event,) = parsed.events
        self.assertEqual((event.type, event.call_id, event.direction), (EventType.ANSWERED, "in-1", Direction.INBOUND))
        self.assertEqual(parsed.response.body.decode(), KEEP_ALIVE)

    def test_transfer_fetch_without_pending_document(self):
        """A transfer fetch with nothing pending (or a stale nonce) gets the keep-alive and makes no event."""
        parsed, _ = self.parse(ctx({"CallUUID": "u", "CallStatus": "in-progress"}, "?callId=c1&flow=xml-speak&n=abc"))
        self.assertEqual((parsed.events, parsed.response.body.decode()), ((), KEEP_ALIVE))

    def test_replays_use_cached_answer(self):
        """replay_response is None: the webhook resource answers a replay with the original's cached answer."""
        self.assertIsNone(self.provider.replay_response(ctx({"CallUUID": "u"})))


class XmlTests(SynchronousTestCase):
    """The pure Plivo XML builders."""

    def test_escaping(self):
        """Text and attributes are XML-escaped (& < > " ')."""
        doc = plivoxml.listen('https://x/w?a=1&b="2"', "en-<GB>", "Tom & Jerry's <tag>", "Polly.Amy")
        self.assertIn("Tom &amp; Jerry&apos;s &lt;tag&gt;", doc)
        self.assertIn('action="https://x/w?a=1&amp;b=&quot;2&quot;"', doc)
        self.assertIn('language="en-&lt;GB&gt;"', doc)
        self.assertEqual(plivoxml.speak("a < b", None), '<Response><Speak language="en-US">a &lt; b</Speak><Wait length="300" /></Response>')

    def test_listen_document(self):
        """The listen document nests the prompt in a speech GetInput that does not redirect, then keeps the call up."""
        self.assertEqual(
            plivoxml.listen("https://x/w", prompt="Name?", voice="alloy"),
            '<Response><GetInput inputType="speech" method="POST" action="https://x/w" language="en-US" '
            'executionTimeout="30" speechEndTimeout="2" redirect="false"><Speak language="en-US">Name?</Speak>'
            '</GetInput><Wait length="300" /></Response>',
        )
        self.assertIn("></GetInput>", plivoxml.listen("https://x/w"))

    def test_voices(self):
        """WOMAN, MAN and Polly voices are passed to Speak; other names are left out."""
        self.assertIn('voice="MAN"', plivoxml.speak("hi", None, "man"))
        self.assertIn('voice="Polly.Amy"', plivoxml.speak("hi", None, "Polly.Amy"))
        self.assertNotIn("voice=", plivoxml.speak("hi", None, "alloy"))


class Endpoint(Resource):
    """Our webhook in miniature: verifies and parses each callback with the provider, records events."""

    isLeaf = True

    def __init__(self, provider):
        super().__init__()
        self.provider = provider
        self.events = []
        self.refused = []

    def render_POST(self, request):
        request.content.seek(0)
        uri = request.uri.decode()
        context = WebhookContext(
            method="POST",
            path=request.path.decode(),
            path_and_query=uri,
            query=dict(parse_qsl(uri.partition("?")[2], keep_blank_values=True)),
            headers={k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            raw_body=request.content.read(),
            remote_ip="127.0.0.1",
            url="https://127.0.0.1" + uri,
        )
        verdict = self.provider.verify_webhook(context)
        if not verdict.ok:
            self.refused.append(verdict.reason)
            request.setResponseCode(401)
            return b""
        parsed = self.provider.parse_webhook(context, verdict.request_key)
        self.events.extend(parsed.events)
        for name, value in parsed.response.headers.items():
            request.setHeader(name, value)
        return parsed.response.body


class RestTests(SynchronousTestCase):
    """REST calls and transfers against the fake Plivo, whose callbacks reach the provider through `Endpoint`."""

    def setUp(self):
        self.clock = Clock()
        self.endpoint = Endpoint(None)
        self.fake = FakePlivo(self.clock, AUTH_ID, TOKEN, StubTreq(self.endpoint), scenario=Scenario(ring_after=1, answer_after=1))
        self.api = StubTreq(self.fake.resource())
        self.provider = PlivoProvider(
            http=self.api, clock=self.clock, auth_id=AUTH_ID, auth_token=TOKEN, base_url=API,
            public_url=PUBLIC, ring_timeout_sec=25,
        )
        self.endpoint.provider = self.provider

    def initiate(self, to=CALLEE, call_id="c1"):
        d = self.provider.initiate_call(call_id=call_id, from_number="+1 (555) 000-0000", to_number=to, webhook_url=PUBLIC)
        return self.successResultOf(d)

    def answered_call(self):
        placed = self.initiate()
        self.clock.pump([0, 1, 1])
        fake_call = self.fake.call_by_request(placed.provider_call_id)
        self.assertEqual(fake_call.status, "in-progress")
        answered = [e for e in self.endpoint.events if e.type is EventType.ANSWERED]
        self.assertEqual(len(answered), 1)
        return record("c1", answered[0].provider_call_id), fake_call

    def api_requests(self, method=None):
        return [r for r in self.fake.requests if method is None or r.method == method]

    def test_make_call(self):
        """Make-call posts JSON with stripped numbers, the answer/hang-up URLs and hangup_on_ring; the request UUID comes back."""
        placed = self.initiate(to="+1 555-000-1234")
        (create,) = self.api_requests("POST")
        self.assertEqual(create.path, f"/v1/Account/{AUTH_ID}/Call/")
        self.assertEqual(create.auth, (AUTH_ID, TOKEN))
        self.assertEqual(dict(create.body), {
            "from": "+15550000000", "to": "+15550001234",
            "answer_url": PUBLIC + "?provider=plivo&callId=c1&flow=answer", "answer_method": "POST",
            "hangup_url": PUBLIC + "?provider=plivo&callId=c1&flow=hangup", "hangup_method": "POST",
            "hangup_on_ring": 25,
        })
        self.assertEqual(self.fake.call_by_request(placed.provider_call_id).to, "+15550001234")
        self.assertFalse(placed.consumes_initial_message)

    def test_sip_destination_kept(self):
        """A sip: URI is passed on as it is."""
        self.initiate(to="sip:bob@example.com")
        self.assertEqual(self.api_requests("POST")[0].get("to"), "sip:bob@example.com")

    def test_request_uuid_shapes(self):
        """A list of request UUIDs gives the first; none at all is the SPEC error."""
        self.fake.fail_next(201, {"message": "call fired", "request_uuid": ["r-1", "r-2"]})
        self.assertEqual(self.initiate().provider_call_id, "r-1")
        self.fake.fail_next(201, {"message": "call fired"})
        failure = self.failureResultOf(self.provider.initiate_call(call_id="c2", from_number="+1555", to_number=CALLEE, webhook_url=PUBLIC))
        self.assertEqual(str(failure.value), "Plivo call create returned no request_uuid")

    def test_api_error_text(self):
        """A non-2xx answer fails with `Plivo API error: <status> <body>`."""
        body = {"api_id": "a1", "error": "invalid destination number"}
        self.fake.fail_next(400, body)
        failure = self.failureResultOf(self.provider.initiate_call(call_id="c1", from_number="+1555", to_number=CALLEE, webhook_url=PUBLIC))
        failure.trap(ProviderError)
        self.assertEqual(str(failure.value), "Plivo API error: 400 " + json.dumps(body))

    def test_answer_upgrades_to_call_uuid(self):
        """The answer callback names our callId and the CallUUID, which differs from the request UUID."""
        placed = self.initiate()
        self.clock.pump([0, 1, 1])
        fake_call = self.fake.call_by_request(placed.provider_call_id)
        (answered,) = [e for e in self.endpoint.events if e.type is EventType.ANSWERED]
        self.assertEqual((answered.call_id, answered.provider_call_id), ("c1", fake_call.call_uuid))
        self.assertNotEqual(fake_call.call_uuid, placed.provider_call_id)
        self.assertEqual(self.endpoint.refused, [])

    def test_speak_served_once(self):
        """speak transfers the A-leg to a nonce-carrying xml-speak URL whose fetch is served the Speak once."""
        call, fake_call = self.answered_call()
        self.successResultOf(self.provider.speak(call, "Hello & bye", None))
        (transfer,) = [r for r in self.api_requests("POST") if r.path.endswith(f"/Call/{fake_call.call_uuid}/")]
        self.assertEqual((transfer.get("legs"), transfer.get("aleg_method")), ("aleg", "POST"))
        url = transfer.get("aleg_url")
        query = dict(parse_qsl(urlsplit(url).query))
        self.assertEqual((query["flow"], query["callId"], query["provider"]), ("xml-speak", "c1", "plivo"))
        self.assertTrue(query["n"])
        self.assertEqual(fake_call.speak_texts, ["Hello & bye"])
        # speak resolved because Plivo followed the <Redirect> after <Speak> (flow=spoken, same
        # nonce), which is answered with the keep-alive.
        spoken = plivoxml.with_query(PUBLIC, provider="plivo", flow="spoken", callId="c1", n=query["n"])
        self.assertEqual(fake_call.documents[-2].body.decode(), plivoxml.speak("Hello & bye", spoken_url=spoken))
        self.assertEqual(fake_call.documents[-1].body.decode(), KEEP_ALIVE)
        fake_call.transfer(url)  # the same URL fetched again: nothing pending any more
        self.assertEqual(fake_call.documents[-1].body.decode(), KEEP_ALIVE)
        self.assertEqual(fake_call.speak_texts, ["Hello & bye"])

    def test_prompt_is_one_transfer_with_turn_token(self):
        """A prompt is one transfer; the GetInput speaks it and its result carries the turn token back as speech."""
        call, fake_call = self.answered_call()
        fake_call.scenario = Scenario(utterances=["It's Alice"])
        self.assertTrue(self.provider.wants_turn_token(call))
        self.successResultOf(self.provider.prompt(call, "Who is this?", None, "tok-1"))
        transfers = [r for r in self.api_requests("POST") if "aleg_url" in r.body]
        self.assertEqual(len(transfers), 1)
        self.assertEqual(fake_call.speak_texts, ["Who is this?"])
        (get_input,) = fake_call.inputs
        self.assertEqual(get_input.turn_token, "tok-1")
        self.assertIn("n=", get_input.action_url)
        (speech,) = [e for e in self.endpoint.events if e.type is EventType.SPEECH]
        self.assertEqual((speech.call_id, speech.transcript, speech.turn_token), ("c1", "It's Alice", "tok-1"))
        self.successResultOf(self.provider.stop_listening(call))

    def test_listen_after_speak_does_not_cut_it(self):
        """start_listening while the speak document is unfetched makes it speak-then-listen instead of a second transfer."""
        call, fake_call = self.answered_call()
        self.fake.hang_next(match=lambda r: "aleg_url" in r.body)  # Plivo has not fetched the document yet
        speaking = self.provider.speak(call, "Welcome", None)
        self.successResultOf(self.provider.start_listening(call, None))
        (transfer,) = [r for r in self.api_requests("POST") if "aleg_url" in r.body]
        fake_call.transfer(transfer.get("aleg_url"))
        self.assertEqual(fake_call.speak_texts, ["Welcome"])
        (get_input,) = fake_call.inputs
        self.assertIsNone(get_input.turn_token)
        self.fake.abort_held()
        self.api.flush()
        self.failureResultOf(speaking, ProviderError)

    def test_repeated_document_fetch_gets_the_same_document(self):
        """
        Plivo fetching a transfer's URL again (its retry, or a repeat that overtook the first) gets
        that transfer's document again, not the keep-alive: whichever answer Plivo follows still
        asks the question (chaos e2e, Plivo: the repeat won the race and the question was lost).
        """
        call, fake_call = self.answered_call()
        self.fake.hang_next(match=lambda r: "aleg_url" in r.body)  # Plivo fetches it by hand below
        asking = self.provider.prompt(call, "Is now a good time?", None, "tok-1")
        (transfer,) = [r for r in self.api_requests("POST") if "aleg_url" in r.body]
        query = "?" + transfer.get("aleg_url").partition("?")[2]
        params = {"CallUUID": fake_call.call_uuid, "CallStatus": "in-progress"}
        first, second = (WebhookTests.parse(self, ctx(params, query))[0].response.body.decode() for _ in range(2))
        self.assertIn("Is now a good time?", first)
        self.assertIn("turnToken=tok-1", first)
        self.assertEqual(second, first)
        # A newer transfer replaces it: the old URL is the keep-alive from then on.
        self.provider.start_listening(call, "tok-2")
        self.assertEqual(WebhookTests.parse(self, ctx(params, query))[0].response.body.decode(), KEEP_ALIVE)
        self.fake.abort_held()
        self.api.flush()
        self.failureResultOf(asking, ProviderError)

    def test_listen_transfers_when_nothing_pending(self):
        """start_listening with nothing pending transfers to xml-listen with a GetInput carrying the token."""
        call, fake_call = self.answered_call()
        self.successResultOf(self.provider.start_listening(call, "tok-2"))
        self.assertEqual(fake_call.speak_texts, [])
        self.assertEqual(fake_call.inputs[-1].turn_token, "tok-2")
        url = [r for r in self.api_requests("POST") if "aleg_url" in r.body][-1].get("aleg_url")
        self.assertIn("flow=xml-listen", url)

    def test_speak_needs_call_uuid_and_url(self):
        """Speaking on a call known only by its request UUID, or with no webhook URL at all, fails with the SPEC text."""
        placed = self.initiate()
        failure = self.failureResultOf(self.provider.speak(record("c1", placed.provider_call_id), "hi", None))
        self.assertEqual(str(failure.value), "Missing Plivo CallUUID for speak")
        failure = self.failureResultOf(self.provider.prompt(record("zz", "some-call-uuid"), "hi", None, "t"))
        self.assertEqual(str(failure.value), "Missing webhook URL for this call (provider state missing)")
        self.provider.set_webhook_url(PUBLIC)
        self.fake.fail_next(404, {"api_id": "x", "error": "not found"})
        failure = self.failureResultOf(self.provider.prompt(record("zz", "some-call-uuid"), "hi", None, "t"))
        self.assertEqual(str(failure.value), 'Plivo API error: 404 {"api_id": "x", "error": "not found"}')

    def test_hangup_by_call_uuid(self):
        """A call whose CallUUID is known is hung up with DELETE /Call/{CallUUID}/ and its hang-up ends it."""
        call, fake_call = self.answered_call()
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        (delete,) = self.api_requests("DELETE")
        self.assertEqual(delete.path, f"/v1/Account/{AUTH_ID}/Call/{fake_call.call_uuid}/")
        self.assertEqual(fake_call.status, "completed")
        ended = [e for e in self.endpoint.events if e.type is EventType.ENDED]
        self.assertEqual([(e.call_id, e.reason) for e in ended], [("c1", "completed")])

    def test_hangup_by_request_uuid(self):
        """A ringing call known by its request UUID: DELETE /Call/ is 404, then DELETE /Request/ cancels it."""
        placed = self.initiate()
        self.clock.advance(0)
        self.successResultOf(self.provider.hangup_call(record("c1", placed.provider_call_id), "hangup-bot"))
        paths = [r.path.split(AUTH_ID)[1] for r in self.api_requests("DELETE")]
        self.assertEqual(paths, [f"/Call/{placed.provider_call_id}/", f"/Request/{placed.provider_call_id}/"])
        self.assertEqual(self.fake.call_by_request(placed.provider_call_id).status, "cancel")
        self.successResultOf(self.provider.hangup_call(record("c1", placed.provider_call_id), "hangup-bot"))

    def test_hangup_error(self):
        """A hang-up the API refuses (not 404) fails."""
        call, _ = self.answered_call()
        self.fake.fail_next(500, b"boom")
        self.assertEqual(str(self.failureResultOf(self.provider.hangup_call(call, "x")).value), "Plivo API error: 500 boom")

    def test_status(self):
        """Status maps call_status; the terminal set is Plivo's; unknown is not-found; errors are unknown."""
        call, fake_call = self.answered_call()
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_terminal), ("in-progress", False))
        fake_call.hangup_by_callee()
        status = self.successResultOf(self.provider.get_call_status(call.provider_call_id))
        self.assertEqual((status.status, status.is_terminal), ("completed", True))
        status = self.successResultOf(self.provider.get_call_status("nope"))
        self.assertEqual((status.status, status.is_terminal), ("not-found", True))
        self.fake.fail_next(500)
        status = self.successResultOf(self.provider.get_call_status("x"))
        self.assertEqual((status.status, status.is_terminal, status.is_unknown), ("error", False, True))
