"""
Tests for voicecall.infra.private.ws: the RFC 6455 frames voicecall builds and unmasks itself, checked
against the RFC's layout worked by hand, a byte-by-byte reference and autobahn's own parser; the
send-buffer accounting and direct send its two WebSocket ends share; and the private autobahn and
Twisted names it relies on, pinned (the public path it falls back to is carried end to end by
tests.test_media_stream and tests.test_stt).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import random
import socket
import textwrap
from pathlib import Path

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

import voicecall
from voicecall.infra.private import ws as private_ws
from voicecall.infra.private.ws import PRIVATE_NAMES, Wire, masked_text_frame, send_buffer_size, text_frame_header, tune_factory, xor_mask

#: Payload length -> (unmasked, masked) text frame header, from RFC 6455 §5.2 by hand: FIN +
#: opcode 1, then the mask bit and a 7-bit length, or 126 + 16 bits, or 127 + 64 bits.
HEADERS = {
    0: (b"\x81\x00", b"\x81\x80"),
    125: (b"\x81\x7d", b"\x81\xfd"),
    126: (b"\x81\x7e\x00\x7e", b"\x81\xfe\x00\x7e"),
    65535: (b"\x81\x7e\xff\xff", b"\x81\xfe\xff\xff"),
    65536: (b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00", b"\x81\xff\x00\x00\x00\x00\x00\x01\x00\x00"),
}


def reference_xor(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 §5.3 as written: byte i XORed with key byte i mod 4."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def sample(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


class _Recording:
    """An autobahn endpoint that records each frame header it parses and each message."""

    def onFrameBegin(self) -> None:
        frame = self.current_frame
        self.factory.frames.append((frame.fin, frame.opcode, frame.length, frame.mask))
        super().onFrameBegin()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))


class _Server(_Recording, WebSocketServerProtocol):
    pass


class _Client(_Recording, WebSocketClientProtocol):
    pass


def autobahn_pair():
    """An autobahn client and server, opened to each other in memory: (client, server, pump)."""
    clock = Clock()
    server_factory = WebSocketServerFactory("ws://localhost:9000", reactor=clock)
    server_factory.protocol = _Server
    client_factory = WebSocketClientFactory("ws://localhost:9000", reactor=clock)
    client_factory.protocol = _Client
    for factory in (server_factory, client_factory):
        factory.frames, factory.messages = [], []
        factory.setProtocolOptions(
            utf8validateIncoming=False, openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0
        )
        tune_factory(factory, clock)
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock, greet=False
    )
    pump.flush()
    return client, server, pump


class TextFrameHeaderTests(SynchronousTestCase):
    def test_rfc_layout(self) -> None:
        """Each boundary length has the shortest encoding, with the mask bit only when masked."""
        for length, (unmasked, masked) in HEADERS.items():
            self.assertEqual(text_frame_header(length), unmasked, length)
            self.assertEqual(text_frame_header(length, masked=True), masked, length)

    def test_autobahn_reads_them(self) -> None:
        """autobahn's client reads the unmasked frames, its server the masked ones, as sent."""
        client, server, pump = autobahn_pair()
        self.assertEqual((client.state, server.state), (client.STATE_OPEN, server.STATE_OPEN))
        mask = b"\x9a\x0b\xff\x31"
        for length in HEADERS:
            payload = sample(length)
            server.transport.write(text_frame_header(length) + payload)
            client.transport.write(text_frame_header(length, masked=True) + mask + xor_mask(payload, mask))
            pump.flush()
        self.assertEqual((client.state, server.state), (client.STATE_OPEN, server.STATE_OPEN))
        self.assertEqual(client.factory.frames, [(True, 1, n, None) for n in HEADERS])
        self.assertEqual(server.factory.frames, [(True, 1, n, mask) for n in HEADERS])
        expected = [(sample(n), False) for n in HEADERS]
        self.assertEqual(client.factory.messages, expected)
        self.assertEqual(server.factory.messages, expected)


class XorMaskTests(SynchronousTestCase):
    def test_every_length_to_600(self) -> None:
        """Lengths 0..600 (both sides of the spread cache's 512), random keys: RFC 6455's XOR."""
        rng = random.Random(6455)
        for n in range(601):
            payload, mask = rng.randbytes(n), rng.randbytes(4)
            self.assertEqual(xor_mask(payload, mask), reference_xor(payload, mask), n)
            self.assertEqual(xor_mask(xor_mask(payload, mask), mask), payload, n)

    @settings(max_examples=300, deadline=None)
    @given(
        payload=st.one_of(st.binary(max_size=600), st.integers(509, 1030).map(lambda n: bytes(range(256)) * 5 + bytes(n - 1280) if n > 1280 else bytes(n))),
        mask=st.binary(min_size=4, max_size=4),
    )
    @example(payload=b"", mask=b"abcd")
    @example(payload=b"\xff" * 513, mask=b"\xff\xff\xff\xff")
    def test_matches_bytewise_xor(self, payload: bytes, mask: bytes) -> None:
        """Masking (cached key spreading or not) is RFC 6455's byte-by-byte XOR with the key."""
        self.assertEqual(xor_mask(payload, mask), reference_xor(payload, mask))


class MaskedTextFrameTests(SynchronousTestCase):
    """The client text frames the transcriber sends (RFC 6455 §5.2, §5.3)."""

    @settings(max_examples=200, deadline=None)
    @given(
        payload=st.one_of(st.binary(max_size=300), st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]).map(sample)),
        mask=st.binary(min_size=4, max_size=4),
    )
    def test_round_trip(self, payload: bytes, mask: bytes) -> None:
        """Any payload, any key: the masked header, the key, then the payload XORed with it."""
        frame = masked_text_frame(payload, mask)
        header = text_frame_header(len(payload), masked=True)
        self.assertEqual(frame[: len(header)], header)
        self.assertEqual(frame[len(header) : len(header) + 4], mask)
        self.assertEqual(reference_xor(frame[len(header) + 4 :], mask), payload)

    def test_autobahn_reads_it(self) -> None:
        """autobahn's server reads a run of them as the messages they carry."""
        client, server, pump = autobahn_pair()
        payloads = [b"", b'{"type":"x"}', sample(126), sample(513), sample(70000)]
        client.transport.write(b"".join(masked_text_frame(p, bytes([i, 1, 2, 3])) for i, p in enumerate(payloads)))
        pump.flush()
        self.assertEqual(server.factory.messages, [(p, False) for p in payloads])


class _Socket:
    def __init__(self, takes: int | None = None, error: OSError | None = None) -> None:
        self.takes, self.error, self.sent = takes, error, []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append(data)
        return len(data) if self.takes is None else min(self.takes, len(data))


class _Transport:
    disconnecting = False

    def __init__(self, socket: _Socket | None = None, buffered: bytes = b"", offset: int = 0, temp: int = 0) -> None:
        self.socket, self.dataBuffer, self.offset, self._tempDataLen = socket, buffered, offset, temp
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._tempDataLen += len(data)


def direct_wire(transport: _Transport, queued: tuple = ()) -> Wire:
    """A Wire on `transport` that writes to its socket as it does to a plain TCP transport's."""
    wire = Wire(type("Protocol", (), {"transport": transport, "send_queue": list(queued)})())
    wire._socket = transport.socket
    return wire


class WireSendTests(SynchronousTestCase):
    def test_all_taken(self) -> None:
        transport = _Transport(_Socket())
        self.assertTrue(direct_wire(transport).send(b"frame", 10))
        self.assertEqual((transport.socket.sent, transport.written), ([b"frame"], []))

    def test_part_taken(self) -> None:
        """What the kernel did not take goes to the transport."""
        for takes, rest in ((2, b"ame"), (0, b"frame")):
            transport = _Transport(_Socket(takes=takes))
            self.assertTrue(direct_wire(transport).send(b"frame", 10))
            self.assertEqual(transport.written, [rest])

    def test_send_fails(self) -> None:
        """A send that would block (or fails) leaves the whole frame to the transport."""
        for error in (BlockingIOError(), ConnectionResetError()):
            transport = _Transport(_Socket(error=error))
            self.assertTrue(direct_wire(transport).send(b"frame", 10))
            self.assertEqual(transport.written, [b"frame"])

    def test_behind_waiting_bytes_or_closing(self) -> None:
        """A frame never overtakes bytes waiting in the transport or autobahn's queue, nor goes out on a closing transport."""
        waiting = _Transport(_Socket(), buffered=b"xy")
        self.assertTrue(direct_wire(waiting).send(b"frame", 10))
        queued = _Transport(_Socket())
        self.assertTrue(direct_wire(queued, queued=(b"chopped",)).send(b"frame", 10))
        closing = _Transport(_Socket())
        closing.disconnecting = True
        self.assertTrue(direct_wire(closing).send(b"frame", 10))
        for transport in (waiting, queued, closing):
            self.assertEqual((transport.socket.sent, transport.written), ([], [b"frame"]))

    def test_limit(self) -> None:
        """Over the limit before: not written. Over it after: written, and False says so."""
        full = _Transport(_Socket(), buffered=b"x" * 11)
        self.assertFalse(direct_wire(full).send(b"frame", 10))
        self.assertEqual((full.socket.sent, full.written), ([], []))
        nearly = _Transport(_Socket(), buffered=b"x" * 6)
        self.assertFalse(direct_wire(nearly).send(b"frame", 10))
        self.assertEqual(nearly.written, [b"frame"])
        exactly = _Transport(_Socket(), buffered=b"x" * 5)
        self.assertTrue(direct_wire(exactly).send(b"frame", 10))


class SendBufferSizeTests(SynchronousTestCase):
    def test_counts_what_waits(self) -> None:
        """The unsent rest of the write buffer, plus what was written since the last doWrite."""
        self.assertEqual(send_buffer_size(_Transport(buffered=b"x" * 10, offset=4, temp=7)), 13)
        self.assertEqual(send_buffer_size(_Transport()), 0)

    def test_looks_through_a_wrapper(self) -> None:
        wrapper = type("TLS", (), {})()
        wrapper.transport = _Transport(buffered=b"x" * 5)
        self.assertEqual(send_buffer_size(wrapper), 5)

    def test_bufferless_transport_is_empty(self) -> None:
        self.assertEqual(send_buffer_size(object()), 0)


class WireIdleTests(SynchronousTestCase):
    """Wire.idle: a frame may be parsed beside autobahn's parser only at a frame boundary."""

    def test_idle_only_between_frames(self) -> None:
        client, server, pump = autobahn_pair()
        wire = Wire(server)
        self.assertTrue(wire.idle())
        frame = masked_text_frame(b"hello", b"abcd")
        client.transport.write(frame[:1])  # half a header: autobahn keeps the byte
        pump.flush()
        self.assertFalse(wire.idle())
        client.transport.write(frame[1:8])  # the header and part of the payload: a frame is open
        pump.flush()
        self.assertFalse(wire.idle())
        client.transport.write(frame[8:])
        pump.flush()
        self.assertTrue(wire.idle())
        first = bytearray(masked_text_frame(b"he", b"abcd"))
        first[0] = 0x01  # the first fragment of a message: inside a message until its last
        client.transport.write(bytes(first))
        pump.flush()
        self.assertFalse(wire.idle())
        client.transport.write(bytes((0x80,)) + masked_text_frame(b"llo", b"abcd")[1:])
        pump.flush()
        self.assertTrue(wire.idle())
        self.assertEqual(server.factory.messages, [(b"hello", False), (b"hello", False)])

    def test_public_path_never_idle(self) -> None:
        self.patch(private_ws, "FAST", False)
        client, server, pump = autobahn_pair()
        self.assertFalse(Wire(server).idle() or Wire(server).can_frame())


class _NoReactor:
    def addReader(self, reader) -> None:
        pass

    def addWriter(self, writer) -> None:
        pass

    def removeWriter(self, writer) -> None:
        pass


class PrivateNamesTests(SynchronousTestCase):
    """
    Every private name the fast paths use (private_ws.PRIVATE_NAMES), pinned: a new autobahn or
    Twisted without one fails here, naming it (the daemon would log it and take the public path).
    """

    def test_the_import_time_check_finds_every_name(self) -> None:
        self.assertEqual(private_ws._check(), ())
        self.assertTrue(private_ws.FAST)

    def test_each_name_on_live_objects(self) -> None:
        """Each name, looked up where the fast paths use it: opened autobahn ends, a fresh factory, a TCP transport."""
        client, server, pump = autobahn_pair()
        factory = WebSocketServerFactory("ws://localhost:9000", reactor=Clock())
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        connection = tcp.Connection(a, None, reactor=_NoReactor())
        connection.connected = True
        connection.write(b"abc")
        for name in PRIVATE_NAMES:
            owner, _, attribute = name.rpartition(".")
            if owner == "WebSocketProtocol":
                for end in (client, server):
                    self.assertTrue(hasattr(end, attribute), f"{name} is missing on {type(end).__name__}")
            elif owner == "WebSocketFactory._batched_timer":
                self.assertTrue(callable(getattr(factory._batched_timer, attribute, None)), f"{name} is missing")
            elif owner == "FileDescriptor":
                self.assertTrue(hasattr(connection, attribute), f"{name} is missing on tcp.Connection")
            elif owner == "tcp.Connection":
                self.assertIs(connection.getHandle(), a, f"{name} is not the socket")
            else:
                self.assertTrue(callable(getattr(importlib.import_module(owner), attribute, None)), f"{name} is missing")
        self.assertEqual(send_buffer_size(connection), 3)

    def test_missing_state_is_named(self) -> None:
        """The check names state autobahn no longer keeps."""
        from autobahn.twisted.websocket import WebSocketServerProtocol as TwistedServerProtocol

        made = TwistedServerProtocol._connectionMade

        def without_the_timer(self) -> None:
            made(self)
            del self.closeHandshakeTimeoutCall

        self.patch(TwistedServerProtocol, "_connectionMade", without_the_timer)
        self.assertEqual(private_ws._check(), ("WebSocketProtocol.closeHandshakeTimeoutCall",))

    def test_a_moved_log_helper_is_named(self) -> None:
        """A module that no longer holds the helpers (here, one that never did) is named."""
        self.patch(private_ws, "_LOG_FORMATTING_MODULES", ("autobahn.websocket.protocol", "json"))
        self.assertEqual(private_ws._check(), ("json.hltype", "json.hlval"))

    def test_a_changed_write_buffer_is_named(self) -> None:
        """A FileDescriptor whose writes no longer show in dataBuffer/offset/_tempDataLen is named."""
        from twisted.internet import abstract

        self.patch(abstract.FileDescriptor, "write", lambda self, data: None)
        self.assertEqual(private_ws._check(), ("FileDescriptor.dataBuffer",))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _daemon_classes() -> list[type]:
    """Every class defined in the daemon's modules (outside voicecall.testing and infra.private)."""
    found = []
    for info in pkgutil.walk_packages(voicecall.__path__, "voicecall."):
        if not info.name.startswith(("voicecall.testing", "voicecall.infra.private")):
            module = importlib.import_module(info.name)
            found += [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == info.name]
    return found


class PrivateNamesStayHereTests(SynchronousTestCase):
    """
    Outside voicecall.infra.private (and the fakes): no class of ours defines a name that a
    Twisted or autobahn base class keeps private (such a name silently replaces the library's
    own: MediaSocket's frame writer was once C{_send}, the name of autobahn's send-queue drain),
    none reads on self a private name only a library base sets (web/limits.py's channel once
    read five of HTTPChannel's), no module imports a library's private module or name, and none
    looks a private name up by its string.
    """

    def test_no_class_reads_a_private_name_it_inherits(self) -> None:
        """A class of ours with a Twisted or autobahn base reads on self only the private names our classes set."""
        reads = []
        for cls in _daemon_classes():
            if not any(base.__module__.startswith(("twisted.", "autobahn.")) for base in cls.__mro__):
                continue
            ours = [base for base in cls.__mro__ if base.__module__.startswith("voicecall")]
            trees = [ast.parse(textwrap.dedent(inspect.getsource(base))) for base in ours]
            set_here = {name for base in ours for name in vars(base)} | {
                node.attr for tree in trees for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del))
            }
            for node in ast.walk(trees[0]):
                if (
                    isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in set_here
                    and isinstance(node.value, ast.Name) and node.value.id == "self"
                ):
                    reads.append(f"{cls.__module__}.{cls.__name__} reads self.{node.attr}")
        self.assertEqual(sorted(set(reads)), [])

    def test_no_private_import_or_lookup(self) -> None:
        found = []
        package = Path(voicecall.__file__).parent
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(package).as_posix()
            if relative.startswith(("testing/", "infra/private/")):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith(("voicecall", "__future__")):
                    if any(_private(part) for part in node.module.split(".")) or any(_private(alias.name) for alias in node.names):
                        found.append(f"{relative}:{node.lineno}: from {node.module} import ...")
                elif isinstance(node, ast.Import):
                    found += [f"{relative}:{node.lineno}: import {a.name}" for a in node.names if any(_private(p) for p in a.name.split("."))]
                elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr", "delattr"):
                    name = node.args[1] if len(node.args) > 1 else None
                    if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                        found.append(f"{relative}:{node.lineno}: {node.func.id}(..., {name.value!r})")
        self.assertEqual(found, [])

    def test_no_class_shadows_a_private_library_name(self) -> None:
        shadowing = []
        for cls in _daemon_classes():
            for name in vars(cls):
                if _private(name):
                    for base in cls.__mro__[1:]:
                        if base.__module__.startswith(("twisted.", "autobahn.")) and name in vars(base):
                            shadowing.append(f"{cls.__module__}.{cls.__name__}.{name} shadows {base.__module__}.{base.__name__}.{name}")
        self.assertEqual(shadowing, [])
