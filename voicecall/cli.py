# -*- test-case-name: tests.test_cli -*-
"""
`voicecall`: the admin CLI, a thin client of the daemon's RPC socket (SPEC §17).

    voicecall [--config PATH] [--socket PATH] COMMAND ...

It finds the socket the way the daemon chose it: --socket / $VOICECALL_SOCKET, else
`<store>/voicecall.sock` of the config found by --config / $VOICECALL_CONFIG / ./voicecall.json5 /
... (see `twistd voicecall --help`). Output is JSON (2-space indent); a failure prints its error
on stderr and exits 1. `status`, `tail` and `latency` read the store when the daemon is down.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Awaitable, Callable

import click
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import react

from voicecall.client import ConnectionClosed, RemoteError, connect
from voicecall.config import ConfigError, find_config_path, load_config, parse_config
from voicecall.rpc import default_socket_path
from voicecall.store import open_readonly
from voicecall import tool


class Failed(Exception):
    """A command failed; the message goes to stderr."""


class Context:
    def __init__(self, config_path: str | None, socket: str | None) -> None:
        self._explicit_config = config_path
        self._socket = socket
        self._config = None

    @property
    def config(self):
        if self._config is None:
            env = os.environ
            path = find_config_path(self._explicit_config, env, os.getcwd())
            try:
                self._config = parse_config({}, env) if path is None else load_config(path, env)
            except ConfigError as e:
                raise Failed(str(e)) from e
        return self._config

    @property
    def socket(self) -> str:
        return self._socket or default_socket_path(self.config.store, os.environ)

    @property
    def store(self) -> str:
        return self.config.store


def emit(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False))


def run(fn: Callable[[Any], Awaitable[Any]]) -> None:
    """The one seam into the reactor: run `fn(reactor)` and exit with its outcome."""

    async def main(reactor) -> None:
        try:
            await fn(reactor)
        except Failed as e:
            click.echo(f"Error: {e}", err=True)
            raise SystemExit(1)

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


def not_running(path: str) -> Failed:
    return Failed(f"voicecall daemon is not running (no answer on {path}); start it with `twistd -n voicecall`")


async def rpc(reactor, ctx: Context, method: str, params: dict, fallback: str | None = None) -> Any:
    path = ctx.socket
    try:
        client = await connect(reactor, path)
    except (ConnectError, OSError) as e:
        raise not_running(path) from e
    try:
        return await client.call(method, params)
    except RemoteError as e:
        raise Failed(str(e) or fallback or "request failed") from e
    except ConnectionClosed as e:
        raise Failed(f"voicecall closed the connection before answering {method}") from e
    finally:
        client.transport.loseConnection()


def decimal(name: str, minimum: int = 0) -> Callable:
    def convert(ctx, param, value):
        if value is None:
            return None
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):
            raise click.BadParameter(f"Invalid numeric value for --{name}: {value}")
        return max(minimum, int(text))

    return convert


class _Group(click.Group):
    def invoke(self, click_ctx):
        try:
            return super().invoke(click_ctx)
        except Failed as e:
            click.echo(f"Error: {e}", err=True)
            raise SystemExit(1)


@click.group(cls=_Group)
@click.option("--config", "config_path", envvar="VOICECALL_CONFIG", help="Config file (else discovered like the daemon does).")
@click.option("--socket", envvar="VOICECALL_SOCKET", help="RPC socket path (else <store>/voicecall.sock).")
@click.pass_context
def main(click_ctx, config_path, socket):
    """Control the voicecall daemon: place calls, talk, hang up, watch."""
    click_ctx.obj = Context(config_path, socket)


def _place(ctx: Context, to: str | None, message: str | None, mode: str) -> None:
    if to is None:
        to = ctx.config.to_number
    if not to:
        raise click.UsageError("Missing --to and no toNumber configured")
    params = {"to": to, "mode": mode if mode in ("notify", "conversation") else None}
    if message:
        params["message"] = message

    async def go(reactor):
        method = "voicecall.initiate" if message else "voicecall.start"
        result = await rpc(reactor, ctx, method, params, "initiate failed")
        emit({"callId": result["callId"]})

    run(go)


@main.command()
@click.option("-m", "--message", required=True, help="What to say when the call is answered.")
@click.option("-t", "--to", help="Number to call (E.164); default: toNumber from the config.")
@click.option("--mode", default="conversation", show_default=True, help="notify | conversation")
@click.pass_obj
def call(ctx, message, to, mode):
    """Place an outbound call."""
    _place(ctx, to, message, mode)


@main.command()
@click.option("--to", required=True, help="Number to call (E.164).")
@click.option("--message", help="What to say when the call is answered.")
@click.option("--mode", default="conversation", show_default=True, help="notify | conversation")
@click.pass_obj
def start(ctx, to, message, mode):
    """Place an outbound call (alias of `call`)."""
    _place(ctx, to, message, mode)


@main.command(name="continue")
@click.option("--call-id", required=True)
@click.option("--message", required=True, help="What to say before listening.")
@click.pass_obj
def continue_(ctx, call_id, message):
    """Say something, then wait for and print the person's answer."""
    run(lambda r: _print_rpc(r, ctx, "voicecall.continue", {"callId": call_id, "message": message}, "continue failed"))


@main.command()
@click.option("--call-id", required=True)
@click.option("--message", required=True)
@click.pass_obj
def speak(ctx, call_id, message):
    """Say something on a call without waiting for an answer."""
    run(lambda r: _print_rpc(r, ctx, "voicecall.speak", {"callId": call_id, "message": message}, "speak failed"))


@main.command()
@click.option("--call-id", required=True)
@click.pass_obj
def end(ctx, call_id):
    """Hang up a call."""
    run(lambda r: _print_rpc(r, ctx, "voicecall.end", {"callId": call_id}, "end failed"))


async def _print_rpc(reactor, ctx, method, params, fallback) -> None:
    emit(await rpc(reactor, ctx, method, params, fallback))


@main.command()
@click.option("--call-id", help="A call id (ours or the carrier's); without it, the active calls.")
@click.pass_obj
def status(ctx, call_id):
    """Print a call's record, or the active calls; reads the store if the daemon is down."""

    async def go(reactor):
        params = {"callId": call_id} if call_id else {}
        try:
            result = await rpc(reactor, ctx, "voicecall.status", params)
        except Failed as e:
            if "not running" not in str(e):
                raise
            result = _status_from_store(ctx, call_id)
        emit(result.get("call", result) if call_id else result)

    run(go)


def _status_from_store(ctx: Context, call_id: str | None) -> dict:
    store = open_readonly(ctx.store)
    if store is None:
        return {"calls": []} if call_id is None else {"found": False}
    with store:
        if call_id is None:
            return {"calls": [c.to_json(with_event_ids=False) for c in store.load_active()]}
        call = store.get_call(call_id)
    if call is None:
        return {"found": False}
    return {"found": True, "call": call.to_json(with_event_ids=False)}


@main.command()
@click.option("--since", default="25", callback=decimal("since"), show_default=True, help="How many past events to print first.")
@click.option("--poll", default="250", callback=decimal("poll", 50), show_default=True, help="Store poll interval (ms) when the daemon is down.")
@click.pass_obj
def tail(ctx, since, poll):
    """Print recent call events, then follow new ones as they happen."""

    async def go(reactor):
        live: list[dict] = []
        try:
            client = await connect(reactor, ctx.socket, on_notification=lambda m, p: live.append(p))
            # Subscribe before reading history, so nothing committed in between is missed.
            await client.call("voicecall.subscribe", {})
        except (ConnectError, OSError, ConnectionClosed):
            client = None
        store = open_readonly(ctx.store)
        history = []
        if store is not None:
            with store:
                history = store.last_events(since) if since else []
        printed = {_event_key(entry) for entry in history}
        for entry in history:
            click.echo(json.dumps(entry, ensure_ascii=False))
        if client is None:
            if store is None:
                raise Failed(f"No store at {ctx.store} and no daemon on {ctx.socket}")
            click.echo(f"(daemon not running; following the store at {ctx.store})", err=True)
            await _follow_store(reactor, ctx, history[-1]["seq"] if history else 0, poll)
            return

        def on_event(method, params):
            if method == "voicecall.event" and _event_key(params) not in printed:
                click.echo(json.dumps(params, ensure_ascii=False))

        for entry in live:
            on_event("voicecall.event", entry)
        printed = set()
        client._on_notification = on_event
        await client.closed
        raise Failed("voicecall closed the connection")

    run(go)


def _event_key(entry: dict) -> str:
    return json.dumps({k: v for k, v in entry.items() if k != "seq"}, sort_keys=True)


async def _follow_store(reactor, ctx: Context, seq: int, poll_ms: int) -> None:
    from twisted.internet.task import deferLater

    while True:
        await deferLater(reactor, poll_ms / 1000.0, lambda: None)
        store = open_readonly(ctx.store)
        if store is None:
            continue
        with store:
            entries = store.events_after(seq, 1000)
        for entry in entries:
            seq = entry["seq"]
            click.echo(json.dumps(entry, ensure_ascii=False))


def _summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0, "minMs": 0, "maxMs": 0, "avgMs": 0, "p50Ms": 0, "p95Ms": 0}
    ordered = sorted(values)

    def pct(p: float) -> int:
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[index]

    return {
        "count": len(ordered),
        "minMs": ordered[0],
        "maxMs": ordered[-1],
        "avgMs": round(sum(ordered) / len(ordered)),
        "p50Ms": pct(50),
        "p95Ms": pct(95),
    }


@main.command()
@click.option("--last", default="200", callback=decimal("last", 1), show_default=True, help="How many recent calls to scan.")
@click.pass_obj
def latency(ctx, last):
    """Turn latency statistics of recent calls (from the store)."""
    store = open_readonly(ctx.store)
    calls = []
    if store is not None:
        with store:
            calls = store.recent_calls(last)
    turn = [c.metadata["lastTurnLatencyMs"] for c in calls if isinstance(c.metadata.get("lastTurnLatencyMs"), int)]
    wait = [c.metadata["lastTurnListenWaitMs"] for c in calls if isinstance(c.metadata.get("lastTurnListenWaitMs"), int)]
    emit({"recordsScanned": len(calls), "turnLatency": _summary(turn), "listenWait": _summary(wait)})


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def doctor(ctx, as_json):
    """Check what would stop real calls; exits 1 when a check fails."""
    from voicecall.doctor import render, run_checks

    checks = run_checks(ctx._explicit_config, ctx._socket, os.environ, os.getcwd())
    ok = all(c.ok for c in checks)
    if as_json:
        emit({"ok": ok, "checks": [c.to_json() for c in checks]})
    else:
        click.echo(render(checks))
    if not ok:
        raise SystemExit(1)


@main.command()
@click.option("--mode", default="funnel", show_default=True, help="off | serve | funnel (anything else: funnel)")
@click.option("--path", help="The public path (default: tailscale.path).")
@click.option("--port", type=int, help="The local port (default: serve.port).")
@click.option("--serve-path", help="The webhook path on the local port (default: serve.path).")
@click.pass_obj
def expose(ctx, mode, path, port, serve_path):
    """Expose the webhook with Tailscale serve/funnel, or remove the routes (--mode off)."""
    from voicecall.expose import expose_command, resolve_expose_mode

    cfg = ctx.config

    async def go(reactor):
        emit(
            await expose_command(
                reactor,
                mode=resolve_expose_mode(mode),
                path=path or cfg.tailscale.path,
                port=port or cfg.serve.port,
                serve_path=serve_path or cfg.serve.path,
            )
        )

    run(go)


@main.command(name="tool-schema")
def tool_schema():
    """Print the `voice_call` agent tool's JSON schema."""
    emit(tool.schema())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
