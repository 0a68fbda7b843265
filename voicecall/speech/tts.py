# -*- test-case-name: tests.test_tts -*-
"""
Text-to-speech for calls (SPEC §12.2): streamed synthesis through OpenAI or ElevenLabs.

`TelephonyTts.synthesize` hands each piece of audio to a listener the moment it arrives from
the provider's HTTP response body, as an `AudioChunk` carrying its format; it never waits for
the whole body. OpenAI answers raw 24 kHz 16-bit PCM (``response_format: "pcm"``), ElevenLabs
answers 8 kHz mu-law (``/stream?output_format=ulaw_8000``, which needs no conversion at all).
Playback (media/) converts and paces them with audio.py; this module never imports media/.

Provider order: the ``tts.provider`` of the user preference file (``tts.prefsPath``, when set),
then the configured ``tts.provider``, then the first with an API key (OpenAI, then ElevenLabs),
else Edge; the rest of OpenAI, ElevenLabs, Edge follow in that order, as upstream's
``resolveTtsProviderOrder``. Edge is never used for calls (``edge: unsupported for telephony``)
and providers without a key are skipped (``<provider>: no API key``). The next provider is tried
only while no audio has reached the listener: once it has, a failure ends the synthesis. Every
attempt (request, headers and whole body) is bounded by ``tts.timeoutMs`` on the injected clock.

The preference file is read once, when `TelephonyTts` is built: it is a tiny local JSON file
(``{"tts": {"provider": "openai"}}``), read with a size cap; changes need a new instance.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable
from urllib.parse import quote

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from voicecall.infra.audio import AudioChunk

__all__ = ["ElevenLabsSpeech", "OpenAISpeech", "TtsError", "TelephonyTts"]

#: Every provider, in upstream's fallback order.
PROVIDERS = ("openai", "elevenlabs", "edge")
#: How much of an error body is read, and how much of it goes into an error message.
MAX_ERROR_BODY_BYTES = 16 * 1024
MAX_ERROR_EXCERPT = 300
#: The largest preference file read.
MAX_PREFS_BYTES = 64 * 1024

_OPENAI_FORMAT = ("pcm16", 24000)
_ELEVENLABS_FORMAT = ("ulaw", 8000)


@frozen(kw_only=True)
class OpenAISpeech:
    """What an OpenAI ``/audio/speech`` request is made of (``tts.openai.*``)."""

    api_key: str | None = field(repr=False)
    base_url: str
    model: str
    voice: str
    speed: float | None
    instructions: str | None


@frozen(kw_only=True)
class ElevenLabsSpeech:
    """What an ElevenLabs streaming request is made of (``tts.elevenlabs.*``, its voice settings flat)."""

    api_key: str | None = field(repr=False)
    base_url: str
    voice_id: str
    model_id: str
    seed: int | None
    apply_text_normalization: str | None
    language_code: str | None
    stability: float
    similarity_boost: float
    style: float
    use_speaker_boost: bool
    speed: float


class TtsError(Exception):
    """Synthesis failed; ``str()`` is the SPEC text (``TTS conversion failed: ...``)."""


class _ProviderFailed(Exception):
    """One provider's attempt failed; ``audio_sent`` says whether the listener got audio."""

    def __init__(self, message: str, audio_sent: bool) -> None:
        super().__init__(message)
        self.message = message
        self.audio_sent = audio_sent


def _excerpt(body: bytes, secret: str) -> str:
    """A short, printable, secret-free summary of an error body (its JSON message if any)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error, detail = data.get("error"), data.get("detail")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]  # OpenAI
        elif isinstance(detail, dict) and isinstance(detail.get("message"), str):
            text = detail["message"]  # ElevenLabs
        elif isinstance(detail, str):
            text = detail
    if secret:
        text = text.replace(secret, "***")
    clean = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return clean if len(clean) <= MAX_ERROR_EXCERPT else clean[:MAX_ERROR_EXCERPT] + "…"


def _read_prefs_provider(path: str | None) -> str | None:
    """``tts.provider`` from the user preference file, or None (missing, unreadable, invalid)."""
    if not path:
        return None
    try:
        with open(os.path.expanduser(path), "rb") as f:
            raw = f.read(MAX_PREFS_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_PREFS_BYTES:
        TelephonyTts._log.warn("ignoring TTS preference file {path}: too large", path=path)
        return None
    try:
        tts = json.loads(raw.decode("utf-8")).get("tts")
        provider = tts.get("provider") if isinstance(tts, dict) else None
    except (ValueError, AttributeError):
        TelephonyTts._log.warn("ignoring TTS preference file {path}: not a JSON object", path=path)
        return None
    return provider if provider in PROVIDERS else None


class _Body(Protocol):
    """Hands every piece of a response body to its attempt as it arrives."""

    def __init__(self, attempt: _Attempt) -> None:
        self._attempt = attempt

    def connectionMade(self) -> None:
        self._attempt.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._attempt.body_data(data)

    def connectionLost(self, reason: Failure) -> None:
        self._attempt.body_done(reason)


@define(eq=False, repr=False)
class _Attempt:
    """
    One provider's request: streams a 2xx body to the listener, reads a bounded error body
    otherwise. `done` fires with None after a complete body with audio, or fails with
    `_ProviderFailed` (or the listener's own exception); cancelling it aborts the request.
    """

    _provider: str
    _secret: str = field(repr=False)
    _encoding: str
    _rate: int
    _on_audio: Callable[[AudioChunk], None]
    _timeout: float
    done: Deferred = field(init=False)
    delivered: int = field(init=False, default=0)
    _request: Deferred | None = field(init=False, default=None)
    _transport: Any = field(init=False, default=None)
    _timer: IDelayedCall | None = field(init=False, default=None)
    _status: int | None = field(init=False, default=None)  # set for a non-2xx answer
    _error_body: bytearray = field(init=False, factory=bytearray)
    _over: bool = field(init=False, default=False)  # settled or aborted: ignore what follows

    def __attrs_post_init__(self) -> None:
        self.done = Deferred(lambda _: self._abort())

    def start(self, clock: IReactorTime, request: Deferred) -> None:
        self._timer = clock.callLater(self._timeout, self._time_out)
        self._request = request
        request.addCallbacks(self._got_response, self._request_failed)

    def _fail(self, message: str) -> None:
        self._finish()
        self._over = True
        self.done.errback(_ProviderFailed(f"{self._provider}: {message}", self.delivered > 0))

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _abort(self) -> None:
        """Stop the request, whatever phase it is in (cancellation or time limit)."""
        self._finish()
        self._over = True
        request, self._request = self._request, None
        if request is not None:
            request.cancel()  # also when it waits on an inner Deferred (treq chains them)
        elif self._transport is not None:
            self._transport.loseConnection()

    def _time_out(self) -> None:
        self._timer = None
        if self._over:
            return
        self._abort()
        self._fail(f"request timed out after {round(self._timeout * 1000)}ms")

    def _request_failed(self, failure: Failure) -> None:
        self._request = None
        if self._over:
            return  # we cancelled it
        if failure.check(ConnectError, DNSLookupError):
            self._fail(f"cannot connect ({failure.type.__name__})")
        else:
            self._fail(f"request failed ({failure.type.__name__})")

    def _got_response(self, response: Any) -> None:
        self._request = None
        if self._over:
            return
        if not 200 <= response.code < 300:
            self._status = response.code
        response.deliverBody(_Body(self))

    def body_started(self, transport: Any) -> None:
        self._transport = transport

    def body_data(self, data: bytes) -> None:
        if self._over:
            return
        if self._status is not None:
            room = MAX_ERROR_BODY_BYTES - len(self._error_body)
            self._error_body += data[:room]
            if len(data) >= room and self._transport is not None:
                self._transport.loseConnection()  # enough of an error page
            return
        self.delivered += len(data)
        try:
            self._on_audio(AudioChunk(data, self._encoding, self._rate))
        except Exception:
            failure = Failure()
            self._abort()
            self.done.errback(failure)

    def body_done(self, reason: Failure) -> None:
        self._transport = None
        if self._over:
            return
        complete = reason.check(ResponseDone, PotentialDataLoss) is not None
        if self._status is not None:
            if complete or self._error_body:
                excerpt = _excerpt(bytes(self._error_body), self._secret)
                self._fail(f"{self._status} {excerpt}".rstrip())
            else:
                self._fail(f"{self._status} (connection lost)")
        elif not complete:
            where = f"after {self.delivered} bytes of audio" if self.delivered else "before any audio"
            self._fail(f"connection lost {where}")
        elif not self.delivered:
            self._fail("no audio")
        else:
            self._finish()
            self._over = True
            self.done.callback(None)


@define(repr=False)
class TelephonyTts:
    """
    Streamed telephony synthesis with provider fallback (see the module docstring).

    `synthesize` calls ``on_audio`` with each `AudioChunk` as it arrives and fires with the
    name of the provider used. OpenAI chunks are ``("pcm16", 24000)`` and are passed on
    exactly as received, so a chunk may end in half a sample: the consumer's `PcmToUlaw`
    carries an odd trailing byte over to the next chunk. ElevenLabs chunks are
    ``("ulaw", 8000)``.
    """

    _http: Any  # treq.client.HTTPClient
    _clock: IReactorTime
    _openai: OpenAISpeech
    _elevenlabs: ElevenLabsSpeech
    #: The configured primary provider; None: the first with an API key.
    _provider: str | None
    #: The user preference file whose ``tts.provider`` comes first, if any.
    _prefs_path: str | None
    _max_text_length: int
    _timeout_ms: int
    _prefs_provider: str | None = field(init=False, default=None)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._prefs_provider = _read_prefs_provider(self._prefs_path)

    def available(self) -> bool:
        """True if some telephony provider can be used (it has an API key)."""
        return any(self._key(p) for p in PROVIDERS)

    def synthesize(self, text: str, on_audio: Callable[[AudioChunk], None], voice: str | None = None) -> Deferred[str]:
        """
        Speak ``text``; ``on_audio`` gets each chunk as the provider streams it. ``voice``: a
        call's own voice (an OpenAI voice name or an ElevenLabs voice id), used by the first
        provider tried only (a fallback speaks with its configured voice). Fires with the
        provider's name, or fails with `TtsError` (or with what ``on_audio`` raised, which
        ends the synthesis). Cancelling the result aborts the HTTP request.
        """
        limit = self._max_text_length
        if not text or not text.strip():
            return fail(TtsError("TTS conversion failed: no text to speak"))
        if len(text) > limit:
            return fail(TtsError(f"Text too long ({len(text)} chars, max {limit})"))
        return Deferred.fromCoroutine(self._synthesize(text, on_audio, voice))

    def provider_order(self) -> list[str]:
        """The providers in the order they will be tried (SPEC §12.2)."""
        primary = (
            self._prefs_provider
            or self._provider
            or next((p for p in ("openai", "elevenlabs") if self._key(p)), "edge")
        )
        return [primary] + [p for p in PROVIDERS if p != primary]

    def _key(self, provider: str) -> str | None:
        if provider == "openai":
            return self._openai.api_key or None
        if provider == "elevenlabs":
            return self._elevenlabs.api_key or None
        return None

    async def _synthesize(self, text: str, on_audio: Callable[[AudioChunk], None], voice: str | None = None) -> str:
        order = self.provider_order()
        errors: list[str] = []
        for provider in order:
            if provider == "edge":
                errors.append("edge: unsupported for telephony")
                continue
            key = self._key(provider)
            if key is None:
                errors.append(f"{provider}: no API key")
                continue
            try:
                await self._attempt(provider, key, text, on_audio, voice if provider == order[0] else None)
            except _ProviderFailed as e:
                errors.append(e.message)
                if e.audio_sent:
                    raise TtsError("TTS conversion failed: " + "; ".join(errors)) from None
                continue
            if provider != order[0]:
                self._log.warn(
                    "telephony TTS fell back from {from_provider} to {to_provider}: {attempts}",
                    from_provider=order[0],
                    to_provider=provider,
                    attempts="; ".join(errors),
                )
            return provider
        raise TtsError("TTS conversion failed: " + ("; ".join(errors) or "no providers available"))

    def _attempt(
        self, provider: str, key: str, text: str, on_audio: Callable[[AudioChunk], None], voice: str | None = None
    ) -> Deferred[None]:
        if provider == "openai":
            url, headers, body = self._openai_request(key, text, voice)
            encoding, rate = _OPENAI_FORMAT
        else:
            url, headers, body = self._elevenlabs_request(key, text, voice)
            encoding, rate = _ELEVENLABS_FORMAT
        attempt = _Attempt(provider, key, encoding, rate, on_audio, self._timeout_ms / 1000)
        try:
            request = self._http.request("POST", url, headers=headers, json=body, unbuffered=True)
        except Exception as e:  # e.g. a key that is not a valid header value
            return fail(_ProviderFailed(f"{provider}: request failed ({type(e).__name__})", False))
        attempt.start(self._clock, request)
        return attempt.done

    def _openai_request(self, key: str, text: str, voice: str | None = None) -> tuple[str, dict, dict]:
        cfg = self._openai
        body: dict[str, Any] = {
            "model": cfg.model,
            "input": text,
            "voice": voice or cfg.voice,
            "response_format": "pcm",
        }
        if cfg.speed is not None:
            body["speed"] = cfg.speed
        if cfg.instructions and cfg.model.startswith("gpt-4o-mini-tts"):
            body["instructions"] = cfg.instructions
        headers = {"Authorization": [f"Bearer {key}"]}
        return cfg.base_url.rstrip("/") + "/audio/speech", headers, body

    def _elevenlabs_request(self, key: str, text: str, voice: str | None = None) -> tuple[str, dict, dict]:
        cfg = self._elevenlabs
        body: dict[str, Any] = {"text": text, "model_id": cfg.model_id}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if cfg.apply_text_normalization is not None:
            body["apply_text_normalization"] = cfg.apply_text_normalization
        if cfg.language_code is not None:
            body["language_code"] = cfg.language_code
        body["voice_settings"] = {
            "stability": cfg.stability,
            "similarity_boost": cfg.similarity_boost,
            "style": cfg.style,
            "use_speaker_boost": cfg.use_speaker_boost,
            "speed": cfg.speed,
        }
        path = f"/v1/text-to-speech/{quote(voice or cfg.voice_id, safe='')}/stream?output_format=ulaw_8000"
        headers = {"xi-api-key": [key]}
        return cfg.base_url.rstrip("/") + path, headers, body
