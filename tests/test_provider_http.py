"""
Tests for voicecall.infra.jsonhttp: the carriers' REST client reads at most MAX_RESPONSE_BYTES of
an answer. A larger body fails the request with a clear ApiError and drops the connection
instead of being read into memory (integration tier: a real server on 127.0.0.1:0 that streams
its body only as fast as the client reads it). A body that stops arriving fails the request once
its time is up, and the connection dropped after it fires nothing a second time.
"""
from __future__ import annotations

import gc
import json

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import AlreadyCalledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from voicecall.infra.jsonhttp import MAX_RESPONSE_BYTES, ApiClient, ApiError
from tests.harness import eventually

CHUNK = 64 * 1024
#: What the oversized answers would send in all: far more than loopback's socket buffers hold.
HUGE = 64 * 1024 * 1024


class _Streamer:
    """A pull producer writing `total` bytes of `{"x": "aaa...` as the transport asks for them."""

    def __init__(self, request, total: int, done: Deferred) -> None:
        self.request, self.total, self.sent, self.done = request, total, 0, done
        self.lost = False
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: object) -> None:
        self.lost = not isinstance(result, type(None))
        self.done.callback(self)

    def resumeProducing(self) -> None:
        if self.lost or self.done.called:
            return
        if self.sent >= self.total:
            self.request.unregisterProducer()
            self.request.finish()
            return
        head = b'{"x": "' if self.sent == 0 else b""
        data = head + b"a" * (min(CHUNK, self.total - self.sent) - len(head))
        self.sent += len(data)
        self.request.write(data)

    def stopProducing(self) -> None:
        self.lost = True


class _Oversized(Resource):
    """Answers every request with a body of `total` bytes, announced (Content-Length) or chunked."""

    isLeaf = True

    def __init__(self, total: int, announce: bool) -> None:
        super().__init__()
        self.total, self.announce = total, announce
        self.streams: list[Deferred] = []

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        if self.announce:
            request.setHeader(b"content-length", str(self.total).encode())
        done: Deferred = Deferred()
        self.streams.append(done)
        request.registerProducer(_Streamer(request, self.total, done), False)
        return NOT_DONE_YET


class _Small(Resource):
    isLeaf = True

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__()
        self.body, self.status = body, status

    def render(self, request):
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class ResponseSizeCapTests(TestCase):
    """ApiClient enforces its documented cap on response bodies while reading them."""

    async def _client(self, resource: Resource) -> ApiClient:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        base = f"http://127.0.0.1:{port.getHost().port}"
        return ApiClient(http, base, "Twilio API error", ("AC1", "token"), clock=reactor, timeout=30.0)

    async def _refused(self, announce: bool) -> None:
        resource = _Oversized(HUGE, announce)
        client = await self._client(resource)
        with self.assertRaises(ApiError) as caught:
            await client.request("GET", "/calls")
        self.assertEqual(
            str(caught.exception), f"Twilio API error: answer larger than {MAX_RESPONSE_BYTES} bytes"
        )
        self.assertEqual(caught.exception.status, 200)
        [done] = resource.streams
        stream = await done
        self.assertTrue(stream.lost, "the client dropped the connection")
        # Bounded: the client stopped reading near the cap, the server never got to the end.
        self.assertLess(stream.sent, HUGE // 4)

    async def test_oversized_chunked_body_refused(self):
        """A chunked answer that passes the cap fails with a clear error and its connection is dropped."""
        await self._refused(announce=False)

    async def test_oversized_announced_body_refused(self):
        """An answer whose Content-Length passes the cap fails the same way, without reading it all."""
        await self._refused(announce=True)

    async def test_body_at_the_cap_read_whole(self):
        """An answer of exactly MAX_RESPONSE_BYTES is still read and decoded."""
        text = b'{"x": "' + b"a" * (MAX_RESPONSE_BYTES - 9) + b'"}'
        self.assertEqual(len(text), MAX_RESPONSE_BYTES)
        client = await self._client(_Small(text))
        answer = await client.request("GET", "/calls")
        self.assertEqual(len(answer["x"]), MAX_RESPONSE_BYTES - 9)

    async def test_normal_answer(self):
        """A small JSON answer is decoded as before."""
        client = await self._client(_Small(json.dumps({"sid": "CA1", "status": "queued"}).encode()))
        self.assertEqual(await client.request("GET", "/calls"), {"sid": "CA1", "status": "queued"})

    async def test_error_answer_keeps_its_text(self):
        """A carrier error (non-2xx) still becomes the SPEC text with the carrier's code."""
        body = json.dumps({"code": 21211, "message": "bad To"}).encode()
        client = await self._client(_Small(body, status=400))
        with self.assertRaises(ApiError) as caught:
            await client.request("POST", "/calls", form=[("To", "x")])
        self.assertEqual(str(caught.exception), f"Twilio API error: 400 {body.decode()}")
        self.assertEqual((caught.exception.status, caught.exception.code), (400, 21211))


class _Stalled(Resource):
    """Sends the headers and the first bytes of a 100-byte body, then nothing more."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        self.lost: list[Deferred] = []

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"100")
        request.write(b'{"sid": ')
        self.requests.append(request)
        self.lost.append(request.notifyFinish().addErrback(lambda failure: failure.value))
        return NOT_DONE_YET


async def stalled_server(case: TestCase) -> tuple[_Stalled, str, HTTPClient]:
    """A loopback server whose answers stall after their first bytes, its base URL, and a client
    for it that keeps no connection (both closed when `case` ends)."""
    resource = _Stalled()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    case.addCleanup(port.stopListening)
    pool = HTTPConnectionPool(reactor, persistent=False)
    case.addCleanup(pool.closeCachedConnections)
    return resource, f"http://127.0.0.1:{port.getHost().port}", HTTPClient(Agent(reactor, pool=pool))


class BodyTimeoutTests(TestCase):
    """The time limit bounds the body too, and fires the request's outcome once."""

    async def test_stalled_body_then_dropped_connection(self):
        """
        Headers, then a body that stalls past the time limit: the request fails with the SPEC
        timeout text; the connection dropped afterwards (by the client's abort) reaches the
        already-cancelled body reader, which must not fire again (no AlreadyCalledError logged).
        """
        resource, base, http = await stalled_server(self)
        clock = Clock()
        client = ApiClient(http, base, "Twilio API error", clock=clock, timeout=5.0)
        outcome = Deferred.fromCoroutine(client.request("GET", "/calls"))
        await eventually(clock.getDelayedCalls, 10, "the body's time limit armed (headers received)")
        self.assertFalse(outcome.called)
        clock.advance(5.0)
        failure = self.failureResultOf(outcome, ApiError)
        self.assertEqual(str(failure.value), "Twilio API error: no answer within 5s")
        [lost] = resource.lost
        # The client's transport closes its socket and tells its protocol (and the body reader)
        # in one step, before the server can read the end of the stream.
        await eventually(lambda: lost.called, 10, "the server seeing the connection dropped")
        self.assertIsInstance(lost.result, Exception)
        gc.collect()  # a Deferred left failed (the second firing's error) logs when it is collected
        self.assertEqual(self.flushLoggedErrors(AlreadyCalledError), [])
        self.assertEqual(self.flushLoggedErrors(), [])


class ResponderBodyTimeoutTests(TestCase):
    """The built-in responder's time limit covers the answer's body, not only its headers."""

    async def test_stalled_answer_fails_on_time(self):
        from voicecall.speech.responder import ChatResponder
        from voicecall.domain.model import CallRecord

        resource, base, http = await stalled_server(self)
        clock = Clock()
        responder = ChatResponder(
            http=http, base_url=base + "/v1",
            api_key="sk-test", model="openai/gpt-test", timeout_ms=5000, clock=clock,
        )
        call = CallRecord(call_id="c1", provider="mock", direction="inbound", state="answered", from_number="+15550001234", to_number="+15550000000", started_at=0)
        outcome = responder.respond(call, "Hello?")
        await eventually(clock.getDelayedCalls, 10, "the body's time limit armed (headers received)")
        clock.advance(5.0)
        failure = self.failureResultOf(outcome, ApiError)
        self.assertEqual(str(failure.value), "Response API error: no answer within 5s")
        [lost] = resource.lost
        await eventually(lambda: lost.called, 10, "the stalled answer's connection dropped")
