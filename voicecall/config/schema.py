# -*- test-case-name: tests.test_config -*-
"""
The configuration schema: the value checks, the per-section schemas and the reader that walks
raw JSON against them, collecting every problem (named by its full dotted path) and every legacy
warning; and `deep_merge_defined`, the TTS deep-merge of SPEC §2.3.
"""
from __future__ import annotations

import difflib
import re
import types
from typing import Any, Callable
from urllib.parse import urlsplit

from attrs import frozen

from voicecall.config.model import (  # noqa: F401  (re-exported)
    DEFAULT_STORE,
    MetricsConfig,
    OutboundConfig,
    PlivoConfig,
    ServeConfig,
    StreamingConfig,
    SttConfig,
    TailscaleConfig,
    TelnyxConfig,
    TtsConfig,
    TtsEdgeConfig,
    TtsElevenLabsConfig,
    TtsModelOverrides,
    TtsOpenAIConfig,
    TtsVoiceSettings,
    TunnelConfig,
    TwilioConfig,
    WebhookSecurityConfig,
)

#: Where the plugin config lives in an OpenClaw config file; every problem is named under it.
CONFIG_PATH = "plugins.entries.voice-call.config"

#: The message for a phone number that is not E.164.
E164_MESSAGE = "Expected E.164 format, e.g. +15550001234"


class _Undefined:
    """JavaScript's ``undefined``: a value that is not there (unlike ``None``, JSON ``null``)."""

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


#: Marks an absent value for `deep_merge_defined` (``None`` is JSON ``null``, a real value).
UNDEFINED: Any = _Undefined()

_PROTOTYPE_KEYS = frozenset({"__proto__", "prototype", "constructor"})


def deep_merge_defined(base: Any, override: Any) -> Any:
    """
    Merge ``override`` over ``base`` (SPEC §2.3): unless both are dicts the result is
    ``override``, or ``base`` when ``override`` is `UNDEFINED`; otherwise a copy of ``base``
    where each key of ``override`` is merged recursively, skipping `UNDEFINED` values and the
    keys ``__proto__``, ``prototype`` and ``constructor`` at every depth (also inside values
    that are copied in whole). Neither argument is modified.
    """
    if override is UNDEFINED:
        return base
    if not isinstance(override, dict):
        return override
    result = dict(base) if isinstance(base, dict) else {}
    for key, value in override.items():
        if key in _PROTOTYPE_KEYS or value is UNDEFINED:
            continue
        result[key] = deep_merge_defined(result.get(key, UNDEFINED), value)
    return result


# --- value checks: each returns the value (converted) or raises _Invalid ---------------------


class _Invalid(Exception):
    """A value failed its check; the message says what was expected (and maybe what was meant)."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


def suggest(word: Any, choices: Any) -> str | None:
    """The choice ``word`` was most likely meant to be (case-insensitive, difflib), or None."""
    if not isinstance(word, str):
        return None
    lowered = {c.lower(): c for c in choices if isinstance(c, str)}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


@frozen
class Issue:
    """
    One config problem. ``path`` is the full dotted key (under `CONFIG_PATH` for the plugin
    config), an environment variable, or for a file-level problem the file itself (``file_level``).
    ``value`` is what was received (`UNDEFINED` when nothing was, or when it must not be shown).
    ``problem`` is the SPEC-style text that `ConfigError.problems` lists.
    """

    path: str
    text: str
    value: Any = UNDEFINED
    suggestion: str | None = None
    sep: str = ": "
    file_level: bool = False

    @property
    def problem(self) -> str:
        return f"{self.path}{self.sep}{self.text}"


Check = Callable[[Any], Any]


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("expected a boolean")


def _integer(minimum: int, maximum: int | None = None) -> Check:
    if maximum is not None:
        expected = f"expected an integer between {minimum} and {maximum}"
    else:
        expected = f"expected an integer >= {minimum}"
        if minimum == 1:
            expected = "expected an integer > 0"

    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(expected)
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(expected)
        return value

    return check


def _port(value: Any) -> int:
    port = _integer(1)(value)
    if port > 65535:
        raise _Invalid("expected an integer between 1 and 65535")
    return port


def _number(minimum: float, maximum: float) -> Check:
    expected = f"expected a number between {minimum} and {maximum}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(expected)
        if not minimum <= value <= maximum:  # also rejects NaN
            raise _Invalid(expected)
        return float(value)

    return check


def _string(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise _Invalid("expected a non-empty string")


def _response_model(value: Any) -> str:
    """
    `openai/<model>` or a bare model name: the built-in responder speaks the OpenAI API only
    (speech/responder.py splits it the same way, at the first slash).
    """
    model = _string(value)
    provider, slash, name = model.partition("/")
    if slash and provider.lower() != "openai":
        raise _Invalid(
            f'provider "{provider}" is not supported: the built-in responder speaks the OpenAI API '
            '(use "openai/<model>", also for an OpenAI-compatible server at responseBaseUrl)'
        )
    if slash and not name.strip():
        raise _Invalid('expected a model name after "openai/"')
    return model


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid("expected a string")


def _path(value: Any) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise _Invalid('expected a path starting with "/"')


def _one_of(*choices: str) -> Check:
    expected = "expected one of " + ", ".join(f'"{c}"' for c in choices)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _Invalid(expected, suggest(value, choices))

    return check


_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def _e164(value: Any) -> str:
    if isinstance(value, str) and _E164.fullmatch(value):
        return value
    raise _Invalid(E164_MESSAGE)


def _url(label: str, *schemes: str) -> Check:
    expected = f"expected an absolute {label} URL"

    def check(value: Any) -> str:
        if not isinstance(value, str) or any(c.isspace() or not c.isprintable() for c in value):
            raise _Invalid(expected)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise _Invalid(expected) from None
        if parts.scheme not in schemes or not parts.hostname:
            raise _Invalid(expected)
        return value

    return check


_HTTP_URL = _url("http(s)", "http", "https")
_WS_URL = _url("ws(s)", "ws", "wss")


# --- schemas ---------------------------------------------------------------------------------


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


@frozen
class _Obj:
    """A strict object: known keys with their checks; builds ``cls`` (or a dict if None)."""

    cls: type | None
    checks: dict[str, Any]

    def build(self, kwargs: dict[str, Any]) -> Any:
        return kwargs if self.cls is None else self.cls(**kwargs)


@frozen
class _List:
    """An array whose items all pass ``check``; parsed to a tuple."""

    check: Any


@frozen
class _Map:
    """An object with free keys whose values all pass ``check``; parsed to a read-only mapping."""

    check: Any


def _keep(value: Any) -> Any:
    return value


_INT_POS = _integer(1)
_TIMEOUT = _integer(1000, 120000)
_UNIT = _number(0, 1)

_STREAM_OPENAI = {"apiKey": _string, "model": _string, "silenceDurationMs": _INT_POS,
                  "vadThreshold": _UNIT}  # fmt: skip
# legacy flat key -> (its replacement under ``streaming``, the snake name of that replacement)
_STREAM_LEGACY = {
    "sttProvider": ("provider", None),
    "openaiApiKey": ("providers.openai.apiKey", "api_key"),
    "sttModel": ("providers.openai.model", "model"),
    "silenceDurationMs": ("providers.openai.silenceDurationMs", "silence_duration_ms"),
    "vadThreshold": ("providers.openai.vadThreshold", "vad_threshold"),
}
_STREAM_PROVIDERS = _Obj(None, {"openai": _Obj(None, _STREAM_OPENAI)})

_OVERRIDE_FLAGS = ("enabled", "allowText", "allowProvider", "allowVoice", "allowModelId",
                   "allowVoiceSettings", "allowNormalization", "allowSeed")  # fmt: skip
_VOICE_SETTINGS = {"stability": _UNIT, "similarityBoost": _UNIT, "style": _UNIT,
                   "useSpeakerBoost": _boolean, "speed": _number(0.5, 2)}  # fmt: skip
_ELEVENLABS = {"apiKey": _string, "baseUrl": _HTTP_URL, "voiceId": _string, "modelId": _string,
               "seed": _integer(0, 4294967295),
               "applyTextNormalization": _one_of("auto", "on", "off"),
               "languageCode": _string,
               "voiceSettings": _Obj(TtsVoiceSettings, _VOICE_SETTINGS)}  # fmt: skip
_OPENAI_TTS = {"apiKey": _string, "model": _string, "voice": _string, "baseUrl": _HTTP_URL,
               "speed": _number(0.25, 4), "instructions": _text}  # fmt: skip
_EDGE = {"enabled": _boolean, "voice": _string, "lang": _string, "outputFormat": _string,
         "pitch": _string, "rate": _string, "volume": _string, "saveSubtitles": _boolean,
         "proxy": _string, "timeoutMs": _TIMEOUT}  # fmt: skip
_TTS = _Obj(TtsConfig, {
    "auto": _one_of("off", "always", "inbound", "tagged"),
    "enabled": _boolean,
    "mode": _one_of("final", "all"),
    "provider": _one_of("openai", "elevenlabs", "edge"),
    "summaryModel": _string,
    "modelOverrides": _Obj(TtsModelOverrides, dict.fromkeys(_OVERRIDE_FLAGS, _boolean)),
    "elevenlabs": _Obj(TtsElevenLabsConfig, _ELEVENLABS),
    "openai": _Obj(TtsOpenAIConfig, _OPENAI_TTS),
    "edge": _Obj(TtsEdgeConfig, _EDGE),
    "prefsPath": _string,
    "maxTextLength": _INT_POS,
    "timeoutMs": _TIMEOUT,
})  # fmt: skip

# The current OpenClaw layout, messages.tts.providers.<id>: the ids voicecall can use, the
# section each becomes, and the keys OpenClaw accepts there that calls do not use (calls need PCM).
_TTS_PROVIDERS = ("openai", "elevenlabs", "edge")
_TTS_PROVIDER_TARGETS = {"openai": "openai", "elevenlabs": "elevenlabs", "edge": "edge", "microsoft": "edge"}
_TTS_IGNORED_KEYS = {"openai": ("responseFormat",), "elevenlabs": ("outputFormat",), "edge": ()}
_TTS_PROVIDER_BLOCKS = {
    "openai": _Obj(None, {**_OPENAI_TTS, "responseFormat": _string}),
    "elevenlabs": _Obj(None, {**_ELEVENLABS, "outputFormat": _string}),
    "edge": _Obj(None, _EDGE),
}

# The flat (legacy) streaming shape; the current shape is flattened into it first.
_STREAMING = {"enabled": _boolean, "sttProvider": _one_of("openai-realtime"),
              "openaiApiKey": _string, "sttModel": _string, "silenceDurationMs": _INT_POS,
              "vadThreshold": _UNIT, "streamPath": _path, "preStartTimeoutMs": _INT_POS,
              "maxPendingConnections": _INT_POS, "maxPendingConnectionsPerIp": _INT_POS,
              "maxConnections": _INT_POS, "sttBaseUrl": _WS_URL}  # fmt: skip
_TUNNEL = {"provider": _one_of("none", "ngrok", "tailscale-serve", "tailscale-funnel"),
           "ngrokAuthToken": _string, "ngrokDomain": _string,
           "allowNgrokFreeTierLoopbackBypass": _boolean}  # fmt: skip
_WEBHOOK_SECURITY = {"allowedHosts": _List(_string), "trustForwardingHeaders": _boolean,
                     "trustedProxyIPs": _List(_string)}  # fmt: skip
_TOP = _Obj(None, {
    "enabled": _boolean,
    "provider": _one_of("telnyx", "twilio", "plivo", "mock"),
    "telnyx": _Obj(TelnyxConfig, {"apiKey": _string, "connectionId": _string,
                                  "publicKey": _string, "baseUrl": _HTTP_URL}),
    "twilio": _Obj(TwilioConfig, {"accountSid": _string, "authToken": _string,
                                  "baseUrl": _HTTP_URL, "signingKeys": _Map(_string)}),
    "plivo": _Obj(PlivoConfig, {"authId": _string, "authToken": _string, "baseUrl": _HTTP_URL,
                                "allowV2Signatures": _boolean}),
    "fromNumber": _e164,
    "toNumber": _e164,
    "inboundPolicy": _one_of("disabled", "allowlist", "pairing", "open"),
    "allowFrom": _List(_e164),
    "inboundGreeting": _text,
    "outbound": _Obj(OutboundConfig, {"defaultMode": _one_of("notify", "conversation"),
                                      "notifyHangupDelaySec": _integer(0)}),
    "maxDurationSeconds": _INT_POS,
    "staleCallReaperSeconds": _integer(0),
    "silenceTimeoutMs": _INT_POS,
    "transcriptTimeoutMs": _INT_POS,
    "ringTimeoutMs": _INT_POS,
    "maxConcurrentCalls": _INT_POS,
    "serve": _Obj(ServeConfig, {"port": _port, "bind": _string, "path": _path}),
    "tailscale": _Obj(TailscaleConfig, {"mode": _one_of("off", "serve", "funnel"), "path": _path}),
    "tunnel": _Obj(TunnelConfig, _TUNNEL),
    "webhookSecurity": _Obj(WebhookSecurityConfig, _WEBHOOK_SECURITY),
    "streaming": _Obj(StreamingConfig, _STREAMING),
    "publicUrl": _HTTP_URL,
    "skipSignatureVerification": _boolean,
    "stt": _Obj(SttConfig, {"provider": _one_of("openai"), "model": _string}),
    "tts": _keep,  # validated on its own, after the merge with messages.tts
    "store": _string,
    "responseModel": _response_model,
    "responseSystemPrompt": _text,
    "responseTimeoutMs": _INT_POS,
    "responseBaseUrl": _HTTP_URL,
    "responseApiKey": _string,
    "metrics": _Obj(MetricsConfig, {"enabled": _boolean, "bind": _string, "port": _port}),
})  # fmt: skip


class _Reader:
    """Walks raw JSON against a schema, collecting problems (as `Issue`) and warnings."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.warnings: list[str] = []

    @property
    def problems(self) -> list[str]:
        return [issue.problem for issue in self.issues]

    def add(self, path: str, text: str, value: Any = UNDEFINED, suggestion: str | None = None, sep: str = ": ") -> None:
        self.issues.append(Issue(path, text, value, suggestion, sep))

    def read(self, value: Any, path: str, schema: Any, fallback: Any = None) -> Any:
        """Parse ``value``; on a failure of the value itself, record it and return ``fallback``."""
        try:
            return self._parse(value, path, schema)
        except _Invalid as e:
            self.add(path, str(e), value, e.suggestion)
            return fallback

    def _parse(self, value: Any, path: str, schema: Any) -> Any:
        if isinstance(schema, _Obj):
            if value is UNDEFINED:
                value = {}
            if not isinstance(value, dict):
                raise _Invalid("expected an object")
            kwargs = {}
            for key, item in value.items():
                check = schema.checks.get(key)
                if check is None:
                    # The value is never shown: a mistyped key may hold a secret.
                    self.add(f"{path}.{key}", "unknown key", suggestion=suggest(key, schema.checks))
                    continue
                try:
                    kwargs[_snake(key)] = self._parse(item, f"{path}.{key}", check)
                except _Invalid as e:
                    self.add(f"{path}.{key}", str(e), item, e.suggestion)
            return schema.build(kwargs)
        if isinstance(schema, _List):
            if not isinstance(value, list):
                raise _Invalid("expected an array")
            items = [self.read(v, f"{path}[{i}]", schema.check, UNDEFINED)
                     for i, v in enumerate(value)]  # fmt: skip
            return tuple(v for v in items if v is not UNDEFINED)
        if isinstance(schema, _Map):
            if not isinstance(value, dict):
                raise _Invalid("expected an object")
            entries = {k: self.read(v, f"{path}.{k}", schema.check, UNDEFINED)
                       for k, v in value.items()}  # fmt: skip
            return types.MappingProxyType({k: v for k, v in entries.items() if v is not UNDEFINED})
        return schema(value)

    def member(self, parent: dict, key: str, path: str) -> dict:
        """The object at ``parent[key]``, ``{}`` when absent (or not an object: a problem)."""
        value = parent.get(key, UNDEFINED)
        if value is UNDEFINED:
            return {}
        if not isinstance(value, dict):
            self.add(path, "expected an object", value)
            return {}
        return value

    def legacy(self, raw: dict, path: str) -> dict:
        """Rewrite the legacy top-level shapes into the current ones, with warnings."""
        raw = dict(raw)
        if raw.get("provider") == "log":
            raw["provider"] = "mock"
            self.warnings.append('provider "log" is deprecated; use "mock" instead')
        twilio = raw.get("twilio")
        if isinstance(twilio, dict) and "from" in twilio:
            twilio = dict(twilio)
            legacy_from = self.read(twilio.pop("from"), f"{path}.twilio.from", _e164)
            raw["twilio"] = twilio
            self.warnings.append("twilio.from is deprecated; use fromNumber instead")
            if legacy_from is not None:
                raw.setdefault("fromNumber", legacy_from)
        if isinstance(raw.get("streaming"), dict):
            raw["streaming"] = self._flatten_streaming(raw["streaming"], f"{path}.streaming")
        return raw

    def _flatten_streaming(self, raw: dict, path: str) -> dict:
        flat = {k: v for k, v in raw.items() if k not in ("provider", "providers")}
        current = {}
        if "provider" in raw and self.read(raw["provider"], f"{path}.provider", _one_of("openai")):
            current["sttProvider"] = "openai-realtime"
        providers = raw.get("providers", UNDEFINED)
        openai = self.read(providers, f"{path}.providers", _STREAM_PROVIDERS, {}).get("openai", {})
        for legacy, (replacement, snake) in _STREAM_LEGACY.items():
            if legacy in raw:
                self.warnings.append(
                    f"streaming.{legacy} is deprecated; use streaming.{replacement} instead"
                )
            value = current.get(legacy) if snake is None else openai.get(snake)
            if value is None:
                continue
            if legacy not in raw:
                flat[legacy] = value
            elif raw[legacy] != value:
                self.add(f"{path}.{legacy}", f"conflicts with {path}.{replacement}; remove the deprecated key",
                         raw[legacy])  # fmt: skip
        return flat

    def tts(self, messages_tts: Any, plugin_tts: Any) -> TtsConfig:
        """Validate both TTS sides where they are written, then parse their merge."""
        before = len(self.issues)
        if messages_tts is not UNDEFINED:
            messages_tts = self._tts_layout(messages_tts, "messages.tts")
            self.read(messages_tts, "messages.tts", _TTS)
        if plugin_tts is not UNDEFINED:
            plugin_tts = self._tts_layout(plugin_tts, f"{CONFIG_PATH}.tts")
            self.read(plugin_tts, f"{CONFIG_PATH}.tts", _TTS)
        if len(self.issues) > before:
            return TtsConfig()
        merged = deep_merge_defined(messages_tts, plugin_tts)
        return self.read(merged, f"{CONFIG_PATH}.tts", _TTS, TtsConfig())

    def _tts_layout(self, raw: Any, path: str) -> Any:
        """
        The current OpenClaw TTS layout (``provider`` plus ``providers.<id>``) rewritten into the
        one voicecall reads (``openai``, ``elevenlabs``, ``edge``). A ``providers`` block wins over
        a direct block of the same provider; providers voicecall cannot use for calls, and a
        ``provider`` naming one, are dropped with a warning. Problems are named as written.
        """
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        provider = raw.get("provider")
        if provider == "microsoft":
            raw["provider"] = "edge"
        elif isinstance(provider, str) and provider and provider not in _TTS_PROVIDERS:
            del raw["provider"]
            self.warnings.append(
                f'{path}.provider "{_shown(provider)}" is not used for calls; voicecall uses the first of'
                " openai, elevenlabs with an API key"
            )
        providers = raw.pop("providers", UNDEFINED)
        if providers is UNDEFINED:
            return raw
        if not isinstance(providers, dict):
            self.add(f"{path}.providers", "expected an object", providers)
            return raw
        for name, block in providers.items():
            target = _TTS_PROVIDER_TARGETS.get(name)
            where = f"{path}.providers.{name}"
            if target is None:
                self.warnings.append(f"{where} is not used for calls (voicecall speaks with openai or elevenlabs)")
                continue
            before = len(self.issues)
            self.read(block, where, _TTS_PROVIDER_BLOCKS[target])
            if len(self.issues) > before:
                continue
            block = {k: v for k, v in block.items() if k not in _TTS_IGNORED_KEYS[target]}
            raw[target] = deep_merge_defined(raw.get(target, UNDEFINED), block)
        return raw


def _shown(value: str) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in value)
    return clean if len(clean) <= 40 else clean[:40] + "…"
