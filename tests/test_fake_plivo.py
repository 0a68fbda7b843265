"""
Tests for voicecall.testing.plivo, the fake Plivo: its callback signer against the official
SDK, its REST API (auth, validation, errors, failure injection), and the carrier driver that
follows Plivo XML and posts signed callbacks.
"""
import json
import os
import sys
from urllib.parse import parse_qsl

from hypothesis import given, settings
from hypothesis import strategies as st
from plivo.utils import validate_signature, validate_v3_signature
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from voicecall.testing.plivo import FakePlivo, Scenario, sign_v2, sign_v3, v3_string

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
TOKEN = "MAXXXXXXXXXXXXXXXXXX_test_token"
API = "http://api.fake"
BASE = f"{API}/v1/Account/{AUTH_ID}"
APP = "http://app.example"
CALLEE = "+15005550001"


class App(Resource):
    """A small webhook server: answers each path with an XML string (or a callable's)."""

    isLeaf = True

    def __init__(self, routes=None):
        super().__init__()
        self.routes = routes or {}
        self.hits = []

    def render(self, request):
        request.content.seek(0)
        pairs = parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True)
        self.hits.append(
            {
                "method": request.method.decode(),
                "url": APP + request.uri.decode(),
                "path": request.path.decode(),
                "form": dict(pairs),
                "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            }
        )
        answer = self.routes.get(request.path.decode(), "<Response></Response>")
        if callable(answer):
            answer = answer(request)
        request.setHeader("content-type", "text/xml")
        return answer.encode("utf-8")

    def by_path(self, path):
        return [h for h in self.hits if h["path"] == path]


def create_body(**extra):
    body = {
        "from": "+15005550006",
        "to": CALLEE,
        "answer_url": APP + "/answer?callId=c1",
        "answer_method": "POST",
        "hangup_url": APP + "/hangup?callId=c1",
        "hangup_method": "POST",
    }
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


class SignatureTests(SynchronousTestCase):
    """The fake's own signer agrees with plivo.utils (the official SDK)."""

    def test_worked_examples(self):
        """PROVIDERS.md's V3 examples P1-P6 give the documented strings and signatures."""
        examples = [
            ("POST", "https://example.com/plivo/answer",
             {"CallUUID": "0fe7b2e4-1111-2222-3333-444455556666", "From": "14155550100", "To": "14155550199",
              "CallStatus": "in-progress", "Direction": "outbound", "Event": "StartApp"},
             "12345678901234567890",
             ("https://example.com/plivo/answer?CallStatusin-progressCallUUID0fe7b2e4-1111-2222-3333-444455556666"
             "DirectionoutboundEventStartAppFrom14155550100To14155550199"),
             "qhyZe6XbqEvy9xUbx8IRmJq1AYdU5VuPcpKj2tp9fu0="),
            ("POST", "https://example.com/plivo/answer?call=abc&b=2", {"CallUUID": "u-1", "To": "14155550199"}, "nonce1",
             "https://example.com/plivo/answer?b=2&call=abc.CallUUIDu-1To14155550199",
             "Lk09zGdPJXi0Gx7HBeZMvJSMpEuH0TXtUeWCVS8FiRE="),
            ("POST", "https://example.com/plivo/answer?call=abc", {}, "nonce2",
             "https://example.com/plivo/answer?call=abc", "2929wpmHEEbEQw6tQesIBLYPQEvj4+OJaoqvuw5zpgk="),
            ("POST", "https://example.com/plivo/answer", {}, "nonce3",
             "https://example.com/plivo/answer", "vuyOUmBSq+aCr1JfTn40ee1CVau9XAHf8JgF96chGMQ="),
            ("GET", "https://example.com/plivo/answer?CallUUID=u-3&From=1415&a=1", {}, "nonce4",
             "https://example.com/plivo/answer?CallUUID=u-3&From=1415&a=1",
             "/RzMkdQjkBzXtHgdv5A/hjZsvKwZMXhXKr+IToNTvro="),
            ("POST", "https://example.com/plivo/speech",
             {"Speech": "hello world", "SpeechConfidenceScore": "0.91", "InputType": "speech", "CallUUID": "u-7"},
             "nonce7",
             "https://example.com/plivo/speech?CallUUIDu-7InputTypespeechSpeechhello worldSpeechConfidenceScore0.91",
             "BFhrdQ+PScBtTGKvgvgy7Dqxl1fCAtm6rdVE731qMgE="),
        ]
        for method, url, params, nonce, string, signature in examples:
            self.assertEqual(v3_string(method, url, params.items()), string)
            self.assertEqual(sign_v3(TOKEN, method, url, params.items(), nonce), signature)
            self.assertTrue(validate_v3_signature(method, url, nonce, TOKEN, signature, dict(params)))

    def test_v2_example(self):
        """plivo-python's own V2 test vector is reproduced and the SDK accepts it."""
        signature = sign_v2("my_auth_token", "https://answer.url", "12345")
        self.assertEqual(signature, "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=")
        self.assertTrue(validate_signature("https://answer.url?ignored=1", "12345", signature, "my_auth_token"))

    @settings(max_examples=200, deadline=None)
    @given(
        path=st.text(alphabet="abcXYZ019/-_.~", max_size=20),
        query=st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=5), st.text(alphabet="abc 12-", max_size=8), max_size=3),
        params=st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=30), max_size=8),
        token=st.text(min_size=1, max_size=40),
        nonce=st.text(alphabet="0123456789", min_size=1, max_size=20),
    )
    def test_v3_accepted_by_sdk(self, path, query, params, token, nonce):
        """For any token, URL, query, body and nonce the SDK's validate_v3_signature accepts the fake's V3 signature."""
        url = "https://example.com/" + path
        if query:
            url += "?" + "&".join(f"{k}={v.replace(' ', '+')}" for k, v in query.items())
        signature = sign_v3(token, "POST", url, params.items(), nonce)
        self.assertTrue(validate_v3_signature("POST", url, nonce, token, signature, dict(params)))
        self.assertFalse(validate_v3_signature("POST", url, nonce, token + "x", signature, dict(params)))


class _ApiCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.app = App({"/answer": '<Response><Wait length="600" /></Response>'})
        self.fake = FakePlivo(
            self.clock, AUTH_ID, TOKEN, StubTreq(self.app), scenario=Scenario(ring_after=1, answer_after=2)
        )
        self.api = StubTreq(self.fake.resource())

    def request(self, method, url, auth=(AUTH_ID, TOKEN), json_body=None, data=None):
        d = self.api.request(method, url, auth=auth, json=json_body, data=data)
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, json.loads(body) if body else None

    def create(self, **kwargs):
        response, body = self.request("POST", f"{BASE}/Call/", json_body=create_body(**kwargs))
        self.assertEqual(response.code, 201, body)
        return self.fake.call_by_request(body["request_uuid"])

    def answered(self, **kwargs):
        call = self.create(**kwargs)
        self.clock.pump([0, 1, 2])
        self.assertEqual(call.status, "in-progress")
        return call


class RestTests(_ApiCase):
    """The REST API checks auth and validates like Plivo, and answers in Plivo's shapes."""

    def test_auth(self):
        """No credentials, a wrong token or another account's path get 401 with Plivo's error JSON."""
        for auth, url in [(None, BASE), ((AUTH_ID, "nope"), BASE), ((AUTH_ID, TOKEN), f"{API}/v1/Account/MAOTHER")]:
            response, body = self.request("POST", f"{url}/Call/", auth=auth, json_body=create_body())
            self.assertEqual(response.code, 401)
            self.assertEqual(body["error"], "Authentication failed")
            self.assertIn("api_id", body)
        self.assertEqual(self.fake.calls, {})

    def test_create(self):
        """A valid JSON create answers 201 `call fired` with a request_uuid and records the request."""
        response, body = self.request("POST", f"{BASE}/Call/", json_body=create_body(hangup_on_ring=30))
        self.assertEqual((response.code, body["message"]), (201, "call fired"))
        call = self.fake.call_by_request(body["request_uuid"])
        self.assertEqual((call.to, call.from_, call.direction, call.status), (CALLEE, "+15005550006", "outbound", "queued"))
        self.assertEqual(call.hangup_on_ring, 30)
        record = self.fake.requests[-1]
        self.assertEqual((record.method, record.path, record.content_type), ("POST", f"/v1/Account/{AUTH_ID}/Call/", "application/json"))
        self.assertEqual(record.get("answer_url"), APP + "/answer?callId=c1")

    def test_create_validation(self):
        """Missing or invalid parameters get 400 with an error naming them, and create nothing."""
        cases = [
            (create_body(to=None), "to parameter is required"),
            (create_body(answer_url=None), "answer_url parameter is required"),
            (create_body(to="555-CALL"), "invalid number: 555-CALL"),
            (create_body(hangup_url="ftp://x"), "hangup_url is not a valid URL"),
            (create_body(answer_method="PUT"), "method must be GET or POST"),
        ]
        for data, error in cases:
            response, body = self.request("POST", f"{BASE}/Call/", json_body=data)
            self.assertEqual((response.code, body["error"]), (400, error))
        self.assertEqual(self.fake.calls, {})

    def test_several_destinations(self):
        """`to` with `<` creates one call per destination and answers a list of request UUIDs."""
        response, body = self.request("POST", f"{BASE}/Call/", json_body=create_body(to="15005550001<sip:bob@example.com"))
        self.assertEqual(len(body["request_uuid"]), 2)
        self.assertEqual(len(self.fake.calls), 2)

    def test_paths_need_trailing_slash(self):
        """Plivo's paths end with `/`: without it the answer is 404."""
        self.assertEqual(self.request("POST", f"{BASE}/Call", json_body=create_body())[0].code, 404)

    def test_get_call(self):
        """GET /Call/{uuid}/ shows call_status as the call moves; an unknown uuid is 404."""
        call = self.create()
        self.assertEqual(self.request("GET", f"{BASE}/Call/{call.call_uuid}/")[1]["call_status"], "queued")
        self.clock.pump([0, 1, 2])
        response, body = self.request("GET", f"{BASE}/Call/{call.call_uuid}/")
        self.assertEqual((response.code, body["call_status"], body["call_uuid"]), (200, "in-progress", call.call_uuid))
        response, body = self.request("GET", f"{BASE}/Call/00000000-0000-0000-0000-000000000000/")
        self.assertEqual((response.code, body["error"]), (404, "not found"))

    def test_transfer(self):
        """POST /Call/{uuid}/ with legs=aleg answers 202 and makes the call fetch the new XML."""
        call = self.answered()
        self.app.routes["/next"] = "<Response><Speak>Moved</Speak><Wait length=\"60\" /></Response>"
        response, body = self.request(
            "POST", f"{BASE}/Call/{call.call_uuid}/", json_body={"legs": "aleg", "aleg_url": APP + "/next", "aleg_method": "POST"}
        )
        self.assertEqual((response.code, body["message"]), (202, "call transferred"))
        self.assertEqual(call.speak_texts, ["Moved"])
        self.assertEqual(call.transfers[-1], APP + "/next")

    def test_transfer_refused(self):
        """A transfer without legs/aleg_url is 400; of a call not in progress it is 404."""
        call = self.create()
        url = f"{BASE}/Call/{call.call_uuid}/"
        self.assertEqual(self.request("POST", url, json_body={"aleg_url": APP + "/next"})[0].code, 400)
        self.assertEqual(self.request("POST", url, json_body={"legs": "aleg"})[0].code, 400)
        response, body = self.request("POST", url, json_body={"legs": "aleg", "aleg_url": APP + "/next"})
        self.assertEqual((response.code, body["error"]), (404, "call not in progress"))

    def test_hangup(self):
        """DELETE /Call/{uuid}/ ends a live call with 204 and posts the hang-up URL; a second is 404."""
        call = self.answered()
        self.clock.advance(5)
        response, body = self.request("DELETE", f"{BASE}/Call/{call.call_uuid}/")
        self.assertEqual((response.code, body), (204, None))
        self.assertEqual(call.status, "completed")
        (hangup,) = self.app.by_path("/hangup")
        self.assertEqual(
            {k: hangup["form"][k] for k in ("Event", "CallStatus", "HangupCause", "HangupSource", "Duration", "CallUUID")},
            {"Event": "Hangup", "CallStatus": "completed", "HangupCause": "NORMAL_CLEARING", "HangupSource": "API",
             "Duration": "5", "CallUUID": call.call_uuid},
        )
        self.assertEqual(self.request("DELETE", f"{BASE}/Call/{call.call_uuid}/")[0].code, 404)

    def test_cancel_request(self):
        """DELETE /Request/{uuid}/ cancels a ringing call (204, status cancel); once answered it is 404."""
        call = self.create()
        self.clock.pump([0, 1])
        self.assertEqual(self.request("DELETE", f"{BASE}/Request/{call.request_uuid}/")[0].code, 204)
        self.assertEqual(call.status, "cancel")
        self.clock.advance(10)
        self.assertEqual(self.app.by_path("/answer"), [])
        other = self.answered()
        self.assertEqual(self.request("DELETE", f"{BASE}/Request/{other.request_uuid}/")[0].code, 404)

    def test_fail_next(self):
        """fail_next answers the next matching request with the given status and body, unprocessed."""
        self.fake.fail_next(400, {"api_id": "x", "error": "invalid to"})
        response, body = self.request("POST", f"{BASE}/Call/", json_body=create_body())
        self.assertEqual((response.code, body), (400, {"api_id": "x", "error": "invalid to"}))
        self.assertEqual(self.fake.calls, {})
        self.fake.fail_next(503, count=2, match=lambda r: r.method == "GET")
        self.assertEqual(self.request("POST", f"{BASE}/Call/", json_body=create_body())[0].code, 201)
        for _ in range(2):
            self.assertEqual(self.request("GET", f"{BASE}/Call/x/")[0].code, 503)
        self.assertEqual(self.request("GET", f"{BASE}/Call/x/")[0].code, 404)

    def test_hang_and_delay(self):
        """hang_next never answers (until abort_held); delay_next processes now and answers later."""
        self.fake.hang_next()
        hung = self.api.post(f"{BASE}/Call/", auth=(AUTH_ID, TOKEN), json=create_body())
        self.fake.delay_next(5)
        late = self.api.post(f"{BASE}/Call/", auth=(AUTH_ID, TOKEN), json=create_body())
        self.api.flush()
        self.assertNoResult(hung)
        self.assertNoResult(late)
        self.assertEqual(len(self.fake.calls), 1)
        self.clock.advance(5)
        self.api.flush()
        self.assertEqual(self.successResultOf(late).code, 201)
        self.fake.abort_held()
        self.api.flush()
        self.failureResultOf(hung)


class DriverTests(_ApiCase):
    """The driver follows Plivo XML served by the application and posts signed callbacks."""

    def test_answer_params_and_signature(self):
        """The answer URL gets Plivo's parameters, V3-signed with a fresh nonce the SDK accepts."""
        call = self.answered()
        call.hangup_by_callee()
        answer, hangup = self.app.by_path("/answer")[0], self.app.by_path("/hangup")[0]
        self.assertEqual(
            {k: answer["form"][k] for k in ("CallUUID", "RequestUUID", "From", "To", "Direction", "CallStatus", "Event")},
            {"CallUUID": call.call_uuid, "RequestUUID": call.request_uuid, "From": "+15005550006", "To": CALLEE,
             "Direction": "outbound", "CallStatus": "in-progress", "Event": "StartApp"},
        )
        nonces = set()
        for hit in (answer, hangup):
            headers = hit["headers"]
            nonces.add(headers["x-plivo-signature-v3-nonce"])
            self.assertTrue(validate_v3_signature(
                "POST", hit["url"], headers["x-plivo-signature-v3-nonce"], TOKEN, headers["x-plivo-signature-v3"], hit["form"]
            ))
            self.assertNotIn("x-plivo-signature-v2", headers)
        self.assertEqual(len(nonces), 2)

    def test_v2_signatures(self):
        """With signature="v2" callbacks carry only a V2 signature the SDK accepts."""
        self.fake = FakePlivo(self.clock, AUTH_ID, TOKEN, StubTreq(self.app), signature="v2")
        self.api = StubTreq(self.fake.resource())
        self.answered()
        (hit,) = self.app.by_path("/answer")
        headers = hit["headers"]
        self.assertNotIn("x-plivo-signature-v3", headers)
        self.assertTrue(validate_signature(hit["url"], headers["x-plivo-signature-v2-nonce"], headers["x-plivo-signature-v2"], TOKEN))

    def test_speak_getinput_redirect_hangup(self):
        """Speak, GetInput (speech posted to its action, whose XML drives the call), Redirect and Hangup run in order."""
        self.app.routes.update({
            "/answer": '<Response><Speak language="en-US">Hello &amp; welcome</Speak>'
                       '<GetInput inputType="speech" action="/speech?turnToken=t1" method="POST">'
                       '<Speak>Your name?</Speak></GetInput><Speak>never said</Speak></Response>',
            "/speech": "<Response><Speak>Thanks</Speak><Redirect>/next</Redirect><Speak>not either</Speak></Response>",
            "/next": "<Response><Hangup /><Speak>after hangup</Speak></Response>",
        })
        self.fake.set_scenario(CALLEE, Scenario(ring_after=1, answer_after=2, utterances=["I am Bob"], confidence="0.87"))
        call = self.create(hangup_url=None)
        self.clock.pump([0, 1, 2])
        self.assertEqual(call.speak_texts, ["Hello & welcome", "Your name?", "Thanks"])
        (speech,) = self.app.by_path("/speech")
        self.assertEqual(speech["url"], APP + "/speech?turnToken=t1")
        self.assertEqual(
            {k: speech["form"][k] for k in ("InputType", "Speech", "SpeechConfidenceScore")},
            {"InputType": "speech", "Speech": "I am Bob", "SpeechConfidenceScore": "0.87"},
        )
        self.assertEqual(call.inputs[-1].turn_token, "t1")
        self.assertEqual(len(self.app.by_path("/next")), 1)

    def test_getinput_without_redirect_goes_on(self):
        """With redirect="false" the result is posted and the document goes on; silence waits executionTimeout."""
        self.app.routes.update({
            "/answer": '<Response><GetInput inputType="speech" action="/speech" redirect="false" executionTimeout="10">'
                       '</GetInput><Speak>after</Speak><GetInput inputType="speech" action="/speech" executionTimeout="10">'
                       '</GetInput><Speak>end</Speak><Wait length="30" /></Response>',
        })
        self.fake.set_scenario(CALLEE, Scenario(ring_after=1, answer_after=2, utterances=["first", None]))
        call = self.create()
        self.clock.pump([0, 1, 2])
        self.assertEqual(call.speak_texts, ["after"])
        self.assertEqual([h["form"]["Speech"] for h in self.app.by_path("/speech")], ["first"])
        self.clock.advance(10)
        self.assertEqual(call.speak_texts, ["after", "end"])
        self.clock.advance(30)
        self.assertEqual(call.status, "completed")
        self.assertEqual(call.inputs[1].heard, None)

    def test_transfer_interrupts_wait(self):
        """A transfer stops the current Wait at once and runs the new document."""
        call = self.answered()
        self.app.routes["/next"] = "<Response><Speak>Now</Speak><Wait length=\"60\" /></Response>"
        call.transfer(APP + "/next")
        self.assertEqual(call.speak_texts, ["Now"])
        self.clock.advance(59)
        self.assertEqual(call.status, "in-progress")
        self.clock.advance(1)
        self.assertEqual(call.status, "completed")

    def test_outcomes(self):
        """busy, failed and no-answer (also an answer later than hangup_on_ring) end with that status and no answer fetch."""
        for scenario, extra, status in [
            (Scenario(outcome="busy", answer_after=1), {}, "busy"),
            (Scenario(outcome="failed"), {}, "failed"),
            (Scenario(outcome="no-answer"), {"hangup_on_ring": 5}, "no-answer"),
            (Scenario(answer_after=30), {"hangup_on_ring": 5}, "no-answer"),
        ]:
            self.fake.set_scenario(CALLEE, scenario)
            call = self.create(**extra)
            self.clock.pump([0, 1, 5, 30])
            self.assertEqual(call.status, status)
            self.assertEqual(self.app.by_path("/hangup")[-1]["form"]["CallStatus"], status)
        self.assertEqual(self.app.by_path("/answer"), [])

    def test_callee_hangs_up_and_end_of_document(self):
        """hangup_after ends the call as completed; a document that runs out hangs up too."""
        self.fake.set_scenario(CALLEE, Scenario(hangup_after=3))
        call = self.create()
        self.clock.pump([0, 0, 3])
        self.assertEqual((call.status, call.hangup_source), ("completed", "Callee"))
        self.app.routes["/answer"] = "<Response><Speak>Bye</Speak></Response>"
        self.fake.set_scenario(CALLEE, Scenario())
        call = self.create()
        self.clock.pump([0, 0])
        self.assertEqual((call.status, call.speak_texts), ("completed", ["Bye"]))

    def test_fetch_failure_hangs_up(self):
        """An answer URL that fails or serves invalid XML ends the call and records why."""
        self.app.routes["/answer"] = "<Response><Speak>"
        call = self.create()
        self.clock.pump([0, 1, 2])
        self.assertEqual(call.status, "completed")
        self.assertTrue(call.errors[-1].startswith("invalid XML"))

    def test_inbound(self):
        """An inbound call posts ringing/StartApp to the answer URL, is answered by the XML, and can be transferred."""
        self.app.routes["/in"] = "<Response><Wait length=\"300\" /></Response>"
        call = self.fake.place_inbound_call("+15551230000", "+15005550006", APP + "/in", hangup_url=APP + "/hangup")
        (hit,) = self.app.by_path("/in")
        self.assertEqual(
            {k: hit["form"][k] for k in ("Direction", "CallStatus", "Event", "From", "To")},
            {"Direction": "inbound", "CallStatus": "ringing", "Event": "StartApp", "From": "+15551230000", "To": "+15005550006"},
        )
        self.assertEqual(call.status, "in-progress")
        response, _ = self.request("POST", f"{BASE}/Call/{call.call_uuid}/", json_body={"legs": "aleg", "aleg_url": APP + "/answer"})
        self.assertEqual(response.code, 202)
        self.fake.hang_up_all()
        self.assertEqual(self.app.by_path("/hangup")[-1]["form"]["CallStatus"], "completed")


class _LineCatcher(ProcessProtocol):
    def __init__(self):
        self.first_line = Deferred()
        self.ended = Deferred()
        self.out = b""

    def outReceived(self, data):
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n")[0].decode())

    def processEnded(self, reason):
        if not self.first_line.called:
            self.first_line.errback(reason)
        self.ended.callback(None)


class MainTests(TestCase):
    """`python -m voicecall.testing.plivo` runs the fake standalone."""

    timeout = 30

    @defer.inlineCallbacks
    def test_standalone(self):
        """The entry point prints the base URL and serves the API there until stopped."""
        from twisted.internet import reactor

        proto = _LineCatcher()
        env = dict(os.environ, PLIVO_AUTH_TOKEN=TOKEN)
        process = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-m", "voicecall.testing.plivo", "--port", "0", "--auth-id", AUTH_ID, "--say", "yes"],
            env=env, path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        try:
            line = yield proto.first_line
            self.assertRegex(line, r"^plivo\.baseUrl: http://127\.0\.0\.1:\d+$")
            base = line.split(": ", 1)[1]
            http = HTTPClient(Agent(reactor, pool=pool))
            response = yield http.get(f"{base}/v1/Account/{AUTH_ID}/Call/nope/", auth=(AUTH_ID, TOKEN))
            body = yield response.json()
            self.assertEqual((response.code, body["error"]), (404, "not found"))
        finally:
            process.signalProcess("TERM")
            yield proto.ended
            yield pool.closeCachedConnections()
