# -*- test-case-name: tests.test_cli -*-
"""
`voicecall`: the admin CLI, a thin client of the daemon's RPC socket (SPEC §17).

    voicecall [--config PATH] [--socket PATH] COMMAND ...

It finds the socket the way the daemon chose it: --socket / $VOICECALL_SOCKET, else
`<store>/voicecall.sock` of the config found by --config / $VOICECALL_CONFIG / ./voicecall.json5 /
... (see `twistd voicecall --help`). Output is JSON (2-space indent); a failure prints its error
on stderr and exits 1. `status`, `tail` and `latency` read the store when the daemon is down.

Every command starts a fresh Python, so this module imports only what `--help` needs (click, the
socket path of voicecall.control.protocol); the config loader, Twisted's reactor machinery, the
RPC client and the store are imported by the commands that use them. It imports nothing of the
server side (the RPC server, the manager, the adapters): tests.test_cli.FootprintTests checks.
"""
from __future__ import annotations

import os
import signal
import sys

if os.path.basename(sys.argv[0]) == "voicecall":
    # The console script imports this module first: from its first instruction, Ctrl-C or
    # SIGTERM ends the command quietly (no traceback of an import, no click "Aborted!"), exiting
    # 130 or 143. Once the reactor runs, `run` routes them to cancel the work (watch_signals).
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, lambda signum, _frame: sys.exit(128 + signum))

import errno
import json
import math
import select
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import click

from voicecall import __version__
from voicecall.control import tool
from voicecall.control.protocol import default_socket_path

MODES = ("notify", "conversation")
EXPOSE_MODES = ("off", "serve", "funnel")
#: Keys of the events `tail` printed last, so a reconnect does not print them twice.
TAIL_MEMORY = 4096


class Failed(Exception):
    """A command failed; the message goes to stderr."""


class DaemonDown(Failed):
    """Nothing answers on the RPC socket."""


class Context:
    def __init__(self, config_path: str | None, socket: str | None) -> None:
        self._explicit_config = config_path
        self._socket = socket
        self._config = None
        #: The config file in use (None: none was found, the defaults apply).
        self.config_path: str | None = None

    @property
    def config(self):
        if self._config is None:
            from voicecall.config import ConfigError, config_search_paths, find_config_path, load_config, parse_config

            env = os.environ
            cwd = os.getcwd()
            path = find_config_path(self._explicit_config, env, cwd)
            if path is None:
                searched = ", ".join(config_search_paths(env, cwd))
                click.echo(
                    f"voicecall: no config file found (searched --config, $VOICECALL_CONFIG, {searched}); "
                    "using the defaults",
                    err=True,
                )
            try:
                self._config = parse_config({}, env) if path is None else load_config(path, env)
            except ConfigError as e:
                raise Failed("the config is not valid:\n" + "\n".join("  " + line for line in e.lines())) from e
            self.config_path = path
        return self._config

    @property
    def socket(self) -> str:
        return self._socket or default_socket_path(self.config.state_dir, os.environ)

    @property
    def store(self) -> str:
        """The store as messages show it (a PostgreSQL URL's password hidden)."""
        return self.config.store_shown

    def open_store(self):
        """The store, read-only (a directory's SQLite or the PostgreSQL URL's), or None if it holds none."""
        if self.config.store_is_postgres:
            from voicecall.domain.pgstore import open_readonly
            from voicecall.infra.dbwriter import StoreError

            try:
                return open_readonly(self.config.store)
            except StoreError as e:
                raise Failed(str(e)) from None
        from voicecall.domain.store import open_readonly

        return open_readonly(self.config.store)


def emit(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False))


def watch_signals(reactor, on_signal: Callable[[int], None]) -> None:
    """
    Route SIGINT and SIGTERM to `on_signal(signum)` (in the reactor thread). One that comes before
    the reactor runs is kept and delivered once it does: the early handler's SystemExit, raised
    wherever the signal lands, could land inside the reactor's start, which catches and logs it,
    and the command then waited for ever (a CI failure of test_ctrl_c_at_start_is_quiet).
    """
    early: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda n, _frame: early.append(n))

    def install() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda n, _frame: reactor.callFromThread(on_signal, n))
        if early:
            on_signal(early[0])

    reactor.callWhenRunning(install)


#: The exit status when stdout's reader has gone (`voicecall tail | head`): 128 + SIGPIPE, what
#: a shell reports for the Unix tools SIGPIPE ends.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def stdout_closed() -> SystemExit:
    """
    Nobody reads stdout any more: the quiet exit to raise. Python's final flush of stdout must not
    fail with a second broken pipe, so stdout's descriptor is pointed at /dev/null first.
    """
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test's buffer)
        pass
    else:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return SystemExit(EXIT_PIPE_CLOSED)


def run(fn: Callable[[Any], Awaitable[Any]]) -> None:
    """
    The one seam into the reactor: run `fn(reactor)` and exit with its outcome. Ctrl-C (SIGINT) or
    SIGTERM stops the command quietly, exiting 128 + the signal number (130, 143), like a shell;
    so does stdout's reader going away (141, `stdout_closed`).
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    async def main(reactor) -> None:
        stopped_by: list[int] = []
        started: list[Deferred] = []

        def on_signal(signum: int) -> None:
            if not stopped_by:
                stopped_by.append(signum)
                started[0].cancel()

        watch_signals(reactor, on_signal)  # before `fn` starts, so no signal finds no handler of ours
        work = Deferred.fromCoroutine(fn(reactor))
        started.append(work)
        try:
            await work
        except BrokenPipeError:
            raise stdout_closed() from None
        except Failed as e:
            if not stopped_by:
                click.echo(f"Error: {e}", err=True)
                raise SystemExit(1) from None
        except Exception:
            # Cancelled by a signal: whatever the cancel made of the work (CancelledError, or
            # ConnectingCancelledError while it was connecting) is the signal's outcome.
            if not stopped_by:
                raise
        if stopped_by:
            raise SystemExit(128 + stopped_by[0])

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


def daemon_command(config_path: str | None) -> str:
    """How to start the daemon the way this CLI was installed: the twistd beside this Python."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(twistd):
        twistd = "twistd"
    command = f"{twistd} -n --pidfile= voicecall"
    return f"{command} --config {config_path}" if config_path else command


def how_to_start(ctx: "Context") -> str:
    return f"start it with `make run` in the voicecall checkout, or `{daemon_command(ctx.config_path)}`"


def not_running(ctx: "Context", path: str) -> Failed:
    if ctx._config is not None and ctx.config_path is None and not ctx._socket:
        # The default socket, from a directory without a config: a `make run` daemon serves
        # `<checkout>/var/voicecall.sock`, which only its config names.
        return Failed(
            f"voicecall daemon is not running on the default socket {path} (no config file in this directory); "
            "if it runs from a checkout (make run), run voicecall in that directory or pass "
            f"--config <checkout>/voicecall.json5; else {how_to_start(ctx)}"
        )
    return Failed(f"voicecall daemon is not running (no answer on {path}); {how_to_start(ctx)}")


async def rpc(reactor, ctx: Context, method: str, params: dict, fallback: str | None = None) -> Any:
    from twisted.internet.error import ConnectError

    from voicecall.client import ConnectionClosed, RemoteError, connect

    path = ctx.socket
    try:
        client = await connect(reactor, path)
    except (ConnectError, OSError) as e:
        raise DaemonDown(not_running(ctx, path)) from e
    try:
        return await client.call(method, params)
    except RemoteError as e:
        raise Failed(str(e) or fallback or "request failed") from e
    except ConnectionClosed as e:
        raise Failed(f"voicecall closed the connection before answering {method}") from e
    finally:
        client.transport.loseConnection()


class Decimal(click.IntRange):
    """
    A whole number written in ASCII decimal digits (SPEC §17 [H]: `0x10`, `1e3`, `-5` or `²` are
    refused with `Invalid numeric value for --since: 0x10`), within a range; `--help` shows it as
    an INTEGER RANGE.
    """

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return super().convert(value, param, ctx)
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):
            name = param.opts[0] if param is not None else "value"
            # A UsageError, not BadParameter, so click does not wrap it in a second message.
            raise click.UsageError(f"Invalid numeric value for {name}: {value}", ctx)
        return super().convert(int(text), param, ctx)


def not_blank(ctx, param, value):
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty", ctx, param)
    return value


class _Group(click.Group):
    def invoke(self, click_ctx):
        try:
            return super().invoke(click_ctx)
        except Failed as e:
            click.echo(f"Error: {e}", err=True)
            raise SystemExit(1) from None
        except BrokenPipeError:
            raise stdout_closed() from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="voicecall")
@click.option("--config", "config_path", envvar="VOICECALL_CONFIG", help="Config file (else discovered like the daemon does).")
@click.option("--socket", envvar="VOICECALL_SOCKET", help="RPC socket path (else <store>/voicecall.sock).")
@click.pass_context
def main(click_ctx, config_path, socket):
    """
    Control the voicecall daemon: place calls, talk, hang up, watch.

    Shell completion (bash): eval "$(_VOICECALL_COMPLETE=bash_source voicecall)"; zsh_source and
    fish_source for the other shells.
    """
    click_ctx.obj = Context(config_path, socket)


def _place(ctx: Context, to: str | None, message: str | None, mode: str, choices: dict) -> None:
    if to is None:
        to = ctx.config.to_number
    if not to:
        raise click.UsageError("Missing --to and no toNumber configured")
    params = {"to": to, "mode": mode.lower()}
    if message:
        params["message"] = message
    params.update({name: value for name, value in choices.items() if value is not None})

    async def go(reactor):
        method = "voicecall.initiate" if message else "voicecall.start"
        try:
            result = await rpc(reactor, ctx, method, params, "initiate failed")
        except Failed as e:
            if str(e).startswith("Maximum concurrent calls"):
                # A call nobody hangs up (on the mock, one never answered) holds its slot.
                raise Failed(f"{e}: see them with `voicecall status`, hang one up with `voicecall end --call-id ID`") from None
            raise
        emit({"callId": result["callId"]})

    run(go)


MODE = click.Choice(MODES, case_sensitive=False)


def call_choices(command):
    """The per-call choices of `call` and `start` (issue 17), sent as `voicecall.initiate` params when given."""
    for option in reversed((
        click.option("--from", "from_", callback=not_blank, help="Caller id: fromNumber or one of allowedFromNumbers."),
        click.option("--voice", callback=not_blank, help="The voice this call speaks with (default: the configured one)."),
        click.option("--greeting", callback=not_blank, help="Said first when the call is answered, before the message."),
        click.option("--objective", callback=not_blank, help="What the call is for: guides the replies (responder or gateway)."),
        click.option("--max-duration", type=Decimal(), help="Hang up after this many seconds (at most maxDurationSeconds)."),
        click.option("--answering-machine", type=click.Choice(tool.ANSWERING_MACHINE),
                     help="If a machine answers: go on (ignore), speak the message after the beep, or hang up. Default: outbound.answeringMachine."),
        click.option("--record/--no-record", default=None, help="Record the call (default: recording.enabled)."),
    )):
        command = option(command)
    return command


def _choices(from_, voice, greeting, objective, max_duration, answering_machine, record) -> dict:
    return {
        "from": from_,
        "voice": voice,
        "greeting": greeting,
        "objective": objective,
        "maxDurationSeconds": max_duration,
        "answeringMachine": answering_machine,
        "record": record,
    }


@main.command()
@click.option("-m", "--message", required=True, callback=not_blank, help="What to say when the call is answered.")
@click.option("-t", "--to", help="Number to call (E.164); default: toNumber from the config.")
@click.option("--mode", type=MODE, default="conversation", show_default=True, help="Say the message and hang up, or talk.")
@call_choices
@click.pass_obj
def call(ctx, message, to, mode, **choices):
    """Place an outbound call."""
    _place(ctx, to, message, mode, _choices(**choices))


@main.command()
@click.option("--to", required=True, help="Number to call (E.164).")
@click.option("-m", "--message", callback=not_blank, help="What to say when the call is answered.")
@click.option("--mode", type=MODE, default="conversation", show_default=True, help="Say the message and hang up, or talk.")
@call_choices
@click.pass_obj
def start(ctx, to, message, mode, **choices):
    """Place an outbound call (alias of `call`)."""
    _place(ctx, to, message, mode, _choices(**choices))


@main.command(name="continue")
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("-m", "--message", required=True, callback=not_blank, help="What to say before listening.")
@click.option("--input", "input_", type=click.Choice(tool.TURN_INPUTS),
              help='What the answer may be: words (speech, the default), keys pressed (dtmf), or either ("speech dtmf").')
@click.pass_obj
def continue_(ctx, call_id, message, input_):
    """Say something, then wait for and print the person's answer (words, or keys with --input)."""
    params = {"callId": call_id, "message": message}
    if input_:
        params["input"] = input_
    run(lambda r: _call_rpc(r, ctx, "voicecall.continue", params, "continue failed"))


@main.command()
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("-m", "--message", required=True, callback=not_blank, help="What to say.")
@click.pass_obj
def speak(ctx, call_id, message):
    """Say something on a call without waiting for an answer."""
    run(lambda r: _call_rpc(r, ctx, "voicecall.speak", {"callId": call_id, "message": message}, "speak failed"))


async def _call_rpc(reactor, ctx, method, params, fallback) -> None:
    """A command on a live call; a `Call not found` for a call that has ended says it ended, and why."""
    call_id = params["callId"]
    try:
        result = await rpc(reactor, ctx, method, params, fallback)
    except Failed as e:
        if str(e) != "Call not found":
            raise
        try:
            found = await rpc(reactor, ctx, "voicecall.status", {"callId": call_id})
        except Failed:
            raise e from None
        call = found.get("call") if isinstance(found, dict) else None
        if not isinstance(call, dict) or not call.get("endedAt"):
            raise
        raise Failed(f"Call {call_id} has ended ({call.get('endReason') or call.get('state')})") from None
    emit(result)


@main.command()
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("-m", "--message", callback=not_blank, help="A goodbye to say first: the call hangs up once it has played.")
@click.pass_obj
def end(ctx, call_id, message):
    """Hang up a call (after a goodbye, with --message)."""
    params = {"callId": call_id}
    if message:
        params["message"] = message
    run(lambda r: _print_rpc(r, ctx, "voicecall.end", params, "end failed"))


@main.command()
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("--digits", required=True, callback=not_blank, help="Keys to press: 0-9, * and #; w waits half a second (e.g. 1w2#).")
@click.pass_obj
def dtmf(ctx, call_id, digits):
    """Send keypad tones on a call (a phone menu's choices); the conversation goes on."""
    run(lambda r: _call_rpc(r, ctx, "voicecall.dtmf", {"callId": call_id, "digits": digits}, "dtmf failed"))


@main.command()
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("--to", required=True, callback=not_blank, help="Number (E.164) or sip:user@host, listed in transfer.allowTo.")
@click.option("-m", "--message", callback=not_blank, help="Said to the caller before connecting them.")
@click.pass_obj
def transfer(ctx, call_id, to, message):
    """Connect the caller to a person (the call then ends here, transferred)."""
    params = {"callId": call_id, "to": to}
    if message:
        params["message"] = message
    run(lambda r: _call_rpc(r, ctx, "voicecall.transfer", params, "transfer failed"))


async def _print_rpc(reactor, ctx, method, params, fallback) -> None:
    emit(await rpc(reactor, ctx, method, params, fallback))


@main.group()
def recording():
    """Call recordings: voicecall never downloads audio unless asked."""


@recording.command()
@click.option("--call-id", required=True, callback=not_blank, help="The call (ours, or the carrier's id).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The file to write.")
@click.option("--recording-id", callback=not_blank, help="Which recording (default: the call's last completed one).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.pass_obj
def fetch(ctx, call_id, out, recording_id, force):
    """Download a call's recording from its carrier into a file.

    Reads the call from the daemon, or from the store when it is down; streams the audio to a
    temporary file beside --out, renamed into place once complete (a progress bar on a terminal).
    """
    from voicecall.control import recording as recordings

    async def go(reactor):
        try:
            found = await rpc(reactor, ctx, "voicecall.status", {"callId": call_id})
        except DaemonDown:
            found = _status_from_store(ctx, call_id)
        if not found.get("found"):
            raise Failed(f"no call {call_id}")
        call = found["call"]
        http = _download_client(reactor)
        try:
            base_url, credentials = _carrier_access(ctx, call.get("provider"))
            source = recordings.source_for(call.get("provider"), http, base_url=base_url, credentials=credentials)
            result = await recordings.fetch(
                call,
                out=out,
                recording_id=recording_id,
                force=force,
                source=source,
                http=http,
                progress=recordings.progress_bar if sys.stderr.isatty() else None,
            )
        except recordings.RecordingError as e:
            raise Failed(str(e)) from None
        emit(result)

    run(go)


def _download_client(reactor):
    """A treq client for one download (no connection kept)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from voicecall.control.recording import CONNECT_TIMEOUT

    return HTTPClient(Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=HTTPConnectionPool(reactor, persistent=False)))


def _carrier_access(ctx: Context, provider) -> tuple[str, dict]:
    """The configured base URL and credentials of `provider` (the call's carrier), as its recording_source takes them."""
    cfg = ctx.config
    keys = {
        "twilio": (cfg.twilio, {"account_sid": "twilio.accountSid", "auth_token": "twilio.authToken"}),
        "telnyx": (cfg.telnyx, {"api_key": "telnyx.apiKey"}),
        "plivo": (cfg.plivo, {"auth_id": "plivo.authId", "auth_token": "plivo.authToken"}),
    }.get(provider)
    if keys is None:
        return "", {}  # recording.source_for says why there is nothing to fetch
    section, names = keys
    credentials = {name: getattr(section, name) for name in names}
    missing = [names[name] for name, value in credentials.items() if not value]
    if missing:
        raise Failed(f"the call was made with {provider}: fetching its recordings needs {' and '.join(missing)} in the config")
    return section.base_url, credentials


@main.command()
@click.option("--call-id", callback=not_blank, help="A call id (ours or the carrier's); without it, the active calls.")
@click.option("--cluster", is_flag=True, help="The cluster's nodes instead: alive or dead, heartbeat age, their live calls.")
@click.pass_obj
def status(ctx, call_id, cluster):
    """Print a call's record, or the active calls; reads the store if the daemon is down.

    Exits 1 when the call is not found. With --cluster, every node of a cluster (PostgreSQL
    store) as the store sees it, asked of this node's daemon, or read from the store if it is down.
    """
    if cluster and call_id:
        raise click.UsageError("--cluster lists the nodes: it takes no --call-id")

    async def go(reactor):
        if cluster:
            try:
                emit(await rpc(reactor, ctx, "voicecall.cluster", {}))
            except DaemonDown:
                emit(_cluster_from_store(ctx))
            return
        params = {"callId": call_id} if call_id else {}
        try:
            result = await rpc(reactor, ctx, "voicecall.status", params)
        except DaemonDown:
            result = _status_from_store(ctx, call_id)
        if call_id and not result.get("found"):
            emit({"found": False})
            raise Failed(f"no call {call_id}")
        emit(result.get("call", result) if call_id else result)

    run(go)


def _cluster_from_store(ctx: Context) -> dict:
    """`status --cluster` while this node's daemon is down: the nodes as the PostgreSQL store sees them."""
    if not ctx.config.store_is_postgres:
        raise Failed(f"daemon not running on {ctx.socket}, and not a cluster: the store is not PostgreSQL ({ctx.store})")
    import psycopg

    from voicecall.cluster.nodes import list_nodes
    from voicecall.infra.pg import describe, redactor

    url = ctx.config.store
    try:
        conn = psycopg.connect(url, connect_timeout=5, application_name="voicecall-cli")
    except psycopg.Error as e:
        raise Failed(f"cannot connect to PostgreSQL {describe(url)}: {' '.join(redactor(url)(str(e)).split())}") from None
    click.echo(f"(daemon not running on {ctx.socket}; read the store at {ctx.store})", err=True)
    with conn:
        conn.set_read_only(True)
        conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)  # one snapshot
        if conn.execute("SELECT to_regclass('nodes') IS NULL").fetchone()[0]:
            return {"nodes": []}  # no node has started on this database yet
        return {"nodes": [n.to_json() for n in list_nodes(conn, ctx.config.cluster.lease_seconds)]}


def _status_from_store(ctx: Context, call_id: str | None) -> dict:
    store = ctx.open_store()
    if store is None:
        click.echo(f"(daemon not running on {ctx.socket}, and no store at {ctx.store})", err=True)
        return {"calls": []} if call_id is None else {"found": False}
    click.echo(f"(daemon not running on {ctx.socket}; read the store at {ctx.store})", err=True)
    with store:
        if call_id is None:
            return {"calls": [c.to_json(with_event_ids=False) for c in store.load_active()]}
        call = store.get_call(call_id)
    if call is None:
        return {"found": False}
    return {"found": True, "call": call.to_json(with_event_ids=False)}


@main.command()
@click.option("--since", default=25, type=Decimal(min=0), show_default=True, help="How many past events to print first.")
@click.option("--poll", default=250, type=Decimal(min=50), show_default=True, help="Store poll interval (ms) when the daemon is down.")
@click.pass_obj
def tail(ctx, since, poll):
    """Print recent call events, then follow new ones as they happen.

    Follows the daemon live; while it is down, follows the store, and reconnects when it is back.
    """
    run(lambda reactor: _Tail(ctx, since, poll / 1000.0).run(reactor))


class _Tail:
    """`voicecall tail`: history from the store, then live events, then the store while the daemon is down."""

    def __init__(self, ctx: Context, since: int, poll: float) -> None:
        self._ctx = ctx
        self._since = since
        self._poll = poll
        self._seq = 0  # the last store event read
        self._printed: OrderedDict[str, None] = OrderedDict()  # keys of recently printed events
        self._held: list[dict] | None = None  # live events that arrived before the store was read
        self._client = None  # the connection `_live` follows
        self._unprinted: BrokenPipeError | None = None  # a live event stdout's reader was gone for

    def _show(self, entry: dict) -> None:
        """Print an event as the daemon notifies it: the store's ``seq`` is not part of it (README)."""
        event = {k: v for k, v in entry.items() if k != "seq"}
        key = json.dumps(event, sort_keys=True)
        if key in self._printed:
            return
        self._printed[key] = None
        if len(self._printed) > TAIL_MEMORY:
            self._printed.popitem(last=False)
        click.echo(json.dumps(event, ensure_ascii=False))

    def _event(self, method: str, params) -> None:
        """A notification from the daemon: a call event is printed, or held until `_live`."""
        if method != "voicecall.event" or not isinstance(params, dict):
            return
        if self._held is not None:
            self._held.append(params)
            return
        try:
            self._show(params)
        except BrokenPipeError as e:  # `_live` ends with it: nothing more can be printed
            self._unprinted = e
            self._client.transport.loseConnection()

    def _read_store(self, first: bool = False) -> bool:
        """Print what the store holds after the last event read; False if there is no store."""
        store = self._ctx.open_store()
        if store is None:
            return False
        with store:
            if first:
                history = store.last_events(self._since) if self._since else []
                latest = store.last_events(1)
                self._seq = latest[-1]["seq"] if latest else 0
                for entry in history:
                    self._show(entry)
                return True
            while True:
                entries = store.events_after(self._seq, 1000)
                for entry in entries:
                    self._seq = entry["seq"]
                    self._show(entry)
                if len(entries) < 1000:
                    return True

    async def _subscribe(self, reactor):
        """A subscribed client (its live events are held until `_live`), or None if the daemon is down."""
        from twisted.internet.error import ConnectError

        from voicecall.client import ConnectionClosed, RemoteError, connect

        self._held = []
        try:
            client = await connect(reactor, self._ctx.socket, on_notification=self._event)
        except (ConnectError, OSError):
            return None
        try:
            # Subscribe before reading the store, so nothing committed in between is missed.
            await client.call("voicecall.subscribe", {})
        except (ConnectionClosed, RemoteError):
            client.transport.loseConnection()
            return None
        return client

    async def run(self, reactor) -> None:
        from twisted.internet.task import deferLater

        ctx = self._ctx
        client = await self._subscribe(reactor)
        has_store = self._read_store(first=True)
        if client is None and not has_store:
            raise Failed(f"nothing to follow: no store at {ctx.store} and no daemon on {ctx.socket}; {how_to_start(ctx)}")
        while True:
            if client is not None:
                try:
                    await self._live(reactor, client)
                finally:
                    client.transport.loseConnection()
                click.echo(f"(daemon stopped; following the store at {ctx.store})", err=True)
            else:
                click.echo(f"(daemon not running; following the store at {ctx.store})", err=True)
            self._read_store()
            while True:
                await deferLater(reactor, self._poll, lambda: None)
                if reader_gone():
                    raise BrokenPipeError(errno.EPIPE, "stdout's reader has gone")
                self._read_store()
                client = await self._subscribe(reactor)
                if client is not None:
                    click.echo(f"(reconnected to the daemon on {ctx.socket})", err=True)
                    self._read_store()
                    break

    async def _live(self, reactor, client) -> None:
        """Print the held events, then each one as it arrives, until the daemon or stdout's reader goes."""
        from twisted.internet.task import LoopingCall

        held, self._held = self._held or [], None
        self._client = client
        for entry in held:
            self._show(entry)
        watch = LoopingCall(self._watch_reader)
        watch.clock = reactor
        watch.start(self._poll, now=False)
        try:
            await client.closed
        finally:
            if watch.running:  # a failed watch has stopped itself; stop() would hide how we ended
                watch.stop()
        if self._unprinted is not None:
            raise self._unprinted

    def _watch_reader(self) -> None:
        """Between events, notice stdout's reader going (`voicecall tail | head -2`), as `tail -f` does."""
        if reader_gone():
            self._unprinted = BrokenPipeError(errno.EPIPE, "stdout's reader has gone")
            self._client.transport.loseConnection()


def reader_gone() -> bool:
    """Whether stdout is a pipe or terminal nobody reads any more (poll says POLLERR or POLLHUP), without writing to it."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test's buffer)
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


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


def _turn_samples(metadata: dict, every: str, last: str) -> list[int]:
    """Every turn of a call (`every`, a list the daemon keeps), else its last one (older records)."""
    values = metadata.get(every)
    if isinstance(values, list):
        return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    value = metadata.get(last)
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


@main.command()
@click.option("--last", default=200, type=Decimal(min=1), show_default=True, help="How many recent calls to scan.")
@click.pass_obj
def latency(ctx, last):
    """Turn latency statistics of recent calls (from the store)."""
    store = ctx.open_store()
    calls = []
    if store is None:
        click.echo(f"(no store at {ctx.store}: no calls recorded there)", err=True)
    else:
        with store:
            calls = store.recent_calls(last)
    turn = [ms for c in calls for ms in _turn_samples(c.metadata, "turnLatenciesMs", "lastTurnLatencyMs")]
    wait = [ms for c in calls for ms in _turn_samples(c.metadata, "turnListenWaitsMs", "lastTurnListenWaitMs")]
    emit({"recordsScanned": len(calls), "turnLatency": _summary(turn), "listenWait": _summary(wait)})


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def doctor(ctx, as_json):
    """Check what would stop real calls; exits 1 when a check fails."""
    from voicecall.control.doctor import render, run_checks

    checks = run_checks(ctx._explicit_config, ctx._socket, os.environ, os.getcwd())
    ok = all(c.ok for c in checks)
    if as_json:
        emit({"ok": ok, "checks": [c.to_json() for c in checks]})
    else:
        click.echo(render(checks))
    if not ok:
        raise SystemExit(1)


@main.command()
@click.option("--mode", type=click.Choice(EXPOSE_MODES, case_sensitive=False), default="funnel", show_default=True,
              help="funnel: public on the internet; serve: your tailnet only; off: remove both routes.")
@click.option("--path", help="The public path (default: tailscale.path).")
@click.option("--port", type=click.IntRange(1, 65535), help="The local port (default: serve.port).")
@click.option("--serve-path", help="The webhook path on the local port (default: serve.path).")
@click.pass_obj
def expose(ctx, mode, path, port, serve_path):
    """Expose the webhook with Tailscale serve/funnel, or remove the routes (--mode off).

    Prints {"ok", ...}; exits 1 when ok is false.
    """
    from voicecall.control.expose import expose_command

    cfg = ctx.config

    async def go(reactor):
        result = await expose_command(
            reactor,
            mode=mode.lower(),
            path=path or cfg.tailscale.path,
            port=port or cfg.serve.port,
            serve_path=serve_path or cfg.serve.path,
        )
        emit(result)
        if not result.get("ok"):
            raise Failed(result.get("error") or f"Tailscale {mode.lower()} failed")

    run(go)


@main.command(name="tool-schema")
def tool_schema():
    """Print the `voice_call` agent tool's JSON schema."""
    emit(tool.schema())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
