"""
Tests for voicecall.config: schema, defaults, env fallbacks, SPEC §2.5 messages, legacy keys,
whole-OpenClaw-file extraction, the TTS deep merge, file loading and config discovery.
"""
from __future__ import annotations

import json
import os

import attrs
from twisted.trial.unittest import SynchronousTestCase

from voicecall.config import (
    DISABLED_MESSAGE,
    ConfigError,
    config_search_paths,
    find_config_path,
    load_config,
    parse_config,
)
from voicecall.config.model import VoiceCallConfig
from voicecall.config.validate import UNDEFINED, deep_merge_defined

P = "plugins.entries.voice-call.config"
HOME = "/home/tester"
ENV = {"HOME": HOME}

TWILIO_CREDS = {"accountSid": "AC123", "authToken": "tw-secret"}
TELNYX_CREDS = {"apiKey": "KEY123", "connectionId": "conn-1", "publicKey": "pubkey=="}
PLIVO_CREDS = {"authId": "MA123", "authToken": "pl-secret"}


def problems_of(testcase, data, env=ENV):
    """The problems parse_config raises for data (failing the test if it does not raise)."""
    exc = testcase.assertRaises(ConfigError, parse_config, data, env)
    return exc.problems


class DefaultsTests(SynchronousTestCase):
    """An empty config gets every documented default."""

    def test_whole_default_config(self):
        """A bare {} config yields exactly the documented defaults, provider mock, enabled."""
        cfg = parse_config({}, ENV)
        self.assertEqual(
            attrs.asdict(cfg),
            {
                "enabled": True,
                "provider": "mock",
                "from_number": None,
                "to_number": None,
                "inbound_policy": "disabled",
                "allow_from": (),
                "inbound_greeting": None,
                "outbound": {"default_mode": "notify", "notify_hangup_delay_sec": 3, "answering_machine": "ignore"},
                "allowed_from_numbers": (),
                "transfer": {"allow_to": ()},
                "recording": {"enabled": False, "announcement": "This call is being recorded."},
                "report": {"url": None, "secret": None, "summarize": False},
                "max_duration_seconds": 300,
                "stale_call_reaper_seconds": 0,
                "silence_timeout_ms": 800,
                "transcript_timeout_ms": 180000,
                "ring_timeout_ms": 30000,
                "max_concurrent_calls": 1,
                "serve": {"port": 3334, "bind": "127.0.0.1", "path": "/voice/webhook"},
                "tailscale": {"mode": "off", "path": "/voice/webhook"},
                "tunnel": {
                    "provider": "none",
                    "ngrok_auth_token": None,
                    "ngrok_domain": None,
                    "allow_ngrok_free_tier_loopback_bypass": False,
                },
                "webhook_security": {
                    "allowed_hosts": (),
                    "trust_forwarding_headers": False,
                    "trusted_proxy_ips": (),
                },
                "streaming": {
                    "enabled": False,
                    "stt_provider": "openai-realtime",
                    "openai_api_key": None,
                    "stt_model": "gpt-4o-transcribe",
                    "silence_duration_ms": 800,
                    "vad_threshold": 0.5,
                    "stream_path": "/voice/stream",
                    "pre_start_timeout_ms": 5000,
                    "max_pending_connections": 32,
                    "max_pending_connections_per_ip": 4,
                    "max_connections": 128,
                    "stt_base_url": "wss://api.openai.com/v1/realtime",
                },
                "public_url": None,
                "skip_signature_verification": False,
                "stt": {"provider": "openai", "model": "whisper-1"},
                "tts": {
                    "auto": None,
                    "enabled": None,
                    "mode": None,
                    "provider": None,
                    "summary_model": None,
                    "model_overrides": {
                        "enabled": None,
                        "allow_text": None,
                        "allow_provider": None,
                        "allow_voice": None,
                        "allow_model_id": None,
                        "allow_voice_settings": None,
                        "allow_normalization": None,
                        "allow_seed": None,
                    },
                    "openai": {
                        "api_key": None,
                        "model": "gpt-4o-mini-tts",
                        "voice": "alloy",
                        "base_url": "https://api.openai.com/v1",
                        "speed": None,
                        "instructions": None,
                    },
                    "elevenlabs": {
                        "api_key": None,
                        "base_url": "https://api.elevenlabs.io",
                        "voice_id": "pMsXgVXv3BLzUgSXRplE",
                        "model_id": "eleven_multilingual_v2",
                        "seed": None,
                        "apply_text_normalization": None,
                        "language_code": None,
                        "voice_settings": {
                            "stability": 0.5,
                            "similarity_boost": 0.75,
                            "style": 0.0,
                            "use_speaker_boost": True,
                            "speed": 1.0,
                        },
                    },
                    "edge": {
                        "enabled": None,
                        "voice": None,
                        "lang": None,
                        "output_format": None,
                        "pitch": None,
                        "rate": None,
                        "volume": None,
                        "save_subtitles": None,
                        "proxy": None,
                        "timeout_ms": None,
                    },
                    "prefs_path": None,
                    "max_text_length": 4096,
                    "timeout_ms": 30000,
                },
                "store": "/home/tester/.openclaw/voice-calls",
                "response_model": "openai/gpt-4o-mini",
                "response_system_prompt": None,
                "response_timeout_ms": 30000,
                "response_base_url": "https://api.openai.com/v1",
                "response_api_key": None,
                "twilio": {
                    "account_sid": None,
                    "auth_token": None,
                    "base_url": "https://api.twilio.com",
                    "signing_keys": {},
                },
                "telnyx": {
                    "api_key": None,
                    "connection_id": None,
                    "public_key": None,
                    "base_url": "https://api.telnyx.com",
                },
                "plivo": {"auth_id": None, "auth_token": None, "base_url": "https://api.plivo.com", "allow_v2_signatures": False},
                "metrics": {"enabled": False, "bind": "127.0.0.1", "port": 9464},
                "cluster": {"node_id": None, "lease_seconds": 10, "entry_url": None},
                "warnings": (),
            },
        )

    def test_class_defaults_match_parsed_defaults(self):
        """VoiceCallConfig() built directly equals the parsed empty config (same HOME)."""
        cfg = parse_config({}, {"HOME": os.path.expanduser("~")})
        self.assertEqual(VoiceCallConfig(), cfg)

    def test_store_tilde_expanded_with_home(self):
        """A store path starting with ~ is expanded with HOME from the given environment."""
        cfg = parse_config({"store": "~/calls"}, {"HOME": "/srv/vc"})
        self.assertEqual(cfg.store, "/srv/vc/calls")

    def test_store_relative_resolved_against_cwd(self):
        """A relative store path becomes absolute against the current directory."""
        cfg = parse_config({"store": "state/calls"}, ENV)
        self.assertEqual(cfg.store, os.path.join(os.getcwd(), "state", "calls"))

    def test_store_absolute_kept(self):
        """An absolute store path is kept (normalised)."""
        cfg = parse_config({"store": "/var/lib/voicecall/"}, ENV)
        self.assertEqual(cfg.store, "/var/lib/voicecall")

    def test_disabled_message(self):
        """The daemon's refusal text for a disabled config is the SPEC string."""
        self.assertEqual(
            DISABLED_MESSAGE, "Voice call disabled. Enable the plugin entry in config."
        )


FULL = {
    "enabled": True,
    "provider": "twilio",
    "fromNumber": "+15550001111",
    "toNumber": "+15550002222",
    "inboundPolicy": "allowlist",
    "allowFrom": ["+15550003333", "+15550004444"],
    "inboundGreeting": "Hi there",
    "outbound": {"defaultMode": "conversation", "notifyHangupDelaySec": 0},
    "maxDurationSeconds": 600,
    "staleCallReaperSeconds": 120,
    "silenceTimeoutMs": 900,
    "transcriptTimeoutMs": 60000,
    "ringTimeoutMs": 20000,
    "maxConcurrentCalls": 4,
    "serve": {"port": 8080, "bind": "0.0.0.0", "path": "/hook"},
    "tailscale": {"mode": "funnel", "path": "/ts"},
    "tunnel": {
        "provider": "ngrok",
        "ngrokAuthToken": "ngrok-secret",
        "ngrokDomain": "x.ngrok.app",
        "allowNgrokFreeTierLoopbackBypass": True,
    },
    "webhookSecurity": {
        "allowedHosts": ["voice.example.com"],
        "trustForwardingHeaders": True,
        "trustedProxyIPs": ["10.0.0.1"],
    },
    "streaming": {
        "enabled": True,
        "provider": "openai",
        "providers": {
            "openai": {
                "apiKey": "stream-secret",
                "model": "gpt-4o-mini-transcribe",
                "silenceDurationMs": 500,
                "vadThreshold": 0.7,
            }
        },
        "streamPath": "/media",
        "preStartTimeoutMs": 3000,
        "maxPendingConnections": 8,
        "maxPendingConnectionsPerIp": 2,
        "maxConnections": 64,
        "sttBaseUrl": "ws://127.0.0.1:9000/realtime",
    },
    "publicUrl": "https://voice.example.com/hook",
    "skipSignatureVerification": True,
    "stt": {"provider": "openai", "model": "whisper-2"},
    "tts": {"provider": "elevenlabs", "timeoutMs": 5000},
    "store": "/var/lib/voicecall",
    "responseModel": "openai/gpt-4o",
    "responseSystemPrompt": "Be terse.",
    "responseTimeoutMs": 10000,
    "responseBaseUrl": "http://127.0.0.1:8000/v1",
    "responseApiKey": "resp-secret",
    "twilio": {
        "accountSid": "AC123",
        "authToken": "tw-secret",
        "baseUrl": "http://127.0.0.1:9001",
        "signingKeys": {"SK1": "shared-secret"},
    },
    "telnyx": {
        "apiKey": "tx-secret",
        "connectionId": "c1",
        "publicKey": "pk",
        "baseUrl": "https://tx.test",
    },
    "plivo": {"authId": "MA1", "authToken": "pl-secret", "baseUrl": "https://pl.test"},
    "metrics": {"enabled": True, "bind": "0.0.0.0", "port": 9100},
}


class FullConfigTests(SynchronousTestCase):
    """Every key of SPEC §2 and of the project additions reaches its attribute."""

    def setUp(self):
        self.cfg = parse_config(FULL, ENV)

    def test_top_level(self):
        """Scalar top-level keys map to their snake_case attributes."""
        c = self.cfg
        self.assertEqual(
            (c.enabled, c.provider, c.from_number, c.to_number, c.inbound_policy, c.allow_from),
            (True, "twilio", "+15550001111", "+15550002222", "allowlist",
             ("+15550003333", "+15550004444")),
        )  # fmt: skip
        self.assertEqual(
            (c.inbound_greeting, c.max_duration_seconds, c.stale_call_reaper_seconds,
             c.silence_timeout_ms, c.transcript_timeout_ms, c.ring_timeout_ms,
             c.max_concurrent_calls, c.public_url, c.skip_signature_verification, c.store),
            ("Hi there", 600, 120, 900, 60000, 20000, 4, "https://voice.example.com/hook", True,
             "/var/lib/voicecall"),
        )  # fmt: skip
        self.assertEqual(
            (c.response_model, c.response_system_prompt, c.response_timeout_ms,
             c.response_base_url, c.response_api_key),
            ("openai/gpt-4o", "Be terse.", 10000, "http://127.0.0.1:8000/v1", "resp-secret"),
        )  # fmt: skip
        self.assertEqual(c.warnings, ())

    def test_sections(self):
        """Nested sections map to nested frozen objects with snake_case fields."""
        c = self.cfg
        self.assertEqual(attrs.astuple(c.outbound), ("conversation", 0, "ignore"))
        self.assertEqual((c.serve.port, c.serve.bind, c.serve.path), (8080, "0.0.0.0", "/hook"))
        self.assertEqual((c.tailscale.mode, c.tailscale.path), ("funnel", "/ts"))
        self.assertEqual(
            attrs.astuple(c.tunnel), ("ngrok", "ngrok-secret", "x.ngrok.app", True)
        )
        self.assertEqual(
            attrs.astuple(c.webhook_security),
            (("voice.example.com",), True, ("10.0.0.1",)),
        )
        self.assertEqual((c.stt.provider, c.stt.model), ("openai", "whisper-2"))
        self.assertEqual(
            attrs.astuple(c.twilio)[:3],
            ("AC123", "tw-secret", "http://127.0.0.1:9001"),
        )
        self.assertEqual(dict(c.twilio.signing_keys), {"SK1": "shared-secret"})
        self.assertEqual(attrs.astuple(c.telnyx), ("tx-secret", "c1", "pk", "https://tx.test"))
        self.assertEqual(attrs.astuple(c.plivo), ("MA1", "pl-secret", "https://pl.test", False))
        self.assertEqual(attrs.astuple(c.metrics), (True, "0.0.0.0", 9100))
        self.assertEqual((c.tts.provider, c.tts.timeout_ms), ("elevenlabs", 5000))

    def test_streaming_current_shape(self):
        """The current streaming shape lands in the flat streaming attributes, without warnings."""
        self.assertEqual(
            attrs.asdict(self.cfg.streaming),
            {
                "enabled": True,
                "stt_provider": "openai-realtime",
                "openai_api_key": "stream-secret",
                "stt_model": "gpt-4o-mini-transcribe",
                "silence_duration_ms": 500,
                "vad_threshold": 0.7,
                "stream_path": "/media",
                "pre_start_timeout_ms": 3000,
                "max_pending_connections": 8,
                "max_pending_connections_per_ip": 2,
                "max_connections": 64,
                "stt_base_url": "ws://127.0.0.1:9000/realtime",
            },
        )

    def test_signing_keys_read_only(self):
        """The signing-key mapping cannot be modified through the config."""
        with self.assertRaises(TypeError):
            self.cfg.twilio.signing_keys["SK2"] = "x"

    def test_frozen(self):
        """Config objects are immutable."""
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            self.cfg.serve.port = 1

    def test_secrets_not_in_repr(self):
        """No API key, token or signing secret appears in the repr of the config."""
        cfg = parse_config(
            {**FULL, "tts": {"openai": {"apiKey": "tts-oa-secret"},
                             "elevenlabs": {"apiKey": "tts-el-secret"}}},
            ENV,
        )  # fmt: skip
        text = repr(cfg)
        for secret in ("ngrok-secret", "stream-secret", "resp-secret", "tw-secret",
                       "shared-secret", "tx-secret", "pl-secret", "tts-oa-secret",
                       "tts-el-secret"):  # fmt: skip
            self.assertNotIn(secret, text)
        self.assertIn("AC123", text)


class SchemaTests(SynchronousTestCase):
    """Strict validation: unknown keys, types, ranges, formats; every problem at once."""

    def test_unknown_top_level_key(self):
        """An unknown top-level key is rejected with its full path."""
        self.assertEqual(problems_of(self, {"provder": "mock"}), [f"{P}.provder: unknown key"])

    def test_unknown_nested_key(self):
        """An unknown key inside a section is rejected with its full dotted path."""
        self.assertEqual(
            problems_of(self, {"serve": {"portt": 1}}), [f"{P}.serve.portt: unknown key"]
        )

    def test_unknown_deeply_nested_key(self):
        """Unknown keys are rejected at every depth, including inside tts sub-sections."""
        self.assertEqual(
            problems_of(self, {"tts": {"elevenlabs": {"voiceSettings": {"pitch": 1}}}}),
            [f"{P}.tts.elevenlabs.voiceSettings.pitch: unknown key"],
        )

    def test_error_string(self):
        """The exception text is the SPEC prefix followed by the problems joined by "; "."""
        exc = self.assertRaises(ConfigError, parse_config, {"a": 1, "b": 2}, ENV)
        self.assertEqual(
            str(exc), f"Invalid voice-call config: {P}.a: unknown key; {P}.b: unknown key"
        )

    def test_integer_range(self):
        """A port of 0 names the path and what was expected."""
        self.assertEqual(
            problems_of(self, {"serve": {"port": 0}}), [f"{P}.serve.port: expected an integer > 0"]
        )

    def test_port_upper_bound(self):
        """A port above 65535 is rejected."""
        self.assertEqual(
            problems_of(self, {"metrics": {"port": 70000}}),
            [f"{P}.metrics.port: expected an integer between 1 and 65535"],
        )

    def test_boolean_is_not_integer(self):
        """true is not accepted where an integer is expected."""
        self.assertEqual(
            problems_of(self, {"maxConcurrentCalls": True}),
            [f"{P}.maxConcurrentCalls: expected an integer > 0"],
        )

    def test_fraction_is_not_integer(self):
        """A fractional number is not an integer, but an integral float is."""
        self.assertEqual(
            problems_of(self, {"ringTimeoutMs": 1.5}),
            [f"{P}.ringTimeoutMs: expected an integer > 0"],
        )
        self.assertEqual(parse_config({"ringTimeoutMs": 2000.0}, ENV).ring_timeout_ms, 2000)

    def test_zero_allowed_where_non_negative(self):
        """Keys documented as >= 0 accept 0 and reject negatives."""
        cfg = parse_config(
            {"staleCallReaperSeconds": 0, "outbound": {"notifyHangupDelaySec": 0}}, ENV
        )
        self.assertEqual(
            (cfg.stale_call_reaper_seconds, cfg.outbound.notify_hangup_delay_sec), (0, 0)
        )
        self.assertEqual(
            problems_of(self, {"staleCallReaperSeconds": -1}),
            [f"{P}.staleCallReaperSeconds: expected an integer >= 0"],
        )

    def test_number_range_and_nan(self):
        """vadThreshold must be a number in 0..1; NaN and booleans are rejected."""
        for bad in (1.5, float("nan"), True, "0.5"):
            self.assertEqual(
                problems_of(self, {"streaming": {"vadThreshold": bad}}),
                [f"{P}.streaming.vadThreshold: expected a number between 0 and 1"],
            )

    def test_boolean_expected(self):
        """A string where a boolean is expected is rejected."""
        self.assertEqual(
            problems_of(self, {"skipSignatureVerification": "yes"}),
            [f"{P}.skipSignatureVerification: expected a boolean"],
        )

    def test_enum(self):
        """An enum value outside its choices lists the choices."""
        self.assertEqual(
            problems_of(self, {"inboundPolicy": "everyone"}),
            [f'{P}.inboundPolicy: expected one of "disabled", "allowlist", "pairing", "open"'],
        )

    def test_provider_enum(self):
        """An unknown provider is rejected."""
        self.assertEqual(
            problems_of(self, {"provider": "vonage"}),
            [f'{P}.provider: expected one of "telnyx", "twilio", "plivo", "mock"'],
        )

    def test_null_rejected(self):
        """JSON null is not accepted in place of a value."""
        self.assertEqual(
            problems_of(self, {"publicUrl": None, "serve": None}),
            [f"{P}.publicUrl: expected an absolute http(s) URL", f"{P}.serve: expected an object"],
        )

    def test_e164(self):
        """Phone numbers must be E.164, with the SPEC message, also inside allowFrom."""
        self.assertEqual(
            problems_of(self, {"fromNumber": "5550001234", "toNumber": "+0123",
                               "allowFrom": ["+15550001234", "+1 555 000"]}),
            [f"{P}.fromNumber: Expected E.164 format, e.g. +15550001234",
             f"{P}.toNumber: Expected E.164 format, e.g. +15550001234",
             f"{P}.allowFrom[1]: Expected E.164 format, e.g. +15550001234"],
        )  # fmt: skip

    def test_e164_rejects_trailing_newline(self):
        """A number followed by a newline is not E.164."""
        self.assertEqual(
            problems_of(self, {"toNumber": "+15550001234\n"}),
            [f"{P}.toNumber: Expected E.164 format, e.g. +15550001234"],
        )

    def test_array_expected(self):
        """A string where an array is expected is rejected."""
        self.assertEqual(
            problems_of(self, {"webhookSecurity": {"allowedHosts": "a.example"}}),
            [f"{P}.webhookSecurity.allowedHosts: expected an array"],
        )

    def test_empty_string_rejected(self):
        """Keys documented as non-empty strings reject the empty string."""
        self.assertEqual(
            problems_of(self, {"twilio": {"accountSid": ""},
                               "webhookSecurity": {"allowedHosts": [""]}}),
            [f"{P}.twilio.accountSid: expected a non-empty string",
             f"{P}.webhookSecurity.allowedHosts[0]: expected a non-empty string"],
        )  # fmt: skip

    def test_urls(self):
        """URL-valued keys must be absolute URLs of the right scheme."""
        self.assertEqual(
            problems_of(self, {
                "publicUrl": "voice.example.com/hook",
                "responseBaseUrl": "ftp://x.example",
                "twilio": {"baseUrl": "http://host:99999"},
                "telnyx": {"baseUrl": "https://exa mple.com"},
                "plivo": {"baseUrl": "https://"},
                "streaming": {"sttBaseUrl": "https://api.openai.com/v1/realtime"},
                "tts": {"openai": {"baseUrl": "/v1"}},
            }),
            [f"{P}.publicUrl: expected an absolute http(s) URL",
             f"{P}.responseBaseUrl: expected an absolute http(s) URL",
             f"{P}.twilio.baseUrl: expected an absolute http(s) URL",
             f"{P}.telnyx.baseUrl: expected an absolute http(s) URL",
             f"{P}.plivo.baseUrl: expected an absolute http(s) URL",
             f"{P}.streaming.sttBaseUrl: expected an absolute ws(s) URL",
             f"{P}.tts.openai.baseUrl: expected an absolute http(s) URL"],
        )  # fmt: skip

    def test_paths_must_start_with_slash(self):
        """Route paths must start with "/"."""
        self.assertEqual(
            problems_of(self, {"serve": {"path": "voice"}, "streaming": {"streamPath": ""}}),
            [f'{P}.serve.path: expected a path starting with "/"',
             f'{P}.streaming.streamPath: expected a path starting with "/"'],
        )  # fmt: skip

    def test_signing_keys_values(self):
        """Every signing-key secret must be a non-empty string."""
        self.assertEqual(
            problems_of(self, {"twilio": {"signingKeys": {"SK1": "ok", "SK2": 5}}}),
            [f"{P}.twilio.signingKeys.SK2: expected a non-empty string"],
        )

    def test_not_an_object(self):
        """A config that is not an object is rejected."""
        self.assertEqual(problems_of(self, ["provider"]), [f"{P}: expected an object"])

    def test_many_problems_together(self):
        """Schema problems and provider-validation problems are all reported, in order."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio", "serve": {"port": "80", "x": 1},
                               "maxDurationSeconds": 0, "tts": {"timeoutMs": 10}}, {}),
            [f"{P}.serve.port: expected an integer > 0",
             f"{P}.serve.x: unknown key",
             f"{P}.maxDurationSeconds: expected an integer > 0",
             f"{P}.tts.timeoutMs: expected an integer between 1000 and 120000",
             f"{P}.fromNumber is required (or set TWILIO_FROM_NUMBER env)",
             f"{P}.twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)",
             f"{P}.twilio.authToken is required (or set TWILIO_AUTH_TOKEN env)"],
        )  # fmt: skip

    def test_hardened_keys_together(self):
        """The schema accepts webhookSecurity, streaming caps and the stale reaper together."""
        cfg = parse_config(
            {
                "provider": "twilio",
                "fromNumber": "+15550001234",
                "twilio": TWILIO_CREDS,
                "staleCallReaperSeconds": 360,
                "webhookSecurity": {
                    "allowedHosts": ["voice.example.com"],
                    "trustForwardingHeaders": False,
                    "trustedProxyIPs": ["127.0.0.1"],
                },
                "streaming": {
                    "enabled": True,
                    "preStartTimeoutMs": 5000,
                    "maxPendingConnections": 16,
                    "maxPendingConnectionsPerIp": 4,
                    "maxConnections": 64,
                },
            },
            ENV,
        )
        self.assertEqual(cfg.stale_call_reaper_seconds, 360)
        self.assertEqual(cfg.webhook_security.allowed_hosts, ("voice.example.com",))
        self.assertEqual(cfg.streaming.max_connections, 64)


class TtsSchemaTests(SynchronousTestCase):
    """The tts section (SPEC §2.3) is validated strictly and exposed as TtsConfig."""

    def test_all_keys_kept(self):
        """Every documented tts key is accepted and kept in snake_case."""
        tts = parse_config({"tts": {
            "auto": "inbound", "enabled": True, "mode": "all", "provider": "openai",
            "summaryModel": "openai/gpt-4o-mini", "prefsPath": "/tmp/p.json",
            "maxTextLength": 100, "timeoutMs": 1000,
            "modelOverrides": {"enabled": True, "allowText": False, "allowProvider": True,
                               "allowVoice": True, "allowModelId": False,
                               "allowVoiceSettings": True, "allowNormalization": False,
                               "allowSeed": True},
            "openai": {"apiKey": "k", "model": "tts-1", "voice": "nova",
                       "baseUrl": "http://127.0.0.1:1/v1", "speed": 1.25, "instructions": ""},
            "elevenlabs": {"apiKey": "e", "baseUrl": "http://127.0.0.1:2", "voiceId": "v",
                           "modelId": "m", "seed": 4294967295, "applyTextNormalization": "on",
                           "languageCode": "de",
                           "voiceSettings": {"stability": 1, "similarityBoost": 0,
                                             "style": 0.5, "useSpeakerBoost": False,
                                             "speed": 2}},
            "edge": {"enabled": False, "voice": "en-US-Aria", "lang": "en-US",
                     "outputFormat": "mp3", "pitch": "+0Hz", "rate": "+0%", "volume": "+0%",
                     "saveSubtitles": False, "proxy": "http://p", "timeoutMs": 120000},
        }}, ENV).tts  # fmt: skip
        self.assertEqual(
            (tts.auto, tts.enabled, tts.mode, tts.provider, tts.summary_model, tts.prefs_path,
             tts.max_text_length, tts.timeout_ms),
            ("inbound", True, "all", "openai", "openai/gpt-4o-mini", "/tmp/p.json", 100, 1000),
        )  # fmt: skip
        self.assertEqual(
            attrs.astuple(tts.model_overrides), (True, False, True, True, False, True, False, True)
        )
        self.assertEqual(
            attrs.astuple(tts.openai), ("k", "tts-1", "nova", "http://127.0.0.1:1/v1", 1.25, "")
        )
        self.assertEqual(
            attrs.astuple(tts.elevenlabs),
            ("e", "http://127.0.0.1:2", "v", "m", 4294967295, "on", "de",
             (1.0, 0.0, 0.5, False, 2.0)),
        )  # fmt: skip
        self.assertEqual(
            attrs.astuple(tts.edge),
            (False, "en-US-Aria", "en-US", "mp3", "+0Hz", "+0%", "+0%", False, "http://p", 120000),
        )

    def test_ranges(self):
        """TTS numeric ranges are enforced."""
        self.assertEqual(
            problems_of(self, {"tts": {
                "maxTextLength": 0,
                "elevenlabs": {"seed": 4294967296,
                               "voiceSettings": {"speed": 0.4, "stability": -0.1}},
                "edge": {"timeoutMs": 999},
                "openai": {"speed": 0.2},
            }}),
            [f"{P}.tts.maxTextLength: expected an integer > 0",
             f"{P}.tts.elevenlabs.seed: expected an integer between 0 and 4294967295",
             f"{P}.tts.elevenlabs.voiceSettings.speed: expected a number between 0.5 and 2",
             f"{P}.tts.elevenlabs.voiceSettings.stability: expected a number between 0 and 1",
             f"{P}.tts.edge.timeoutMs: expected an integer between 1000 and 120000",
             f"{P}.tts.openai.speed: expected a number between 0.25 and 4"],
        )  # fmt: skip

    def test_enums(self):
        """TTS enums reject values outside their choices."""
        self.assertEqual(
            problems_of(self, {"tts": {"provider": 7, "auto": "never",
                                       "elevenlabs": {"applyTextNormalization": "yes"}}}),
            [f'{P}.tts.provider: expected one of "openai", "elevenlabs", "edge"',
             f'{P}.tts.auto: expected one of "off", "always", "inbound", "tagged"',
             f'{P}.tts.elevenlabs.applyTextNormalization: expected one of "auto", "on", "off"'],
        )  # fmt: skip

    def test_other_tts_provider_warned(self):
        """A tts.provider voicecall cannot use for calls (OpenClaw has more) is dropped with a warning."""
        cfg = parse_config({"tts": {"provider": "typecast"}}, ENV)
        self.assertIsNone(cfg.tts.provider)
        self.assertEqual(len(cfg.warnings), 1)
        self.assertIn('provider "typecast" is not used for calls', cfg.warnings[0])
        self.assertEqual(parse_config({"tts": {"provider": "microsoft"}}, ENV).tts.provider, "edge")

    def test_legacy_plugin_tts_fields_rejected(self):
        """The removed plugin fields tts.model / tts.voice are unknown keys."""
        self.assertEqual(
            problems_of(self, {"tts": {"voice": "alloy"}}), [f"{P}.tts.voice: unknown key"]
        )


class ProviderValidationTests(SynchronousTestCase):
    """SPEC §2.5 provider validation with env fallbacks (§2.4) and the exact messages."""

    def test_twilio_config_credentials(self):
        """Twilio passes with credentials in config."""
        cfg = parse_config(
            {"provider": "twilio", "fromNumber": "+15550001234", "twilio": TWILIO_CREDS}, ENV
        )
        self.assertEqual((cfg.twilio.account_sid, cfg.twilio.auth_token), ("AC123", "tw-secret"))

    def test_twilio_env_credentials(self):
        """Twilio passes with credentials and number from the environment only."""
        env = {"TWILIO_ACCOUNT_SID": "ACenv", "TWILIO_AUTH_TOKEN": "tok-env",
               "TWILIO_FROM_NUMBER": "+15550009999"}  # fmt: skip
        cfg = parse_config({"provider": "twilio"}, env)
        self.assertEqual(
            (cfg.twilio.account_sid, cfg.twilio.auth_token, cfg.from_number),
            ("ACenv", "tok-env", "+15550009999"),
        )

    def test_twilio_mixed_credentials(self):
        """Config values win over env; absent ones come from env."""
        env = {"TWILIO_ACCOUNT_SID": "ACenv", "TWILIO_AUTH_TOKEN": "tok-env",
               "TWILIO_FROM_NUMBER": "+15550009999"}  # fmt: skip
        cfg = parse_config(
            {"provider": "twilio", "fromNumber": "+15550001234", "twilio": {"accountSid": "ACcfg"}},
            env,
        )
        self.assertEqual(
            (cfg.twilio.account_sid, cfg.twilio.auth_token, cfg.from_number),
            ("ACcfg", "tok-env", "+15550001234"),
        )

    def test_twilio_missing_everywhere(self):
        """Twilio without credentials anywhere fails with the exact SPEC messages."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio"}, {}),
            [f"{P}.fromNumber is required (or set TWILIO_FROM_NUMBER env)",
             f"{P}.twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)",
             f"{P}.twilio.authToken is required (or set TWILIO_AUTH_TOKEN env)"],
        )  # fmt: skip

    def test_twilio_missing_auth_token_only(self):
        """Only the missing credential is reported."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio", "fromNumber": "+15550001234",
                               "twilio": {"accountSid": "AC1"}}, {}),
            [f"{P}.twilio.authToken is required (or set TWILIO_AUTH_TOKEN env)"],
        )  # fmt: skip

    def test_empty_env_is_absent(self):
        """An empty environment variable does not count as a credential."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio", "fromNumber": "+15550001234"},
                        {"TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": "t"}),
            [f"{P}.twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)"],
        )  # fmt: skip

    def test_twilio_env_from_number_validated(self):
        """A TWILIO_FROM_NUMBER that is not E.164 is reported under the variable's name."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio", "twilio": TWILIO_CREDS},
                        {"TWILIO_FROM_NUMBER": "5550001234"}),
            ["TWILIO_FROM_NUMBER: Expected E.164 format, e.g. +15550001234"],
        )  # fmt: skip

    def test_telnyx_config_credentials(self):
        """Telnyx passes with credentials in config."""
        cfg = parse_config(
            {"provider": "telnyx", "fromNumber": "+15550001234", "telnyx": TELNYX_CREDS}, ENV
        )
        self.assertEqual(cfg.telnyx.api_key, "KEY123")

    def test_telnyx_env_credentials(self):
        """Telnyx passes with credentials from the environment."""
        env = {"TELNYX_API_KEY": "k", "TELNYX_CONNECTION_ID": "c", "TELNYX_PUBLIC_KEY": "p"}
        cfg = parse_config({"provider": "telnyx", "fromNumber": "+15550001234"}, env)
        self.assertEqual(
            (cfg.telnyx.api_key, cfg.telnyx.connection_id, cfg.telnyx.public_key), ("k", "c", "p")
        )

    def test_telnyx_missing_api_key(self):
        """Telnyx without an API key fails with the exact message."""
        self.assertEqual(
            problems_of(self, {"provider": "telnyx", "fromNumber": "+15550001234",
                               "telnyx": {"connectionId": "c", "publicKey": "p"}}, {}),
            [f"{P}.telnyx.apiKey is required (or set TELNYX_API_KEY env)"],
        )  # fmt: skip

    def test_telnyx_missing_everything(self):
        """Telnyx with nothing set lists fromNumber (no env hint) and every credential."""
        self.assertEqual(
            problems_of(self, {"provider": "telnyx"}, {}),
            [f"{P}.fromNumber is required",
             f"{P}.telnyx.apiKey is required (or set TELNYX_API_KEY env)",
             f"{P}.telnyx.connectionId is required (or set TELNYX_CONNECTION_ID env)",
             f"{P}.telnyx.publicKey is required (or set TELNYX_PUBLIC_KEY env)"],
        )  # fmt: skip

    def test_telnyx_public_key_optional_when_unsigned(self):
        """The Telnyx public key is not required when skipSignatureVerification is true."""
        cfg = parse_config(
            {"provider": "telnyx", "fromNumber": "+15550001234", "skipSignatureVerification": True,
             "telnyx": {"apiKey": "k", "connectionId": "c"}},
            {},
        )  # fmt: skip
        self.assertIsNone(cfg.telnyx.public_key)

    def test_plivo_config_credentials(self):
        """Plivo passes with credentials in config."""
        cfg = parse_config(
            {"provider": "plivo", "fromNumber": "+15550001234", "plivo": PLIVO_CREDS}, ENV
        )
        self.assertEqual((cfg.plivo.auth_id, cfg.plivo.auth_token), ("MA123", "pl-secret"))

    def test_plivo_env_credentials(self):
        """Plivo passes with credentials from the environment."""
        cfg = parse_config(
            {"provider": "plivo", "fromNumber": "+15550001234"},
            {"PLIVO_AUTH_ID": "MAenv", "PLIVO_AUTH_TOKEN": "t"},
        )
        self.assertEqual((cfg.plivo.auth_id, cfg.plivo.auth_token), ("MAenv", "t"))

    def test_plivo_missing_auth_id(self):
        """Plivo without an auth id fails with the exact message."""
        self.assertEqual(
            problems_of(self, {"provider": "plivo", "fromNumber": "+15550001234"},
                        {"PLIVO_AUTH_TOKEN": "t"}),
            [f"{P}.plivo.authId is required (or set PLIVO_AUTH_ID env)"],
        )  # fmt: skip

    def test_plivo_missing_everything(self):
        """Plivo with nothing set lists fromNumber and both credentials."""
        self.assertEqual(
            problems_of(self, {"provider": "plivo"}, {}),
            [f"{P}.fromNumber is required",
             f"{P}.plivo.authId is required (or set PLIVO_AUTH_ID env)",
             f"{P}.plivo.authToken is required (or set PLIVO_AUTH_TOKEN env)"],
        )  # fmt: skip

    def test_mock_needs_nothing(self):
        """The mock provider needs no number and no credentials."""
        self.assertEqual(parse_config({"provider": "mock"}, {}).provider, "mock")

    def test_env_only_for_selected_provider(self):
        """Another provider's env variables are not applied."""
        env = {"TELNYX_API_KEY": "k", "PLIVO_AUTH_ID": "MA", "TWILIO_ACCOUNT_SID": "AC",
               "TWILIO_FROM_NUMBER": "+15550009999"}  # fmt: skip
        cfg = parse_config({"provider": "mock"}, env)
        self.assertEqual(
            (cfg.telnyx.api_key, cfg.plivo.auth_id, cfg.twilio.account_sid, cfg.from_number),
            (None, None, None, None),
        )

    def test_streaming_requires_twilio(self):
        """Streaming with a provider other than Twilio is rejected."""
        self.assertEqual(
            problems_of(self, {"provider": "mock", "streaming": {"enabled": True}}),
            [f'{P}.provider must be "twilio" when streaming.enabled is true'],
        )

    def test_disabled_skips_validation(self):
        """With enabled false, provider validation is skipped and the config loads."""
        cfg = parse_config({"enabled": False, "provider": "twilio"}, {})
        self.assertEqual((cfg.enabled, cfg.provider), (False, "twilio"))

    def test_disabled_without_provider(self):
        """With enabled false and no provider, the provider stays unset."""
        self.assertIsNone(parse_config({"enabled": False}, {}).provider)

    def test_disabled_still_checks_schema(self):
        """With enabled false, schema problems are still reported."""
        self.assertEqual(
            problems_of(self, {"enabled": False, "serve": {"port": -1}}),
            [f"{P}.serve.port: expected an integer > 0"],
        )

    def test_ngrok_env_always_applies(self):
        """ngrok settings fall back to NGROK_AUTHTOKEN / NGROK_DOMAIN whatever the provider."""
        cfg = parse_config({}, {"NGROK_AUTHTOKEN": "n", "NGROK_DOMAIN": "d.ngrok.app"})
        self.assertEqual(
            (cfg.tunnel.ngrok_auth_token, cfg.tunnel.ngrok_domain), ("n", "d.ngrok.app")
        )

    def test_ngrok_config_wins(self):
        """A configured ngrok token is not replaced by the environment."""
        cfg = parse_config({"tunnel": {"ngrokAuthToken": "cfg"}}, {"NGROK_AUTHTOKEN": "env"})
        self.assertEqual(cfg.tunnel.ngrok_auth_token, "cfg")

    def test_openai_env_fallbacks(self):
        """OPENAI_API_KEY fills the streaming key, the OpenAI TTS key and the response key."""
        cfg = parse_config({}, {"OPENAI_API_KEY": "oa"})
        self.assertEqual(
            (cfg.streaming.openai_api_key, cfg.tts.openai.api_key, cfg.response_api_key),
            ("oa", "oa", "oa"),
        )

    def test_openai_env_does_not_override(self):
        """Configured OpenAI keys win over OPENAI_API_KEY."""
        cfg = parse_config(
            {"streaming": {"openaiApiKey": "s"}, "tts": {"openai": {"apiKey": "t"}},
             "responseApiKey": "r"},
            {"OPENAI_API_KEY": "oa"},
        )  # fmt: skip
        self.assertEqual(
            (cfg.streaming.openai_api_key, cfg.tts.openai.api_key, cfg.response_api_key),
            ("s", "t", "r"),
        )

    def test_elevenlabs_env_fallbacks(self):
        """The ElevenLabs key comes from ELEVENLABS_API_KEY, else XI_API_KEY."""
        both = parse_config({}, {"ELEVENLABS_API_KEY": "el", "XI_API_KEY": "xi"})
        xi_only = parse_config({}, {"XI_API_KEY": "xi"})
        self.assertEqual(
            (both.tts.elevenlabs.api_key, xi_only.tts.elevenlabs.api_key), ("el", "xi")
        )


class LegacyTests(SynchronousTestCase):
    """Legacy keys are normalised with a warning naming the replacement."""

    def test_provider_log(self):
        """provider "log" becomes "mock" with a warning."""
        cfg = parse_config({"provider": "log"}, ENV)
        self.assertEqual(cfg.provider, "mock")
        self.assertEqual(cfg.warnings, ('provider "log" is deprecated; use "mock" instead',))

    def test_twilio_from(self):
        """twilio.from becomes fromNumber with a warning."""
        cfg = parse_config(
            {"provider": "twilio", "twilio": {**TWILIO_CREDS, "from": "+15550001234"}}, {}
        )
        self.assertEqual(cfg.from_number, "+15550001234")
        self.assertEqual(cfg.warnings, ("twilio.from is deprecated; use fromNumber instead",))

    def test_from_number_wins_over_twilio_from(self):
        """An explicit fromNumber is kept over the legacy twilio.from."""
        cfg = parse_config(
            {"fromNumber": "+15550001111", "twilio": {"from": "+15550002222"}}, ENV
        )
        self.assertEqual(cfg.from_number, "+15550001111")

    def test_twilio_from_invalid(self):
        """An invalid legacy twilio.from is reported at its own path."""
        self.assertEqual(
            problems_of(self, {"twilio": {"from": "12345"}}),
            [f"{P}.twilio.from: Expected E.164 format, e.g. +15550001234"],
        )

    def test_legacy_streaming_keys(self):
        """The flat streaming keys are applied, each with a warning naming its replacement."""
        cfg = parse_config(
            {"streaming": {"sttProvider": "openai-realtime", "openaiApiKey": "k",
                           "sttModel": "m", "silenceDurationMs": 600, "vadThreshold": 0.2}},
            ENV,
        )  # fmt: skip
        s = cfg.streaming
        self.assertEqual(
            (s.stt_provider, s.openai_api_key, s.stt_model, s.silence_duration_ms, s.vad_threshold),
            ("openai-realtime", "k", "m", 600, 0.2),
        )
        self.assertEqual(
            cfg.warnings,
            ("streaming.sttProvider is deprecated; use streaming.provider instead",
             "streaming.openaiApiKey is deprecated; use streaming.providers.openai.apiKey instead",
             "streaming.sttModel is deprecated; use streaming.providers.openai.model instead",
             ("streaming.silenceDurationMs is deprecated;"
             " use streaming.providers.openai.silenceDurationMs instead"),
             ("streaming.vadThreshold is deprecated;"
             " use streaming.providers.openai.vadThreshold instead")),
        )  # fmt: skip

    def test_legacy_streaming_keys_validated(self):
        """Legacy streaming values are still type-checked at their own paths."""
        self.assertEqual(
            problems_of(self, {"streaming": {"sttProvider": "deepgram", "silenceDurationMs": 0}}),
            [f'{P}.streaming.sttProvider: expected one of "openai-realtime"',
             f"{P}.streaming.silenceDurationMs: expected an integer > 0"],
        )  # fmt: skip

    def test_both_shapes_agreeing(self):
        """The same value in both shapes is accepted (with the deprecation warning)."""
        cfg = parse_config(
            {"streaming": {"openaiApiKey": "k", "providers": {"openai": {"apiKey": "k"}}}}, ENV
        )
        self.assertEqual(cfg.streaming.openai_api_key, "k")
        self.assertEqual(len(cfg.warnings), 1)

    def test_both_shapes_conflicting(self):
        """Different values in the two shapes are an error naming both keys."""
        self.assertEqual(
            problems_of(self, {"streaming": {"sttModel": "a",
                                             "providers": {"openai": {"model": "b"}}}}),
            [(f"{P}.streaming.sttModel: conflicts with {P}.streaming.providers.openai.model;"
             " remove the deprecated key")],
        )  # fmt: skip

    def test_current_shape_validated(self):
        """The current streaming shape is strict, with full paths."""
        self.assertEqual(
            problems_of(self, {"streaming": {
                "provider": "deepgram",
                "providers": {"openai": {"vadThreshold": 2, "lang": "en"}, "deepgram": {}},
            }}),
            [f'{P}.streaming.provider: expected one of "openai"',
             f"{P}.streaming.providers.openai.vadThreshold: expected a number between 0 and 1",
             f"{P}.streaming.providers.openai.lang: unknown key",
             f"{P}.streaming.providers.deepgram: unknown key"],
        )  # fmt: skip

    def test_input_not_modified(self):
        """Normalisation does not modify the caller's data."""
        data = {"provider": "log", "twilio": {"from": "+15550001234"},
                "streaming": {"openaiApiKey": "k"}}  # fmt: skip
        before = json.dumps(data, sort_keys=True)
        parse_config(data, ENV)
        self.assertEqual(json.dumps(data, sort_keys=True), before)


class OpenClawFileTests(SynchronousTestCase):
    """A whole OpenClaw config file yields the plugin entry's config and merged messages.tts."""

    def test_extracts_plugin_config(self):
        """The plugin config is taken from plugins.entries.voice-call.config."""
        cfg = parse_config(
            {"plugins": {"entries": {"voice-call": {"enabled": True, "config": {
                "provider": "twilio", "fromNumber": "+15550001234", "twilio": TWILIO_CREDS}}},
                "other": {"x": 1}},
             "gateway": {"port": 1}},
            ENV,
        )  # fmt: skip
        self.assertEqual((cfg.provider, cfg.twilio.account_sid), ("twilio", "AC123"))

    def test_messages_tts_merged(self):
        """Plugin tts deep-merges over messages.tts: the voice overrides, the base model stays."""
        cfg = parse_config(
            {"messages": {"tts": {"provider": "openai",
                                  "openai": {"model": "tts-1-hd", "voice": "echo",
                                             "apiKey": "core-key"}}},
             "plugins": {"entries": {"voice-call": {"config": {
                 "tts": {"openai": {"voice": "nova"}}}}}}},
            {},
        )  # fmt: skip
        oa = cfg.tts.openai
        self.assertEqual((cfg.tts.provider, oa.model, oa.voice, oa.api_key),
                         ("openai", "tts-1-hd", "nova", "core-key"))  # fmt: skip

    def test_messages_tts_only(self):
        """Without a plugin tts, messages.tts is used as it is."""
        cfg = parse_config({"messages": {"tts": {"openai": {"voice": "onyx"}}}}, ENV)
        self.assertEqual(cfg.tts.openai.voice, "onyx")

    def test_missing_entry_is_empty_config(self):
        """A file without a voice-call entry gives the default (empty) plugin config."""
        self.assertEqual(parse_config({"plugins": {"entries": {}}}, ENV), parse_config({}, ENV))

    def test_entry_disabled(self):
        """A plugin entry with enabled false disables the plugin."""
        cfg = parse_config(
            {"plugins": {"entries": {"voice-call": {"enabled": False,
                                                    "config": {"provider": "twilio"}}}}}, {}
        )  # fmt: skip
        self.assertFalse(cfg.enabled)

    def test_prototype_keys_in_tts_rejected(self):
        """Top-level and nested __proto__ / constructor keys in a tts section are refused."""
        polluted = {"messages": {"tts": {"openai": {"voice": "echo"}}},
                    "plugins": {"entries": {"voice-call": {"config": {"tts": {
                        "__proto__": {"polluted": True},
                        "openai": {"constructor": {"x": 1}}}}}}}}  # fmt: skip
        self.assertEqual(
            problems_of(self, polluted),
            [f"{P}.tts.__proto__: unknown key", f"{P}.tts.openai.constructor: unknown key"],
        )

    def test_problems_named_where_written(self):
        """Problems in messages.tts and in the plugin entry are named by their own paths."""
        self.assertEqual(
            problems_of(self, {"messages": {"tts": {"mode": "some"}},
                               "plugins": {"entries": {"voice-call": {"enabled": "yes",
                                                                      "config": {"tts": 3}}}}}),
            ["plugins.entries.voice-call.enabled: expected a boolean",
             'messages.tts.mode: expected one of "final", "all"',
             f"{P}.tts: expected an object"],
        )  # fmt: skip

    def test_bad_structure(self):
        """Non-object plugins / config members are reported."""
        self.assertEqual(problems_of(self, {"plugins": []}), ["plugins: expected an object"])
        self.assertEqual(
            problems_of(self, {"plugins": {"entries": {"voice-call": {"config": "x"}}}}),
            [f"{P}: expected an object"],
        )


class DeepMergeTests(SynchronousTestCase):
    """deep_merge_defined follows SPEC §2.3 exactly."""

    def test_nested_objects_merge(self):
        """Nested objects merge key by key."""
        self.assertEqual(
            deep_merge_defined({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3, "z": 4}}),
            {"a": {"x": 1, "y": 3, "z": 4}, "b": 1},
        )

    def test_undefined_keeps_base(self):
        """An undefined override, at the top or for a key, keeps the base value."""
        self.assertEqual(deep_merge_defined({"a": 1}, UNDEFINED), {"a": 1})
        self.assertEqual(deep_merge_defined({"a": 1}, {"a": UNDEFINED}), {"a": 1})

    def test_null_is_kept(self):
        """None (JSON null) is a value and replaces the base."""
        self.assertEqual(deep_merge_defined({"a": {"x": 1}}, {"a": None}), {"a": None})
        self.assertIsNone(deep_merge_defined({"a": 1}, None))

    def test_new_keys_added(self):
        """Keys only in the override are added."""
        self.assertEqual(deep_merge_defined({"a": 1}, {"b": {"c": 2}}), {"a": 1, "b": {"c": 2}})

    def test_arrays_replace(self):
        """Arrays are not objects: they replace, and an object replaces an array."""
        self.assertEqual(deep_merge_defined({"a": [1, 2]}, {"a": [3]}), {"a": [3]})
        self.assertEqual(deep_merge_defined({"a": [1]}, {"a": {"b": 1}}), {"a": {"b": 1}})
        self.assertEqual(deep_merge_defined([1], {"b": 1}), {"b": 1})
        self.assertEqual(deep_merge_defined({"b": 1}, [1]), [1])

    def test_non_objects_replace(self):
        """Scalars replace objects and vice versa."""
        self.assertEqual(deep_merge_defined({"a": {"b": 1}}, {"a": "s"}), {"a": "s"})
        self.assertEqual(deep_merge_defined("x", 5), 5)

    def test_prototype_keys_ignored_at_every_depth(self):
        """__proto__, constructor and prototype are skipped at the top and nested levels."""
        merged = deep_merge_defined(
            {"a": {"x": 1}},
            {"__proto__": {"polluted": True}, "constructor": 1, "prototype": 2,
             "a": {"__proto__": {"p": 1}, "y": 2},
             "n": {"deep": {"constructor": {"p": 1}, "ok": 1}}},
        )  # fmt: skip
        self.assertEqual(merged, {"a": {"x": 1, "y": 2}, "n": {"deep": {"ok": 1}}})

    def test_inputs_untouched(self):
        """Neither input is modified."""
        base = {"a": {"x": 1}}
        override = {"a": {"y": 2}}
        deep_merge_defined(base, override)
        self.assertEqual((base, override), ({"a": {"x": 1}}, {"a": {"y": 2}}))


class LoadConfigTests(SynchronousTestCase):
    """load_config reads JSON and JSON5 files and reports file problems as ConfigError."""

    def write(self, text, name="voicecall.json5"):
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def setUp(self):
        self.dir = self.mktemp()

    def test_json(self):
        """A plain JSON file loads."""
        path = self.write(json.dumps({"provider": "mock", "serve": {"port": 4000}}), "c.json")
        self.assertEqual(load_config(path, ENV).serve.port, 4000)

    def test_json5(self):
        """A JSON5 file with comments, unquoted keys and trailing commas loads."""
        path = self.write(
            "// voice\n{\n  provider: 'twilio', fromNumber: '+15550001234',\n"
            "  twilio: {accountSid: 'AC1', authToken: 't',},  /* creds */\n}\n"
        )
        cfg = load_config(path, ENV)
        self.assertEqual((cfg.provider, cfg.twilio.account_sid), ("twilio", "AC1"))

    def test_whole_openclaw_file(self):
        """A whole OpenClaw JSON5 file loads its plugin entry."""
        path = self.write(
            "{messages: {tts: {openai: {model: 'tts-1'}}},"
            " plugins: {entries: {'voice-call': {config: {tts: {openai: {voice: 'nova'}}}}}}}"
        )
        cfg = load_config(path, ENV)
        self.assertEqual((cfg.tts.openai.model, cfg.tts.openai.voice), ("tts-1", "nova"))

    def test_missing_file(self):
        """A missing file is a ConfigError naming the path."""
        path = os.path.join(self.mktemp(), "nope.json5")
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertEqual(
            exc.problems, [f"{path}: cannot read config file: No such file or directory"]
        )

    def test_unparsable_file(self):
        """A syntax error is a ConfigError naming the path."""
        path = self.write("{provider: }")
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertEqual(exc.problems, [f"{path}:1:12: not valid JSON or JSON5: Unexpected \"}}\""])
        self.assertEqual(exc.lines(), exc.problems)

    def test_duplicate_keys(self):
        """Duplicate keys in one object are rejected."""
        path = self.write('{"provider": "mock", "provider": "twilio"}')
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertIn("provider", exc.problems[0])

    def test_oversized_file(self):
        """A file over the size cap is rejected without parsing it."""
        path = self.write("{}" + " " * (1024 * 1024))
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertEqual(exc.problems, [f"{path}: config file is larger than 1048576 bytes"])

    def test_json5_infinity_rejected(self):
        """JSON5 Infinity is not accepted as a number."""
        path = self.write("{streaming: {vadThreshold: Infinity}, serve: {port: Infinity}}")
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertEqual(
            exc.problems,
            [f"{P}.streaming.vadThreshold: expected a number between 0 and 1",
             f"{P}.serve.port: expected an integer > 0"],
        )  # fmt: skip

    def test_schema_problems_pass_through(self):
        """Schema problems of a loaded file are raised like parse_config's."""
        path = self.write("{serve: {port: 0}}")
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertEqual(exc.problems, [f"{P}.serve.port: expected an integer > 0"])


class FindConfigPathTests(SynchronousTestCase):
    """find_config_path discovery order."""

    def setUp(self):
        self.cwd = os.path.abspath(self.mktemp())
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        os.makedirs(os.path.join(self.home, ".config", "voicecall"))
        self.env = {"HOME": self.home}

    def touch(self, *parts):
        path = os.path.join(*parts)
        open(path, "w").close()
        return path

    def test_search_paths(self):
        """Without explicit choices the candidates are cwd json5, cwd json, ~/.config, /etc."""
        self.assertEqual(
            config_search_paths(self.env, self.cwd),
            [os.path.join(self.cwd, "voicecall.json5"),
             os.path.join(self.cwd, "voicecall.json"),
             os.path.join(self.home, ".config", "voicecall", "voicecall.json5"),
             "/etc/voicecall/voicecall.json5"],
        )  # fmt: skip

    def test_explicit_first_even_if_missing(self):
        """An explicit path wins over everything and is returned even if it does not exist."""
        self.touch(self.cwd, "voicecall.json5")
        env = {**self.env, "VOICECALL_CONFIG": "/x/env.json5"}
        self.assertEqual(find_config_path("/x/missing.json5", env, self.cwd), "/x/missing.json5")

    def test_explicit_relative_to_cwd(self):
        """A relative explicit path is resolved against cwd."""
        self.assertEqual(
            find_config_path("conf/v.json5", self.env, self.cwd),
            os.path.join(self.cwd, "conf", "v.json5"),
        )

    def test_env_second_even_if_missing(self):
        """VOICECALL_CONFIG is used when no explicit path is given, even if missing."""
        self.touch(self.cwd, "voicecall.json5")
        env = {**self.env, "VOICECALL_CONFIG": "/x/env.json5"}
        self.assertEqual(find_config_path(None, env, self.cwd), "/x/env.json5")

    def test_cwd_json5_before_json(self):
        """voicecall.json5 in cwd is preferred over voicecall.json and the home file."""
        self.touch(self.cwd, "voicecall.json")
        self.touch(self.home, ".config", "voicecall", "voicecall.json5")
        first = self.touch(self.cwd, "voicecall.json5")
        self.assertEqual(find_config_path(None, self.env, self.cwd), first)

    def test_cwd_json_before_home(self):
        """voicecall.json in cwd is preferred over the home file."""
        self.touch(self.home, ".config", "voicecall", "voicecall.json5")
        first = self.touch(self.cwd, "voicecall.json")
        self.assertEqual(find_config_path(None, self.env, self.cwd), first)

    def test_home_file(self):
        """The file under ~/.config/voicecall is found when cwd has none."""
        home_file = self.touch(self.home, ".config", "voicecall", "voicecall.json5")
        self.assertEqual(find_config_path(None, self.env, self.cwd), home_file)

    def test_nothing_found(self):
        """None when no candidate exists."""
        if os.path.exists("/etc/voicecall/voicecall.json5"):
            raise self.skipTest("a system config exists on this machine")
        self.assertIsNone(find_config_path(None, self.env, self.cwd))


class RenderedProblemsTests(SynchronousTestCase):
    """ConfigError.lines: what a person reads (issue 14): file, key as written, value, suggestion."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def lines_of(self, data, name="voicecall.json5", env=ENV):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        os.chmod(path, 0o600)
        exc = self.assertRaises(ConfigError, load_config, path, env)
        return path, exc.lines()

    def test_standalone_file_keys_as_written(self):
        """A bare plugin config names keys as written there, with the value received and the file."""
        path, lines = self.lines_of({"fromNumber": "555", "serve": {"port": "x"}})
        self.assertEqual(
            lines,
            [f'{path}: fromNumber: Expected E.164 format, e.g. +15550001234 (got "555")',
             f'{path}: serve.port: expected an integer > 0 (got "x")'],
        )  # fmt: skip

    def test_spec_messages_are_the_core(self):
        """The SPEC §2.5 messages keep their text; only the prefix goes for a standalone file."""
        path, lines = self.lines_of({"provider": "twilio", "fromNumber": "+15550001234"})
        self.assertEqual(
            lines,
            [f"{path}: twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)",
             f"{path}: twilio.authToken is required (or set TWILIO_AUTH_TOKEN env)"],
        )  # fmt: skip

    def test_refused_value_not_also_missing(self):
        """A required key whose value was refused is reported once, for its value, not also as missing."""
        self.assertEqual(
            problems_of(self, {"provider": "twilio", "fromNumber": "555", "twilio": TWILIO_CREDS}),
            [f"{P}.fromNumber: Expected E.164 format, e.g. +15550001234"],
        )

    def test_whole_openclaw_file_keeps_prefix(self):
        """Keys in a whole OpenClaw file are named by their full path there."""
        data = {"plugins": {"entries": {"voice-call": {"config": {"maxConcurrentCalls": 0}}}},
                "messages": {"tts": {"auto": "never"}}}  # fmt: skip
        path, lines = self.lines_of(data, "openclaw.json")
        self.assertEqual(
            lines,
            [f"{path}: {P}.maxConcurrentCalls: expected an integer > 0 (got 0)",
             f'{path}: messages.tts.auto: expected one of "off", "always", "inbound", "tagged" (got "never")'],
        )  # fmt: skip

    def test_misspelt_entry_is_refused(self):
        """
        A whole OpenClaw file whose voice-call entry is misspelt (its name, a key in it, or the
        top-level plugins) is refused naming the key and what was meant, not run on the mock.
        """
        cases = [
            ({"plugins": {"entries": {"voicecall": {"config": {"provider": "twilio"}}}}},
             'plugins.entries.voicecall: unknown key (did you mean "voice-call"?)'),
            ({"plugins": {"entries": {"voice-call": {"confg": {"provider": "twilio"}}}}},
             'plugins.entries.voice-call.confg: unknown key (did you mean "config"?)'),
            ({"plugin": {"entries": {"voice-call": {"config": {"provider": "twilio"}}}}, "messages": {}},
             'plugin: unknown key (did you mean "plugins"?)'),
            ({"plugin": {"entries": {"voice-call": {"config": {"provider": "twilio"}}}}},
             'plugin: unknown key (did you mean "plugins"?)'),
        ]  # fmt: skip
        for data, line in cases:
            path, lines = self.lines_of(data, "openclaw.json")
            self.assertEqual(lines, [f"{path}: {line}"], data)

    def test_other_plugins_entries_accepted(self):
        """Other plugins' entries, even with a name close to ours, are not ours to refuse."""
        path = os.path.join(self.dir, "openclaw.json")
        with open(path, "w") as f:
            json.dump({"plugins": {"entries": {"voice-call": {"config": {"provider": "mock"}}, "voicecall": {},
                                               "phone-call": {"x": 1}, "memory": {}}}}, f)  # fmt: skip
        os.chmod(path, 0o600)
        self.assertEqual(load_config(path, ENV).provider, "mock")
        # Without a voice-call entry, a sibling named like us whose config is not ours is not refused.
        with open(path, "w") as f:
            json.dump({"messages": {}, "plugins": {"entries": {"voice-chat": {"enabled": True, "config": {"room": "x"}},
                                                               "voicecal": {"enabled": True}}}}, f)  # fmt: skip
        self.assertEqual(load_config(path, ENV).provider, "mock")

    def test_unknown_key_suggestion(self):
        """A mistyped key gets the closest known key; its value is never shown (it may be a secret)."""
        _, lines = self.lines_of({"twilio": {"acountSid": "AC1", "authTokn": "hunter2-secret"}, "fromNumbr": "+1555"})
        self.assertIn('twilio.acountSid: unknown key (did you mean "accountSid"?)', "\n".join(lines))
        self.assertIn('twilio.authTokn: unknown key (did you mean "authToken"?)', "\n".join(lines))
        self.assertIn('fromNumbr: unknown key (did you mean "fromNumber"?)', "\n".join(lines))
        self.assertNotIn("hunter2", "\n".join(lines))

    def test_enum_suggestion(self):
        """A near-miss enum value gets the closest choice."""
        _, lines = self.lines_of({"provider": "twillio"})
        self.assertIn('provider: expected one of "telnyx", "twilio", "plivo", "mock" (got "twillio") (did you mean "twilio"?)', lines[0])

    def test_secrets_masked(self):
        """Values of secret keys are never shown, only their kind and length."""
        _, lines = self.lines_of(
            {"provider": "twilio", "fromNumber": "+15550001234",
             "twilio": {"accountSid": "AC1", "authToken": 123456}, "streaming": {"openaiApiKey": ""},
             "twilio_": 1}  # fmt: skip
        )
        text = "\n".join(lines)
        self.assertIn("twilio.authToken: expected a non-empty string (got a hidden number)", text)
        self.assertIn("streaming.openaiApiKey: expected a non-empty string (got a hidden secret of 0 characters)", text)
        self.assertNotIn("123456", text)

    def test_environment_problem_named(self):
        """A bad value from the environment names the variable, not the file."""
        _, lines = self.lines_of(
            {"provider": "twilio", "twilio": TWILIO_CREDS}, env={**ENV, "TWILIO_FROM_NUMBER": "555"}
        )
        self.assertEqual(lines, ['environment variable TWILIO_FROM_NUMBER: Expected E.164 format, e.g. +15550001234 (got "555")'])

    def test_long_value_cut_and_control_characters_replaced(self):
        """A long or odd value is shown cut short, with control characters replaced."""
        _, lines = self.lines_of({"serve": {"bind": ["x" * 200]}, "inboundGreeting": "\x1b[2J" * 2 + 5 * "x"})
        self.assertTrue(lines[0].endswith('(got ["' + "x" * 58 + "…)"), lines[0])
        _, lines = self.lines_of({"inboundGreeting": 5, "toNumber": "\x1b[2J"})
        self.assertTrue(lines[1].endswith('(got "\\u001b[2J")'), lines[1])

    def test_partial_config_kept(self):
        """The error carries the configuration built around the problems (for doctor)."""
        exc = self.assertRaises(ConfigError, parse_config, {"provider": "twilio", "bogus": 1, "serve": {"port": 4000}}, ENV)
        self.assertEqual((exc.config.provider, exc.config.serve.port), ("twilio", 4000))


#: A group other than root's own (daemon), for the group-writable refusal.
SHARED_GID = 1


class FilePermissionTests(SynchronousTestCase):
    """Issue 12: a config file others can change is refused; secrets everyone can read are warned about."""

    def write(self, data, mode):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "voicecall.json5")
        with open(path, "w") as f:
            json.dump(data, f)
        os.chmod(path, mode)
        return path

    def test_group_or_world_writable_refused(self):
        """A world-writable file, or one a shared group can write, is refused, naming the file and the fix."""
        for mode, group in ((0o620, SHARED_GID), (0o602, None), (0o666, None)):
            path = self.write({"provider": "mock"}, mode)
            if group is not None:
                if os.geteuid() != 0:
                    continue
                os.chown(path, -1, group)
            exc = self.assertRaises(ConfigError, load_config, path, ENV)
            self.assertEqual(len(exc.lines()), 1, exc.lines())
            self.assertIn(f"{path}: config file is writable by other users", exc.lines()[0])
            self.assertIn(f"chmod go-w {path}", exc.lines()[0])
            self.assertIsNotNone(exc.config)

    def test_private_group_write_allowed(self):
        """Group write on the owner's private group (umask 002 systems) reaches nobody else: no refusal."""
        import pwd

        path = self.write({"provider": "mock"}, 0o664)
        os.chown(path, -1, pwd.getpwuid(os.geteuid()).pw_gid)
        self.assertEqual(load_config(path, ENV).warnings, ())

    def test_owned_by_another_user_refused(self):
        """A file owned by a user other than root and the reader is refused."""
        if os.geteuid() != 0:
            path = self.write({"provider": "mock"}, 0o600)
            self.assertEqual(load_config(path, ENV).warnings, ())
            return
        path = self.write({"provider": "mock"}, 0o600)
        os.chown(path, 54321, -1)
        exc = self.assertRaises(ConfigError, load_config, path, ENV)
        self.assertIn("owned by another user (uid 54321)", exc.lines()[0])

    def test_world_readable_secrets_warned(self):
        """Secrets in a world-readable file start with one warning naming the file and chmod 600."""
        path = self.write({"provider": "twilio", "fromNumber": "+15550001234", "twilio": TWILIO_CREDS}, 0o644)
        self.assertEqual(load_config(path, ENV).warnings, (f"this file holds secrets and every user can read it: chmod 600 {path}",))

    def test_no_warning_without_secrets_or_when_private(self):
        """No warning for a readable file without secrets, nor for a private or group-readable one."""
        self.assertEqual(load_config(self.write({"provider": "mock"}, 0o644), ENV).warnings, ())
        creds = {"provider": "twilio", "fromNumber": "+15550001234", "twilio": TWILIO_CREDS}
        self.assertEqual(load_config(self.write(creds, 0o600), ENV).warnings, ())
        self.assertEqual(load_config(self.write(creds, 0o640), ENV).warnings, ())


class TtsProvidersLayoutTests(SynchronousTestCase):
    """Issue 13: the current OpenClaw ``messages.tts.providers.<id>`` layout is read."""

    def test_messages_tts_providers(self):
        """providers.openai / providers.elevenlabs become tts.openai / tts.elevenlabs."""
        cfg = parse_config(
            {"messages": {"tts": {"provider": "openai", "providers": {
                "openai": {"apiKey": "sk-1", "voice": "nova", "model": "tts-1", "responseFormat": "opus"},
                "elevenlabs": {"apiKey": "el-1", "voiceId": "v1", "voiceSettings": {"speed": 1.1}}}}}},
            ENV,
        )  # fmt: skip
        self.assertEqual(cfg.tts.provider, "openai")
        self.assertEqual((cfg.tts.openai.api_key, cfg.tts.openai.voice, cfg.tts.openai.model), ("sk-1", "nova", "tts-1"))
        self.assertEqual((cfg.tts.elevenlabs.api_key, cfg.tts.elevenlabs.voice_id), ("el-1", "v1"))
        self.assertEqual(cfg.tts.elevenlabs.voice_settings.speed, 1.1)
        self.assertEqual(cfg.warnings, ())

    def test_providers_block_wins_and_plugin_tts_overrides(self):
        """A providers block wins over the legacy direct block; the plugin's tts still merges over."""
        cfg = parse_config(
            {"messages": {"tts": {"openai": {"voice": "echo", "model": "tts-1"},
                                  "providers": {"openai": {"voice": "nova"}}}},
             "plugins": {"entries": {"voice-call": {"config": {"tts": {"providers": {"openai": {"model": "m2"}}}}}}}},
            ENV,
        )  # fmt: skip
        self.assertEqual((cfg.tts.openai.voice, cfg.tts.openai.model), ("nova", "m2"))

    def test_unknown_sibling_providers_warned(self):
        """Providers voicecall cannot use for calls are accepted with a warning each."""
        cfg = parse_config(
            {"messages": {"tts": {"provider": "minimax", "providers": {"minimax": {"apiKey": "x"}, "openai": {"voice": "nova"}}}}},
            ENV,
        )
        self.assertIsNone(cfg.tts.provider)
        self.assertEqual(cfg.tts.openai.voice, "nova")
        self.assertEqual(
            cfg.warnings,
            ('messages.tts.provider "minimax" is not used for calls; voicecall uses the first of openai, elevenlabs with an API key',
             "messages.tts.providers.minimax is not used for calls (voicecall speaks with openai or elevenlabs)"),
        )  # fmt: skip

    def test_microsoft_is_edge(self):
        """OpenClaw's microsoft provider is voicecall's edge section."""
        cfg = parse_config({"messages": {"tts": {"providers": {"microsoft": {"voice": "en-US-Ava"}}}}}, ENV)
        self.assertEqual(cfg.tts.edge.voice, "en-US-Ava")

    def test_problems_named_as_written(self):
        """A bad value inside providers.<id> is named at that path; unknown keys there are refused."""
        problems = problems_of(
            self, {"messages": {"tts": {"providers": {"openai": {"speed": 9, "voicee": "x"}, "elevenlabs": 3}}}}
        )
        self.assertEqual(
            problems,
            ["messages.tts.providers.openai.speed: expected a number between 0.25 and 4",
             "messages.tts.providers.openai.voicee: unknown key",
             "messages.tts.providers.elevenlabs: expected an object"],
        )  # fmt: skip


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
#: Credentials for examples that take them from the environment, as their comments say to.
EXAMPLE_ENV = {
    "HOME": HOME,
    "TWILIO_ACCOUNT_SID": "AC00000000000000000000000000000000", "TWILIO_AUTH_TOKEN": "t",
    "TWILIO_FROM_NUMBER": "+15550000000", "TELNYX_API_KEY": "k", "TELNYX_CONNECTION_ID": "c",
    "TELNYX_PUBLIC_KEY": "0EqyMnQrtKs6E2i9RhXk5tAiSrcaAWuvhSCjMsl3hzc=", "PLIVO_AUTH_ID": "MA1",
    "PLIVO_AUTH_TOKEN": "t", "OPENAI_API_KEY": "sk-x", "ELEVENLABS_API_KEY": "el-x",
}  # fmt: skip


class ExampleConfigTests(SynchronousTestCase):
    """Every config file in examples/ loads (picked up automatically as examples are added)."""

    def test_every_example_loads(self):
        """Each examples/*.json5 / *.json parses without a problem or a deprecation warning."""
        names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith((".json5", ".json")))
        self.assertIn("mock.json5", names)
        for name in names:
            path = os.path.join(EXAMPLES, name)
            try:
                cfg = load_config(path, EXAMPLE_ENV)
            except ConfigError as e:
                self.fail(f"{name}: " + "\n".join(e.lines()))
            self.assertEqual([w for w in cfg.warnings if "deprecated" in w], [], name)
