# -*- test-case-name: tests.test_doctor -*-
"""
`voicecall doctor`: what would stop real calls, each check with OK or the fix.

Run by the CLI, outside any reactor, so plain sockets, file checks and a blocking PostgreSQL
connection (bounded by STORE_TIMEOUT) are fine here. Nothing here changes anything: it binds
nothing it keeps, writes only a probe file it removes, and only reads the store.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import socket
import tempfile
import time
from typing import Mapping
from urllib.parse import urlsplit

from attrs import fields, frozen

from voicecall.config import ConfigError, find_config_path, load_config, parse_config
from voicecall.control.protocol import default_socket_path


@frozen
class Check:
    """One line of the report: OK, FAIL (with the fix), or WARN (ok, but worth a look)."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warn: bool = False

    def to_json(self) -> dict:
        out = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.warn:
            out["warn"] = True
        if self.fix:
            out["fix"] = self.fix
        return out


def _is_public_host(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost") or host.endswith(".local"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name: whether it resolves publicly is the carrier's concern
    return address.is_global


#: The most doctor reads of an answer on the daemon's socket (a health answer is a few hundred bytes).
MAX_HEALTH_BYTES = 64 * 1024


class UnreadableAnswer(Exception):
    """Something answers on the daemon's socket, with more than doctor reads."""


def daemon_health(socket_path: str, timeout: float = 2.0) -> dict | None:
    """
    The running daemon's `voicecall.health`, or None when nothing answers on the socket (within
    `timeout` seconds in all, with a JSON-RPC answer whose result is an object). An answer longer than L{MAX_HEALTH_BYTES} is not read
    further: L{UnreadableAnswer}.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"voicecall.health"}\n')
            data = bytearray()
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_HEALTH_BYTES:
                    raise UnreadableAnswer(
                        f"{socket_path} answered with more than {MAX_HEALTH_BYTES // 1024} KiB: not a voicecall daemon's health answer"
                    )
        answer = json.loads(data)
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past the parser's depth
        return None
    result = answer.get("result") if isinstance(answer, dict) else None
    return result if isinstance(result, dict) else None


def _writable_dir(path: str) -> tuple[bool, str]:
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return False, f"{probe} is not a directory"
    if probe != path:
        return os.access(probe, os.W_OK | os.X_OK), f"{path} does not exist yet; {probe} is where it would be created"
    try:
        fd, name = tempfile.mkstemp(prefix=".doctor-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return False, f"{path}: {e.strerror}"
    return True, path


#: The placeholder credentials of the examples (examples/twilio.json5, telnyx.json5, plivo.json5),
#: which README says to replace: (provider, key, attribute, placeholder).
PLACEHOLDERS = (
    ("twilio", "accountSid", "account_sid", "AC" + "x" * 32),
    ("twilio", "authToken", "auth_token", "your-twilio-auth-token"),
    ("telnyx", "apiKey", "api_key", "KEY" + "x" * 29),
    ("telnyx", "connectionId", "connection_id", "1234567890"),
    ("telnyx", "publicKey", "public_key", "A" * 43 + "="),
    ("plivo", "authId", "auth_id", "MA" + "X" * 18),
    ("plivo", "authToken", "auth_token", "your-plivo-auth-token"),
)


def _placeholders(cfg) -> list[str]:
    """
    The credentials of the configured carrier still holding the examples' placeholders. A carrier
    at another base URL than its API's (the fake carriers of the *-fake examples) is not checked.
    """
    section = getattr(cfg, cfg.provider or "", None)
    if section is None or section.base_url != fields(type(section)).base_url.default:
        return []
    return [
        f"{provider}.{key}"
        for provider, key, attribute, placeholder in PLACEHOLDERS
        if provider == cfg.provider
        and hmac.compare_digest((getattr(section, attribute) or "").encode(), placeholder.encode())
    ]


def _fix_for(line: str, path: str | None, fix: str) -> str:
    """The fix for one config line: a file others can write or own needs chmod/chown, not an edit."""
    if "writable by other users" in line:
        return f"chmod go-w {path}"
    if "owned by another user" in line:
        return f"chown root {path} (or the user voicecall runs as)"
    return fix


def run_checks(explicit_config: str | None, socket_override: str | None, env: Mapping[str, str], cwd: str) -> list[Check]:
    """
    Every check at once: a config problem does not hide the others (public URL, port, store,
    credentials), which are checked against what could be read around it.
    """
    checks: list[Check] = []
    path = find_config_path(explicit_config, env, cwd)
    fix = f"edit {path}" if path else "write a config file"
    whole_file = False
    try:
        cfg = parse_config({}, env) if path is None else load_config(path, env)
    except ConfigError as e:
        if e.config is None:  # unreadable or not JSON: what the built-in defaults would use is still checked
            checks.extend(Check("config", False, line, fix) for line in e.lines())
            try:
                defaults = parse_config({}, env)
            except ConfigError:
                return checks
            return checks + _local_checks(defaults, socket_override, env, "; built-in defaults, as the config could not be read")
        cfg, whole_file = e.config, e.whole_file
        # The daemon's problems, as it reports them; the missing credentials under "credentials".
        missing = [i for i in e.issues if "is required" in i.text]
        shown = ConfigError([i for i in e.issues if i not in missing], whole_file=whole_file, file=e.file)
        checks.extend(Check("config", False, line, _fix_for(line, path, fix)) for line in shown.lines())
    else:
        missing = []
        checks.append(Check("config", True, f"{path or 'no file: built-in defaults'} (provider {cfg.provider})"))
    checks.extend(Check("config", True, warning, warn=True) for warning in cfg.warnings)
    if not cfg.enabled:
        checks.append(Check("enabled", False, "the config disables voice calls", "set enabled: true"))

    if missing:
        shown = ConfigError(missing, whole_file=whole_file, file=path)
        checks.extend(Check("credentials", False, line, fix) for line in shown.lines())
    elif cfg.provider == "mock":
        checks.append(Check("credentials", True, "mock provider: no carrier, no real calls"))
    elif placeholders := _placeholders(cfg):
        checks.append(Check("credentials", True, f"still the examples' placeholders, replace them: {', '.join(placeholders)}", warn=True))
    else:
        checks.append(Check("credentials", True, f"{cfg.provider} credentials present"))

    if cfg.provider != "mock":
        exposure = cfg.public_url
        if exposure:
            parts = urlsplit(exposure)
            host = (parts.hostname or "").lower()
            if not _is_public_host(host):
                checks.append(
                    Check("public URL", False, f"{exposure} is loopback or private: carriers cannot reach it",
                          "set publicUrl to the HTTPS URL carriers reach this daemon at, or use tunnel.provider")
                )
            elif parts.scheme != "https":
                checks.append(Check("public URL", False, f"{exposure} is not HTTPS", "carriers need HTTPS webhooks: put TLS in front"))
            else:
                checks.append(Check("public URL", True, exposure))
        elif cfg.tunnel.provider != "none" or cfg.tailscale.mode != "off":
            how = cfg.tunnel.provider if cfg.tunnel.provider != "none" else f"tailscale {cfg.tailscale.mode}"
            checks.append(Check("public URL", True, f"found at start by {how}"))
        else:
            checks.append(
                Check("public URL", False, "none: carriers cannot reach the webhook",
                      "set publicUrl, or tunnel.provider (ngrok, tailscale-serve, tailscale-funnel)")
            )

    if cfg.streaming.enabled:
        if cfg.provider != "twilio":
            checks.append(Check("streaming", False, "media streaming works with Twilio only", 'set provider "twilio" or streaming.enabled false'))
        elif not cfg.streaming.openai_api_key:
            checks.append(Check("streaming", False, "no OpenAI API key for streaming speech-to-text", "set streaming.providers.openai.apiKey or OPENAI_API_KEY"))
        else:
            checks.append(Check("streaming", True, "Twilio media streams with OpenAI realtime STT"))

    return checks + _local_checks(cfg, socket_override, env)


def _local_checks(cfg, socket_override: str | None, env: Mapping[str, str], note: str = "") -> list[Check]:
    """The running daemon, or the port and socket it would take; and its state directory. `note`
    ends each detail (the defaults used when the config could not be read)."""
    checks: list[Check] = []
    socket_path = socket_override or default_socket_path(cfg.state_dir, env)
    try:
        health = daemon_health(socket_path)
    except UnreadableAnswer as e:
        checks.append(Check("daemon", False, str(e), f"stop what listens on {socket_path}, or give --socket the daemon's socket"))
        checks.append(_port_check(cfg.serve.bind, cfg.serve.port))
    else:
        checks.extend(_daemon_checks(cfg, socket_path, health))
    if cfg.store_is_postgres:
        checks.append(store_check(cfg.store, cfg.store_shown))
    ok, detail = _writable_dir(cfg.state_dir)
    checks.append(Check("state directory", ok, detail, None if ok else f"make {cfg.state_dir} writable by the daemon's user"))
    return [Check(c.name, c.ok, c.detail + note, c.fix, c.warn) for c in checks]


#: How long doctor waits for the PostgreSQL store: to connect, then for each query.
STORE_TIMEOUT = 5

#: What the server's refusal says (libpq passes the server's FATAL text on; there is no SQLSTATE
#: for a failed connection): (words in the message, what went wrong, the fix).
_REFUSALS = (
    (("password authentication failed", "no password supplied", "authentication failed", "role "),
     "authentication failed", "check the user and password in store (a % in the password is written %25)"),
    (("does not exist",), "the database does not exist", "create it (createdb -O USER DBNAME) or correct the database name in store"),
)  # fmt: skip


def store_check(url: str, shown: str) -> Check:
    """
    Connect to the PostgreSQL store as the daemon would (within `STORE_TIMEOUT` seconds per step)
    and read its schema version: unreachable, authentication failed, database missing, or a schema
    newer than this code each fail with the fix. `shown`: the URL as messages show it (no password);
    nothing here shows the password.
    """
    try:
        import psycopg

        from voicecall.domain.pgstore import latest_version
        from voicecall.infra.pg import redactor
    except ImportError:
        return Check("store", False, "the store is PostgreSQL but psycopg is not installed", "pip install 'voicecall[postgresql]'")
    where, redact = f"PostgreSQL {shown}", redactor(url)
    try:
        conn = psycopg.connect(url, connect_timeout=STORE_TIMEOUT, application_name="voicecall-doctor",
                               options=f"-c statement_timeout={STORE_TIMEOUT * 1000}")  # fmt: skip
    except psycopg.Error as e:
        reason = " ".join(redact(str(e)).split())
        for words, what, fix in _REFUSALS:
            if any(w in reason for w in words):
                return Check("store", False, f"{where}: {what} ({reason})", fix)
        return Check("store", False, f"{where}: server unreachable ({reason})",
                     "start PostgreSQL there, or correct the host and port in store (the server must accept this node)")  # fmt: skip
    try:
        with conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] if exists else None
    except psycopg.Error as e:
        return Check("store", False, f"{where}: cannot read the schema version ({' '.join(redact(str(e)).split())})",
                     "grant the store's user access to its database")  # fmt: skip
    if version is None:
        return Check("store", True, f"{where}: reachable, empty (the daemon creates the schema at its first start)")
    if version > latest_version():
        return Check("store", False, f"{where}: schema version {version} is newer than this voicecall's ({latest_version()})",
                     "upgrade voicecall on this node to the version the other nodes run")  # fmt: skip
    return Check("store", True, f"{where}: reachable, schema version {version} (shared by the cluster's nodes)")


def _daemon_checks(cfg, socket_path: str, health: dict | None) -> list[Check]:
    """The running daemon's port and socket, or the port and socket it would take."""
    checks: list[Check] = []
    if health is not None:
        checks.append(Check("daemon", True, f"running: {health.get('activeCalls', 0)} active call(s), webhook {health.get('webhookUrl')}"))
        checks.append(Check("port", True, f"{cfg.serve.bind}:{cfg.serve.port} held by the running daemon"))
        checks.append(Check("socket", True, f"{socket_path} answers"))
    else:
        checks.append(_port_check(cfg.serve.bind, cfg.serve.port))
        checks.append(_socket_check(socket_path))
    return checks


def _port_check(bind: str, port: int) -> Check:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return Check("port", False, f"{bind}:{port} is in use by another program", "stop it or change serve.port")
        return Check("port", False, f"cannot bind {bind}:{port}: {e.strerror}", "check serve.bind")
    return Check("port", True, f"{bind}:{port} is free")


def _socket_check(path: str) -> Check:
    if len(path.encode()) > 107:
        return Check("socket", False, f"{path} is too long for a UNIX socket", "set VOICECALL_SOCKET or --rpc to a shorter path")
    ok, detail = _writable_dir(os.path.dirname(path) or ".")
    if not ok:
        return Check("socket", False, detail, f"make {os.path.dirname(path)} writable, or choose --rpc")
    return Check("socket", True, f"{path} can be created (daemon not running)")


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        mark = "FAIL" if not check.ok else "WARN" if check.warn else "OK  "
        line = f"{mark}  {check.name}: {check.detail}"
        if check.fix and not check.ok:
            line += f"\n      fix: {check.fix}"
        lines.append(line)
    return "\n".join(lines)
