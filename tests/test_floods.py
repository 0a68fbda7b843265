"""
Floods of the media-stream path (SPEC §10.1, §20 item 16): the daemon (in process, Twilio with
streaming, fakes for Twilio, TTS and STT on loopback) takes a thousand signed but idle WebSocket
upgrades from many loopback addresses. The caps must hold (503 before the upgrade at
maxConnections, 1013 at the pending caps, 1008 "Start timeout" after preStartTimeoutMs), the
daemon's sockets stay bounded, and a legitimate call is still served. A client that floods pings
and never reads (before or after its start) is closed 1008 and dropped, with what the daemon
queued for it bounded all along (DESIGN.md: every byte queued for a peer is bounded).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial.unittest import TestCase

from voicecall.media.sockets import MAX_PENDING_SEND_BUFFER, MAX_SEND_BUFFER
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient
from voicecall.infra.private.ws import send_buffer_size, xor_mask

from tests.harness import eventually, free_port, http_client, raise_fd_limit, serve, sleep, speech_fakes, start_daemon

SID = "AC" + "4" * 32
TOKEN = "flood-token"
MAX_CONNECTIONS = 16
MAX_PENDING = 32
PER_IP = 4
PRE_START_MS = 1000
FLOOD = 1000
WINDOW = 100
FLOOD_IPS = 25


class IdleUpgrade(Protocol):
    """A signed WebSocket upgrade that never sends `start`; records how the daemon disposed of it."""

    def __init__(self, request: bytes, stats: dict) -> None:
        self.request = request
        self.stats = stats
        self.buffer = b""
        self.upgraded_at: float | None = None
        #: Built just before it connects: the daemon's pre-start clock can only start later, so
        #: the wait measured from here is never shorter than its timeout, however loaded the run.
        self.created_at = reactor.seconds()
        self.outcome: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.upgraded_at is None:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status = head.split(b" ", 2)[1]
            if status != b"101":
                self.finish((int(status), head + b"\r\n\r\n" + self.buffer))
                return
            self.upgraded_at = reactor.seconds()
            self.stats["open"] += 1
            self.stats["max_open"] = max(self.stats["max_open"], self.stats["open"])
        if len(self.buffer) >= 2 and self.buffer[0] == 0x88 and len(self.buffer) >= 2 + (self.buffer[1] & 0x7F):
            payload = self.buffer[2 : 2 + (self.buffer[1] & 0x7F)]
            code = struct.unpack("!H", payload[:2])[0]
            self.finish((code, payload[2:].decode(), reactor.seconds() - self.created_at))

    def finish(self, outcome) -> None:
        if self.upgraded_at is not None:
            self.stats["open"] -= 1
        if not self.outcome.called:
            self.outcome.callback(outcome)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.outcome.called:
            if self.upgraded_at is not None:
                self.stats["open"] -= 1
            self.outcome.callback(("lost", self.buffer[:200]))


def masked(opcode: int, payload: bytes, mask: bytes = b"\x0f\x1e\x2d\x3c") -> bytes:
    """A client frame (FIN, masked) of at most 64 KiB."""
    n = len(payload)
    header = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    return header + mask + xor_mask(payload, mask)


class PingFlooder:
    """
    A raw client socket with a 4 KiB receive buffer: it upgrades (reading only the 101 answer),
    may send a start, then writes pings as fast as the daemon takes them and never reads again.
    """

    def __init__(self, port: int, upgrade: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.out = upgrade
        self.reset = False

    def close(self) -> None:
        self.sock.close()

    def pump(self) -> bool:
        """Write what is waiting; False once the daemon dropped the connection."""
        while self.out and not self.reset:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                self.reset = True
                break
            self.out = self.out[sent:]
        return not self.reset

    async def upgraded(self) -> bytes:
        head = b""
        for _ in range(500):
            self.pump()
            try:
                head += self.sock.recv(4096)
            except BlockingIOError:
                pass
            if b"\r\n\r\n" in head:
                return head
            await sleep(0.01)
        raise AssertionError("no answer to the upgrade")

    def send(self, data: bytes) -> bool:
        if len(self.out) < 256 * 1024:
            self.out += data
        return self.pump()


class FloodTests(TestCase):
    timeout = 60

    async def start(self):
        raise_fd_limit(self)
        http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(utterances=[]))
        twilio_base = await serve(self, self.fake.resource())
        _, speech_base, stt = await speech_fakes(self)
        self.port = free_port()
        self.service, self.rpc = await start_daemon(
            self,
            {
                "provider": "twilio",
                "fromNumber": "+15550000000",
                "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
                "serve": {"port": self.port, "bind": "127.0.0.1"},
                "publicUrl": f"http://127.0.0.1:{self.port}/voice/webhook",
                "streaming": {
                    "enabled": True,
                    "openaiApiKey": "sk-stt",
                    "sttBaseUrl": stt.url,
                    "maxConnections": MAX_CONNECTIONS,
                    "maxPendingConnections": MAX_PENDING,
                    "maxPendingConnectionsPerIp": PER_IP,
                    "preStartTimeoutMs": PRE_START_MS,
                },
                "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
                "maxConcurrentCalls": 2,
            },
        )
        self.media = self.service._media
        self.addCleanup(self.hang_up)
        stream_url = f"ws://127.0.0.1:{self.port}/voice/stream"
        key = base64.b64encode(os.urandom(16))
        self.upgrade = (
            b"GET /voice/stream HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nX-Twilio-Signature: %s\r\n\r\n"
            % (self.port, key, sign_request(TOKEN, stream_url).encode())
        )
        self.stats = {"open": 0, "max_open": 0}
        self.clients: list[IdleUpgrade] = []

    async def hang_up(self):
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def idle(self, ip: str) -> IdleUpgrade:
        """Open one idle upgrade from `ip`; fires once the daemon answered the upgrade."""
        client = IdleUpgrade(self.upgrade, self.stats)
        self.clients.append(client)
        factory = ClientFactory.forProtocol(lambda: client)
        reactor.connectTCP("127.0.0.1", self.port, factory, timeout=10, bindAddress=(ip, 0))
        await eventually(lambda: client.upgraded_at is not None or client.outcome.called, 10, "an answer to the upgrade")
        return client

    async def test_caps_hold(self):
        """Per-IP pending cap gives 1013, maxConnections gives 503, idle sockets get 1008 Start timeout."""
        await self.start()
        first = [await self.idle("127.0.0.2") for _ in range(PER_IP)]
        self.assertTrue(all(c.upgraded_at is not None and not c.outcome.called for c in first))
        code, reason, _ = await (await self.idle("127.0.0.2")).outcome
        self.assertEqual((code, reason), (1013, "Too many pending media stream connections"))
        for n in range(3, 3 + (MAX_CONNECTIONS - PER_IP) // PER_IP):
            for _ in range(PER_IP):
                await self.idle(f"127.0.0.{n}")
        await eventually(lambda: self.media.pending_count == MAX_CONNECTIONS, 5, "a full house")
        refused = await (await self.idle("127.0.0.99")).outcome
        self.assertEqual(refused[0], 503)
        self.assertIn(b"Too many media stream connections\n", refused[1])
        self.assertIn(b"Connection: close", refused[1].replace(b"connection", b"Connection"))
        outcomes = await gatherResults([c.outcome for c in self.clients if c.upgraded_at is not None and not c.outcome.called])
        self.assertEqual({(code, reason) for code, reason, _ in outcomes}, {(1008, "Start timeout")})
        self.assertTrue(all(waited >= PRE_START_MS / 1000.0 - 0.01 for _, _, waited in outcomes))
        await eventually(lambda: self.media.pending_count == 0 and len(self.media._sockets._connections) == 0, 5, "every socket closed")

    async def test_flood_keeps_caps_and_serves_a_call(self):
        """A thousand idle upgrades from many addresses: every one refused or timed out, sockets bounded, then a call is served."""
        await self.start()
        window = DeferredSemaphore(WINDOW)
        peak = {"connections": 0}

        async def one(i: int):
            client = await self.idle(f"127.0.1.{i % FLOOD_IPS + 1}")
            peak["connections"] = max(peak["connections"], len(self.media._sockets._connections))
            return await client.outcome

        async def flood():
            jobs = [window.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(FLOOD)]
            return await gatherResults(jobs)

        flooding = Deferred.fromCoroutine(flood())
        # A legitimate call placed mid-flood: its webhooks (TwiML fetch, status callbacks) are served.
        await sleep(0.5)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "conversation"}))["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        stream = await fake_call.next_stream()
        self.assertTrue(all(hook.status == 200 for hook in self.fake.webhooks if hook.status is not None))
        outcomes = await flooding
        self.clients = [c for c in self.clients if not c.outcome.called]
        kinds = {}
        for outcome in outcomes:
            label = outcome[0] if outcome[0] != "lost" else "lost"
            kinds[label] = kinds.get(label, 0) + 1
            if outcome[0] == 1013:
                self.assertEqual(outcome[1], "Too many pending media stream connections")
            elif outcome[0] == 1008:
                self.assertEqual(outcome[1], "Start timeout")
                self.assertGreaterEqual(outcome[2], PRE_START_MS / 1000.0 - 0.01)
        self.assertEqual(set(kinds) - {503, 1013, 1008}, set(), kinds)
        self.assertEqual(sum(kinds.values()), FLOOD)
        self.assertGreater(kinds.get(1008, 0), 0, kinds)
        self.assertLessEqual(self.stats["max_open"], MAX_CONNECTIONS)
        self.assertLessEqual(peak["connections"], MAX_CONNECTIONS)

        # After the flood the legitimate stream (valid token and signature) is accepted and spoken to.
        client = TwilioMediaClient(
            reactor,
            stream.url,
            call_sid=fake_call.sid,
            token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
        )
        await client.connect()
        self.addCleanup(self._close, client)
        await eventually(lambda: len(client.audio_received) > 800, 10, "the greeting's audio")
        self.assertEqual(self.media.active_count, 1)
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertNotIn(status["state"], ("failed", "hangup-bot", "completed"))

    async def ping_flood(self, start: dict | None = None) -> tuple[int, float]:
        """
        Flood pings (125-byte payloads) from a client that never reads, for at most 10 s; return
        the most the daemon had queued for it at any look and how long it took to be dropped.
        """
        flooder = PingFlooder(self.port, self.upgrade)
        self.addCleanup(flooder.close)
        head = await flooder.upgraded()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        [connection] = self.media._sockets._connections
        if start is not None:
            flooder.send(masked(1, json.dumps(start).encode()))
            await eventually(lambda: self.media.active_count == 1, 5, "the stream to start")
        pings = masked(9, os.urandom(125)) * 500
        began = reactor.seconds()
        peak = 0
        while reactor.seconds() - began < 10 and connection in self.media._sockets._connections:
            flooder.send(pings)
            peak = max(peak, send_buffer_size(connection.transport))
            await sleep(0)
        self.assertNotIn(connection, self.media._sockets._connections, "the daemon still holds a client that does not read")
        return peak, reactor.seconds() - began

    async def test_ping_flood_before_start(self):
        """A socket that floods pings before its start and reads nothing is closed 1008 and dropped; its queue stays bounded."""
        await self.start()
        peak, took = await self.ping_flood()
        self.assertLessEqual(peak, MAX_PENDING_SEND_BUFFER + 256)
        self.assertEqual(self.media.counts["1008-peer-not-reading"], 1, dict(self.media.counts))
        self.assertLess(took, 5.0)  # the close frame, then a second for the peer to answer it, then the abort

    async def test_ping_flood_on_a_live_stream(self):
        """A started stream that floods pings and reads nothing is closed 1008 and dropped; its queue stays bounded."""
        await self.start()
        await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "conversation"})
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        stream = await fake_call.next_stream()
        start = {
            "event": "start",
            "streamSid": "MZflood",
            "start": {"callSid": fake_call.sid, "streamSid": "MZflood", "customParameters": dict(stream.parameters)},
        }
        peak, _ = await self.ping_flood(start)
        self.assertLessEqual(peak, MAX_SEND_BUFFER + 256)
        # Closed for not reading; in the rare case that a frame of the greeting, not a pong, is the
        # write that crosses the cap, the same close is labelled as backpressure (1013).
        counts = self.media.counts
        self.assertEqual(counts["1008-peer-not-reading"] + counts["backpressure"], 1, dict(counts))

    async def _close(self, client):
        if not client.closed.called:
            client.close()
        await client.closed
