# -*- test-case-name: tests.test_tts -*-
"""
Fake speech APIs (PROVIDERS.md §5.1, §5.2) as twisted.web resources, for tests and benchmarks:

- `FakeOpenAISpeech`: ``POST /v1/audio/speech`` (serve `resource()` and use ``<root>/v1`` as
  ``tts.openai.baseUrl``), Bearer auth, OpenAI's error JSON, raw 24 kHz 16-bit PCM
  (``response_format: "pcm"``; the fake produces no other format and answers 400).
- `FakeElevenLabs`: ``POST /v1/text-to-speech/{voice_id}[/stream]?output_format=...``
  (``<root>`` is ``tts.elevenlabs.baseUrl``), ``xi-api-key`` auth, ``ulaw_8000`` or
  ``pcm_{8000,16000,22050,24000}``; any other (or no) format is a 422.

The audio is a deterministic 400 Hz tone lasting `seconds_per_char` per character of text
(capped at `max_seconds`), streamed with chunked transfer in `chunk_bytes` pieces: the first
after `first_byte_delay` seconds, then one every `interval` seconds, each written as soon as it
is produced, so time-to-first-byte and pacing are real. `audio_for` gives the exact bytes a
request will get. Every request is recorded; `fail_next`, `hang_next` and `drop_next` inject
failures. Time comes from the injected reactor (a `Clock` works, with `StubTreq`).

This module imports nothing of the daemon.
"""
from __future__ import annotations

import hmac
import json
from collections import deque
from typing import Any, Mapping
from urllib.parse import parse_qsl

import numpy as np
from attrs import define, field, frozen
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from voicecall.testing.fakerest import ApiResource

__all__ = ["FakeElevenLabs", "FakeOpenAISpeech", "SpeechRequest"]

MAX_REQUEST_BYTES = 64 * 1024
TONE_HZ = 400
AMPLITUDE = 8000


@frozen
class SpeechRequest:
    """One request a fake received; `json` is the decoded body (None if it was not JSON)."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]  # lower-case names
    json: Any

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive)."""
        return next((v for k, v in self.headers if k == name.lower()), None)

    def arg(self, name: str) -> str | None:
        """The first value of query parameter `name`."""
        return next((v for k, v in self.query if k == name), None)


@define
class _Fault:
    kind: str  # "fail": answer status/body; "hang": stall (after after_bytes, or before headers)
    count: int  # "drop": close the connection after after_bytes of audio
    status: int = 500
    body: bytes = b""
    after_bytes: int | None = None


def _ulaw(samples: np.ndarray) -> bytes:
    """G.711 mu-law, the classic sign-magnitude encoder (bias 132, clip 32635)."""
    x = samples.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    biased = np.minimum(np.abs(x), 32635) + 132
    exponent = np.floor(np.log2(biased)).astype(np.int32) - 7
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def tone(seconds: float, rate: int, encoding: str) -> bytes:
    """`seconds` of the fakes' 400 Hz tone at `rate`: ``"pcm16"`` (s16le) or ``"ulaw"``."""
    n = int(round(seconds * rate))
    samples = np.round(AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / rate))
    samples = samples.astype("<i2")
    return _ulaw(samples) if encoding == "ulaw" else samples.tobytes()


@define
class _Stream:
    """One audio response being written."""

    request: Any
    audio: bytes
    stop_at: int | None  # stall or drop once this many bytes were written
    drop: bool
    sent: int = 0
    call: Any = None
    closed: bool = False


@define
class _SpeechFake:
    _reactor: Any  # IReactorTime
    _api_key: str = field(repr=False)
    chunk_bytes: int = 960
    interval: float = 0.0
    first_byte_delay: float = 0.0
    seconds_per_char: float = 0.06
    max_seconds: float = 30.0
    requests: deque = field(factory=lambda: deque(maxlen=1000))
    #: Audio bytes written, over all requests.
    bytes_sent: int = 0
    #: Responses finished normally, and requests whose connection closed before that.
    completed: int = 0
    disconnects: int = 0
    _faults: deque = field(factory=deque)
    _open: set = field(factory=set)

    # -- public API ---------------------------------------------------------------------

    def resource(self) -> Resource:
        """The root resource to serve (see the module docstring for the base URL)."""
        raise NotImplementedError

    def audio_for(self, text: str, output_format: str | None = None) -> bytes:
        """The exact audio a successful request for `text` is answered with."""
        raise NotImplementedError

    def fail_next(self, status: int = 500, body: Mapping | bytes | None = None, *, count: int = 1) -> None:
        """The next `count` requests get `status` and `body` (JSON if a mapping) unprocessed."""
        if body is None:
            body = self._error(status, "Fake failure")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        self._faults.append(_Fault("fail", count, status=status, body=raw))

    def hang_next(self, *, count: int = 1, after_bytes: int | None = None) -> None:
        """
        The next `count` requests are never answered (`after_bytes` None), or stall for good
        after the headers and `after_bytes` bytes of audio.
        """
        self._faults.append(_Fault("hang", count, after_bytes=after_bytes))

    def drop_next(self, after_bytes: int, *, count: int = 1) -> None:
        """The next `count` audio responses lose their connection after `after_bytes` bytes."""
        self._faults.append(_Fault("drop", count, after_bytes=after_bytes))

    @property
    def open_requests(self) -> int:
        """Requests still connected and not finished (hanging or streaming)."""
        return len(self._open)

    def close_all(self) -> None:
        """Drop every open connection (for test cleanup)."""
        for request in list(self._open):
            request.channel.transport.abortConnection()

    # -- subclass hooks -----------------------------------------------------------------

    def _error(self, status: int, message: str) -> dict:
        raise NotImplementedError

    def _check(self, request: Any, path: str, body: Any, query: Mapping[str, str]) -> tuple[int, dict] | bytes:
        """An error (status, JSON) for this request, or the audio to answer with."""
        raise NotImplementedError

    _content_type = b"application/octet-stream"

    # -- request handling ---------------------------------------------------------------

    def _next_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self._faults.popleft()
        return fault

    def _handle(self, request: Any) -> bytes | int:
        path = request.path.decode("utf-8", "replace")
        query = tuple(parse_qsl(request.uri.partition(b"?")[2].decode("utf-8", "replace")))
        raw = request.content.read(MAX_REQUEST_BYTES + 1)
        try:
            body = json.loads(raw) if len(raw) <= MAX_REQUEST_BYTES else None
        except ValueError:
            body = None
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1"))
            for k, vs in request.requestHeaders.getAllRawHeaders()
            for v in vs
        )
        self.requests.append(SpeechRequest(request.method.decode("ascii", "replace"), path, query, headers, body))
        if len(raw) > MAX_REQUEST_BYTES:
            return self._reply(request, 413, self._error(413, "Request body too large"))
        fault = self._next_fault()
        if fault is not None and fault.kind == "fail":
            request.setResponseCode(fault.status)
            request.setHeader(b"content-type", b"application/json")
            return fault.body
        if fault is not None and fault.kind == "hang" and fault.after_bytes is None:
            self._track(request)
            return NOT_DONE_YET
        if request.method != b"POST":
            return self._reply(request, 405, self._error(405, "Method Not Allowed"))
        checked = self._check(request, path, body, dict(query))
        if isinstance(checked, tuple):
            return self._reply(request, *checked)
        stop_at = fault.after_bytes if fault is not None else None
        self._start_stream(_Stream(request, checked, stop_at, drop=fault is not None and fault.kind == "drop"))
        return NOT_DONE_YET

    def _reply(self, request: Any, status: int, body: Mapping) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8")

    def _track(self, request: Any, stream: _Stream | None = None) -> None:
        self._open.add(request)

        def finished(result: Any, failed: bool) -> None:
            self._open.discard(request)
            if stream is not None:
                stream.closed = True
                if stream.call is not None and stream.call.active():
                    stream.call.cancel()
            if failed:
                self.disconnects += 1
            else:
                self.completed += 1

        request.notifyFinish().addCallbacks(finished, finished, callbackArgs=(False,), errbackArgs=(True,))

    def _start_stream(self, stream: _Stream) -> None:
        request = stream.request
        request.setHeader(b"content-type", self._content_type)
        self._track(request, stream)
        if self.first_byte_delay > 0:
            request.write(b"")  # the headers now, the audio later
            stream.call = self._reactor.callLater(self.first_byte_delay, self._step, stream)
        else:
            self._step(stream)

    def _step(self, stream: _Stream) -> None:
        stream.call = None
        if stream.closed:
            return
        end = min(stream.sent + self.chunk_bytes, len(stream.audio))
        if stream.stop_at is not None:
            end = min(end, stream.stop_at)
        piece = stream.audio[stream.sent : end]
        stream.sent = end
        self.bytes_sent += len(piece)
        stream.request.write(piece)
        if stream.stop_at is not None and stream.sent >= stream.stop_at:
            if stream.drop:
                stream.request.channel.transport.abortConnection()
            return  # a stall: the connection stays open until the client gives up
        if stream.sent >= len(stream.audio):
            stream.closed = True
            stream.request.finish()
            return
        stream.call = self._reactor.callLater(self.interval, self._step, stream)

    def _duration(self, text: str) -> float:
        return min(len(text) * self.seconds_per_char, self.max_seconds)


def _bearer_ok(header: bytes | None, key: str) -> bool:
    if not header or not header.startswith(b"Bearer "):
        return False
    return hmac.compare_digest(header[7:], key.encode("utf-8"))


def _masked(key: str) -> str:
    return key[:3] + "*" * max(len(key) - 7, 4) + key[-4:] if len(key) >= 8 else "****"


_OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")


@define
class FakeOpenAISpeech(_SpeechFake):
    """The OpenAI speech endpoint (PROVIDERS.md §5.1); see the module docstring."""

    _content_type = b"audio/pcm"

    def resource(self) -> Resource:
        audio = Resource()
        audio.putChild(b"speech", ApiResource(self._handle))
        v1 = Resource()
        v1.putChild(b"audio", audio)
        root = Resource()
        root.putChild(b"v1", v1)
        return root

    def audio_for(self, text: str, output_format: str | None = None) -> bytes:
        return tone(self._duration(text), 24000, "pcm16")

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def _check(self, request: Any, path: str, body: Any, query: Mapping[str, str]) -> tuple[int, dict] | bytes:
        auth = request.getHeader(b"authorization")
        if not auth:
            return 401, self._error(401, "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if not _bearer_ok(auth, self._api_key):
            given = auth[7:].decode("latin-1") if auth.startswith(b"Bearer ") else ""
            return 401, self._error(401, f"Incorrect API key provided: {_masked(given)}. You can find your API key at https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        if not isinstance(body, dict):
            return 400, self._error(400, "We could not parse the JSON body of your request.")
        for name in ("model", "input", "voice"):
            if name not in body:
                return 400, self._error(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
            if not isinstance(body[name], str) or (name != "input" and not body[name]):
                return 400, self._error(400, f"Invalid type for '{name}'.", name, "invalid_type")
        if body["model"] not in _OPENAI_MODELS:
            return 400, self._error(400, f"Invalid model: {body['model'][:64]}", "model")
        if len(body["input"]) > 4096:
            return 400, self._error(400, "Invalid 'input': string too long. Expected a string with maximum length 4096.", "input", "string_above_max_length")
        if body.get("response_format", "mp3") != "pcm":
            return 400, self._error(400, "The fake only produces response_format 'pcm'.", "response_format")
        speed = body.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
            return 400, self._error(400, "Invalid 'speed': expected a number from 0.25 to 4.0.", "speed")
        if "instructions" in body and body["model"].startswith("tts-1"):
            return 400, self._error(400, "instructions are not supported for this model.", "instructions")
        return self.audio_for(body["input"])


_ELEVENLABS_FORMATS = {"ulaw_8000": (8000, "ulaw")} | {
    f"pcm_{rate}": (rate, "pcm16") for rate in (8000, 16000, 22050, 24000)
}
_UNIT_SETTINGS = ("stability", "similarity_boost", "style")


@define
class FakeElevenLabs(_SpeechFake):
    """The ElevenLabs text-to-speech endpoints (PROVIDERS.md §5.2); see the module docstring."""

    def resource(self) -> Resource:
        root = Resource()
        v1 = Resource()
        v1.putChild(b"text-to-speech", ApiResource(self._handle))
        root.putChild(b"v1", v1)
        return root

    def audio_for(self, text: str, output_format: str | None = "ulaw_8000") -> bytes:
        rate, encoding = _ELEVENLABS_FORMATS[output_format or "ulaw_8000"]
        return tone(self._duration(text), rate, encoding)

    def _error(self, status: int, message: str, kind: str = "fake_error") -> dict:
        return {"detail": {"status": kind, "message": message}}

    def _check(self, request: Any, path: str, body: Any, query: Mapping[str, str]) -> tuple[int, dict] | bytes:
        rest = [p.decode("utf-8", "replace") for p in request.postpath]  # voice_id[, "stream"]
        if len(rest) not in (1, 2) or not rest[0] or rest[1:] not in ([], ["stream"]):
            return 404, {"detail": "Not Found"}
        key = request.getHeader(b"xi-api-key")
        if key is None:
            return 401, self._error(401, "Neither authorization header nor xi-api-key received, please provide one.", "needs_authorization")
        if not hmac.compare_digest(key, self._api_key.encode("utf-8")):
            return 401, self._error(401, "Invalid API key", "invalid_api_key")
        output_format = query.get("output_format")
        if output_format not in _ELEVENLABS_FORMATS:
            return 422, self._error(422, f"The fake does not produce output_format {str(output_format)[:32]!r}.", "invalid_output_format")
        if not isinstance(body, dict):
            return 422, {"detail": [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}]}
        if not isinstance(body.get("text"), str) or not body["text"]:
            return 422, {"detail": [{"type": "missing", "loc": ["body", "text"], "msg": "Field required"}]}
        settings = body.get("voice_settings") or {}
        if not isinstance(settings, dict):
            return 422, {"detail": [{"type": "dict_type", "loc": ["body", "voice_settings"], "msg": "Input should be a valid dictionary"}]}
        for name in _UNIT_SETTINGS:
            value = settings.get(name, 0.5)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                return 422, {"detail": [{"type": "range", "loc": ["body", "voice_settings", name], "msg": "Input should be between 0 and 1"}]}
        speed = settings.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.5 <= speed <= 2.0:
            return 422, {"detail": [{"type": "range", "loc": ["body", "voice_settings", "speed"], "msg": "Input should be between 0.5 and 2"}]}
        return self.audio_for(body["text"], output_format)
