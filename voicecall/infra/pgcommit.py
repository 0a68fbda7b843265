# -*- test-case-name: tests.test_pg -*-
"""
Group commit on a `PgPool` (infra/pg.py), for writes:

    writes = GroupCommit(pool, finish)            # finish(conn, values): last in each batch, optional
    value = await writes.submit(lambda conn: conn.execute(...))

See `GroupCommit`. Ops of one GroupCommit commit in the order they were submitted: one batch at a
time, its ops in order, and a batch that is retried (after a lost COMMIT too) is retried before
the next one starts.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from voicecall.infra.dbwriter import StoreBusyError
from voicecall.infra.pg import PgPool, connection_lost

T = TypeVar("T")

_log = Logger()

DEFAULT_MAX_BATCH = 256


class Settle:
    """
    What an op of a `GroupCommit` returns when it only sent its statements: ``settle()`` is
    called once they ran (the batch's pipeline synced), and what it returns, or raises, is the op's.
    """

    def __init__(self, settle: Callable[[], Any]) -> None:
        self.settle = settle


class _Rerun(Exception):
    """An op of a plain batch raised: roll back and run the batch again, one SAVEPOINT per op."""


class GroupCommit:
    """
    Group commit on a `PgPool`, as SQLite's ThreadedWriter does it (infra/dbwriter.py).

    ``submit(fn)`` queues ``fn(conn)`` and returns a Deferred of its result. One batch at a
    time, on a pool thread, takes everything queued (at most `max_batch` ops), runs it in ONE
    transaction, calls ``finish(conn, values)`` last in it with the results of the ops that
    succeeded, COMMITs once, and fires each op's Deferred on the reactor thread. Ops submitted
    meanwhile form the next batch. So N concurrent writes cost one COMMIT (one WAL flush) instead
    of N, and a lock that ``finish`` takes is held once per batch, to its COMMIT. The ops run in
    pipeline mode: an op that sends its statements and returns ``Settle(settle)`` (reading its
    results in ``settle``) lets the whole batch cost one round trip to the server (and one wait
    for the GIL, which a busy reactor thread holds for up to ``sys.getswitchinterval()``).

    Ops follow `PgPool.run`'s rules: a Deferred fires only after COMMIT; the batch is retried as
    a whole after a serialization failure, a deadlock or a lost connection (during COMMIT too),
    so every op and ``finish`` MUST BE IDEMPOTENT. A batch first runs its ops plainly; only if one
    raises (in a batch of several) is it rolled back and run again with a SAVEPOINT around each
    op, so the op that failed undoes only its own work and fails only its own Deferred, with the
    error `run` would give (a database error becomes StoreError, the original as __cause__).
    ``finish`` failing fails the whole batch. Bounds: the pool's `max_pending` queued ops.
    """

    def __init__(
        self,
        pool: PgPool,
        finish: Callable[[psycopg.Connection, list[Any]], None] | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._pool = pool
        self._finish = finish
        self._max_batch = max_batch
        self._queue: deque[tuple[Callable[[psycopg.Connection], Any], Deferred[Any]]] = deque()
        self._committing = False

    def __repr__(self) -> str:
        return f"<GroupCommit on {self._pool.server} queued={len(self._queue)}>"

    def submit(self, fn: Callable[[psycopg.Connection], T]) -> Deferred[T]:
        """Queue ``fn(conn)`` for the next batch; fire with its result once that batch is committed."""
        refused = self._pool._refusal()
        if refused is None and len(self._queue) >= self._pool._max_pending:
            refused = StoreBusyError(f"{len(self._queue)} writes already wait for PostgreSQL {self._pool.server}")
        if refused is not None:
            return fail(refused)
        d: Deferred[T] = Deferred()
        self._queue.append((fn, d))
        if not self._committing:
            self._next(self._pool._pool)
        return d

    def _next(self, connections: ConnectionPool) -> None:
        """Commit the next batch of the queue on a pool thread; after it, the next one, if any."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        self._committing = True

        def committed(outcomes: list[tuple[bool, Any]]) -> None:
            for (_, d), (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
            if self._queue:  # before this batch stops counting as pending: `close` waits for the next
                self._next(connections)
            else:
                self._committing = False

        def crashed(failure: Failure) -> None:  # a bug: _commit answers every op
            self._committing = False
            _log.failure("PostgreSQL group commit failed", failure)

        d = self._pool._dispatch(self._commit, connections, [fn for fn, _ in batch])
        self._pool._track(d.addCallbacks(committed, crashed))

    def _commit(self, connections: ConnectionPool, fns: list[Callable[[psycopg.Connection], Any]]) -> list[tuple[bool, Any]]:
        transact = self._pool._transact
        try:
            return transact(connections, lambda conn: self._plain(conn, fns), True)
        except _Rerun:
            pass
        except Exception:
            return [(False, Failure())] * len(fns)
        try:
            return transact(connections, lambda conn: self._savepointed(conn, fns), True)
        except Exception:
            return [(False, Failure())] * len(fns)

    def _plain(self, conn: psycopg.Connection, fns: list[Callable[[psycopg.Connection], Any]]) -> list[tuple[bool, Any]]:
        try:
            with conn.pipeline():  # the statements of all ops sent at once: one round trip
                sent = [fn(conn) for fn in fns]
            values = [v.settle() if isinstance(v, Settle) else v for v in sent]
        except Exception as e:
            if len(fns) == 1 or _retried(e):
                raise
            raise _Rerun() from None
        if self._finish is not None:
            self._finish(conn, values)
        return [(True, v) for v in values]

    def _savepointed(self, conn: psycopg.Connection, fns: list[Callable[[psycopg.Connection], Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for fn in fns:
            try:
                with conn.transaction():
                    value = fn(conn)
                    outcomes.append((True, value.settle() if isinstance(value, Settle) else value))
            except Exception as e:
                if _retried(e):
                    raise
                outcomes.append((False, Failure(self._pool._error(e))))
        if self._finish is not None:
            self._finish(conn, [v for ok, v in outcomes if ok])
        return outcomes


def _retried(e: Exception) -> bool:
    """Whether `PgPool._transact` retries the transaction that raised `e`."""
    if isinstance(e, (pgerrors.SerializationFailure, pgerrors.DeadlockDetected)):
        return True
    return isinstance(e, psycopg.OperationalError) and connection_lost(e)
