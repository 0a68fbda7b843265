# -*- test-case-name: tests.test_stt -*-
"""
A fake OpenAI Realtime transcription server on loopback, for tests, benchmarks and demos.

L{FakeRealtimeServer} speaks the part of the Realtime API that a transcription client uses
(C{GET /v1/realtime?intent=transcription}, SPEC §11):

  - the upgrade must carry C{Authorization: Bearer <key>} (else HTTP 401), C{OpenAI-Beta:
    realtime=v1} and the C{intent=transcription} query (else HTTP 403);
  - on open it sends C{transcription_session.created}; the first message must be a
    C{transcription_session.update} (recorded in L{FakeRealtimeServer.sessions}), answered with
    C{transcription_session.updated}; anything else first gets an C{error} event;
  - C{input_audio_buffer.append} audio is base64-decoded and run through a tiny energy VAD over
    the mu-law samples. When a frame's mean amplitude rises above C{energy_threshold} it sends
    C{input_audio_buffer.speech_started}; while speech continues, one
    C{conversation.item.input_audio_transcription.delta} per C{delta_interval_ms} of audio, each
    the next word of the utterance's scripted transcript; after the session's
    C{silence_duration_ms} of silent audio, C{input_audio_buffer.speech_stopped},
    C{input_audio_buffer.committed}, the words not yet sent as deltas, and
    C{conversation.item.input_audio_transcription.completed} with the whole transcript.

Time is audio time (8,000 mu-law bytes a second), not wall-clock time, so runs are repeatable.
The script is a list of transcripts, one per utterance (an empty one when it runs out), or a
callable from the utterance's index to its transcript.

Failure injection: L{FakeRealtimeServer.refuse_next} answers the next upgrades with an HTTP
error; L{FakeRealtimeServer.close_next} closes the next connections after they have received a
number of messages; L{FakeRealtimeServer.drop_all} closes every open connection now;
L{FakeRealtimeServer.send} pushes any event to the open connections. Everything received is
recorded (bounded by C{record_limit}).

This module imports nothing from voicecall: it is an independent counterpart of the client.
"""
from __future__ import annotations

import binascii
import hmac
import json
from base64 import b64decode
from collections import deque
from typing import Any, Callable, Sequence

import txaio
from attrs import define, field, frozen
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

__all__ = ["FakeRealtimeServer", "Handshake", "Received", "ulaw_magnitude"]


def _build_magnitudes() -> bytes:
    """Per mu-law byte, the decoded sample's magnitude divided by 128 (0..250)."""
    table = bytearray(256)
    for byte in range(256):
        inverted = ~byte & 0xFF
        exponent = (inverted >> 4) & 0x07
        mantissa = inverted & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        table[byte] = magnitude >> 7
    return bytes(table)


_MAGNITUDES = _build_magnitudes()


def ulaw_magnitude(ulaw: bytes) -> float:
    """The mean absolute amplitude (16-bit scale, to within 128) of some mu-law audio."""
    if not ulaw:
        return 0.0
    return sum(ulaw.translate(_MAGNITUDES)) * 128.0 / len(ulaw)


@frozen
class Handshake:
    """One WebSocket upgrade the fake saw, and how it answered (101 when accepted)."""

    path: str
    params: dict[str, list[str]]
    authorized: bool
    beta: str | None
    status: int


@frozen
class Received:
    """One message a connection received: the connection's index and the decoded JSON."""

    connection: int
    message: Any


@define
class _Connection:
    """The per-connection state: the session and the VAD."""

    index: int
    protocol: _FakeRealtimeProtocol
    session: dict[str, Any] | None = None
    messages: int = 0
    close_after: int | None = None
    close_code: int | None = None
    speaking: bool = False
    silence_ms: float = 0.0
    since_delta_ms: float = 0.0
    audio_ms: float = 0.0
    item_id: str = ""
    transcript: str = ""
    pieces: list[str] = field(factory=list)


class _FakeRealtimeProtocol(WebSocketServerProtocol):
    # autobahn's own logger, pinned at info: its debug dump of the upgrade request would
    # show the client's Authorization header.
    log = txaio.make_logger(level="info")
    _log = Logger()
    _fake: FakeRealtimeServer
    _conn: _Connection | None = None

    def onConnect(self, request: Any) -> None:
        return self._fake._handshake(request)

    def onOpen(self) -> None:
        try:
            self._conn = self._fake._opened(self)
        except Exception:
            self._log.failure("fake realtime: onOpen failed")
            self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if self._conn is not None:
                self._fake._message(self._conn, payload, isBinary)
        except Exception:
            self._log.failure("fake realtime: onMessage failed")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self._fake._closed(self, code)
        except Exception:
            self._log.failure("fake realtime: onClose failed")

    def send_event(self, event: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(event).encode("utf-8"), False)


class _Factory(WebSocketServerFactory):
    protocol = _FakeRealtimeProtocol
    noisy = False

    def __init__(self, fake: FakeRealtimeServer, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self._fake = fake
        # No autobahn timers left behind in tests: handshakes are never left half done here.
        self.setProtocolOptions(openHandshakeTimeout=0)

    def buildProtocol(self, addr: Any) -> _FakeRealtimeProtocol:
        proto: _FakeRealtimeProtocol = super().buildProtocol(addr)
        proto._fake = self._fake
        self._fake._lost.setdefault(proto, [])
        return proto


@define
class FakeRealtimeServer:
    """
    A scripted OpenAI Realtime transcription endpoint. C{listen()} puts it on 127.0.0.1;
    C{factory} serves it on any transport (e.g. C{iosim}).
    """

    _reactor: Any
    _api_key: str = field(repr=False)
    script: Sequence[str] | Callable[[int], str] = ()
    #: Mean absolute amplitude (16-bit scale) above which a frame counts as speech.
    energy_threshold: float = 500.0
    #: Audio time between two transcription deltas while speech continues.
    delta_interval_ms: float = 200.0
    #: How many received messages (and handshakes) are kept for assertions.
    record_limit: int = 100_000

    received: deque[Received] = field(init=False)
    handshakes: deque[Handshake] = field(init=False)
    sessions: list[dict[str, Any]] = field(factory=list, init=False)
    protocol_errors: list[str] = field(factory=list, init=False)
    #: Close codes of finished connections, in order (None: the TCP link just went away).
    close_codes: list[int | None] = field(factory=list, init=False)
    factory: _Factory = field(init=False)
    port: Any = field(default=None, init=False)
    _connections: dict[_FakeRealtimeProtocol, _Connection] = field(factory=dict, init=False)
    _lost: dict[_FakeRealtimeProtocol, list[Deferred[None]]] = field(factory=dict, init=False)
    _count: int = field(default=0, init=False)
    _utterances: int = field(default=0, init=False)
    _events: int = field(default=0, init=False)
    _items: int = field(default=0, init=False)
    _refuse: int = field(default=0, init=False)
    _refuse_status: int = field(default=503, init=False)
    _close_plans: deque[tuple[int, int | None]] = field(factory=deque, init=False)

    def __attrs_post_init__(self) -> None:
        self.received = deque(maxlen=self.record_limit)
        self.handshakes = deque(maxlen=self.record_limit)
        self.factory = _Factory(self, self._reactor)

    # -- control -------------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Listen on C{interface}:C{port} (0: any free port); return the port number."""
        self.port = self._reactor.listenTCP(port, self.factory, interface=interface)
        return self.port.getHost().port

    @property
    def url(self) -> str:
        """The base URL to give a client (without the intent query)."""
        return f"ws://127.0.0.1:{self.port.getHost().port}/v1/realtime"

    def stop(self) -> Deferred[Any]:
        """Stop listening and close every connection; fires once all are gone."""
        waits: list[Deferred[Any]] = []
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        for proto in list(self._lost):
            waits.append(self._when_lost(proto))
            proto.dropConnection(abort=True)
        return DeferredList(waits, consumeErrors=True)

    def refuse_next(self, count: int, status: int = 503) -> None:
        """Answer the next C{count} upgrades with HTTP C{status}."""
        self._refuse = count
        self._refuse_status = status

    def close_next(
        self, after_messages: int = 1, connections: int = 1, code: int | None = None
    ) -> None:
        """
        Close each of the next C{connections} connections once it has received
        C{after_messages} messages: with a WebSocket close C{code}, or by dropping the TCP link
        when C{code} is None.
        """
        for _ in range(connections):
            self._close_plans.append((after_messages, code))

    def drop_all(self, code: int | None = None) -> None:
        """Close every open connection now (see L{close_next} for C{code})."""
        for conn in list(self._connections.values()):
            self._close(conn.protocol, code)

    def send(self, event: dict[str, Any]) -> None:
        """Send C{event} to every open connection."""
        for conn in list(self._connections.values()):
            conn.protocol.send_event(event)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def appended_audio(self) -> list[str]:
        """The base64 audio of every recorded C{input_audio_buffer.append}, in order."""
        return [
            r.message.get("audio")
            for r in self.received
            if isinstance(r.message, dict) and r.message.get("type") == "input_audio_buffer.append"
        ]

    # -- protocol callbacks --------------------------------------------------------------------

    def _handshake(self, request: Any) -> None:
        headers = request.headers
        expected = f"Bearer {self._api_key}".encode("utf-8")
        given = str(headers.get("authorization", "")).encode("utf-8")
        authorized = hmac.compare_digest(given, expected)
        beta = headers.get("openai-beta")
        intent = request.params.get("intent", [])

        status, reason = 101, ""
        if self._refuse > 0:
            self._refuse -= 1
            status, reason = self._refuse_status, "Service Unavailable"
        elif request.path != "/v1/realtime":
            status, reason = 404, "Not Found"
        elif not authorized:
            status, reason = 401, "Unauthorized"
        elif beta != "realtime=v1" or intent != ["transcription"]:
            status, reason = 403, "Forbidden"
        self.handshakes.append(
            Handshake(
                path=request.path,
                params=dict(request.params),
                authorized=authorized,
                beta=beta,
                status=status,
            )
        )
        if status != 101:
            raise ConnectionDeny(status, reason)
        return None

    def _opened(self, proto: _FakeRealtimeProtocol) -> _Connection:
        conn = _Connection(index=self._count, protocol=proto)
        self._count += 1
        if self._close_plans:
            conn.close_after, conn.close_code = self._close_plans.popleft()
        self._connections[proto] = conn
        self._emit(conn, {"type": "transcription_session.created", "session": {}})
        return conn

    def _closed(self, proto: _FakeRealtimeProtocol, code: int | None) -> None:
        if proto in self._connections:
            del self._connections[proto]
            self.close_codes.append(code)
        for waiter in self._lost.pop(proto, []):
            waiter.callback(None)

    def _when_lost(self, proto: _FakeRealtimeProtocol) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._lost.setdefault(proto, []).append(d)
        return d

    def _close(self, proto: _FakeRealtimeProtocol, code: int | None) -> None:
        if code is None:
            proto.dropConnection(abort=True)
        else:
            proto.sendClose(code, "fake realtime: closing")

    def _message(self, conn: _Connection, payload: bytes, is_binary: bool) -> None:
        conn.messages += 1
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        self.received.append(Received(conn.index, message))
        self._handle(conn, message, is_binary)
        if conn.close_after is not None and conn.messages >= conn.close_after:
            conn.close_after = None
            self._close(conn.protocol, conn.close_code)

    def _handle(self, conn: _Connection, message: Any, is_binary: bool) -> None:
        if is_binary or not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._error(conn, "invalid_json", "messages must be JSON objects with a type")
            return
        kind = message["type"]
        if kind == "transcription_session.update":
            session = message.get("session")
            if not isinstance(session, dict) or session.get("input_audio_format") != "g711_ulaw":
                self._error(conn, "invalid_value", "session.input_audio_format must be g711_ulaw")
                return
            conn.session = session
            self.sessions.append(session)
            self._emit(conn, {"type": "transcription_session.updated", "session": session})
        elif conn.session is None:
            self._error(
                conn, "session_not_configured", "send transcription_session.update first"
            )
        elif kind == "input_audio_buffer.append":
            try:
                audio = b64decode(message.get("audio", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                self._error(conn, "invalid_value", "audio must be base64")
                return
            self._vad(conn, audio)
        else:
            self._error(conn, "unknown_event", f"unsupported event type {kind[:60]}")

    def _error(self, conn: _Connection, code: str, message: str) -> None:
        self.protocol_errors.append(code)
        self._emit(
            conn,
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "code": code, "message": message},
            },
        )

    # -- the VAD and the script ----------------------------------------------------------------

    def _silence_ms(self, conn: _Connection) -> float:
        detection = (conn.session or {}).get("turn_detection") or {}
        value = detection.get("silence_duration_ms")
        return 500.0 if value is None else float(value)

    def _vad(self, conn: _Connection, audio: bytes) -> None:
        if not audio:
            return
        duration = len(audio) / 8.0
        start_ms = conn.audio_ms
        conn.audio_ms += duration
        loud = ulaw_magnitude(audio) > self.energy_threshold
        if loud:
            conn.silence_ms = 0.0
            if not conn.speaking:
                self._start_utterance(conn, start_ms)
                return
            conn.since_delta_ms += duration
            if conn.since_delta_ms >= self.delta_interval_ms and conn.pieces:
                conn.since_delta_ms = 0.0
                self._delta(conn, conn.pieces.pop(0))
        elif conn.speaking:
            conn.silence_ms += duration
            if conn.silence_ms >= self._silence_ms(conn):
                self._end_utterance(conn)

    def _next_transcript(self) -> str:
        index = self._utterances
        self._utterances += 1
        if callable(self.script):
            return str(self.script(index))
        return self.script[index] if index < len(self.script) else ""

    def _start_utterance(self, conn: _Connection, start_ms: float) -> None:
        self._items += 1
        conn.item_id = f"item_{self._items:06d}"
        conn.speaking = True
        conn.since_delta_ms = 0.0
        conn.transcript = self._next_transcript()
        first, *rest = conn.transcript.split(" ")
        conn.pieces = [first, *(" " + word for word in rest)] if conn.transcript else []
        self._emit(
            conn,
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": int(start_ms),
                "item_id": conn.item_id,
            },
        )

    def _delta(self, conn: _Connection, piece: str) -> None:
        self._emit(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": conn.item_id,
                "content_index": 0,
                "delta": piece,
            },
        )

    def _end_utterance(self, conn: _Connection) -> None:
        conn.speaking = False
        item = conn.item_id
        self._emit(
            conn,
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": int(conn.audio_ms),
                "item_id": item,
            },
        )
        self._emit(
            conn,
            {"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": item},
        )
        while conn.pieces:
            self._delta(conn, conn.pieces.pop(0))
        self._emit(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item,
                "content_index": 0,
                "transcript": conn.transcript,
            },
        )

    def _emit(self, conn: _Connection, event: dict[str, Any]) -> None:
        self._events += 1
        conn.protocol.send_event({"event_id": f"event_{self._events:06d}", **event})
