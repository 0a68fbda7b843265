# -*- test-case-name: tests.test_media_stream -*-
"""
The Twilio Media Streams server (SPEC §10.1-10.3, PROVIDERS §1.4): an autobahn WebSocket
resource mounted on the webhook Site, with the connection caps and timeouts of the hardened
plugin, and one L{StreamSession} per accepted stream.

Before the upgrade (plain HTTP, answered by L{MediaStreamServer.resource}): 503 when the open
sockets (upgrading, pending and active) reach C{max_connections} or after L{shutdown}; 400 for a
missing, repeated or malformed C{Host}; 403 when an upgrade verifier is configured and the
request's C{X-Twilio-Signature} does not verify. After the upgrade the socket is *pending*: it is
closed 1013 when too many sockets are pending (in all, or from its client address; when all the
places are taken, the oldest pending socket gives its place to a newcomer once it has waited
L{PENDING_YIELD_AFTER} seconds for its start) and 1008
C{Start timeout} when no valid C{start} arrives in time. A C{start} with a call SID that the
handler accepts (with the stream's one-time token, which the session does not keep) makes it
*active*: a socket refused before that is sent its close frame and dropped at once (it does not
wait for the peer's reply). A session is registered under its stream SID and the handler hears about its media,
DTMF digits and end. Inbound frames and messages are capped at 64 KiB, a message at
L{MAX_FRAGMENTS} frames (1009); a text frame that is not UTF-8
closes the socket 1007 (RFC 6455 §8.1). A stream whose outbound data backs up (more than 1 MiB
not yet taken by the kernel, read from the TCP transport's write buffer) is closed 1013
C{Backpressure: send buffer exceeded}.

Every byte queued for a peer is bounded, autobahn's control frames included: a pong (or any
other frame autobahn writes, the close frame aside) that would leave more than 1 MiB waiting
(64 KiB before the start: a pending socket has no business being sent more) is not written, and
the socket is closed 1008 C{Peer does not read}. The close frame is written once whatever the
backlog; a peer that does not answer it within a second, or a socket still holding unsent bytes
a second after a close we answered, is aborted (its buffer freed).

Performance (DESIGN.md "Known levers"): autobahn's per-frame log-argument formatting is
neutralised once (L{neutralise_autobahn_log_formatting}); the protocol runs without per-frame
logging, timing, UTF-8 re-validation (frames are parsed as JSON, which decodes UTF-8 anyway) or
status page, with autobahn's native accelerators when installed; whole masked text frames are
unmasked here rather than by autobahn, and outbound messages are framed here in one step (a
text frame is a 2-4 byte header and the JSON bytes) and, when nothing is queued before them,
handed to the socket at once (the frames and the direct send are L{voicecall.infra.wsframes}'s). An
inbound C{media} message of an active stream in Twilio's own compact layout (L{_MEDIA}) has
its payload taken by one regular expression instead of a full JSON parse; anything else,
however slightly different, is parsed in full, and the expression admits only what the JSON
parser reads the same way.
"""
from __future__ import annotations

import importlib
import json
import re
from binascii import Error as BinasciiError
from binascii import a2b_base64, b2a_base64
from collections import Counter
from types import MappingProxyType
from typing import Callable, Mapping, Protocol

from attrs import define, field
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket import USES_NVX
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from voicecall.media.playback import SYNTHESIS_TIMEOUT, Playback, PlaybackScheduler
from voicecall.infra.wsframes import send_buffer_size, text_frame_header, write_now, xor_mask
from voicecall.infra.wstimers import unbatch

__all__ = [
    "MediaStreamServer",
    "StreamHandler",
    "StreamSession",
    "neutralise_autobahn_log_formatting",
]

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
MISSING_CALL_SID = "Missing callSid"
MISSING_STREAM_SID = "Missing streamSid"
UNKNOWN_CALL = "Unknown call"
DUPLICATE_STREAM = "Duplicate streamSid"
BACKPRESSURE = "Backpressure: send buffer exceeded"
NOT_READING = "Peer does not read"
INVALID_UTF8 = "Invalid UTF-8 in a text frame"
TOO_FRAGMENTED = "Message in too many fragments"

_OPEN = WebSocketProtocol.STATE_OPEN
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DTMF = frozenset("0123456789*#ABCD")
# A Twilio media message exactly as Twilio writes it: compact JSON, these members in this order
# (the stream SID before or after the media object), every value a string of safe characters,
# so no escape, no whitespace, no other key. Whatever it matches, json.loads reads as a dict
# whose "event" is "media" and whose media's "payload" is the captured text (the only members
# L{MediaStreamProtocol.onMessage} looks at; a repeated streamSid is the one duplicate it
# admits, and that value is ignored). Anything else takes the full parser.
_MEDIA = re.compile(
    rb'\{"event":"media"(?:,"sequenceNumber":"[0-9]{1,20}")?(?:,"streamSid":"[A-Za-z0-9_-]{1,64}")?'
    rb',"media":\{(?:"track":"[a-z_]{1,32}",)?(?:"chunk":"[0-9]{1,20}",)?(?:"timestamp":"[0-9]{1,20}",)?'
    rb'"payload":"([A-Za-z0-9+/]*={0,2})"\}(?:,"streamSid":"[A-Za-z0-9_-]{1,64}")?\}\Z'
)
_MAX_TOKEN = 512
_MAX_MARK_NAME = 256
_MAX_PARAMETERS = 32
_MAX_LOGGED_BAD_FRAMES = 3
_MAX_LOGGED_HANDLER_ERRORS = 3

_LOG_FORMATTING_MODULES = ("autobahn.websocket.protocol", "autobahn.twisted.websocket")
_LOG_FORMATTING_HELPERS = ("hltype", "hlval")


def _unformatted(value, *args, **kwargs):
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


def sanitize(text: str | bytes, limit: int = 200) -> str:
    """`text` fit for a log line: decoded leniently, control characters removed, truncated."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: limit * 4]).decode("utf-8", "replace")
    text = _CONTROL.sub("", text)
    return text if len(text) <= limit else text[:limit] + "..."


class StreamHandler(Protocol):
    """What the daemon does with streams (wired by tap.py to the manager, the provider and STT)."""

    def accept_start(self, call_sid: str, token: str | None) -> bool:
        """Whether a stream for `call_sid` with `token` may start (constant-time token check)."""

    def stream_started(self, session: StreamSession) -> None: ...

    def media_received(self, session: StreamSession, ulaw: bytes) -> None: ...

    def dtmf_received(self, session: StreamSession, digit: str) -> None: ...

    def stream_stopped(self, session: StreamSession) -> None:
        """The stream sent `stop`, or its socket closed (called once per session)."""


@define(eq=False, repr=False)
class StreamSession:
    """An accepted stream: who it is for, its playback queue, and the way to talk to Twilio."""

    call_sid: str
    stream_sid: str
    client_ip: str
    _connection: MediaStreamProtocol = field(repr=False)
    custom_parameters: Mapping[str, str] = field(factory=dict, repr=False)
    playback: Playback = field(init=False, repr=False, default=None)
    _media_prefix: bytes = field(init=False, repr=False)
    _media_frame_prefix: bytes = field(init=False, repr=False)
    _clear: bytes = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        sid = json.dumps(self.stream_sid)
        self._media_prefix = ('{"event":"media","streamSid":%s,"media":{"payload":"' % sid).encode()
        # A 160-byte frame is 216 base64 characters: its frame header is the same every time.
        self._media_frame_prefix = text_frame_header(len(self._media_prefix) + 219) + self._media_prefix
        self._clear = ('{"event":"clear","streamSid":%s}' % sid).encode()

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on the stream."""
        return self._connection.state == _OPEN

    def send_media(self, frame: bytes) -> bool:
        """Send 8 kHz mu-law audio (one 160-byte frame); False if it could not be sent."""
        if len(frame) == 160:
            return self._connection.send_frame(self._media_frame_prefix + b2a_base64(frame, newline=False) + b'"}}')
        return self._connection.send_text(self._media_prefix + b2a_base64(frame, newline=False) + b'"}}')

    def send_mark(self, name: str) -> bool:
        """Send a mark; Twilio echoes it once the audio sent before it has played."""
        message = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
        return self._connection.send_text(json.dumps(message, separators=(",", ":")).encode())

    def send_clear(self) -> bool:
        """Tell Twilio to drop the audio it has buffered (barge-in)."""
        return self._connection.send_text(self._clear)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the stream's socket (the session then ends, if it had not already)."""
        self._connection.close_with(code, reason)


class MediaStreamProtocol(WebSocketServerProtocol):
    """One media-stream socket. The policy lives in L{MediaStreamServer}; this is the wire."""

    _log = Logger()
    _media: MediaStreamServer
    client_ip = ""
    query_token: str | None = None
    session: StreamSession | None = None
    pending_timer: IDelayedCall | None = None
    pending_since = 0.0
    is_pending = False
    _gone = False
    _bad_frames = 0
    _handler_errors = 0
    _backed_up = False
    _direct = False
    _sending_close = False
    _abort_call: IDelayedCall | None = None
    _fragments = 0

    def connectionMade(self) -> None:
        self._media = self.factory.media_server
        super().connectionMade()
        # A plain TCP transport can be written to synchronously (see send_frame).
        self._direct = isinstance(self.transport, tcp.Connection)
        self._media._connected(self)

    def connectionLost(self, reason) -> None:
        try:
            super().connectionLost(reason)
        finally:
            # autobahn leaves this timer behind when the peer drops during our close handshake.
            timer, self.closeHandshakeTimeoutCall = getattr(self, "closeHandshakeTimeoutCall", None), None
            if timer is not None:
                try:
                    timer.cancel()
                except Exception:
                    pass  # already fired or cancelled
            abort, self._abort_call = self._abort_call, None
            if abort is not None and abort.active():
                abort.cancel()
            self._media._disconnected(self)

    # -- what a message may cost is bounded --------------------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        """At most L{MAX_FRAGMENTS} frames per message (64 KiB of empty ones cost a megabyte)."""
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS and not self.failedByMe:
            self._media.counts["1009-fragments"] += 1
            self._fail_connection(CLOSE_TOO_BIG, TOO_FRAGMENTED)
        super().onMessageFrameBegin(length)

    # -- what is queued for the peer is bounded ----------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Every frame autobahn writes (pongs, its close frame, anything it may add) passes here;
        ours go through L{send_frame}. A frame that would leave more than the socket's budget
        waiting is not written and the socket is closed 1008 (the close frame itself is let
        through: it is written once).
        """
        if self.state == _OPEN and not self._sending_close:
            budget = MAX_SEND_BUFFER if self.session is not None else MAX_PENDING_SEND_BUFFER
            if send_buffer_size(self.transport) + len(data) > budget:
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

    def _closeConnection(self, abort: bool = False) -> None:
        """
        autobahn closes the TCP connection gracefully after answering a peer's close, and a
        graceful close waits until every queued byte is sent: from a peer that does not read,
        forever. Such a socket is aborted after L{ABORT_AFTER} seconds.
        """
        super()._closeConnection(abort)
        if not abort and self._abort_call is None and not self._gone:
            self._abort_call = self._media._reactor.callLater(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None and not self._gone:
            abort()

    def onConnect(self, request):
        try:
            peer = getattr(self.transport.getPeer(), "host", None)
            self.client_ip = str(self._media._client_ip(request.headers, peer) or "")
            tokens = request.params.get("token") or [None]
            token = tokens[0]
            self.query_token = token if isinstance(token, str) and len(token) <= _MAX_TOKEN else None
        except Exception:
            self._log.failure("media stream upgrade failed")
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR)
        return None

    def onOpen(self) -> None:
        try:
            self._media._opened(self)
        except Exception:
            self._log.failure("media stream open failed")
            self.close_with(CLOSE_POLICY, "Internal error")

    def onClose(self, wasClean, code, reason) -> None:
        try:
            self._media._disconnected(self)
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
        if (
            self.state != _OPEN
            or self.current_frame is not None
            or self.inside_message
            or self.data
            or self._perMessageCompress is not None
        ):
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
            session = self.session
            if session is not None:
                match = _MEDIA.match(payload)
                if match is not None:
                    try:
                        ulaw = a2b_base64(match.group(1))
                    except BinasciiError:
                        self.bad_frame("media without a base64 payload", payload)
                        return
                    self.call_handler("media_received", session, ulaw)
                    return
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                # autobahn's own validation is off (see the module docstring): RFC 6455 §8.1.
                self.bad_frame("invalid UTF-8", payload)
                self._media.counts["1007"] += 1
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
                session = self.session
                if session is None:
                    return  # media before start is dropped
                try:
                    ulaw = a2b_base64(message["media"]["payload"])
                except (KeyError, TypeError, ValueError, BinasciiError):
                    self.bad_frame("media without a base64 payload", payload)
                    return
                self.call_handler("media_received", session, ulaw)
            else:
                self._media._event(self, event, message, payload)
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

    def call_handler(self, name: str, *args) -> None:
        """Call the stream handler; its failures are logged (a few per socket) and contained."""
        try:
            getattr(self._media._handler, name)(*args)
        except Exception:
            self._handler_errors += 1
            if self._handler_errors <= _MAX_LOGGED_HANDLER_ERRORS:
                self._log.failure("media stream handler {name} failed", name=name)

    def send_text(self, data: bytes) -> bool:
        """
        Send one text frame of `data` (UTF-8 JSON) if the socket is open and not backed up;
        False when it was not sent, or when the write left more than 1 MiB waiting (the
        socket is then closed 1013).
        """
        return self.send_frame(text_frame_header(len(data)) + data)

    def send_frame(self, frame: bytes) -> bool:
        """Send a complete, unmasked WebSocket frame, as L{send_text} does."""
        if self.state != _OPEN:
            return False
        transport = self.transport
        if self._direct:
            buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            if not buffered and not self.send_queue and not transport.disconnecting:
                # Nothing is queued before this frame: hand it to the kernel now.
                frame = write_now(transport, frame)
                if not frame:
                    return True
        else:
            buffered = send_buffer_size(transport)
        if buffered > MAX_SEND_BUFFER:
            self._backpressure()
            return False
        transport.write(frame)
        if send_buffer_size(transport) > MAX_SEND_BUFFER:
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
            self._media.counts[count] += 1
        self.close_with(code, reason)

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
    protocol = MediaStreamProtocol

    def __init__(self, media_server: MediaStreamServer, reactor) -> None:
        super().__init__(reactor=reactor, server=None)
        self.media_server = media_server
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
        unbatch(self, reactor)


class _StreamResource(Resource):
    """The stream path: the checks made before an upgrade, then autobahn's resource."""

    isLeaf = True

    def __init__(self, server: MediaStreamServer, upgrade: Resource) -> None:
        super().__init__()
        self._server = server
        self._upgrade = upgrade

    def render(self, request):
        refusal = self._server._screen_upgrade(request)
        if refusal is not None:
            status, body = refusal
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            return body
        return self._upgrade.render(request)


@define(repr=False)
class MediaStreamServer:
    """
    The media-stream WebSocket server: mount L{resource} at the stream path of the webhook
    Site. Counts and caps sockets, times out silent ones, and turns accepted streams into
    L{StreamSession}s reported to the L{StreamHandler}.
    """

    _reactor: object
    _handler: StreamHandler
    _max_connections: int = 128
    _max_pending: int = 32
    _max_pending_per_ip: int = 4
    _pre_start_timeout: float = 5.0
    _pending_yield_after: float = PENDING_YIELD_AFTER
    _client_ip: Callable[[Mapping[str, str], "str | None"], str] = lambda headers, peer: peer or ""
    #: (the wss URL as requested: "wss://" + Host + request target, lower-case headers) -> ok
    _verify_upgrade: Callable[[str, Mapping[str, str]], bool] | None = None
    _playback: PlaybackScheduler | None = None
    _synthesis_timeout: float = SYNTHESIS_TIMEOUT
    resource: Resource = field(init=False)
    #: Refusals and closes by label, for metrics.
    counts: Counter = field(init=False, factory=Counter)
    _connections: set = field(init=False, factory=set)
    #: Pending sockets, oldest first (a dict keeps insertion order).
    _pending: dict = field(init=False, factory=dict)
    _pending_by_ip: dict = field(init=False, factory=dict)
    _sessions: dict = field(init=False, factory=dict)
    _shutting_down: bool = field(init=False, default=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if not neutralise_autobahn_log_formatting():
            self._log.warn("autobahn's log helpers moved: per-frame log formatting is not neutralised")
        if not USES_NVX:
            self._log.info("autobahn runs without its native accelerators (NVX)")
        if self._playback is None:
            self._playback = PlaybackScheduler(self._reactor)
        factory = _MediaStreamFactory(self, self._reactor)
        self.resource = _StreamResource(self, WebSocketResource(factory))

    @property
    def active_count(self) -> int:
        """Streams with an accepted start."""
        return len(self._sessions)

    @property
    def pending_count(self) -> int:
        """Upgraded sockets still waiting for a valid start."""
        return len(self._pending)

    @property
    def sessions(self) -> Mapping[str, StreamSession]:
        """The active sessions by stream SID (read-only view)."""
        return MappingProxyType(self._sessions)

    def shutdown(self) -> None:
        """End every session, close every socket 1001, and refuse new upgrades with a 503."""
        self._shutting_down = True
        for connection in list(self._connections):
            self._leave_pending(connection)
            self._end_session(connection)
            connection.close_with(CLOSE_GOING_AWAY, "Server shutting down")

    # -- before the upgrade ------------------------------------------------------------------

    def _screen_upgrade(self, request) -> tuple[int, bytes] | None:
        if self._shutting_down:
            self.counts["503-shutting-down"] += 1
            return 503, SHUTTING_DOWN
        if len(self._connections) >= self._max_connections:
            self.counts["503"] += 1
            return 503, TOO_MANY_CONNECTIONS
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else ""
        if not _HOST.match(host):
            self.counts["400"] += 1
            return 400, b"Bad Request\n"
        if self._verify_upgrade is not None:
            headers: dict[str, str] = {}
            for name, values in request.requestHeaders.getAllRawHeaders():
                headers.setdefault(name.decode("latin-1").lower(), values[0].decode("latin-1"))
            url = "wss://" + host + request.uri.decode("latin-1")
            try:
                ok = bool(self._verify_upgrade(url, headers))
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

    def _connected(self, connection: MediaStreamProtocol) -> None:
        self._connections.add(connection)

    def _opened(self, connection: MediaStreamProtocol) -> None:
        if self._shutting_down:
            connection.close_with(CLOSE_GOING_AWAY, "Server shutting down")
            return
        ip = connection.client_ip
        if len(self._pending) >= self._max_pending and self._pending_by_ip.get(ip, 0) < self._max_pending_per_ip:
            self._yield_oldest_pending()
        if len(self._pending) >= self._max_pending or self._pending_by_ip.get(ip, 0) >= self._max_pending_per_ip:
            self.counts["1013-pending"] += 1
            self._log.warn("closing media stream from {ip}: {reason}", ip=ip, reason=TOO_MANY_PENDING)
            connection.refuse(CLOSE_TRY_AGAIN, TOO_MANY_PENDING)
            return
        connection.is_pending = True
        connection.pending_since = self._reactor.seconds()
        self._pending[connection] = None
        self._pending_by_ip[ip] = self._pending_by_ip.get(ip, 0) + 1
        connection.pending_timer = self._reactor.callLater(self._pre_start_timeout, self._start_timed_out, connection)

    def _yield_oldest_pending(self) -> None:
        """
        With every pending place taken, the oldest pending socket gives its place up (closed 1013)
        if it has held it for L{PENDING_YIELD_AFTER} seconds without a valid start: idle sockets
        (the upgrade signature is one constant per account) cannot keep Twilio's streams out.
        """
        oldest = next(iter(self._pending), None)
        if oldest is None or self._reactor.seconds() - oldest.pending_since < self._pending_yield_after:
            return
        self._leave_pending(oldest)
        self.counts["1013-pending-yielded"] += 1
        self._log.info("closing media stream from {ip}: no start, its place given to a newcomer", ip=oldest.client_ip)
        oldest.refuse(CLOSE_TRY_AGAIN, TOO_MANY_PENDING)

    def _start_timed_out(self, connection: MediaStreamProtocol) -> None:
        connection.pending_timer = None
        if not connection.is_pending:
            return
        self.counts["1008-start-timeout"] += 1
        self._log.info("closing media stream from {ip}: no start in time", ip=connection.client_ip)
        connection.refuse(CLOSE_POLICY, START_TIMEOUT)

    def _leave_pending(self, connection: MediaStreamProtocol) -> None:
        timer, connection.pending_timer = connection.pending_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not connection.is_pending:
            return
        connection.is_pending = False
        self._pending.pop(connection, None)
        ip = connection.client_ip
        left = self._pending_by_ip.get(ip, 1) - 1
        if left > 0:
            self._pending_by_ip[ip] = left
        else:
            self._pending_by_ip.pop(ip, None)

    def _end_session(self, connection: MediaStreamProtocol) -> None:
        session, connection.session = connection.session, None
        if session is None:
            return
        if self._sessions.get(session.stream_sid) is session:
            del self._sessions[session.stream_sid]
        session.playback.close()
        connection.call_handler("stream_stopped", session)

    def _disconnected(self, connection: MediaStreamProtocol) -> None:
        if connection._gone:
            return
        connection._gone = True
        self._connections.discard(connection)
        self._leave_pending(connection)
        self._end_session(connection)

    # -- messages ----------------------------------------------------------------------------

    def _event(self, connection: MediaStreamProtocol, event, message: dict, payload: bytes) -> None:
        if event == "start":
            self._start(connection, message)
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if connection.session is not None and isinstance(name, str) and len(name) <= _MAX_MARK_NAME:
                connection.session.playback.mark_echoed(name)
        elif event == "stop":
            if connection.session is not None:
                self._end_session(connection)
                connection.close_with(CLOSE_NORMAL, "Stream stopped")
        elif event == "dtmf":
            dtmf = message.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            if connection.session is not None and isinstance(digit, str) and digit in _DTMF:
                connection.call_handler("dtmf_received", connection.session, digit)
        elif event == "connected":
            pass
        else:
            connection.bad_frame("unknown event", payload)

    def _start(self, connection: MediaStreamProtocol, message: dict) -> None:
        if not connection.is_pending:
            return  # a second start, or one after the socket stopped being pending
        start = message.get("start")
        start = start if isinstance(start, dict) else {}
        call_sid = start.get("callSid")
        if not isinstance(call_sid, str) or not _SID.match(call_sid):
            self._refuse_start(connection, MISSING_CALL_SID)
            return
        stream_sid = message.get("streamSid") or start.get("streamSid")
        if not isinstance(stream_sid, str) or not _SID.match(stream_sid):
            self._refuse_start(connection, MISSING_STREAM_SID)
            return
        raw = start.get("customParameters")
        parameters = {
            k: v
            for k, v in list(raw.items())[:_MAX_PARAMETERS]
            if isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= _MAX_TOKEN
        } if isinstance(raw, dict) else {}
        token = parameters.pop("token", connection.query_token)  # one-time: the session does not keep it
        if stream_sid in self._sessions or connection.state != _OPEN:
            self._refuse_start(connection, DUPLICATE_STREAM)  # before the token is checked (and used up)
            return
        try:
            accepted = bool(self._handler.accept_start(call_sid, token))
        except Exception:
            self._log.failure("media stream accept_start failed")
            accepted = False
        if not accepted:
            self._log.warn("Rejecting media stream for {call_sid}: unknown call or invalid token", call_sid=call_sid)
            self._refuse_start(connection, UNKNOWN_CALL)
            return
        self._leave_pending(connection)
        session = StreamSession(
            call_sid=call_sid,
            stream_sid=stream_sid,
            client_ip=connection.client_ip,
            connection=connection,
            custom_parameters=parameters,
        )
        session.playback = Playback(self._playback, session, synthesis_timeout=self._synthesis_timeout)
        connection.session = session
        self._sessions[stream_sid] = session
        self._log.info("media stream {stream_sid} started for {call_sid}", stream_sid=stream_sid, call_sid=call_sid)
        connection.call_handler("stream_started", session)

    def _refuse_start(self, connection: MediaStreamProtocol, reason: str) -> None:
        self.counts["1008-" + reason] += 1
        connection.refuse(CLOSE_POLICY, reason)
