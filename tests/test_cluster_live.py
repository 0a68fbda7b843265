"""
Node liveness and adoption (issue 16, "Node death"): a live call another node ran is re-pointed
at its adopter through the carrier's REST API (Twilio call update, Plivo transfer), with the
request shapes of the carriers' official SDKs; the fakes follow the update as the carriers do.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from voicecall.domain.model import CallRecord, CallState, Direction, EventType
from voicecall.providers.plivo import PlivoProvider
from voicecall.providers.twilio import TwilioProvider
from voicecall.testing.plivo import FakePlivo
from voicecall.testing.plivo import Scenario as PlivoScenario
from voicecall.testing.twilio import FakeTwilio, Scenario

from tests import test_manager
from tests.harness import eventually, http_client, serve

SID = "AC" + "0" * 32
TOKEN = "fake-auth-token-for-tests"
PLIVO_ID = "MA" + "A" * 18
CALLEE = "+15550001234"


class _Node(Resource):
    """A node's webhook: records what reaches it and answers with a long pause (XML)."""

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict, dict]] = []  # (method, uri, headers, form)
        self._document = document

    def render(self, request):
        form = dict(parse_qsl(request.content.read().decode()))
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method.decode(), request.uri.decode(), headers, form))
        request.setHeader(b"content-type", b"application/xml")
        return self._document


TWIML_PAUSE = b'<?xml version="1.0" encoding="UTF-8"?><Response><Pause length="60"/></Response>'
PLIVO_WAIT = b'<?xml version="1.0" encoding="utf-8"?><Response><Wait length="60" /></Response>'


def _sdk_twilio_update(sid: str, **params) -> tuple[str, str, dict]:
    """The request the official Twilio SDK sends for `client.calls(sid).update(**params)`."""
    from twilio.base.version import Version  # noqa: F401 (the SDK is the oracle)
    from twilio.http.http_client import TwilioHttpClient
    from twilio.http.response import Response
    from twilio.rest import Client

    seen = {}

    class Capture(TwilioHttpClient):
        def request(self, method, url, params=None, data=None, headers=None, auth=None, **kw):
            seen.update(method=method, url=url, data=dict(data or {}))
            return Response(200, json.dumps({"sid": sid, "account_sid": SID, "status": "in-progress"}))

    Client(SID, TOKEN, http_client=Capture()).calls(sid).update(**params)
    return seen["method"], urlsplit(seen["url"]).path, seen["data"]


def _sdk_plivo_transfer(uuid: str, **params) -> tuple[str, str, dict]:
    """The request the official Plivo SDK sends for `client.calls.transfer(uuid, **params)`."""
    import plivo

    seen = {}
    client = plivo.RestClient(PLIVO_ID, TOKEN)

    def send(method, path, data=None, **kw):
        seen.update(method=method, path=path, data=data)
        return {"api_id": "x", "message": "call transferred"}

    client.request = lambda method, path, data=None, **kw: send(method, path, data)
    client.calls.transfer(uuid, **params)
    return seen["method"], "/".join(("",) + tuple(seen["path"])) + "/", seen["data"]


async def _hang_up(fake, call) -> None:
    call.hangup_by_callee()
    await fake.settle()


class TwilioRepointTests(TestCase):
    """A Twilio call placed by node A, re-pointed at node B by B's provider (a call update)."""

    timeout = 30

    async def test_update_moves_twiml_and_status_callback(self):
        http = http_client(self)
        fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(ring_after=0.01, answer_after=0.01))
        base = await serve(self, fake.resource())
        node_a, node_b = _Node(TWIML_PAUSE), _Node(TWIML_PAUSE)
        url_a = await serve(self, node_a) + "/voice/webhook"
        url_b = await serve(self, node_b) + "/voice/webhook"
        a = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_a)
        b = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_b)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        call = fake.calls[placed.provider_call_id]
        self.addCleanup(_hang_up, fake, call)
        await eventually(lambda: node_a.requests and call.status == "in-progress", 5, "the call runs A's TwiML")
        record = CallRecord(
            call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call.sid,
        )

        await b.repoint_call(record, url_b)

        update = fake.requests[-1]
        method, path, data = _sdk_twilio_update(
            call.sid, url=update.get("Url"), method="POST",
            status_callback=update.get("StatusCallback"), status_callback_method="POST",
        )
        self.assertEqual((update.method, update.path), (method, path))
        self.assertEqual(update.form_dict, data)
        self.assertTrue(update.get("Url").startswith(url_b + "?callId=c1&n="))
        self.assertEqual(update.get("StatusCallback"), url_b + "?callId=c1&type=status")
        # Twilio follows the update at once: B's TwiML, fetched with a POST signed for B's URL.
        await eventually(lambda: node_b.requests, 5, "Twilio fetches B's TwiML")
        fetch_method, uri, headers, form = node_b.requests[0]
        self.assertEqual(fetch_method, "POST")
        self.assertEqual(form["CallSid"], call.sid)
        self.assertEqual(form["CallStatus"], "in-progress")
        from twilio.request_validator import RequestValidator

        self.assertTrue(RequestValidator(TOKEN).validate(url_b.split("/voice")[0] + uri, form, headers["x-twilio-signature"]))
        # ...and the call's end is reported to B (only `completed`, as for any update).
        seen_at_a = len(node_a.requests)
        call.hangup_by_callee()
        await eventually(lambda: any(r[3].get("CallStatus") == "completed" for r in node_b.requests), 5, "B hears the end")
        self.assertEqual(len(node_a.requests), seen_at_a)
        status = next(r for r in node_b.requests if r[3].get("CallStatus") == "completed")
        self.assertEqual(status[1], "/voice/webhook?callId=c1&type=status")

    async def test_update_of_a_call_not_answered_is_refused(self):
        """Twilio cannot redirect a ringing call (21220): the adopter is told, nothing changes."""
        http = http_client(self)
        fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(ring_after=0.01, answer_after=30))
        base = await serve(self, fake.resource())
        node_a = _Node(TWIML_PAUSE)
        url_a = await serve(self, node_a) + "/voice/webhook"
        a = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_a)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        call = fake.calls[placed.provider_call_id]
        self.addCleanup(_hang_up, fake, call)
        record = CallRecord(
            call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state=CallState.RINGING,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call.sid,
        )
        from voicecall.domain.carrier import ProviderError

        with self.assertRaises(ProviderError) as caught:
            await a.repoint_call(record, "http://127.0.0.1:9/voice/webhook")
        self.assertEqual(caught.exception.code, 21220)
        self.assertEqual(call.status_callback, url_a + "?callId=c1&type=status")


class PlivoRepointTests(TestCase):
    """A Plivo call placed by node A, transferred to node B's XML by B's provider."""

    timeout = 30

    async def test_transfer_to_the_adopter(self):
        http = http_client(self)
        fake = FakePlivo(reactor, PLIVO_ID, TOKEN, http, scenario=PlivoScenario(ring_after=0.01, answer_after=0.01))
        base = await serve(self, fake.resource())
        node_a = _Node(PLIVO_WAIT)
        url_a = await serve(self, node_a) + "/voice/webhook"
        node_b = _Node(PLIVO_WAIT)
        url_b = await serve(self, node_b) + "/voice/webhook"
        a = PlivoProvider(http, reactor, PLIVO_ID, TOKEN, base_url=base, webhook_url=url_a)
        b = PlivoProvider(http, reactor, PLIVO_ID, TOKEN, base_url=base, webhook_url=url_b)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        await eventually(lambda: node_a.requests, 5, "the call runs A's XML")
        call_uuid = node_a.requests[0][3]["CallUUID"]
        call = fake.calls[call_uuid] if call_uuid in fake.calls else next(iter(fake.calls.values()))
        self.addCleanup(_hang_up, fake, call)
        self.assertNotEqual(placed.provider_call_id, call_uuid)
        record = CallRecord(
            call_id="c1", provider="plivo", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call_uuid,
        )

        await b.repoint_call(record, url_b)

        transfer = fake.requests[-1]
        method, path, data = _sdk_plivo_transfer(call_uuid, legs="aleg", aleg_url=transfer.body["aleg_url"], aleg_method="POST")
        self.assertEqual((transfer.method, transfer.path), (method, f"/v1/Account/{PLIVO_ID}{path}"))
        data.pop("call_uuid")  # the SDK repeats the path's uuid in the body (its to_param_dict)
        self.assertEqual(transfer.body, data)
        self.assertTrue(transfer.body["aleg_url"].startswith(url_b + "?provider=plivo&flow=xml-listen&callId=c1&n="))
        await eventually(lambda: node_b.requests, 5, "Plivo fetches B's XML")
        self.assertEqual(node_b.requests[0][0], "POST")
        self.assertEqual(node_b.requests[0][3]["CallUUID"], call_uuid)


class ManagerAdoptTests(test_manager.ManagerTestsBase):
    """CallManager.adopt: the live calls of a dead node, loaded from the store, run here."""

    def dead_node_call(self, **answered):
        """A call initiated and answered by this test's manager, which then dies (node A)."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event(EventType.ANSWERED, call_id, dedupe_key="ans", **answered)
        self.event(EventType.SPEECH, call_id, dedupe_key="sp1", transcript="hello", is_final=True)
        self.manager.stop()
        return call_id

    def test_adopted_call_runs_here(self):
        """The adopter holds the call with its transcript; an event A applied is not applied twice."""
        call_id = self.dead_node_call()
        adopter = self.make_manager()
        record = self.stored(call_id)
        self.manager = adopter
        adopted = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([record])))
        self.assertEqual([c.call_id for c in adopted], [call_id])
        self.assertIs(adopter.find(call_id), adopted[0])
        self.assertEqual([t.text for t in adopter.find(call_id).transcript], ["Hi", "hello"])
        self.event(EventType.SPEECH, call_id, dedupe_key="sp1", transcript="hello", is_final=True)
        self.assertEqual(len(self.stored(call_id).transcript), 2)
        self.event(EventType.SPEECH, call_id, dedupe_key="sp2", transcript="again", is_final=True)
        self.assertEqual([t.text for t in self.stored(call_id).transcript], ["Hi", "hello", "again"])

    def test_adopting_twice_keeps_the_held_call(self):
        """A call this node already holds is not taken over again (nor returned to re-point)."""
        call_id = self.dead_node_call()
        adopter = self.make_manager()
        record = self.stored(call_id)
        first = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([record])))
        again = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.assertEqual(again, [])
        self.assertIs(adopter.find(call_id), first[0])

    def test_adopted_call_keeps_its_max_duration(self):
        """A call answered 290 s before its adoption is hung up 10 s after it (reason timeout)."""
        call_id = self.dead_node_call()
        self.clock.advance(290)
        adopter = self.make_manager()
        self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.clock.advance(9.9)
        self.assertEqual(self.actions("hangup"), [])
        self.clock.advance(0.1)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])

    def test_call_ended_at_the_carrier_is_closed(self):
        """A call that ended while its node was dead is closed (completed), not adopted."""
        call_id = self.dead_node_call(provider_call_id="mock-ended-1")
        adopter = self.make_manager()
        adopted = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.assertEqual(adopted, [])
        self.assertEqual(self.stored(call_id).state, CallState.COMPLETED)
