"""
The one test harness: a voicecall daemon in this process or as a child process, the carrier
and speech fakes beside it, and `eventually`, the one way a test waits for something.

In-process (the real `makeService` on the real reactor, listening on loopback, driven through
the RPC client), for tests that need a carrier fake in the same reactor:

    service, rpc = await start_daemon(self, {"provider": "mock"})

As a child process (`twistd voicecall` and the CLI), for the integration tier:

    workdir = make_workdir(self, {"outbound": {"notifyHangupDelaySec": 1}})
    daemon = await spawn_daemon(self, workdir)          # ready line parsed
    result = await run_cli(self, workdir, "call", "--to", "+15550001234", "--message", "Hi")
    web = webhook_client(self)
    await web.post(daemon.webhook_url, event("call.answered", result.json()["callId"]))

Waiting: `await eventually(check, timeout, "what is awaited")` polls `check` (plain or async) on
the reactor and fails with that description and the last value seen. A test that asserts that
something did NOT happen first waits for a positive marker that it would have happened by then
(a later event processed after it, a counter, a log line), never for a fixed time.

Children get `os.environ` without VOICECALL_CONFIG / VOICECALL_SOCKET, with the checkout on
PYTHONPATH, unbuffered output and the work directory as their cwd. Every child, connection,
listener and HTTP pool a helper creates is reaped or closed by a cleanup on the test case.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from typing import Any, Awaitable, Callable, TypeVar

from attrs import define, frozen
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

import voicecall
from voicecall import tap
from voicecall.client import connect

T = TypeVar("T")

POLL_INTERVAL = 0.02


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float, what: str) -> T:
    """
    Call `check()` (awaiting it if it returns an awaitable) every POLL_INTERVAL on the reactor
    until it returns something truthy, and return that; after `timeout` seconds fail with an
    AssertionError naming `what` was awaited and the last value `check` returned.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {value!r}")
        await deferLater(reactor, POLL_INTERVAL, lambda: None)


def sleep(seconds: float) -> Deferred[None]:
    """Let real time pass. Only for load tests that must spread work in time; to wait, use `eventually`."""
    return deferLater(reactor, seconds, lambda: None)


def free_port() -> int:
    """A loopback port that was free a moment ago (for configs that must name their port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir(testcase) -> str:
    """A fresh short `/tmp/vc-*` directory (UNIX socket paths must stay under 108 bytes), removed at cleanup."""
    path = tempfile.mkdtemp(prefix="vc-", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def http_client(testcase) -> HTTPClient:
    """A treq client over a non-persistent pool that is closed at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


def raise_fd_limit(testcase, want: int = 4096) -> None:
    """Let a flood test open `want` descriptors (restored afterwards), if the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        testcase.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


# --- the daemon in this process, and fakes beside it -----------------------------------------


async def start_daemon(testcase, config: dict, directory: str | None = None):
    """Start voicecall in this process with `config` (store and RPC socket in a temp dir); returns (service, rpc client)."""
    directory = directory or workdir(testcase)
    config = {**config, "store": directory}
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump(config, f)
    port = config.get("serve", {}).get("port")
    options = tap.Options()
    options.parseOptions(
        ["--config", path, "--rpc", f"unix:{directory}/rpc.sock"]
        + ([] if port else ["--webhook", "tcp:0:interface=127.0.0.1"])
    )
    service = tap.makeService(options, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    await service.ready
    client = await connect(reactor, f"{directory}/rpc.sock")
    testcase.addCleanup(client.transport.loseConnection)
    return service, client


async def call_status(rpc, call_id: str) -> dict:
    """The record `voicecall.status` gives for `call_id`, over an in-process daemon's RPC client."""
    return (await rpc.call("voicecall.status", {"callId": call_id}))["call"]


async def until_state(rpc, call_id: str, *states: str, timeout: float = 6.0) -> dict:
    """The record of `call_id` once its state is one of `states`."""

    async def reached():
        record = await call_status(rpc, call_id)
        return record if record["state"] in states else None

    return await eventually(reached, timeout, f"call {call_id} to reach {states}")


async def serve(testcase, resource) -> str:
    """Serve a twisted.web resource on loopback; returns its base URL."""
    site = Site(resource)
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


async def speech_fakes(testcase, tts_key: str = "sk-tts", stt_key: str = "sk-stt", transcripts=()):
    """The fake OpenAI speech endpoint (its base URL) and fake realtime STT server, on loopback."""
    from voicecall.testing.openai_realtime import FakeRealtimeServer
    from voicecall.testing.speech import FakeOpenAISpeech

    speech = FakeOpenAISpeech(reactor, tts_key, chunk_bytes=960)
    speech_base = await serve(testcase, speech.resource())
    stt = FakeRealtimeServer(reactor, stt_key, script=list(transcripts))
    stt.listen()
    testcase.addCleanup(stt.stop)
    return speech, speech_base, stt


# --- the daemon and the CLI as child processes -----------------------------------------------


#: The checkout whose `voicecall` package these tests import; children import the same one.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(voicecall.__file__)))

#: `python -m twisted.scripts.twistd` does nothing (the module has no __main__ guard), so the
#: children run twistd's entry point the way the `twistd` console script does.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())",
]
CLI = [sys.executable, "-m", "voicecall.control.cli"]

READY = re.compile(rb"voicecall ready: webhook (\S+)  rpc (\S+)")
READY_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0

#: Mock-provider settings every test daemon starts from (`store` is added per work directory).
BASE_CONFIG: dict[str, Any] = {
    "provider": "mock",
    "maxConcurrentCalls": 5,
    "outbound": {"notifyHangupDelaySec": 1},
}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ours, minus the voicecall overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("VOICECALL_CONFIG", "VOICECALL_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


# --- child processes -------------------------------------------------------------------------


class ChildFailed(AssertionError):
    """A child process did not do what a test waited for (its output is in the message)."""


class ChildProcess(ProcessProtocol):
    """A spawned child: collects its output and lets tests wait for output or for its exit."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.out = bytearray()
        self.err = bytearray()
        #: The reason given to `processEnded` (ProcessDone or ProcessTerminated), once it ended.
        self.reason: Failure | None = None
        self._watchers: list[tuple[Callable[[ChildProcess], Any], Deferred]] = []

    # -- ProcessProtocol --------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self._check()

    # -- state --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.reason is None

    @property
    def exit_code(self) -> int | None:
        return None if self.reason is None else self.reason.value.exitCode

    @property
    def exit_signal(self) -> int | None:
        return None if self.reason is None else getattr(self.reason.value, "signal", None)

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def describe(self) -> str:
        state = "running" if self.running else f"exit code {self.exit_code}, signal {self.exit_signal}"
        return (
            f"{' '.join(self.argv[-6:])} ({state})\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )

    # -- waiting ------------------------------------------------------------------------------

    def until(self, predicate: Callable[[ChildProcess], Any], timeout: float, what: str) -> Deferred[Any]:
        """Fire with `predicate(self)` once it is truthy; fail if the child ends first or on timeout."""
        d: Deferred[Any] = Deferred()
        self._watchers.append((predicate, d))
        self._check()

        def timed_out(result, seconds):
            raise ChildFailed(f"{what}: not within {seconds:g}s\n{self.describe()}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        return d

    def wait_for_output(self, pattern: re.Pattern[bytes], timeout: float, what: str = "output") -> Deferred[re.Match]:
        """Fire with the first match of `pattern` in stdout."""
        return self.until(lambda child: pattern.search(child.out), timeout, what)

    def ended(self, timeout: float = EXIT_TIMEOUT) -> Deferred[ChildProcess]:
        """Fire with this child once it has exited (and its pipes are closed)."""
        return self.until(lambda child: child if not child.running else None, timeout, "exit")

    def _check(self) -> None:
        keep = []
        for predicate, d in self._watchers:
            if d.called:
                continue
            value = predicate(self)
            if value:
                d.callback(value)
            elif not self.running:
                d.errback(ChildFailed(f"the child exited first\n{self.describe()}"))
            else:
                keep.append((predicate, d))
        self._watchers = keep

    # -- control ------------------------------------------------------------------------------

    def send_signal(self, name: str) -> None:
        if self.running:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    async def reap(self) -> None:
        """Make sure the child is gone: SIGKILL it if it still runs, and wait for its exit."""
        if self.running:
            self.send_signal("KILL")
            await self.ended()


def spawn(
    testcase, argv: list[str], cwd: str, env: dict[str, str] | None = None, fds: dict[int, int] | None = None
) -> ChildProcess:
    """
    Start `argv`; the test's cleanup kills it if it is still running. `fds` maps descriptors of
    the child (3 and up) to ours that it inherits (e.g. a listening socket, as systemd passes).
    """
    child = ChildProcess(argv)
    child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", **(fds or {})}
    reactor.spawnProcess(child, argv[0], argv, env=child_env(env), path=cwd, childFDs=child_fds)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(child.reap()))
    return child


# --- the work directory, the daemon and the CLI ----------------------------------------------


@frozen
class Workdir:
    """A short temporary directory holding a config file, the store and the RPC socket."""

    path: str
    config_path: str

    @property
    def rpc_path(self) -> str:
        return os.path.join(self.path, "rpc.sock")


def make_workdir(testcase, overrides: dict[str, Any] | None = None, raw: str | None = None) -> Workdir:
    """
    A fresh `/tmp/vc-*` directory (UNIX socket paths must stay under 108 bytes) with a config
    file: `BASE_CONFIG` plus `overrides` and `store` set to the directory, or `raw` verbatim.
    Removed by the test's cleanup (registered first, so it runs after every child is reaped).
    """
    path = workdir(testcase)
    config_path = os.path.join(path, "voicecall.json")
    if raw is None:
        config = json.loads(json.dumps(BASE_CONFIG))
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        config["store"] = path
        raw = json.dumps(config, indent=2)
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(raw)
    return Workdir(path=path, config_path=config_path)


def daemon_argv(workdir: Workdir, webhook: str = "tcp:0:interface=127.0.0.1") -> list[str]:
    return [
        *TWISTD,
        "--nodaemon",
        "--pidfile=",
        "voicecall",
        "--config",
        workdir.config_path,
        "--webhook",
        webhook,
        "--rpc",
        "unix:" + workdir.rpc_path,
    ]


@define
class Daemon:
    """A running `twistd voicecall` child on a work directory."""

    workdir: Workdir
    process: ChildProcess
    webhook_url: str = ""
    rpc_path: str = ""

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>`: the webhook URL without its path."""
        scheme, rest = self.webhook_url.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"

    async def stop(self, timeout: float = EXIT_TIMEOUT) -> ChildProcess:
        """SIGTERM, then wait for the exit."""
        self.process.send_signal("TERM")
        return await self.process.ended(timeout)

    async def kill9(self, timeout: float = EXIT_TIMEOUT) -> ChildProcess:
        """SIGKILL, then wait for the exit."""
        self.process.send_signal("KILL")
        return await self.process.ended(timeout)


#: Runs the rest of argv with LISTEN_PID set to its own pid, as systemd sets it (sh's `exec`
#: keeps the pid), for a child that inherits a socket (sd_listen_fds protocol).
_AS_SYSTEMD = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"]


async def spawn_daemon(
    testcase,
    workdir: Workdir,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    webhook_socket: socket.socket | None = None,
) -> Daemon:
    """
    Start the daemon (with `env` added to its environment) and wait for its ready line. With
    `webhook_socket` (a listening socket the test holds, as systemd holds a .socket unit's), the
    daemon inherits it as fd 3 with LISTEN_FDS=1 and LISTEN_PID, and serves its webhook there
    (`--webhook systemd:domain=INET:name=web`, as systemd/voicecall.service does).
    """
    if webhook_socket is None:
        process = spawn(testcase, daemon_argv(workdir), cwd=workdir.path, env=env)
    else:
        argv = _AS_SYSTEMD + daemon_argv(workdir, webhook="systemd:domain=INET:name=web")
        env = {**(env or {}), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
        process = spawn(testcase, argv, cwd=workdir.path, env=env, fds={3: webhook_socket.fileno()})
    match = await process.wait_for_output(READY, timeout, "voicecall ready line")
    return Daemon(
        workdir=workdir,
        process=process,
        webhook_url=match.group(1).decode(),
        rpc_path=match.group(2).decode(),
    )


@frozen
class CliResult:
    """What one CLI run printed and how it exited."""

    code: int | None
    signal: int | None
    out: str
    err: str

    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"CLI printed no JSON (exit {self.code})\nstdout: {self.out}\nstderr: {self.err}") from None


def cli_argv(workdir: Workdir, *args: str) -> list[str]:
    return [*CLI, "--config", workdir.config_path, "--socket", workdir.rpc_path, *args]


def spawn_cli(testcase, workdir: Workdir, *args: str, env: dict[str, str] | None = None) -> ChildProcess:
    """Start `voicecall --config ... --socket ... ARGS` without waiting for it."""
    return spawn(testcase, cli_argv(workdir, *args), cwd=workdir.path, env=env)


async def run_cli(
    testcase, workdir: Workdir, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
) -> CliResult:
    """Run `voicecall --config ... --socket ... ARGS` to completion."""
    child = spawn_cli(testcase, workdir, *args, env=env)
    await child.ended(timeout)
    return CliResult(code=child.exit_code, signal=child.exit_signal, out=child.stdout, err=child.stderr)


# --- talking to the daemon directly ----------------------------------------------------------


async def rpc(socket_path: str, method: str, params: dict | None = None) -> Any:
    """One JSON-RPC request on a fresh connection (closed before returning)."""
    client = await connect(reactor, socket_path)
    try:
        return await client.call(method, params or {})
    finally:
        client.transport.loseConnection()
        await client.closed


async def call_record(socket_path: str, call_id: str) -> dict:
    """`voicecall.status` for one call; fails if the daemon does not know it."""
    answer = await rpc(socket_path, "voicecall.status", {"callId": call_id})
    if not answer.get("found"):
        raise AssertionError(f"call {call_id} not found: {answer!r}")
    return answer["call"]


def transcript(call: dict) -> list[tuple[str, str]]:
    """A call record's transcript as (speaker, text) pairs."""
    return [(entry["speaker"], entry["text"]) for entry in call["transcript"]]


@frozen
class HttpAnswer:
    code: int
    headers: dict[str, str]
    body: bytes


@define
class WebhookClient:
    """treq over `http_client`'s non-persistent pool: every request gets a connection that then closes."""

    _http: HTTPClient

    async def post(self, url: str, body: bytes | dict | list) -> HttpAnswer:
        """POST a JSON body (a dict/list is encoded; bytes are sent as they are)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self._http.post(url, data=data, headers={b"Content-Type": [b"application/json"]})
        return await self._answer(response)

    async def get(self, url: str) -> HttpAnswer:
        return await self._answer(await self._http.get(url))

    @staticmethod
    async def _answer(response) -> HttpAnswer:
        body = await response.content()
        headers = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        return HttpAnswer(code=response.code, headers=headers, body=body)


def webhook_client(testcase) -> WebhookClient:
    """A `WebhookClient` over `http_client(testcase)`."""
    return WebhookClient(http=http_client(testcase))


def speech(call_id: str, text: str, **extra: Any) -> dict:
    """A mock `call.speech` webhook body (final unless told)."""
    return {"event": {"type": "call.speech", "callId": call_id, "transcript": text, "isFinal": True, **extra}}


def event(kind: str, call_id: str, **extra: Any) -> dict:
    """A mock webhook body carrying one event."""
    return {"event": {"type": kind, "callId": call_id, **extra}}


# --- a raw JSON-RPC line connection ----------------------------------------------------------


class RawRpcConnection(LineOnlyReceiver):
    """Newline-delimited JSON lines over the RPC socket, read back one message at a time."""

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.received: list[dict] = []
        self._waiters: list[tuple[Callable[[dict], bool], Deferred]] = []
        self.lost: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        self._waiters = [(match, d) for match, d in self._waiters if not d.called]
        for entry in self._waiters:
            match, d = entry
            if match(message):
                self._waiters.remove(entry)
                d.callback(message)
                return
        self.received.append(message)

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost.callback(None)

    def send(self, payload: bytes | dict) -> None:
        """Write one line (a dict is encoded as JSON)."""
        line = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.transport.write(line + b"\n")

    def request(self, rid: Any, method: str, params: Any = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)

    def answer(self, match: Callable[[dict], bool], timeout: float = 10.0) -> Deferred[dict]:
        """The first message (already received or still to come) for which `match` is true."""
        for message in self.received:
            if match(message):
                self.received.remove(message)
                return succeed(message)
        d: Deferred[dict] = Deferred()
        self._waiters.append((match, d))

        def timed_out(result, seconds):
            raise AssertionError(f"no matching RPC message within {seconds:g}s; received {self.received!r}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        return d

    def answer_to(self, rid: Any, timeout: float = 10.0) -> Deferred[dict]:
        """The response whose id is `rid`."""
        return self.answer(lambda m: "method" not in m and m.get("id") == rid, timeout)


async def raw_rpc(testcase, socket_path: str) -> RawRpcConnection:
    """A raw line connection to the RPC socket; the test's cleanup closes it and waits."""
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=5)
    connection = await endpoint.connect(Factory.forProtocol(RawRpcConnection))

    def close() -> Deferred[None]:
        if not connection.lost.called:
            connection.transport.loseConnection()
        return connection.lost

    testcase.addCleanup(close)
    return connection
