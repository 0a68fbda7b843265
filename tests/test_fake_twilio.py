"""
Tests for voicecall.testing.twilio, the fake Twilio: its webhook signer against the official
SDK, its REST API (auth, validation, errors, failure injection), and the carrier driver that
follows TwiML and posts signed webhooks.
"""
import json
from collections import deque
import os
import re
import sys
from urllib.parse import parse_qsl, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "test_auth_token_0123456789abcdef"
API = "http://api.fake"
CALLS = f"{API}/2010-04-01/Accounts/{SID}/Calls.json"
APP = "http://app.example"
CALL_SID = re.compile(r"^CA[0-9a-f]{32}$")


def call_url(sid):
    return f"{API}/2010-04-01/Accounts/{SID}/Calls/{sid}.json"


class App(Resource):
    """A small webhook server: answers each path with a TwiML string (or a callable's)."""

    isLeaf = True

    def __init__(self, routes=None):
        super().__init__()
        self.routes = routes or {}
        self.hits = []

    def render(self, request):
        request.content.seek(0)
        form = parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True)
        path = request.path.decode()
        self.hits.append(
            {
                "method": request.method.decode(),
                "url": APP + request.uri.decode(),
                "path": path,
                "form": dict(form),
                "pairs": form,
                "signature": (request.getHeader("x-twilio-signature") or ""),
                "user_agent": request.getHeader("user-agent"),
            }
        )
        answer = self.routes.get(path, "<Response></Response>")
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, tuple):
            request.setResponseCode(answer[0])
            answer = answer[1]
        request.setHeader("content-type", "application/xml")
        return answer.encode("utf-8")

    def by_path(self, path):
        return [h for h in self.hits if h["path"] == path]


def form(**fields):
    return list(fields.items())


def create_form(url=APP + "/voice?callId=c1", events=("initiated", "ringing", "answered",
                                                       "completed"), **extra):
    fields = [("To", "+15005550001"), ("From", "+15005550006")]
    if url is not None:
        fields.append(("Url", url))
    fields.append(("StatusCallback", APP + "/status?callId=c1&type=status"))
    fields.extend(("StatusCallbackEvent", e) for e in events)
    fields.extend(extra.items())
    return fields


class SignatureTests(SynchronousTestCase):
    """The fake's own signer agrees with twilio.request_validator.RequestValidator."""

    def test_documented_example(self):
        """Twilio's documented example (PROVIDERS.md T1) gives the documented signature."""
        params = {
            "CallSid": "CA1234567890ABCDE",
            "Caller": "+12349013030",
            "Digits": "1234",
            "From": "+12349013030",
            "To": "+18005551212",
        }
        url = "https://mycompany.com/myapp.php?foo=1&bar=2"
        self.assertEqual(sign_request("12345", url, params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
        self.assertEqual(
            sign_request("12345", url, params), RequestValidator("12345").compute_signature(url, params)
        )

    def test_status_callback_example(self):
        """The status-callback example (T2) matches the SDK and validates."""
        url = "https://example.com/twilio/status?call=abc"
        params = {
            "AccountSid": "AC00000000000000000000000000000000",
            "ApiVersion": "2010-04-01",
            "CallDuration": "42",
            "CallSid": "CA11111111111111111111111111111111",
            "CallStatus": "completed",
            "Direction": "outbound-api",
            "From": "+15005550006",
            "To": "+15005550001",
        }
        sig = sign_request(TOKEN, url, params)
        self.assertEqual(sig, "1NcymccZWTBFZ55gZiyMzIEgnDg=")
        self.assertTrue(RequestValidator(TOKEN).validate(url, params, sig))

    def test_gather_example_with_pairs(self):
        """The Gather example (T3), given as pairs in any order, signs decoded values."""
        pairs = [
            ("SpeechResult", "I'd like to book a table for two, please."),
            ("Confidence", "0.9134"),
            ("CallSid", "CA11111111111111111111111111111111"),
        ]
        url = "https://example.com/twilio/gather?call=abc"
        self.assertEqual(sign_request(TOKEN, url, pairs), "TohlQFm/StXAiPzSgFYhMKTh1lQ=")

    def test_url_only(self):
        """With no parameters only the URL is signed (T4, the WebSocket upgrade)."""
        self.assertEqual(
            sign_request(TOKEN, "wss://example.com/twilio/media"), "XBfm3Ksz9YsboFXKJwfpv8PTqEg="
        )

    @settings(max_examples=200, deadline=None)
    @given(
        path=st.text(alphabet="abcdefXYZ0123/-_.~%", max_size=20),
        params=st.dictionaries(
            st.text(min_size=1, max_size=12), st.text(max_size=30), max_size=8
        ),
        token=st.text(min_size=1, max_size=40),
    )
    def test_agrees_with_sdk(self, path, params, token):
        """For any token, URL path and parameters the signature is the SDK's and validates."""
        url = "https://example.com/" + path
        ours = sign_request(token, url, params)
        validator = RequestValidator(token)
        self.assertEqual(ours, validator.compute_signature(url, params))
        self.assertTrue(validator.validate(url, params, ours))


class _ApiCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.app = App(
            {"/voice": "<Response><Pause length=\"600\"/></Response>"}
        )
        self.fake = FakeTwilio(
            self.clock, SID, TOKEN, StubTreq(self.app),
            scenario=Scenario(ring_after=1, answer_after=2),
        )
        self.api = StubTreq(self.fake.resource())

    def request(self, method, url, auth=(SID, TOKEN), data=None):
        d = self.api.request(method, url, auth=auth, data=data)
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, json.loads(body) if body else None

    def create(self, **kwargs):
        response, body = self.request("POST", CALLS, data=create_form(**kwargs))
        self.assertEqual(response.code, 201, body)
        return self.fake.calls[body["sid"]]


class RestAuthTests(_ApiCase):
    """The fake checks HTTP Basic auth like Twilio."""

    def assertAuthenticate(self, response, body):
        self.assertEqual(response.code, 401)
        self.assertEqual(
            body,
            {
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            },
        )
        self.assertEqual(
            response.headers.getRawHeaders("www-authenticate"), ['Basic realm="Twilio API"']
        )

    def test_no_credentials(self):
        """A request without credentials gets 401 with Twilio's error JSON and creates nothing."""
        self.assertAuthenticate(*self.request("POST", CALLS, auth=None, data=create_form()))
        self.assertEqual(self.fake.calls, {})

    def test_wrong_token(self):
        """A wrong auth token gets 401."""
        self.assertAuthenticate(*self.request("POST", CALLS, auth=(SID, "nope"), data=create_form()))

    def test_other_account_in_path(self):
        """Credentials for one account do not open another account's URL."""
        other = CALLS.replace(SID, "AC" + "f" * 32)
        self.assertAuthenticate(*self.request("POST", other, data=create_form()))

    def test_body_too_large(self):
        """A body over 64 KB is refused with 413 and creates nothing."""
        data = create_form(Twiml="x" * (65 * 1024), url=None)
        response, body = self.request("POST", CALLS, data=data)
        self.assertEqual((response.code, body["status"]), (413, 413))
        self.assertEqual(self.fake.calls, {})

    def test_requests_recorded(self):
        """Every request is recorded with method, path, form (repeated keys kept) and auth."""
        self.request("POST", CALLS, auth=(SID, "nope"), data=create_form())
        record = self.fake.requests[-1]
        self.assertEqual(record.method, "POST")
        self.assertEqual(record.path, f"/2010-04-01/Accounts/{SID}/Calls.json")
        self.assertEqual(record.auth, (SID, "nope"))
        self.assertEqual(
            record.getall("StatusCallbackEvent"), ["initiated", "ringing", "answered", "completed"]
        )
        self.assertEqual(record.get("To"), "+15005550001")


class RestCreateTests(_ApiCase):
    """POST Calls.json validates like Twilio and answers 201 with the call resource."""

    def assertError(self, data, code, message=None):
        response, body = self.request("POST", CALLS, data=data)
        self.assertEqual(response.code, 400)
        self.assertEqual(body["code"], code)
        self.assertEqual(body["status"], 400)
        self.assertEqual(body["more_info"], f"https://www.twilio.com/docs/errors/{code}")
        if message is not None:
            self.assertEqual(body["message"], message)
        self.assertEqual(self.fake.calls, {})

    def test_created(self):
        """A valid create answers 201 with a CA sid, status queued and outbound-api."""
        response, body = self.request("POST", CALLS, data=create_form())
        self.assertEqual(response.code, 201)
        self.assertRegex(body["sid"], CALL_SID)
        self.assertEqual(body["status"], "queued")
        self.assertEqual(body["direction"], "outbound-api")
        self.assertEqual((body["to"], body["from"]), ("+15005550001", "+15005550006"))
        self.assertEqual(body["account_sid"], SID)
        call = self.fake.calls[body["sid"]]
        self.assertEqual(
            call.status_callback_events, {"initiated", "ringing", "answered", "completed"}
        )

    def test_missing_to(self):
        """Without To the answer is 21201."""
        data = [p for p in create_form() if p[0] != "To"]
        self.assertError(data, 21201, "No 'To' number is specified")

    def test_missing_from(self):
        """Without From the answer is 21213."""
        data = [p for p in create_form() if p[0] != "From"]
        self.assertError(data, 21213)

    def test_invalid_numbers(self):
        """Numbers that are not E.164 are refused (21211 for To, 21212 for From)."""
        self.assertError([("To", "555-1234")] + create_form()[1:], 21211)
        self.assertError([create_form()[0], ("From", "+0123")] + create_form()[2:], 21212)

    def test_no_twiml_source(self):
        """Without Url, Twiml or ApplicationSid the answer is 21205."""
        self.assertError(create_form(url=None), 21205)

    def test_two_twiml_sources(self):
        """Url and Twiml together are refused."""
        self.assertError(create_form(Twiml="<Response/>"), 21205)

    def test_unknown_status_callback_event(self):
        """An unknown StatusCallbackEvent value is refused."""
        self.assertError(create_form(events=("initiated", "exploded")), 20001)

    def test_space_separated_events(self):
        """Several events in one StatusCallbackEvent value are accepted, as Twilio does."""
        call = self.create(events=("initiated ringing",))
        self.assertEqual(call.status_callback_events, {"initiated", "ringing"})

    def test_default_event_is_completed(self):
        """Without StatusCallbackEvent only completed is reported."""
        self.assertEqual(self.create(events=()).status_callback_events, {"completed"})


class RestCallTests(_ApiCase):
    """GET and POST on Calls/{sid}.json."""

    def test_get(self):
        """GET answers the call resource with its current status."""
        call = self.create()
        response, body = self.request("GET", call_url(call.sid))
        self.assertEqual((response.code, body["sid"], body["status"]), (200, call.sid, "queued"))
        self.clock.advance(0)
        self.clock.advance(1)
        self.assertEqual(self.request("GET", call_url(call.sid))[1]["status"], "ringing")

    def test_unknown_sid(self):
        """An unknown call sid gets 404 with code 20404 naming the resource."""
        url = call_url("CA" + "9" * 32)
        response, body = self.request("GET", url)
        self.assertEqual(response.code, 404)
        self.assertEqual(body["code"], 20404)
        self.assertEqual(body["message"], f"The requested resource {urlsplit(url).path} was not found")
        self.assertEqual(self.request("POST", url, data=form(Status="completed"))[0].code, 404)

    def test_redirect_before_answer(self):
        """Updating the TwiML of a call that is not in progress gets 21220."""
        call = self.create()
        response, body = self.request("POST", call_url(call.sid), data=form(Twiml="<Response/>"))
        self.assertEqual(response.code, 400)
        self.assertEqual(body["code"], 21220)
        self.assertEqual(body["message"], "Call is not in-progress. Cannot redirect.")

    def test_hangup_while_ringing_cancels(self):
        """Status=completed on a ringing call cancels it and reports canceled."""
        call = self.create()
        self.clock.advance(0)
        self.clock.advance(1)
        response, body = self.request("POST", call_url(call.sid), data=form(Status="completed"))
        self.assertEqual((response.code, body["status"]), (200, "canceled"))
        self.assertEqual(call.callbacks[-1].params["CallStatus"], "canceled")
        self.clock.advance(10)
        self.assertEqual(call.status, "canceled")
        self.assertEqual(self.app.by_path("/voice"), [])

    def test_hangup_in_progress(self):
        """Status=completed on an answered call ends it as completed with its duration."""
        call = self.create()
        self.clock.pump([0, 1, 2, 7])
        self.assertEqual(call.status, "in-progress")
        response, body = self.request("POST", call_url(call.sid), data=form(Status="completed"))
        self.assertEqual((response.code, body["status"], body["duration"]), (200, "completed", "7"))
        last = call.callbacks[-1].params
        self.assertEqual((last["CallStatus"], last["CallDuration"]), ("completed", "7"))

    def test_cancel_in_progress_is_ignored(self):
        """Status=canceled does not end an answered call."""
        call = self.create()
        self.clock.pump([0, 1, 2])
        self.request("POST", call_url(call.sid), data=form(Status="canceled"))
        self.assertEqual(call.status, "in-progress")


class FailureInjectionTests(_ApiCase):
    """Tests can make the next requests fail, hang or answer late."""

    def test_fail_next(self):
        """fail_next answers the next request with the status and body given, unprocessed."""
        self.fake.fail_next(503, {"code": 20503, "message": "down"})
        response, body = self.request("POST", CALLS, data=create_form())
        self.assertEqual((response.code, body), (503, {"code": 20503, "message": "down"}))
        self.assertEqual(self.fake.calls, {})
        self.assertEqual(self.request("POST", CALLS, data=create_form())[0].code, 201)

    def test_fail_next_default_body_and_count(self):
        """Without a body the failure is Twilio-shaped; count makes several requests fail."""
        self.fake.fail_next(500, count=2)
        for _ in range(2):
            response, body = self.request("POST", CALLS, data=create_form())
            self.assertEqual((response.code, body["code"], body["status"]), (500, 20500, 500))
        self.assertEqual(self.request("POST", CALLS, data=create_form())[0].code, 201)

    def test_fail_next_match(self):
        """A matching predicate limits the failure to the requests it accepts."""
        call = self.create()
        self.fake.fail_next(500, match=lambda r: r.method == "GET")
        self.assertEqual(self.request("POST", CALLS, data=create_form())[0].code, 201)
        self.assertEqual(self.request("GET", call_url(call.sid))[0].code, 500)

    def test_hang_next(self):
        """hang_next leaves the request unanswered and unprocessed until abort_held."""
        self.fake.hang_next()
        d = self.api.post(CALLS, auth=(SID, TOKEN), data=create_form())
        self.clock.advance(100)
        self.api.flush()
        self.assertNoResult(d)
        self.assertEqual(self.fake.calls, {})
        self.fake.abort_held()
        self.api.flush()
        self.failureResultOf(d)

    def test_delay_next(self):
        """delay_next processes the request at once but answers it only after the delay."""
        self.fake.delay_next(5)
        d = self.api.post(CALLS, auth=(SID, TOKEN), data=create_form())
        self.api.flush()
        self.assertNoResult(d)
        self.assertEqual(len(self.fake.calls), 1)
        self.clock.advance(5)
        self.api.flush()
        self.assertEqual(self.successResultOf(d).code, 201)


class _DriverCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.app = App()
        self.fake = FakeTwilio(self.clock, SID, TOKEN, StubTreq(self.app))
        self.api = StubTreq(self.fake.resource())
        self.validator = RequestValidator(TOKEN)

    def place(self, scenario=None, **kwargs):
        if scenario is not None:
            self.fake.set_scenario("+15005550001", scenario)
        d = self.api.post(CALLS, auth=(SID, TOKEN), data=create_form(**kwargs))
        body = self.successResultOf(self.successResultOf(d).json())
        self.clock.advance(0)
        return self.fake.calls[body["sid"]]

    def assertSigned(self, hit):
        """The hit carries a valid X-Twilio-Signature for its exact URL and parameters."""
        self.assertTrue(self.validator.validate(hit["url"], hit["form"], hit["signature"]), hit)
        self.assertEqual(hit["signature"], sign_request(TOKEN, hit["url"], hit["pairs"]))


class DriverFollowTests(_DriverCase):
    """The driver follows TwiML served by the application, like Twilio."""

    def setUp(self):
        super().setUp()
        self.app.routes.update(
            {
                "/voice": '<?xml version="1.0" encoding="UTF-8"?><Response>'
                '<Say voice="Polly.Amy">Hello &amp; welcome</Say>'
                '<Gather input="speech" action="/gather?turnToken=t1" method="POST"></Gather>'
                "<Say>never said</Say></Response>",
                "/gather": "<Response><Say>Thanks</Say><Redirect>/next</Redirect>"
                "<Say>never said either</Say></Response>",
                "/next": "<Response><Hangup/><Say>after hangup</Say></Response>",
            }
        )

    def test_say_gather_redirect_hangup(self):
        """Say, Gather (with the caller's words), Redirect and Hangup run in Twilio's order."""
        call = self.place(Scenario(utterances=["Book a table, please."], confidence="0.87"))
        self.assertEqual(call.status, "completed")
        self.assertEqual(call.say_texts, ["Hello & welcome", "Thanks"])
        self.assertEqual(call.says[0].voice, "Polly.Amy")
        self.assertEqual([h["path"] for h in self.app.hits if h["path"] != "/status"],
                         ["/voice", "/gather", "/next"])
        gather = self.app.by_path("/gather")[0]
        self.assertEqual(gather["url"], APP + "/gather?turnToken=t1")
        self.assertEqual(gather["form"]["SpeechResult"], "Book a table, please.")
        self.assertEqual(gather["form"]["Confidence"], "0.87")
        self.assertEqual(call.gathers[0].heard, "Book a table, please.")

    def test_twiml_fetch_params(self):
        """The TwiML fetch posts Twilio's standard parameters, signed, as TwilioProxy."""
        call = self.place()
        hit = self.app.by_path("/voice")[0]
        self.assertEqual(hit["method"], "POST")
        self.assertEqual(hit["url"], APP + "/voice?callId=c1")
        self.assertEqual(
            hit["form"],
            {
                "AccountSid": SID,
                "ApiVersion": "2010-04-01",
                "CallSid": call.sid,
                "CallStatus": "in-progress",
                "Called": "+15005550001",
                "Caller": "+15005550006",
                "Direction": "outbound-api",
                "From": "+15005550006",
                "To": "+15005550001",
            },
        )
        self.assertEqual(hit["user_agent"], "TwilioProxy/1.1")
        for hit in self.app.hits:
            self.assertSigned(hit)

    def test_status_callbacks(self):
        """Status callbacks report initiated, ringing, in-progress and completed, in sequence."""
        call = self.place(Scenario(ring_after=1, answer_after=2, utterances=["yes"]))
        self.clock.pump([1, 2])
        statuses = self.app.by_path("/status")
        self.assertEqual(
            [h["form"]["CallStatus"] for h in statuses],
            ["initiated", "ringing", "in-progress", "completed"],
        )
        self.assertEqual([h["form"]["SequenceNumber"] for h in statuses], ["0", "1", "2", "3"])
        for hit in statuses:
            self.assertEqual(hit["url"], APP + "/status?callId=c1&type=status")
            self.assertEqual(hit["form"]["CallbackSource"], "call-progress-events")
            self.assertEqual(hit["form"]["CallSid"], call.sid)
            self.assertSigned(hit)
        self.assertEqual(statuses[1]["form"]["Timestamp"], "Thu, 01 Jan 1970 00:00:01 +0000")
        self.assertNotIn("CallDuration", statuses[2]["form"])
        self.assertEqual(statuses[3]["form"]["CallDuration"], "0")
        self.assertEqual([w.status for w in call.callbacks], [200, 200, 200, 200])

    def test_only_requested_events(self):
        """Only the requested status events are posted."""
        self.place(Scenario(utterances=["yes"]), events=("completed",))
        self.assertEqual(
            [h["form"]["CallStatus"] for h in self.app.by_path("/status")], ["completed"]
        )

    def test_observations(self):
        """The fetched documents and their answers are exposed on the call."""
        call = self.place(Scenario(utterances=["yes"]))
        self.assertEqual(
            [(d.kind, d.url, d.status) for d in call.documents],
            [
                ("twiml", APP + "/voice?callId=c1", 200),
                ("action", APP + "/gather?turnToken=t1", 200),
                ("redirect", APP + "/next", 200),
            ],
        )
        self.assertIn(b"<Hangup/>", call.documents[-1].body)
        self.assertEqual(list(self.fake.webhooks)[-1].kind, "status")

    def test_silence_continues_after_gather(self):
        """When nothing is said the Gather waits its timeout, calls no action, and continues."""
        call = self.place()
        self.assertEqual(call.say_texts, ["Hello & welcome"])
        self.clock.advance(4)
        self.assertEqual(call.status, "in-progress")
        self.clock.advance(1)
        self.assertEqual(call.say_texts, ["Hello & welcome", "never said"])
        self.assertEqual(self.app.by_path("/gather"), [])
        self.assertEqual(call.status, "completed")
        self.assertIsNone(call.gathers[0].heard)

    def test_action_on_empty_result(self):
        """With actionOnEmptyResult the action is called without a SpeechResult."""
        self.app.routes["/voice"] = (
            '<Response><Gather input="speech" timeout="3" actionOnEmptyResult="true" '
            'action="/gather"/></Response>'
        )
        self.place(Scenario(silence=0))
        hit = self.app.by_path("/gather")[0]
        self.assertNotIn("SpeechResult", hit["form"])
        self.assertSigned(hit)

    def test_utterance_callable_and_digits(self):
        """A callable scenario decides what is heard; a mapping is posted as parameters."""
        seen = []

        def callee(call):
            seen.append(list(call.say_texts))
            return {"Digits": "42"}

        self.app.routes["/voice"] = '<Response><Say>Press</Say><Gather action="/gather"/></Response>'
        self.place(Scenario(utterances=callee))
        self.assertEqual(seen, [["Press"]])
        self.assertEqual(self.app.by_path("/gather")[0]["form"]["Digits"], "42")

    def test_say_takes_time(self):
        """A Say lasts its text length times say_seconds_per_char before the next verb."""
        call = self.place(Scenario(utterances=["yes"], say_seconds_per_char=0.5))
        self.assertEqual(self.app.by_path("/gather"), [])
        self.clock.advance(len("Hello & welcome") * 0.5)
        self.assertEqual(len(self.app.by_path("/gather")), 1)
        self.clock.advance(len("Thanks") * 0.5)
        self.assertEqual(call.status, "completed")

    def test_fetch_failure_hangs_up(self):
        """A TwiML fetch that fails ends the call and records Twilio's 11200 error."""
        self.app.routes["/voice"] = (500, "oops")
        call = self.place()
        self.assertEqual(call.status, "completed")
        self.assertIn("11200", call.errors[0])

    def test_oversized_twiml_hangs_up(self):
        """A TwiML answer over 64 KB is refused like a failed fetch."""
        self.app.routes["/voice"] = "<Response><Say>" + "x" * (65 * 1024) + "</Say></Response>"
        call = self.place()
        self.assertEqual((call.status, call.says), ("completed", deque()))
        self.assertIn("64 KB", call.errors[0])

    def test_unparseable_twiml_hangs_up(self):
        """A document that is not TwiML ends the call with a 12100 error."""
        self.app.routes["/voice"] = "<Response><Say>"
        call = self.place()
        self.assertEqual(call.status, "completed")
        self.assertIn("12100", call.errors[0])

    def test_get_status_callback(self):
        """With StatusCallbackMethod=GET the parameters go in the signed URL."""
        self.place(Scenario(utterances=["yes"]), events=("completed",),
                   StatusCallbackMethod="GET")
        hit = self.app.by_path("/status")[0]
        self.assertEqual(hit["method"], "GET")
        self.assertEqual(hit["form"], {})
        query = dict(parse_qsl(urlsplit(hit["url"]).query))
        self.assertEqual(query["CallStatus"], "completed")
        self.assertTrue(self.validator.validate(hit["url"], {}, hit["signature"]))

    def test_redirect_loop_is_bounded(self):
        """A document that redirects to itself forever is cut off and the call ends."""
        self.app.routes["/voice"] = "<Response><Redirect>/voice</Redirect></Response>"
        fake = FakeTwilio(self.clock, SID, TOKEN, StubTreq(self.app), max_documents_per_call=5)
        api = StubTreq(fake.resource())
        self.successResultOf(api.post(CALLS, auth=(SID, TOKEN), data=create_form()))
        self.clock.advance(0)
        (call,) = fake.calls.values()
        self.assertEqual(call.status, "completed")
        self.assertEqual(len(self.app.by_path("/voice")), 5)


class DriverLifecycleTests(_DriverCase):
    """Answering, not answering, hanging up, live updates and streams."""

    def setUp(self):
        super().setUp()
        self.app.routes["/voice"] = '<Response><Say>One</Say><Pause length="60"/><Say>Two</Say></Response>'

    def statuses(self):
        return [h["form"]["CallStatus"] for h in self.app.by_path("/status")]

    def test_no_answer_after_timeout(self):
        """A callee who never answers gives no-answer after the call's Timeout."""
        call = self.place(Scenario(outcome="no-answer"), Timeout="20")
        self.clock.advance(19)
        self.assertEqual(call.status, "ringing")
        self.clock.advance(1)
        self.assertEqual(self.statuses(), ["initiated", "ringing", "no-answer"])
        self.assertEqual(self.app.by_path("/voice"), [])
        self.assertEqual(self.successResultOf(call.when_ended()), "no-answer")

    def test_late_answer_is_no_answer(self):
        """An answer later than Timeout is a no-answer."""
        call = self.place(Scenario(answer_after=30), Timeout="10")
        self.clock.advance(10)
        self.assertEqual(call.status, "no-answer")

    def test_busy_and_failed(self):
        """Busy callees ring then report busy; failed calls fail without ringing."""
        busy = self.place(Scenario(outcome="busy", answer_after=3))
        self.clock.advance(3)
        self.assertEqual(busy.status, "busy")
        self.fake.set_scenario("+15005550001", Scenario(outcome="failed"))
        failed = self.place()
        self.clock.advance(0)
        self.assertEqual(failed.status, "failed")
        self.assertEqual(
            [w.params["CallStatus"] for w in failed.callbacks], ["initiated", "failed"]
        )

    def test_callee_hangs_up(self):
        """hangup_after ends the call that long after the answer, interrupting the TwiML."""
        call = self.place(Scenario(hangup_after=12))
        self.clock.advance(12)
        self.assertEqual(call.status, "completed")
        self.assertEqual(call.say_texts, ["One"])
        self.assertEqual(call.callbacks[-1].params["CallDuration"], "12")
        self.clock.advance(100)
        self.assertEqual(call.say_texts, ["One"])

    def test_end_of_document_hangs_up(self):
        """When the document runs out the call is completed."""
        call = self.place()
        self.clock.advance(60)
        self.assertEqual(call.say_texts, ["One", "Two"])
        self.assertEqual(call.status, "completed")
        self.assertEqual(self.statuses()[-1], "completed")

    def test_live_update_interrupts(self):
        """A live Twiml update stops the current document and runs the new one."""
        call = self.place()
        self.clock.advance(10)
        d = self.api.post(call_url(call.sid), auth=(SID, TOKEN),
                          data=form(Twiml="<Response><Say>New</Say><Pause length=\"5\"/></Response>"))
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(call.say_texts, ["One", "New"])
        self.clock.advance(5)
        self.assertEqual(call.status, "completed")
        self.clock.advance(100)
        self.assertEqual(call.say_texts, ["One", "New"])

    def test_live_update_with_url(self):
        """A live Url update fetches the new document with the standard parameters, signed."""
        self.app.routes["/other"] = "<Response><Say>Other</Say></Response>"
        call = self.place()
        self.successResultOf(self.api.post(call_url(call.sid), auth=(SID, TOKEN),
                                           data=form(Url=APP + "/other?x=1")))
        hit = self.app.by_path("/other")[0]
        self.assertEqual(hit["form"]["CallSid"], call.sid)
        self.assertSigned(hit)
        self.assertEqual(call.say_texts, ["One", "Other"])

    def test_enqueue_holds(self):
        """Enqueue (the hold queue) records the queue and holds the call until it is ended."""
        self.app.routes["/voice"] = (
            '<Response><Say voice="alice">Please hold.</Say>'
            '<Enqueue waitUrl="/voice/hold-music">hold-queue</Enqueue></Response>'
        )
        call = self.place()
        self.clock.advance(3600)
        self.assertEqual((call.status, list(call.enqueued)), ("in-progress", ["hold-queue"]))
        self.successResultOf(self.api.post(call_url(call.sid), auth=(SID, TOKEN),
                                           data=form(Status="completed")))
        self.assertEqual(call.status, "completed")

    def test_inline_twiml(self):
        """A call created with inline Twiml runs it on answer without fetching."""
        d = self.api.post(CALLS, auth=(SID, TOKEN), data=[
            ("To", "+15005550001"), ("From", "+15005550006"),
            ("Twiml", "<Response><Say>Inline</Say><Hangup/></Response>")])
        sid = self.successResultOf(self.successResultOf(d).json())["sid"]
        self.clock.advance(0)
        self.assertEqual(self.fake.calls[sid].say_texts, ["Inline"])
        self.assertEqual(self.fake.calls[sid].status, "completed")
        self.assertEqual(self.app.hits, [])

    def test_connect_stream(self):
        """Connect/Stream is recorded with its parameters and holds the call until it ends."""
        self.app.routes["/voice"] = (
            '<Response><Connect><Stream url="wss://app.example/voice/stream">'
            '<Parameter name="token" value="tok" /></Stream></Connect><Say>After</Say></Response>'
        )
        call = self.place(Scenario(answer_after=1))
        pending = call.next_stream()
        self.assertNoResult(pending)
        self.clock.advance(1)
        stream = self.successResultOf(pending)
        self.assertIs(self.successResultOf(call.next_stream()), stream)
        self.assertEqual(stream.url, "wss://app.example/voice/stream")
        self.assertEqual(stream.parameters, {"token": "tok"})
        self.assertTrue(stream.bidirectional)
        self.clock.advance(1000)
        self.assertEqual((call.status, call.active_stream), ("in-progress", stream))
        call.end_stream()
        self.assertEqual(stream.ended_by, "media")
        self.assertEqual(call.say_texts, ["After"])
        self.assertEqual(call.status, "completed")

    def test_next_stream_when_call_ends_first(self):
        """Waiting for a stream on a call that ends without one gives None."""
        call = self.place(Scenario(answer_after=1))
        pending = call.next_stream()
        call.hangup_by_callee()
        self.assertIsNone(self.successResultOf(pending))

    def test_update_ends_stream(self):
        """A live update during Connect/Stream ends the stream, as on Twilio."""
        self.app.routes["/voice"] = (
            '<Response><Connect><Stream url="wss://a/s"/></Connect></Response>'
        )
        call = self.place()
        d = self.api.post(call_url(call.sid), auth=(SID, TOKEN),
                          data=form(Twiml="<Response><Say>Bye</Say></Response>"))
        self.successResultOf(d)
        self.assertEqual(call.streams[0].ended_by, "interrupted")
        self.assertIsNone(call.active_stream)
        self.assertEqual(call.say_texts, ["Bye"])


class InboundCallTests(_DriverCase):
    """place_inbound_call plays Twilio delivering a call to our number's webhook."""

    def test_inbound(self):
        """The webhook gets Direction=inbound, CallStatus=ringing, signed; TwiML is followed."""
        self.app.routes["/voice"] = (
            '<Response><Say>Hi caller</Say><Gather input="speech" action="/gather"/></Response>'
        )
        call = self.fake.place_inbound_call(
            "+15005550001", "+15551230000", APP + "/voice",
            scenario=Scenario(utterances=["hello"]),
        )
        first = self.app.by_path("/voice")[0]
        self.assertEqual(first["form"]["Direction"], "inbound")
        self.assertEqual(first["form"]["CallStatus"], "ringing")
        self.assertEqual(first["form"]["From"], "+15551230000")
        self.assertSigned(first)
        gather = self.app.by_path("/gather")[0]
        self.assertEqual(gather["form"]["CallStatus"], "in-progress")
        self.assertEqual(gather["form"]["SpeechResult"], "hello")
        self.assertEqual(call.say_texts, ["Hi caller"])
        self.assertEqual(call.status, "completed")
        self.assertIn(call.sid, self.fake.calls)

    def test_inbound_reject(self):
        """A Reject answer ends the inbound call without answering it."""
        self.app.routes["/voice"] = '<Response><Reject reason="busy"/></Response>'
        call = self.fake.place_inbound_call("+15005550001", "+15551230000", APP + "/voice")
        self.assertEqual(call.status, "busy")
        self.assertIsNone(call.answered_at)

    def test_inbound_updated_by_rest(self):
        """An inbound call can be redirected through the REST API once answered."""
        self.app.routes["/voice"] = '<Response><Pause length="30"/></Response>'
        call = self.fake.place_inbound_call("+15005550001", "+15551230000", APP + "/voice")
        d = self.api.post(call_url(call.sid), auth=(SID, TOKEN),
                          data=form(Twiml="<Response><Say>Now</Say></Response>"))
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(call.say_texts, ["Now"])


class LoopbackTests(TestCase):
    """The fake on a real port, driven with a real treq client (integration tier)."""

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.app = App({"/voice": "<Response><Say>Loopback</Say><Hangup/></Response>"})
        self.app_port = yield self.listen(self.app)
        self.fake = FakeTwilio(reactor, SID, TOKEN, self.http)
        self.api_port = yield self.listen(self.fake.resource())
        self.api = f"http://127.0.0.1:{self.api_port.getHost().port}"

    def listen(self, resource):
        from twisted.internet.endpoints import TCP4ServerEndpoint

        site = Site(resource)
        d = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(site)
        d.addCallback(lambda port: (self.addCleanup(port.stopListening), port)[1])
        return d

    @defer.inlineCallbacks
    def test_rest_auth_and_validation(self):
        """Over TCP the fake refuses bad credentials, validates, and creates with good ones."""
        url = f"{self.api}/2010-04-01/Accounts/{SID}/Calls.json"
        response = yield self.http.post(url, data=create_form(), auth=(SID, "wrong"))
        body = yield response.json()
        self.assertEqual((response.code, body["code"]), (401, 20003))
        response = yield self.http.post(url, data=[("From", "+15005550006")], auth=(SID, TOKEN))
        body = yield response.json()
        self.assertEqual((response.code, body["code"]), (400, 21201))
        response = yield self.http.post(url, data=create_form(url=None, Twiml="<Response/>"),
                                        auth=(SID, TOKEN))
        body = yield response.json()
        self.assertEqual(response.code, 201)
        call = self.fake.calls[body["sid"]]
        yield call.when_ended()
        yield self.fake.settle()

    @defer.inlineCallbacks
    def test_drives_call_over_tcp(self):
        """A created call fetches signed TwiML from a real server and posts its callbacks."""
        app_base = f"http://127.0.0.1:{self.app_port.getHost().port}"
        url = f"{self.api}/2010-04-01/Accounts/{SID}/Calls.json"
        data = [("To", "+15005550001"), ("From", "+15005550006"),
                ("Url", app_base + "/voice?callId=c9"), ("StatusCallback", app_base + "/status"),
                ("StatusCallbackEvent", "answered"), ("StatusCallbackEvent", "completed")]
        response = yield self.http.post(url, data=data, auth=(SID, TOKEN))
        body = yield response.json()
        call = self.fake.calls[body["sid"]]
        status = yield call.when_ended()
        yield self.fake.settle()
        self.assertEqual(status, "completed")
        self.assertEqual(call.say_texts, ["Loopback"])
        validator = RequestValidator(TOKEN)
        # the answered callback and the TwiML fetch are concurrent, as on Twilio
        self.assertEqual(
            sorted((h["path"], h["form"]["CallStatus"]) for h in self.app.hits),
            [("/status", "completed"), ("/status", "in-progress"), ("/voice", "in-progress")],
        )
        # No claim on arrival order: each callback has its own connection, as on Twilio.
        for hit in self.app.hits:
            real_url = hit["url"].replace(APP, app_base)
            self.assertTrue(validator.validate(real_url, hit["form"], hit["signature"]))


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
    """`python -m voicecall.testing.twilio` runs the fake standalone."""

    @defer.inlineCallbacks
    def test_standalone(self):
        """The entry point prints the base URL and serves the API there until stopped."""
        from twisted.internet import reactor

        proto = _LineCatcher()
        env = dict(os.environ, TWILIO_AUTH_TOKEN=TOKEN)
        process = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-m", "voicecall.testing.twilio", "--port", "0",
             "--account-sid", SID],
            env=env, path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            line = yield proto.first_line
            self.assertRegex(line, r"^twilio\.baseUrl: http://127\.0\.0\.1:\d+$")
            base = line.split(": ", 1)[1]
            pool = HTTPConnectionPool(reactor, persistent=False)
            http = HTTPClient(Agent(reactor, pool=pool))
            response = yield http.get(f"{base}/2010-04-01/Accounts/{SID}/Calls/CA{'0' * 32}.json",
                                      auth=(SID, TOKEN))
            body = yield response.json()
            self.assertEqual((response.code, body["code"]), (404, 20404))
        finally:
            process.signalProcess("TERM")
            yield proto.ended
