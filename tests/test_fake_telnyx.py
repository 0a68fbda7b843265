"""
Tests for voicecall.testing.telnyx, the fake Telnyx: its webhook signer against the official
SDK, its REST API (auth, validation, Telnyx error bodies, failure injection, command ids), and the
driver that plays each call and posts signed webhooks in order.
"""
from __future__ import annotations

import base64
import json
from contextlib import nullcontext
import os
import re
import sys
import uuid
from unittest import mock

from telnyx.lib import webhook_verification as telnyx_webhooks
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from voicecall.testing.telnyx import FakeTelnyx, Scenario, Signer, envelope

API = "http://api.fake"
APP = "http://app.example"
KEY = "KEY_fake_0123456789"
CONNECTION = "conn-42"
OURS = "+15005550006"
CALLEE = "+15005550001"
STATE = base64.b64encode(b"call-1").decode()
CALL_CONTROL_ID = re.compile(r"^v3:[A-Za-z0-9_-]{32}$")

RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
DOC_KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
DOC_BODY = (
    b'{"data":{"event_type":"call.answered","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",'
    b'"occurred_at":"2023-11-14T22:13:20.000000Z","payload":{"call_control_id":"v3:abc",'
    b'"call_leg_id":"leg-1","call_session_id":"sess-1","client_state":"eyJjYWxsX2lkIjoiYWJjMTIzIn0=",'
    b'"connection_id":"1234567890","from":"+15005550006","state":"answered","to":"+15005550001"},'
    b'"record_type":"event"},"meta":{"attempt":1,"delivered_to":"https://example.com/telnyx/webhook"}}'
)
DOC_SIGNATURE = "+bbIpNQRFABXruo3KmzIj91ldrKYu3Uwxb+fmcaXIYr6NgbobwfDaE2JG0yolRaHkQlx5McS+GZUVNUIOCfLAQ=="


def sdk_accepts(body: bytes, headers: dict, key: str, now: float | None = None) -> bool:
    """Whether Telnyx's SDK accepts the webhook (at wall-clock time `now`, if given)."""
    patch = mock.patch.object(telnyx_webhooks.time, "time", return_value=now) if now is not None else nullcontext()
    with patch:
        try:
            telnyx_webhooks.verify_webhook_signature(body, headers, key)
        except telnyx_webhooks.WebhookVerificationError:
            return False
    return True


class App(Resource):
    """A webhook receiver: records each request and answers 200 OK (or holds it when asked)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hits = []
        self.hold = False
        self.held = []

    def render(self, request):
        request.content.seek(0)
        raw = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.hits.append({"url": APP + request.uri.decode(), "headers": headers, "raw": raw, "json": json.loads(raw)})
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"OK"

    @property
    def events(self):
        return [h["json"]["data"]["event_type"] for h in self.hits]

    def payloads(self, event_type):
        return [h["json"]["data"]["payload"] for h in self.hits if h["json"]["data"]["event_type"] == event_type]


def dial_body(**overrides):
    body = {"connection_id": CONNECTION, "to": CALLEE, "from": OURS, "webhook_url": APP + "/hook",
            "webhook_url_method": "POST", "client_state": STATE, "timeout_secs": 30}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


class SignerTests(SynchronousTestCase):
    """The fake signs as Telnyx does; the official SDK is the oracle."""

    def test_documented_example(self):
        """With the RFC 8032 seed, the key and signature of PROVIDERS.md §7 come out."""
        signer = Signer.from_seed(RFC8032_SEED)
        self.assertEqual(signer.public_key, DOC_KEY)
        self.assertEqual(signer.sign(DOC_BODY, 1700000000), DOC_SIGNATURE)

    def test_sdk_accepts_fake_signature(self):
        """Telnyx's SDK accepts what the fake signs, within 300 s, and refuses tampering and other keys."""
        signer = Signer.generate()
        body = envelope("call.answered", {"call_control_id": "v3:x"}, occurred_at="2023-11-14T22:13:20.000000Z")
        headers = signer.headers(body, 1700000000)
        self.assertEqual(set(headers), {"telnyx-signature-ed25519", "telnyx-timestamp"})
        self.assertTrue(sdk_accepts(body, headers, signer.public_key, now=1700000000))
        self.assertTrue(sdk_accepts(body, headers, signer.public_key, now=1700000300))
        self.assertFalse(sdk_accepts(body, headers, signer.public_key, now=1700000301))
        self.assertFalse(sdk_accepts(body + b" ", headers, signer.public_key, now=1700000000))
        self.assertFalse(sdk_accepts(body, headers, Signer.generate().public_key, now=1700000000))

    def test_sdk_accepts_delivered_webhooks(self):
        """Every webhook the driver sends verifies with the SDK, headers as sent."""
        clock = Clock()
        clock.advance(1700000000)
        app = App()
        fake = FakeTelnyx(clock, KEY, StubTreq(app))
        fake.place_inbound_call(CALLEE, OURS, APP + "/hook")
        clock.advance(0)
        (hit,) = app.hits
        self.assertEqual(hit["headers"]["telnyx-timestamp"], "1700000000")
        self.assertTrue(sdk_accepts(hit["raw"], hit["headers"], fake.public_key, now=1700000000))


class _ApiCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.app = App()
        self.hooks = StubTreq(self.app)
        self.fake = FakeTelnyx(self.clock, KEY, self.hooks, connection_id=CONNECTION)
        self.api = StubTreq(self.fake.resource())

    def request(self, method, path, body=None, key=KEY, raw=None):
        headers = {"Authorization": [f"Bearer {key}"]} if key else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = ["application/json"]
        response = self.successResultOf(self.api.request(method, API + path, data=data, headers=headers))
        content = self.successResultOf(response.content())
        return response.code, json.loads(content) if content else None

    def assertError(self, result, status, code, pointer=None):
        got_status, body = result
        self.assertEqual(got_status, status, body)
        (error,) = body["errors"]
        self.assertEqual(error["code"], code)
        self.assertTrue(error["title"] and error["detail"])
        if pointer is not None:
            self.assertEqual(error["source"], {"pointer": pointer})

    def dial(self, **overrides):
        status, body = self.request("POST", "/v2/calls", dial_body(**overrides))
        self.assertEqual(status, 200, body)
        return self.fake.calls[body["data"]["call_control_id"]]

    def command(self, call, action, body=None):
        return self.request("POST", f"/v2/calls/{call.call_control_id}/actions/{action}", body if body is not None else {})

    def answered(self, **overrides):
        call = self.dial(**overrides)
        self.clock.advance(0)
        self.assertTrue(call.is_answered)
        return call


class RestAuthTests(_ApiCase):
    """The fake checks the Bearer API key like Telnyx."""

    def test_no_key(self):
        """A request without a key gets 401 with Telnyx's 10009 error and creates nothing."""
        self.assertError(self.request("POST", "/v2/calls", dial_body(), key=None), 401, "10009")
        self.assertEqual(self.fake.calls, {})

    def test_wrong_key(self):
        """A wrong key, or Basic auth, gets 401."""
        self.assertError(self.request("POST", "/v2/calls", dial_body(), key="nope"), 401, "10009")
        response = self.successResultOf(self.api.post(API + "/v2/calls", json=dial_body(), auth=(KEY, KEY)))
        self.assertEqual(response.code, 401)

    def test_requests_recorded(self):
        """Every request is recorded with its method, path, body and token."""
        self.request("POST", "/v2/calls", dial_body(), key="nope")
        record = self.fake.requests[-1]
        self.assertEqual((record.method, record.path, record.token, record.json["to"]), ("POST", "/v2/calls", "nope", CALLEE))


class RestDialTests(_ApiCase):
    """POST /v2/calls validates like Telnyx and answers with the call."""

    def test_dialled(self):
        """A valid dial answers 200 with the call's ids, not yet alive."""
        status, body = self.request("POST", "/v2/calls", dial_body())
        data = body["data"]
        self.assertEqual(status, 200)
        self.assertRegex(data["call_control_id"], CALL_CONTROL_ID)
        self.assertEqual((data["record_type"], data["is_alive"], data["client_state"]), ("call", False, STATE))
        uuid.UUID(data["call_leg_id"])
        uuid.UUID(data["call_session_id"])
        call = self.fake.calls[data["call_control_id"]]
        self.assertEqual((call.direction, call.from_, call.to, call.webhook_url), ("outgoing", OURS, CALLEE, APP + "/hook"))

    def test_missing_parameters(self):
        """connection_id, to and from are required (10004, with a source pointer)."""
        for name in ("connection_id", "to", "from"):
            self.assertError(self.request("POST", "/v2/calls", dial_body(**{name: None})), 422, "10004", "/" + name)
        self.assertEqual(self.fake.calls, {})

    def test_invalid_values(self):
        """Unknown application, non-E.164 numbers, bad URLs, client_state and timeouts are refused."""
        cases = [
            (dict(connection_id="other"), "10017", "/connection_id"),
            (dict(to="5550001"), "10016", "/to"),
            (dict(**{"from": "+0123"}), "10016", "/from"),
            (dict(webhook_url="ftp://x/"), "10003", "/webhook_url"),
            (dict(webhook_url_method="PUT"), "10015", "/webhook_url_method"),
            (dict(client_state="not base64!"), "10015", "/client_state"),
            (dict(timeout_secs=4), "10015", "/timeout_secs"),
            (dict(timeout_secs="30"), "10015", "/timeout_secs"),
            (dict(to=7), "10015", "/to"),
        ]
        for overrides, code, pointer in cases:
            self.assertError(self.request("POST", "/v2/calls", dial_body(**overrides)), 422, code, pointer)
        self.assertEqual(self.fake.calls, {})

    def test_sip_uri_callee(self):
        """A SIP URI may be dialled."""
        self.assertEqual(self.dial(to="sip:alice@example.com").to, "sip:alice@example.com")

    def test_bad_json(self):
        """Invalid JSON is a 400 (10023); a body that is not an object is a 400 too."""
        self.assertError(self.request("POST", "/v2/calls", raw=b"{nope"), 400, "10023")
        self.assertError(self.request("POST", "/v2/calls", raw=b"[1]"), 400, "10015")

    def test_unknown_paths_and_methods(self):
        """Unknown paths are 404 (10005); GET on /v2/calls is 405."""
        self.assertError(self.request("GET", "/v2/numbers"), 404, "10005")
        self.assertEqual(self.request("GET", "/v2/calls")[0], 405)

    def test_calls_are_bounded(self):
        """Past max_calls the oldest ended call is forgotten; with all calls live, dials get 429."""
        self.fake.max_calls = 2
        first = self.dial()
        self.dial()
        self.assertError(self.request("POST", "/v2/calls", dial_body()), 429, "10011")
        first.hangup_by_callee()
        third = self.dial()
        self.assertEqual(len(self.fake.calls), 2)
        self.assertNotIn(first.call_control_id, self.fake.calls)
        self.assertIn(third.call_control_id, self.fake.calls)


class RestCallTests(_ApiCase):
    """Commands and status on a call, like Telnyx."""

    def test_status(self):
        """GET shows the call; after the hang-up it is no longer alive and has an end time."""
        call = self.answered()
        status, body = self.request("GET", f"/v2/calls/{call.call_control_id}")
        self.assertEqual((status, body["data"]["is_alive"], body["data"]["call_control_id"]), (200, True, call.call_control_id))
        self.clock.advance(7)
        self.command(call, "hangup")
        self.clock.advance(0)
        data = self.request("GET", f"/v2/calls/{call.call_control_id}")[1]["data"]
        self.assertEqual((data["is_alive"], data["call_duration"]), (False, 7))
        self.assertIn("end_time", data)

    def test_unknown_call_and_action(self):
        """An unknown call or action is 404 (10005)."""
        self.assertError(self.request("GET", "/v2/calls/v3:nope"), 404, "10005")
        self.assertError(self.request("POST", "/v2/calls/v3:nope/actions/hangup", {}), 404, "10005")
        call = self.dial()
        self.assertError(self.command(call, "dance"), 404, "10005")

    def test_command_on_ended_call(self):
        """Any command on a call that ended is 422 with 90018."""
        call = self.answered()
        call.hangup_by_callee()
        for action in ("hangup", "speak", "transcription_stop"):
            self.assertError(self.command(call, action, {"payload": "x", "voice": "female"}), 422, "90018")

    def test_speak_validation(self):
        """speak needs a payload (at most 3000 characters) and a Telnyx voice."""
        call = self.answered()
        self.assertError(self.command(call, "speak", {"voice": "female"}), 422, "10004", "/payload")
        self.assertError(self.command(call, "speak", {"payload": "x"}), 422, "10004", "/voice")
        self.assertError(self.command(call, "speak", {"payload": "x", "voice": "alloy"}), 422, "10015", "/voice")
        self.assertError(self.command(call, "speak", {"payload": "x" * 3001, "voice": "male"}), 422, "10015", "/payload")
        self.assertError(self.command(call, "speak", {"payload": "x", "voice": "male", "language": "english"}), 422, "10015", "/language")
        self.assertEqual(self.command(call, "speak", {"payload": "x", "voice": "Telnyx.KokoroTTS.af"}), (200, {"data": {"result": "ok"}}))
        self.assertEqual(call.speak_texts, ["x"])

    def test_transcription_validation(self):
        """transcription_start checks the engine and tracks."""
        call = self.answered()
        self.assertError(self.command(call, "transcription_start", {"transcription_engine": "Whisperer"}), 422, "10015")
        self.assertError(self.command(call, "transcription_start", {"transcription_tracks": "left"}), 422, "10015")
        self.assertFalse(call.transcribing)
        self.assertEqual(self.command(call, "transcription_start", {"language": "en", "transcription_engine": "A"})[0], 200)
        self.assertTrue(call.transcribing)

    def test_media_commands_need_an_answered_call(self):
        """speak and transcription are refused before the answer; answer is for parked inbound calls only."""
        call = self.dial(timeout_secs=5)
        self.assertError(self.command(call, "speak", {"payload": "x", "voice": "female"}), 422, "10015")
        self.assertError(self.command(call, "transcription_start"), 422, "10015")
        self.assertError(self.command(call, "answer"), 422, "10015")

    def test_command_id_deduplicates(self):
        """A repeated command_id on the same call is acknowledged and ignored."""
        call = self.answered()
        body = {"payload": "once", "voice": "female", "command_id": "c-1"}
        self.assertEqual(self.command(call, "speak", body)[0], 200)
        self.assertEqual(self.command(call, "speak", body)[0], 200)
        self.assertEqual(call.speak_texts, ["once"])

    def test_client_state_on_a_command(self):
        """A command's client_state is echoed in the call's later webhooks."""
        call = self.answered()
        other = base64.b64encode(b"other").decode()
        self.command(call, "speak", {"payload": "x", "voice": "female", "client_state": other})
        self.clock.advance(0)
        self.assertEqual(self.app.payloads("call.speak.ended")[-1]["client_state"], other)
        self.assertError(self.command(call, "speak", {"payload": "x", "voice": "female", "client_state": "%%"}), 422, "10015")

    def sdk_request(self, call_control_id, client_state):
        """The request the official SDK sends for `calls.actions.update_client_state`."""
        import httpx
        import telnyx

        sent = []

        def handler(request):
            sent.append(request)
            return httpx.Response(200, json={"data": {"result": "ok"}})

        client = telnyx.Telnyx(api_key=KEY, base_url="https://api.telnyx.com/v2",
                               http_client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=0)
        client.calls.actions.update_client_state(call_control_id, client_state=client_state)
        (request,) = sent
        return request.method, request.url.path, json.loads(request.content)

    def test_client_state_update(self):
        """
        `client_state_update`, sent as the official SDK sends it (PUT, body {"client_state"}),
        replaces the call's client_state: every webhook sent later carries it, one the carrier
        had already sent keeps the state it was sent with. A POST, or no client_state, is refused.
        """
        self.fake.scenario = Scenario(utterances=["first", "second"], speech_delay=1)
        call = self.answered()
        first = base64.b64encode(b'{"c":"call-1","t":"turn-1"}').decode()
        self.command(call, "transcription_start", {"transcription_engine": "Google", "client_state": first})
        self.clock.advance(0)
        self.clock.advance(1)
        method, path, body = self.sdk_request(call.call_control_id, base64.b64encode(b"call-1").decode())
        self.assertEqual((method, path, set(body)), ("PUT", f"/v2/calls/{call.call_control_id}/actions/client_state_update", {"client_state"}))
        self.assertEqual(self.request(method, path, body), (200, {"data": {"result": "ok"}}))
        self.assertEqual(call.client_state, body["client_state"])
        self.command(call, "speak", {"payload": "and?", "voice": "female"})  # no client_state: it stays
        self.clock.advance(0)
        self.clock.advance(1)
        states = [p["client_state"] for p in self.app.payloads("call.transcription")]
        self.assertEqual(states, [first, body["client_state"]])
        self.assertEqual(self.app.payloads("call.speak.ended")[-1]["client_state"], body["client_state"])
        self.assertEqual(self.command(call, "client_state_update", body)[0], 405)
        self.assertError(self.request("PUT", path, {}), 422, "10004", "/client_state")
        self.assertError(self.request("PUT", path, {"client_state": "%%"}), 422, "10015")
        self.assertEqual(call.client_state, body["client_state"])


class FailureInjectionTests(_ApiCase):
    """Tests can make the next requests fail, hang or answer late."""

    def test_fail_next(self):
        """fail_next answers with the given status and Telnyx-shaped default body, unprocessed, once."""
        self.fake.fail_next(503)
        self.assertError(self.request("POST", "/v2/calls", dial_body()), 503, "10007")
        self.assertEqual(self.fake.calls, {})
        self.dial()

    def test_fail_next_match_and_raw_body(self):
        """A matching fault only hits matching requests; raw bytes are sent as they are."""
        self.fake.fail_next(500, b"boom", match=lambda r: r.path.endswith("/speak"), count=2)
        call = self.answered()
        response = self.successResultOf(self.api.post(
            API + f"/v2/calls/{call.call_control_id}/actions/speak", json={"payload": "x", "voice": "female"},
            headers={"Authorization": [f"Bearer {KEY}"]}))
        self.assertEqual((response.code, self.successResultOf(response.content())), (500, b"boom"))

    def test_hang_next(self):
        """A hung request is never answered nor processed, until aborted."""
        self.fake.hang_next()
        d = self.api.post(API + "/v2/calls", json=dial_body(), headers={"Authorization": [f"Bearer {KEY}"]})
        self.assertNoResult(d)
        self.assertEqual(self.fake.calls, {})
        self.fake.abort_held()
        self.api.flush()
        self.failureResultOf(d)

    def test_delay_next(self):
        """A delayed request is processed at once and answered later."""
        self.fake.delay_next(5)
        d = self.api.post(API + "/v2/calls", json=dial_body(), headers={"Authorization": [f"Bearer {KEY}"]})
        self.assertNoResult(d)
        self.assertEqual(len(self.fake.calls), 1)
        self.clock.advance(5)
        self.api.flush()
        self.assertEqual(self.successResultOf(d).code, 200)


class DriverTests(_ApiCase):
    """The driver plays Telnyx's part and posts signed webhooks in the PROVIDERS.md shapes."""

    def test_outbound_answered(self):
        """A dial posts call.initiated then call.answered, signed, in the Telnyx envelope."""
        self.fake.set_scenario(CALLEE, Scenario(answer_after=3))
        call = self.dial()
        self.assertEqual(self.app.hits, [])  # nothing before the dial was answered
        self.clock.advance(0)
        self.assertEqual(self.app.events, ["call.initiated"])
        self.clock.advance(3)
        self.assertEqual(self.app.events, ["call.initiated", "call.answered"])
        hit = self.app.hits[1]
        data = hit["json"]["data"]
        self.assertEqual((data["record_type"], data["event_type"]), ("event", "call.answered"))
        uuid.UUID(data["id"])
        self.assertRegex(data["occurred_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertEqual(hit["json"]["meta"], {"attempt": 1, "delivered_to": APP + "/hook"})
        payload = data["payload"]
        self.assertEqual(
            {k: payload[k] for k in ("call_control_id", "client_state", "connection_id", "from", "to", "direction", "state")},
            {"call_control_id": call.call_control_id, "client_state": STATE, "connection_id": CONNECTION,
             "from": OURS, "to": CALLEE, "direction": "outgoing", "state": "answered"},
        )
        self.assertEqual(self.app.payloads("call.initiated")[0]["state"], "bridging")
        self.assertEqual(hit["headers"]["telnyx-timestamp"], "1700000003")
        self.assertTrue(sdk_accepts(hit["raw"], hit["headers"], self.fake.public_key, now=1700000003))
        self.assertEqual(hit["headers"]["content-type"], "application/json")

    def test_busy_and_no_answer(self):
        """Busy hangs up with user_busy; no answer (or a late one) with timeout at timeout_secs."""
        self.fake.set_scenario(CALLEE, Scenario(outcome="busy", answer_after=2))
        busy = self.dial()
        self.clock.advance(0)
        self.clock.advance(2)
        self.assertEqual((busy.hangup_cause, busy.hangup_source), ("user_busy", "callee"))
        self.fake.set_scenario(CALLEE, Scenario(outcome="no-answer"))
        silent = self.dial(timeout_secs=10)
        self.fake.set_scenario(CALLEE, Scenario(answer_after=20))
        late = self.dial(timeout_secs=10)
        self.clock.advance(0)
        self.clock.advance(9)
        self.assertTrue(silent.is_alive and late.is_alive)
        self.clock.advance(1)
        self.assertEqual((silent.hangup_cause, late.hangup_cause), ("timeout", "timeout"))
        self.assertEqual(self.app.events.count("call.answered"), 0)
        self.assertEqual([p["hangup_cause"] for p in self.app.payloads("call.hangup")], ["user_busy", "timeout", "timeout"])

    def test_speak_events(self):
        """speak posts speak.started, then speak.ended after its speaking time; speaks queue."""
        self.fake.scenario = Scenario(say_seconds_per_char=0.5)
        call = self.answered()
        self.command(call, "speak", {"payload": "abcd", "voice": "female", "language": "en-US"})
        self.command(call, "speak", {"payload": "ef", "voice": "female"})
        self.clock.advance(0)
        self.assertEqual(self.app.events[-1], "call.speak.started")
        self.clock.advance(2)
        self.assertEqual(self.app.events[-2:], ["call.speak.ended", "call.speak.started"])
        self.clock.advance(1)
        self.assertEqual(self.app.events[-1], "call.speak.ended")
        self.assertEqual(self.app.payloads("call.speak.ended")[0]["status"], "completed")
        self.assertEqual([(s.text, s.voice, s.language) for s in call.speaks], [("abcd", "female", "en-US"), ("ef", "female", None)])

    def test_transcription_turns(self):
        """The person speaks when transcription starts and after each speak while transcribing."""
        self.fake.scenario = Scenario(utterances=["hello", None, "it's me"], speech_delay=1)
        call = self.answered()
        self.command(call, "transcription_start", {"transcription_engine": "Google"})
        self.clock.advance(0)
        self.assertNotIn("call.transcription", self.app.events)
        self.clock.advance(1)
        self.assertEqual(len(self.app.payloads("call.transcription")), 1)
        (result,) = self.app.payloads("call.transcription")
        self.assertEqual(result["transcription_data"], {"transcript": "hello", "confidence": 0.97, "is_final": True, "transcription_track": "inbound"})
        for text in ("silence follows", "who is it?"):
            self.command(call, "speak", {"payload": text, "voice": "female"})
            self.clock.advance(0)
            self.clock.advance(1)
        self.assertEqual([p["transcription_data"]["transcript"] for p in self.app.payloads("call.transcription")], ["hello", "it's me"])
        self.assertEqual(list(call.said), ["hello", "it's me"])

    def test_no_turn_without_transcription(self):
        """Speech ending while nobody transcribes is not a turn; stopping cancels a pending utterance."""
        self.fake.scenario = Scenario(utterances=lambda call: "answer to " + (call.last_speak or "nothing"), speech_delay=2)
        call = self.answered()
        self.command(call, "speak", {"payload": "greeting", "voice": "female"})
        self.clock.advance(0)
        self.clock.advance(5)
        self.assertEqual(self.app.payloads("call.transcription"), [])
        self.command(call, "transcription_start")
        self.clock.advance(0)
        self.clock.advance(1)
        self.command(call, "transcription_stop")
        self.clock.advance(5)
        self.assertEqual(self.app.payloads("call.transcription"), [])
        self.command(call, "transcription_start")
        self.clock.advance(0)
        self.clock.advance(2)
        self.assertEqual(self.app.payloads("call.transcription")[0]["transcription_data"]["transcript"], "answer to greeting")

    def test_interim_results(self):
        """With interim results the person's words come partially first, then final."""
        self.fake.scenario = Scenario(utterances=["one two three four"], speech_delay=2, interim_results=True)
        call = self.answered()
        self.command(call, "transcription_start")
        self.clock.advance(0)
        self.clock.advance(2)
        results = [p["transcription_data"] for p in self.app.payloads("call.transcription")]
        self.assertEqual([(r["transcript"], r["is_final"]) for r in results], [("one two", False), ("one two three four", True)])

    def test_hangups(self):
        """A REST hang-up ends with normal_clearing (caller), cutting speech; before the answer it is originator_cancel."""
        self.fake.scenario = Scenario(say_seconds_per_char=1)
        call = self.answered()
        self.command(call, "speak", {"payload": "a long sentence", "voice": "female"})
        self.command(call, "hangup")
        self.clock.advance(0)
        self.assertEqual(self.app.events[-2:], ["call.speak.ended", "call.hangup"])
        self.assertEqual(self.app.payloads("call.speak.ended")[-1]["status"], "call_hangup")
        hangup = self.app.payloads("call.hangup")[-1]
        self.assertEqual((hangup["hangup_cause"], hangup["hangup_source"], hangup["state"]), ("normal_clearing", "caller", "hangup"))
        self.fake.scenario = Scenario(answer_after=10)
        ringing = self.dial()
        self.command(ringing, "hangup")
        self.clock.advance(0)
        self.assertEqual(ringing.hangup_cause, "originator_cancel")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callee_hangs_up(self):
        """hangup_after ends the call as the callee, with normal_clearing."""
        self.fake.scenario = Scenario(hangup_after=4)
        call = self.answered()
        self.clock.advance(4)
        self.assertEqual((call.hangup_cause, call.hangup_source), ("normal_clearing", "callee"))
        self.assertEqual(self.successResultOf(call.when_ended()), "normal_clearing")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_inbound(self):
        """An inbound call is parked (incoming, no client_state) until answered; the answer's client_state sticks."""
        call = self.fake.place_inbound_call("+15557654321", OURS, APP + "/in")
        self.clock.advance(0)
        (initiated,) = self.app.payloads("call.initiated")
        self.assertEqual((initiated["direction"], initiated["state"], initiated["from"], initiated["to"]), ("incoming", "parked", "+15557654321", OURS))
        self.assertNotIn("client_state", initiated)
        self.assertEqual(self.command(call, "answer", {"client_state": STATE})[0], 200)
        self.clock.advance(0)
        (answered,) = self.app.payloads("call.answered")
        self.assertEqual(answered["client_state"], STATE)
        self.assertError(self.command(call, "answer"), 422, "10015")

    def test_inbound_abandoned(self):
        """A parked call nobody answers is abandoned by the caller."""
        call = self.fake.place_inbound_call("+15557654321", OURS, APP + "/in", scenario=Scenario(abandon_after=30))
        self.clock.advance(0)
        self.assertEqual(call.state, "parked")
        self.clock.advance(30)
        self.assertEqual((call.hangup_cause, call.hangup_source), ("originator_cancel", "caller"))

    def test_webhooks_are_delivered_in_order(self):
        """A call's next webhook waits until the previous one was answered."""
        self.app.hold = True
        call = self.answered()
        self.assertEqual(self.app.events, ["call.initiated"])
        self.assertEqual(call.event_types, ["call.initiated", "call.answered"])
        held = self.app.held.pop()
        held.write(b"OK")
        held.finish()
        self.hooks.flush()
        self.assertEqual(self.app.events, ["call.initiated", "call.answered"])
        self.app.hold = False
        self.app.held.pop().finish()
        self.hooks.flush()
        self.successResultOf(self.fake.settle())
        self.assertEqual([(h.status, h.response) for h in call.webhooks], [(200, b"OK"), (200, b"")])

    def test_no_webhook_url(self):
        """Without a webhook URL the events are recorded but not sent."""
        fake = FakeTelnyx(self.clock, KEY, StubTreq(self.app))
        call = fake.place_inbound_call("+15557654321", OURS)
        self.clock.advance(0)
        self.assertEqual([(h.event_type, h.error) for h in call.webhooks], [("call.initiated", "no webhook URL")])
        self.assertEqual(self.app.hits, [])

    def test_close(self):
        """close() stops every call's timers without posting anything."""
        self.fake.scenario = Scenario(answer_after=100)
        self.dial()
        self.fake.place_inbound_call("+15557654321", OURS, APP + "/in")
        self.clock.advance(0)
        self.successResultOf(self.fake.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LoopbackTests(TestCase):
    """The fake on a real port, posting to a real webhook server (integration tier)."""

    async def test_over_tcp(self):
        """Over TCP the fake checks the key, drives a call, and its webhooks verify with the SDK."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        app = App()
        ports = []
        fake = FakeTelnyx(reactor, KEY, http, scenario=Scenario(utterances=["hi"], hangup_after=0.2))
        for resource in (app, fake.resource()):
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
            self.addCleanup(port.stopListening)
            ports.append(port.getHost().port)
        api = f"http://127.0.0.1:{ports[1]}/v2/calls"
        response = await http.post(api, json=dial_body(), headers={"Authorization": ["Bearer nope"]})
        self.assertEqual((response.code, (await response.json())["errors"][0]["code"]), (401, "10009"))
        response = await http.post(api, json=dial_body(webhook_url=f"http://127.0.0.1:{ports[0]}/hook"),
                                   headers={"Authorization": [f"Bearer {KEY}"]})
        call = fake.calls[(await response.json())["data"]["call_control_id"]]
        self.assertEqual(await call.when_ended(), "normal_clearing")
        await fake.settle()
        self.assertEqual(app.events, ["call.initiated", "call.answered", "call.hangup"])
        for hit in app.hits:
            self.assertTrue(sdk_accepts(hit["raw"], hit["headers"], fake.public_key))


class _LineCatcher(ProcessProtocol):
    def __init__(self, lines):
        self.wanted = lines
        self.lines = Deferred()
        self.ended = Deferred()
        self.out = b""

    def outReceived(self, data):
        self.out += data
        if self.out.count(b"\n") >= self.wanted and not self.lines.called:
            self.lines.callback(self.out.decode().splitlines()[: self.wanted])

    def processEnded(self, reason):
        if not self.lines.called:
            self.lines.errback(reason)
        self.ended.callback(None)


class MainTests(TestCase):
    """`python -m voicecall.testing.telnyx` runs the fake standalone."""

    @defer.inlineCallbacks
    def test_standalone(self):
        """The entry point prints the base URL and the public key, and serves the API there."""
        from twisted.internet import reactor

        proto = _LineCatcher(2)
        process = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-m", "voicecall.testing.telnyx", "--port", "0", "--api-key", KEY,
             "--signing-seed", RFC8032_SEED.hex(), "--say", "hello"],
            env=dict(os.environ), path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            base_line, key_line = yield proto.lines
            self.assertRegex(base_line, r"^telnyx\.baseUrl: http://127\.0\.0\.1:\d+$")
            self.assertEqual(key_line, f"telnyx.publicKey: {DOC_KEY}")
            pool = HTTPConnectionPool(reactor, persistent=False)
            http = HTTPClient(Agent(reactor, pool=pool))
            response = yield http.get(base_line.split(": ", 1)[1] + "/v2/calls/v3:nope", headers={"Authorization": [f"Bearer {KEY}"]})
            body = yield response.json()
            self.assertEqual((response.code, body["errors"][0]["code"]), (404, "10005"))
        finally:
            process.signalProcess("TERM")
            yield proto.ended
