# -*- test-case-name: tests.test_media_stream -*-
"""
Twilio's side of a bidirectional Media Stream (PROVIDERS §1.4), for tests and benchmarks.

L{TwilioMediaClient} is a real autobahn WebSocket client. It connects to the stream URL with the
headers it is given (an C{X-Twilio-Signature} computed by the caller, for instance), sends
C{connected} and C{start} (stream and call SIDs, custom parameters with the token, the media
format), then a C{media} frame every 20 ms from its audio source (mu-law silence unless given
audio). Like Twilio it plays what the server sends at real time: a C{mark} is echoed once the
audio queued before it has played, or at once when a C{clear} drops that audio. It records
what it receives with arrival times, for pacing measurements.

Many clients can share one L{MediaTicker}, which sends every client's frame on one 20 ms tick.
This module imports nothing of the daemon but its WebSocket fast paths (L{voicecall.infra.private.ws}).
"""
from __future__ import annotations

import json
import os
import random
from base64 import b64encode
from binascii import a2b_base64
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from voicecall.infra.private.ws import Wire

__all__ = ["MediaTicker", "Received", "TwilioMediaClient", "UpgradeRefused"]

_log = Logger()

FRAME_BYTES = 160
FRAME_SECONDS = 0.02
SILENCE = b"\xff" * FRAME_BYTES


class UpgradeRefused(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@frozen
class Received:
    """One message from the server: when it arrived, its event, and its mark name if any."""

    at: float
    event: str
    name: str | None = None


class MediaTicker:
    """
    A drift-corrected 20 ms tick that sends the next media frame of every client on it.

    With C{phases > 1} the clients are spread round-robin over that many evenly spaced
    points of the period, as calls that started at different moments are (one burst of
    every stream at once is not what a server sees from Twilio).
    """

    def __init__(self, clock, interval: float = FRAME_SECONDS, phases: int = 1) -> None:
        self.clock = clock
        self.interval = interval
        self._phases: list[dict[TwilioMediaClient, None]] = [{} for _ in range(max(1, phases))]
        self._where: dict[TwilioMediaClient, int] = {}
        self._next_phase = 0
        self._call: IDelayedCall | None = None
        self._deadline = 0.0
        self._phase = 0

    def add(self, client: TwilioMediaClient) -> None:
        if client in self._where:
            return
        phase = self._next_phase
        self._next_phase = (phase + 1) % len(self._phases)
        self._phases[phase][client] = None
        self._where[client] = phase
        if self._call is None:
            self._deadline = self.clock.seconds()
            self._phase = 0
            self._call = self.clock.callLater(0, self._tick)

    def remove(self, client: TwilioMediaClient) -> None:
        phase = self._where.pop(client, None)
        if phase is not None:
            self._phases[phase].pop(client, None)
        if not self._where and self._call is not None:
            # A client may leave from inside our own tick, whose call has already fired.
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _tick(self) -> None:
        # Like Twilio, a late tick catches up: every phase whose time has come sends its
        # frame (late frames are late, not lost).
        step = self.interval / len(self._phases)
        current, now = self._call, self.clock.seconds()
        while self._deadline <= now and self._where:
            for client in tuple(self._phases[self._phase]):
                try:
                    client._send_next_frame()
                except Exception:
                    _log.failure("media ticker: sending a frame failed")
            self._deadline += step
            self._phase = (self._phase + 1) % len(self._phases)
        if self._call is not current:
            return  # every client left during this tick (and some may have started a new one)
        if self._where:
            self._call = self.clock.callLater(max(0.0, self._deadline - self.clock.seconds()), self._tick)
        else:
            self._call = None


class _Protocol(WebSocketClientProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        self._wire = Wire(self)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        # autobahn leaves this timer behind when the peer drops during our close handshake.
        self._wire.forget_close_timer()

    def dataReceived(self, data: bytes) -> None:
        # Fast path for whole unmasked text frames from the server at a frame boundary (the
        # media stream's every message); anything else goes through autobahn's parser.
        if self.state != WebSocketProtocol.STATE_OPEN or not self._wire.idle():
            super().dataReceived(data)
            return
        n = len(data)
        pos = 0
        client = self.factory.media_client
        while n - pos >= 2 and data[pos] == 0x81:
            length = data[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126 and n - pos >= 4:
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                break
            end = start + length
            if end > n:
                break
            pos = end
            client._message(data[start:end], False)
            if self.state != WebSocketProtocol.STATE_OPEN:
                break
        if pos < n:
            super().dataReceived(data[pos:] if pos else data)

    def send_text(self, payload: bytes) -> None:
        """One masked text frame, framed here (as autobahn would, at a third of the cost)."""
        if self.state != WebSocketProtocol.STATE_OPEN:
            raise Disconnected("the media stream socket is not open")  # as autobahn's sendMessage
        n = len(payload)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        elif n < 0x10000:
            header = b"\x81\xfe" + n.to_bytes(2, "big")
        else:
            header = b"\x81\xff" + n.to_bytes(8, "big")
        mask = random.getrandbits(32).to_bytes(4, "little")
        key = (mask * ((n >> 2) + 1))[:n]
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
        self.sendData(header + mask + masked)

    def onOpen(self) -> None:
        self.factory.media_client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.media_client._message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        status = None
        line = getattr(self, "http_status_line", None)
        if line and not getattr(self, "_opened_once", False):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
        self.factory.media_client._closed(code, reason, status)


def _sid(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


@define(eq=False)
class TwilioMediaClient:
    """
    Twilio's end of one media stream. Call L{connect}; by default it then starts the stream and
    streams audio until L{stop} or L{close}.
    """

    _reactor: Any
    url: str
    call_sid: str = field(factory=lambda: _sid("CA"))
    stream_sid: str = field(factory=lambda: _sid("MZ"))
    account_sid: str = "AC" + "0" * 32
    token: str | None = None
    custom_parameters: dict = field(factory=dict)
    headers: dict = field(factory=dict)
    #: mu-law audio to stream (cut into 160-byte frames); silence when None or once played.
    audio: bytes | None = None
    loop_audio: bool = False
    #: Send `connected` and `start` as soon as the socket opens.
    auto_start: bool = True
    #: Stream a media frame every 20 ms once started.
    stream_media: bool = True
    ticker: MediaTicker | None = None
    #: A client endpoint to connect through instead of the URL's host and port (a proxy's plain
    #: port in front of the daemon, say); the URL still names the Host and the path. Used as
    #: given: no TLS is added for a wss URL.
    via: Any = None
    #: Bounds on what is recorded.
    max_records: int = 10_000
    max_audio_bytes: int = 1024 * 1024
    #: Everything received, in order; arrival times of media frames; the audio received.
    received: deque = field(init=False)
    media_times: deque = field(init=False)
    audio_received: bytearray = field(init=False, factory=bytearray)
    marks_echoed: deque = field(init=False)
    clears: int = field(init=False, default=0)
    #: Fires with this client when the socket opens (fails with UpgradeRefused, or the
    #: connection error). `closed` fires with (code, reason) when the socket closes.
    opened: Deferred = field(init=False, factory=Deferred)
    closed: Deferred = field(init=False, factory=Deferred)
    close_code: int | None = field(init=False, default=None)
    close_reason: str | None = field(init=False, default=None)
    protocol: _Protocol | None = field(init=False, default=None)
    _sequence: int = field(init=False, default=0)
    _chunk: int = field(init=False, default=0)
    _started_at: float | None = field(init=False, default=None)
    _audio_offset: int = field(init=False, default=0)
    _play_end: float = field(init=False, default=0.0)
    _pending_marks: deque = field(init=False, factory=deque)
    _media_template: bytes = field(init=False, default=b"")
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self.received = deque(maxlen=self.max_records)
        self.media_times = deque(maxlen=self.max_records)
        self.marks_echoed = deque(maxlen=self.max_records)
        if self.token is not None:
            self.custom_parameters = {**self.custom_parameters, "token": self.token}
        if self.ticker is None:
            self.ticker = MediaTicker(self._reactor)
        self._media_template = (
            b'{"event":"media","sequenceNumber":"%d","streamSid":'
            + json.dumps(self.stream_sid).encode()
            + b',"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
        )

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> Deferred:
        """Open the WebSocket; returns L{opened}."""
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        factory = WebSocketClientFactory(self.url, headers=dict(self.headers), reactor=self._reactor)
        factory.protocol = _Protocol
        factory.media_client = self
        factory.setProtocolOptions(
            utf8validateIncoming=False,
            failByDrop=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            serverConnectionDropTimeout=1,
            autoPingInterval=0,
        )
        endpoint = self.via or TCP4ClientEndpoint(self._reactor, parts.hostname, parts.port or (443 if secure else 80))
        if secure and self.via is None:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
        d = endpoint.connect(factory)
        d.addErrback(self._connect_failed)
        return self.opened

    @property
    def is_open(self) -> bool:
        return self.protocol is not None and self.protocol.state == WebSocketProtocol.STATE_OPEN

    def _connect_failed(self, failure) -> None:
        if not self.opened.called:
            self.opened.errback(failure)
        if not self.closed.called:
            self.closed.callback((None, str(failure.value)))

    def _opened(self, protocol: _Protocol) -> None:
        protocol._opened_once = True
        self.protocol = protocol
        if self.auto_start:
            self.send_connected()
            self.send_start()
        self.opened.callback(self)

    def _closed(self, code: int | None, reason: str | None, status: int | None) -> None:
        self.ticker.remove(self)
        for _name, call in self._pending_marks:
            if call.active():
                call.cancel()
        self._pending_marks.clear()
        self.close_code, self.close_reason = code, reason
        if not self.opened.called:
            self.opened.errback(UpgradeRefused(status, reason or ""))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Start a clean close of the WebSocket."""
        if self.is_open:
            self.protocol.sendClose(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()

    def pause_reading(self) -> None:
        """Stop reading from the socket (a slow consumer)."""
        self.protocol.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.protocol.transport.resumeProducing()

    # -- sending -----------------------------------------------------------------------------

    def send_raw(self, data: bytes, binary: bool = False) -> None:
        """Send one frame as it is."""
        if binary or not data:
            self.protocol.sendMessage(data, isBinary=binary)
        else:
            self.protocol.send_text(data)

    def send_json(self, message: dict) -> None:
        self.send_raw(json.dumps(message).encode())

    def _next_sequence(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def send_connected(self) -> None:
        self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def send_start(self) -> None:
        """Send `start`; media frames follow every 20 ms if `stream_media`."""
        self._started_at = self._reactor.seconds()
        self.send_json({
            "event": "start",
            "sequenceNumber": self._next_sequence(),
            "streamSid": self.stream_sid,
            "start": {
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(self.custom_parameters),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        })
        if self.stream_media:
            self.ticker.add(self)

    def send_media(self, frame: bytes) -> None:
        """Send one media frame now."""
        self._chunk += 1
        started = self._started_at if self._started_at is not None else self._reactor.seconds()
        elapsed = int((self._reactor.seconds() - started) * 1000)
        self._sequence += 1
        self.protocol.send_text(self._media_template % (self._sequence, self._chunk, elapsed, b64encode(frame)))

    def send_dtmf(self, digit: str) -> None:
        self.send_json({
            "event": "dtmf",
            "sequenceNumber": self._next_sequence(),
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        })

    def stop(self) -> None:
        """Stop streaming and send `stop` (Twilio then closes the socket; see L{close})."""
        self.ticker.remove(self)
        if self.is_open:
            self.send_json({
                "event": "stop",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            })

    def talk(self, audio: bytes) -> None:
        """The caller speaks: stream `audio` (mu-law) from the next frame on, then silence."""
        self.audio = audio
        self._audio_offset = 0

    def _send_next_frame(self) -> None:
        if not self.is_open:
            self.ticker.remove(self)
            return
        audio = self.audio
        if audio and self._audio_offset < len(audio):
            frame = audio[self._audio_offset : self._audio_offset + FRAME_BYTES]
            self._audio_offset += FRAME_BYTES
            if self.loop_audio and self._audio_offset >= len(audio):
                self._audio_offset = 0
            frame = frame + SILENCE[len(frame) :]
        else:
            frame = SILENCE
        self.send_media(frame)

    # -- receiving ---------------------------------------------------------------------------

    def _message(self, payload: bytes, binary: bool) -> None:
        now = self._reactor.seconds()
        try:
            message = json.loads(payload)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            self.received.append(Received(now, "invalid"))
            return
        if event == "media":
            self.media_times.append(now)
            audio = a2b_base64(message["media"]["payload"])
            if len(self.audio_received) + len(audio) <= self.max_audio_bytes:
                self.audio_received += audio
            self._play_end = max(self._play_end, now) + FRAME_SECONDS * len(audio) / FRAME_BYTES
            self.received.append(Received(now, "media"))
        elif event == "mark":
            name = message["mark"]["name"]
            self.received.append(Received(now, "mark", name))
            delay = self._play_end - now
            if delay <= 0 and not self._pending_marks:
                self._echo_mark(name)
            else:
                entry = [name, None]
                entry[1] = self._reactor.callLater(max(0.0, delay), self._mark_played, entry)
                self._pending_marks.append(entry)
        elif event == "clear":
            self.clears += 1
            self.received.append(Received(now, "clear"))
            self._play_end = now
            pending, self._pending_marks = self._pending_marks, deque()
            for name, call in pending:
                if call.active():
                    call.cancel()
                self._echo_mark(name)
        else:
            self.received.append(Received(now, str(event)))

    def _mark_played(self, entry: list) -> None:
        # Marks complete in order: this one and every earlier one.
        while self._pending_marks:
            name, call = self._pending_marks.popleft()
            if call.active():
                call.cancel()
            self._echo_mark(name)
            if name == entry[0]:
                break

    def _echo_mark(self, name: str) -> None:
        self.marks_echoed.append(name)
        if self.is_open:
            self.send_json({
                "event": "mark",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            })

    def events(self, *kinds: str) -> list[Received]:
        """What was received, optionally only the given events."""
        return [r for r in self.received if not kinds or r.event in kinds]
