"""
Tests for voicecall.infra.private.http and .client: the private names of Twisted's HTTPChannel the
webhook channel reads and of its client Response the JSON client reads, pinned (a Twisted without
one fails here, naming it), and the public paths they fall back to (forced here). The webhook's is
carried through a real daemon's webhook over loopback: a signed callback is served, a slow-body
flood is refused within its bounds, and a pipelining client that stops reading is paused and, once
it reads again, gets every answer. The client's through a real server whose body stalls.
"""
from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import Response
from twisted.web.http import HTTPChannel

from voicecall.infra.jsonhttp import ApiClient, ApiError
from voicecall.infra.private import client as private_client
from voicecall.infra.private import http as private_http
from voicecall.infra.private.http import PRIVATE_NAMES, _Held, handling_request, unparsed_bytes

from tests import test_webhook_flood, test_webhook_screening
from tests.harness import eventually
from tests.test_provider_http import stalled_server


class PrivateNamesTests(SynchronousTestCase):
    """Every private name read (PRIVATE_NAMES), pinned on a live channel."""

    def test_the_import_time_check_finds_every_name(self) -> None:
        self.assertEqual(private_http._check(), ())
        self.assertTrue(private_http.FAST)

    def test_each_name_on_a_live_channel(self) -> None:
        """Each name, read as the webhook channel reads it, through one request's life."""
        self.assertEqual(PRIVATE_NAMES, ("HTTPChannel._handlingRequest", "LineReceiver._buffer"))
        channel = HTTPChannel()
        channel.requestFactory = _Held
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
        self.assertIs(getattr(channel, "_handlingRequest", None), False, "HTTPChannel._handlingRequest is missing")
        self.assertEqual(getattr(channel, "_buffer", None), b"Ho", "LineReceiver._buffer does not hold the unparsed bytes")
        self.assertEqual((handling_request(channel, unknown=True), unparsed_bytes(channel)), (False, True))
        channel.dataReceived(b"st: x\r\n\r\n")
        self.assertIs(getattr(channel, "_handlingRequest", None), True, "HTTPChannel._handlingRequest is not set while handling")
        self.assertEqual((handling_request(channel, unknown=False), unparsed_bytes(channel)), (True, False))
        channel.requests[0].finish()
        self.assertIs(channel._handlingRequest, False, "HTTPChannel._handlingRequest is not cleared once answered")

    def test_a_changed_handling_flag_is_named(self) -> None:
        class Forgets(HTTPChannel):
            def allContentReceived(self) -> None:
                super().allContentReceived()
                del self._handlingRequest

        self.assertEqual(private_http._check(Forgets), ("HTTPChannel._handlingRequest",))

    def test_a_buffer_kept_elsewhere_is_named(self) -> None:
        class KeepsElsewhere(HTTPChannel):
            def dataReceived(self, data: bytes) -> None:
                self._buffer = self.__dict__.pop("kept", b"")
                super().dataReceived(data)
                self.kept = self.__dict__.pop("_buffer", b"")

        self.assertEqual(private_http._check(KeepsElsewhere), ("LineReceiver._buffer",))

    def test_a_channel_that_does_not_parse_names_everything(self) -> None:
        class Broken(HTTPChannel):
            def dataReceived(self, data: bytes) -> None:
                raise RuntimeError("parser changed")

        self.assertEqual(private_http._check(Broken), PRIVATE_NAMES)
        self.flushLoggedErrors(RuntimeError)

    def test_the_public_path_answers_safely(self) -> None:
        """Without the names: the caller's safe answer for handling, and "perhaps" for unparsed bytes."""
        self.patch(private_http, "FAST", False)
        channel = object()
        self.assertEqual([handling_request(channel, unknown=u) for u in (True, False)], [True, False])
        self.assertTrue(unparsed_bytes(channel))


def _helpers(case: type) -> type:
    """A TestCase with `case`'s set-up and helpers and none of its tests."""
    keep = {name: value for name, value in vars(case).items() if not name.startswith(("test", "__"))}
    return type(case.__name__ + "Helpers", (TestCase,), keep)


class _PublicPath:
    def setUp(self) -> None:
        self.patch(private_http, "FAST", False)
        return super().setUp()


class FallbackFloodTests(_PublicPath, _helpers(test_webhook_flood.WebhookFloodTests)):
    """On the public path: a signed callback served during a slow-body flood the caps bound."""

    test_slow_body_flood = test_webhook_flood.WebhookFloodTests.test_slow_body_flood


class PipeliningTests(_helpers(test_webhook_screening.ScreeningTests)):
    """A pipelining client that stops reading is paused; once it reads again it gets every answer."""

    test_never_reads = test_webhook_screening.ScreeningTests.test_pipelining_client_that_never_reads_is_bounded

    async def test_reads_again(self) -> None:
        """The daemon stops reading the socket, not only parsing; the answers then all come."""
        await self.start(streaming=False)
        request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        count = 1_000_000 // len(request)
        client = self.connect(b"")
        await eventually(lambda: client.transport is not None and client.transport.connected or None, 5, "connected")
        client.transport.pauseProducing()  # read no answer yet
        client.transport.write(request * count)
        [channel] = await eventually(lambda: [c for c in self.daemon_channels() if c.paused], 10, "the daemon to stop parsing")
        # Its socket too (what it already read waits unparsed, bounded by the socket's buffers).
        await eventually(lambda: channel.transport not in reactor.getReaders() or None, 10, "the daemon to stop reading the socket")
        client.transport.resumeProducing()
        await eventually(lambda: client.buffer.count(b"HTTP/1.1 404 ") == count or None, 30, "every answer")
        client.transport.abortConnection()


class FallbackPipeliningTests(_PublicPath, PipeliningTests):
    """The same on the public path."""


class ResponseConnectionTests(SynchronousTestCase):
    """The client Response's private name (private_client.PRIVATE_NAMES), pinned."""

    def test_the_import_time_check_finds_every_name(self) -> None:
        self.assertEqual(private_client.PRIVATE_NAMES, ("Response._transport",))
        self.assertEqual(private_client._check(), ())
        self.assertTrue(private_client.FAST)

    def test_a_missing_connection_is_named(self) -> None:
        made = Response.__init__

        def without_the_connection(self, *args, **kwargs) -> None:
            made(self, *args, **kwargs)
            del self._transport

        self.patch(Response, "__init__", without_the_connection)
        self.assertEqual(private_client._check(), ("Response._transport",))

    def test_the_public_path_has_no_connection(self) -> None:
        self.patch(private_client, "FAST", False)
        self.assertIsNone(private_client.response_connection(object()))


class FallbackBodyTimeoutTests(TestCase):
    """On the public path a stalled body still fails the request at its time limit."""

    async def test_stalled_body(self) -> None:
        self.patch(private_client, "FAST", False)
        resource, base, http = await stalled_server(self)
        clock = Clock()
        client = ApiClient(http, base, "Twilio API error", clock=clock, timeout=5.0)
        outcome = Deferred.fromCoroutine(client.request("GET", "/calls"))
        await eventually(clock.getDelayedCalls, 10, "the body's time limit armed (headers received)")
        clock.advance(5.0)
        failure = self.failureResultOf(outcome, ApiError)
        self.assertEqual(str(failure.value), "Twilio API error: no answer within 5s")
        # The connection is left open (what the public path gives up): the server closes it.
        [request] = resource.requests
        gone = request.notifyFinish().addErrback(lambda failure: None)
        request.channel.transport.abortConnection()
        await gone
