"""
Tests for voicecall.media.stream: the Twilio media-stream server on real loopback sockets,
mounted on the webhook Site as the daemon mounts it, driven by the TwilioMediaClient.
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
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.test.proto_helpers import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from voicecall.infra.audio import FRAME_BYTES, AudioChunk
from voicecall.infra.wsfast import neutralise_autobahn_log_formatting
from voicecall.media.sockets import _MEDIA
from voicecall.media.stream import MediaStreamServer
from voicecall.providers.signatures import verify_twilio
from voicecall.testing.twilio_media import TwilioMediaClient, UpgradeRefused
from voicecall.web.limits import ScreenedSite
from voicecall.web.webhook import RootResource

STREAM_PATH = "/voice/stream"
AUTH_TOKEN = "test_auth_token_0123456789abcdef"


class Handler:
    """A StreamHandler that records every call."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.accepted: list[tuple[str, str | None]] = []
        self.started: list = []
        self.media: list[bytes] = []
        self.digits: list[str] = []
        self.stopped: list = []
        self.fail_media = False

    def accept_start(self, call_sid, token):
        self.accepted.append((call_sid, token))
        return self.accept

    def stream_started(self, session):
        self.started.append(session)

    def media_received(self, session, ulaw):
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


class RawWebSocket(Protocol):
    """A hand-rolled WebSocket client that writes exactly the bytes it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.upgraded: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self):
        self.transport.write(upgrade_request())

    def dataReceived(self, data):
        self.data += data
        if not self.upgraded.called and b"\r\n\r\n" in self.data:
            head, _, self.data = self.data.partition(b"\r\n\r\n")
            self.upgraded.callback(head)

    def connectionLost(self, reason):
        self.lost.callback(None)


def upgrade_request(host: bytes = b"127.0.0.1", extra: bytes = b"") -> bytes:
    return (
        b"GET " + STREAM_PATH.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


def wait(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout: float = 5.0) -> None:
    """Wait (spinning the reactor) until predicate() is true."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await wait(0.01)


class MediaStreamTestBase(TestCase):
    handler: Handler

    def serve(self, **kwargs) -> MediaStreamServer:
        self.handler = kwargs.pop("handler", None) or Handler()
        kwargs.setdefault("pre_start_timeout", 5.0)
        server = MediaStreamServer(reactor, self.handler, **kwargs)
        root = RootResource(webhook=Webhook(), stream_path=STREAM_PATH, stream=server.resource)
        site = ScreenedSite(root, clock=reactor, screen=lambda request, length: None)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"ws://127.0.0.1:{self.port.getHost().port}{STREAM_PATH}"
        self.server = server
        self.clients: list[TwilioMediaClient] = []
        self.addCleanup(self._close_all)
        return server

    async def _close_all(self) -> None:
        self.server.shutdown()
        for client in self.clients:
            client.abort()
        for client in self.clients:
            if not client.opened.called:
                client.opened.addErrback(lambda f: None)
            await client.closed
        await until(lambda: not self.server._sockets._connections)

    def client(self, **kwargs) -> TwilioMediaClient:
        kwargs.setdefault("token", "tok")
        client = TwilioMediaClient(reactor, kwargs.pop("url", self.url), **kwargs)
        self.clients.append(client)
        return client

    async def connected(self, **kwargs) -> TwilioMediaClient:
        client = self.client(**kwargs)
        await client.connect()
        return client

    async def started(self, **kwargs) -> TwilioMediaClient:
        before = len(self.handler.started)
        client = await self.connected(**kwargs)
        await until(lambda: len(self.handler.started) > before)
        return client

    async def raw(self, request: bytes) -> bytes:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        protocol = Raw(request)
        await connectProtocol(endpoint, protocol)
        return await protocol.done


class StartTests(MediaStreamTestBase):
    async def test_start_registers_a_session(self):
        """A valid start is offered to accept_start and becomes a session under its stream SID."""
        server = self.serve()
        client = await self.started(call_sid="CA123", token="secret-token")
        self.assertEqual(self.handler.accepted, [("CA123", "secret-token")])
        [session] = self.handler.started
        self.assertEqual((session.call_sid, session.stream_sid, session.client_ip), ("CA123", client.stream_sid, "127.0.0.1"))
        self.assertIs(server.sessions[client.stream_sid], session)
        self.assertEqual((server.active_count, server.pending_count), (1, 0))
        self.assertEqual(session.custom_parameters, {})  # the token was used up: the session does not keep it

    async def test_valid_start_outlives_the_start_timeout(self):
        """A socket that sent a valid start is no longer pending and stays open past the timeout."""
        server = self.serve(pre_start_timeout=0.2)
        client = await self.started()
        await wait(0.5)
        self.assertTrue(client.is_open)
        self.assertEqual((server.active_count, server.pending_count), (1, 0))

    async def test_start_timeout(self):
        """A socket without a start is closed 1008 "Start timeout" without consulting accept_start."""
        server = self.serve(pre_start_timeout=0.2)
        client = await self.connected(auto_start=False)
        self.assertEqual(server.pending_count, 1)
        self.assertEqual(await client.closed, (1008, "Start timeout"))
        self.assertEqual(self.handler.accepted, [])
        await until(lambda: server.pending_count == 0)

    async def test_missing_call_sid(self):
        """A start without start.callSid is closed 1008 "Missing callSid"."""
        self.serve()
        client = await self.connected(auto_start=False)
        client.send_json({"event": "start", "streamSid": "MZ1", "start": {"customParameters": {"token": "t"}}})
        self.assertEqual(await client.closed, (1008, "Missing callSid"))
        self.assertEqual(self.handler.accepted, [])

    async def test_unknown_call(self):
        """A start that accept_start refuses is closed 1008 "Unknown call" and never starts."""
        self.serve(handler=Handler(accept=False))
        client = await self.connected(call_sid="CA9", token="wrong")
        self.assertEqual(await client.closed, (1008, "Unknown call"))
        self.assertEqual(self.handler.accepted, [("CA9", "wrong")])
        self.assertEqual(self.handler.started, [])

    async def test_token_from_the_query_string(self):
        """Without a customParameters token the upgrade URL's token parameter is used."""
        self.serve()
        await self.started(url=self.url + "?token=from-query", token=None)
        self.assertEqual(self.handler.accepted[0][1], "from-query")

    async def test_duplicate_stream_sid(self):
        """A second stream claiming an active stream SID is refused."""
        self.serve()
        first = await self.started()
        second = await self.connected(stream_sid=first.stream_sid)
        self.assertEqual(await second.closed, (1008, "Duplicate streamSid"))
        self.assertTrue(first.is_open)

    async def test_media_before_start_is_dropped(self):
        """Media frames sent before start are ignored; those after it reach the handler, decoded."""
        self.serve()
        client = await self.connected(auto_start=False, stream_media=False)
        for _ in range(3):
            client.send_media(b"\x01" * FRAME_BYTES)
        await wait(0.1)
        self.assertEqual(self.handler.media, [])
        client.send_start()
        await until(lambda: self.handler.started)
        client.send_media(b"\x02" * FRAME_BYTES)
        await until(lambda: self.handler.media)
        self.assertEqual(self.handler.media, [b"\x02" * FRAME_BYTES])

    async def test_media_streams_in(self):
        """The client's audio arrives as 160-byte mu-law payloads, in order."""
        self.serve()
        audio = bytes(range(1, 161)) * 3
        await self.started(audio=audio)
        await until(lambda: len(self.handler.media) >= 3)
        self.assertEqual(b"".join(self.handler.media[:3]), audio)

    async def test_dtmf(self):
        """DTMF digits reach the handler; anything that is not a digit is ignored."""
        self.serve()
        client = await self.started(stream_media=False)
        client.send_dtmf("7")
        client.send_dtmf("<script>")
        client.send_dtmf("#")
        await until(lambda: len(self.handler.digits) >= 2)
        await wait(0.05)
        self.assertEqual(self.handler.digits, ["7", "#"])


class CapTests(MediaStreamTestBase):
    async def test_pending_limit_in_total(self):
        """Beyond max_pending pending sockets, the next is closed 1013; a started stream frees a slot."""
        server = self.serve(max_pending=2, max_pending_per_ip=10, pending_yield_after=60, client_ip=lambda headers, peer: headers.get("x-client", peer))
        first = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.1"})
        await self.connected(auto_start=False, headers={"X-Client": "10.0.0.2"})
        third = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.3"})
        code, reason = await third.closed
        self.assertEqual(code, 1013)
        self.assertEqual(reason, "Too many pending media stream connections")
        first.send_start()
        await until(lambda: server.pending_count == 1)
        fourth = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.4"})
        await wait(0.05)
        self.assertTrue(fourth.is_open)
        self.assertEqual(server.pending_count, 2)

    async def test_idle_pending_sockets_give_their_place_to_a_newcomer(self):
        """
        With every pending place taken, the oldest socket that has waited pending_yield_after
        seconds without a start is closed 1013 and the newcomer admitted: idle sockets holding
        every place (the upgrade signature is one per account) kept Twilio's streams out with
        1013 for as long as they reconnected. A socket younger than that keeps its place.
        """
        server = self.serve(max_pending=2, max_pending_per_ip=10, pending_yield_after=1.0, client_ip=lambda headers, peer: headers.get("x-client", peer))
        first = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.1"})
        second = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.2"})
        await wait(1.1)
        third = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.3"})
        self.assertEqual(await first.closed, (1013, "Too many pending media stream connections"))
        self.assertTrue(third.is_open)
        third.send_start()
        await until(lambda: len(self.handler.started) == 1)
        fourth = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.4"})  # the free place
        fifth = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.5"})  # second's place
        self.assertEqual((await second.closed)[0], 1013)
        sixth = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.6"})  # fourth is too young
        self.assertEqual((await sixth.closed)[0], 1013)
        self.assertTrue(fourth.is_open and fifth.is_open and third.is_open)
        self.assertEqual(server.pending_count, 2)
        self.assertEqual(server.counts["1013-pending-yielded"], 2)

    async def test_refused_sockets_are_dropped_at_once(self):
        """
        A socket refused before its start (1013 pending caps, 1008 start refusals and timeouts)
        is sent its close frame and dropped, without waiting for the peer's close reply: refused
        sockets that never answered held their place among max_connections for the whole close
        handshake, so a flood of idle upgrades (1900/s from many addresses) kept 32 of 37 of
        Twilio's streams out with 503.
        """
        server = self.serve(max_pending=1, max_pending_per_ip=10, pending_yield_after=60, pre_start_timeout=60)
        server.resource._upgrade._factory.setProtocolOptions(closeHandshakeTimeout=60)
        holder = await self.connected(auto_start=False)  # holds the one pending place
        for wire, code in ((b"", 1013), (None, 1008)):
            if wire is None:  # the pending place is free again
                holder.send_start()
                await until(lambda: server.pending_count == 0)
            raw = RawWebSocket()  # never answers a close frame
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), raw)
            await raw.upgraded
            if wire is None:  # a start without a call SID
                raw.transport.write(client_frame(b'{"event":"start","streamSid":"MZ1","start":{}}'))
            await until(lambda: raw.lost.called, timeout=10)
            self.assertEqual(FramingTests.close_code(None, raw.data), code)
        self.assertEqual(len(server._sockets._connections), 1)

    async def test_timed_out_sockets_are_dropped_at_once(self):
        """A socket closed 1008 Start timeout is dropped without waiting for the peer's close reply."""
        server = self.serve(pre_start_timeout=0.1)
        server.resource._upgrade._factory.setProtocolOptions(closeHandshakeTimeout=60)
        raw = RawWebSocket()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), raw)
        await until(lambda: raw.lost.called, timeout=10)
        self.assertEqual(FramingTests.close_code(None, raw.data), 1008)
        self.assertEqual(len(server._sockets._connections), 0)

    async def test_pending_limit_per_ip(self):
        """Beyond max_pending_per_ip pending sockets from one client address, the next is closed 1013."""
        server = self.serve(max_pending_per_ip=1, client_ip=lambda headers, peer: headers.get("x-client", peer))
        await self.connected(auto_start=False, headers={"X-Client": "10.0.0.1"})
        same = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.1"})
        self.assertEqual(await same.closed, (1013, "Too many pending media stream connections"))
        other = await self.connected(auto_start=False, headers={"X-Client": "10.0.0.2"})
        await wait(0.05)
        self.assertTrue(other.is_open)
        self.assertEqual(server.pending_count, 2)

    async def test_503_at_max_connections(self):
        """With max_connections sockets open (pending or active), an upgrade gets a plain 503 before upgrading."""
        self.serve(max_connections=2)
        await self.started()
        await self.connected(auto_start=False)
        answer = await self.raw(upgrade_request())
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 503 Service Unavailable")
        headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))
        self.assertEqual(body, b"Too many media stream connections\n")
        refused = self.client()
        failure = await self.assertFailure(refused.connect(), UpgradeRefused)
        self.assertEqual(failure.status, 503)

    async def test_shutdown(self):
        """shutdown() ends sessions once, closes sockets 1001, and later upgrades get a 503."""
        server = self.serve()
        client = await self.started()
        server.shutdown()
        code, _ = await client.closed
        self.assertEqual(code, 1001)
        self.assertEqual(len(self.handler.stopped), 1)
        answer = await self.raw(upgrade_request())
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "))
        self.assertTrue(answer.endswith(b"\r\n\r\nMedia stream handler is shutting down\n"))

    async def test_frame_cap(self):
        """An inbound frame over 64 KiB closes the socket 1009."""
        self.serve()
        client = await self.started(stream_media=False)
        client.send_raw(b'{"event":"media","pad":"' + b"x" * (64 * 1024) + b'"}')
        code, _ = await client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(len(self.handler.stopped), 1)

    async def test_backpressure(self):
        """A client that stops reading is closed 1013 once more than 1 MiB waits to be sent."""
        self.serve()
        client = await self.started(stream_media=False)
        [session] = self.handler.started
        client.pause_reading()
        refused_after = 0
        for _ in range(2000):
            if not all(session.send_media(b"\x00" * FRAME_BYTES) for _ in range(500)):
                break
            refused_after += 500
            await wait(0)
        self.assertFalse(session.send_media(b"\x00" * FRAME_BYTES))
        self.assertGreater(refused_after, 1024 * 1024 // 300)
        client.resume_reading()
        self.assertEqual(await client.closed, (1013, "Backpressure: send buffer exceeded"))
        self.assertEqual(self.server.counts["backpressure"], 1)


class UpgradeCheckTests(MediaStreamTestBase):
    def verifier(self, url, headers):
        self.verified.append(url)
        return verify_twilio(url=url, params={}, signature=headers.get("x-twilio-signature"), auth_token=AUTH_TOKEN).ok

    async def test_signed_upgrade_accepted(self):
        """An upgrade whose X-Twilio-Signature (Twilio's SDK over the wss URL) verifies is accepted."""
        self.verified = []
        self.serve(verify_upgrade=self.verifier)
        wss = self.url.replace("ws://", "wss://")
        signature = RequestValidator(AUTH_TOKEN).compute_signature(wss, {})
        await self.started(headers={"X-Twilio-Signature": signature})
        self.assertEqual(self.verified, [wss])

    async def test_bad_signature_refused_before_upgrade(self):
        """An upgrade whose signature does not verify gets a 403 and never becomes a socket."""
        self.verified = []
        server = self.serve(verify_upgrade=self.verifier)
        client = self.client(headers={"X-Twilio-Signature": "XBfm3Ksz9YsboFXKJwfpv8PTqEg="})
        failure = await self.assertFailure(client.connect(), UpgradeRefused)
        self.assertEqual(failure.status, 403)
        answer = await self.raw(upgrade_request())
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "))
        self.assertEqual(self.handler.accepted, [])
        self.assertEqual(server.counts["403"], 2)
        self.assertEqual(len(server._sockets._connections), 0)

    async def test_malformed_host(self):
        """A malformed Host on an upgrade gets 400 and the Site keeps serving webhooks."""
        self.serve()
        for host in (b"[::1", b"example.com:abc", b"exa mple.com", b"user@example.com", b"a..b"):
            answer = await self.raw(upgrade_request(host))
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (host, answer[:40]))
        twice = await self.raw(upgrade_request(extra=b"Host: other.example\r\n"))
        self.assertTrue(twice.startswith(b"HTTP/1.1 400 "))
        answer = await self.raw(b"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.assertTrue(answer.endswith(b"OK"))


class SessionTests(MediaStreamTestBase):
    async def test_stop_ends_the_session_once(self):
        """stop ends the session (stream_stopped once), closes the socket, and frees the stream SID."""
        server = self.serve()
        client = await self.started()
        client.stop()
        self.assertEqual(await client.closed, (1000, "Stream stopped"))
        await until(lambda: not server._sockets._connections)
        self.assertEqual(len(self.handler.stopped), 1)
        self.assertEqual(server.active_count, 0)

    async def test_socket_close_ends_the_session_once(self):
        """A socket dropped without stop ends its session exactly once; the session stops sending."""
        server = self.serve()
        client = await self.started()
        [session] = self.handler.started
        client.abort()
        await client.closed
        await until(lambda: self.handler.stopped)
        await wait(0.05)
        self.assertEqual(self.handler.stopped, [session])
        self.assertEqual(server.sessions, {})
        self.assertFalse(session.send_media(b"\xff" * FRAME_BYTES))
        self.assertFalse(session.is_open)

    async def test_playback_over_the_socket(self):
        """Paced audio reaches the client as 160-byte media frames; the echoed mark completes the utterance."""
        self.serve()
        client = await self.started(stream_media=False)
        [session] = self.handler.started
        audio = bytes(range(1, 161)) * 10

        def synthesize(on_chunk):
            on_chunk(AudioChunk(audio, "ulaw", 8000))
            d = Deferred()
            d.callback(None)
            return d

        outcome = await session.playback.play(synthesize)
        self.assertEqual(outcome, "played")
        self.assertEqual(bytes(client.audio_received), audio)
        self.assertEqual(len(client.marks_echoed), 1)
        times = list(client.media_times)
        self.assertGreaterEqual(times[-1] - times[0], 0.15)

    async def test_clear_reaches_the_client(self):
        """Barge-in sends clear on the socket, and the playing utterance resolves skipped."""
        self.serve()
        client = await self.started(stream_media=False)
        [session] = self.handler.started
        d = session.playback.play(lambda on_chunk: Deferred())
        await wait(0.05)
        session.playback.clear()
        self.assertEqual(await d, "skipped")
        await until(lambda: client.clears == 1)

    async def test_unusable_frames_are_logged_sanitised_and_ignored(self):
        """Invalid JSON, binary frames and unknown events are logged without control characters and ignored."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.serve()
        client = await self.started(stream_media=False)
        client.send_raw(b"not json \x1b[31m\x00")
        client.send_raw(b"\x00\x01", binary=True)
        client.send_json({"event": "bogus"})
        client.send_media(b"\x05" * FRAME_BYTES)
        await until(lambda: self.handler.media)
        self.assertTrue(client.is_open)
        texts = [e.get("frame") for e in observer if e.get("log_format", "").startswith("ignored media stream frame")]
        self.assertEqual(len(texts), 3)
        self.assertIn("not json [31m", texts[0])
        self.assertFalse(any(ch in "".join(texts) for ch in "\x00\x1b\x01"))

    async def test_handler_errors_are_contained(self):
        """An exception in the handler is logged and the stream carries on."""
        self.serve()
        self.handler.fail_media = True
        client = await self.started()
        await wait(0.1)
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(client.is_open)


class FramingTests(MediaStreamTestBase):
    async def raw_socket(self) -> RawWebSocket:
        protocol = RawWebSocket()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), protocol)
        self.addCleanup(lambda: protocol.lost)
        self.addCleanup(protocol.transport.abortConnection)
        head = await protocol.upgraded
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        return protocol

    async def test_frames_split_and_coalesced_anyhow(self):
        """Frames split at any byte and several per read, with a ping between them, all arrive intact."""
        self.serve()
        ws = await self.raw_socket()
        start = b'{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","customParameters":{"token":"t"}}}'
        payloads = [bytes([i]) * FRAME_BYTES for i in (1, 2, 3, 4)]
        media = [b'{"event":"media","media":{"payload":"%s"}}' % base64.b64encode(p) for p in payloads]
        wire = client_frame(start) + client_frame(media[0]) + client_frame(b"ping!", opcode=9)
        wire += client_frame(media[1]) + client_frame(media[2]) + client_frame(media[3])
        for size in (1, 7, 3, 250, 5, 1000):
            chunk, wire = wire[:size], wire[size:]
            ws.transport.write(chunk)
            await wait(0.005)
        ws.transport.write(wire)
        await until(lambda: len(self.handler.media) == 4)
        self.assertEqual(self.handler.media, payloads)
        await until(lambda: b"\x8a\x05ping!" in ws.data)

    async def test_unmasked_frame_is_a_protocol_error(self):
        """An unmasked client frame is refused by autobahn's parser (close 1002), not accepted by the fast path."""
        self.serve()
        ws = await self.raw_socket()
        ws.transport.write(b"\x81\x05hello")
        await ws.lost
        self.assertIn(b"\x88", ws.data)
        self.assertIn((1002).to_bytes(2, "big"), ws.data)

    def close_code(self, data: bytes) -> int | None:
        """The status code of the first close frame in what the server sent."""
        at = data.find(b"\x88")
        while at != -1:
            if at + 4 <= len(data) and 2 <= data[at + 1] <= 125:
                return int.from_bytes(data[at + 2 : at + 4], "big")
            at = data.find(b"\x88", at + 1)
        return None

    async def test_invalid_utf8_before_start_is_1007(self):
        """A text frame that is not UTF-8 closes the socket 1007 (RFC 6455 §8.1), before any start."""
        self.serve()
        ws = await self.raw_socket()
        ws.transport.write(client_frame(b'{"event":"connected","x":"\xff\xfe"}'))
        await ws.lost
        self.assertEqual(self.close_code(ws.data), 1007)
        self.assertEqual(self.handler.accepted, [])

    async def test_invalid_utf8_after_start_is_1007(self):
        """Invalid UTF-8 after a start (a surrogate, an overlong form, a cut sequence) closes 1007 and ends the session."""
        self.serve()
        for n, bad in enumerate((b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82")):
            ws = await self.raw_socket()
            start = b'{"event":"start","streamSid":"MZ3%d","start":{"callSid":"CA3","customParameters":{"token":"t"}}}' % n
            ws.transport.write(client_frame(start))
            await until(lambda: len(self.handler.started) == n + 1)
            ws.transport.write(client_frame(b'{"event":"mark","mark":{"name":"' + bad + b'"}}'))
            await ws.lost
            self.assertEqual(self.close_code(ws.data), 1007, bad)
            self.assertEqual(len(self.handler.stopped), n + 1)

    async def fragment_flood(self, ws: RawWebSocket, fragments: int, size: int = 0) -> None:
        """Open a text message, send `fragments` continuations of `size` bytes without FIN, then a ping."""
        first = bytearray(client_frame(b"{"))
        first[0] = 0x01  # text, FIN clear
        more = bytearray(client_frame(b"a" * size, opcode=0))
        more[0] = 0x00  # continuation, FIN clear
        ws.transport.write(bytes(first) + bytes(more) * fragments + client_frame(b"probe", opcode=9))
        # The ping is read after every fragment: its pong (or the close) says they were all handled.
        await until(lambda: ws.lost.called or b"\x8a\x05probe" in ws.data, timeout=20)

    async def test_a_message_in_too_many_fragments_is_1009(self):
        """
        A message is at most MAX_FRAGMENTS frames: autobahn kept a list entry for every fragment,
        empty ones included, so 64 KiB of empty continuations grew the daemon by a megabyte with
        no end (16 MiB from one socket before its start timeout, without bound after a start).
        Before and after the start it is closed 1009 once the cap is passed.
        """
        self.serve()
        ws = await self.raw_socket()
        await self.fragment_flood(ws, 20_000)
        self.assertEqual(self.close_code(ws.data), 1009)
        self.assertNotIn(b"\x8a\x05probe", ws.data)
        ws = await self.raw_socket()
        start = b'{"event":"start","streamSid":"MZ9","start":{"callSid":"CA9","customParameters":{"token":"t"}}}'
        ws.transport.write(client_frame(start))
        await until(lambda: len(self.handler.started) == 1)
        await self.fragment_flood(ws, 20_000, size=1)
        self.assertEqual(self.close_code(ws.data), 1009)
        self.assertNotIn(b"\x8a\x05probe", ws.data)

    async def test_a_message_in_a_few_fragments_is_read(self):
        """A message in fragments (up to the cap) still arrives whole."""
        self.serve()
        ws = await self.raw_socket()
        start = b'{"event":"start","streamSid":"MZ8","start":{"callSid":"CA8","customParameters":{"token":"t"}}}'
        wire = b""
        for n, i in enumerate(range(0, len(start), 2)):
            frame = bytearray(client_frame(start[i : i + 2], opcode=0 if n else 1))
            if i + 2 < len(start):
                frame[0] &= 0x7F  # FIN only on the last
            wire += bytes(frame)
        ws.transport.write(wire)
        await until(lambda: len(self.handler.started) == 1)

    async def test_client_close_ends_the_session(self):
        """A masked close frame after a start ends the session once and gets a close reply."""
        self.serve()
        ws = await self.raw_socket()
        start = b'{"event":"start","streamSid":"MZ2","start":{"callSid":"CA2","customParameters":{"token":"t"}}}'
        ws.transport.write(client_frame(start) + client_frame((1000).to_bytes(2, "big"), opcode=8))
        await ws.lost
        self.assertEqual(len(self.handler.started), 1)
        self.assertEqual(len(self.handler.stopped), 1)
        self.assertTrue(ws.data.startswith(b"\x88"))


class AutobahnTuningTests(MediaStreamTestBase):
    def test_log_helpers_neutralised(self):
        """The server replaces hltype/hlval in the autobahn modules that call them per frame."""
        self.assertTrue(neutralise_autobahn_log_formatting())
        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
            self.assertEqual(module.hltype(self), self)
            self.assertEqual(module.hlval(42), 42)

    async def test_no_log_formatting_per_frame(self):
        """Frames in and out of a stream never reach autobahn's colouring helper (it would notice a move)."""
        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
            module.hltype, module.hlval = autobahn.util.hltype, autobahn.util.hlval
        self.serve()
        client = await self.started(stream_media=False)
        [session] = self.handler.started
        calls = []
        original = autobahn.util.hl
        autobahn.util.hl = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
        self.addCleanup(setattr, autobahn.util, "hl", original)
        for _ in range(5):
            client.send_media(b"\x01" * FRAME_BYTES)
            session.send_media(b"\x02" * FRAME_BYTES)
        await until(lambda: len(self.handler.media) == 5 and len(client.media_times) == 5)
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


class MediaParsingTests(MediaStreamTestBase):
    raw_socket = FramingTests.raw_socket

    async def started_socket(self) -> RawWebSocket:
        self.serve()
        ws = await self.raw_socket()
        start = b'{"event":"start","streamSid":"MZ3","start":{"callSid":"CA3","customParameters":{"token":"t"}}}'
        ws.transport.write(client_frame(start))
        await until(lambda: self.handler.started)
        return ws

    async def test_every_layout_of_a_media_message_is_read(self):
        """Media messages off the fast path (spacing, escapes, other orders, extra keys) arrive the same."""
        ws = await self.started_socket()
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
        ws.transport.write(b"".join(client_frame(m, mask=bytes([i, 0x5A, 0xA5, i])) for i, m in enumerate(messages)))
        await until(lambda: len(self.handler.media) == len(audio))
        self.assertEqual(self.handler.media, audio)

    async def test_a_later_event_member_wins(self):
        """A media-looking message whose last "event" is stop is a stop, as the JSON parser reads it."""
        ws = await self.started_socket()
        ws.transport.write(client_frame(b'{"event":"media","media":{"payload":"AAAA"},"event":"stop"}'))
        await ws.lost
        self.assertEqual(self.handler.media, [])
        self.assertEqual(len(self.handler.stopped), 1)

    async def test_bad_base64_on_the_fast_path_is_a_bad_frame(self):
        """A Twilio-shaped media message whose payload is not valid base64 is logged and ignored."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ws = await self.started_socket()
        ws.transport.write(client_frame(b'{"event":"media","media":{"payload":"AAAAA"}}'))
        ws.transport.write(client_frame(b'{"event":"media","media":{"payload":"%s"}}' % base64.b64encode(b"\x09" * FRAME_BYTES)))
        await until(lambda: self.handler.media)
        self.assertEqual(self.handler.media, [b"\x09" * FRAME_BYTES])
        whats = [e.get("what") for e in observer if e.get("log_format", "").startswith("ignored media stream frame")]
        self.assertEqual(whats, ["media without a base64 payload"])
