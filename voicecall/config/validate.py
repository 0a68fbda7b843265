# -*- test-case-name: tests.test_config -*-
"""
The reader of raw config JSON: it walks the declarations of voicecall.config.model
(`attrs.fields`, recursively), collecting every problem (as an `Issue` named by its full dotted
path) and every legacy warning; then the environment fallbacks of SPEC §2.4 and the
``validateProviderConfig`` messages of §2.5, both driven by the same declarations. Also
`deep_merge_defined`, the TTS deep-merge of SPEC §2.3.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Mapping
from urllib.parse import urlsplit

from attrs import evolve, fields, frozen

from voicecall.config.checks import Invalid, ListOf, MapOf, e164, non_empty, one_of, suggest
from voicecall.config.model import ClusterConfig, StreamingConfig, TtsConfig, VoiceCallConfig, declaration, json_name

#: Where the plugin config lives in an OpenClaw config file; every problem is named under it.
CONFIG_PATH = "plugins.entries.voice-call.config"

#: The config sections whose keys belong to one provider (their env fallbacks and requirements).
_PROVIDER_SECTIONS = [a for a in fields(VoiceCallConfig) if declaration(a) and declaration(a).provider and declaration(a).section]

#: The providers that need credentials and a caller number (SPEC §2.5).
CARRIERS = tuple(declaration(a).provider for a in _PROVIDER_SECTIONS)

_FROM_NUMBER = fields(VoiceCallConfig).from_number


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


# --- shapes: the keys an object accepts, from the declarations -------------------------------


@frozen
class Shape:
    """A strict object: JSON key -> (attribute, check); builds ``cls``, or a dict if None."""

    cls: type | None
    keys: Mapping[str, tuple[str, Any]]

    def build(self, kwargs: dict[str, Any]) -> Any:
        return kwargs if self.cls is None else self.cls(**kwargs)


@functools.cache
def shape(cls: type) -> Shape:
    """The keys of the attrs class ``cls``, as its fields declare them."""
    keys = {}
    for a in fields(cls):
        declared = declaration(a)
        if declared is not None:
            check = shape(declared.section) if declared.section else declared.check
            keys[json_name(a)] = (a.name, check)
    return Shape(cls, keys)


#: The legacy flat streaming keys: (legacy JSON key, the key that replaced it, the attribute).
_STREAM_MOVED = [(json_name(a), declaration(a).moved_to, a.name)
                 for a in fields(StreamingConfig) if declaration(a).moved_to]  # fmt: skip


def _streaming_providers() -> Shape:
    """
    The current streaming shape's ``providers`` object: ``openai`` holds the keys that replaced
    flat ones (``providers.openai.apiKey``, ...), read with their checks into their attributes.
    """
    prefix = "providers.openai."
    flat = shape(StreamingConfig).keys
    openai = {moved[len(prefix):]: (name, flat[legacy][1])
              for legacy, moved, name in _STREAM_MOVED if moved.startswith(prefix)}  # fmt: skip
    return Shape(None, {"openai": ("openai", Shape(None, openai))})


_STREAM_PROVIDERS = _streaming_providers()

# OpenClaw's TTS layout, messages.tts.providers.<id>: the `TtsConfig` section each id voicecall can
# use fills, and the keys OpenClaw accepts there that calls do not use (calls need PCM).
_TTS_PROVIDER_TARGETS = {"openai": "openai", "elevenlabs": "elevenlabs", "edge": "edge", "microsoft": "edge"}
_TTS_IGNORED_KEYS = {"openai": ("responseFormat",), "elevenlabs": ("outputFormat",), "edge": ()}
_TTS_PROVIDER_BLOCKS = {
    target: Shape(None, {**shape(TtsConfig).keys[target][1].keys, **{k: (k, non_empty) for k in ignored}})
    for target, ignored in _TTS_IGNORED_KEYS.items()
}


class Reader:
    """Walks raw JSON against the declarations, collecting problems (as `Issue`) and warnings."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.warnings: list[str] = []

    def add(self, path: str, text: str, value: Any = UNDEFINED, suggestion: str | None = None, sep: str = ": ") -> None:
        self.issues.append(Issue(path, text, value, suggestion, sep))

    def read(self, value: Any, path: str, check: Any, fallback: Any = None) -> Any:
        """Parse ``value``; on a failure of the value itself, record it and return ``fallback``."""
        try:
            return self._parse(value, path, check)
        except Invalid as e:
            self.add(path, str(e), UNDEFINED if e.hidden else value, e.suggestion)
            return fallback

    def plugin(self, raw: dict) -> dict:
        """The top-level keys of the plugin config (all but ``tts``), as attribute -> value."""
        top = {k: v for k, v in raw.items() if k != "tts"}
        return self.read(top, CONFIG_PATH, Shape(None, shape(VoiceCallConfig).keys), {})

    def _parse(self, value: Any, path: str, check: Any) -> Any:
        if isinstance(check, Shape):
            if value is UNDEFINED:
                value = {}
            if not isinstance(value, dict):
                raise Invalid("expected an object")
            kwargs = {}
            for key, item in value.items():
                if key not in check.keys:
                    # The value is never shown: a mistyped key may hold a secret.
                    self.add(f"{path}.{key}", "unknown key", suggestion=suggest(key, check.keys))
                    continue
                name, inner = check.keys[key]
                try:
                    kwargs[name] = self._parse(item, f"{path}.{key}", inner)
                except Invalid as e:
                    self.add(f"{path}.{key}", str(e), UNDEFINED if e.hidden else item, e.suggestion)
            return check.build(kwargs)
        if isinstance(check, ListOf):
            if not isinstance(value, list):
                raise Invalid("expected an array")
            items = [self.read(v, f"{path}[{i}]", check.check, UNDEFINED)
                     for i, v in enumerate(value)]  # fmt: skip
            return tuple(v for v in items if v is not UNDEFINED)
        if isinstance(check, MapOf):
            if not isinstance(value, dict):
                raise Invalid("expected an object")
            entries = {k: self.read(v, f"{path}.{k}", check.check, UNDEFINED)
                       for k, v in value.items()}  # fmt: skip
            return types.MappingProxyType({k: v for k, v in entries.items() if v is not UNDEFINED})
        return check(value)

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
            legacy_from = self.read(twilio.pop("from"), f"{path}.twilio.from", e164)
            raw["twilio"] = twilio
            self.warnings.append("twilio.from is deprecated; use fromNumber instead")
            if legacy_from is not None:
                raw.setdefault(json_name(_FROM_NUMBER), legacy_from)
        if isinstance(raw.get("streaming"), dict):
            raw["streaming"] = self._flatten_streaming(raw["streaming"], f"{path}.streaming")
        return raw

    def _flatten_streaming(self, raw: dict, path: str) -> dict:
        flat = {k: v for k, v in raw.items() if k not in ("provider", "providers")}
        current = {}
        if "provider" in raw and self.read(raw["provider"], f"{path}.provider", one_of("openai")):
            current["stt_provider"] = "openai-realtime"
        providers = raw.get("providers", UNDEFINED)
        current.update(self.read(providers, f"{path}.providers", _STREAM_PROVIDERS, {}).get("openai", {}))
        for legacy, replacement, name in _STREAM_MOVED:
            if legacy in raw:
                self.warnings.append(f"streaming.{legacy} is deprecated; use streaming.{replacement} instead")
            value = current.get(name)
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
            self.read(messages_tts, "messages.tts", shape(TtsConfig))
        if plugin_tts is not UNDEFINED:
            plugin_tts = self._tts_layout(plugin_tts, f"{CONFIG_PATH}.tts")
            self.read(plugin_tts, f"{CONFIG_PATH}.tts", shape(TtsConfig))
        if len(self.issues) > before:
            return TtsConfig()
        merged = deep_merge_defined(messages_tts, plugin_tts)
        return self.read(merged, f"{CONFIG_PATH}.tts", shape(TtsConfig), TtsConfig())

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
        elif isinstance(provider, str) and provider and provider not in _TTS_IGNORED_KEYS:
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


# --- the environment (SPEC §2.4) and the provider's required keys (§2.5) ---------------------


def apply_env(config: Any, env: Mapping[str, str], r: Reader, selected: str | None, gate: str | None = None) -> Any:
    """
    ``config`` with each absent value that declares ``env`` taken from the first set variable
    (checked, a refusal named by the variable), where its ``provider`` (or its section's) is
    ``selected``.
    """
    changes = {}
    for a in fields(type(config)):
        declared = declaration(a)
        if declared is None:
            continue
        provider = declared.provider or gate
        if provider is not None and provider != selected:
            continue
        value = getattr(config, a.name)
        if declared.section:
            changes[a.name] = apply_env(value, env, r, selected, provider)
            continue
        variable = next((v for v in declared.env if env.get(v)), None)
        if value is None and variable is not None:
            changes[a.name] = r.read(env[variable], variable, declared.check, env[variable])
    return evolve(config, **changes)


def provider_problems(cfg: VoiceCallConfig) -> list[Issue]:
    """What SPEC §2.5 ``validateProviderConfig`` finds missing, with its exact messages (none when disabled)."""
    if not cfg.enabled:
        return []
    p = CONFIG_PATH
    problems = []
    if cfg.provider is None:
        problems.append(Issue(f"{p}.provider", "is required", sep=" "))
    number = declaration(_FROM_NUMBER)
    if cfg.provider in CARRIERS and cfg.from_number is None:
        hint = f" (or set {number.env[0]} env)" if number.provider == cfg.provider else ""
        problems.append(Issue(f"{p}.{json_name(_FROM_NUMBER)}", "is required" + hint, sep=" "))
    for a in _PROVIDER_SECTIONS:
        declared = declaration(a)
        if declared.provider != cfg.provider:
            continue
        section = getattr(cfg, a.name)
        for inner in fields(declared.section):
            needed = declaration(inner)
            if not needed.required or getattr(section, inner.name) is not None:
                continue
            if needed.waived_by is not None and getattr(cfg, needed.waived_by):
                continue
            problems.append(Issue(f"{p}.{json_name(a)}.{json_name(inner)}",
                                  f"is required (or set {needed.env[0]} env)", sep=" "))  # fmt: skip
    if cfg.streaming.enabled and cfg.provider != "twilio":
        problems.append(Issue(f"{p}.provider", 'must be "twilio" when streaming.enabled is true', sep=" "))
    if cfg.store_is_postgres and cfg.public_url is None:
        # A cluster node registers its own URL (carriers sign its calls' webhooks for it) before
        # any tunnel could open.
        problems.append(Issue(f"{p}.publicUrl", "is required when the store is PostgreSQL (a cluster): this node's own URL", sep=" "))
    problems.extend(report_problems(cfg))
    return problems


def report_problems(cfg: VoiceCallConfig) -> list[Issue]:
    """
    What the call reports need (control/report.py): a secret to sign the POSTs to ``report.url``
    with, and for ``report.summarize`` the built-in responder's key (its chat client writes the
    summary): a refusal, not a warning, so no report silently lacks what the config asked for.
    """
    p = CONFIG_PATH
    report = cfg.report
    problems = []
    if report.url is not None and report.secret is None:
        problems.append(Issue(f"{p}.report.secret", "is required when report.url is set (or set VOICECALL_REPORT_SECRET env): it signs every report", sep=" "))
    if report.summarize and not cfg.response_api_key:
        problems.append(Issue(f"{p}.report.summarize", "needs the built-in responder: set responseApiKey (or OPENAI_API_KEY env)", sep=" "))
    return problems


def cluster_problems(cfg: VoiceCallConfig) -> tuple[list[Issue], list[str]]:
    """
    The `cluster` section against the store: (problems, warnings). With a PostgreSQL store the
    ``entryUrl``'s path must be the webhook path (``serve.path``): a node checks a signature over
    the entry URL's origin plus the path it serves, so a mistyped path fails every webhook sent
    there. With a directory (SQLite) store the section does nothing for a cluster: a loud warning
    (not a refusal: ``nodeId`` still names the SQLite store's owner node, and a one-node setup may
    keep the section while testing), which the daemon logs at start and doctor shows.
    """
    p = CONFIG_PATH
    cluster = cfg.cluster
    if not cfg.store_is_postgres:
        if cluster == ClusterConfig():
            return [], []
        alone = (f"{p}.cluster is set but the store is a directory (SQLite): this node runs alone on SQLite, in no cluster"
                 " (set store to the cluster's postgresql:// URL, or remove the cluster section)")  # fmt: skip
        return [], [alone]
    if cluster.entry_url is not None:
        path = urlsplit(cluster.entry_url).path
        if path != cfg.serve.path:
            return [Issue(f"{p}.cluster.entryUrl", f'must end in the webhook path serve.path ("{cfg.serve.path}"), not "{path}"', sep=" ")], []
    return [], []

