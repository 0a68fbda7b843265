# -*- test-case-name: tests.test_config,tests.test_config_declarations -*-
"""
The configuration model, and the one declaration of every config key: one frozen attrs class per
section of SPEC §2, each field declared with `key` (a value) or `section` (a nested object).
The field's metadata (`Key`) carries what the reader in voicecall.config.validate needs: the
JSON name (camelCase of the attribute unless given), the value check, the environment
fallback, whether SPEC §2.5 requires it, and where a legacy key moved; the attrs default is the
config default. Secrets never appear in a repr.
"""
from __future__ import annotations

import os
import re
import types
from typing import Any, Mapping

from attrs import NOTHING, Attribute, field, frozen

from voicecall.config.checks import (
    POSITIVE,
    TIMEOUT_MS,
    UNIT,
    Check,
    ListOf,
    MapOf,
    any_text,
    boolean,
    e164,
    http_url,
    integer,
    is_postgres_url,
    node_id,
    non_empty,
    number,
    one_of,
    openai_model,
    phone_or_sip,
    port,
    redact_url,
    store_location,
    url_path,
    ws_url,
)

#: The state directory when the config names none.
DEFAULT_STORE = "~/.openclaw/voice-calls"

#: The metadata entry of a declared field: a `Key`, or None for an attribute no JSON key sets.
KEY = "voicecall.config"


@frozen
class Key:
    """
    How one config key is read. ``check`` is a value check (voicecall.config.checks), or the
    attrs class of a section. ``env``: variables read, first set one wins, when the value is
    absent; ``provider``: the env fallback (and, for a section, the fields it holds) apply only
    when that provider is selected. ``required``: SPEC §2.5 requires it when its section's
    provider is selected, unless the boolean top-level attribute ``waived_by`` is true.
    ``moved_to``: the current key (relative to the section) a legacy key was replaced by.
    """

    check: Any
    json: str | None = None
    env: tuple[str, ...] = ()
    provider: str | None = None
    required: bool = False
    waived_by: str | None = None
    moved_to: str | None = None
    secret: bool = False
    doc: str | None = None

    @property
    def section(self) -> type | None:
        """The attrs class of a nested object, or None for a value."""
        return self.check if isinstance(self.check, type) else None


def key(check: Check | ListOf | MapOf, default: Any = NOTHING, *, factory: Any = None, env: str | tuple[str, ...] = (),
        secret: bool = False, hash: bool | None = None, holds_secret: bool = False, **declared: Any) -> Any:  # fmt: skip
    """
    A field holding one config value; ``declared`` are the other `Key` attributes. A `secret` is
    never shown; a value that `holds_secret` (the store URL's password) is shown redacted in
    messages and left out of the repr, like a secret.
    """
    variables = (env,) if isinstance(env, str) else env
    meta = {KEY: Key(check, env=variables, secret=secret, **declared)}
    shown = not (secret or holds_secret)
    if factory is not None:
        return field(factory=factory, repr=shown, hash=hash, metadata=meta)
    return field(default=default, repr=shown, hash=hash, metadata=meta)


def section(cls: type, *, provider: str | None = None) -> Any:
    """A field holding a nested config object, read against ``cls``'s own declarations."""
    return field(factory=cls, metadata={KEY: Key(cls, provider=provider)})


def declaration(attribute: Attribute) -> Key | None:
    """The `Key` of a field (None for one no JSON key sets; KeyError for an undeclared one)."""
    return attribute.metadata[KEY]


def json_name(attribute: Attribute) -> str:
    """The JSON key of a declared field."""
    declared = attribute.metadata[KEY]
    if declared.json is not None:
        return declared.json
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), attribute.name)


def _default_store() -> str:
    return os.path.abspath(os.path.expanduser(DEFAULT_STORE))


@frozen
class OutboundConfig:
    default_mode: str = key(one_of("notify", "conversation"), "notify")
    notify_hangup_delay_sec: int = key(integer(0), 3)
    answering_machine: str = key(one_of("ignore", "leave-message", "hang-up"), "ignore",
                                 doc="What an outbound call does when a machine answers (initiate param answeringMachine).")  # fmt: skip


@frozen
class TransferConfig:
    allow_to: tuple[str, ...] = key(ListOf(phone_or_sip), (), doc="The only numbers (or SIP URIs) voicecall.transfer may connect a caller to.")


@frozen
class RecordingConfig:
    enabled: bool = key(boolean, False, doc="Record every call (a call's own `record` param overrides).")
    announcement: str = key(non_empty, "This call is being recorded.", doc="Said before recording starts.")


@frozen
class ReportConfig:
    url: str | None = key(http_url, None, doc="Where a summary of every ended call is POSTed (signed).")
    secret: str | None = key(non_empty, None, env="VOICECALL_REPORT_SECRET", secret=True,
                             doc="The HMAC-SHA256 key of the X-Voicecall-Signature header.")  # fmt: skip
    summarize: bool = key(boolean, False, doc="Add a short LLM summary (the built-in responder's model).")


@frozen
class ServeConfig:
    port: int = key(port, 3334)
    bind: str = key(non_empty, "127.0.0.1")
    path: str = key(url_path, "/voice/webhook")


@frozen
class TailscaleConfig:
    mode: str = key(one_of("off", "serve", "funnel"), "off")
    path: str = key(url_path, "/voice/webhook")


@frozen
class TunnelConfig:
    provider: str = key(one_of("none", "ngrok", "tailscale-serve", "tailscale-funnel"), "none")
    ngrok_auth_token: str | None = key(non_empty, None, env="NGROK_AUTHTOKEN", secret=True)
    ngrok_domain: str | None = key(non_empty, None, env="NGROK_DOMAIN")
    allow_ngrok_free_tier_loopback_bypass: bool = key(boolean, False)


@frozen
class WebhookSecurityConfig:
    allowed_hosts: tuple[str, ...] = key(ListOf(non_empty), ())
    trust_forwarding_headers: bool = key(boolean, False)
    trusted_proxy_ips: tuple[str, ...] = key(ListOf(non_empty), (), json="trustedProxyIPs")


@frozen
class StreamingConfig:
    """
    The flat (legacy) shape of ``streaming``; the current one (``provider`` = ``"openai"``,
    ``providers.openai.*``) is read into the fields whose ``moved_to`` names it.
    """

    enabled: bool = key(boolean, False)
    stt_provider: str = key(one_of("openai-realtime"), "openai-realtime", moved_to="provider")
    openai_api_key: str | None = key(non_empty, None, env="OPENAI_API_KEY", secret=True,
                                     moved_to="providers.openai.apiKey")  # fmt: skip
    stt_model: str = key(non_empty, "gpt-4o-transcribe", moved_to="providers.openai.model")
    silence_duration_ms: int = key(POSITIVE, 800, moved_to="providers.openai.silenceDurationMs")
    vad_threshold: float = key(UNIT, 0.5, moved_to="providers.openai.vadThreshold")
    stream_path: str = key(url_path, "/voice/stream")
    pre_start_timeout_ms: int = key(POSITIVE, 5000)
    max_pending_connections: int = key(POSITIVE, 32)
    max_pending_connections_per_ip: int = key(POSITIVE, 4)
    max_connections: int = key(POSITIVE, 128)
    stt_base_url: str = key(ws_url, "wss://api.openai.com/v1/realtime")


@frozen
class SttConfig:
    provider: str = key(one_of("openai"), "openai")
    model: str = key(non_empty, "whisper-1")


@frozen
class TwilioConfig:
    account_sid: str | None = key(non_empty, None, env="TWILIO_ACCOUNT_SID", required=True)
    auth_token: str | None = key(non_empty, None, env="TWILIO_AUTH_TOKEN", required=True, secret=True)
    base_url: str = key(http_url, "https://api.twilio.com")
    signing_keys: Mapping[str, str] = key(
        MapOf(non_empty), factory=lambda: types.MappingProxyType({}), secret=True, hash=False,
        doc="SharedKey id -> secret (read-only mapping)",
    )  # fmt: skip


@frozen
class TelnyxConfig:
    api_key: str | None = key(non_empty, None, env="TELNYX_API_KEY", required=True, secret=True)
    connection_id: str | None = key(non_empty, None, env="TELNYX_CONNECTION_ID", required=True)
    public_key: str | None = key(non_empty, None, env="TELNYX_PUBLIC_KEY", required=True,
                                 waived_by="skip_signature_verification")  # fmt: skip
    base_url: str = key(http_url, "https://api.telnyx.com")


@frozen
class PlivoConfig:
    auth_id: str | None = key(non_empty, None, env="PLIVO_AUTH_ID", required=True)
    auth_token: str | None = key(non_empty, None, env="PLIVO_AUTH_TOKEN", required=True, secret=True)
    base_url: str = key(http_url, "https://api.plivo.com")
    allow_v2_signatures: bool = key(boolean, False, doc="Accept callbacks signed with V2 only; V2 covers neither the body nor the query.")


@frozen
class MetricsConfig:
    enabled: bool = key(boolean, False)
    bind: str = key(non_empty, "127.0.0.1")
    port: int = key(port, 9464)


@frozen
class ClusterConfig:
    """
    Many nodes on one PostgreSQL store (clustering is on when ``store`` is a PostgreSQL URL).
    ``node_id`` None means the host name; ``entry_url`` None means this node's ``publicUrl``.
    """

    node_id: str | None = key(node_id, None, doc="This node's id (default: the host name).")
    lease_seconds: int = key(integer(3, 3600), 10, doc="A node silent this long is dead: its calls are adopted.")
    entry_url: str | None = key(http_url, None, doc="The shared URL that reaches any live node (default: publicUrl).")


@frozen
class TtsModelOverrides:
    enabled: bool | None = key(boolean, None)
    allow_text: bool | None = key(boolean, None)
    allow_provider: bool | None = key(boolean, None)
    allow_voice: bool | None = key(boolean, None)
    allow_model_id: bool | None = key(boolean, None)
    allow_voice_settings: bool | None = key(boolean, None)
    allow_normalization: bool | None = key(boolean, None)
    allow_seed: bool | None = key(boolean, None)


@frozen
class TtsVoiceSettings:
    stability: float = key(UNIT, 0.5)
    similarity_boost: float = key(UNIT, 0.75)
    style: float = key(UNIT, 0.0)
    use_speaker_boost: bool = key(boolean, True)
    speed: float = key(number(0.5, 2), 1.0)


@frozen
class TtsElevenLabsConfig:
    api_key: str | None = key(non_empty, None, env=("ELEVENLABS_API_KEY", "XI_API_KEY"), secret=True)
    base_url: str = key(http_url, "https://api.elevenlabs.io")
    voice_id: str = key(non_empty, "pMsXgVXv3BLzUgSXRplE")
    model_id: str = key(non_empty, "eleven_multilingual_v2")
    seed: int | None = key(integer(0, 4294967295), None)
    apply_text_normalization: str | None = key(one_of("auto", "on", "off"), None)
    language_code: str | None = key(non_empty, None)
    voice_settings: TtsVoiceSettings = section(TtsVoiceSettings)


@frozen
class TtsOpenAIConfig:
    api_key: str | None = key(non_empty, None, env="OPENAI_API_KEY", secret=True)
    model: str = key(non_empty, "gpt-4o-mini-tts")
    voice: str = key(non_empty, "alloy")
    base_url: str = key(http_url, "https://api.openai.com/v1")
    speed: float | None = key(number(0.25, 4), None)
    instructions: str | None = key(any_text, None)


@frozen
class TtsEdgeConfig:
    enabled: bool | None = key(boolean, None)
    voice: str | None = key(non_empty, None)
    lang: str | None = key(non_empty, None)
    output_format: str | None = key(non_empty, None)
    pitch: str | None = key(non_empty, None)
    rate: str | None = key(non_empty, None)
    volume: str | None = key(non_empty, None)
    save_subtitles: bool | None = key(boolean, None)
    proxy: str | None = key(non_empty, None)
    timeout_ms: int | None = key(TIMEOUT_MS, None)


@frozen
class TtsConfig:
    """The effective call TTS settings (SPEC §2.3); ``provider`` None means "first with a key"."""

    auto: str | None = key(one_of("off", "always", "inbound", "tagged"), None)
    enabled: bool | None = key(boolean, None)
    mode: str | None = key(one_of("final", "all"), None)
    provider: str | None = key(one_of("openai", "elevenlabs", "edge"), None)
    summary_model: str | None = key(non_empty, None)
    model_overrides: TtsModelOverrides = section(TtsModelOverrides)
    openai: TtsOpenAIConfig = section(TtsOpenAIConfig)
    elevenlabs: TtsElevenLabsConfig = section(TtsElevenLabsConfig)
    edge: TtsEdgeConfig = section(TtsEdgeConfig)
    prefs_path: str | None = key(non_empty, None)
    max_text_length: int = key(POSITIVE, 4096)
    timeout_ms: int = key(TIMEOUT_MS, 30000)


@frozen
class VoiceCallConfig:
    """The whole plugin configuration; attribute names are the JSON keys in snake_case."""

    enabled: bool = key(boolean, True)
    provider: str | None = key(one_of("telnyx", "twilio", "plivo", "mock"), "mock")
    from_number: str | None = key(e164, None, env="TWILIO_FROM_NUMBER", provider="twilio")
    to_number: str | None = key(e164, None)
    inbound_policy: str = key(one_of("disabled", "allowlist", "pairing", "open"), "disabled")
    allow_from: tuple[str, ...] = key(ListOf(e164), ())
    inbound_greeting: str | None = key(any_text, None)
    outbound: OutboundConfig = section(OutboundConfig)
    allowed_from_numbers: tuple[str, ...] = key(ListOf(e164), (), doc="Caller ids an initiate may choose (`from`) besides fromNumber.")
    transfer: TransferConfig = section(TransferConfig)
    recording: RecordingConfig = section(RecordingConfig)
    report: ReportConfig = section(ReportConfig)
    max_duration_seconds: int = key(POSITIVE, 300)
    stale_call_reaper_seconds: int = key(integer(0), 0)
    silence_timeout_ms: int = key(POSITIVE, 800)
    transcript_timeout_ms: int = key(POSITIVE, 180000)
    ring_timeout_ms: int = key(POSITIVE, 30000)
    max_concurrent_calls: int = key(POSITIVE, 1)
    serve: ServeConfig = section(ServeConfig)
    tailscale: TailscaleConfig = section(TailscaleConfig)
    tunnel: TunnelConfig = section(TunnelConfig)
    webhook_security: WebhookSecurityConfig = section(WebhookSecurityConfig)
    streaming: StreamingConfig = section(StreamingConfig)
    public_url: str | None = key(http_url, None)
    skip_signature_verification: bool = key(boolean, False)
    stt: SttConfig = section(SttConfig)
    #: Read after the deep merge with OpenClaw's ``messages.tts`` (SPEC §2.3).
    tts: TtsConfig = section(TtsConfig)
    store: str = key(store_location, factory=_default_store, env="VOICECALL_STORE", holds_secret=True,
                     doc="A directory (SQLite, one node) or a postgresql:// URL (the shared store of a cluster).")  # fmt: skip
    response_model: str = key(openai_model, "openai/gpt-4o-mini")
    response_system_prompt: str | None = key(any_text, None)
    response_timeout_ms: int = key(POSITIVE, 30000)
    response_base_url: str = key(http_url, "https://api.openai.com/v1")
    response_api_key: str | None = key(non_empty, None, env="OPENAI_API_KEY", secret=True)
    twilio: TwilioConfig = section(TwilioConfig, provider="twilio")
    telnyx: TelnyxConfig = section(TelnyxConfig, provider="telnyx")
    plivo: PlivoConfig = section(PlivoConfig, provider="plivo")
    metrics: MetricsConfig = section(MetricsConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    #: The legacy-shape warnings found while reading; no JSON key sets it.
    warnings: tuple[str, ...] = field(default=(), metadata={KEY: None})

    @property
    def store_is_postgres(self) -> bool:
        """Whether ``store`` is a PostgreSQL URL (clustering on) rather than a directory."""
        return is_postgres_url(self.store)

    @property
    def state_dir(self) -> str:
        """Where local state (the RPC socket) goes: the store directory, or the default one with PostgreSQL."""
        return _default_store() if self.store_is_postgres else self.store

    @property
    def store_shown(self) -> str:
        """``store`` as messages and logs show it: a URL's password replaced by ``***``."""
        return redact_url(self.store)
