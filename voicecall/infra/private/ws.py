# -*- test-case-name: tests.test_private_ws -*-
"""
The WebSocket fast paths, and the private autobahn and Twisted state they touch (the package's
other module, http.py, holds the webhook channel's).

On the hot paths voicecall frames, unmasks and writes its own messages instead of going through
autobahn (whose per-frame send and parse paths cost more than the rest of the media forwarding):
the media-stream server writes unmasked text frames (L{text_frame_header}) and unmasks its
clients' frames (L{xor_mask}); the realtime STT client writes masked ones (L{masked_text_frame}).
Doing so safely needs private state, read here and nowhere else, through one L{Wire} per
connection:

  - whether autobahn's parser sits at a frame boundary (C{current_frame}, C{inside_message},
    C{data}) and whether anything waits in its send queue or compression was negotiated
    (C{send_queue}, C{_perMessageCompress}): only then may a frame be read or written beside it;
  - what a Twisted transport still holds unsent (C{dataBuffer} from C{offset}, plus
    C{_tempDataLen}): the backpressure bound, and when it is zero a frame goes to the kernel
    now with one C{send(2)} on the socket (L{Wire.send});
  - the close-handshake timer autobahn leaves behind when the peer drops during our close
    (C{closeHandshakeTimeoutCall});
  - autobahn's per-factory batched timer (C{_batched_timer}), replaced by plain reactor calls
    that cancelling really removes (L{tune_factory});
  - the C{hltype}/C{hlval} log helpers autobahn evaluates on every frame whatever the log level
    (L{neutralise_autobahn_log_formatting}).

At import the module checks, on a throw-away autobahn protocol and Twisted transport, that every
one of these names is there and behaves as relied on (L{PRIVATE_NAMES}). If any is missing it
logs once and (unless only a log helper moved, which merely leaves autobahn's formatting in
place) every L{Wire} takes autobahn's public path: C{sendMessage} for every message,
autobahn's own parser for every frame, and the transport's producer pause (Twisted pauses a
registered producer once more than its C{bufferSize}, 64 KiB, waits) as the backlog signal.
Slower, and stricter about a backlog, but correct. setup.cfg bounds twisted and autobahn to the
major versions these names were verified against.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import abstract, tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "FAST",
    "MISSING",
    "PRIVATE_NAMES",
    "Wire",
    "masked_text_frame",
    "neutralise_autobahn_log_formatting",
    "send_buffer_size",
    "text_frame_header",
    "tune_factory",
    "xor_mask",
]

_log = Logger()

#: Every private name the fast paths use, as "owner.name".
PRIVATE_NAMES = (
    "WebSocketProtocol.current_frame",
    "WebSocketProtocol.inside_message",
    "WebSocketProtocol.data",
    "WebSocketProtocol.send_queue",
    "WebSocketProtocol._perMessageCompress",
    "WebSocketProtocol.closeHandshakeTimeoutCall",
    "WebSocketFactory._batched_timer.call_later",
    "FileDescriptor.dataBuffer",
    "FileDescriptor.offset",
    "FileDescriptor._tempDataLen",
    "tcp.Connection.getHandle",
    "autobahn.websocket.protocol.hltype",
    "autobahn.websocket.protocol.hlval",
    "autobahn.twisted.websocket.hltype",
    "autobahn.twisted.websocket.hlval",
)

_LOG_FORMATTING_MODULES = ("autobahn.websocket.protocol", "autobahn.twisted.websocket")
_LOG_FORMATTING_HELPERS = ("hltype", "hlval")


class _NoReactor:
    """Enough of a reactor for a FileDescriptor that is written to and never run."""

    def addWriter(self, writer: object) -> None:
        pass

    def removeWriter(self, writer: object) -> None:
        pass


_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _buffered(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def _check() -> tuple[str, ...]:
    """The entries of L{PRIVATE_NAMES} that are missing or do not behave as relied on."""
    missing = []
    factory = WebSocketServerFactory(reactor=Clock())
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(openHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    try:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(_UPGRADE)
        if protocol.state != protocol.STATE_OPEN:
            raise RuntimeError("the opening handshake did not complete")
    except Exception:
        _log.failure("private.ws: a throw-away autobahn protocol does not open")
        return PRIVATE_NAMES
    expected = {
        "current_frame": lambda v: v is None,
        "inside_message": lambda v: v is False,
        "data": lambda v: isinstance(v, bytes),
        "send_queue": lambda v: hasattr(v, "popleft") and not v,
        "_perMessageCompress": lambda v: v is None,
        "closeHandshakeTimeoutCall": lambda v: v is None,
    }
    for name, ok in expected.items():
        if not (hasattr(protocol, name) and ok(getattr(protocol, name))):
            missing.append("WebSocketProtocol." + name)
    if not callable(getattr(getattr(protocol.factory, "_batched_timer", None), "call_later", None)):
        missing.append("WebSocketFactory._batched_timer.call_later")
    descriptor = abstract.FileDescriptor(reactor=_NoReactor())
    descriptor.connected = True
    descriptor.write(b"abc")
    absent = [n for n in PRIVATE_NAMES if n.startswith("FileDescriptor.") and not hasattr(descriptor, n.partition(".")[2])]
    if absent:
        missing.extend(absent)
    elif _buffered(descriptor) != 3:
        missing.append("FileDescriptor.dataBuffer")  # there, but no longer what a write left waiting
    if not callable(getattr(tcp.Connection, "getHandle", None)):
        missing.append("tcp.Connection.getHandle")
    for module_name in _LOG_FORMATTING_MODULES:
        module = importlib.import_module(module_name)
        for helper in _LOG_FORMATTING_HELPERS:
            if not callable(getattr(module, helper, None)):
                missing.append(f"{module_name}.{helper}")
    return tuple(missing)


#: The private names that are missing or changed (empty when the fast paths are on).
MISSING: tuple[str, ...] = _check()
#: Whether the fast paths are on (the log helpers only concern L{neutralise_autobahn_log_formatting}).
FAST = not [name for name in MISSING if not name.startswith(_LOG_FORMATTING_MODULES)]
if MISSING:
    _log.warn(
        "autobahn/Twisted private names changed ({missing}): WebSockets take autobahn's public, slower path",
        missing=", ".join(MISSING),
    )


# -- frames (RFC 6455; pure) -----------------------------------------------------------------


def text_frame_header(length: int, masked: bool = False) -> bytes:
    """
    The header of an unfragmented WebSocket text frame of `length` payload bytes (RFC 6455
    §5.2: FIN and opcode 1, then the shortest length encoding), with the mask bit set when
    `masked` (a client's frame; the 4-byte key follows the header).
    """
    if length < 126:
        return bytes((0x81, 0x80 | length if masked else length))
    if length < 0x10000:
        return (b"\x81\xfe" if masked else b"\x81\x7e") + length.to_bytes(2, "big")
    return (b"\x81\xff" if masked else b"\x81\x7f") + length.to_bytes(8, "big")


#: Payload lengths up to this have their key-spreading integers cached (a few KiB in all).
_SPREAD_CACHE_MAX = 512
_SPREADS: dict[int, tuple[int, int]] = {}


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """
    `payload` XORed with the 4-byte key `mask` (RFC 6455 §5.3: each byte with the key byte at
    its offset mod 4), as big integers; XOR is its own inverse, so this masks and unmasks. For
    the usual (short) lengths the key is spread over the payload by one multiplication with a
    cached C{0x...000100000001} and cut to length with a cached all-ones; longer payloads build
    it.
    """
    n = len(payload)
    if not n:
        return payload
    spread = _SPREADS.get(n)
    if spread is None:
        if n > _SPREAD_CACHE_MAX:
            key = (mask * ((n >> 2) + 1))[:n]
            return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
        spread = _SPREADS[n] = (int.from_bytes(b"\1\0\0\0" * ((n + 3) >> 2), "little"), (1 << (8 * n)) - 1)
    key = int.from_bytes(mask, "little") * spread[0]
    return ((int.from_bytes(payload, "little") ^ key) & spread[1]).to_bytes(n, "little")


def masked_text_frame(payload: bytes, mask: bytes) -> bytes:
    """A client's unfragmented WebSocket text frame of `payload`, masked with the 4-byte key `mask`."""
    return text_frame_header(len(payload), True) + mask + xor_mask(payload, mask)


# -- transports and protocols -------------------------------------------------------------------


def _buffer_of(transport: Any) -> Any:
    """The transport under `transport` (itself, or looked through a TLS wrapper) that holds a write buffer."""
    for _ in range(4):
        if hasattr(transport, "_tempDataLen"):
            return transport
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def send_buffer_size(transport: Any) -> int:
    """
    Bytes written to `transport` and not yet taken by the kernel: the write buffer of Twisted's
    file-descriptor transports. A wrapping transport (TLS) is looked through to the TCP
    transport under it. A transport without such a buffer (or without the private names)
    counts as empty.
    """
    buffer = _buffer_of(transport) if FAST else None
    return 0 if buffer is None else _buffered(buffer)


#: What L{Wire.buffered} reports on the public path once the transport paused its producer.
BACKLOG_UNKNOWN = 1 << 62


@implementer(IPushProducer)
class Wire:
    """
    The fast paths of one autobahn connection, made when its transport is connected (in
    C{connectionMade}, after autobahn's). With L{FAST} off every check says "take the public
    path"; with C{watch_backlog}, L{buffered} then reads the transport's producer pause instead
    of its buffer (the wire registers itself as the transport's streaming producer: leave it
    off on a protocol that registers its own).
    """

    __slots__ = ("_protocol", "_transport", "_buffer", "_socket", "_paused")

    def __init__(self, protocol: Any, watch_backlog: bool = False) -> None:
        self._protocol = protocol
        self._transport = transport = protocol.transport
        # The transport holding the write buffer (a TLS transport is looked through) and, for a
        # plain TCP transport, the socket a frame may be sent on at once (see send).
        self._buffer = _buffer_of(transport) if FAST else None
        self._socket = transport.getHandle() if FAST and isinstance(transport, tcp.Connection) else None
        self._paused = False
        if not FAST and watch_backlog:
            transport.registerProducer(self, True)

    def idle(self) -> bool:
        """Whether a whole frame may be parsed here: autobahn's parser is at a frame boundary."""
        if not FAST:
            return False
        protocol = self._protocol
        return (
            protocol.current_frame is None
            and not protocol.inside_message
            and not protocol.data
            and protocol._perMessageCompress is None
        )

    def can_frame(self) -> bool:
        """Whether a frame built here may be written now (autobahn queues nothing, compresses nothing)."""
        if not FAST:
            return False
        protocol = self._protocol
        return not protocol.send_queue and protocol._perMessageCompress is None

    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel (public path: L{BACKLOG_UNKNOWN} once paused)."""
        if not FAST:
            return BACKLOG_UNKNOWN if self._paused else 0
        buffer = self._buffer
        return 0 if buffer is None else _buffered(buffer)

    def send(self, frame: bytes, limit: int) -> bool:
        """
        Write `frame` (built here, L{can_frame}) unless more than `limit` bytes already wait;
        False when it was not written, or when the write left more than `limit` waiting. On a
        plain TCP transport with nothing waiting it goes to the kernel now, with one C{send(2)}
        rather than on the reactor's next turn (two C{epoll_ctl(2)} and a send); what the kernel
        does not take, and every other frame, goes to the transport.
        """
        buffer = self._buffer
        if buffer is None:
            if self.buffered() > limit:
                return False
            self._transport.write(frame)
            return self.buffered() <= limit
        waiting = _buffered(buffer)
        if waiting > limit:
            return False
        if not waiting and self._socket is not None and not buffer.disconnecting and not self._protocol.send_queue:
            try:
                written = self._socket.send(frame)
            except OSError:
                written = 0  # would block, interrupted or broken: the transport finds out
            if written == len(frame):
                return True
            frame = frame[written:]
        self._transport.write(frame)
        return _buffered(buffer) <= limit

    def forget_close_timer(self) -> None:
        """Cancel the close-handshake timer autobahn leaves behind when the peer drops during our close."""
        if not FAST:
            return
        protocol = self._protocol
        timer, protocol.closeHandshakeTimeoutCall = protocol.closeHandshakeTimeoutCall, None
        if timer is not None:
            try:
                timer.cancel()
            except Exception:
                pass  # already fired or cancelled

    # IPushProducer (the public path's backlog signal).
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        self._paused = True


class _UnbatchedTimer:
    """The C{call_later} autobahn asks of a batched timer, as one reactor call per timeout."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall:
        return self._clock.callLater(delay, fun, *args, **kwargs)


def tune_factory(factory: Any, clock: IReactorTime) -> None:
    """
    Give an autobahn WebSocket factory plain reactor timers. autobahn schedules its handshake and
    ping timeouts through a txaio batched timer: cancelling such a call leaves its bucket's
    reactor call scheduled, so a connection that closed cleanly still leaves a delayed call
    behind for up to a second (a daemon stopping then does not stop cleanly, and trial reports
    an unclean reactor). On the public path autobahn keeps its batched timer.
    """
    if FAST:
        factory._batched_timer = _UnbatchedTimer(clock)


def _unformatted(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def neutralise_autobahn_log_formatting() -> bool:
    """
    Replace autobahn's C{hltype}/C{hlval} helpers with the identity in the modules that call
    them on every frame. autobahn evaluates them for C{log.debug} arguments whatever the log
    level (and colours them with click), which cost a quarter of a media server's CPU.
    Idempotent. Returns whether every expected helper was found (False means autobahn moved
    them, and the formatting may be back).
    """
    complete = True
    for name in _LOG_FORMATTING_MODULES:
        module = importlib.import_module(name)
        for helper in _LOG_FORMATTING_HELPERS:
            if not callable(getattr(module, helper, None)):
                complete = False
                continue
            setattr(module, helper, _unformatted)
    return complete
