"""
RPC peers that do not read (issue 12 item 7), on the daemon's real UNIX socket: a client that
sends requests and never reads its answers, and a subscriber that never reads large events, are
disconnected, and what the daemon queues for either never passes `MAX_QUEUED_BYTES`; clients
that read are unaffected.

What the daemon queues is measured independently of voicecall's own count: after every write to
a server-side RPC transport, the bytes that transport still holds unsent (`send_buffer_size`).
"""
from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from voicecall.control.rpc import MAX_QUEUED_BYTES, RpcProtocol
from voicecall.infra.private.ws import send_buffer_size

from tests.harness import eventually, http_client, start_daemon

CALLEE = "+15550001234"


class Peer(Protocol):
    """A raw RPC connection; `deaf` ones stop reading as soon as they connect."""

    def __init__(self, deaf: bool) -> None:
        self.deaf = deaf
        self.received = b""
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self.deaf:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.received.split(b"\n") if line]


class ServerSide:
    """The daemon's RPC connections, each with the most its transport ever held unsent."""

    def __init__(self, testcase: TestCase) -> None:
        self.connections: list[dict] = []
        made, lost = RpcProtocol.connectionMade, RpcProtocol.connectionLost

        def connection_made(protocol: RpcProtocol) -> None:
            made(protocol)
            transport, seen = protocol.transport, {"most": 0, "lost": False}
            write = transport.write

            def counted(data: bytes) -> None:
                write(data)
                seen["most"] = max(seen["most"], send_buffer_size(transport))

            transport.write = counted
            protocol._seen = seen
            self.connections.append(seen)

        def connection_lost(protocol: RpcProtocol, reason) -> None:
            protocol._seen["lost"] = True
            lost(protocol, reason)

        testcase.patch(RpcProtocol, "connectionMade", connection_made)
        testcase.patch(RpcProtocol, "connectionLost", connection_lost)


class RpcBackpressureTests(TestCase):
    timeout = 120

    async def start(self) -> None:
        self.server = ServerSide(self)
        self.service, self.rpc = await start_daemon(self, {"provider": "mock", "maxConcurrentCalls": 3})
        self.path = self.service._rpc.description.split(":")[1]

    async def peer(self, deaf: bool) -> Peer:
        peer, before = Peer(deaf), len(self.server.connections)
        await connectProtocol(UNIXClientEndpoint(reactor, self.path), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() or peer.closed)
        await eventually(lambda: len(self.server.connections) > before, 5, "the server side of the connection")
        (peer.seen,) = self.server.connections[before:]
        return peer

    def assertDroppedWithinCap(self, peer: Peer) -> None:
        self.assertTrue(peer.seen["lost"])
        self.assertLessEqual(peer.seen["most"], MAX_QUEUED_BYTES)
        self.assertGreater(peer.seen["most"], 64 * 1024, "the daemon never queued much: the test proves nothing")

    async def answered_call(self) -> str:
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        http = http_client(self)
        body = json.dumps({"event": {"type": "call.answered", "callId": call_id}}).encode()
        response = await http.post(self.service.webhook_url, data=body, headers={"Content-Type": ["application/json"]})
        await response.content()
        await eventually(lambda: self.service.manager.find(call_id).state.value not in ("initiated", "ringing"), 5, "the answer")
        return call_id

    async def test_request_flood_from_a_client_that_never_reads(self):
        """
        100 KiB of small requests with large answers from a client that never reads: it is
        disconnected before the daemon holds more than the cap for it; the others go on.
        """
        await self.start()
        await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "m" * 40_000})  # listings are > 40 kB
        deaf = await self.peer(deaf=True)
        line = b'{"jsonrpc":"2.0","id":1,"method":"voicecall.status"}\n'
        deaf.transport.write(line * (100 * 1024 // len(line)))
        await eventually(lambda: deaf.seen["lost"], 30, "the deaf client's disconnection")
        self.assertDroppedWithinCap(deaf)
        self.assertEqual((await self.rpc.call("voicecall.health", {}))["ok"], True)

    async def test_subscriber_that_never_reads_large_events(self):
        """A subscriber that stops reading is dropped before 4 MiB of 30 kB events wait for it; a reading one gets them all."""
        await self.start()
        call_id = await self.answered_call()
        deaf, reader = await self.peer(deaf=True), await self.peer(deaf=False)
        for peer in (deaf, reader):
            peer.transport.write(b'{"jsonrpc":"2.0","id":"s","method":"voicecall.subscribe"}\n')
        await eventually(lambda: reader.lines(), 5, "the subscription")
        text = "w" * 30_000
        spoken = 0
        while not deaf.seen["lost"]:
            await self.rpc.call("voicecall.speak", {"callId": call_id, "message": text})
            spoken += 1
            self.assertLess(spoken, 400, "the deaf subscriber was never dropped")
        self.assertDroppedWithinCap(deaf)
        await eventually(
            lambda: sum(1 for m in reader.lines() if m.get("params", {}).get("text") == text) == spoken,
            10,
            "every event at the reading subscriber",
        )
        self.assertFalse(reader.seen["lost"])

    async def test_client_that_reads_is_unaffected(self):
        """
        A client that pipelines 100 KiB of requests and reads the answers gets every one and stays
        connected; one that asks for the large listing again and again, reading each, too.
        """
        await self.start()
        await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "m" * 40_000})
        reader = await self.peer(deaf=False)
        line = b'{"jsonrpc":"2.0","id":1,"method":"voicecall.health"}\n'
        count = 100 * 1024 // len(line)
        reader.transport.write(line * count)
        await eventually(lambda: reader.received.count(b"\n") >= count, 60, "every answer")
        self.assertEqual([m["result"]["ok"] for m in reader.lines()], [True] * count)
        for _ in range(200):  # 8 MB of answers in all
            self.assertEqual(len((await self.rpc.call("voicecall.status", {}))["calls"]), 1)
        self.assertFalse(reader.seen["lost"])
        self.assertFalse(self.server.connections[0]["lost"])
