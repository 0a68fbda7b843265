# -*- test-case-name: tests.test_wsframes -*-
"""
The RFC 6455 frames voicecall writes and reads itself, and the send-buffer accounting both of
its WebSocket ends share.

autobahn does the handshakes, control frames, closing and anything unusual; on the hot paths
voicecall frames its own messages: the media-stream server (L{voicecall.media.stream}) writes
unmasked text frames (L{text_frame_header}) and unmasks its clients' frames (L{xor_mask}); the
realtime STT client (L{voicecall.speech.stt}) writes masked ones (L{masked_text_frame}). Both
hand a frame to the kernel at once when nothing is queued before it (L{write_now}; each caller
checks its own preconditions first) and read what is still waiting in a transport with
L{send_buffer_size}.
"""
from __future__ import annotations

__all__ = ["masked_text_frame", "send_buffer_size", "text_frame_header", "write_now", "xor_mask"]


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


def send_buffer_size(transport) -> int:
    """
    Bytes written to `transport` and not yet taken by the kernel: the write buffer of Twisted's
    file-descriptor transports (C{dataBuffer} from C{offset}, plus the C{_tempDataBuffer}
    gathered since the last C{doWrite}). A wrapping transport (TLS) is looked through to the
    TCP transport under it. A transport without such a buffer counts as empty.
    """
    for _ in range(4):
        try:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        except AttributeError:
            transport = getattr(transport, "transport", None)
            if transport is None:
                return 0
    return 0


def write_now(transport, frame: bytes) -> bytes:
    """
    Hand `frame` to the kernel now, with one C{send(2)} on the socket of the plain TCP
    C{transport} (a C{twisted.internet.tcp.Connection}), rather than on the reactor's next turn
    (two C{epoll_ctl(2)} and a send). Only for a transport with nothing waiting to be written
    and not disconnecting, which the caller checks. Returns what the kernel did not take (all
    of `frame` when the send would block or failed: the transport finds out), empty bytes when
    it took everything; the caller writes the rest to the transport.
    """
    try:
        written = transport.socket.send(frame)
    except OSError:
        return frame  # would block, interrupted or broken
    return frame[written:]
