# -*- test-case-name: tests.test_media_stream -*-
"""
The media-stream wire (SPEC §10.1-10.3): the autobahn WebSocket resource, protocol and factory of
L{voicecall.media.stream}, with the connection caps and timeouts of the hardened plugin. What a
message means for a call (start, mark, stop, DTMF, media) is the call policy's
(L{StreamCalls}, implemented by L{voicecall.media.stream.MediaStreamServer}).

Before the upgrade (plain HTTP, answered by L{MediaSockets.resource}): 503 when the open sockets
(upgrading, pending and active) reach L{Admission.max_connections} or after
L{MediaSockets.shutdown}; 400 for a missing, repeated or malformed C{Host}; 403 when an upgrade
verifier is configured and the request's C{X-Twilio-Signature} does not verify. After the upgrade the socket is *pending*: it is
closed 1013 when too many sockets are pending (in all, or from its client address; when all the
places are taken, the oldest pending socket gives its place to a newcomer once it has waited
L{PENDING_YIELD_AFTER} seconds for its start) and 1008 C{Start timeout} when no valid C{start}
arrives in time. A socket refused before its start is sent its close frame and dropped at once
(it does not wait for the peer's reply). Inbound frames and messages are capped at 64 KiB, a
message at L{MAX_FRAGMENTS} frames (1009); a text frame that is not UTF-8 closes the socket 1007
(RFC 6455 §8.1). A stream whose outbound data backs up (more than 1 MiB not yet taken by the
kernel) is closed 1013 C{Backpressure: send buffer exceeded}.

Every byte queued for a peer is bounded, autobahn's control frames included: a pong (or any
other frame autobahn writes, the close frame aside) that would leave more than 1 MiB waiting
(64 KiB before the start: a pending socket has no business being sent more) is not written, and
the socket is closed 1008 C{Peer does not read}. The close frame is written once whatever the
backlog; a peer that does not answer it within a second, or a socket still holding unsent bytes
a second after a close we answered, is aborted (its buffer freed).

Performance (DESIGN.md "Known levers"): the protocol runs without per-frame logging, timing,
UTF-8 re-validation (frames are parsed as JSON, which decodes UTF-8 anyway) or status page, with
autobahn's native accelerators when installed; whole masked text frames are unmasked here rather
than by autobahn, and outbound messages are framed here in one step (a text frame is a 2-4 byte
header and the JSON bytes) and, when nothing is queued before them, handed to the socket at once
(L{voicecall.infra.private.ws}, which takes autobahn's public path when its private names are
missing). An inbound C{media} message of an active stream in Twilio's own compact layout
(L{_MEDIA}) has its payload taken by one regular expression instead of a full JSON parse;
anything else, however slightly different, is parsed in full, and the expression admits only what
the JSON parser reads the same way.
"""
from __future__ import annotations

import json
import re
from binascii import Error as BinasciiError
from binascii import a2b_base64, b2a_base64
from collections import Counter
from typing import Any, Callable, Mapping, Protocol

from attrs import define, field, frozen
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from voicecall.infra.private.ws import Wire, text_frame_header, tune_factory, xor_mask

__all__ = ["Admission", "MediaSocket", "MediaSockets", "StreamCalls", "sanitize"]

#: Largest inbound frame or message (bytes); bigger ones close the socket 1009.
MAX_FRAME_BYTES = 64 * 1024
#: Frames one message may come in; more close the socket 1009 (autobahn keeps one list entry per
#: fragment, empty ones included, so the byte cap alone does not bound a message's memory).
MAX_FRAGMENTS = 64
#: Outbound bytes a stream may have waiting in its transport before it is closed 1013.
MAX_SEND_BUFFER = 1024 * 1024
#: Outbound bytes a socket still waiting for its start may have queued (pongs, in practice).
MAX_PENDING_SEND_BUFFER = 64 * 1024
#: Seconds a pending socket holds its place when the pending cap is full and a newcomer arrives:
#: Twilio sends its start at once, so a socket idle this long yields its place to the newcomer.
PENDING_YIELD_AFTER = 0.5
#: Seconds a closed socket may keep unsent bytes (a peer that does not read) before it is aborted.
ABORT_AFTER = 1.0

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013

TOO_MANY_CONNECTIONS = b"Too many media stream connections\n"
SHUTTING_DOWN = b"Media stream handler is shutting down\n"
TOO_MANY_PENDING = "Too many pending media stream connections"
START_TIMEOUT = "Start timeout"
BACKPRESSURE = "Backpressure: send buffer exceeded"
NOT_READING = "Peer does not read"
INVALID_UTF8 = "Invalid UTF-8 in a text frame"
TOO_FRAGMENTED = "Message in too many fragments"

_OPEN = WebSocketProtocol.STATE_OPEN
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A Twilio media message exactly as Twilio writes it: compact JSON, these members in this order
# (the stream SID before or after the media object), every value a string of safe characters,
# so no escape, no whitespace, no other key. Whatever it matches, json.loads reads as a dict
# whose "event" is "media" and whose media's "payload" is the captured text (the only members
# L{MediaSocket.onMessage} looks at; a repeated streamSid is the one duplicate it admits, and
# that value is ignored). Anything else takes the full parser.
_MEDIA = re.compile(
    rb'\{"event":"media"(?:,"sequenceNumber":"[0-9]{1,20}")?(?:,"streamSid":"[A-Za-z0-9_-]{1,64}")?'
    rb',"media":\{(?:"track":"[a-z_]{1,32}",)?(?:"chunk":"[0-9]{1,20}",)?(?:"timestamp":"[0-9]{1,20}",)?'
    rb'"payload":"([A-Za-z0-9+/]*={0,2})"\}(?:,"streamSid":"[A-Za-z0-9_-]{1,64}")?\}\Z'
)
#: Longest query-string token kept from the upgrade request.
MAX_TOKEN = 512
_MAX_LOGGED_BAD_FRAMES = 3
# An outbound media message of one 160-byte frame: 216 base64 characters and '"}}'.
_MEDIA_FRAME_BYTES = 160
_MEDIA_TAIL = b'"}}'
_MEDIA_BODY_LENGTH = 216 + len(_MEDIA_TAIL)


def sanitize(text: str | bytes, limit: int = 200) -> str:
    """`text` fit for a log line: decoded leniently, control characters removed, truncated."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: limit * 4]).decode("utf-8", "replace")
    text = _CONTROL.sub("", text)
    return text if len(text) <= limit else text[:limit] + "..."


class StreamCalls(Protocol):
    """What the wire hands to the call policy (L{voicecall.media.stream.MediaStreamServer})."""

    def media(self, connection: MediaSocket, ulaw: bytes) -> None:
        """Audio from an active stream (one the policy gave its session: L{MediaSocket.activate})."""

    def event(self, connection: MediaSocket, event: object, message: dict, payload: bytes) -> None:
        """Any other JSON object from the peer (C{start}, C{mark}, C{stop}, ...)."""

    def ended(self, connection: MediaSocket) -> None:
        """The socket is gone or being shut down: its session (if any) ends (called at least once)."""


class MediaSocket(WebSocketServerProtocol):
    """One media-stream socket: the wire. What its messages mean is the L{StreamCalls}'."""

    _log = Logger()
    _sockets: MediaSockets
    _wire: Wire
    client_ip = ""
    query_token: str | None = None
    #: The call policy's session once the stream started (the socket is then *active*).
    session: Any = None
    _handler_errors = 0
    _gone = False
    _bad_frames = 0
    _backed_up = False
    _sending_close = False
    _abort_call: IDelayedCall | None = None
    _fragments = 0
    _media_head: bytes | None = None
    #: Whether our own frames may be written beside autobahn's (decided at the opening handshake).
    _own_frames = False

    def connectionMade(self) -> None:
        self._sockets = self.factory.sockets
        super().connectionMade()
        self._wire = Wire(self, watch_backlog=True)
        self._sockets.connected(self)

    def connectionLost(self, reason) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self._wire.forget_close_timer()
            abort, self._abort_call = self._abort_call, None
            if abort is not None and abort.active():
                abort.cancel()
            self._went()

    def _went(self) -> None:
        """The socket closed or was lost: the sockets hear of it once."""
        if not self._gone:
            self._gone = True
            self._sockets.disconnected(self)

    @property
    def live(self) -> bool:
        """Whether messages can still be sent on the socket (autobahn's C{is_open} is a future)."""
        return self.state == _OPEN

    # -- what a message may cost is bounded --------------------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        """At most L{MAX_FRAGMENTS} frames per message (64 KiB of empty ones cost a megabyte)."""
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS and self.state == _OPEN:
            self._sockets.counts["1009-fragments"] += 1
            self.close_with(CLOSE_TOO_BIG, TOO_FRAGMENTED)
        super().onMessageFrameBegin(length)

    # -- what is queued for the peer is bounded ----------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Every frame autobahn writes (pongs, its close frame, anything it may add) passes here;
        ours go through L{send_text}. A frame that would leave more than the socket's budget
        waiting is not written and the socket is closed 1008 (the close frame itself is let
        through: it is written once).
        """
        if self.state == _OPEN and not self._sending_close:
            budget = MAX_SEND_BUFFER if self.session is not None else MAX_PENDING_SEND_BUFFER
            if self._wire.buffered() + len(data) > budget:
                self._not_reading(budget)
                return
        super().sendData(data, sync, chopsize)

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False) -> None:
        self._sending_close = True
        try:
            super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        finally:
            self._sending_close = False

    def _not_reading(self, budget: int) -> None:
        self._close_backed_up(
            "it does not read ({limit} bytes waiting to be sent)", budget, "1008-peer-not-reading", CLOSE_POLICY, NOT_READING
        )

    def dropConnection(self, abort: bool = False) -> None:
        """
        autobahn closes the TCP connection gracefully after answering a peer's close, and a
        graceful close waits until every queued byte is sent: from a peer that does not read,
        forever. Such a socket is aborted after L{ABORT_AFTER} seconds.
        """
        closing = self.state != WebSocketProtocol.STATE_CLOSED
        super().dropConnection(abort)
        if closing and not abort and self._abort_call is None and not self._gone:
            self._abort_call = self._sockets.clock.callLater(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None and not self._gone:
            abort()

    def onConnect(self, request):
        try:
            peer = getattr(self.transport.getPeer(), "host", None)
            self.client_ip = str(self._sockets.admission.client_ip(request.headers, peer) or "")
            tokens = request.params.get("token") or [None]
            token = tokens[0]
            self.query_token = token if isinstance(token, str) and len(token) <= MAX_TOKEN else None
        except Exception:
            self._log.failure("media stream upgrade failed")
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR) from None
        return None

    def onOpen(self) -> None:
        self._own_frames = self._wire.can_frame()
        try:
            self._sockets.opened(self)
        except Exception:
            self._log.failure("media stream open failed")
            self.close_with(CLOSE_POLICY, "Internal error")

    def onClose(self, wasClean, code, reason) -> None:
        try:
            self._went()
        except Exception:
            self._log.failure("media stream close failed")

    def dataReceived(self, data: bytes) -> None:
        """
        Fast path for the common case: whole, unfragmented, masked text frames of at most
        64 KiB, at a frame boundary of an open socket (every Twilio message). They are
        unmasked and handed to L{onMessage} here; everything else (handshake, partial
        frames, control frames, oversized or malformed frames, closing) goes to autobahn,
        which finds its parser state exactly as it left it.
        """
        if self.state != _OPEN or not self._wire.idle():
            super().dataReceived(data)
            return
        n = len(data)
        pos = 0
        while n - pos >= 6 and data[pos] == 0x81:
            length = data[pos + 1] ^ 0x80  # the mask bit must be set
            if length < 126:
                start = pos + 6
            elif length == 126 and n - pos >= 8:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126 or length > MAX_FRAME_BYTES:
                    break
                start = pos + 8
            else:
                break  # unmasked, 64-bit length, or an incomplete header
            end = start + length
            if end > n:
                break
            pos = end
            self.onMessage(xor_mask(data[start:end], data[start - 4 : start]), False)
            if self.state != _OPEN:
                break
        if pos < n:
            super().dataReceived(data[pos:] if pos else data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != _OPEN or self._gone:
            return
        try:
            if isBinary:
                self.bad_frame("binary frame", payload)
                return
            calls = self._sockets.calls
            if self.session is not None:
                match = _MEDIA.match(payload)
                if match is not None:
                    try:
                        ulaw = a2b_base64(match.group(1))
                    except BinasciiError:
                        self.bad_frame("media without a base64 payload", payload)
                        return
                    calls.media(self, ulaw)
                    return
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                # autobahn's own validation is off (see the module docstring): RFC 6455 §8.1.
                self.bad_frame("invalid UTF-8", payload)
                self._sockets.counts["1007"] += 1
                self.close_with(CLOSE_INVALID_PAYLOAD, INVALID_UTF8)
                return
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):
                self.bad_frame("invalid JSON", payload)
                return
            if type(message) is not dict:
                self.bad_frame("not a JSON object", payload)
                return
            event = message.get("event")
            if event == "media":
                if self.session is None:
                    return  # media before start is dropped
                try:
                    ulaw = a2b_base64(message["media"]["payload"])
                except (KeyError, TypeError, ValueError, BinasciiError):
                    self.bad_frame("media without a base64 payload", payload)
                    return
                calls.media(self, ulaw)
            else:
                calls.event(self, event, message, payload)
        except Exception:
            self._log.failure("media stream message failed")

    def bad_frame(self, what: str, payload: bytes) -> None:
        """Log (a few per socket, sanitised and truncated) and ignore an unusable frame."""
        self._bad_frames += 1
        if self._bad_frames <= _MAX_LOGGED_BAD_FRAMES:
            self._log.warn(
                "ignored media stream frame from {ip} ({what}): {frame}",
                ip=self.client_ip,
                what=what,
                frame=sanitize(payload),
            )

    # -- sending -----------------------------------------------------------------------------

    def send_text(self, data: bytes) -> bool:
        """
        Send one text frame of `data` (UTF-8 JSON) if the socket is open and not backed up;
        False when it was not sent, or when the write left more than 1 MiB waiting (the
        socket is then closed 1013).
        """
        if self.state != _OPEN:
            return False
        if self._own_frames:
            return self._send_frame(text_frame_header(len(data)) + data)
        return self._send_public(data)

    def send_media(self, prefix: bytes, frame: bytes) -> bool:
        """
        Send `frame` (mu-law) as a media message: `prefix` (the same for every message of this
        socket), the base64 audio and its closing C{"}}}, as L{send_text} does. A 160-byte
        frame's message header is the same every time, so it is built once.
        """
        body = b2a_base64(frame, newline=False) + _MEDIA_TAIL
        if len(frame) == _MEDIA_FRAME_BYTES and self._own_frames and self.state == _OPEN:
            head = self._media_head
            if head is None:
                head = self._media_head = text_frame_header(len(prefix) + _MEDIA_BODY_LENGTH) + prefix
            return self._send_frame(head + body)
        return self.send_text(prefix + body)

    def _send_frame(self, frame: bytes) -> bool:
        if self._wire.send(frame, MAX_SEND_BUFFER):
            return True
        self._backpressure()
        return False

    def _send_public(self, data: bytes) -> bool:
        """autobahn's public path (L{voicecall.infra.private.ws} without its private names, or compression)."""
        if self._wire.buffered() > MAX_SEND_BUFFER:
            self._backpressure()
            return False
        self.sendMessage(data, False)
        if self.state != _OPEN:
            return False  # not written: over the not-reading budget
        if self._wire.buffered() > MAX_SEND_BUFFER:
            self._backpressure()
            return False
        return True

    def _backpressure(self) -> None:
        self._close_backed_up(
            "more than {limit} bytes waiting to be sent", MAX_SEND_BUFFER, "backpressure", CLOSE_TRY_AGAIN, BACKPRESSURE
        )

    def _close_backed_up(self, why: str, limit: int, count: str, code: int, reason: str) -> None:
        """Close a socket whose outbound data backs up (logged and counted once per socket)."""
        if not self._backed_up:
            self._backed_up = True
            self._log.warn("closing media stream from {ip}: " + why, ip=self.client_ip, limit=limit)
            self._sockets.counts[count] += 1
        self.close_with(code, reason)

    # -- the call policy's state -------------------------------------------------------------

    def activate(self, session: Any) -> None:
        """The policy accepted the stream's start: the socket is *active* and carries `session`."""
        self.session = session

    def deactivate(self) -> Any:
        """The stream ended: the session the socket carried (None if it had none, or ended already)."""
        session, self.session = self.session, None
        return session

    def count_handler_error(self) -> int:
        """One more failure of the policy's handler on this socket: how many so far (the policy logs a few)."""
        self._handler_errors += 1
        return self._handler_errors

    # -- closing -----------------------------------------------------------------------------

    def refuse(self, code: int, reason: str) -> None:
        """
        Close a socket refused before its start: the close frame is sent and the connection
        dropped at once, without waiting for the peer's close reply, so refused sockets do not
        hold places among the connections for the length of a close handshake.
        """
        self.close_with(code, reason)
        if self.state != WebSocketProtocol.STATE_CLOSED:
            self.dropConnection(abort=False)

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with `code` (any code, unlike sendClose)."""
        if self.state == _OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123) if reason else None, isReply=False)
        elif self.state == WebSocketProtocol.STATE_CONNECTING:
            self.dropConnection(abort=True)


class _MediaStreamFactory(WebSocketServerFactory):
    protocol = MediaSocket

    def __init__(self, sockets: MediaSockets, reactor) -> None:
        super().__init__(reactor=reactor, server=None)
        self.sockets = sockets
        self.logOctets = False
        self.logFrames = False
        self.trackTimings = False
        self.setProtocolOptions(
            webStatus=False,
            utf8validateIncoming=False,
            maxFramePayloadSize=MAX_FRAME_BYTES,
            maxMessagePayloadSize=MAX_FRAME_BYTES,
            failByDrop=False,
            openHandshakeTimeout=0,  # the handshake is complete when the resource renders
            closeHandshakeTimeout=1,
            autoPingInterval=0,
            tcpNoDelay=True,
        )
        tune_factory(self, reactor)


class _StreamResource(Resource):
    """The stream path: the checks made before an upgrade, then autobahn's resource."""

    isLeaf = True

    def __init__(self, sockets: MediaSockets, upgrade: Resource) -> None:
        super().__init__()
        self._sockets = sockets
        self._upgrade = upgrade

    def render(self, request):
        refusal = self._sockets.screen_upgrade(request)
        if refusal is not None:
            status, body = refusal
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            return body
        return self._upgrade.render(request)


@frozen
class Admission:
    """
    Which media sockets are let in, and for how long one may wait for its start: the caps, the
    timeouts, and the checks made on an upgrade (built once, by tap.py, from C{streaming.*}).
    """

    max_connections: int = 128
    max_pending: int = 32
    max_pending_per_ip: int = 4
    pre_start_timeout: float = 5.0
    pending_yield_after: float = PENDING_YIELD_AFTER
    #: (lower-case headers, peer host) -> the client address the per-address cap counts.
    client_ip: Callable[[Mapping[str, str], "str | None"], str] = lambda headers, peer: peer or ""
    #: (the wss URL as requested: "wss://" + Host + request target, lower-case headers) -> ok
    verify_upgrade: Callable[[str, Mapping[str, str]], bool] | None = None


@define(repr=False)
class MediaSockets:
    """
    The media-stream sockets: mount L{resource} at the stream path of the webhook Site. Counts
    and caps sockets, times pending ones out, and hands their messages to L{calls}.
    """

    clock: Any
    calls: StreamCalls
    admission: Admission = field(factory=Admission)
    resource: Resource = field(init=False)
    #: Refusals and closes by label, for metrics.
    counts: Counter = field(init=False, factory=Counter)
    _connections: set = field(init=False, factory=set)
    #: Pending sockets, oldest first (a dict keeps insertion order): (since, start timer).
    _pending: dict[MediaSocket, tuple[float, IDelayedCall]] = field(init=False, factory=dict)
    _pending_by_ip: dict = field(init=False, factory=dict)
    _shutting_down: bool = field(init=False, default=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self.resource = _StreamResource(self, WebSocketResource(_MediaStreamFactory(self, self.clock)))

    @property
    def pending_count(self) -> int:
        """Upgraded sockets still waiting for a valid start."""
        return len(self._pending)

    def shutdown(self) -> None:
        """End every socket's session, close every socket 1001, and refuse new upgrades with a 503."""
        self._shutting_down = True
        for connection in list(self._connections):
            self.leave_pending(connection)
            self.calls.ended(connection)
            connection.close_with(CLOSE_GOING_AWAY, "Server shutting down")

    # -- before the upgrade ------------------------------------------------------------------

    def screen_upgrade(self, request) -> tuple[int, bytes] | None:
        """The refusal (status, body) of an upgrade request, or None to let it upgrade."""
        if self._shutting_down:
            self.counts["503-shutting-down"] += 1
            return 503, SHUTTING_DOWN
        if len(self._connections) >= self.admission.max_connections:
            self.counts["503"] += 1
            return 503, TOO_MANY_CONNECTIONS
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else ""
        if not _HOST.match(host):
            self.counts["400"] += 1
            return 400, b"Bad Request\n"
        if self.admission.verify_upgrade is not None:
            headers: dict[str, str] = {}
            for name, values in request.requestHeaders.getAllRawHeaders():
                headers.setdefault(name.decode("latin-1").lower(), values[0].decode("latin-1"))
            url = "wss://" + host + request.uri.decode("latin-1")
            try:
                ok = bool(self.admission.verify_upgrade(url, headers))
            except Exception:
                self._log.failure("media stream upgrade verification failed")
                ok = False
            if not ok:
                self.counts["403"] += 1
                self._log.warn(
                    "refused media stream upgrade from {ip}: X-Twilio-Signature does not verify",
                    ip=sanitize(str(getattr(request.getClientAddress(), "host", ""))),
                )
                return 403, b"Forbidden\n"
        return None

    # -- socket lifecycle --------------------------------------------------------------------

    def connected(self, connection: MediaSocket) -> None:
        self._connections.add(connection)

    def opened(self, connection: MediaSocket) -> None:
        if self._shutting_down:
            connection.close_with(CLOSE_GOING_AWAY, "Server shutting down")
            return
        ip = connection.client_ip
        admission = self.admission
        if len(self._pending) >= admission.max_pending and self._pending_by_ip.get(ip, 0) < admission.max_pending_per_ip:
            self._yield_oldest_pending()
        if len(self._pending) >= admission.max_pending or self._pending_by_ip.get(ip, 0) >= admission.max_pending_per_ip:
            self.counts["1013-pending"] += 1
            self._log.warn("closing media stream from {ip}: {reason}", ip=ip, reason=TOO_MANY_PENDING)
            connection.refuse(CLOSE_TRY_AGAIN, TOO_MANY_PENDING)
            return
        since = self.clock.seconds()
        self._pending[connection] = (since, self.clock.callLater(self.admission.pre_start_timeout, self._start_timed_out, connection))
        self._pending_by_ip[ip] = self._pending_by_ip.get(ip, 0) + 1

    def _yield_oldest_pending(self) -> None:
        """
        With every pending place taken, the oldest pending socket gives its place up (closed 1013)
        if it has held it for L{PENDING_YIELD_AFTER} seconds without a valid start: idle sockets
        (the upgrade signature is one constant per account) cannot keep Twilio's streams out.
        """
        oldest = next(iter(self._pending), None)
        if oldest is None or self.clock.seconds() - self._pending[oldest][0] < self.admission.pending_yield_after:
            return
        self.leave_pending(oldest)
        self.counts["1013-pending-yielded"] += 1
        self._log.info("closing media stream from {ip}: no start, its place given to a newcomer", ip=oldest.client_ip)
        oldest.refuse(CLOSE_TRY_AGAIN, TOO_MANY_PENDING)

    def _start_timed_out(self, connection: MediaSocket) -> None:
        if connection not in self._pending:
            return
        self.counts["1008-start-timeout"] += 1
        self._log.info("closing media stream from {ip}: no start in time", ip=connection.client_ip)
        connection.refuse(CLOSE_POLICY, START_TIMEOUT)

    def is_pending(self, connection: MediaSocket) -> bool:
        """Whether the socket is upgraded and still waiting for a valid start."""
        return connection in self._pending

    def leave_pending(self, connection: MediaSocket) -> None:
        """The socket is no longer pending (it started, or is going): its place and timer are freed."""
        place = self._pending.pop(connection, None)
        if place is None:
            return
        timer = place[1]
        if timer.active():
            timer.cancel()
        ip = connection.client_ip
        left = self._pending_by_ip.get(ip, 1) - 1
        if left > 0:
            self._pending_by_ip[ip] = left
        else:
            self._pending_by_ip.pop(ip, None)

    def disconnected(self, connection: MediaSocket) -> None:
        """The socket closed or was lost (called once per socket)."""
        self._connections.discard(connection)
        self.leave_pending(connection)
        self.calls.ended(connection)
