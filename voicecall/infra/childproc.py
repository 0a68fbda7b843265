# -*- test-case-name: tests.test_expose -*-
"""
Child processes on the reactor: spawn through ``reactor.spawnProcess``, collect output as
lines or bytes with caps on what is kept, wait with time limits, and terminate (SIGTERM, then
SIGKILL) and reap. Used by expose.py for ngrok and tailscale; never logs command lines.
"""
from __future__ import annotations

import codecs
import os
import re
import shutil
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="voicecall.infra.childproc")

KILL_WAIT = 1.0  # how long to wait for the reaping of a SIGKILLed child before giving up on it
MAX_LINE_CHARS = 16 * 1024  # longest ngrok log line parsed; longer lines are dropped
MAX_KEPT_CHARS = 4 * 1024  # output kept for error messages
MAX_COMMAND_BYTES = 16 * 1024  # output kept of a one-shot command
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
TIMED_OUT = object()



class LineSink:
    """Hands complete lines to a callback: UTF-8 split across reads is reassembled, partial lines
    wait for their newline (or the end of the stream), and lines longer than the cap are dropped."""

    def __init__(self, on_line: Callable[[str], None], max_line: int = MAX_LINE_CHARS) -> None:
        self._on_line = on_line
        self._max = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        self._dropping = False

    def feed(self, data: bytes) -> None:
        self._split(self._decoder.decode(data))

    def close(self) -> None:
        self._split(self._decoder.decode(b"", True))
        rest, self._partial = self._partial, ""
        if rest and not self._dropping:
            self._emit(rest)
        self._dropping = False

    def _split(self, text: str) -> None:
        *complete, tail = text.split("\n")
        for piece in complete:
            line, self._partial = self._partial + piece, ""
            if self._dropping:
                self._dropping = False
            elif len(line) <= self._max:
                self._emit(line)
        if not self._dropping:
            self._partial += tail
            if len(self._partial) > self._max:
                self._partial, self._dropping = "", True

    def _emit(self, line: str) -> None:
        try:
            self._on_line(line.rstrip("\r"))
        except Exception:
            _log.failure("handling a line of child output failed")


class ByteSink:
    """Keeps the last `limit` bytes of a stream; decodes them once at the end."""

    def __init__(self, limit: int = MAX_COMMAND_BYTES) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self.truncated = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit:
            del self._buffer[: len(self._buffer) - self._limit]
            self.truncated = True

    def close(self) -> None:
        pass

    def text(self) -> str:
        data = bytes(self._buffer)
        if self.truncated:  # the cut may have landed inside a UTF-8 sequence
            data = data.lstrip(bytes(range(0x80, 0xC0)))
        return data.decode("utf-8", "replace")


class TextTail:
    """The last `limit` characters of a sequence of lines, for error messages."""

    def __init__(self, limit: int = MAX_KEPT_CHARS) -> None:
        self._limit = limit
        self._lines: deque[str] = deque()
        self._size = 0
        self.truncated = False

    def add(self, line: str) -> None:
        if len(line) > self._limit:
            line, self.truncated = line[-self._limit :], True
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.popleft()) + 1
            self.truncated = True

    def text(self) -> str:
        return describe_output("\n".join(self._lines), self.truncated)


class Child(ProcessProtocol):
    """A child process: output to two sinks, stdin closed, and its end observable by many."""

    def __init__(self, stdout: LineSink | ByteSink, stderr: LineSink | ByteSink) -> None:
        self._sinks: dict[int, LineSink | ByteSink] = {1: stdout, 2: stderr}
        self._waiters: list[Deferred[None]] = []
        self.ended = False
        self.exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        sink = self._sinks.get(childFD)
        if sink is not None:
            sink.feed(data)

    def childConnectionLost(self, childFD: int) -> None:
        sink = self._sinks.pop(childFD, None)
        if sink is not None:
            sink.close()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.exit_code = getattr(reason.value, "exitCode", None)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_ended(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.ended:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def code_text(self) -> str:
        """The exit code as Node printed it: the number, or ``null`` when a signal ended it."""
        return "null" if self.exit_code is None else str(self.exit_code)

    def send(self, signal_name: str) -> None:
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(signal_name)
        except ProcessExitedAlready:
            pass
        except OSError:
            _log.failure("signalling child {pid} failed", pid=self.pid)

    def kill(self) -> None:
        """SIGKILL, and drop our ends of its pipes so its end is reported even if they linger."""
        if self.ended or self.transport is None:
            return
        self.send("KILL")
        self.transport.loseConnection()


class SpawnError(Exception):
    pass


async def ended_within(reactor: Any, child: Child, seconds: float) -> bool:
    waiter = child.when_ended()
    waiter.addCallback(lambda _: True)
    waiter.addTimeout(seconds, reactor, onTimeoutCancel=lambda _result, _timeout: False)
    return await waiter


async def terminate(reactor: Any, child: Child, grace: float) -> None:
    """SIGTERM and up to `grace` seconds to exit (skipped when grace <= 0), then SIGKILL."""
    if child.ended:
        return
    if grace > 0:
        child.send("TERM")
        if await ended_within(reactor, child, grace):
            return
    child.kill()
    if not await ended_within(reactor, child, KILL_WAIT):
        _log.warn("child process {pid} was not reaped after SIGKILL", pid=child.pid)


@frozen
class Outcome:
    code: int | None  # None when a signal ended it or it timed out
    code_text: str
    timed_out: bool
    stdout: str
    stdout_truncated: bool
    stderr: str
    stderr_truncated: bool

    def detail(self) -> str:
        if self.stderr.strip():
            return describe_output(self.stderr, self.stderr_truncated)
        return describe_output(self.stdout, self.stdout_truncated)


@frozen
class Tools:
    """The reactor, the children's environment, and where the executables are."""

    reactor: Any
    env: dict[str, str] = field(repr=False)  # the daemon's environment holds secrets
    executables: Mapping[str, str]

    @classmethod
    def of(cls, reactor: Any, env: Mapping[str, str] | None, executables: Mapping[str, str] | None):
        return cls(reactor, dict(os.environ if env is None else env), dict(executables or {}))

    def locate(self, name: str) -> str:
        """The executable for `name`: from `executables`, else looked up on the PATH of `env`."""
        candidate = self.executables.get(name, name)
        if os.sep in candidate:
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        else:
            found = shutil.which(candidate, path=self.env.get("PATH") or os.defpath)
            if found:
                return found
        raise SpawnError(f"executable not found: {candidate}")

    def spawn(self, child: Child, name: str, args: Sequence[str]) -> None:
        executable = self.locate(name)
        try:
            self.reactor.spawnProcess(child, executable, [executable, *args], env=self.env)
        except OSError as e:
            raise SpawnError(e.strerror or str(e)) from e

    async def run(
        self, name: str, args: Sequence[str], timeout: float, limit: int = MAX_COMMAND_BYTES
    ) -> Outcome:
        """Run a command to completion; SIGKILL it once `timeout` seconds have passed."""
        out, err = ByteSink(limit), ByteSink()
        child = Child(out, err)
        self.spawn(child, name, args)
        timed_out = False
        try:
            if not await ended_within(self.reactor, child, timeout):
                timed_out = True
                child.kill()
                await ended_within(self.reactor, child, KILL_WAIT)
        except CancelledError:
            child.kill()
            raise
        return Outcome(
            code=None if timed_out else child.exit_code,
            code_text=child.code_text(),
            timed_out=timed_out,
            stdout=out.text(),
            stdout_truncated=out.truncated,
            stderr=err.text(),
            stderr_truncated=err.truncated,
        )


def describe_output(text: str, truncated: bool) -> str:
    text = CONTROL.sub("", text).strip()
    if len(text) > MAX_KEPT_CHARS:
        text, truncated = text[-MAX_KEPT_CHARS:].lstrip(), True
    return f"[output truncated] {text}" if truncated else text

