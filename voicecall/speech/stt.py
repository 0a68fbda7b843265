# -*- test-case-name: tests.test_stt -*-
"""
Streaming speech-to-text: the OpenAI Realtime transcription client (SPEC §11).

One L{RealtimeTranscriber} serves one media stream. It opens a WebSocket to
C{<url>?intent=transcription} with C{Authorization: Bearer <key>} and C{OpenAI-Beta: realtime=v1},
configures the session with one C{transcription_session.update} (G.711 mu-law in, server VAD),
forwards the Twilio media frames as C{input_audio_buffer.append}s, and turns the server's
events into three callbacks. Frames are sent C{batch_ms} at a time (100 ms: five frames per
append), which cuts the messages, and the CPU they cost, five-fold for a delay the server's
end-of-speech silence (800 ms by default) dwarfs; Twilio sends a frame every 20 ms, silence
included, so a batch always fills. The callbacks:

  - C{on_speech_start()}: once per caller utterance (barge-in), normalised as SPEC §11 [H]
    asks: a native C{speech_started}, a partial or a lone final each open an utterance only if
    none is open, and a final (or an empty completion) closes it;
  - C{on_partial(text)}: the text accumulated so far in the utterance;
  - C{on_final(text)}: the completed, non-empty transcript.

The callbacks get the text exactly as the server sent it; only what this module logs is
shortened (200 characters) and stripped of control characters. The API key is never logged.

Connecting is bounded by 10 s (C{Realtime STT connection timeout}). After the connection drops
unexpectedly (or a connection attempt fails for a reason other than a rejected key) the client
tries again up to 5 times, waiting 1 s, 2 s, 4 s, 8 s and 16 s on the injected reactor's clock;
a successful open resets the count, and a closed transcriber never reconnects. Audio is never
queued: frames are dropped while no session is open and while the transport asks its producer
to pause, so one transcriber holds at most what the transport buffers.

The wire (the autobahn client protocol and factory, and the appends framed and written without
autobahn's send path) is L{voicecall.speech.realtime_wire}'s; this module is the policy.
"""
from __future__ import annotations

import json
import unicodedata
from binascii import b2a_base64
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from attrs import define, field
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from voicecall.speech.realtime_wire import RealtimeClientFactory, RealtimeConnection

__all__ = [
    "CONNECT_TIMEOUT_MESSAGE",
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "RealtimeSTTError",
    "RealtimeSTTRejected",
    "RealtimeTranscriber",
]

DEFAULT_URL = "wss://api.openai.com/v1/realtime"
DEFAULT_MODEL = "gpt-4o-transcribe"
DEFAULT_VAD_THRESHOLD = 0.5
DEFAULT_SILENCE_DURATION_MS = 800
PREFIX_PADDING_MS = 300

CONNECT_TIMEOUT_MESSAGE = "Realtime STT connection timeout"
CLOSED_MESSAGE = "Realtime STT session is closed"

#: Largest message accepted from the server; its events are small JSON objects.
MAX_MESSAGE_BYTES = 1024 * 1024
#: Cap on the partial text held for one utterance (about ten minutes of speech).
MAX_PENDING_CHARS = 8192
#: Log excerpts of transcripts and server text are at most this long.
LOG_EXCERPT_CHARS = 200

_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'
_APPEND_TAIL = b'"}'
_AUTH_STATUSES = frozenset({401, 403})
_QUIET_EVENTS = frozenset(
    {
        "transcription_session.created",
        "transcription_session.updated",
        "session.created",
        "session.updated",
        "input_audio_buffer.committed",
        "input_audio_buffer.speech_stopped",
    }
)


class RealtimeSTTError(Exception):
    """The realtime transcription session could not be opened (or was closed)."""


class RealtimeSTTRejected(RealtimeSTTError):
    """
    The server answered the WebSocket upgrade with an HTTP error; C{status} is its code.
    401 and 403 mean the API key (or the account's access) was refused, and are not retried.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _excerpt(text: object, limit: int = LOG_EXCERPT_CHARS) -> str:
    """A log-safe excerpt: control and format characters removed, length capped."""
    clean = "".join(
        ch
        for ch in str(text)
        if not (unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029")
    )
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _with_intent(url: str) -> str:
    """C{url} with C{intent=transcription} in its query, unless it already names an intent."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key == "intent" for key, _ in query):
        query.append(("intent", "transcription"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _default_threshold(value: float | None) -> float:
    return DEFAULT_VAD_THRESHOLD if value is None else float(value)


def _default_silence(value: int | None) -> int:
    return DEFAULT_SILENCE_DURATION_MS if value is None else int(value)


@define(repr=False)
class RealtimeTranscriber:
    """
    An OpenAI Realtime transcription session for one call's inbound audio.

    @ivar on_partial: called with the utterance's text so far, after each delta.
    @ivar on_final: called with each completed, non-empty transcript.
    @ivar on_speech_start: called once when the caller starts an utterance.
    """

    _log = Logger()

    _reactor: Any
    _api_key: str = field(repr=False)
    _url: str = DEFAULT_URL
    _model: str = DEFAULT_MODEL
    _vad_threshold: float = field(default=DEFAULT_VAD_THRESHOLD, converter=_default_threshold)
    _silence_duration_ms: int = field(
        default=DEFAULT_SILENCE_DURATION_MS, converter=_default_silence
    )
    on_partial: Callable[[str], None] | None = None
    on_final: Callable[[str], None] | None = None
    on_speech_start: Callable[[], None] | None = None
    # Seams for tests and operators; the defaults are SPEC §11's.
    _connect_timeout: float = 10.0
    _reconnect_delay: float = 1.0
    _max_reconnect_attempts: int = 5
    #: Audio per append message, in milliseconds of 8 kHz mu-law (one frame: 20).
    _batch_ms: int = 100

    _factory: RealtimeClientFactory = field(init=False, repr=False)
    _endpoint: Any = field(init=False, repr=False)
    _closed: bool = field(default=False, init=False)
    # The open session, if any.
    _proto: RealtimeConnection | None = field(default=None, init=False, repr=False)
    # The connection whose TCP link exists (open or still handshaking).
    _live: RealtimeConnection | None = field(default=None, init=False, repr=False)
    # The connection attempt in flight and the connect() callers waiting on it.
    _attempt: Deferred[Any] | None = field(default=None, init=False, repr=False)
    _waiters: list[Deferred[None]] = field(factory=list, init=False, repr=False)
    _reconnects: int = field(default=0, init=False)
    _reconnect_call: IDelayedCall | None = field(default=None, init=False, repr=False)
    _lost_waiters: list[Deferred[None]] = field(factory=list, init=False, repr=False)
    # Caller-turn state.
    _pending: str = field(default="", init=False, repr=False)
    _utterance_open: bool = field(default=False, init=False)
    _dropped_frames: int = field(default=0, init=False)
    # Audio waiting to fill the next append (mutated in place: no attrs setattr hooks per frame).
    _batch: bytearray = field(factory=bytearray, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        url = _with_intent(self._url)
        headers = {"Authorization": f"Bearer {self._api_key}", "OpenAI-Beta": "realtime=v1"}
        self._factory = RealtimeClientFactory(self, url, headers, self._reactor, MAX_MESSAGE_BYTES)
        self._endpoint = self._make_endpoint()

    def _make_endpoint(self) -> Any:
        host, port = self._factory.host, self._factory.port
        if isIPAddress(host):
            endpoint: Any = TCP4ClientEndpoint(self._reactor, host, port)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port)
        if self._factory.isSecure:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    # -- public API ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a session is open and audio is being forwarded."""
        return self._proto is not None

    def connect(self) -> Deferred[None]:
        """
        Open the session. Fires when the session is configured, or fails with
        L{RealtimeSTTError} (C{Realtime STT connection timeout} after 10 s;
        L{RealtimeSTTRejected} when the upgrade is refused, e.g. a bad API key).
        """
        if self._closed:
            return fail(RealtimeSTTError(CLOSED_MESSAGE))
        if self._proto is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if self._attempt is None:
            if self._reconnect_call is not None:
                self._reconnect_call.cancel()
                self._reconnect_call = None
            self._start_attempt()
        return waiter

    def send_audio(self, ulaw: bytes) -> None:
        """Forward one frame of 8 kHz mu-law (in the next batch); dropped while no session is open."""
        proto = self._proto
        if proto is None or proto.paused or not ulaw:
            self._dropped_frames += 1
            del self._batch[:]
            return
        batch = self._batch
        batch += ulaw
        if len(batch) * 1000 >= self._batch_ms * 8000:
            audio = b2a_base64(batch, newline=False)
            del batch[:]
            if not proto.send_text(_APPEND_HEAD + audio + _APPEND_TAIL):
                self._dropped_frames += 1  # the connection is closing: its close is on its way

    def close(self) -> Deferred[None]:
        """
        Close the session for good: no reconnection follows. Fires once the connection
        (if any) is gone.
        """
        self._closed = True
        if self._reconnect_call is not None:
            self._reconnect_call.cancel()
            self._reconnect_call = None
        self._reset_turn()
        live = self._live
        proto, self._proto = self._proto, None
        if self._attempt is not None:
            self._attempt.cancel()
        if live is None:
            return succeed(None)
        lost: Deferred[None] = Deferred()
        self._lost_waiters.append(lost)
        if proto is not None:
            if self._batch and not proto.paused:
                # The caller's last words (under one batch) go out before the close.
                proto.send_text(_APPEND_HEAD + b2a_base64(self._batch, newline=False) + _APPEND_TAIL)
            del self._batch[:]
            proto.sendClose(1000)
        return lost

    # -- connection attempts -------------------------------------------------------------------

    def session_update(self) -> bytes:
        """The session's configuration (L{TranscriberEnd}): the first message of every connection."""
        return json.dumps(
            {
                "type": "transcription_session.update",
                "session": {
                    "input_audio_format": "g711_ulaw",
                    "input_audio_transcription": {"model": self._model},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": self._vad_threshold,
                        "prefix_padding_ms": PREFIX_PADDING_MS,
                        "silence_duration_ms": self._silence_duration_ms,
                    },
                },
            }
        ).encode("utf-8")

    def _start_attempt(self) -> None:
        attempt = self._endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallback(self._tcp_connected)
        attempt.addTimeout(
            self._connect_timeout,
            self._reactor,
            onTimeoutCancel=lambda result, timeout: Failure(
                RealtimeSTTError(CONNECT_TIMEOUT_MESSAGE)
            ),
        )
        attempt.addCallbacks(self._attempt_opened, self._attempt_failed)
        attempt.addErrback(
            lambda f: self._log.failure("Realtime STT: connection bookkeeping failed", f)
        )

    def _tcp_connected(self, proto: RealtimeConnection) -> Deferred[RealtimeConnection]:
        self._live = proto
        return proto.opened

    def _attempt_opened(self, proto: RealtimeConnection) -> None:
        self._attempt = None
        self._proto = proto
        self._reconnects = 0
        self._log.info("Realtime STT session open")
        self._fire_waiters(None)

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._closed:
            self._fire_waiters(Failure(RealtimeSTTError(CLOSED_MESSAGE)))
            return
        if failure.check(RealtimeSTTError):
            error = failure.value
        else:
            error = RealtimeSTTError(
                f"Realtime STT connection failed: {_excerpt(failure.getErrorMessage())}"
            )
        self._log.warn("Realtime STT connection attempt failed: {error}", error=str(error))
        self._fire_waiters(Failure(error))
        if isinstance(error, RealtimeSTTRejected) and error.status in _AUTH_STATUSES:
            return
        self._schedule_reconnect()

    def _fire_waiters(self, result: None | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _schedule_reconnect(self) -> None:
        if self._closed or self._reconnect_call is not None or self._attempt is not None:
            return
        if self._reconnects >= self._max_reconnect_attempts:
            self._log.error(
                "Realtime STT: giving up after {attempts} reconnect attempts",
                attempts=self._reconnects,
            )
            return
        self._reconnects += 1
        delay = self._reconnect_delay * 2 ** (self._reconnects - 1)
        self._log.info(
            "Realtime STT: reconnecting in {delay}s (attempt {attempt}/{limit})",
            delay=delay,
            attempt=self._reconnects,
            limit=self._max_reconnect_attempts,
        )
        self._reconnect_call = self._reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        if not self._closed and self._proto is None and self._attempt is None:
            self._start_attempt()

    def connection_closed(
        self, proto: RealtimeConnection, was_clean: bool, code: int | None, reason: str | None
    ) -> None:
        if not proto.opened.called:
            proto.opened.errback(self._handshake_error(proto))
        if proto is self._live:
            self._live = None
            waiters, self._lost_waiters = self._lost_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if proto is not self._proto:
            return
        self._proto = None
        self._reset_turn()
        self._log.warn(
            "Realtime STT connection closed unexpectedly (code {code}): {reason}",
            code=code,
            reason=_excerpt(reason or ""),
        )
        self._schedule_reconnect()

    def _handshake_error(self, proto: RealtimeConnection) -> RealtimeSTTError:
        refusal = proto.upgrade_refusal()
        if refusal is not None:
            status, text = refusal[0], _excerpt(refusal[1], 80)
            if status in _AUTH_STATUSES:
                message = (
                    f"Realtime STT authentication failed: HTTP {status} {text}".rstrip()
                    + " (check the OpenAI API key)"
                )
            else:
                message = f"Realtime STT handshake rejected: HTTP {status} {text}".rstrip()
            return RealtimeSTTRejected(message, status)
        reason = proto.drop_reason
        detail = f": {_excerpt(reason)}" if reason else ""
        return RealtimeSTTError(f"Realtime STT connection closed before the session opened{detail}")

    # -- server events -------------------------------------------------------------------------

    def event_received(self, proto: RealtimeConnection, payload: bytes) -> None:
        if proto is not self._proto:
            return
        try:
            event = json.loads(payload)
            kind = event["type"]
        except (ValueError, TypeError, KeyError, RecursionError):
            self._log.warn("Realtime STT: ignoring a malformed server event")
            return
        if kind == "conversation.item.input_audio_transcription.delta":
            self._on_delta(event.get("delta"))
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._on_completed(event.get("transcript"))
        elif kind == "input_audio_buffer.speech_started":
            self._pending = ""
            self._open_utterance()
        elif kind == "error":
            error = event.get("error")
            if not isinstance(error, dict):
                error = {}
            self._log.error(
                "Realtime STT server error {code}: {detail}",
                code=_excerpt(error.get("code") or error.get("type") or "", 80),
                detail=_excerpt(error.get("message") or ""),
            )
        elif kind in _QUIET_EVENTS:
            self._log.debug("Realtime STT event {kind}", kind=kind)
        else:
            self._log.debug("Realtime STT event {kind}", kind=_excerpt(kind, 80))

    def _on_delta(self, delta: object) -> None:
        if not isinstance(delta, str) or not delta:
            return
        if len(self._pending) < MAX_PENDING_CHARS:
            self._pending = (self._pending + delta)[:MAX_PENDING_CHARS]
        if self._pending.strip():
            self._open_utterance()
        self._emit(self.on_partial, self._pending)

    def _on_completed(self, transcript: object) -> None:
        self._pending = ""
        if isinstance(transcript, str) and transcript.strip():
            self._open_utterance()
            self._utterance_open = False
            self._log.debug("Realtime STT final transcript: {text}", text=_excerpt(transcript))
            self._emit(self.on_final, transcript)
        else:
            self._utterance_open = False

    def _open_utterance(self) -> None:
        if not self._utterance_open:
            self._utterance_open = True
            self._emit(self.on_speech_start)

    def _reset_turn(self) -> None:
        self._pending = ""
        self._utterance_open = False

    def _emit(self, callback: Callable[..., None] | None, *args: str) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            self._log.failure("Realtime STT: a transcript callback failed")
