# -*- test-case-name: tests.test_media_stream -*-
"""
The Twilio Media Streams server's call policy (SPEC §10.1-10.3, PROVIDERS §1.4): one
L{StreamSession} per accepted stream, over the sockets of L{voicecall.media.sockets} (the wire:
caps, pre-start timeout, framing, backpressure).

A C{start} with a call SID that the handler accepts (with the stream's one-time token, which the
session does not keep) makes a pending socket *active*; a start without a valid call or stream
SID, for an unknown call or a bad token, or repeating an active stream SID, is refused 1008 (the
socket is sent its close frame and dropped at once). A session is registered under its stream
SID and the L{StreamHandler} hears about its media, DTMF digits and end; C{mark} echoes go to the
session's playback; C{stop} ends the session and closes the socket 1000.
"""
from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Callable, Mapping, Protocol

from attrs import define, field
from autobahn.websocket import USES_NVX
from twisted.logger import Logger
from twisted.web.resource import Resource

from voicecall.infra.private.ws import neutralise_autobahn_log_formatting
from voicecall.media.playback import SYNTHESIS_TIMEOUT, Playback, PlaybackScheduler, StreamSink
from voicecall.media.sockets import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    MAX_TOKEN,
    Admission,
    MediaSocket,
    MediaSockets,
)

__all__ = ["MediaStreamServer", "StreamHandler", "StreamSession"]

MISSING_CALL_SID = "Missing callSid"
MISSING_STREAM_SID = "Missing streamSid"
UNKNOWN_CALL = "Unknown call"
DUPLICATE_STREAM = "Duplicate streamSid"

_SID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_DTMF = frozenset("0123456789*#ABCD")
_MAX_MARK_NAME = 256
_MAX_PARAMETERS = 32
_MAX_LOGGED_HANDLER_ERRORS = 3


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
    _connection: MediaSocket = field(repr=False)
    #: Builds the session's playback, which sends through the session (its L{StreamSink}).
    _make_playback: Callable[[StreamSink], Playback] = field(repr=False)
    custom_parameters: Mapping[str, str] = field(factory=dict, repr=False)
    playback: Playback = field(init=False, repr=False)
    _media_prefix: bytes = field(init=False, repr=False)
    _clear: bytes = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        sid = json.dumps(self.stream_sid)
        self._media_prefix = ('{"event":"media","streamSid":%s,"media":{"payload":"' % sid).encode()
        self._clear = ('{"event":"clear","streamSid":%s}' % sid).encode()
        self.playback = self._make_playback(self)

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on the stream."""
        return self._connection.live

    def send_media(self, frame: bytes) -> bool:
        """Send 8 kHz mu-law audio (one 160-byte frame); False if it could not be sent."""
        return self._connection.send_media(self._media_prefix, frame)

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


@define(repr=False)
class MediaStreamServer:
    """
    The media-stream WebSocket server: mount L{resource} at the stream path of the webhook
    Site. Turns accepted streams into L{StreamSession}s reported to the L{StreamHandler}; the
    sockets' caps, timeouts and upgrade checks are its L{Admission}, which L{MediaSockets} applies.
    """

    _reactor: object
    _handler: StreamHandler
    _admission: Admission = field(factory=Admission)
    _playback: PlaybackScheduler | None = None
    _synthesis_timeout: float = SYNTHESIS_TIMEOUT
    _sockets: MediaSockets = field(init=False)
    _sessions: dict = field(init=False, factory=dict)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if not neutralise_autobahn_log_formatting():
            self._log.warn("autobahn's log helpers moved: per-frame log formatting is not neutralised")
        if not USES_NVX:
            self._log.info("autobahn runs without its native accelerators (NVX)")
        if self._playback is None:
            self._playback = PlaybackScheduler(self._reactor)
        self._sockets = MediaSockets(self._reactor, self, self._admission)

    @property
    def resource(self) -> Resource:
        """The stream path's resource, to mount on the webhook Site."""
        return self._sockets.resource

    @property
    def counts(self) -> Mapping[str, int]:
        """Refusals and closes by label, for metrics."""
        return self._sockets.counts

    @property
    def active_count(self) -> int:
        """Streams with an accepted start."""
        return len(self._sessions)

    @property
    def pending_count(self) -> int:
        """Upgraded sockets still waiting for a valid start."""
        return self._sockets.pending_count

    @property
    def sessions(self) -> Mapping[str, StreamSession]:
        """The active sessions by stream SID (read-only view)."""
        return MappingProxyType(self._sessions)

    def shutdown(self) -> None:
        """End every session, close every socket 1001, and refuse new upgrades with a 503."""
        self._sockets.shutdown()

    # -- StreamCalls (what the sockets hand over) ----------------------------------------------

    def media(self, connection: MediaSocket, ulaw: bytes) -> None:
        self._call_handler(connection, "media_received", connection.session, ulaw)

    def ended(self, connection: MediaSocket) -> None:
        session = connection.deactivate()
        if session is None:
            return
        if self._sessions.get(session.stream_sid) is session:
            del self._sessions[session.stream_sid]
        session.playback.close()
        self._call_handler(connection, "stream_stopped", session)

    def event(self, connection: MediaSocket, event, message: dict, payload: bytes) -> None:
        if event == "start":
            self._start(connection, message)
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if connection.session is not None and isinstance(name, str) and len(name) <= _MAX_MARK_NAME:
                connection.session.playback.mark_echoed(name)
        elif event == "stop":
            if connection.session is not None:
                self.ended(connection)
                connection.close_with(CLOSE_NORMAL, "Stream stopped")
        elif event == "dtmf":
            dtmf = message.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            if connection.session is not None and isinstance(digit, str) and digit in _DTMF:
                self._call_handler(connection, "dtmf_received", connection.session, digit)
        elif event == "connected":
            pass
        else:
            connection.bad_frame("unknown event", payload)

    # -- the policy ----------------------------------------------------------------------------

    def _call_handler(self, connection: MediaSocket, name: str, *args) -> None:
        """Call the stream handler; its failures are logged (a few per socket) and contained."""
        try:
            getattr(self._handler, name)(*args)
        except Exception:
            if connection.count_handler_error() <= _MAX_LOGGED_HANDLER_ERRORS:
                self._log.failure("media stream handler {name} failed", name=name)

    def _start(self, connection: MediaSocket, message: dict) -> None:
        if not self._sockets.is_pending(connection):
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
            if isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= MAX_TOKEN
        } if isinstance(raw, dict) else {}
        token = parameters.pop("token", connection.query_token)  # one-time: the session does not keep it
        if stream_sid in self._sessions or not connection.live:
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
        self._sockets.leave_pending(connection)
        session = StreamSession(
            call_sid=call_sid,
            stream_sid=stream_sid,
            client_ip=connection.client_ip,
            connection=connection,
            make_playback=self._playback_for,
            custom_parameters=parameters,
        )
        connection.activate(session)
        self._sessions[stream_sid] = session
        self._log.info("media stream {stream_sid} started for {call_sid}", stream_sid=stream_sid, call_sid=call_sid)
        self._call_handler(connection, "stream_started", session)

    def _playback_for(self, sink: StreamSink) -> Playback:
        return Playback(self._playback, sink, synthesis_timeout=self._synthesis_timeout)

    def _refuse_start(self, connection: MediaSocket, reason: str) -> None:
        self._sockets.counts["1008-" + reason] += 1
        connection.refuse(CLOSE_POLICY, reason)
