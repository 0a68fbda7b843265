"""
Tests for voicecall.media.stream (the call policy) and voicecall.media.sockets (the wire): the
Twilio media-stream server mounted on the webhook Site as the daemon mounts it, driven by the
TwilioMediaClient or a hand-rolled WebSocket client.

The unit tier runs in memory: every connection is a twisted.test.iosim pair on one
MemoryReactorClock, so time only passes when a test advances it and "nothing happened" is
checked after every byte has been delivered. The integration tier (IntegrationTests) keeps what
only real sockets show: a kernel send buffer that fills (backpressure) and the direct write of
frames to a plain TCP socket; it polls, never sleeps.
"""
from __future__ import annotations

import base64
import json

import autobahn.twisted.websocket
import autobahn.util
import autobahn.websocket.protocol
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.test import iosim
from twisted.test.proto_helpers import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from voicecall.infra.private import ws as private_ws
from voicecall.infra.audio import FRAME_BYTES
from voicecall.infra.private.ws import Wire, neutralise_autobahn_log_formatting, tune_factory
from voicecall.media import sockets
from voicecall.media.sockets import _MEDIA, Admission
from voicecall.media.stream import MediaStreamServer
from voicecall.providers.signatures import verify_twilio
from voicecall.testing.twilio_media import TwilioMediaClient, UpgradeRefused
from voicecall.web.limits import ScreenedSite
from voicecall.web.webhook import RootResource

from tests.harness import eventually
from tests.test_playback import instant

STREAM_PATH = "/voice/stream"
AUTH_TOKEN = "test_auth_token_0123456789abcdef"
START = b'{"event":"start","streamSid":"%s","start":{"callSid":"%s","customParameters":{"token":"t"}}}'


class Handler:
    """A StreamHandler that records every call."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.accepted: list[tuple[str, str | None]] = []
        self.started: list = []
        self.media: list[bytes] = []
        self.media_calls = 0
        self.digits: list[str] = []
        self.stopped: list = []
        self.fail_media = False

    def accept_start(self, call_sid, token):
        self.accepted.append((call_sid, token))
        return self.accept

    def stream_started(self, session):
        self.started.append(session)

    def media_received(self, session, ulaw):
        self.media_calls += 1
        if self.fail_media:
            raise RuntimeError("handler broke")
        self.media.append(ulaw)

    def dtmf_received(self, session, digit):
        self.digits.append(digit)

    def stream_stopped(self, session):
        self.stopped.append(session)


class Webhook(Resource):
    isLeaf = True

    def render(self, request):
        return b"OK"


class Raw(Protocol):
    """Writes a request and collects the whole answer until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


def client_frame(payload: bytes, opcode: int = 1, mask: bytes = b"\x12\x34\x56\x78") -> bytes:
    """A masked client frame (RFC 6455 §5.2), FIN set."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    else:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code(data: bytes) -> int | None:
    """The status code of the first close frame in what the server sent."""
    at = data.find(b"\x88")
    while at != -1:
        if at + 4 <= len(data) and 2 <= data[at + 1] <= 125:
            return int.from_bytes(data[at + 2 : at + 4], "big")
        at = data.find(b"\x88", at + 1)
    return None


class RawWebSocket(Protocol):
    """A hand-rolled WebSocket client that writes exactly the bytes it is given (and never answers a close)."""

    def __init__(self) -> None:
        self.data = b""
        self.head: bytes | None = None
        self.lost = False

    def connectionMade(self):
        self.transport.write(upgrade_request())

    def dataReceived(self, data):
        self.data += data
        if self.head is None and b"\r\n\r\n" in self.data:
            self.head, _, self.data = self.data.partition(b"\r\n\r\n")

    def connectionLost(self, reason):
        self.lost = True


def upgrade_request(host: bytes = b"127.0.0.1", extra: bytes = b"") -> bytes:
    return (
        b"GET " + STREAM_PATH.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


def result(d: Deferred):
    """What `d` fired with (it must have fired)."""
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    value = box[0]
    d.addBoth(lambda _: value)  # leave it as it was for other observers
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


class Memory:
    """
    The media server on the webhook Site, and its clients, in memory: one MemoryReactorClock and
    one iosim pump per connection. flush() delivers every byte; advance() lets time pass.
    """

    def __init__(self, handler: Handler | None = None, **admission) -> None:
        self.clock = MemoryReactorClock()
        self.handler = handler or Handler()
        self.server = MediaStreamServer(self.clock, self.handler, admission=Admission(**admission))
        root = RootResource(webhook=Webhook(), stream_path=STREAM_PATH, stream=self.server.resource)
        self.site = ScreenedSite(root, clock=self.clock, screen=lambda request, length: None)
        self.url = "ws://127.0.0.1:8080" + STREAM_PATH
        self.pumps: list[iosim.IOPump] = []
        self._ports = 40000

    def connect(self, protocol) -> iosim.IOPump:
        """Connect a client `protocol` to the Site from 127.0.0.1 and deliver what it sends first."""
        self._ports += 1
        host = IPv4Address("TCP", "127.0.0.1", 8080)
        peer = IPv4Address("TCP", "127.0.0.1", self._ports)
        server = self.site.buildProtocol(peer)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, hostAddress=host, peerAddress=peer),
            protocol,
            iosim.FakeTransport(protocol, isServer=False, hostAddress=peer, peerAddress=host),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.flush()
        return pump

    def flush(self) -> None:
        """Deliver every byte in flight (and run what is due now) until nothing moves."""
        for _ in range(10_000):
            moved = False
            for pump in self.pumps:
                moved = pump.pump() or moved
            if not moved:
                return
        raise AssertionError("the connections never settled")

    def advance(self, seconds: float, step: float = 0.01) -> None:
        """Let `seconds` pass in `step`s, delivering everything in flight after each."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def client(self, **kwargs) -> TwilioMediaClient:
        """A TwilioMediaClient connected (its upgrade answered, its start sent unless auto_start=False)."""
        kwargs.setdefault("token", "tok")
        client = TwilioMediaClient(self.clock, kwargs.pop("url", self.url), **kwargs)
        client.opened.addErrback(lambda f: f)  # a test that expects a refusal reads it
        client.connect()
        factory = self.clock.tcpClients[-1][2]
        tune_factory(factory._wrappedFactory, self.clock)  # its timers on our clock
        self.connect(factory.buildProtocol(None))
        return client

    def started(self, **kwargs) -> TwilioMediaClient:
        before = len(self.handler.started)
        client = self.client(**kwargs)
        assert len(self.handler.started) == before + 1, "the stream did not start"
        return client

    def raw(self, request: bytes) -> bytes:
        """The server's whole answer to one HTTP request."""
        protocol = Raw(request)
        self.connect(protocol)
        return result(protocol.done)

    def raw_socket(self) -> RawWebSocket:
        protocol = RawWebSocket()
        self.connect(protocol)
        assert protocol.head is not None and protocol.head.startswith(b"HTTP/1.1 101 "), protocol.head
        return protocol

    def send(self, ws: RawWebSocket, data: bytes) -> None:
        ws.transport.write(data)
        self.flush()

    def started_socket(self, stream_sid: bytes = b"MZ3", call_sid: bytes = b"CA3") -> RawWebSocket:
        ws = self.raw_socket()
        before = len(self.handler.started)
        self.send(ws, client_frame(START % (stream_sid, call_sid)))
        assert len(self.handler.started) == before + 1, "the stream did not start"
        return ws

    @property
    def connections(self) -> set:
        return self.server._sockets._connections


class MemoryTestCase(SynchronousTestCase):
    def serve(self, **kwargs) -> Memory:
        self.net = Memory(**kwargs)
        self.handler = self.net.handler
        self.server = self.net.server
        return self.net


class StartTests(MemoryTestCase):
    def test_start_registers_a_session(self):
        """A valid start is offered to accept_start and becomes a session under its stream SID."""
        net = self.serve()
        client = net.started(call_sid="CA123", token="secret-token")
        self.assertEqual(self.handler.accepted, [("CA123", "secret-token")])
        [session] = self.handler.started
        self.assertEqual((session.call_sid, session.stream_sid, session.client_ip), ("CA123", client.stream_sid, "127.0.0.1"))
        self.assertIs(self.server.sessions[client.stream_sid], session)
        self.assertEqual((self.server.active_count, self.server.pending_count), (1, 0))
        self.assertEqual(session.custom_parameters, {})  # the token was used up: the session does not keep it

    def test_valid_start_outlives_the_start_timeout(self):
        """A socket that sent a valid start is no longer pending and stays open past the timeout."""
        net = self.serve(pre_start_timeout=0.2)
        client = net.started(stream_media=False)
        net.advance(0.5)
        self.assertTrue(client.is_open)
        self.assertEqual((self.server.active_count, self.server.pending_count), (1, 0))

    def test_start_timeout(self):
        """A socket without a start is closed 1008 "Start timeout" at the timeout, not before, without consulting accept_start."""
        net = self.serve(pre_start_timeout=0.2)
        client = net.client(auto_start=False)
        self.assertEqual(self.server.pending_count, 1)
        net.advance(0.19)
        self.assertFalse(client.closed.called)
        net.advance(0.02)
        self.assertEqual(result(client.closed), (1008, "Start timeout"))
        self.assertEqual(self.handler.accepted, [])
        self.assertEqual((self.server.pending_count, len(net.connections)), (0, 0))

    def test_missing_call_sid(self):
        """A start without start.callSid is closed 1008 "Missing callSid"."""
        net = self.serve()
        client = net.client(auto_start=False)
        client.send_json({"event": "start", "streamSid": "MZ1", "start": {"customParameters": {"token": "t"}}})
        net.flush()
        self.assertEqual(result(client.closed), (1008, "Missing callSid"))
        self.assertEqual(self.handler.accepted, [])

    def test_unknown_call(self):
        """A start that accept_start refuses is closed 1008 "Unknown call" and never starts."""
        net = self.serve(handler=Handler(accept=False))
        client = net.client(call_sid="CA9", token="wrong")
        self.assertEqual(result(client.closed), (1008, "Unknown call"))
        self.assertEqual(self.handler.accepted, [("CA9", "wrong")])
        self.assertEqual(self.handler.started, [])

    def test_token_from_the_query_string(self):
        """Without a customParameters token the upgrade URL's token parameter is used."""
        net = self.serve()
        net.started(url=net.url + "?token=from-query", token=None)
        self.assertEqual(self.handler.accepted, [(self.handler.started[0].call_sid, "from-query")])

    def test_duplicate_stream_sid(self):
        """A second stream claiming an active stream SID is refused, before its token is checked."""
        net = self.serve()
        first = net.started()
        second = net.client(stream_sid=first.stream_sid)
        self.assertEqual(result(second.closed), (1008, "Duplicate streamSid"))
        self.assertEqual(len(self.handler.accepted), 1)
        self.assertTrue(first.is_open)

    def test_media_before_start_is_dropped(self):
        """Media frames sent before start are ignored; those after it reach the handler, decoded."""
        net = self.serve()
        client = net.client(auto_start=False, stream_media=False)
        for _ in range(3):
            client.send_media(b"\x01" * FRAME_BYTES)
        net.flush()
        self.assertEqual((self.handler.media_calls, len(net.connections)), (0, 1))
        client.send_start()
        client.send_media(b"\x02" * FRAME_BYTES)
        net.flush()
        self.assertEqual(len(self.handler.started), 1)
        self.assertEqual(self.handler.media, [b"\x02" * FRAME_BYTES])

    def test_media_streams_in(self):
        """The client's audio arrives as 160-byte mu-law payloads, in order, one every 20 ms."""
        net = self.serve()
        audio = bytes(range(1, 161)) * 3
        net.started(audio=audio)
        net.advance(0.05)
        self.assertEqual(len(self.handler.media), 3)
        self.assertEqual(b"".join(self.handler.media), audio)

    def test_dtmf(self):
        """DTMF digits reach the handler; anything that is not a digit is ignored."""
        net = self.serve()
        client = net.started(stream_media=False)
        client.send_dtmf("7")
        client.send_dtmf("<script>")
        client.send_dtmf("#")
        net.flush()
        self.assertEqual(self.handler.digits, ["7", "#"])


class CapTests(MemoryTestCase):
    def test_pending_limit_in_total(self):
        """Beyond max_pending pending sockets, the next is closed 1013; a started stream frees a slot."""
        net = self.serve(max_pending=2, max_pending_per_ip=10, pending_yield_after=60, client_ip=lambda headers, peer: headers.get("x-client", peer))
        first = net.client(auto_start=False, headers={"X-Client": "10.0.0.1"})
        net.client(auto_start=False, headers={"X-Client": "10.0.0.2"})
        third = net.client(auto_start=False, headers={"X-Client": "10.0.0.3"})
        self.assertEqual(result(third.closed), (1013, "Too many pending media stream connections"))
        first.send_start()
        net.flush()
        self.assertEqual(self.server.pending_count, 1)
        fourth = net.client(auto_start=False, headers={"X-Client": "10.0.0.4"})
        self.assertTrue(fourth.is_open)
        self.assertEqual(self.server.pending_count, 2)

    def test_idle_pending_sockets_give_their_place_to_a_newcomer(self):
        """
        With every pending place taken, the oldest socket that has waited pending_yield_after
        seconds without a start is closed 1013 and the newcomer admitted: idle sockets holding
        every place (the upgrade signature is one per account) kept Twilio's streams out with
        1013 for as long as they reconnected. A socket younger than that keeps its place.
        """
        net = self.serve(max_pending=2, max_pending_per_ip=10, pending_yield_after=1.0, client_ip=lambda headers, peer: headers.get("x-client", peer))
        first = net.client(auto_start=False, headers={"X-Client": "10.0.0.1"})
        second = net.client(auto_start=False, headers={"X-Client": "10.0.0.2"})
        net.advance(1.1)
        third = net.client(auto_start=False, headers={"X-Client": "10.0.0.3"})
        self.assertEqual(result(first.closed), (1013, "Too many pending media stream connections"))
        self.assertTrue(third.is_open)
        third.send_start()
        net.flush()
        self.assertEqual(len(self.handler.started), 1)
        fourth = net.client(auto_start=False, headers={"X-Client": "10.0.0.4"})  # the free place
        fifth = net.client(auto_start=False, headers={"X-Client": "10.0.0.5"})  # second's place
        self.assertEqual(result(second.closed)[0], 1013)
        sixth = net.client(auto_start=False, headers={"X-Client": "10.0.0.6"})  # fourth is too young
        self.assertEqual(result(sixth.closed)[0], 1013)
        self.assertTrue(fourth.is_open and fifth.is_open and third.is_open)
        self.assertEqual(self.server.pending_count, 2)
        self.assertEqual(self.server.counts["1013-pending-yielded"], 2)

    def test_refused_sockets_are_dropped_at_once(self):
        """
        A socket refused before its start (1013 pending caps, 1008 start refusals and timeouts)
        is sent its close frame and dropped, without waiting for the peer's close reply: refused
        sockets that never answered held their place among max_connections for the whole close
        handshake, so a flood of idle upgrades (1900/s from many addresses) kept 32 of 37 of
        Twilio's streams out with 503.
        """
        net = self.serve(max_pending=1, max_pending_per_ip=10, pending_yield_after=60, pre_start_timeout=60)
        self.server.resource._upgrade._factory.setProtocolOptions(closeHandshakeTimeout=60)
        holder = net.client(auto_start=False)  # holds the one pending place
        refused = net.raw_socket()  # never answers a close frame
        self.assertTrue(refused.lost)
        self.assertEqual(close_code(refused.data), 1013)
        holder.send_start()
        net.flush()
        self.assertEqual(self.server.pending_count, 0)
        bad_start = net.raw_socket()
        net.send(bad_start, client_frame(b'{"event":"start","streamSid":"MZ1","start":{}}'))
        self.assertTrue(bad_start.lost)
        self.assertEqual(close_code(bad_start.data), 1008)
        self.assertEqual(len(net.connections), 1)

    def test_timed_out_sockets_are_dropped_at_once(self):
        """A socket closed 1008 Start timeout is dropped without waiting for the peer's close reply."""
        net = self.serve(pre_start_timeout=0.1)
        self.server.resource._upgrade._factory.setProtocolOptions(closeHandshakeTimeout=60)
        raw = net.raw_socket()
        net.advance(0.11)
        self.assertTrue(raw.lost)
        self.assertEqual(close_code(raw.data), 1008)
        self.assertEqual(len(net.connections), 0)

    def test_pending_limit_per_ip(self):
        """Beyond max_pending_per_ip pending sockets from one client address, the next is closed 1013."""
        net = self.serve(max_pending_per_ip=1, client_ip=lambda headers, peer: headers.get("x-client", peer))
        net.client(auto_start=False, headers={"X-Client": "10.0.0.1"})
        same = net.client(auto_start=False, headers={"X-Client": "10.0.0.1"})
        self.assertEqual(result(same.closed), (1013, "Too many pending media stream connections"))
        other = net.client(auto_start=False, headers={"X-Client": "10.0.0.2"})
        self.assertTrue(other.is_open)
        self.assertEqual(self.server.pending_count, 2)

    def test_503_at_max_connections(self):
        """With max_connections sockets open (pending or active), an upgrade gets a plain 503 before upgrading."""
        net = self.serve(max_connections=2)
        net.started()
        net.client(auto_start=False)
        answer = net.raw(upgrade_request())
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 503 Service Unavailable")
        headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))
        self.assertEqual(body, b"Too many media stream connections\n")
        refused = net.client()
        self.assertEqual(self.failureResultOf(refused.opened, UpgradeRefused).value.status, 503)

    def test_shutdown(self):
        """shutdown() ends sessions once, closes sockets 1001, and later upgrades get a 503."""
        net = self.serve()
        client = net.started()
        self.server.shutdown()
        net.flush()
        self.assertEqual(result(client.closed)[0], 1001)
        self.assertEqual(len(self.handler.stopped), 1)
        answer = net.raw(upgrade_request())
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "))
        self.assertTrue(answer.endswith(b"\r\n\r\nMedia stream handler is shutting down\n"))

    def test_frame_cap(self):
        """An inbound frame over 64 KiB closes the socket 1009."""
        net = self.serve()
        client = net.started(stream_media=False)
        client.send_raw(b'{"event":"media","pad":"' + b"x" * (64 * 1024) + b'"}')
        net.flush()
        self.assertEqual(result(client.closed)[0], 1009)
        self.assertEqual(len(self.handler.stopped), 1)


class UpgradeCheckTests(MemoryTestCase):
    def verifier(self, url, headers):
        self.verified.append(url)
        return verify_twilio(url=url, params={}, signature=headers.get("x-twilio-signature"), auth_token=AUTH_TOKEN).ok

    def test_signed_upgrade_accepted(self):
        """An upgrade whose X-Twilio-Signature (Twilio's SDK over the wss URL) verifies is accepted."""
        self.verified = []
        net = self.serve(verify_upgrade=self.verifier)
        wss = net.url.replace("ws://", "wss://")
        signature = RequestValidator(AUTH_TOKEN).compute_signature(wss, {})
        net.started(headers={"X-Twilio-Signature": signature})
        self.assertEqual(self.verified, [wss])

    def test_bad_signature_refused_before_upgrade(self):
        """An upgrade whose signature does not verify gets a 403 and never becomes a socket."""
        self.verified = []
        net = self.serve(verify_upgrade=self.verifier)
        client = net.client(headers={"X-Twilio-Signature": "XBfm3Ksz9YsboFXKJwfpv8PTqEg="})
        self.assertEqual(self.failureResultOf(client.opened, UpgradeRefused).value.status, 403)
        answer = net.raw(upgrade_request())
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "))
        self.assertEqual(len(self.verified), 2)
        self.assertEqual(self.handler.accepted, [])
        self.assertEqual(self.server.counts["403"], 2)
        self.assertEqual(len(net.connections), 0)

    def test_malformed_host(self):
        """A malformed Host on an upgrade gets 400 and the Site keeps serving webhooks."""
        net = self.serve()
        for host in (b"[::1", b"example.com:abc", b"exa mple.com", b"user@example.com", b"a..b"):
            answer = net.raw(upgrade_request(host))
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (host, answer[:40]))
        twice = net.raw(upgrade_request(extra=b"Host: other.example\r\n"))
        self.assertTrue(twice.startswith(b"HTTP/1.1 400 "))
        answer = net.raw(b"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.assertTrue(answer.endswith(b"OK"))
        self.assertEqual(self.server.counts["400"], 6)


class SessionTests(MemoryTestCase):
    def test_stop_ends_the_session_once(self):
        """stop ends the session (stream_stopped once), closes the socket, and frees the stream SID."""
        net = self.serve()
        client = net.started()
        client.stop()
        net.flush()
        self.assertEqual(result(client.closed), (1000, "Stream stopped"))
        self.assertEqual(len(net.connections), 0)
        self.assertEqual(len(self.handler.stopped), 1)
        self.assertEqual(self.server.active_count, 0)

    def test_socket_close_ends_the_session_once(self):
        """A socket dropped without stop ends its session exactly once; the session stops sending."""
        net = self.serve()
        client = net.started()
        [session] = self.handler.started
        client.abort()
        net.flush()
        self.assertTrue(client.closed.called)
        self.assertEqual(self.handler.stopped, [session])
        self.assertEqual(self.server.sessions, {})
        self.assertFalse(session.send_media(b"\xff" * FRAME_BYTES))
        self.assertFalse(session.is_open)

    def test_playback_over_the_socket(self):
        """Paced audio reaches the client as 160-byte media frames every 20 ms; the echoed mark completes the utterance."""
        net = self.serve()
        client = net.started(stream_media=False)
        [session] = self.handler.started
        audio = bytes(range(1, 161)) * 10
        played = session.playback.play(instant(audio))
        net.advance(0.5)
        self.assertEqual(result(played), "played")
        self.assertEqual(bytes(client.audio_received), audio)
        self.assertEqual(len(client.marks_echoed), 1)
        times = list(client.media_times)
        self.assertEqual(len(times), 10)
        self.assertGreaterEqual(times[-1] - times[0], 0.15)

    def test_clear_reaches_the_client(self):
        """Barge-in sends clear on the socket, and the playing utterance resolves skipped."""
        net = self.serve()
        client = net.started(stream_media=False)
        [session] = self.handler.started
        d = session.playback.play(lambda on_chunk: Deferred())
        net.advance(0.05)
        self.assertFalse(d.called)
        session.playback.clear()
        net.flush()
        self.assertEqual(result(d), "skipped")
        self.assertEqual(client.clears, 1)

    def test_unusable_frames_are_logged_sanitised_and_ignored(self):
        """Invalid JSON, binary frames and unknown events are logged without control characters and ignored."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        net = self.serve()
        client = net.started(stream_media=False)
        client.send_raw(b"not json \x1b[31m\x00")
        client.send_raw(b"\x00\x01", binary=True)
        client.send_json({"event": "bogus"})
        client.send_media(b"\x05" * FRAME_BYTES)
        net.flush()
        self.assertEqual(self.handler.media, [b"\x05" * FRAME_BYTES])
        self.assertTrue(client.is_open)
        texts = [e.get("frame") for e in observer if e.get("log_format", "").startswith("ignored media stream frame")]
        self.assertEqual(len(texts), 3)
        self.assertIn("not json [31m", texts[0])
        self.assertFalse(any(ch in "".join(texts) for ch in "\x00\x1b\x01"))

    def test_handler_errors_are_contained(self):
        """An exception in the handler is logged (a few times per socket) and the stream carries on."""
        net = self.serve()
        self.handler.fail_media = True
        client = net.started()
        net.advance(0.2)
        self.assertEqual(self.handler.media_calls, 11)  # the handler ran, on every frame (t = 0 to 0.2 s)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.assertTrue(client.is_open)
        self.handler.fail_media = False
        net.advance(0.02)
        self.assertEqual(len(self.handler.media), 1)


class FramingTests(MemoryTestCase):
    def test_frames_split_and_coalesced_anyhow(self):
        """Frames split at any byte and several per read, with a ping between them, all arrive intact."""
        net = self.serve()
        ws = net.raw_socket()
        payloads = [bytes([i]) * FRAME_BYTES for i in (1, 2, 3, 4)]
        media = [b'{"event":"media","media":{"payload":"%s"}}' % base64.b64encode(p) for p in payloads]
        wire = client_frame(START % (b"MZ1", b"CA1")) + client_frame(media[0]) + client_frame(b"ping!", opcode=9)
        wire += client_frame(media[1]) + client_frame(media[2]) + client_frame(media[3])
        for size in (1, 7, 3, 250, 5, 1000):
            chunk, wire = wire[:size], wire[size:]
            net.send(ws, chunk)
        net.send(ws, wire)
        self.assertEqual(self.handler.media, payloads)
        self.assertIn(b"\x8a\x05ping!", ws.data)

    def test_unmasked_frame_is_a_protocol_error(self):
        """An unmasked client frame is refused by autobahn's parser (close 1002), not accepted by the fast path."""
        net = self.serve()
        ws = net.raw_socket()
        net.send(ws, b"\x81\x05hello")
        net.advance(1.1)  # the close handshake times out: the peer never answers
        self.assertTrue(ws.lost)
        self.assertEqual(close_code(ws.data), 1002)

    def test_invalid_utf8_before_start_is_1007(self):
        """A text frame that is not UTF-8 closes the socket 1007 (RFC 6455 §8.1), before any start."""
        net = self.serve()
        ws = net.raw_socket()
        net.send(ws, client_frame(b'{"event":"connected","x":"\xff\xfe"}'))
        self.assertEqual(close_code(ws.data), 1007)
        self.assertEqual(self.handler.accepted, [])

    def test_invalid_utf8_after_start_is_1007(self):
        """Invalid UTF-8 after a start (a surrogate, an overlong form, a cut sequence) closes 1007 and ends the session."""
        net = self.serve()
        for n, bad in enumerate((b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82")):
            ws = net.started_socket(b"MZ3%d" % n)
            net.send(ws, client_frame(b'{"event":"mark","mark":{"name":"' + bad + b'"}}'))
            self.assertEqual(close_code(ws.data), 1007, bad)
            net.advance(1.1)  # the peer never answers the close: dropped after the close handshake timeout
            self.assertTrue(ws.lost)
            self.assertEqual(len(self.handler.stopped), n + 1)

    def fragment_flood(self, ws: RawWebSocket, fragments: int, size: int = 0) -> None:
        """Open a text message, send `fragments` continuations of `size` bytes without FIN, then a ping."""
        first = bytearray(client_frame(b"{"))
        first[0] = 0x01  # text, FIN clear
        more = bytearray(client_frame(b"a" * size, opcode=0))
        more[0] = 0x00  # continuation, FIN clear
        self.net.send(ws, bytes(first) + bytes(more) * fragments + client_frame(b"probe", opcode=9))

    def test_a_message_in_too_many_fragments_is_1009(self):
        """
        A message is at most MAX_FRAGMENTS frames: autobahn kept a list entry for every fragment,
        empty ones included, so 64 KiB of empty continuations grew the daemon by a megabyte with
        no end (16 MiB from one socket before its start timeout, without bound after a start).
        Before and after the start it is closed 1009 once the cap is passed, counted once.
        """
        net = self.serve()
        ws = net.raw_socket()
        self.fragment_flood(ws, 20_000)
        self.assertEqual(close_code(ws.data), 1009)
        self.assertNotIn(b"\x8a\x05probe", ws.data)
        ws = net.started_socket(b"MZ9", b"CA9")
        self.fragment_flood(ws, 20_000, size=1)
        self.assertEqual(close_code(ws.data), 1009)
        self.assertNotIn(b"\x8a\x05probe", ws.data)
        self.assertEqual(self.server.counts["1009-fragments"], 2)

    def test_a_message_in_a_few_fragments_is_read(self):
        """A message in fragments (up to the cap) still arrives whole."""
        net = self.serve()
        ws = net.raw_socket()
        start = START % (b"MZ8", b"CA8")
        wire = b""
        for n, i in enumerate(range(0, len(start), 2)):
            frame = bytearray(client_frame(start[i : i + 2], opcode=0 if n else 1))
            if i + 2 < len(start):
                frame[0] &= 0x7F  # FIN only on the last
            wire += bytes(frame)
        net.send(ws, wire)
        self.assertEqual([s.stream_sid for s in self.handler.started], ["MZ8"])

    def test_client_close_ends_the_session(self):
        """A masked close frame after a start ends the session once and gets a close reply."""
        net = self.serve()
        ws = net.raw_socket()
        net.send(ws, client_frame(START % (b"MZ2", b"CA2")) + client_frame((1000).to_bytes(2, "big"), opcode=8))
        self.assertTrue(ws.lost)
        self.assertEqual(len(self.handler.started), 1)
        self.assertEqual(len(self.handler.stopped), 1)
        self.assertEqual(close_code(ws.data), 1000)


class PeerNotReadingTests(MemoryTestCase):
    """What the wire queues for a peer, read through private/ws.py (here, a transport whose backlog the test sets)."""

    def backlog(self, size: int) -> None:
        self.patch(Wire, "buffered", lambda wire: size)

    def test_backpressure_closes_1013(self):
        """A session's send refused once more than 1 MiB waits: the socket is closed 1013, counted once."""
        net = self.serve()
        client = net.started(stream_media=False)
        [session] = self.handler.started
        [connection] = net.connections
        self.assertTrue(session.send_media(b"\x00" * FRAME_BYTES))
        self.backlog(1024 * 1024 + 1)
        self.assertFalse(session.send_media(b"\x00" * FRAME_BYTES))
        self.assertFalse(session.send_mark("m"))
        net.flush()
        self.assertEqual(result(client.closed), (1013, "Backpressure: send buffer exceeded"))
        self.assertEqual(self.server.counts["backpressure"], 1)

    def test_pong_over_budget_closes_1008(self):
        """A pong that would leave more than 64 KiB waiting before the start is not written: closed 1008 "Peer does not read"."""
        net = self.serve()
        ws = net.raw_socket()
        [connection] = net.connections
        self.backlog(64 * 1024 - 7)  # the 7-byte pong fills the budget exactly
        net.send(ws, client_frame(b"12345", opcode=9))
        self.assertIn(b"\x8a\x0512345", ws.data)
        self.backlog(64 * 1024 - 6)
        ws.data = b""
        net.send(ws, client_frame(b"12345", opcode=9))
        self.assertNotIn(b"\x8a", ws.data)
        self.assertEqual(close_code(ws.data), 1008)
        self.assertEqual(self.server.counts["1008-peer-not-reading"], 1)

    def test_a_socket_that_keeps_unsent_bytes_after_its_close_is_aborted(self):
        """After a close we answered, a socket still holding unsent bytes is aborted a second later."""
        net = self.serve()
        ws = net.started_socket()
        [connection] = net.connections
        aborted = []
        self.patch(connection.transport, "abortConnection", lambda: aborted.append(True))
        self.patch(connection.transport, "loseConnection", lambda: None)  # the graceful close never completes
        net.send(ws, client_frame((1000).to_bytes(2, "big"), opcode=8))
        self.assertEqual(close_code(ws.data), 1000)
        net.advance(0.99)
        self.assertEqual(aborted, [])
        net.advance(0.02)
        self.assertEqual(aborted, [True])


class PublicPathTests(MemoryTestCase):
    """
    With private/ws.py's private names missing (forced here) the wire takes autobahn's public path:
    the same stream, end to end, and the same bounds.
    """

    def setUp(self) -> None:
        self.patch(private_ws, "FAST", False)

    def test_a_stream_end_to_end(self):
        """Start, media in (Twilio's layout and another), DTMF, playback out with its mark, stop: framed and unmasked by autobahn."""

        def fast_path(*args):
            raise AssertionError("the fast path ran without its private names")

        self.patch(sockets, "xor_mask", fast_path)
        self.patch(sockets, "text_frame_header", fast_path)
        net = self.serve()
        client = net.started(audio=bytes(range(1, 161)) * 2)
        [session] = self.handler.started
        [connection] = net.connections
        self.assertFalse(connection._wire.idle() or connection._wire.can_frame())
        net.advance(0.03)
        self.assertEqual(b"".join(self.handler.media[:2]), bytes(range(1, 161)) * 2)
        client.send_raw(b'{ "event": "dtmf", "dtmf": { "digit": "5" } }')
        audio = bytes(range(7, 167)) * 3
        played = session.playback.play(instant(audio))
        net.advance(0.3)
        self.assertEqual(self.handler.digits, ["5"])
        self.assertEqual(result(played), "played")
        self.assertEqual(bytes(client.audio_received), audio)
        self.assertEqual(len(client.marks_echoed), 1)
        client.stop()
        net.flush()
        self.assertEqual(result(client.closed), (1000, "Stream stopped"))
        self.assertEqual(self.handler.stopped, [session])

    def test_backpressure_from_the_producer_pause(self):
        """Once the transport pauses its producer (its buffer is full), sends are refused and the socket closed 1013."""
        net = self.serve()
        client = net.started(stream_media=False)
        [session] = self.handler.started
        [connection] = net.connections
        self.assertIs(connection.transport.producer, connection._wire)
        self.assertTrue(session.send_media(b"\x00" * FRAME_BYTES))
        connection.transport.producer.pauseProducing()
        self.assertFalse(session.send_media(b"\x00" * FRAME_BYTES))
        net.flush()
        self.assertEqual(result(client.closed), (1013, "Backpressure: send buffer exceeded"))


class AutobahnTuningTests(MemoryTestCase):
    def test_log_helpers_neutralised(self):
        """The server replaces hltype/hlval in the autobahn modules that call them per frame."""
        self.assertTrue(neutralise_autobahn_log_formatting())
        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
            self.assertEqual(module.hltype(self), self)
            self.assertEqual(module.hlval(42), 42)

    def test_no_log_formatting_per_frame(self):
        """Frames in and out of a stream never reach autobahn's colouring helper (it would notice a move)."""
        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
            module.hltype, module.hlval = autobahn.util.hltype, autobahn.util.hlval
        net = self.serve()
        client = net.started(stream_media=False)
        [session] = self.handler.started
        calls = []
        original = autobahn.util.hl
        autobahn.util.hl = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
        self.addCleanup(setattr, autobahn.util, "hl", original)
        for _ in range(5):
            client.send_media(b"\x01" * FRAME_BYTES)
            session.send_media(b"\x02" * FRAME_BYTES)
        net.flush()
        self.assertEqual((len(self.handler.media), len(client.media_times)), (5, 5))
        self.assertEqual(calls, [])


# -- the fast path for media messages ----------------------------------------------------------

_B64 = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
_TEXT = st.one_of(
    st.from_regex(r"[0-9]{1,5}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
    _B64,
    st.text(max_size=12),
)
_VALUE = st.one_of(_TEXT, st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))


@st.composite
def twilio_media_messages(draw) -> bytes:
    """
    Media messages as Twilio writes them (compact JSON, its key order, the stream SID before
    or after the media) and variations: other values and types, keys dropped, repeated or
    added, other orders, whitespace, escapes, other events, then a byte or two changed.
    """
    media = {"track": draw(st.sampled_from(["inbound", "outbound"])), "chunk": draw(_TEXT), "timestamp": draw(_TEXT), "payload": draw(_B64)}
    message = {"event": "media", "sequenceNumber": draw(_TEXT), "streamSid": "MZ" + "a1" * 16, "media": media}
    items = list(message.items())
    if draw(st.booleans()):
        items = [items[0], items[1], items[3], items[2]]  # Twilio's documented order: media, then streamSid
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "media"]))
        key = draw(st.sampled_from(["event", "media", "payload", "streamSid", "track", "chunk", "sequenceNumber", "extra"]))
        value = draw(st.one_of(_VALUE, st.sampled_from(["media", "stop", "dtmf"]), st.just({"payload": "AAAA"})))
        action = draw(st.sampled_from(["set", "drop", "shuffle"]))
        target = items if where == "top" else None
        if where == "media" and isinstance(dict(items).get("media"), dict):
            target = list(dict(items)["media"].items())
        if target is None:
            continue
        if action == "set":
            target.insert(draw(st.integers(0, len(target))), (key, value))  # may repeat a key
        elif action == "drop" and target:
            target.pop(draw(st.integers(0, len(target) - 1)))
        elif action == "shuffle":
            target[:] = draw(st.permutations(target))
        if where == "media":
            items = [(k, _Pairs(target) if k == "media" else v) for k, v in items]
    text = _dumps(items, draw(st.sampled_from([(",", ":"), (", ", ": ")])), draw(st.booleans()))
    raw = bytearray(text.encode("utf-8"))
    for _ in range(draw(st.integers(0, 2))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.sampled_from(b'"\\{}[],:= aAzZ09+/\x00\xff'))
    return bytes(raw)


class _Pairs(list):
    """Members in a given order, repeats allowed (a JSON object as written, not as a dict)."""


def _dumps(items, separators, ascii_only) -> str:
    def value(v):
        if isinstance(v, _Pairs):
            return obj(v)
        if isinstance(v, dict):
            return obj(list(v.items()))
        return json.dumps(v, separators=separators, ensure_ascii=ascii_only)

    def obj(pairs):
        return "{" + separators[0].join(json.dumps(k) + separators[1] + value(v) for k, v in pairs) + "}"

    return obj(items)


class MediaFastPathTests(SynchronousTestCase):
    """The regular expression that replaces json.loads for Twilio's media messages."""

    @settings(max_examples=1500, deadline=None)
    @given(raw=twilio_media_messages())
    @example(raw=b'{"event":"media","media":{"payload":"AAAA"},"event":"stop"}')
    @example(raw=b'{"event":"media","media":{"payload":"AAAA"},"media":{"payload":"BBBB"}}')
    @example(raw=b'{"event":"media","media":{"payload":"AAAA","payload":"BBBB"}}')
    @example(raw=b'{"event":"media","media":{"payload":"AA\\/A"}}')
    @example(raw=b'{"event":"media","media":{"payload":"AAAA"}} ')
    @example(raw=b'{"event":"media","media":{"payload":"AAAA"}}\n')
    def test_agrees_with_the_json_parser(self, raw: bytes) -> None:
        """Whatever the expression matches, json.loads reads as a media event with the same payload."""
        match = _MEDIA.match(raw)
        if match is None:
            return
        message = json.loads(raw.decode())
        self.assertIs(type(message), dict)
        self.assertEqual(message.get("event"), "media")
        self.assertIs(type(message["media"]), dict)
        self.assertEqual(message["media"]["payload"], match.group(1).decode())

    @settings(max_examples=300, deadline=None)
    @given(
        audio=st.binary(max_size=400),
        sequence=st.integers(0, 10**12),
        chunk=st.integers(1, 10**9),
        timestamp=st.integers(0, 10**12),
        track=st.sampled_from(["inbound", "outbound"]),
        sid_last=st.booleans(),
    )
    def test_matches_what_twilio_sends(self, audio, sequence, chunk, timestamp, track, sid_last) -> None:
        """Twilio's media messages (either member order) take the fast path, with their payload."""
        media = {"track": track, "chunk": str(chunk), "timestamp": str(timestamp), "payload": base64.b64encode(audio).decode()}
        sid = "MZ18ad3ab5a668481ce02b83e7395059f0"
        message = {"event": "media", "sequenceNumber": str(sequence)}
        message.update({"media": media, "streamSid": sid} if sid_last else {"streamSid": sid, "media": media})
        match = _MEDIA.match(json.dumps(message, separators=(",", ":")).encode())
        self.assertIsNotNone(match)
        self.assertEqual(base64.b64decode(match.group(1)), audio)


class MediaParsingTests(MemoryTestCase):
    def test_every_layout_of_a_media_message_is_read(self):
        """Media messages off the fast path (spacing, escapes, other orders, extra keys) arrive the same."""
        net = self.serve()
        ws = net.started_socket()
        audio = [bytes([i]) * FRAME_BYTES for i in range(1, 7)]
        b64 = [base64.b64encode(a) for a in audio]
        messages = [
            b'{"event":"media","sequenceNumber":"2","streamSid":"MZ3","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"%s"}}' % b64[0],
            b'{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"2","timestamp":"20","payload":"%s"},"streamSid":"MZ3"}' % b64[1],
            b'{ "event": "media", "media": { "payload": "%s" } }' % b64[2],
            b'{"media":{"payload":"%s","track":"inbound"},"event":"media","extra":[1,2]}' % b64[3],
            b'{"event":"media","media":{"payload":"%s"}}' % b64[4].replace(b"/", b"\\/").replace(b"A", b"\\u0041"),
            b'{"event":"media","media":{"payload":"BBBB"},"media":{"payload":"%s"}}' % b64[5],
        ]
        net.send(ws, b"".join(client_frame(m, mask=bytes([i, 0x5A, 0xA5, i])) for i, m in enumerate(messages)))
        self.assertEqual(self.handler.media, audio)

    def test_a_later_event_member_wins(self):
        """A media-looking message whose last "event" is stop is a stop, as the JSON parser reads it."""
        net = self.serve()
        ws = net.started_socket()
        net.send(ws, client_frame(b'{"event":"media","media":{"payload":"AAAA"},"event":"stop"}'))
        self.assertEqual(close_code(ws.data), 1000)
        self.assertEqual(self.handler.media_calls, 0)
        self.assertEqual(len(self.handler.stopped), 1)

    def test_bad_base64_on_the_fast_path_is_a_bad_frame(self):
        """A Twilio-shaped media message whose payload is not valid base64 is logged and ignored."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        net = self.serve()
        ws = net.started_socket()
        net.send(ws, client_frame(b'{"event":"media","media":{"payload":"AAAAA"}}'))
        net.send(ws, client_frame(b'{"event":"media","media":{"payload":"%s"}}' % base64.b64encode(b"\x09" * FRAME_BYTES)))
        self.assertEqual(self.handler.media, [b"\x09" * FRAME_BYTES])
        whats = [e.get("what") for e in observer if e.get("log_format", "").startswith("ignored media stream frame")]
        self.assertEqual(whats, ["media without a base64 payload"])


class IntegrationTests(TestCase):
    """What only real sockets show: a kernel send buffer that fills, and frames written straight to a TCP socket."""

    def serve(self) -> None:
        self.handler = Handler()
        self.server = MediaStreamServer(reactor, self.handler)
        root = RootResource(webhook=Webhook(), stream_path=STREAM_PATH, stream=self.server.resource)
        site = ScreenedSite(root, clock=reactor, screen=lambda request, length: None)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"ws://127.0.0.1:{port.getHost().port}{STREAM_PATH}"
        self.addCleanup(self._close)

    async def _close(self) -> None:
        self.server.shutdown()
        for client in self.clients:
            client.abort()
            await client.closed
        await eventually(lambda: not self.server._sockets._connections, 5, "every socket closed")

    async def started(self, **kwargs) -> TwilioMediaClient:
        client = TwilioMediaClient(reactor, self.url, token="tok", stream_media=False, **kwargs)
        self.clients = [client]
        await client.connect()
        await eventually(lambda: self.handler.started, 5, "the stream to start")
        return client

    async def test_frames_written_straight_to_the_socket(self):
        """Media both ways over TCP, the server's frames written to the socket directly (nothing queued before them)."""
        self.serve()
        client = await self.started()
        [session] = self.handler.started
        [connection] = self.server._sockets._connections
        self.assertIsNotNone(connection._wire._socket)
        frames = [bytes([i]) * FRAME_BYTES for i in range(1, 51)]
        for frame in frames:
            self.assertTrue(session.send_media(frame))
            client.send_media(frame)
        await eventually(lambda: len(client.audio_received) == len(frames) * FRAME_BYTES and len(self.handler.media) == len(frames), 5, "every frame")
        self.assertEqual(bytes(client.audio_received), b"".join(frames))
        self.assertEqual(self.handler.media, frames)

    async def test_backpressure(self):
        """A client that stops reading is closed 1013 once more than 1 MiB waits in the kernel and the transport."""
        self.serve()
        # The client reads a megabyte before it reaches the close frame: give it time on a loaded machine.
        self.server.resource._upgrade._factory.setProtocolOptions(closeHandshakeTimeout=30)
        client = await self.started()
        [session] = self.handler.started
        client.pause_reading()
        sent = 0

        async def fill() -> bool:
            nonlocal sent
            for _ in range(500):
                if not session.send_media(b"\x00" * FRAME_BYTES):
                    return True
                sent += 1
            return False

        await eventually(fill, 10, "a send refused")
        self.assertFalse(session.send_media(b"\x00" * FRAME_BYTES))
        self.assertGreater(sent, 1024 * 1024 // 300)
        client.resume_reading()
        self.assertEqual(await client.closed, (1013, "Backpressure: send buffer exceeded"))
        self.assertEqual(self.server.counts["backpressure"], 1)
