"""
Tests for voicecall.web.webhook and voicecall.web.limits: the SPEC §8.1 webhook pipeline with the
[H] pre-auth limits, driven by raw HTTP bytes through a real ScreenedSite channel on a
StringTransport (so "answered before the body is read" means: answered when only the headers
were sent), with the mock provider and a real CallManager on a Clock.
"""
from __future__ import annotations

import json

from attrs import define
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.manager import CallManager
from voicecall.domain.model import CallState
from voicecall.providers.base import Verification
from voicecall.providers.mock import MockProvider
from voicecall.providers.twiml import hold_music
from voicecall.web.limits import (
    EVICT_PENDING_AFTER_SECONDS,
    HEADERS_TIMEOUT_SECONDS,
    MAX_BODY_BYTES,
    MAX_IN_FLIGHT_PER_IP,
    MAX_PENDING_TOTAL,
    READ_TIMEOUT_SECONDS,
    ScreenedSite,
)
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.webhook import RootResource, WebhookResource, WebhookScreen

from tests.fixtures import manager_rig

PATH = "/voice/webhook"
CLIENT_IP = "203.0.113.7"


@define
class GatedProvider(MockProvider):
    """The mock provider, with its signature gate and verification switchable."""

    signed: bool = True
    verify_ok: bool = True
    give_key: bool = True
    verified: int = 0

    def has_signature_headers(self, headers):
        return self.signed

    def verify_webhook(self, ctx):
        self.verified += 1
        if not self.verify_ok:
            return Verification(ok=False, reason="Invalid signature")
        verdict = super().verify_webhook(ctx)
        return verdict if self.give_key else Verification(ok=True)


class Boom(Exception):
    """A failure inside event processing, with text that must not reach the carrier."""


class ManagerProxy:
    """Passes events to the real manager; counts them, and can fail or hold them on demand."""

    def __init__(self, manager: CallManager) -> None:
        self._manager = manager
        self.seen: list = []
        self.fail_next = 0
        self.held: list[Deferred] | None = None

    async def process_event(self, event) -> None:
        self.seen.append(event)
        if self.fail_next:
            self.fail_next -= 1
            raise Boom("secret-internal-detail: disk on fire")
        if self.held is not None:
            gate: Deferred = Deferred()
            self.held.append(gate)
            await gate
        await self._manager.process_event(event)


@define
class Response:
    status: int
    headers: dict
    body: bytes


def parse_response(data: bytes) -> Response:
    """One HTTP/1.1 response (Content-Length or chunked body)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"incomplete response: {data!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
    else:
        body = rest[: int(headers.get("content-length", len(rest)))]
    return Response(status, headers, body)


class Conn:
    """One client connection to the site, over a StringTransport."""

    def __init__(self, site: ScreenedSite, ip: str) -> None:
        address = IPv4Address("TCP", ip, 40000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 3334))
        self.channel.makeConnection(self.transport)
        self.lost = False

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def headers(self, method: bytes = b"POST", path: bytes = PATH.encode(), length: int | None = None, extra: bytes = b"") -> None:
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:3334\r\nContent-Type: application/json\r\n" % (method, path)
        if length is not None:
            head += b"Content-Length: %d\r\n" % length
        self.send(head + extra + b"\r\n")

    @property
    def answered(self) -> bool:
        return self.transport.value() != b""

    def response(self) -> Response:
        return parse_response(self.transport.value())

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.channel.connectionLost(Failure(ConnectionDone()))


class WebhookTestsBase(SynchronousTestCase):
    def setUp(self):
        rig = manager_rig(
            self, lambda clock: GatedProvider(clock=clock), webhook_url="http://127.0.0.1:3334" + PATH, max_concurrent_calls=5
        )
        self.clock, self.store, self.provider, self.manager = rig.clock, rig.store, rig.provider, rig.manager
        self.proxy = ManagerProxy(self.manager)
        self.resource = WebhookResource(
            provider=self.provider,
            manager=self.proxy,
            reconstruct_url=lambda pq, headers, ip: "http://127.0.0.1:3334" + pq,
            path=PATH,
            replays=ReplayCache(self.clock),
            responses=ResponseCache(self.clock),
        )
        self.refusals: list[int] = []
        self.site = ScreenedSite(
            RootResource(webhook=self.resource),
            clock=self.clock,
            screen=WebhookScreen(provider=self.provider, path=PATH, skip_signature=False),
            on_refused=self.refusals.append,
        )

    def connect(self, ip: str = CLIENT_IP) -> Conn:
        conn = Conn(self.site, ip)
        self.addCleanup(conn.lose)
        return conn

    def request(self, body: bytes, method: bytes = b"POST", path: str = PATH, ip: str = CLIENT_IP) -> Conn:
        conn = self.connect(ip)
        conn.headers(method, path.encode(), len(body))
        conn.send(body)
        return conn

    def post(self, body: bytes, **kw) -> Response:
        conn = self.request(body, **kw)
        self.assertTrue(conn.answered, "no answer")
        return conn.response()

    def place(self) -> str:
        return self.successResultOf(Deferred.fromCoroutine(self.manager.initiate("+15550001234")))

    def stored(self, call_id: str):
        return self.successResultOf(self.store.get_call(call_id))

    @staticmethod
    def payload(*events: dict) -> bytes:
        return json.dumps({"events": list(events)}).encode()


class RoutingTests(WebhookTestsBase):
    """SPEC §8.1 steps 2-4 and 9: hold music, path, method, then events into the manager."""

    def test_hold_music(self):
        """GET /voice/hold-music answers 200 text/xml with the hold-music TwiML."""
        conn = self.connect()
        conn.headers(b"GET", b"/voice/hold-music")
        response = conn.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/xml"), response.headers)
        self.assertEqual(response.body, hold_music().encode())

    def test_wrong_path(self):
        """A path other than the webhook path is 404 and applies nothing."""
        response = self.post(self.payload({"type": "call.ringing", "callId": "x"}), path="/voice/other")
        self.assertEqual((response.status, response.body), (404, b"Not Found"))
        self.assertEqual(self.proxy.seen, [])

    def test_get_not_allowed(self):
        """A GET on the webhook path is 405 naming POST as allowed."""
        conn = self.connect()
        conn.headers(b"GET", PATH.encode())
        response = conn.response()
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers.get("allow"), "POST")

    def test_trailing_slash_and_query(self):
        """The webhook path matches with one trailing slash and a query string."""
        call_id = self.place()
        response = self.post(self.payload({"type": "call.ringing", "callId": call_id}), path=PATH + "/?provider=mock")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.stored(call_id).state, CallState.RINGING)

    def test_events_applied(self):
        """Mock events posted to the webhook reach the manager and the store; the answer is 200 OK."""
        call_id = self.place()
        response = self.post(
            self.payload({"type": "call.ringing", "callId": call_id}, {"type": "call.answered", "callId": call_id})
        )
        self.assertEqual((response.status, response.body), (200, b"OK"))
        record = self.stored(call_id)
        self.assertEqual(record.state, CallState.ANSWERED)
        self.assertIsNotNone(record.answered_at)

    def test_single_event_shape(self):
        """The `{event}` body shape is applied too."""
        call_id = self.place()
        self.post(json.dumps({"event": {"type": "call.ended", "callId": call_id, "reason": "busy"}}).encode())
        record = self.stored(call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.BUSY, "busy"))

    def test_keep_alive_requests_release_their_slots(self):
        """Many requests one after another on one kept-alive connection are all served."""
        call_id = self.place()
        conn = self.connect()
        for n in range(MAX_IN_FLIGHT_PER_IP * 2):
            body = self.payload({"type": "call.ringing", "callId": call_id, "id": f"ring-{n}"})
            conn.headers(length=len(body))
            conn.send(body)
        self.assertEqual(conn.transport.value().count(b"HTTP/1.1 200 OK"), MAX_IN_FLIGHT_PER_IP * 2)
        self.assertNotIn(b"429", conn.transport.value())

    def test_invalid_json(self):
        """A body that is not JSON is answered 400 and applies nothing."""
        response = self.post(b"{this is not json")
        self.assertEqual(response.status, 400)
        self.assertEqual(self.proxy.seen, [])


class ReplayTests(WebhookTestsBase):
    """SPEC §9.6: a replayed request is acknowledged like the original and changes nothing."""

    def test_replay_answers_the_same_and_applies_nothing(self):
        """A second delivery of the same body answers 200 with the same body and reaches no manager."""
        call_id = self.place()
        body = self.payload({"type": "call.speech", "callId": call_id, "transcript": "hello"})
        first = self.post(body)
        before = self.stored(call_id)
        again = self.post(body)
        self.assertEqual((again.status, again.body), (first.status, first.body))
        self.assertEqual(again.status, 200)
        self.assertEqual(len(self.proxy.seen), 1)
        after = self.stored(call_id)
        self.assertEqual(after, before)
        self.assertEqual([t.text for t in after.transcript], ["hello"])
        self.assertEqual((self.resource.counts["ok"], self.resource.counts["replay"]), (1, 1))

    def test_replay_while_original_in_flight(self):
        """A replay arriving while the original is still being processed shares its answer."""
        call_id = self.place()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        self.proxy.held = []
        first = self.request(body)
        second = self.request(body)
        self.assertEqual((first.answered, second.answered), (False, False))
        held, self.proxy.held = self.proxy.held, None
        self.assertEqual(len(held), 1)
        held[0].callback(None)
        self.assertEqual([(c.response().status, c.response().body) for c in (first, second)], [(200, b"OK")] * 2)
        self.assertEqual(len(self.proxy.seen), 1)

    def test_different_body_is_not_a_replay(self):
        """A different body with the same event is processed (the manager decides what it means)."""
        call_id = self.place()
        self.post(self.payload({"type": "call.speech", "callId": call_id, "transcript": "one"}))
        self.post(self.payload({"type": "call.speech", "callId": call_id, "transcript": "two"}))
        self.assertEqual(len(self.proxy.seen), 2)
        self.assertEqual([t.text for t in self.stored(call_id).transcript], ["one", "two"])


class BodyLimitTests(WebhookTestsBase):
    """SPEC §8.1 step 7 [H]: 64 KiB and 5 s for the body."""

    def test_declared_too_large_with_expect_continue(self):
        """A declared-too-large request sent with `Expect: 100-continue` gets the 413 and no invitation to send."""
        conn = self.connect()
        conn.headers(length=MAX_BODY_BYTES * 4, extra=b"Expect: 100-continue\r\n")
        self.assertEqual(conn.response().status, 413)
        self.assertNotIn(b"100 Continue", conn.transport.value())

    def test_declared_too_large(self):
        """A declared Content-Length over 64 KiB is answered 413 once the headers are in, and closed."""
        conn = self.connect()
        conn.headers(length=MAX_BODY_BYTES + 1)
        self.assertTrue(conn.answered, "not answered before the body")
        self.assertEqual(conn.response().status, 413)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual((self.provider.verified, self.proxy.seen), (0, []))
        self.assertEqual(self.refusals, [413])

    def test_chunked_too_large(self):
        """A chunked body that grows past 64 KiB is answered 413 mid-stream and never processed."""
        conn = self.connect()
        conn.headers(extra=b"Transfer-Encoding: chunked\r\n")
        piece = b"x" * 40_000
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertFalse(conn.answered)
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertTrue(conn.answered)
        self.assertEqual(conn.response().status, 413)
        self.assertTrue(conn.transport.disconnecting)
        conn.send(b"0\r\n\r\n")
        self.assertEqual((self.provider.verified, self.proxy.seen), (0, []))

    def test_chunked_within_limit(self):
        """A chunked body within the cap is processed normally."""
        call_id = self.place()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        conn = self.connect()
        conn.headers(extra=b"Transfer-Encoding: chunked\r\n")
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(self.stored(call_id).state, CallState.RINGING)

    def test_exactly_the_cap(self):
        """A body of exactly 64 KiB is accepted."""
        call_id = self.place()
        start = json.dumps({"events": [{"type": "call.ringing", "callId": call_id}], "pad": ""}).encode()
        body = start[:-2] + b"p" * (MAX_BODY_BYTES - len(start)) + start[-2:]
        self.assertEqual(len(body), MAX_BODY_BYTES)
        self.assertEqual(self.post(body).status, 200)
        self.assertEqual(self.stored(call_id).state, CallState.RINGING)

    def test_slow_body(self):
        """A body that has not fully arrived 5 s after the headers is answered 408 and closed."""
        conn = self.connect()
        conn.headers(length=100)
        conn.send(b'{"events": [')
        self.clock.advance(READ_TIMEOUT_SECONDS - 0.1)
        self.assertFalse(conn.answered)
        self.clock.advance(0.1)
        response = conn.response()
        self.assertEqual(response.status, 408)
        self.assertIn(b"5s", response.body)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual((self.provider.verified, self.proxy.seen), (0, []))

    def test_body_in_time(self):
        """A body that completes within 5 s is processed, and no 408 follows later."""
        call_id = self.place()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        conn = self.connect()
        conn.headers(length=len(body))
        self.clock.advance(READ_TIMEOUT_SECONDS - 1)
        conn.send(body)
        self.clock.advance(60)
        self.assertEqual(conn.response().status, 200)
        self.assertNotIn(b"408", conn.transport.value())


class HeaderBudgetTests(WebhookTestsBase):
    """Slow headers get a time budget too (a byte now and then must not hold a connection forever)."""

    def test_dribbled_headers_are_cut_off(self):
        """Headers still incomplete HEADERS_TIMEOUT_SECONDS after the connection opened: 408, closed."""
        conn = self.connect()
        conn.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\n")
        for _ in range(int(HEADERS_TIMEOUT_SECONDS) - 1):
            self.clock.advance(1)
            conn.send(b"X-Slow: a\r\n")  # each byte would reset the idle timeout
        self.assertFalse(conn.answered)
        self.clock.advance(1)
        self.assertEqual(conn.response().status, 408)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(self.refusals, [408])
        self.assertEqual((self.provider.verified, self.proxy.seen), (0, []))

    def test_silent_connection_is_cut_off(self):
        """A connection that never sends a request line is closed after the budget too."""
        conn = self.connect()
        self.clock.advance(HEADERS_TIMEOUT_SECONDS)
        self.assertEqual(conn.response().status, 408)
        self.assertTrue(conn.transport.disconnecting)

    def test_pipelined_request_keeps_no_stale_budget(self):
        """A request pipelined behind another, slow to process, is not cut off by a header budget it met."""
        call_id = self.place()
        conn = self.connect()
        first = self.payload({"type": "call.ringing", "callId": call_id})
        second = self.payload({"type": "call.answered", "callId": call_id})
        head = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:3334\r\nContent-Type: application/json\r\n"
        self.proxy.held = []
        conn.send(head + b"Content-Length: %d\r\n\r\n" % len(first) + first + head + b"Content-Length: %d\r\n\r\n" % len(second))
        self.proxy.held.pop().callback(None)  # the first is answered; the second's headers are in
        conn.send(second)  # its body: now it is processed, slowly
        self.clock.advance(HEADERS_TIMEOUT_SECONDS + 1)
        self.assertNotIn(b"408", conn.transport.value())
        self.proxy.held.pop().callback(None)
        self.assertEqual(conn.transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_budget_is_per_request(self):
        """On a kept-alive connection each request gets its own budget, counted from its first byte."""
        call_id = self.place()
        conn = self.connect()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        conn.headers(length=len(body))
        conn.send(body)
        self.assertEqual(conn.response().status, 200)
        answered = len(conn.transport.value())
        self.clock.advance(HEADERS_TIMEOUT_SECONDS * 3)  # idle between requests: the idle timeout's business
        self.assertFalse(conn.transport.disconnecting)
        conn.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\n")
        self.clock.advance(HEADERS_TIMEOUT_SECONDS)
        self.assertIn(b"408 Request Timeout", conn.transport.value()[answered:])


class InFlightTests(WebhookTestsBase):
    """SPEC §8.1 step 6 [H]: at most 8 requests in flight per remote IP."""

    def held_by_headers(self, n: int, ip: str = CLIENT_IP) -> list[Conn]:
        """`n` requests whose headers arrived and whose bodies have not."""
        conns = []
        for _ in range(n):
            conn = self.connect(ip)
            conn.headers(length=10)
            self.assertFalse(conn.answered)
            conns.append(conn)
        return conns

    def test_ninth_refused_while_eight_wait_for_bodies(self):
        """With 8 requests awaiting their bodies, a 9th from the same IP is 429 before its body."""
        self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        ninth = self.connect()
        ninth.headers(length=10)
        self.assertEqual(ninth.response().status, 429)
        self.assertTrue(ninth.transport.disconnecting)
        self.assertEqual(self.refusals, [429])

    def test_other_ip_unaffected(self):
        """Another remote IP is not limited by the first one's requests."""
        self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        call_id = self.place()
        response = self.post(self.payload({"type": "call.ringing", "callId": call_id}), ip="198.51.100.9")
        self.assertEqual(response.status, 200)

    def test_processing_holds_no_slot(self):
        """Requests whose bodies are in (verified) hold no slot while the manager works on them: a 9th is served too."""
        call_id = self.place()
        self.proxy.held = []
        conns = [
            self.request(self.payload({"type": "call.ringing", "callId": call_id, "id": f"ring-{n}"}))
            for n in range(MAX_IN_FLIGHT_PER_IP + 1)
        ]
        self.assertEqual([c.answered for c in conns], [False] * (MAX_IN_FLIGHT_PER_IP + 1))
        self.assertEqual(len(self.site._screen._limiter), 0)
        held, self.proxy.held = self.proxy.held, None
        for gate in held:
            gate.callback(None)
        self.assertEqual([c.response().status for c in conns], [200] * (MAX_IN_FLIGHT_PER_IP + 1))

    def test_body_with_headers_needs_no_slot(self):
        """With 8 slow bodies holding the address's slots, a request whose body came with its headers is served at once."""
        self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        call_id = self.place()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        conn = self.connect()
        conn.send(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:3334\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (PATH.encode(), len(body), body)
        )
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(self.refusals, [])

    def test_slow_body_yields_its_slot(self):
        """A full address hands the slot of a body arriving for EVICT_PENDING_AFTER_SECONDS to a newcomer (408 for the slow one)."""
        slow = self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        self.clock.advance(EVICT_PENDING_AFTER_SECONDS / 2)
        young = self.connect()
        young.headers(length=10)
        self.assertEqual(young.response().status, 429)
        self.clock.advance(EVICT_PENDING_AFTER_SECONDS / 2)
        call_id = self.place()
        body = self.payload({"type": "call.ringing", "callId": call_id})
        late = self.connect()
        late.headers(length=len(body))
        self.assertFalse(late.answered)
        self.assertEqual(slow[0].response().status, 408)
        self.assertTrue(slow[0].transport.disconnecting)
        self.assertEqual([c.answered for c in slow[1:]], [False] * (MAX_IN_FLIGHT_PER_IP - 1))
        late.send(body)
        self.assertEqual(late.response().status, 200)
        self.assertEqual(self.site._screen._limiter._counts[CLIENT_IP], MAX_IN_FLIGHT_PER_IP - 1)

    def test_total_cap(self):
        """Unverified bodies in flight are capped over all addresses too."""
        for n in range(MAX_PENDING_TOTAL // MAX_IN_FLIGHT_PER_IP):
            self.held_by_headers(MAX_IN_FLIGHT_PER_IP, ip=f"198.51.{n // 200}.{n % 200 + 1}")
        other = self.connect("203.0.113.99")
        other.headers(length=10)
        self.assertEqual(other.response().status, 429)

    def test_slot_freed_by_completion(self):
        """When one held request completes, the IP may start another."""
        conns = self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        conns[0].send(b'{"events":[]}'[:10])
        self.assertEqual(conns[0].response().status, 400)
        late = self.connect()
        late.headers(length=10)
        self.assertFalse(late.answered)

    def test_slot_freed_by_disconnect(self):
        """When a held request's client goes away, the IP may start another."""
        conns = self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        conns[0].lose()
        late = self.connect()
        late.headers(length=10)
        self.assertFalse(late.answered)

    def test_slot_freed_by_timeout(self):
        """Requests refused 408 free their slots."""
        self.held_by_headers(MAX_IN_FLIGHT_PER_IP)
        self.clock.advance(READ_TIMEOUT_SECONDS)
        late = self.connect()
        late.headers(length=10)
        self.assertFalse(late.answered)

    def test_client_gone_while_processing(self):
        """A client that disconnects while its events are processed gets nothing written and logs nothing."""
        call_id = self.place()
        self.proxy.held = []
        conn = self.request(self.payload({"type": "call.ringing", "callId": call_id}))
        conn.lose()
        written = conn.transport.value()
        held, self.proxy.held = self.proxy.held, None
        held[0].callback(None)
        self.assertEqual(conn.transport.value(), written)
        self.assertEqual(self.stored(call_id).state, CallState.RINGING)
        self.assertEqual(self.flushLoggedErrors(), [])


class SignatureGateTests(WebhookTestsBase):
    """SPEC §8.1 steps 5 and 8: unsigned requests are refused before their bodies are read."""

    def test_unsigned_refused_before_body(self):
        """A POST without the provider's signature headers is 401 once its headers are in."""
        self.provider.signed = False
        conn = self.connect()
        conn.headers(length=50)
        self.assertTrue(conn.answered, "not answered before the body")
        self.assertEqual(conn.response().status, 401)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual((self.provider.verified, self.proxy.seen), (0, []))
        self.assertEqual(self.refusals, [401])

    def test_refusal_does_not_invite_the_body(self):
        """A request refused before its body, sent with `Expect: 100-continue`, is not told to continue."""
        self.provider.signed = False
        conn = self.connect()
        conn.headers(length=50, extra=b"Expect: 100-continue\r\n")
        self.assertEqual(conn.response().status, 401)
        self.assertNotIn(b"100 Continue", conn.transport.value())

    def test_unsigned_requests_take_no_slots(self):
        """Unsigned requests refused at the gate do not use up the IP's in-flight slots."""
        self.provider.signed = False
        for _ in range(MAX_IN_FLIGHT_PER_IP * 2):
            self.connect().headers(length=50)
        self.provider.signed = True
        conn = self.connect()
        conn.headers(length=10)
        self.assertFalse(conn.answered)

    def test_unsigned_get_is_405(self):
        """The gate only screens POSTs: an unsigned GET still gets its 405."""
        self.provider.signed = False
        conn = self.connect()
        conn.headers(b"GET", PATH.encode())
        self.assertEqual(conn.response().status, 405)

    def test_failed_verification(self):
        """A body whose signature does not verify is 401 and applies nothing."""
        self.provider.verify_ok = False
        response = self.post(self.payload({"type": "call.ringing", "callId": "x"}))
        self.assertEqual(response.status, 401)
        self.assertEqual(self.proxy.seen, [])

    def test_verified_without_key(self):
        """A verification without a request key is 401 (SPEC §8.1 step 8)."""
        self.provider.give_key = False
        response = self.post(self.payload({"type": "call.ringing", "callId": "x"}))
        self.assertEqual(response.status, 401)
        self.assertEqual(self.proxy.seen, [])


class FailureTests(WebhookTestsBase):
    """SPEC §8.1 step 10: an unexpected failure is a bare 500, and the carrier's retry is processed."""

    def test_failure_then_retry(self):
        """A failing process_event gives 500 without internals; the same request retried is applied."""
        call_id = self.place()
        body = self.payload({"type": "call.answered", "callId": call_id})
        self.proxy.fail_next = 1
        conn = self.request(body)
        response = conn.response()
        self.assertEqual(response.status, 500)
        raw = conn.transport.value()
        for leak in (b"Traceback", b"secret-internal-detail", b"Boom"):
            self.assertNotIn(leak, raw)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(self.stored(call_id).state, CallState.INITIATED)

        retry = self.post(body)
        self.assertEqual((retry.status, retry.body), (200, b"OK"))
        self.assertEqual(self.stored(call_id).state, CallState.ANSWERED)
        self.assertEqual(self.resource.counts["replay"], 0)
        self.assertEqual(len(self.proxy.seen), 2)


class RefusalLogTests(SynchronousTestCase):
    """Refused requests: one clipped line each, at most a burst per interval, then a count."""

    def setUp(self):
        from twisted.logger import globalLogPublisher

        from voicecall.web.limits import REFUSAL_LOG_BURST, REFUSAL_LOG_INTERVAL_SECONDS, RefusalLog

        self.burst, self.interval = REFUSAL_LOG_BURST, REFUSAL_LOG_INTERVAL_SECONDS
        self.clock = Clock()
        self.log = RefusalLog(self.clock)
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("voicecall.web.limits")]

    def test_one_clipped_line(self):
        """Target without its query, cut to 200 characters, control characters gone."""
        self.log.refused(401, "203.0.113.7\x1b[2J", b"POST", b"/voice/" + b"\x1bA" * 500 + b"?callId=secret", "bad\nsignature")
        [line] = self.lines()
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\n", line)
        self.assertNotIn("secret", line)
        self.assertLess(len(line), 400)
        self.assertIn("webhook refused 401 from 203.0.113.7", line)

    def test_rate_limited_with_a_count(self):
        """After the burst, one line says the rest are suppressed; the next interval opens with their count."""
        for _ in range(self.burst + 25):
            self.log.refused(429, "203.0.113.7", b"POST", b"/voice/webhook")
        lines = self.lines()
        self.assertEqual(len(lines), self.burst + 1)
        self.assertIn("further refusals suppressed", lines[-1])
        self.clock.advance(self.interval)
        self.log.refused(429, "203.0.113.7", b"POST", b"/voice/webhook")
        lines = self.lines()
        self.assertIn("suppressed 25 webhook refusals", lines[-2])
        self.assertIn("webhook refused 429", lines[-1])
