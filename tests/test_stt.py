"""
Tests for voicecall.speech.stt: the OpenAI Realtime transcription client, against the fake
realtime server of voicecall.testing.openai_realtime, both in memory (MemoryReactorClock and
iosim, where time is driven by hand) and on the real reactor over loopback.
"""
from __future__ import annotations

from base64 import b64encode
from typing import Any, Callable

import numpy as np
import txaio
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.infra.audio import ulaw_encode
from voicecall.speech.stt import (
    CONNECT_TIMEOUT_MESSAGE,
    RealtimeSTTError,
    RealtimeSTTRejected,
    RealtimeTranscriber,
)
from voicecall.testing.openai_realtime import FakeRealtimeServer, Handshake

from tests.harness import eventually
from voicecall.infra.private import ws as private_ws
from voicecall.infra.private.ws import masked_text_frame

KEY = "sk-test-realtime-0123456789"
SILENCE = b"\xff" * 160
SCRIPT = ["Hello there, how are you?", "Fine thanks"]

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
STARTED = "input_audio_buffer.speech_started"


def tone_frames(count: int, amplitude: int = 8000) -> list[bytes]:
    """`count` 20 ms frames of a 440 Hz tone, as mu-law."""
    t = np.arange(count * 160) / 8000.0
    pcm = (np.sin(2 * np.pi * 440 * t) * amplitude).astype("<i2").tobytes()
    ulaw = ulaw_encode(pcm)
    return [ulaw[i : i + 160] for i in range(0, len(ulaw), 160)]


def session_update(threshold: float, silence: int, model: str = "gpt-4o-transcribe") -> dict:
    return {
        "type": "transcription_session.update",
        "session": {
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": model},
            "turn_detection": {
                "type": "server_vad",
                "threshold": threshold,
                "prefix_padding_ms": 300,
                "silence_duration_ms": silence,
            },
        },
    }


def parse_client_frames(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """
    Split `data` into RFC 6455 frames, each checked to be final and masked (as a client's must
    be): (opcode, masking key, unmasked payload), XORed byte by byte (the reference decoding).
    """
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b0 & 0x80, "FIN not set"
        assert b0 & 0x70 == 0, "RSV bits set"
        assert b1 & 0x80, "client frame not masked"
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        mask, pos = data[pos : pos + 4], pos + 4
        body = data[pos : pos + length]
        assert len(body) == length, "truncated frame"
        pos += length
        frames.append((b0 & 0x0F, mask, bytes(b ^ mask[i % 4] for i, b in enumerate(body))))
    return frames


class Recorder:
    """Collects the transcriber's callbacks in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def kwargs(self) -> dict[str, Callable[..., None]]:
        return {
            "on_partial": lambda text: self.events.append(("partial", text)),
            "on_final": lambda text: self.events.append(("final", text)),
            "on_speech_start": lambda: self.events.append(("start",)),
        }

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [e for e in self.events if e[0] == kind]


class Harness:
    """A transcriber and the fake server on a MemoryReactorClock, joined by iosim."""

    def __init__(self, key: str = KEY, url: str = "ws://127.0.0.1:9000/v1/realtime", **kwargs: Any):
        self.clock = MemoryReactorClock()
        self.fake = FakeRealtimeServer(self.clock, KEY, script=SCRIPT)
        self.recorder = Recorder()
        for name, callback in self.recorder.kwargs().items():
            kwargs.setdefault(name, callback)
        self.stt = RealtimeTranscriber(reactor=self.clock, api_key=key, url=url, **kwargs)
        self.pump: iosim.IOPump | None = None
        self.client_transport: iosim.FakeTransport | None = None

    @property
    def attempts(self) -> int:
        return len(self.clock.tcpClients)

    def accept(self, server_protocol: Any = None) -> iosim.IOPump:
        """Complete the latest TCP connection attempt to the fake (or to `server_protocol`)."""
        host, port, factory, _, _ = self.clock.tcpClients[-1]
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + self.attempts)
        if server_protocol is None:
            server_protocol = self.fake.factory.buildProtocol(peer)
        here, there = IPv4Address("TCP", host, port), peer
        self.client_transport = iosim.FakeTransport(client, False, there, here)
        self.pump = iosim.connect(
            server_protocol,
            iosim.FakeTransport(server_protocol, True, here, there),
            client,
            self.client_transport,
        )
        self.pump.flush()
        return self.pump

    def refuse(self) -> None:
        """Fail the latest TCP connection attempt with 'connection refused'."""
        factory = self.clock.tcpClients[-1][2]
        factory.clientConnectionFailed(
            self.clock.connectors[-1], Failure(ConnectionRefusedError())
        )

    def open(self, test: SynchronousTestCase) -> None:
        d = self.stt.connect()
        self.accept()
        test.successResultOf(d)

    def flush(self) -> None:
        assert self.pump is not None
        self.pump.flush()

    def send(self, *events: dict[str, Any]) -> None:
        for event in events:
            self.fake.send(event)
        self.flush()


class PublicPathTests(SynchronousTestCase):
    """With private/ws.py's private names missing (forced here) the client takes autobahn's public path."""

    def test_a_session_end_to_end(self) -> None:
        """Session update, appends (sent by autobahn's sendMessage), transcripts back, and the close."""
        self.patch(private_ws, "FAST", False)
        h = Harness(batch_ms=20)
        h.open(self)
        proto = h.stt._proto
        sent = []
        send_message = proto.sendMessage
        proto.sendMessage = lambda payload, isBinary=False, **kw: sent.append(payload) or send_message(payload, isBinary, **kw)
        frames = [bytes([i]) * 160 for i in range(3)]
        for frame in frames:
            h.stt.send_audio(frame)
        h.flush()
        self.assertEqual(h.fake.received[0].message, session_update(0.5, 800))
        self.assertEqual(h.fake.appended_audio(), [b64encode(f).decode() for f in frames])
        self.assertEqual(len(sent), 3)
        h.send({"type": DELTA, "delta": "Hi"}, {"type": COMPLETED, "transcript": "Hi there"})
        self.assertEqual(h.recorder.events, [("start",), ("partial", "Hi"), ("final", "Hi there")])
        closed = h.stt.close()
        h.flush()
        self.successResultOf(closed)


class SessionTests(SynchronousTestCase):
    """The upgrade request and the session configuration the client sends."""

    def test_handshake_headers_and_query(self) -> None:
        """The upgrade carries the bearer key, the realtime beta header and intent=transcription."""
        h = Harness()
        h.open(self)
        self.assertEqual(
            list(h.fake.handshakes),
            [
                Handshake(
                    path="/v1/realtime",
                    params={"intent": ["transcription"]},
                    authorized=True,
                    beta="realtime=v1",
                    status=101,
                )
            ],
        )
        self.assertTrue(h.stt.connected)

    def test_existing_query_kept(self) -> None:
        """A base URL with its own query keeps it and gains intent=transcription."""
        h = Harness(url="ws://127.0.0.1:9000/v1/realtime?region=eu")
        h.open(self)
        self.assertEqual(
            h.fake.handshakes[0].params, {"region": ["eu"], "intent": ["transcription"]}
        )

    def test_session_update_defaults(self) -> None:
        """The first message is the SPEC session update with threshold 0.5 and 800 ms silence."""
        h = Harness()
        h.open(self)
        self.assertEqual(h.fake.received[0].message, session_update(0.5, 800))
        self.assertEqual(len(h.fake.received), 1)

    def test_session_update_explicit_zero(self) -> None:
        """Explicit zero threshold and silence are sent as zero, not replaced by defaults."""
        h = Harness(vad_threshold=0, silence_duration_ms=0, model="gpt-4o-mini-transcribe")
        h.open(self)
        message = h.fake.received[0].message
        self.assertEqual(message, session_update(0, 0, "gpt-4o-mini-transcribe"))
        detection = message["session"]["turn_detection"]
        self.assertEqual((detection["threshold"], detection["silence_duration_ms"]), (0, 0))

    def test_session_update_none_means_default(self) -> None:
        """An unset (None) threshold or silence falls back to 0.5 and 800."""
        h = Harness(vad_threshold=None, silence_duration_ms=None)
        h.open(self)
        self.assertEqual(h.fake.received[0].message, session_update(0.5, 800))

    def test_api_key_not_in_repr(self) -> None:
        """The transcriber's repr never shows the API key."""
        h = Harness()
        self.assertNotIn(KEY, repr(h.stt))

    def test_handshake_never_logged_with_key(self) -> None:
        """Even with autobahn at debug level, no log event carries the API key."""
        previous = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, previous)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = Harness()
        h.open(self)
        h.stt.send_audio(SILENCE)
        h.flush()
        self.assertTrue(events, "expected some log events at debug level")
        for event in events:
            self.assertNotIn(KEY, formatEvent(event))
            self.assertNotIn(KEY, repr(event))


class AudioTests(SynchronousTestCase):
    """Forwarding of media frames."""

    def test_frames_batched_into_appends(self) -> None:
        """By default 100 ms of frames (five) go out as one input_audio_buffer.append, in base64."""
        h = Harness()
        h.open(self)
        frames = [bytes([i]) * 160 for i in range(12)]
        for frame in frames:
            h.stt.send_audio(frame)
        h.flush()
        self.assertEqual(
            h.fake.appended_audio(),
            [b64encode(b"".join(frames[0:5])).decode(), b64encode(b"".join(frames[5:10])).decode()],
        )

    def test_partial_batch_sent_before_close(self) -> None:
        """Closing sends the audio still waiting for a full batch, then the close."""
        h = Harness()
        h.open(self)
        frames = [bytes([i]) * 160 for i in range(7)]
        for frame in frames:
            h.stt.send_audio(frame)
        h.stt.close()
        h.flush()
        self.assertEqual(
            h.fake.appended_audio(),
            [b64encode(b"".join(frames[0:5])).decode(), b64encode(b"".join(frames[5:7])).decode()],
        )

    def test_frames_forwarded_as_base64_appends(self) -> None:
        """With batch_ms=20 each frame becomes one input_audio_buffer.append with the frame in base64."""
        h = Harness(batch_ms=20)
        h.open(self)
        frames = [bytes(range(i, i + 160)) for i in (0, 50, 90)]
        for frame in frames:
            h.stt.send_audio(frame)
        h.flush()
        self.assertEqual(h.fake.appended_audio(), [b64encode(f).decode() for f in frames])
        appends = [r.message for r in h.fake.received][1:]
        self.assertEqual(
            appends,
            [{"type": "input_audio_buffer.append", "audio": b64encode(f).decode()} for f in frames],
        )

    def test_frames_dropped_while_not_connected(self) -> None:
        """Frames sent before the session opens are dropped, not queued."""
        h = Harness(batch_ms=20)
        h.stt.send_audio(b"\x01" * 160)
        d = h.stt.connect()
        h.stt.send_audio(b"\x02" * 160)
        h.accept()
        self.successResultOf(d)
        h.stt.send_audio(b"\x03" * 160)
        h.flush()
        self.assertEqual(h.fake.appended_audio(), [b64encode(b"\x03" * 160).decode()])

    def test_frames_dropped_while_transport_paused(self) -> None:
        """While the transport has paused its producer, frames are dropped; resumed, they flow."""
        h = Harness(batch_ms=20)
        h.open(self)
        producer = h.client_transport.producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        h.stt.send_audio(b"\x04" * 160)
        producer.resumeProducing()
        h.stt.send_audio(b"\x05" * 160)
        h.flush()
        self.assertEqual(h.fake.appended_audio(), [b64encode(b"\x05" * 160).decode()])

    def test_frames_dropped_after_close(self) -> None:
        """After close() nothing more is sent."""
        h = Harness(batch_ms=20)
        h.open(self)
        d = h.stt.close()
        h.flush()
        self.successResultOf(d)
        h.stt.send_audio(b"\x06" * 160)
        h.flush()
        self.assertEqual(h.fake.appended_audio(), [])

    def test_appends_are_masked_text_frames_with_fresh_keys(self) -> None:
        """Each append on the wire is one final, masked text frame, with a key of its own."""
        h = Harness(batch_ms=20)
        h.open(self)
        h.flush()
        written = []
        transport = h.client_transport
        write = transport.write
        transport.write = lambda data: written.append(data) or write(data)
        frames = [bytes([i]) * 160 for i in range(20)]
        for frame in frames:
            h.stt.send_audio(frame)
        h.flush()
        parsed = parse_client_frames(b"".join(written))
        self.assertEqual([opcode for opcode, _, _ in parsed], [1] * 20)
        self.assertEqual(
            [payload for _, _, payload in parsed],
            [b'{"type":"input_audio_buffer.append","audio":"%s"}' % b64encode(f) for f in frames],
        )
        self.assertEqual(len({mask for _, mask, _ in parsed}), 20)
        self.assertEqual(h.fake.appended_audio(), [b64encode(f).decode() for f in frames])

    def test_queued_autobahn_writes_are_not_overtaken(self) -> None:
        """While autobahn's own send queue holds data, appends go through it, in order."""
        h = Harness(batch_ms=20)
        h.open(self)
        proto = h.stt._proto
        sent: list[bytes] = []
        send_message = proto.sendMessage
        proto.sendMessage = lambda payload, isBinary=False, **kw: sent.append(payload) or send_message(payload, isBinary, **kw)
        # As if autobahn's queued writer were between two of its writes (nothing scheduled).
        proto.send_queue.append((masked_text_frame(b'{"type":"queued"}', b"abcd"), False))
        proto.triggered = True
        h.stt.send_audio(b"\x07" * 160)
        self.assertEqual(len(sent), 1)
        self.assertEqual(len(proto.send_queue), 2)
        while proto.send_queue:  # the writer drains its queue in order
            proto.transport.write(proto.send_queue.popleft()[0])
        proto.triggered = False
        h.flush()
        self.assertEqual([r.message for r in h.fake.received][1], {"type": "queued"})
        self.assertEqual(h.fake.appended_audio(), [b64encode(b"\x07" * 160).decode()])

    def test_frames_dropped_while_closing(self) -> None:
        """Once the server has started the closing handshake, frames are dropped, not raised."""
        h = Harness(batch_ms=20)
        h.open(self)
        h.fake.drop_all(1000)
        h.pump.pump()  # the close frame reaches the client; its reply has not reached the server
        proto = h.stt._proto
        self.assertIsNotNone(proto)
        self.assertEqual(proto.state, WebSocketProtocol.STATE_CLOSING)
        h.stt.send_audio(b"\x08" * 160)
        self.assertEqual(h.stt._dropped_frames, 1)
        h.flush()
        self.assertEqual(h.fake.appended_audio(), [])


class CallerTurnTests(SynchronousTestCase):
    """Server events become partial, final and speech-start callbacks, one start per utterance."""

    def setUp(self) -> None:
        self.h = Harness()
        self.h.open(self)

    def test_native_utterance(self) -> None:
        """speech_started, deltas and completed give one start, accumulated partials, one final."""
        self.h.send(
            {"type": STARTED},
            {"type": DELTA, "delta": "Hi"},
            {"type": DELTA, "delta": " there"},
            {"type": COMPLETED, "transcript": "Hi there"},
        )
        self.assertEqual(
            self.h.recorder.events,
            [("start",), ("partial", "Hi"), ("partial", "Hi there"), ("final", "Hi there")],
        )

    def test_partial_opens_utterance_once(self) -> None:
        """A partial opens the utterance; a native start inside it does not fire again."""
        self.h.send(
            {"type": DELTA, "delta": "Hel"},
            {"type": STARTED},
            {"type": DELTA, "delta": "lo"},
            {"type": COMPLETED, "transcript": "Hello"},
        )
        self.assertEqual(
            self.h.recorder.events,
            [("start",), ("partial", "Hel"), ("partial", "lo"), ("final", "Hello")],
        )

    def test_lone_final_starts_and_closes(self) -> None:
        """A final with no start before it fires one start, then the final."""
        self.h.send({"type": COMPLETED, "transcript": "Yes"})
        self.assertEqual(self.h.recorder.events, [("start",), ("final", "Yes")])

    def test_each_utterance_starts_once(self) -> None:
        """Two utterances give two starts."""
        self.h.send(
            {"type": STARTED},
            {"type": STARTED},
            {"type": COMPLETED, "transcript": "One"},
            {"type": STARTED},
            {"type": COMPLETED, "transcript": "Two"},
        )
        self.assertEqual(
            self.h.recorder.events,
            [("start",), ("final", "One"), ("start",), ("final", "Two")],
        )

    def test_empty_completion(self) -> None:
        """An empty or blank transcript is not a final, but it does close the utterance."""
        self.h.send(
            {"type": STARTED},
            {"type": COMPLETED, "transcript": ""},
            {"type": COMPLETED, "transcript": "   "},
            {"type": DELTA, "delta": "Again"},
        )
        self.assertEqual(
            self.h.recorder.events, [("start",), ("start",), ("partial", "Again")]
        )

    def test_speech_started_resets_pending(self) -> None:
        """A native speech start discards the text accumulated so far."""
        self.h.send(
            {"type": DELTA, "delta": "stale"},
            {"type": COMPLETED, "transcript": ""},
            {"type": DELTA, "delta": "x"},
            {"type": STARTED},
            {"type": DELTA, "delta": "fresh"},
        )
        self.assertEqual(self.h.recorder.of("partial")[-1], ("partial", "fresh"))

    def test_completion_resets_pending(self) -> None:
        """After a final the next utterance's partials start from nothing."""
        self.h.send(
            {"type": DELTA, "delta": "one"},
            {"type": COMPLETED, "transcript": "one"},
            {"type": DELTA, "delta": "two"},
        )
        self.assertEqual(self.h.recorder.of("partial"), [("partial", "one"), ("partial", "two")])

    def test_text_passed_through(self) -> None:
        """Callbacks get the server's text unchanged, control characters and length included."""
        text = "line one\nline\x07two " + "word " * 100
        self.h.send({"type": DELTA, "delta": text}, {"type": COMPLETED, "transcript": text})
        self.assertEqual(self.h.recorder.of("partial"), [("partial", text)])
        self.assertEqual(self.h.recorder.of("final"), [("final", text)])

    def test_logged_transcripts_truncated_and_clean(self) -> None:
        """What is logged of a final is at most 200 characters with no control characters."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        text = "line one\nline\x07two\x1b[31m " + "word " * 100
        self.h.send({"type": COMPLETED, "transcript": text})
        logged = [e for e in events if "final transcript" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        excerpt = logged[0]["text"]
        self.assertLessEqual(len(excerpt), 200)
        self.assertTrue(excerpt.startswith("line oneline"))
        for char in "\n\x07\x1b":
            self.assertNotIn(char, excerpt)
        for event in events:
            self.assertNotIn(text, formatEvent(event))

    def test_error_event_logged(self) -> None:
        """A server error event is logged (sanitised) and the session stays open."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.h.send(
            {"type": "error", "error": {"code": "bad\nthing", "message": "went\x00 wrong"}}
        )
        logged = [e for e in events if "server error" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(formatEvent(logged[0]), "Realtime STT server error badthing: went wrong")
        self.assertTrue(self.h.stt.connected)

    def test_malformed_events_ignored(self) -> None:
        """Invalid JSON, non-objects and events without a type are ignored."""
        for proto in list(self.h.fake._connections):
            proto.sendMessage(b"{not json", False)
            proto.sendMessage(b"[1, 2]", False)
            proto.sendMessage(b'{"delta": "x"}', False)
            proto.sendMessage(b"\xff\xfe", False)
            proto.sendMessage(b"binary", True)
        self.h.send({"type": COMPLETED, "transcript": "still here"})
        self.assertEqual(self.h.recorder.events, [("start",), ("final", "still here")])
        self.assertTrue(self.h.stt.connected)

    def test_failing_callback_does_not_stop_events(self) -> None:
        """A callback that raises is logged and later events are still delivered."""
        finals: list[str] = []

        def explode(text: str) -> None:
            finals.append(text)
            raise ZeroDivisionError()

        self.h.stt.on_final = explode
        self.h.send(
            {"type": COMPLETED, "transcript": "a"}, {"type": COMPLETED, "transcript": "b"}
        )
        self.assertEqual(finals, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertTrue(self.h.stt.connected)

    def test_disconnect_closes_the_utterance(self) -> None:
        """After a reconnect, speech starts a fresh utterance with fresh partials."""
        self.h.send({"type": DELTA, "delta": "cut"})
        self.h.fake.drop_all()
        self.h.flush()
        self.h.clock.advance(1)
        self.h.accept()
        self.assertTrue(self.h.stt.connected)
        self.h.send({"type": DELTA, "delta": "new"})
        self.assertEqual(
            self.h.recorder.events,
            [("start",), ("partial", "cut"), ("start",), ("partial", "new")],
        )


class ConnectionTests(SynchronousTestCase):
    """Connection timeout, rejection, reconnection with back-off, and close()."""

    def test_timeout_while_connecting(self) -> None:
        """A TCP connection that never completes fails connect() after exactly 10 s."""
        h = Harness()
        d = h.stt.connect()
        h.clock.advance(9.999)
        self.assertNoResult(d)
        h.clock.advance(0.001)
        failure = self.failureResultOf(d, RealtimeSTTError)
        self.assertEqual(str(failure.value), "Realtime STT connection timeout")
        self.assertEqual(CONNECT_TIMEOUT_MESSAGE, "Realtime STT connection timeout")
        self.assertTrue(h.clock.connectors[0].stoppedConnecting)

    def test_timeout_during_handshake(self) -> None:
        """A server that accepts TCP but never answers the upgrade times out and is aborted."""
        h = Harness()
        d = h.stt.connect()
        silent = Protocol()
        h.accept(silent)
        self.assertNoResult(d)
        h.clock.advance(10)
        failure = self.failureResultOf(d, RealtimeSTTError)
        self.assertEqual(str(failure.value), CONNECT_TIMEOUT_MESSAGE)
        self.assertTrue(h.client_transport.disconnecting)
        self.assertFalse(h.stt.connected)

    def test_auth_failure_not_retried(self) -> None:
        """A wrong key fails connect() with a 401 rejection naming the key, and nothing retries."""
        h = Harness(key="sk-wrong")
        d = h.stt.connect()
        h.accept()
        failure = self.failureResultOf(d, RealtimeSTTRejected)
        self.assertEqual(failure.value.status, 401)
        self.assertEqual(
            str(failure.value),
            "Realtime STT authentication failed: HTTP 401 Unauthorized (check the OpenAI API key)",
        )
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(100)
        self.assertEqual(h.attempts, 1)

    def test_failed_first_connect_retried(self) -> None:
        """A first connection that fails for another reason is retried after 1 s."""
        h = Harness()
        h.fake.refuse_next(1)
        d = h.stt.connect()
        h.accept()
        failure = self.failureResultOf(d, RealtimeSTTRejected)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(
            str(failure.value), "Realtime STT handshake rejected: HTTP 503 Service Unavailable"
        )
        h.clock.advance(1)
        self.assertEqual(h.attempts, 2)
        h.accept()
        self.assertTrue(h.stt.connected)

    def test_refused_tcp_message(self) -> None:
        """A refused TCP connection fails connect() with a 'connection failed' error."""
        h = Harness()
        d = h.stt.connect()
        h.refuse()
        failure = self.failureResultOf(d, RealtimeSTTError)
        self.assertTrue(str(failure.value).startswith("Realtime STT connection failed: "))
        h.stt.close()

    def test_reconnect_backoff_and_limit(self) -> None:
        """After an unexpected close it retries after 1, 2, 4, 8 and 16 s, then gives up."""
        h = Harness()
        h.open(self)
        h.fake.drop_all()
        h.flush()
        self.assertFalse(h.stt.connected)
        self.assertEqual(h.attempts, 1)
        for attempt, delay in enumerate([1, 2, 4, 8, 16], start=2):
            h.clock.advance(delay - 0.01)
            self.assertEqual(h.attempts, attempt - 1)
            h.clock.advance(0.01)
            self.assertEqual(h.attempts, attempt)
            h.refuse()
        h.clock.advance(1000)
        self.assertEqual(h.attempts, 6)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertFalse(h.stt.connected)

    def test_reconnect_restores_session(self) -> None:
        """A reconnection sends the session update again and audio flows again."""
        h = Harness(batch_ms=20)
        h.open(self)
        h.fake.drop_all()
        h.flush()
        h.clock.advance(1)
        h.accept()
        self.assertTrue(h.stt.connected)
        h.stt.send_audio(SILENCE)
        h.flush()
        self.assertEqual(h.fake.sessions, [session_update(0.5, 800)["session"]] * 2)
        self.assertEqual(h.fake.appended_audio(), [b64encode(SILENCE).decode()])

    def test_successful_reconnect_resets_backoff(self) -> None:
        """Once a reconnection succeeds, the next drop waits 1 s again."""
        h = Harness()
        h.open(self)
        h.fake.drop_all()
        h.flush()
        h.clock.advance(1)
        h.refuse()
        h.clock.advance(2)
        h.accept()
        self.assertTrue(h.stt.connected)
        h.fake.drop_all()
        h.flush()
        h.clock.advance(1)
        self.assertEqual(h.attempts, 4)

    def test_close_cancels_pending_reconnect(self) -> None:
        """close() while a reconnection is waiting cancels it for good."""
        h = Harness()
        h.open(self)
        h.fake.drop_all()
        h.flush()
        self.successResultOf(h.stt.close())
        h.clock.advance(1000)
        self.assertEqual(h.attempts, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_close_is_clean_and_final(self) -> None:
        """close() does a clean WebSocket close, never reconnects, and connect() then fails."""
        h = Harness()
        h.open(self)
        d = h.stt.close()
        self.assertFalse(h.stt.connected)
        h.flush()
        self.successResultOf(d)
        self.assertEqual(h.fake.close_codes, [1000])
        h.clock.advance(1000)
        self.assertEqual(h.attempts, 1)
        failure = self.failureResultOf(h.stt.connect(), RealtimeSTTError)
        self.assertEqual(str(failure.value), "Realtime STT session is closed")

    def test_close_during_connect(self) -> None:
        """close() while connecting fails the pending connect() and stops the attempt."""
        h = Harness()
        d = h.stt.connect()
        self.successResultOf(h.stt.close())
        failure = self.failureResultOf(d, RealtimeSTTError)
        self.assertEqual(str(failure.value), "Realtime STT session is closed")
        self.assertTrue(h.clock.connectors[0].stoppedConnecting)
        h.clock.advance(1000)
        self.assertEqual(h.attempts, 1)

    def test_concurrent_connects_share_attempt(self) -> None:
        """Two connect() calls during one attempt both fire when it opens."""
        h = Harness()
        first, second = h.stt.connect(), h.stt.connect()
        h.accept()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(h.attempts, 1)
        self.successResultOf(h.stt.connect())


class LoopbackTests(TestCase):
    """The transcriber and the fake server on the real reactor over 127.0.0.1."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.fake = FakeRealtimeServer(reactor, KEY, script=list(SCRIPT))
        self.fake.listen()
        self.addCleanup(self.fake.stop)
        self.recorder = Recorder()

    def transcriber(self, **kwargs: Any) -> RealtimeTranscriber:
        kwargs.setdefault("api_key", KEY)
        kwargs.setdefault("url", self.fake.url)
        for name, callback in self.recorder.kwargs().items():
            kwargs.setdefault(name, callback)
        stt = RealtimeTranscriber(reactor=self.reactor, **kwargs)
        self.addCleanup(stt.close)
        return stt

    async def test_session_update_over_loopback(self) -> None:
        """The session update reaches the server exactly as SPEC §11 gives it."""
        stt = self.transcriber()
        await stt.connect()
        await eventually(lambda: len(self.fake.received) == 1, 5, "the session update")
        self.assertEqual(self.fake.received[0].message, session_update(0.5, 800))
        self.assertEqual(self.fake.handshakes[0].status, 101)

    async def test_speech_utterance(self) -> None:
        """Tone then silence gives one speech start, growing partials and one scripted final."""
        stt = self.transcriber()
        await stt.connect()
        for frame in tone_frames(50):
            stt.send_audio(frame)
        for _ in range(50):
            stt.send_audio(SILENCE)
        await eventually(lambda: bool(self.recorder.of("final")), 5, "a final transcript")
        self.assertEqual(
            self.recorder.events,
            [
                ("start",),
                ("partial", "Hello"),
                ("partial", "Hello there,"),
                ("partial", "Hello there, how"),
                ("partial", "Hello there, how are"),
                ("partial", "Hello there, how are you?"),
                ("final", "Hello there, how are you?"),
            ],
        )
        self.assertEqual(len(self.fake.appended_audio()), 20)  # five frames per append

    async def test_appends_written_to_the_socket_decode_over_loopback(self) -> None:
        """Appends written straight to a TCP socket, small and large (64-bit length), reach the server intact."""
        stt = self.transcriber(batch_ms=20)
        await stt.connect()
        self.assertIsNotNone(stt._proto._wire._socket)
        frames = [bytes([i % 256]) * 160 for i in range(200)]
        for frame in frames:
            stt.send_audio(frame)
        await eventually(lambda: len(self.fake.appended_audio()) == 200, 5, "200 appends")
        self.assertEqual(self.fake.appended_audio(), [b64encode(f).decode() for f in frames])
        big = self.transcriber(batch_ms=7000)  # 56,000 bytes: 74,668 in base64
        await big.connect()
        audio = bytes(range(256)) * 218 + bytes(192)
        for i in range(0, len(audio), 160):
            big.send_audio(audio[i : i + 160])
        await eventually(lambda: len(self.fake.appended_audio()) == 201, 5, "the large append")
        self.assertEqual(self.fake.appended_audio()[-1], b64encode(audio).decode())

    async def test_transcript_text_unchanged_over_loopback(self) -> None:
        """A long transcript with control characters reaches on_final unchanged."""
        text = "first\tline\nsecond\x07line " + "word " * 60
        self.fake.script = [text]
        stt = self.transcriber(silence_duration_ms=100)
        await stt.connect()
        for frame in tone_frames(5) + [SILENCE] * 10:
            stt.send_audio(frame)
        await eventually(lambda: bool(self.recorder.of("final")), 5, "a final transcript")
        self.assertEqual(self.recorder.of("final"), [("final", text)])
        self.assertEqual(self.recorder.of("partial")[-1], ("partial", text))

    async def test_connection_timeout(self) -> None:
        """A server that accepts TCP but never completes the handshake times connect() out."""
        lost: list[Deferred[None]] = []

        class Mute(Protocol):
            def connectionMade(self) -> None:
                self.gone: Deferred[None] = Deferred()
                lost.append(self.gone)

            def connectionLost(self, reason: Failure) -> None:
                self.gone.callback(None)

        port = self.reactor.listenTCP(0, Factory.forProtocol(Mute), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}/v1/realtime"
        stt = self.transcriber(url=url, connect_timeout=0.3)
        error = await self.assertFailure(stt.connect(), RealtimeSTTError)
        self.assertEqual(str(error), "Realtime STT connection timeout")
        await stt.close()
        self.assertEqual(len(lost), 1)
        await lost[0]

    async def test_reconnect_after_unexpected_close(self) -> None:
        """A connection the server drops is re-established and configured again."""
        self.fake.close_next(after_messages=1)
        stt = self.transcriber(reconnect_delay=0.05, batch_ms=20)
        await stt.connect()
        await eventually(lambda: len(self.fake.sessions) == 2 and stt.connected, 5, "the second session")
        stt.send_audio(SILENCE)
        await eventually(lambda: len(self.fake.appended_audio()) == 1, 5, "an append on the new session")
        self.assertEqual([h.status for h in self.fake.handshakes], [101, 101])

    async def test_reconnect_stops_after_five_attempts(self) -> None:
        """With every reconnection refused, exactly five attempts are made."""
        stt = self.transcriber(reconnect_delay=0.01)
        await stt.connect()
        await eventually(lambda: self.fake.open_connections == 1, 5, "the connection")
        self.fake.refuse_next(100)
        self.fake.drop_all()
        await eventually(lambda: len(self.fake.handshakes) == 6, 5, "six handshakes")
        # Given up: no attempt in flight and none scheduled.
        await eventually(lambda: stt._attempt is None and stt._reconnect_call is None, 5, "the transcriber to give up")
        self.assertEqual([h.status for h in self.fake.handshakes], [101] + [503] * 5)
        self.assertFalse(stt.connected)

    async def test_close_prevents_reconnect(self) -> None:
        """After close() the server sees a clean close and no new connection."""
        stt = self.transcriber(reconnect_delay=0.01)
        await stt.connect()
        await stt.close()
        await eventually(lambda: self.fake.close_codes == [1000], 5, "the clean close")
        self.assertIsNone(stt._reconnect_call)  # nothing scheduled: a closed transcriber never reconnects
        self.assertEqual(len(self.fake.handshakes), 1)
        self.assertFalse(stt.connected)

    async def test_bad_key(self) -> None:
        """A wrong API key makes connect() fail with a clear 401 error that hides the key."""
        stt = self.transcriber(api_key="sk-wrong-key")
        error = await self.assertFailure(stt.connect(), RealtimeSTTRejected)
        self.assertEqual(error.status, 401)
        self.assertIn("authentication failed", str(error))
        self.assertNotIn("sk-wrong-key", str(error))
        self.assertEqual([(h.status, h.authorized) for h in self.fake.handshakes], [(401, False)])
