# -*- test-case-name: tests.test_store -*-
"""
The one connection to the store's database, and the discipline every write follows.

A `Writer` owns the connection. `ThreadedWriter` (production) runs operations on one dedicated
thread and group-commits whatever queued up while the previous commit was in progress, then fires
each operation's Deferred on the reactor thread, so the reactor never waits on SQLite.
`SynchronousWriter` (tests) runs each operation at once. A batch runs its operations plainly in
one transaction (no savepoints: they rarely fail). Only when one raises in a batch of several is
the transaction rolled back and the batch run again with a SAVEPOINT around each operation, so
the one that fails undoes only its own work and fails only its own Deferred; operations must
therefore be safe to run again after a rollback.
"""
from __future__ import annotations

import sqlite3
import threading
from collections import deque
from typing import Any, Callable, Protocol, Sequence, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")

#: Operations that may wait for the database before `run` refuses more (StoreBusyError).
MAX_PENDING = 50_000


class StoreError(Exception):
    """The store cannot do what was asked (bad schema version, not open, ...)."""


class StoreClosedError(StoreError):
    """The store or its writer is not running."""


class StoreBusyError(StoreError):
    """Too many operations are already waiting for the database."""


class Writer(Protocol):
    """Runs operations on the store's one connection; see `ThreadedWriter`."""

    def connect(self, opener: Callable[[], sqlite3.Connection]) -> Deferred[None]:
        """Open the connection by calling `opener` where later operations will run."""

    def disconnect(self) -> Deferred[None]:
        """Close the connection once everything queued before has run."""

    def run(self, op: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run `op` in a transaction; fire with its result once committed."""


# --- the transaction discipline shared by both writers ------------------------------------------


def _run_batch(conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], Any]]):
    """
    Run `ops` in one transaction and COMMIT. Return one ``(True, value)`` or
    ``(False, Failure)`` per op. An op that raises is undone alone; if an error ends the whole
    transaction (or the COMMIT fails), every op whose work went with it fails.

    Ops rarely fail, so the batch first runs them plainly; only if one raises is the batch
    rolled back and run again with a SAVEPOINT around each op (three statements saved per op
    on the common path). Ops must therefore be safe to run again after a rollback.
    """
    plain = _run_plain(conn, ops)
    if plain is not None:
        return plain
    return _run_savepointed(conn, ops)


def _rollback(conn: sqlite3.Connection) -> None:
    """End the open transaction, if any, undoing it (a failing rollback leaves nothing to undo)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _run_plain(conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], Any]]):
    """The batch without savepoints; None (after a rollback) when an op raised in a batch of several."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except Exception:  # e.g. still locked after the busy timeout: give up on the batch
        return [(False, Failure())] * len(ops)
    values = []
    try:
        for op in ops:
            values.append(op(conn))
    except Exception:
        failure = Failure()
        _rollback(conn)
        return [(False, failure)] if len(ops) == 1 else None
    try:
        conn.execute("COMMIT")
    except Exception:
        failure = Failure()
        _rollback(conn)
        return [(False, failure)] * len(ops)
    return [(True, value) for value in values]


def _run_savepointed(conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], Any]]):
    """The batch with a SAVEPOINT around each op, so that a failing op is undone alone."""
    outcomes: list[tuple[bool, Any]] = []
    uncommitted: list[int] = []

    def lose(failure: Failure) -> None:
        for j in uncommitted:
            outcomes[j] = (False, failure)
        uncommitted.clear()
        _rollback(conn)

    for i, op in enumerate(ops):
        outcomes.append((False, None))
        if not conn.in_transaction:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except Exception:  # e.g. still locked after the busy timeout: give up on the batch
                failure = Failure()
                return outcomes[:i] + [(False, failure)] * (len(ops) - i)
        saved = False
        try:
            conn.execute("SAVEPOINT op")
            saved = True
            value = op(conn)
            conn.execute("RELEASE op")
        except Exception:
            failure = Failure()
            outcomes[i] = (False, failure)
            if saved and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    continue
                except sqlite3.Error:
                    pass
            lose(failure)
        else:
            outcomes[i] = (True, value)
            uncommitted.append(i)
    if conn.in_transaction:
        try:
            conn.execute("COMMIT")
        except Exception:
            lose(Failure())
    return outcomes


@define(repr=False)
class SynchronousWriter:
    """A `Writer` for tests: runs each operation at once on the calling thread and commits it."""

    _conn: sqlite3.Connection | None = field(default=None, init=False)

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return self.disconnect()

    def connect(self, opener: Callable[[], sqlite3.Connection]) -> Deferred[None]:
        if self._conn is not None:
            return fail(StoreError("the store is already open"))
        try:
            self._conn = opener()
        except Exception:
            return fail()
        return succeed(None)

    def disconnect(self) -> Deferred[None]:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return succeed(None)

    def run(self, op: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        if self._conn is None:
            return fail(StoreClosedError("the store is not open"))
        [(ok, value)] = _run_batch(self._conn, [op])
        return succeed(value) if ok else fail(value)


_OP, _CONNECT, _DISCONNECT, _STOP = range(4)


@define(repr=False)
class ThreadedWriter:
    """
    A `Writer` with one dedicated thread that owns the connection. Operations queue up; each time
    the thread wakes it takes everything queued, runs it as one transaction (group commit),
    commits, and fires the Deferreds on the reactor thread. The reactor never waits on the
    database. At most `max_pending` operations may wait; beyond that `run` fails with
    `StoreBusyError`.

    Operations are handed to the thread once per reactor iteration (a ``callLater(0)`` after the
    first), not one by one: every webhook read in one poll then shares one commit. Handing them
    over singly woke the thread for each, and it committed (and synced) batches of about two.
    """

    _reactor: IReactorFromThreads
    _max_pending: int = MAX_PENDING
    _cond: threading.Condition = field(factory=threading.Condition, init=False)
    _queue: deque = field(factory=deque, init=False)
    # Operations enqueued during this reactor iteration, handed to the thread at its end.
    _local: list = field(factory=list, init=False)
    _handover: Any = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _stopped: Deferred[None] | None = field(default=None, init=False)
    _waiters: list[Deferred[None]] = field(factory=list, init=False)
    _conn: sqlite3.Connection | None = field(default=None, init=False)  # writer thread only

    def start(self) -> Deferred[None]:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="voicecall-store", daemon=True
            )
            self._thread.start()
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Run everything already queued, close the connection, and end the thread."""
        if self._thread is None or (self._stopped is not None and self._stopped.called):
            return succeed(None)
        if self._stopped is None:
            self._stopped = self._enqueue(_STOP, None)
            self._stopping = True
            self._stopped.addBoth(self._fan_out)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fan_out(self, result: None | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result) if not isinstance(result, Failure) else waiter.errback(result)

    def connect(self, opener: Callable[[], sqlite3.Connection]) -> Deferred[None]:
        return self._enqueue(_CONNECT, opener)

    def disconnect(self) -> Deferred[None]:
        return self._enqueue(_DISCONNECT, None)

    def run(self, op: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        return self._enqueue(_OP, op)

    def _enqueue(self, kind: int, fn: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._thread is None or self._stopping:
            return fail(StoreClosedError("the store writer is not running"))
        if kind == _OP:
            with self._cond:
                waiting = len(self._queue)
            if waiting + len(self._local) >= self._max_pending:
                return fail(StoreBusyError("too many store operations are waiting"))
            self._local.append((kind, fn, d))
            if self._handover is None:
                self._handover = self._reactor.callLater(0, self._hand_over)
            return d
        # Control items keep their place after the operations already enqueued.
        self._hand_over()
        with self._cond:
            self._queue.append((kind, fn, d))
            self._cond.notify()
        return d

    def _hand_over(self) -> None:
        handover, self._handover = self._handover, None
        if handover is not None and handover.active():
            handover.cancel()
        if not self._local:
            return
        local, self._local = self._local, []
        with self._cond:
            self._queue.extend(local)
            self._cond.notify()

    def _loop(self) -> None:
        stop = False
        while not stop:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                items = list(self._queue)
                self._queue.clear()
            outcomes: list[tuple[Deferred[Any], bool, Any]] = []
            batch: list[tuple[Callable[[sqlite3.Connection], Any], Deferred[Any]]] = []
            for kind, fn, d in items:
                if kind == _OP:
                    batch.append((fn, d))
                    continue
                outcomes.extend(self._flush(batch))
                batch = []
                ok, value = self._control(kind, fn)
                outcomes.append((d, ok, value))
                stop = stop or kind == _STOP
            outcomes.extend(self._flush(batch))
            if not stop:
                self._reactor.callFromThread(self._deliver, outcomes)
        self._reactor.callFromThread(self._exited, outcomes)

    def _flush(self, batch):
        if not batch:
            return []
        if self._conn is None:
            error = Failure(StoreClosedError("the store is not open"))
            return [(d, False, error) for _, d in batch]
        results = _run_batch(self._conn, [op for op, _ in batch])
        return [(d, ok, value) for (_, d), (ok, value) in zip(batch, results, strict=True)]

    def _control(self, kind: int, opener: Any) -> tuple[bool, Any]:
        try:
            if kind == _CONNECT:
                if self._conn is not None:
                    raise StoreError("the store is already open")
                self._conn = opener()
            elif self._conn is not None:
                self._conn.close()
                self._conn = None
            return True, None
        except Exception:
            return False, Failure()

    @staticmethod
    def _deliver(outcomes) -> None:
        for d, ok, value in outcomes:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _exited(self, outcomes) -> None:
        assert self._thread is not None
        self._thread.join()  # it has nothing left to do but return
        self._deliver(outcomes)
