# -*- test-case-name: tests.test_config -*-
"""
The configuration model: one frozen attrs class per section of SPEC §2, with the defaults.
Built by voicecall.config (which validates and fills them); read by tap.py. Secrets never appear
in a repr.
"""
from __future__ import annotations

import os
import types
from typing import Any, Mapping

from attrs import field, frozen

#: The state directory when the config names none.
DEFAULT_STORE = "~/.openclaw/voice-calls"


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
    #: Accept callbacks signed with V2 only; V2 covers neither the body nor the query.
    allow_v2_signatures: bool = False


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
