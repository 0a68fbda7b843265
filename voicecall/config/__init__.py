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
floats (``3334.0``) count as integers, booleans never do. ``ConfigError.problems`` (the SPEC
strings) never repeat a value; ``ConfigError.lines()``, for people, names the file and the key
as written there and shows the value received, except secrets and the values of unknown keys.

OpenClaw's current TTS layout, ``tts.providers.<id>`` (in ``messages.tts`` or the plugin's
``tts``), is read into the ``openai`` / ``elevenlabs`` / ``edge`` sections; providers calls
cannot use are dropped with a warning.

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
- ``cluster.nodeId`` (the host name), ``cluster.leaseSeconds`` (``10``), ``cluster.entryUrl``
  (``publicUrl``; its path must be ``serve.path``): many nodes on one PostgreSQL store (README
  "Scaling out"); the section with a directory store is a warning (the node runs alone).
- ``store`` may be a ``postgresql://`` URL, checked as libpq reads it (checks.store_location); a
  value starting like another URL is refused, not taken for a directory.

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

Every key is declared once, as a field of voicecall.config.model (its check, default, env
fallback, ...: see `voicecall.config.model.Key`); voicecall.config.validate walks those
declarations; voicecall.config.checks holds the value checks. This module holds the entry points,
file loading and the messages for people; it imports nothing of ours but those, and does no I/O
except `load_config` reading its file.
"""
from __future__ import annotations

import difflib
import grp
import json
import os
import pwd
import re
import stat
from typing import Any, Mapping

import json5
from attrs import evolve, fields

from voicecall.config.checks import boolean, is_postgres_url, redact_url, suggest
from voicecall.config.model import DEFAULT_STORE, VoiceCallConfig, declaration, json_name
from voicecall.config.validate import CONFIG_PATH, UNDEFINED, Issue, Reader, apply_env, cluster_problems, provider_problems

__all__ = [
    "DISABLED_MESSAGE",
    "ConfigError",
    "config_search_paths",
    "file_permission_problems",
    "find_config_path",
    "load_config",
    "parse_config",
    "provider_problems",
]

#: The error the daemon refuses to start with when the config says ``enabled: false``.
DISABLED_MESSAGE = "Voice call disabled. Enable the plugin entry in config."

#: The largest config file `load_config` reads.
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """
    The configuration is unusable. ``problems`` lists every reason in a stable order, as SPEC
    strings naming the full OpenClaw path (the RPC/CLI contract); ``issues`` holds the same as
    `Issue` objects, and `lines` renders them for a person: the file, the key as written there,
    the value received (secrets masked) and, for a mistyped key, what was probably meant.
    ``config`` is the best-effort configuration built around the problems (None when the file
    could not be read or parsed), for `voicecall doctor` to go on checking.
    """

    def __init__(
        self,
        problems: list[str] | list[Issue],
        *,
        whole_file: bool = False,
        file: str | None = None,
        config: VoiceCallConfig | None = None,
    ) -> None:
        self.issues = [p if isinstance(p, Issue) else Issue(p, "", sep="") for p in problems]
        self.problems = [issue.problem for issue in self.issues]
        self.whole_file = whole_file
        self.file = file
        self.config = config
        super().__init__("Invalid voice-call config: " + "; ".join(self.problems))

    def lines(self) -> list[str]:
        """One line per problem, each naming the file (or the environment) and the key as written."""
        return [_render(issue, self.file, self.whole_file) for issue in self.issues]


_SECRET_WORDS = ("key", "token", "secret", "password")


def _is_secret(path: str) -> bool:
    return any(word in part.lower() for part in path.split(".") for word in _SECRET_WORDS)


def _shown_value(path: str, value: Any) -> str:
    """The value as the message shows it: secrets masked, long values cut, control characters replaced."""
    if _is_secret(path):
        if isinstance(value, str):
            return f"a hidden secret of {len(value)} characters"
        return f"a hidden {_json_type(value)}"
    if isinstance(value, str):
        value = redact_url(value)  # a URL's password (the store's)
    text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 60 else text[:60] + "…"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _render(issue: Issue, file: str | None, whole_file: bool) -> str:
    if issue.file_level:
        return f"{issue.path}: {issue.text}"
    key = issue.path
    if not whole_file and key.startswith(CONFIG_PATH):
        key = key[len(CONFIG_PATH) + 1 :] or "the config"
    if key.isupper():  # an environment variable
        where = f"environment variable {key}"
    else:
        where = f"{file}: {key}" if file else key
    line = f"{where}{issue.sep}{issue.text}"
    if issue.value is not UNDEFINED:
        line += f" (got {_shown_value(issue.path, issue.value)})"
    if issue.suggestion:
        line += f' (did you mean "{issue.suggestion}"?)'
    return line


# --- paths ---------------------------------------------------------------------------------------


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _resolve_path(path: str, env: Mapping[str, str]) -> str:
    if path == "~" or path.startswith("~/"):
        path = _home(env) + path[1:]
    return os.path.abspath(os.path.expanduser(path))


# --- public entry points ---------------------------------------------------------------------


def parse_config(data: object, env: Mapping[str, str]) -> VoiceCallConfig:
    """
    Build the configuration from parsed JSON: the bare plugin config object or a whole OpenClaw
    config file. Raises `ConfigError` listing every problem (schema, then SPEC §2.5).
    """
    r = Reader()
    raw: Any = data
    messages_tts: Any = UNDEFINED
    entry_enabled = True
    whole_file = isinstance(data, dict) and ("plugins" in data or "messages" in data)
    if whole_file:
        entries = r.member(r.member(data, "plugins", "plugins"), "entries", "plugins.entries")
        where = "plugins.entries.voice-call"
        entry = r.member(entries, "voice-call", where)
        _check_entry(r, data, entries, entry, where)
        raw = entry.get("config", UNDEFINED)
        entry_enabled = r.read(entry.get("enabled", True), f"{where}.enabled", boolean, True)
        messages_tts = r.member(data, "messages", "messages").get("tts", UNDEFINED)
    if raw is UNDEFINED:
        raw = {}
    if not isinstance(raw, dict):
        r.add(CONFIG_PATH, "expected an object", raw)
        raw = {}

    raw = r.legacy(raw, CONFIG_PATH)
    kwargs = r.plugin(raw)
    if not whole_file:
        _suggest_whole_file(r)
    enabled = kwargs.pop("enabled", True) and entry_enabled
    provider = kwargs.pop("provider", None) or ("mock" if enabled else None)
    tts = r.tts(messages_tts, raw.get("tts", UNDEFINED))
    # store: the file's value, else VOICECALL_STORE (apply_env), else the default directory.
    store = kwargs.pop("store", None)
    cfg = VoiceCallConfig(**kwargs, enabled=enabled, provider=provider, store=store, tts=tts)
    cfg = apply_env(cfg, env, r, cfg.provider)
    store = cfg.store or DEFAULT_STORE
    cfg = evolve(cfg, store=store if is_postgres_url(store) else _resolve_path(store, env))
    # A key whose value was refused is not also reported as missing.
    refused = {issue.path for issue in r.issues}
    r.issues.extend(issue for issue in provider_problems(cfg) if issue.path not in refused)
    if not refused & {f"{CONFIG_PATH}.store", "VOICECALL_STORE"}:  # a refused store is not also "a directory"
        problems, warnings = cluster_problems(cfg)
        r.issues.extend(issue for issue in problems if issue.path not in refused)
        r.warnings.extend(warnings)
    cfg = evolve(cfg, warnings=tuple(r.warnings))
    if r.issues:
        raise ConfigError(r.issues, whole_file=whole_file, config=cfg)
    return cfg


#: The keys of a plugin entry in an OpenClaw file (``plugins.entries.<id>``).
_ENTRY_KEYS = ("enabled", "config")


def _check_entry(r: Reader, data: dict, entries: dict, entry: dict, where: str) -> None:
    """
    A whole file whose voice-call entry is misspelt would run the built-in defaults (the mock
    provider) without a word: a mistyped top-level ``plugins``, an entry named like ours but not
    ours, and unknown keys in ours are problems, each naming what was probably meant.
    """
    if "plugins" not in data:
        for key in data:
            if isinstance(key, str) and suggest(key, ("plugins",)):
                r.add(key, "unknown key", suggestion="plugins")
    if "voice-call" not in entries:
        for key, value in entries.items():
            if isinstance(key, str) and _looks_like_ours(value) and difflib.get_close_matches(key.lower(), ["voice-call"], n=1, cutoff=0.8):
                r.add(f"plugins.entries.{key}", "unknown key", suggestion="voice-call")
    for key in entry:
        if key not in _ENTRY_KEYS:
            r.add(f"{where}.{key}", "unknown key", suggestion=suggest(key, _ENTRY_KEYS))


def _looks_like_ours(entry: Any) -> bool:
    """Whether a plugin entry carries a config with a key of ours: a sibling plugin named like us
    (``voice-chat``) is not ours to refuse, a misspelt ``voice-call`` holding our config is."""
    config = entry.get("config") if isinstance(entry, dict) else None
    return isinstance(config, dict) and any(key in _OUR_KEYS for key in config)


#: The top-level keys of our config, from its declarations (but `enabled`, which any plugin may have).
_OUR_KEYS = frozenset(json_name(a) for a in fields(VoiceCallConfig) if declaration(a) is not None) - {"enabled"}


def _suggest_whole_file(r: Reader) -> None:
    """An unknown top-level key that is a misspelt ``plugins`` or ``messages`` says so (the file
    was meant to be a whole OpenClaw config, but was read as the bare plugin config)."""
    prefix = CONFIG_PATH + "."
    for i, issue in enumerate(r.issues):
        key = issue.path[len(prefix) :]
        if issue.text == "unknown key" and issue.suggestion is None and issue.path.startswith(prefix) and "." not in key:
            meant = suggest(key, ("plugins", "messages"))
            if meant:
                r.issues[i] = evolve(issue, suggestion=meant)


_JSON5_POSITION = re.compile(r"^<string>:(\d+) (.*) at column (\d+)$", re.S)


def _file_problem(path: str, text: str) -> ConfigError:
    return ConfigError([Issue(path, text, file_level=True)], file=path)


def load_config(path: str, env: Mapping[str, str]) -> VoiceCallConfig:
    """
    Read and parse a JSON or JSON5 config file; any failure is a `ConfigError` naming the file
    (a syntax error with its line and column). A file other users can write is refused; one
    holding secrets that every user can read gets a warning in ``warnings``.
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            blob = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise _file_problem(path, f"cannot read config file: {e.strerror or e}") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise _file_problem(path, f"config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _file_problem(path, f"not valid JSON or JSON5: not UTF-8 text (byte {e.start + 1})") from None
    try:
        data = json5.loads(text, allow_duplicate_keys=False)
    except (ValueError, RecursionError) as e:
        message = str(e) if isinstance(e, ValueError) else "nested too deeply"
        found = _JSON5_POSITION.match(message)
        if found:
            line, what, column = found.groups()
            raise _file_problem(f"{path}:{line}:{column}", f"not valid JSON or JSON5: {what}") from None
        raise _file_problem(path, f"not valid JSON or JSON5: {message}") from None
    refusal, warnings = file_permission_problems(path, info, data)
    try:
        cfg = parse_config(data, env)
    except ConfigError as e:
        e.file = path
        if refusal:
            e.issues.insert(0, refusal)
            e.problems.insert(0, refusal.problem)
        if e.config is not None:
            e.config = evolve(e.config, warnings=(*warnings, *e.config.warnings))
        raise
    cfg = evolve(cfg, warnings=(*warnings, *cfg.warnings))
    if refusal:
        raise ConfigError([refusal], file=path, config=cfg)
    return cfg


def _holds_secrets(data: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(data, dict):
        return any(
            (_is_secret(str(k)) and isinstance(v, str) and v) or _holds_secrets(v, depth + 1) for k, v in data.items()
        )
    if isinstance(data, list):
        return any(_holds_secrets(v, depth + 1) for v in data)
    return False


def _private_group(gid: int, uid: int) -> bool:
    """
    Whether ``gid`` is the owner's own group (same name, the owner's primary group, no other
    listed member): group write on it reaches nobody else (the umask 002 of user-private-group
    systems makes such files). Unknown users or groups count as shared.
    """
    try:
        owner, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return owner.pw_gid == gid and group.gr_name == owner.pw_name and set(group.gr_mem) <= {owner.pw_name}


def file_permission_problems(path: str, info: os.stat_result, data: Any) -> tuple[Issue | None, list[str]]:
    """
    What the file's owner and mode say (issue 12): writable by others (world, or a group that
    is not the owner's private group), or owned by a user other than root and the one reading
    it, is a refusal; secrets readable by every user are a warning.
    """
    mode = stat.S_IMODE(info.st_mode)
    owner_ok = info.st_uid in (0, os.geteuid())
    writable = mode & stat.S_IWOTH or (mode & stat.S_IWGRP and not _private_group(info.st_gid, info.st_uid))
    if writable or not owner_ok:
        why = "writable by other users" if writable else f"owned by another user (uid {info.st_uid})"
        refusal = Issue(
            path,
            f"config file is {why}, who could change where calls go or what is trusted; "
            f"make it owned by root or this user and not group/world-writable (chmod go-w {path})",
            file_level=True,
        )
        return refusal, []
    if mode & stat.S_IROTH and _holds_secrets(data):
        # Said after the file's name by whoever shows it (`config <file>: ...`, doctor's config line).
        return None, [f"this file holds secrets and every user can read it: chmod 600 {path}"]
    return None, []


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
