"""
Tests for L{voicecall.speech.tts} (streamed telephony TTS with provider fallback, SPEC §12.2)
and the fake speech APIs of L{voicecall.testing.speech} it is tested against.

Most tests run the fakes through C{StubTreq} on a C{Clock} (the fakes write each chunk when the
clock says so, C{flush} moves the bytes); L{StreamingLoopbackTests} runs them on loopback with
the real reactor, where incremental delivery, time limits and aborted connections are real.
"""
from __future__ import annotations

import json

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from voicecall.infra.audio import AudioChunk
from voicecall.config import parse_config
from voicecall.config.model import TtsConfig, TtsElevenLabsConfig, TtsOpenAIConfig, TtsVoiceSettings
from voicecall.speech.tts import TelephonyTts, TtsError
from voicecall.tap import build_tts
from voicecall.testing.speech import FakeElevenLabs, FakeOpenAISpeech, tone

from tests.harness import eventually

OPENAI_KEY = "sk-test-0123456789abcdef"
ELEVEN_KEY = "el-test-0123456789abcdef"
TAIL = "; edge: unsupported for telephony"


def tts_config(base: str, openai_key=OPENAI_KEY, eleven_key=ELEVEN_KEY, **kwargs) -> TtsConfig:
    """A TtsConfig pointing at fakes mounted under C{base}/openai and C{base}/elevenlabs."""
    openai = kwargs.pop("openai", {})
    eleven = kwargs.pop("elevenlabs", {})
    return TtsConfig(
        openai=TtsOpenAIConfig(api_key=openai_key, base_url=f"{base}/openai/v1", **openai),
        elevenlabs=TtsElevenLabsConfig(api_key=eleven_key, base_url=f"{base}/elevenlabs", **eleven),
        **kwargs,
    )


def fakes_root(openai: FakeOpenAISpeech, eleven: FakeElevenLabs) -> Resource:
    root = Resource()
    root.putChild(b"openai", openai.resource())
    root.putChild(b"elevenlabs", eleven.resource())
    return root


class _Stubbed:
    """Both fakes behind one StubTreq, on one Clock shared with the TTS under test."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.openai = FakeOpenAISpeech(self.clock, OPENAI_KEY)
        self.eleven = FakeElevenLabs(self.clock, ELEVEN_KEY)
        self.stub = StubTreq(fakes_root(self.openai, self.eleven))
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def make(self, **kwargs) -> TelephonyTts:
        return build_tts(http=self.stub, clock=self.clock, tts=tts_config("http://fake", **kwargs))

    def speak(self, tts: TelephonyTts, text: str, seconds: float = 10.0, on_audio=None):
        """Synthesize C{text}, driving the clock and the stub until it settles."""
        chunks: list[AudioChunk] = []
        d = tts.synthesize(text, on_audio or chunks.append)
        self.drive(d, seconds)
        return d, chunks

    def drive(self, d: Deferred, seconds: float = 10.0, step: float = 0.01) -> None:
        for _ in range(int(seconds / step)):
            self.stub.flush()
            if d.called:
                break
            self.clock.advance(step)
        self.stub.flush()

    def error_text(self, d: Deferred) -> str:
        return str(self.failureResultOf(d, TtsError).value)

    def fallback_events(self) -> list[dict]:
        return [e for e in self.log if "fell back" in e.get("log_format", "")]


class SynthesisTests(_Stubbed, SynchronousTestCase):
    def test_openai_request(self) -> None:
        """OpenAI gets POST {baseUrl}/audio/speech with the Bearer key and the pcm JSON body."""
        d, _ = self.speak(self.make(), "Hello there")
        self.assertEqual(self.successResultOf(d), "openai")
        (request,) = self.openai.requests
        self.assertEqual((request.method, request.path), ("POST", "/openai/v1/audio/speech"))
        self.assertEqual(request.header("authorization"), f"Bearer {OPENAI_KEY}")
        self.assertEqual(
            request.json,
            {"model": "gpt-4o-mini-tts", "input": "Hello there", "voice": "alloy", "response_format": "pcm"},
        )

    def test_openai_audio(self) -> None:
        """OpenAI audio arrives as 24 kHz pcm16 chunks whose concatenation is the whole body."""
        d, chunks = self.speak(self.make(), "Hello there")
        self.successResultOf(d)
        self.assertGreater(len(chunks), 1)
        self.assertEqual({(c.encoding, c.sample_rate) for c in chunks}, {("pcm16", 24000)})
        self.assertEqual(b"".join(c.data for c in chunks), self.openai.audio_for("Hello there"))

    def test_odd_chunks_passed_on(self) -> None:
        """PCM chunks are emitted exactly as they arrive, even when they split a sample."""
        self.openai.chunk_bytes = 999
        d, chunks = self.speak(self.make(), "Hello there")
        self.successResultOf(d)
        self.assertEqual(len(chunks[0].data), 999)
        self.assertEqual(b"".join(c.data for c in chunks), self.openai.audio_for("Hello there"))

    def test_openai_speed_and_instructions(self) -> None:
        """speed is sent when set, and instructions only for gpt-4o-mini-tts models."""
        tts = self.make(openai={"speed": 1.25, "instructions": "Calm."})
        self.successResultOf(self.speak(tts, "Hi")[0])
        tts = self.make(openai={"instructions": "Calm.", "model": "tts-1", "voice": "nova"})
        self.successResultOf(self.speak(tts, "Hi")[0])
        first, second = (r.json for r in self.openai.requests)
        self.assertEqual((first["speed"], first["instructions"]), (1.25, "Calm."))
        self.assertEqual(
            second, {"model": "tts-1", "input": "Hi", "voice": "nova", "response_format": "pcm"}
        )

    def test_elevenlabs_request_and_audio(self) -> None:
        """ElevenLabs gets the stream URL with ulaw_8000, xi-api-key and the settings; audio is 8 kHz mu-law."""
        tts = self.make(
            provider="elevenlabs",
            elevenlabs={
                "voice_id": "voice123",
                "seed": 7,
                "language_code": "de",
                "apply_text_normalization": "on",
                "voice_settings": TtsVoiceSettings(stability=0.25, speed=1.5),
            },
        )
        d, chunks = self.speak(tts, "Guten Tag")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        (request,) = self.eleven.requests
        self.assertEqual(request.path, "/elevenlabs/v1/text-to-speech/voice123/stream")
        self.assertEqual(request.query, (("output_format", "ulaw_8000"),))
        self.assertEqual(request.header("xi-api-key"), ELEVEN_KEY)
        self.assertEqual(
            request.json,
            {
                "text": "Guten Tag",
                "model_id": "eleven_multilingual_v2",
                "seed": 7,
                "apply_text_normalization": "on",
                "language_code": "de",
                "voice_settings": {
                    "stability": 0.25,
                    "similarity_boost": 0.75,
                    "style": 0.0,
                    "use_speaker_boost": True,
                    "speed": 1.5,
                },
            },
        )
        self.assertEqual({(c.encoding, c.sample_rate) for c in chunks}, {("ulaw", 8000)})
        self.assertEqual(b"".join(c.data for c in chunks), self.eleven.audio_for("Guten Tag"))
        self.assertEqual(len(self.openai.requests), 0)

    def test_a_calls_own_voice(self) -> None:
        """A call's own voice replaces the configured one for the first provider tried only."""
        d = self.make().synthesize("Hi", [].append, voice="nova")
        self.drive(d)
        self.assertEqual(self.openai.requests[0].json["voice"], "nova")
        self.openai.fail_next(500)
        d = self.make().synthesize("Hi", [].append, voice="nova")
        self.drive(d)
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertIn("/text-to-speech/pMsXgVXv3BLzUgSXRplE/", self.eleven.requests[-1].path)
        d = self.make(provider="elevenlabs").synthesize("Hi", [].append, voice="my-clone")
        self.drive(d)
        self.assertIn("/text-to-speech/my-clone/", self.eleven.requests[-1].path)

    def test_elevenlabs_voice_id_quoted(self) -> None:
        """A voice id cannot change the request path: it is percent-encoded as one segment."""
        tts = self.make(provider="elevenlabs", elevenlabs={"voice_id": "../x?y"})
        self.speak(tts, "Hi")
        self.assertEqual(self.eleven.requests[0].path, "/elevenlabs/v1/text-to-speech/..%2Fx%3Fy/stream")

    def test_available(self) -> None:
        """available() is true when OpenAI or ElevenLabs has a key, false with neither."""
        self.assertTrue(self.make(eleven_key=None).available())
        self.assertTrue(self.make(openai_key=None).available())
        self.assertFalse(self.make(openai_key=None, eleven_key=None).available())


class ProviderOrderTests(_Stubbed, SynchronousTestCase):
    def test_first_with_key_openai(self) -> None:
        """Without a configured provider, OpenAI is used when it has a key."""
        self.assertEqual(self.successResultOf(self.speak(self.make(), "Hi")[0]), "openai")
        self.assertEqual(len(self.eleven.requests), 0)

    def test_first_with_key_elevenlabs(self) -> None:
        """Without a configured provider or OpenAI key, ElevenLabs is primary (no fallback warning)."""
        d, _ = self.speak(self.make(openai_key=None), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertEqual(self.fallback_events(), [])

    def test_configured_provider_first(self) -> None:
        """The configured provider is tried before the first one with a key."""
        self.assertEqual(self.successResultOf(self.speak(self.make(provider="elevenlabs"), "Hi")[0]), "elevenlabs")
        self.assertEqual(len(self.openai.requests), 0)

    def test_configured_without_key_skipped(self) -> None:
        """A configured provider without a key is skipped, and the fallback is logged as a warning."""
        d, _ = self.speak(self.make(provider="openai", openai_key=None), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        (event,) = self.fallback_events()
        self.assertEqual(
            (event["from_provider"], event["to_provider"], event["attempts"]),
            ("openai", "elevenlabs", "openai: no API key"),
        )
        self.assertEqual(event["log_level"].name, "warn")

    def test_edge_skipped(self) -> None:
        """A configured Edge provider is skipped for telephony and the next one used."""
        d, _ = self.speak(self.make(provider="edge"), "Hi")
        self.assertEqual(self.successResultOf(d), "openai")
        (event,) = self.fallback_events()
        self.assertEqual(event["attempts"], "edge: unsupported for telephony")

    def test_prefs_file_first(self) -> None:
        """The provider of the user preference file wins over the configured provider."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"tts": {"provider": "elevenlabs", "maxLength": 1500}}, f)
        d, _ = self.speak(self.make(provider="openai", prefs_path=path), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertEqual(len(self.openai.requests), 0)

    def test_bad_prefs_file_ignored(self) -> None:
        """A missing, invalid or unknown-provider preference file leaves the configured order."""
        invalid, unknown = self.mktemp(), self.mktemp()
        with open(invalid, "w") as f:
            f.write("{not json")
        with open(unknown, "w") as f:
            json.dump({"tts": {"provider": "typecast"}}, f)
        for path in (invalid, unknown, self.mktemp()):
            d, _ = self.speak(self.make(provider="elevenlabs", prefs_path=path), "Hi")
            self.assertEqual(self.successResultOf(d), "elevenlabs")

    def test_merged_messages_tts(self) -> None:
        """The TTS built from a whole OpenClaw file sees messages.tts deep-merged with the plugin tts."""
        cfg = parse_config(
            {
                "messages": {
                    "tts": {
                        "provider": "openai",
                        "openai": {
                            "apiKey": OPENAI_KEY,
                            "model": "tts-1",
                            "voice": "alloy",
                            "baseUrl": "http://fake/openai/v1",
                        },
                    }
                },
                "plugins": {
                    "entries": {
                        "voice-call": {"config": {"provider": "mock", "tts": {"openai": {"voice": "nova"}}}}
                    }
                },
            },
            {},
        )
        d, _ = self.speak(build_tts(http=self.stub, clock=self.clock, tts=cfg.tts), "Hi")
        self.assertEqual(self.successResultOf(d), "openai")
        (request,) = self.openai.requests
        self.assertEqual((request.json["model"], request.json["voice"]), ("tts-1", "nova"))
        self.assertEqual(request.header("authorization"), f"Bearer {OPENAI_KEY}")


class FailureTests(_Stubbed, SynchronousTestCase):
    def test_error_before_audio_falls_back(self) -> None:
        """An OpenAI 500 before any audio falls back to ElevenLabs, logging the chain."""
        self.openai.fail_next(500)
        d, chunks = self.speak(self.make(), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertEqual({c.encoding for c in chunks}, {"ulaw"})
        (event,) = self.fallback_events()
        self.assertEqual(event["attempts"], "openai: 500 Fake failure")

    def test_all_fail_text(self) -> None:
        """When every provider fails, the error joins each provider's reason with "; "."""
        tts = build_tts(http=self.stub, clock=self.clock, tts=tts_config("http://fake", openai_key="sk-wrong-key-000000", eleven_key=None))
        d, _ = self.speak(tts, "Hi")
        self.assertEqual(
            self.error_text(d),
            "TTS conversion failed: openai: 401 Incorrect API key provided: sk-************0000. "
            "You can find your API key at https://platform.openai.com/account/api-keys.; "
            "elevenlabs: no API key" + TAIL,
        )

    def test_no_keys_text(self) -> None:
        """With no key at all, Edge is primary and every provider is reported."""
        d, _ = self.speak(self.make(openai_key=None, eleven_key=None), "Hi")
        self.assertEqual(
            self.error_text(d),
            "TTS conversion failed: edge: unsupported for telephony; openai: no API key; "
            "elevenlabs: no API key",
        )
        self.assertEqual(len(self.openai.requests) + len(self.eleven.requests), 0)

    def test_elevenlabs_error_text(self) -> None:
        """An ElevenLabs error reports its status and the detail message."""
        tts = build_tts(http=self.stub, clock=self.clock, tts=tts_config("http://fake", openai_key=None, eleven_key="el-bad", provider="elevenlabs"))
        d, _ = self.speak(tts, "Hi")
        self.assertEqual(
            self.error_text(d),
            "TTS conversion failed: elevenlabs: 401 Invalid API key; openai: no API key" + TAIL,
        )

    def test_error_body_sanitised(self) -> None:
        """Error excerpts lose control characters and the API key, and are capped."""
        body = b"bad \x1b[31mthing\r\n key " + OPENAI_KEY.encode() + b" " + b"x" * 2000
        self.openai.fail_next(502, body)
        d, _ = self.speak(self.make(eleven_key=None), "Hi")
        text = self.error_text(d)
        self.assertNotIn(OPENAI_KEY, text)
        self.assertTrue(text.startswith("TTS conversion failed: openai: 502 bad [31mthing key *** xxx"), text)
        self.assertTrue(all(c.isprintable() for c in text))
        self.assertLess(len(text), 400)

    def test_empty_audio_falls_back(self) -> None:
        """A 2xx answer without audio counts as a failure before audio."""
        self.openai.fail_next(200, b"")
        d, _ = self.speak(self.make(), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertEqual(self.fallback_events()[0]["attempts"], "openai: no audio")

    def test_mid_stream_failure_no_fallback(self) -> None:
        """A connection lost after audio was delivered fails the synthesis without fallback."""
        self.openai.drop_next(after_bytes=1920)
        d, chunks = self.speak(self.make(), "Hello there")
        self.assertEqual(
            self.error_text(d),
            "TTS conversion failed: openai: connection lost after 1920 bytes of audio",
        )
        self.assertEqual(sum(len(c.data) for c in chunks), 1920)
        self.assertEqual(len(self.eleven.requests), 0)

    def test_listener_error_aborts(self) -> None:
        """An exception from the listener fails the synthesis, aborts the request, no fallback."""

        def explode(chunk: AudioChunk) -> None:
            raise ValueError("queue gone")

        d, _ = self.speak(self.make(), "Hello there", on_audio=explode)
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "queue gone")
        self.assertEqual((self.openai.disconnects, self.openai.open_requests), (1, 0))
        self.assertEqual(len(self.eleven.requests), 0)

    def test_text_too_long(self) -> None:
        """Text longer than maxTextLength is refused with the SPEC text and no request."""
        d = self.make(max_text_length=10).synthesize("x" * 11, lambda c: None)
        self.assertEqual(self.error_text(d), "Text too long (11 chars, max 10)")
        self.assertEqual(len(self.openai.requests), 0)

    def test_text_at_limit(self) -> None:
        """Text exactly maxTextLength long is spoken."""
        d, _ = self.speak(self.make(max_text_length=10), "x" * 10)
        self.assertEqual(self.successResultOf(d), "openai")

    def test_empty_text(self) -> None:
        """Empty or blank text is refused without a request."""
        for text in ("", "  \n"):
            d = self.make().synthesize(text, lambda c: None)
            self.assertEqual(self.error_text(d), "TTS conversion failed: no text to speak")
        self.assertEqual(len(self.openai.requests), 0)


class TimeLimitTests(_Stubbed, SynchronousTestCase):
    def test_hanging_provider_times_out(self) -> None:
        """A provider that never answers fails after timeoutMs and its connection is closed."""
        self.openai.hang_next()
        tts = self.make(eleven_key=None, timeout_ms=1000)
        chunks: list[AudioChunk] = []
        d = tts.synthesize("Hi", chunks.append)
        self.stub.flush()
        self.clock.advance(0.999)
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.openai.open_requests, 1)
        self.clock.advance(0.001)
        self.stub.flush()
        self.assertEqual(
            self.error_text(d),
            "TTS conversion failed: openai: request timed out after 1000ms; elevenlabs: no API key" + TAIL,
        )
        self.assertEqual((self.openai.open_requests, self.openai.disconnects), (0, 1))

    def test_timeout_before_audio_falls_back(self) -> None:
        """A timed-out provider that sent no audio falls back to the next one."""
        self.openai.hang_next(after_bytes=0)  # headers, then nothing
        d, _ = self.speak(self.make(timeout_ms=1000), "Hi")
        self.assertEqual(self.successResultOf(d), "elevenlabs")
        self.assertEqual(self.fallback_events()[0]["attempts"], "openai: request timed out after 1000ms")
        self.assertEqual(self.openai.disconnects, 1)

    def test_timeout_after_audio_fails(self) -> None:
        """A provider that stalls after sending audio fails the synthesis at the time limit."""
        self.openai.hang_next(after_bytes=960)
        d, chunks = self.speak(self.make(timeout_ms=1000), "Hello there")
        self.assertEqual(
            self.error_text(d), "TTS conversion failed: openai: request timed out after 1000ms"
        )
        self.assertEqual(sum(len(c.data) for c in chunks), 960)
        self.assertEqual((len(self.eleven.requests), self.openai.disconnects), (0, 1))

    def test_limit_covers_whole_body(self) -> None:
        """The time limit covers the streamed body, not only the response headers."""
        self.openai.interval = 0.1  # 15 chunks: 1.4 s of streaming
        d, chunks = self.speak(self.make(eleven_key=None, timeout_ms=1000), "Hello")
        self.assertIn("openai: request timed out after 1000ms", self.error_text(d))
        self.assertLess(sum(len(c.data) for c in chunks), len(self.openai.audio_for("Hello")))

    def test_cancel_aborts_request(self) -> None:
        """Cancelling the synthesis aborts the pending HTTP request."""
        self.openai.hang_next()
        d = self.make().synthesize("Hi", lambda c: None)
        self.stub.flush()
        self.assertEqual(self.openai.open_requests, 1)
        d.cancel()
        self.stub.flush()
        self.failureResultOf(d, CancelledError)
        self.assertEqual((self.openai.open_requests, self.openai.disconnects), (0, 1))
        self.clock.advance(60)  # no timer left behind that could fire
        self.assertEqual(len(self.eleven.requests), 0)

    def test_cancel_mid_stream(self) -> None:
        """Cancelling while audio streams closes the connection and delivers nothing more."""
        self.openai.interval = 0.02
        chunks: list[AudioChunk] = []
        d = self.make().synthesize("Hello there", chunks.append)
        self.stub.flush()
        self.clock.advance(0.02)
        self.stub.flush()
        delivered = len(chunks)
        self.assertGreater(delivered, 0)
        d.cancel()
        self.drive(Deferred(), seconds=1.0)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(chunks), delivered)
        self.assertEqual(self.openai.disconnects, 1)


class FakeSpeechTests(_Stubbed, SynchronousTestCase):
    def post(self, url: str, body, headers: dict) -> tuple[int, object]:
        d = self.stub.request("POST", url, json=body, headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        body = response.content()
        self.drive(body)
        content = self.successResultOf(body)
        return response.code, content

    def test_openai_auth(self) -> None:
        """The fake OpenAI answers a missing or wrong Bearer key with OpenAI's 401 error JSON."""
        body = {"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "pcm"}
        url = "http://fake/openai/v1/audio/speech"
        code, content = self.post(url, body, {})
        self.assertEqual(code, 401)
        self.assertEqual(json.loads(content)["error"]["type"], "invalid_request_error")
        code, content = self.post(url, body, {"Authorization": "Bearer sk-nope-12345678"})
        error = json.loads(content)["error"]
        self.assertEqual((code, error["code"]), (401, "invalid_api_key"))

    def test_openai_validation(self) -> None:
        """The fake OpenAI requires model, input and voice, and only produces pcm."""
        url = "http://fake/openai/v1/audio/speech"
        auth = {"Authorization": f"Bearer {OPENAI_KEY}"}
        code, content = self.post(url, {"model": "tts-1", "input": "x", "response_format": "pcm"}, auth)
        self.assertEqual((code, json.loads(content)["error"]["param"]), (400, "voice"))
        code, _ = self.post(url, {"model": "tts-1", "input": "x", "voice": "alloy"}, auth)
        self.assertEqual(code, 400)
        code, content = self.post(url, {"model": "tts-1", "input": "xy", "voice": "alloy", "response_format": "pcm"}, auth)
        self.assertEqual((code, content), (200, tone(0.12, 24000, "pcm16")))

    def test_elevenlabs_validation(self) -> None:
        """The fake ElevenLabs answers 401 for a bad key and 422 for an unsupported format."""
        url = "http://fake/elevenlabs/v1/text-to-speech/v1d/stream"
        code, content = self.post(url + "?output_format=ulaw_8000", {"text": "x"}, {"xi-api-key": "nope"})
        self.assertEqual((code, json.loads(content)["detail"]["status"]), (401, "invalid_api_key"))
        code, _ = self.post(url + "?output_format=mp3_44100_128", {"text": "x"}, {"xi-api-key": ELEVEN_KEY})
        self.assertEqual(code, 422)
        code, _ = self.post(url + "?output_format=ulaw_8000", {}, {"xi-api-key": ELEVEN_KEY})
        self.assertEqual(code, 422)
        code, content = self.post(url + "?output_format=pcm_16000", {"text": "ab"}, {"xi-api-key": ELEVEN_KEY})
        self.assertEqual((code, len(content)), (200, 2 * 16000 * 0.12))

    def test_tone_length_capped(self) -> None:
        """The fake audio lasts 60 ms per character, capped at max_seconds."""
        self.assertEqual(len(self.openai.audio_for("x" * 10)), 48000 * 0.6)
        self.assertEqual(len(self.eleven.audio_for("x" * 4096)), 8000 * 30)


class StreamingLoopbackTests(TestCase):
    """The real HTTP stack on loopback: streaming, time limits and aborts as they really happen."""

    timeout = 20

    async def setUp(self) -> None:
        self.openai = FakeOpenAISpeech(reactor, OPENAI_KEY, chunk_bytes=4800, interval=0.05)
        self.eleven = FakeElevenLabs(reactor, ELEVEN_KEY, chunk_bytes=800, interval=0.05)
        site = Site(fakes_root(self.openai, self.eleven))
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.openai.close_all)
        self.addCleanup(self.eleven.close_all)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def make(self, **kwargs) -> TelephonyTts:
        return build_tts(http=self.http, clock=reactor, tts=tts_config(self.base, **kwargs))

    async def test_chunks_arrive_incrementally(self) -> None:
        """The first chunk reaches the listener before the fake has written its last chunk."""
        total = len(self.openai.audio_for("Hello there"))  # 0.66 s: 7 chunks, 50 ms apart
        sent_at_first: list[int] = []
        chunks: list[AudioChunk] = []

        def on_audio(chunk: AudioChunk) -> None:
            if not chunks:
                sent_at_first.append(self.openai.bytes_sent)
            chunks.append(chunk)

        self.assertEqual(await self.make().synthesize("Hello there", on_audio), "openai")
        self.assertLessEqual(sent_at_first[0], 4800)
        self.assertLess(sent_at_first[0], total)
        self.assertGreaterEqual(len(chunks), 7)
        self.assertEqual(b"".join(c.data for c in chunks), self.openai.audio_for("Hello there"))

    async def test_fallback_on_loopback(self) -> None:
        """An OpenAI error before audio falls back to ElevenLabs over real HTTP."""
        self.openai.fail_next(503)
        chunks: list[AudioChunk] = []
        self.assertEqual(await self.make().synthesize("Hi", chunks.append), "elevenlabs")
        self.assertEqual(b"".join(c.data for c in chunks), self.eleven.audio_for("Hi"))

    async def test_timeout_closes_connection(self) -> None:
        """A hanging provider fails with a TtsError naming the time limit and is disconnected."""
        self.openai.hang_next()
        with self.assertRaises(TtsError) as caught:
            await self.make(eleven_key=None, timeout_ms=300).synthesize("Hi", lambda c: None)
        self.assertIn("openai: request timed out after 300ms", str(caught.exception))
        await eventually(lambda: self.openai.disconnects == 1, 5, "the provider to see its connection closed")
        self.assertEqual(self.openai.open_requests, 0)

    async def test_cancel_closes_connection(self) -> None:
        """Cancelling mid-stream closes the HTTP connection before the audio is complete."""
        chunks: list[AudioChunk] = []
        d = self.make().synthesize("Hello there", chunks.append)
        await eventually(lambda: chunks, 5, "the first audio chunk")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await eventually(lambda: self.openai.disconnects == 1, 5, "the provider to see its connection closed")
        self.assertLess(self.openai.bytes_sent, len(self.openai.audio_for("Hello there")))
        self.assertEqual(self.openai.completed, 0)
