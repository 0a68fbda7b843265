# -*- test-case-name: tests.test_expose -*-
"""
Public exposure of the webhook server (SPEC §16): an ngrok tunnel, a Tailscale serve/funnel
route (tunnel mode and the legacy `tailscale.mode` helper), and `voicecall expose` (SPEC §17).

Every child process goes through ``reactor.spawnProcess``; nothing here blocks the reactor. What
is kept of a child's output is capped, a child that outlives its time limit is killed with SIGKILL
and reaped, and command lines are never logged (the ngrok auth token travels on one).
"""
from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable, Mapping, Sequence
from urllib.parse import quote

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from voicecall.infra.childproc import (
    Child,
    LineSink,
    SpawnError,
    TIMED_OUT,
    TextTail,
    Tools,
    terminate,
)

__all__ = [
    "ExposeError",
    "TailscaleSelf",
    "Tunnel",
    "expose_command",
    "legacy_tailscale",
    "ngrok_available",
    "resolve_expose_mode",
    "start_tunnel",
    "tailscale_self_info",
]

NGROK_COMMAND_TIMEOUT = 30.0  # [H] `ngrok config add-authtoken`
NGROK_STARTUP_TIMEOUT = 30.0
NGROK_STOP_GRACE = 2.0
NGROK_VERSION_TIMEOUT = 5.0  # [H] availability probe
TAILSCALE_STATUS_TIMEOUT = 2.5
TAILSCALE_ROUTE_TIMEOUT = 10.0
LEGACY_TAILSCALE_TIMEOUT = 2.5
TAILSCALE_CLEANUP_TIMEOUT = 5.0

TUNNEL_PROVIDERS = frozenset({"ngrok", "tailscale-serve", "tailscale-funnel"})
EXPOSE_HINT_NOTE = (
    "Tailscale serve/funnel may be disabled on this tailnet (or require admin enable)."
)
NO_TAILSCALE_DNS = "Could not get Tailscale DNS name. Is Tailscale running?"

_MAX_STATUS_BYTES = 4 * 1024 * 1024  # `tailscale status --json` grows with the tailnet
_NGROK_ERROR_MARKER = "ERR_NGROK"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")

_log = Logger(namespace="voicecall.control.expose")


class ExposeError(Exception):
    """Exposure failed; ``str()`` is the SPEC §16 text (e.g. ``ngrok startup timed out (30s)``)."""


@frozen
class TailscaleSelf:
    """This node as `tailscale status --json` describes it (``Self.DNSName`` / ``Self.ID``)."""

    dns_name: str | None
    node_id: str | None


@define
class Tunnel:
    """An active exposure; ``stop()`` tears it down once, however often it is called."""

    public_url: str
    provider: str
    _stop_impl: Callable[[], Awaitable[None]] = field(repr=False)
    _stopping: Deferred[None] | None = field(default=None, init=False, repr=False)

    def stop(self) -> Deferred[None]:
        """Stop the tunnel; the Deferred fires with None when done and never fails."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop_once())
        done: Deferred[None] = Deferred()
        self._stopping.addCallback(lambda _: done.callback(None))
        return done

    async def _stop_once(self) -> None:
        try:
            await self._stop_impl()
        except Exception:
            _log.failure("stopping the {provider} tunnel failed", provider=self.provider)



# --- ngrok --------------------------------------------------------------------------------------


class _NgrokSession:
    """One `ngrok http` child: watches its JSON log for the public URL and stderr for ERR_NGROK."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stderr = TextTail()
        self._event: Deferred[Any] = Deferred()
        self._started = False
        self._stopping = False
        self.child = Child(LineSink(self._stdout_line), LineSink(self._stderr_line))
        self.child.when_ended().addCallback(self._ended)

    async def start(self, tools: Tools, args: Sequence[str], timeout: float, grace: float) -> str:
        tools.spawn(self.child, "ngrok", args)
        timer = self._reactor.callLater(timeout, self._emit, TIMED_OUT)
        try:
            outcome = await self._event
        except CancelledError:
            self.child.kill()
            raise
        finally:
            if timer.active():
                timer.cancel()
        if isinstance(outcome, str):
            self._started = True
            return outcome
        if outcome is TIMED_OUT:
            await terminate(self._reactor, self.child, grace)
            raise ExposeError(f"ngrok startup timed out ({timeout:g}s)")
        await terminate(self._reactor, self.child, 0)
        raise outcome

    async def stop(self, grace: float) -> None:
        self._stopping = True
        await terminate(self._reactor, self.child, grace)

    def _emit(self, outcome: Any) -> None:
        if not self._event.called:
            self._event.callback(outcome)

    def _stdout_line(self, line: str) -> None:
        if self._event.called or not line.strip():
            return  # after start-up the log is only drained
        try:
            entry = json.loads(line)
        except ValueError:
            return  # not a JSON log line
        if not isinstance(entry, dict):
            return
        url = entry.get("url")
        started = entry.get("msg") == "started tunnel" or entry.get("addr")
        if isinstance(url, str) and url and started:
            self._emit(url)

    def _stderr_line(self, line: str) -> None:
        self._stderr.add(line)
        if _NGROK_ERROR_MARKER in line:
            self._emit(ExposeError(f"ngrok error: {self._stderr.text()}"))

    def _ended(self, _: None) -> None:
        code = self.child.code_text()
        if self._started and not self._stopping:
            _log.warn("ngrok exited (code {code}): {stderr}", code=code, stderr=self._stderr.text())
        self._emit(ExposeError(f"ngrok exited unexpectedly with code {code}"))


async def _start_ngrok(
    tools: Tools, port: int, path: str, token: str | None, domain: str | None,
    auth_timeout: float, startup_timeout: float, stop_grace: float,
) -> Tunnel:  # fmt: skip
    if token:
        _log.info("setting the ngrok auth token")  # never the command line: it holds the token
        outcome = await tools.run("ngrok", ["config", "add-authtoken", token], auth_timeout)
        if outcome.timed_out:
            raise ExposeError(f"ngrok command timed out after {round(auth_timeout * 1000)}ms")
        if outcome.code != 0:
            raise ExposeError(f"ngrok command failed: {outcome.detail().replace(token, '***')}")
    args = ["http", str(port), "--log", "stdout", "--log-format", "json"]
    if domain:
        args += ["--domain", domain]
    session = _NgrokSession(tools.reactor)
    public_url = await session.start(tools, args, startup_timeout, stop_grace) + path
    _log.info("ngrok tunnel active: {url}", url=public_url)
    return Tunnel(public_url, "ngrok", stop_impl=lambda: session.stop(stop_grace))


async def ngrok_available(
    reactor: Any,
    *,
    env: Mapping[str, str] | None = None,
    executables: Mapping[str, str] | None = None,
    timeout: float = NGROK_VERSION_TIMEOUT,
) -> bool:
    """[H] Whether `ngrok version` exits 0 within `timeout` seconds (a hung probe is SIGKILLed)."""
    try:
        outcome = await Tools.of(reactor, env, executables).run("ngrok", ["version"], timeout)
    except SpawnError:
        return False
    return outcome.code == 0


# --- Tailscale ----------------------------------------------------------------------------------


async def _self_info(tools: Tools, timeout: float) -> TailscaleSelf | None:
    try:
        outcome = await tools.run("tailscale", ["status", "--json"], timeout, _MAX_STATUS_BYTES)
        status = json.loads(outcome.stdout) if outcome.code == 0 else None
    except (SpawnError, ValueError):
        return None
    if not isinstance(status, dict) or outcome.stdout_truncated:
        return None
    me = status.get("Self")
    me = me if isinstance(me, dict) else {}
    dns_name, node_id = me.get("DNSName"), me.get("ID")
    if isinstance(dns_name, str) and dns_name.endswith("."):
        dns_name = dns_name[:-1]
    return TailscaleSelf(
        dns_name=dns_name if isinstance(dns_name, str) and _HOSTNAME.match(dns_name) else None,
        node_id=node_id if isinstance(node_id, str) and node_id else None,
    )


async def tailscale_self_info(
    reactor: Any,
    *,
    env: Mapping[str, str] | None = None,
    executables: Mapping[str, str] | None = None,
    timeout: float = TAILSCALE_STATUS_TIMEOUT,
) -> TailscaleSelf | None:
    """This node's MagicDNS name (without the trailing dot) and stable ID, or None on failure."""
    return await _self_info(Tools.of(reactor, env, executables), timeout)


async def _add_route(
    tools: Tools, mode: str, path: str, target: str, status_timeout: float, timeout: float
) -> str:
    """`tailscale <mode> --bg --yes --set-path <path> <target>`; the public URL, or ExposeError."""
    me = await _self_info(tools, status_timeout)
    if me is None or me.dns_name is None:
        raise ExposeError(NO_TAILSCALE_DNS)
    try:
        args = [mode, "--bg", "--yes", "--set-path", path, target]
        outcome = await tools.run("tailscale", args, timeout)
    except SpawnError as e:
        raise ExposeError(f"Failed to start tailscale: {e}") from None
    if outcome.timed_out:
        raise ExposeError(f"Tailscale {mode} timed out")
    if outcome.code != 0:
        detail = outcome.detail()
        failed = f"Tailscale {mode} failed with code {outcome.code_text}"
        raise ExposeError(f"{failed}: {detail}" if detail else failed)
    public_url = f"https://{me.dns_name}{path}"
    _log.info("Tailscale {mode} active: {url}", mode=mode, url=public_url)
    return public_url


async def _remove_route(tools: Tools, mode: str, path: str, timeout: float) -> None:
    """`tailscale <mode> off <path>`; failures are logged, never raised."""
    try:
        outcome = await tools.run("tailscale", [mode, "off", path], timeout)
    except SpawnError as e:
        _log.warn("Tailscale {mode} cleanup could not run: {error}", mode=mode, error=str(e))
        return
    if outcome.code != 0:
        _log.warn(
            "Tailscale {mode} cleanup of {path} failed (code {code}, timed out: {timed_out})",
            mode=mode, path=path, code=outcome.code_text, timed_out=outcome.timed_out,
        )  # fmt: skip


async def _legacy_route(
    tools: Tools, mode: str, path: str, target: str, timeout: float
) -> str | None:
    try:
        return await _add_route(tools, mode, path, target, timeout, timeout)
    except ExposeError as e:
        _log.warn("Tailscale {mode} exposure failed: {error}", mode=mode, error=str(e))
        return None


# --- entry points -------------------------------------------------------------------------------


async def start_tunnel(
    reactor: Any,
    *,
    provider: str,
    port: int,
    path: str,
    ngrok_auth_token: str | None = None,
    ngrok_domain: str | None = None,
    env: Mapping[str, str] | None = None,
    executables: Mapping[str, str] | None = None,
    auth_timeout: float = NGROK_COMMAND_TIMEOUT,
    startup_timeout: float = NGROK_STARTUP_TIMEOUT,
    stop_grace: float = NGROK_STOP_GRACE,
    status_timeout: float = TAILSCALE_STATUS_TIMEOUT,
    route_timeout: float = TAILSCALE_ROUTE_TIMEOUT,
    cleanup_timeout: float = TAILSCALE_CLEANUP_TIMEOUT,
) -> Tunnel:
    """
    Start `tunnel.provider` ("ngrok", "tailscale-serve" or "tailscale-funnel") for the webhook on
    127.0.0.1:`port`; the public URL ends with `path` (`serve.path`). Raises ExposeError.
    """
    if provider not in TUNNEL_PROVIDERS:
        raise ValueError(f"unknown tunnel provider: {provider!r}")
    tools = Tools.of(reactor, env, executables)
    path = path if path.startswith("/") else f"/{path}"
    if provider == "ngrok":
        try:
            return await _start_ngrok(
                tools, port, path, ngrok_auth_token, ngrok_domain,
                auth_timeout, startup_timeout, stop_grace,
            )  # fmt: skip
        except SpawnError as e:
            raise ExposeError(f"Failed to start ngrok: {e}") from None
    mode = provider.removeprefix("tailscale-")
    target = f"http://127.0.0.1:{port}{path}"
    public_url = await _add_route(tools, mode, path, target, status_timeout, route_timeout)
    return Tunnel(
        public_url, provider, stop_impl=lambda: _remove_route(tools, mode, path, cleanup_timeout)
    )


async def legacy_tailscale(
    reactor: Any,
    *,
    mode: str,
    port: int,
    path: str,
    serve_path: str,
    env: Mapping[str, str] | None = None,
    executables: Mapping[str, str] | None = None,
    timeout: float = LEGACY_TAILSCALE_TIMEOUT,
    cleanup_timeout: float = TAILSCALE_CLEANUP_TIMEOUT,
) -> Tunnel | None:
    """
    The legacy `tailscale.mode` exposure: route `path` (`tailscale.path`) to
    http://127.0.0.1:`port``serve_path`. None when mode is "off" or anything fails (logged).
    """
    if mode == "off":
        return None
    mode = "funnel" if mode == "funnel" else "serve"
    tools = Tools.of(reactor, env, executables)
    target = f"http://127.0.0.1:{port}{serve_path}"
    public_url = await _legacy_route(tools, mode, path, target, timeout)
    if public_url is None:
        return None
    return Tunnel(
        public_url,
        f"tailscale-{mode}",
        stop_impl=lambda: _remove_route(tools, mode, path, cleanup_timeout),
    )


EXPOSE_MODES = ("off", "serve", "funnel")


def resolve_expose_mode(raw: str) -> str:
    """
    `voicecall expose --mode`: "off", "serve" or "funnel", in any case. Anything else is a
    ValueError: a typo of "off" must never open a public funnel.
    """
    mode = raw.strip().lower()
    if mode not in EXPOSE_MODES:
        raise ValueError(f"unknown expose mode {raw!r}: use off, serve or funnel")
    return mode


async def expose_command(
    reactor: Any,
    *,
    mode: str,
    path: str,
    port: int,
    serve_path: str,
    env: Mapping[str, str] | None = None,
    executables: Mapping[str, str] | None = None,
    timeout: float = LEGACY_TAILSCALE_TIMEOUT,
    cleanup_timeout: float = TAILSCALE_CLEANUP_TIMEOUT,
) -> dict[str, Any]:
    """
    The JSON object `voicecall expose` prints (SPEC §17). The route forwards to
    http://127.0.0.1:`port``serve_path` (Tailscale strips the mount path before proxying).
    When ``ok`` is false, ``error`` says why; ``hint`` is added when tailscale ran but the route
    could not be set up (serve/funnel may be disabled on the tailnet). Raises ValueError for a
    mode other than off, serve or funnel.
    """
    mode = resolve_expose_mode(mode)
    tools = Tools.of(reactor, env, executables)
    try:
        tools.locate("tailscale")
    except SpawnError as e:
        result = {"ok": False, "mode": mode, "path": path}
        if mode != "off":
            result.update({"localUrl": f"http://127.0.0.1:{port}", "publicUrl": None})
        result["error"] = f"tailscale is not installed ({e}); see https://tailscale.com/download"
        return result
    if mode == "off":
        for route in ("serve", "funnel"):
            await _remove_route(tools, route, path, cleanup_timeout)
        return {"ok": True, "mode": "off", "path": path}
    local_url = f"http://127.0.0.1:{port}"
    error = None
    try:
        public_url: str | None = await _add_route(tools, mode, path, local_url + serve_path, timeout, timeout)
    except ExposeError as e:
        _log.warn("Tailscale {mode} exposure failed: {error}", mode=mode, error=str(e))
        public_url, error = None, str(e)
    result: dict[str, Any] = {
        "ok": public_url is not None,
        "mode": mode,
        "path": path,
        "localUrl": local_url,
        "publicUrl": public_url,
    }
    if public_url is None:
        result["error"] = error
        me = await _self_info(tools, timeout)
        node_id = me.node_id if me is not None else None
        enable_url = None
        if node_id:
            enable_url = f"https://login.tailscale.com/f/{mode}?node={quote(node_id, safe='')}"
        result["hint"] = {"note": EXPOSE_HINT_NOTE, "enableUrl": enable_url}
    return result
