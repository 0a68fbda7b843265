# -*- test-case-name: tests.test_config -*-
"""
The voice-call configuration: an attrs model of SPEC §2, loaded from JSON or JSON5, with the
environment fallbacks of §2.4 and the strict validation and exact messages of §2.5.

The input is either the bare plugin config object or a whole OpenClaw config file (recognised by
a top-level ``plugins`` or ``messages`` key), from which ``plugins.entries["voice-call"].config``
and ``messages.tts`` are taken; the effective ``tts`` is ``deep_merge_defined(messages.tts,
plugin tts)``. A ``false`` ``enabled`` on the plugin entry disables the plugin like a ``false``
``enabled`` inside its config.

Unknown keys are rejected at every level, every problem names its full dotted path (always
under ``plugins.entries.voice-call.config``, or ``messages.tts``), and all problems are raised
together as one `ConfigError`. JSON ``null`` is never accepted in place of a value; integral
floats (``3334.0``) count as integers, booleans never do. No message ever repeats a value.

Keys added by this project beyond SPEC §2:

- ``twilio.baseUrl`` (``https://api.twilio.com``), ``telnyx.baseUrl`` (``https://api.telnyx.com``),
  ``plivo.baseUrl`` (``https://api.plivo.com``): the carriers' API roots.
- ``twilio.signingKeys``: object mapping a Twilio SharedKey id to its secret, for the
  HMAC-SHA256 signatures announced by ``X-Twilio-Webhooks-Signature-Settings`` (PROVIDERS.md
  §1.5); default ``{}``.
- ``tts.openai.baseUrl`` (``https://api.openai.com/v1``), ``tts.elevenlabs.baseUrl``
  (``https://api.elevenlabs.io``), ``streaming.sttBaseUrl`` (``wss://api.openai.com/v1/realtime``).
- ``responseBaseUrl`` (``https://api.openai.com/v1``) and ``responseApiKey`` (env fallback
  ``OPENAI_API_KEY``) for the built-in OpenAI-compatible auto-reply client.
- ``metrics.enabled`` (``false``), ``metrics.bind`` (``127.0.0.1``), ``metrics.port`` (``9464``).

Every URL-valued key must be an absolute http(s) URL (``streaming.sttBaseUrl``: ws(s)).
``serve.path``, ``tailscale.path`` and ``streaming.streamPath`` must start with ``/``.

Legacy shapes are accepted and normalised, each with a warning in ``VoiceCallConfig.warnings``:
``provider: "log"`` (now ``"mock"``), ``twilio.from`` (now ``fromNumber``), and the flat
``streaming`` keys ``sttProvider``, ``openaiApiKey``, ``sttModel``, ``silenceDurationMs``,
``vadThreshold`` (now ``streaming.provider`` = ``"openai"`` and ``streaming.providers.openai.
{apiKey, model, silenceDurationMs, vadThreshold}``). Both streaming shapes end up in the flat
attributes of `StreamingConfig` (``stt_provider`` is always ``"openai-realtime"``); giving one
setting in both shapes with different values is an error.

Defaults follow SPEC [CORE]/[H]: ``staleCallReaperSeconds`` 0 (disabled, DESIGN decision),
``responseModel`` ``"openai/gpt-4o-mini"`` (the built-in responder's default model), ``store``
``~/.openclaw/voice-calls`` (``~`` expanded with ``HOME`` from the given environment, relative
paths resolved against the current directory).

This module imports nothing of ours and does no I/O except `load_config` reading its file.
"""
from __future__ import annotations

import os
import re
import types
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import json5
from attrs import evolve, field, frozen

#: Where the plugin config lives in an OpenClaw config file; every problem is named under it.
CONFIG_PATH = "plugins.entries.voice-call.config"

#: The error the daemon refuses to start with when the config says ``enabled: false``.
DISABLED_MESSAGE = "Voice call disabled. Enable the plugin entry in config."

#: The message for a phone number that is not E.164.
E164_MESSAGE = "Expected E.164 format, e.g. +15550001234"

DEFAULT_STORE = "~/.openclaw/voice-calls"

#: The largest config file `load_config` reads.
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason, in a stable order."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("Invalid voice-call config: " + "; ".join(self.problems))


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


def _secret(default: Any = None) -> Any:
    return field(default=default, repr=False)


def _default_store() -> str:
    return os.path.abspath(os.path.expanduser(DEFAULT_STORE))


@frozen
class OutboundConfig:
    default_mode: str = "notify"
    notify_hangup_delay_sec: int = 3


@frozen
class ServeConfig:
    port: int = 3334
    bind: str = "127.0.0.1"
    path: str = "/voice/webhook"


@frozen
class TailscaleConfig:
    mode: str = "off"
    path: str = "/voice/webhook"


@frozen
class TunnelConfig:
    provider: str = "none"
    ngrok_auth_token: str | None = _secret()
    ngrok_domain: str | None = None
    allow_ngrok_free_tier_loopback_bypass: bool = False


@frozen
class WebhookSecurityConfig:
    allowed_hosts: tuple[str, ...] = ()
    trust_forwarding_headers: bool = False
    trusted_proxy_ips: tuple[str, ...] = ()


@frozen
class StreamingConfig:
    enabled: bool = False
    stt_provider: str = "openai-realtime"
    openai_api_key: str | None = _secret()
    stt_model: str = "gpt-4o-transcribe"
    silence_duration_ms: int = 800
    vad_threshold: float = 0.5
    stream_path: str = "/voice/stream"
    pre_start_timeout_ms: int = 5000
    max_pending_connections: int = 32
    max_pending_connections_per_ip: int = 4
    max_connections: int = 128
    stt_base_url: str = "wss://api.openai.com/v1/realtime"


@frozen
class SttConfig:
    provider: str = "openai"
    model: str = "whisper-1"


@frozen
class TwilioConfig:
    account_sid: str | None = None
    auth_token: str | None = _secret()
    base_url: str = "https://api.twilio.com"
    #: SharedKey id -> secret (read-only mapping).
    signing_keys: Mapping[str, str] = field(
        factory=lambda: types.MappingProxyType({}), repr=False, hash=False
    )


@frozen
class TelnyxConfig:
    api_key: str | None = _secret()
    connection_id: str | None = None
    public_key: str | None = None
    base_url: str = "https://api.telnyx.com"


@frozen
class PlivoConfig:
    auth_id: str | None = None
    auth_token: str | None = _secret()
    base_url: str = "https://api.plivo.com"


@frozen
class MetricsConfig:
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9464


@frozen
class TtsModelOverrides:
    enabled: bool | None = None
    allow_text: bool | None = None
    allow_provider: bool | None = None
    allow_voice: bool | None = None
    allow_model_id: bool | None = None
    allow_voice_settings: bool | None = None
    allow_normalization: bool | None = None
    allow_seed: bool | None = None


@frozen
class TtsVoiceSettings:
    stability: float = 0.5
    similarity_boost: float = 0.75
    style: float = 0.0
    use_speaker_boost: bool = True
    speed: float = 1.0


@frozen
class TtsElevenLabsConfig:
    api_key: str | None = _secret()
    base_url: str = "https://api.elevenlabs.io"
    voice_id: str = "pMsXgVXv3BLzUgSXRplE"
    model_id: str = "eleven_multilingual_v2"
    seed: int | None = None
    apply_text_normalization: str | None = None
    language_code: str | None = None
    voice_settings: TtsVoiceSettings = field(factory=TtsVoiceSettings)


@frozen
class TtsOpenAIConfig:
    api_key: str | None = _secret()
    model: str = "gpt-4o-mini-tts"
    voice: str = "alloy"
    base_url: str = "https://api.openai.com/v1"
    speed: float | None = None
    instructions: str | None = None


@frozen
class TtsEdgeConfig:
    enabled: bool | None = None
    voice: str | None = None
    lang: str | None = None
    output_format: str | None = None
    pitch: str | None = None
    rate: str | None = None
    volume: str | None = None
    save_subtitles: bool | None = None
    proxy: str | None = None
    timeout_ms: int | None = None


@frozen
class TtsConfig:
    """The effective call TTS settings (SPEC §2.3); ``provider`` None means "first with a key"."""

    auto: str | None = None
    enabled: bool | None = None
    mode: str | None = None
    provider: str | None = None
    summary_model: str | None = None
    model_overrides: TtsModelOverrides = field(factory=TtsModelOverrides)
    openai: TtsOpenAIConfig = field(factory=TtsOpenAIConfig)
    elevenlabs: TtsElevenLabsConfig = field(factory=TtsElevenLabsConfig)
    edge: TtsEdgeConfig = field(factory=TtsEdgeConfig)
    prefs_path: str | None = None
    max_text_length: int = 4096
    timeout_ms: int = 30000


@frozen
class VoiceCallConfig:
    """The whole plugin configuration; attribute names are the JSON keys in snake_case."""

    enabled: bool = True
    provider: str | None = "mock"
    from_number: str | None = None
    to_number: str | None = None
    inbound_policy: str = "disabled"
    allow_from: tuple[str, ...] = ()
    inbound_greeting: str | None = None
    outbound: OutboundConfig = field(factory=OutboundConfig)
    max_duration_seconds: int = 300
    stale_call_reaper_seconds: int = 0
    silence_timeout_ms: int = 800
    transcript_timeout_ms: int = 180000
    ring_timeout_ms: int = 30000
    max_concurrent_calls: int = 1
    serve: ServeConfig = field(factory=ServeConfig)
    tailscale: TailscaleConfig = field(factory=TailscaleConfig)
    tunnel: TunnelConfig = field(factory=TunnelConfig)
    webhook_security: WebhookSecurityConfig = field(factory=WebhookSecurityConfig)
    streaming: StreamingConfig = field(factory=StreamingConfig)
    public_url: str | None = None
    skip_signature_verification: bool = False
    stt: SttConfig = field(factory=SttConfig)
    tts: TtsConfig = field(factory=TtsConfig)
    store: str = field(factory=_default_store)
    response_model: str = "openai/gpt-4o-mini"
    response_system_prompt: str | None = None
    response_timeout_ms: int = 30000
    response_base_url: str = "https://api.openai.com/v1"
    response_api_key: str | None = _secret()
    twilio: TwilioConfig = field(factory=TwilioConfig)
    telnyx: TelnyxConfig = field(factory=TelnyxConfig)
    plivo: PlivoConfig = field(factory=PlivoConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    warnings: tuple[str, ...] = ()


# --- value checks: each returns the value (converted) or raises _Invalid ---------------------


class _Invalid(Exception):
    """A value failed its check; the message says what was expected."""


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
        raise _Invalid(expected)

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
    "plivo": _Obj(PlivoConfig, {"authId": _string, "authToken": _string, "baseUrl": _HTTP_URL}),
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
    "responseModel": _string,
    "responseSystemPrompt": _text,
    "responseTimeoutMs": _INT_POS,
    "responseBaseUrl": _HTTP_URL,
    "responseApiKey": _string,
    "metrics": _Obj(MetricsConfig, {"enabled": _boolean, "bind": _string, "port": _port}),
})  # fmt: skip


class _Reader:
    """Walks raw JSON against a schema, collecting problems and warnings."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def read(self, value: Any, path: str, schema: Any, fallback: Any = None) -> Any:
        """Parse ``value``; on a failure of the value itself, record it and return ``fallback``."""
        try:
            return self._parse(value, path, schema)
        except _Invalid as e:
            self.problems.append(f"{path}: {e}")
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
                    self.problems.append(f"{path}.{key}: unknown key")
                    continue
                try:
                    kwargs[_snake(key)] = self._parse(item, f"{path}.{key}", check)
                except _Invalid as e:
                    self.problems.append(f"{path}.{key}: {e}")
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
            self.problems.append(f"{path}: expected an object")
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
                self.problems.append(f"{path}.{legacy}: conflicts with {path}.{replacement};"
                                     " remove the deprecated key")  # fmt: skip
        return flat

    def tts(self, messages_tts: Any, plugin_tts: Any) -> TtsConfig:
        """Validate both TTS sides where they are written, then parse their merge."""
        before = len(self.problems)
        if messages_tts is not UNDEFINED:
            self.read(messages_tts, "messages.tts", _TTS)
        if plugin_tts is not UNDEFINED:
            self.read(plugin_tts, f"{CONFIG_PATH}.tts", _TTS)
        if len(self.problems) > before:
            return TtsConfig()
        merged = deep_merge_defined(messages_tts, plugin_tts)
        return self.read(merged, f"{CONFIG_PATH}.tts", _TTS, TtsConfig())


# --- environment -----------------------------------------------------------------------------


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _fill(section: Any, env: Mapping[str, str], **names: tuple[str, ...]) -> Any:
    """``section`` with each absent attribute taken from the first set variable of its names."""
    changes = {}
    for attr, variables in names.items():
        if getattr(section, attr) is None:
            changes[attr] = _env(env, *variables)
    return evolve(section, **changes)


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _resolve_path(path: str, env: Mapping[str, str]) -> str:
    if path == "~" or path.startswith("~/"):
        path = _home(env) + path[1:]
    return os.path.abspath(os.path.expanduser(path))


def _apply_env(cfg: VoiceCallConfig, env: Mapping[str, str], r: _Reader) -> VoiceCallConfig:
    """The §2.4 env fallbacks: provider credentials for the selected provider only."""
    changes: dict[str, Any] = {}
    if cfg.provider == "twilio":
        changes["twilio"] = _fill(
            cfg.twilio, env, account_sid=("TWILIO_ACCOUNT_SID",), auth_token=("TWILIO_AUTH_TOKEN",)
        )
        env_from = _env(env, "TWILIO_FROM_NUMBER") if cfg.from_number is None else None
        if env_from is not None:
            changes["from_number"] = r.read(env_from, "TWILIO_FROM_NUMBER", _e164, env_from)
    elif cfg.provider == "telnyx":
        changes["telnyx"] = _fill(
            cfg.telnyx,
            env,
            api_key=("TELNYX_API_KEY",),
            connection_id=("TELNYX_CONNECTION_ID",),
            public_key=("TELNYX_PUBLIC_KEY",),
        )
    elif cfg.provider == "plivo":
        changes["plivo"] = _fill(
            cfg.plivo, env, auth_id=("PLIVO_AUTH_ID",), auth_token=("PLIVO_AUTH_TOKEN",)
        )
    changes["tunnel"] = _fill(
        cfg.tunnel, env, ngrok_auth_token=("NGROK_AUTHTOKEN",), ngrok_domain=("NGROK_DOMAIN",)
    )
    changes["streaming"] = _fill(cfg.streaming, env, openai_api_key=("OPENAI_API_KEY",))
    changes["tts"] = evolve(
        cfg.tts,
        openai=_fill(cfg.tts.openai, env, api_key=("OPENAI_API_KEY",)),
        elevenlabs=_fill(cfg.tts.elevenlabs, env, api_key=("ELEVENLABS_API_KEY", "XI_API_KEY")),
    )
    if cfg.response_api_key is None:
        changes["response_api_key"] = _env(env, "OPENAI_API_KEY")
    return evolve(cfg, **changes)


def _validate(cfg: VoiceCallConfig) -> list[str]:
    """SPEC §2.5 ``validateProviderConfig``, with its exact messages."""
    p = CONFIG_PATH
    problems = []
    if cfg.provider is None:
        problems.append(f"{p}.provider is required")
    if cfg.provider in ("twilio", "telnyx", "plivo") and cfg.from_number is None:
        hint = " (or set TWILIO_FROM_NUMBER env)" if cfg.provider == "twilio" else ""
        problems.append(f"{p}.fromNumber is required{hint}")
    required: list[tuple[Any, str, str]] = []
    if cfg.provider == "telnyx":
        required += [
            (cfg.telnyx.api_key, "telnyx.apiKey", "TELNYX_API_KEY"),
            (cfg.telnyx.connection_id, "telnyx.connectionId", "TELNYX_CONNECTION_ID"),
        ]
        if not cfg.skip_signature_verification:
            required.append((cfg.telnyx.public_key, "telnyx.publicKey", "TELNYX_PUBLIC_KEY"))
    elif cfg.provider == "twilio":
        required += [
            (cfg.twilio.account_sid, "twilio.accountSid", "TWILIO_ACCOUNT_SID"),
            (cfg.twilio.auth_token, "twilio.authToken", "TWILIO_AUTH_TOKEN"),
        ]
    elif cfg.provider == "plivo":
        required += [
            (cfg.plivo.auth_id, "plivo.authId", "PLIVO_AUTH_ID"),
            (cfg.plivo.auth_token, "plivo.authToken", "PLIVO_AUTH_TOKEN"),
        ]
    for value, key, variable in required:
        if value is None:
            problems.append(f"{p}.{key} is required (or set {variable} env)")
    if cfg.streaming.enabled and cfg.provider != "twilio":
        problems.append(f'{p}.provider must be "twilio" when streaming.enabled is true')
    return problems


# --- public entry points ---------------------------------------------------------------------


def parse_config(data: object, env: Mapping[str, str]) -> VoiceCallConfig:
    """
    Build the configuration from parsed JSON: the bare plugin config object or a whole OpenClaw
    config file. Raises `ConfigError` listing every problem (schema, then SPEC §2.5).
    """
    r = _Reader()
    raw: Any = data
    messages_tts: Any = UNDEFINED
    entry_enabled = True
    if isinstance(data, dict) and ("plugins" in data or "messages" in data):
        entries = r.member(r.member(data, "plugins", "plugins"), "entries", "plugins.entries")
        where = "plugins.entries.voice-call"
        entry = r.member(entries, "voice-call", where)
        raw = entry.get("config", UNDEFINED)
        entry_enabled = r.read(entry.get("enabled", True), f"{where}.enabled", _boolean, True)
        messages_tts = r.member(data, "messages", "messages").get("tts", UNDEFINED)
    if raw is UNDEFINED:
        raw = {}
    if not isinstance(raw, dict):
        r.problems.append(f"{CONFIG_PATH}: expected an object")
        raw = {}

    raw = r.legacy(raw, CONFIG_PATH)
    kwargs = r.read(raw, CONFIG_PATH, _TOP, {})
    enabled = kwargs.pop("enabled", True) and entry_enabled
    kwargs.pop("tts", None)
    provider = kwargs.pop("provider", None) or ("mock" if enabled else None)
    store = _resolve_path(kwargs.pop("store", DEFAULT_STORE), env)
    tts = r.tts(messages_tts, raw.get("tts", UNDEFINED))
    cfg = VoiceCallConfig(**kwargs, enabled=enabled, provider=provider, store=store, tts=tts)
    cfg = _apply_env(cfg, env, r)
    if cfg.enabled:
        r.problems.extend(_validate(cfg))
    if r.problems:
        raise ConfigError(r.problems)
    return evolve(cfg, warnings=tuple(r.warnings))


def load_config(path: str, env: Mapping[str, str]) -> VoiceCallConfig:
    """Read and parse a JSON or JSON5 config file; any failure is a `ConfigError`."""
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror or e}"]) from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        data = json5.loads(blob.decode("utf-8-sig"), allow_duplicate_keys=False)
    except (ValueError, RecursionError) as e:
        raise ConfigError([f"{path}: not valid JSON or JSON5: {e}"]) from None
    return parse_config(data, env)


def config_search_paths(env: Mapping[str, str], cwd: str) -> list[str]:
    """The files `find_config_path` looks for when no path is given, in order."""
    return [
        os.path.join(cwd, "voicecall.json5"),
        os.path.join(cwd, "voicecall.json"),
        os.path.join(_home(env), ".config", "voicecall", "voicecall.json5"),
        "/etc/voicecall/voicecall.json5",
    ]


def find_config_path(explicit: str | None, env: Mapping[str, str], cwd: str) -> str | None:
    """
    The config file to use, the same for daemon and CLI: ``explicit``, else ``VOICECALL_CONFIG``
    (both returned even if missing, relative ones resolved against ``cwd``), else the first
    existing file of `config_search_paths`, else None.
    """
    chosen = explicit or env.get("VOICECALL_CONFIG")
    if chosen:
        return os.path.join(cwd, chosen)
    for candidate in config_search_paths(env, cwd):
        if os.path.isfile(candidate):
            return candidate
    return None
