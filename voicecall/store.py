# -*- test-case-name: tests.test_store -*-
"""
The durable call store: SQLite in WAL mode at ``<directory>/voicecall.sqlite3`` (SPEC §14, with
the SQLite decision of DESIGN.md).

One row per call holds its scalar fields and metadata; its transcript entries and processed event
keys are rows of their own, appended as they arrive, so a write costs the same however long the
call has been going. A separate, bounded event log (``events``) feeds ``voicecall tail``: the
store keeps its newest ``events_cap`` (100,000) rows, pruning the older ones once every
``prune_every`` (1,000) appends and at open, so it never holds more than
``events_cap + prune_every - 1`` rows.

Every change goes through a `Writer`, which owns the one connection. `ThreadedWriter` (production)
runs operations on a dedicated thread and group-commits whatever queued up while the previous
commit was in progress; `SynchronousWriter` (tests) runs each operation at once. With either, a
write's Deferred fires only once its transaction is committed with ``synchronous=FULL``, so an
acknowledged change survives ``kill -9`` and power loss. Each operation runs under its own
SAVEPOINT, so one that fails undoes only its own work and fails only its own Deferred.

`open_readonly` gives the CLI synchronous, read-only access while the daemon is down.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import urllib.parse
from collections import deque
from typing import Any, Callable, Protocol, Sequence, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from voicecall.model import CallRecord, TranscriptEntry

T = TypeVar("T")

DB_FILENAME = "voicecall.sqlite3"
SCHEMA_VERSION = 1
EVENTS_CAP = 100_000
PRUNE_EVERY = 1_000
MAX_PENDING = 50_000
BUSY_TIMEOUT_MS = 5_000
WAL_SIZE_LIMIT = 64 * 1024 * 1024

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE calls (
    call_id TEXT PRIMARY KEY,
    provider_call_id TEXT,
    provider TEXT NOT NULL,
    direction TEXT NOT NULL,
    state TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    from_number TEXT NOT NULL,
    to_number TEXT NOT NULL,
    session_key TEXT,
    started_at INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at INTEGER,
    end_reason TEXT,
    metadata TEXT NOT NULL
);
CREATE INDEX calls_by_provider_call_id ON calls (provider_call_id);
CREATE INDEX calls_active ON calls (terminal) WHERE terminal = 0;
CREATE TABLE transcript (
    seq INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    timestamp INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT NOT NULL,
    is_final INTEGER NOT NULL
);
CREATE INDEX transcript_by_call ON transcript (call_id, seq);
CREATE TABLE event_keys (
    seq INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    UNIQUE (call_id, key)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    type TEXT NOT NULL,
    json TEXT NOT NULL
);
PRAGMA user_version = 1;
COMMIT;
"""

_CALL_COLUMNS = (
    "call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
    " session_key, started_at, answered_at, ended_at, end_reason, metadata"
)
_UPSERT = (
    f"INSERT INTO calls ({_CALL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _CALL_COLUMNS.replace(" ", "").split(",")[1:])
)


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
    Run `ops` in one transaction, each under its own SAVEPOINT, then COMMIT. Return one
    ``(True, value)`` or ``(False, Failure)`` per op. An op that raises is undone alone; if an
    error ends the whole transaction (or the COMMIT fails), every op whose work went with it fails.
    """
    outcomes: list[tuple[bool, Any]] = []
    uncommitted: list[int] = []

    def lose(failure: Failure) -> None:
        for j in uncommitted:
            outcomes[j] = (False, failure)
        uncommitted.clear()
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

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


@define
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


@define
class ThreadedWriter:
    """
    A `Writer` with one dedicated thread that owns the connection. Operations queue up; each time
    the thread wakes it takes everything queued, runs it as one transaction (group commit),
    commits, and fires the Deferreds on the reactor thread. The reactor never waits on the
    database. At most `max_pending` operations may wait; beyond that `run` fails with
    `StoreBusyError`.
    """

    _reactor: IReactorFromThreads
    _max_pending: int = MAX_PENDING
    _cond: threading.Condition = field(factory=threading.Condition, init=False)
    _queue: deque = field(factory=deque, init=False)
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
        with self._cond:
            if self._thread is None or self._stopping:
                return fail(StoreClosedError("the store writer is not running"))
            if kind == _OP and len(self._queue) >= self._max_pending:
                return fail(StoreBusyError("too many store operations are waiting"))
            self._queue.append((kind, fn, d))
            self._cond.notify()
        return d

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
        return [(d, ok, value) for (_, d), (ok, value) in zip(batch, results)]

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


# --- the call store ----------------------------------------------------------------------------


@define
class CallStore:
    """Durable call store: SQLite in WAL mode at ``<directory>/voicecall.sqlite3``."""

    _directory: str
    _writer: Writer
    _events_cap: int = EVENTS_CAP
    _prune_every: int = PRUNE_EVERY
    _since_prune: int = field(default=0, init=False)  # touched by operations only
    _log = Logger()

    @property
    def path(self) -> str:
        """The database file."""
        return os.path.join(self._directory, DB_FILENAME)

    def open(self) -> Deferred[None]:
        """Create the directory (mode 0700) if missing, open the database, set it up."""
        d = self._writer.connect(self._connect)
        d.addCallback(lambda _: self._log.info("call store open at {path}", path=self.path))
        return d

    def close(self) -> Deferred[None]:
        """Close the database once every write issued before has been committed."""
        return self._writer.disconnect()

    def write(
        self,
        record: CallRecord | None = None,
        *,
        transcript: Sequence[TranscriptEntry] = (),
        event_keys: Sequence[str] = (),
        events: Sequence[dict[str, Any]] = (),
    ) -> Deferred[None]:
        """
        In one transaction: upsert `record`'s row (scalar fields and metadata, not its transcript
        or event keys), append the new `transcript` entries and processed `event_keys` to its call,
        and append `events` to the event log (each a JSON-able dict with a string ``callId`` and
        ``type`` and an integer ``at``; the store gives it an increasing ``seq``). The record is
        read now, so the caller may change it as soon as this returns. Fires once committed.
        """
        try:
            if record is None and (transcript or event_keys):
                raise ValueError("transcript entries and event keys need the call's record")
            row = None if record is None else _call_row(record)
            call_id = None if record is None else record.call_id
            lines = [
                (call_id, t.timestamp, t.speaker.value, t.text, int(t.is_final)) for t in transcript
            ]
            keys = [(call_id, k) for k in event_keys]
            if not all(isinstance(k, str) for _, k in keys):
                raise TypeError("event keys must be strings")
            log = [_event_row(e) for e in events]
        except Exception:
            return fail()

        def op(conn: sqlite3.Connection) -> None:
            if row is not None:
                conn.execute(_UPSERT, row)
            if lines:
                conn.executemany(
                    "INSERT INTO transcript (call_id, timestamp, speaker, text, is_final)"
                    " VALUES (?,?,?,?,?)",
                    lines,
                )
            if keys:
                conn.executemany(
                    "INSERT OR IGNORE INTO event_keys (call_id, key) VALUES (?,?)", keys
                )
            if log:
                conn.executemany(
                    "INSERT INTO events (call_id, at, type, json) VALUES (?,?,?,?)", log
                )
                self._since_prune += len(log)
                if self._since_prune >= self._prune_every:
                    self._prune(conn)

        return self._writer.run(op)

    def delete_call(self, call_id: str) -> Deferred[None]:
        """Remove a call with its transcript and event keys (the rollback of a failed initiate)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM calls WHERE call_id = ?", (call_id,))

        return self._writer.run(op)

    def load_active(self) -> Deferred[list[CallRecord]]:
        """Every non-terminal call, oldest first, with its transcript and event keys."""
        return self._writer.run(lambda conn: _select_calls(conn, "c.terminal = 0", ()))

    def recent_event_keys(self, limit: int = 10_000) -> Deferred[list[str]]:
        """The newest `limit` processed event keys of all calls (ended ones too), oldest first."""
        return self._writer.run(lambda conn: _recent_event_keys(conn, limit))

    def get_call(self, call_id_or_provider_call_id: str) -> Deferred[CallRecord | None]:
        """The call with this call id or else the newest with this provider call id."""
        return self._writer.run(lambda conn: _get_call(conn, call_id_or_provider_call_id))

    def recent_calls(self, limit: int = 50) -> Deferred[list[CallRecord]]:
        """The `limit` most recently created calls, newest last."""
        return self._writer.run(lambda conn: _recent_calls(conn, limit))

    def events_after(self, seq: int, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        """Up to `limit` event-log entries with a ``seq`` above `seq`, oldest first."""
        return self._writer.run(lambda conn: _events_after(conn, seq, limit))

    def last_events(self, n: int) -> Deferred[list[dict[str, Any]]]:
        """The last `n` event-log entries, oldest first."""
        return self._writer.run(lambda conn: _last_events(conn, n))

    def _connect(self) -> sqlite3.Connection:
        conn = _open_connection(self._directory)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._prune(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prune(self, conn: sqlite3.Connection) -> None:
        self._since_prune = 0
        conn.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (self._events_cap,)
        )


def _open_connection(directory: str) -> sqlite3.Connection:
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    path = os.path.join(directory, DB_FILENAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        # SQLite gives the -wal and -shm files the database file's mode.
        os.fchmod(fd, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use WAL journal mode for {path} (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        version = _schema_version(conn, path)
        if version == 0:
            conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {version};"
            f" this voicecall reads up to {SCHEMA_VERSION}"
        )
    return version


def _call_row(r: CallRecord) -> tuple[Any, ...]:
    return (
        r.call_id,
        r.provider_call_id,
        r.provider,
        r.direction.value,
        r.state.value,
        int(r.state.is_terminal),
        r.from_number,
        r.to_number,
        r.session_key,
        r.started_at,
        r.answered_at,
        r.ended_at,
        r.end_reason,
        _dumps(r.metadata),
    )


def _event_row(event: dict[str, Any]) -> tuple[Any, ...]:
    call_id, at, kind = event.get("callId"), event.get("at"), event.get("type")
    if not (isinstance(call_id, str) and isinstance(kind, str)) or type(at) is not int:
        raise ValueError("an event-log entry needs a string callId and type and an integer at")
    return (call_id, at, kind, _dumps({k: v for k, v in event.items() if k != "seq"}))


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


# --- queries, shared by CallStore (on its writer) and ReadOnlyStore ----------------------------


def _select_calls(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...]
) -> list[CallRecord]:
    """
    The calls matching `where` (over ``calls c``), oldest first, whole. The CROSS JOINs pin the
    join order so SQLite walks the few matching calls and looks their rows up by index, rather
    than scanning every transcript row or event key.
    """
    records: dict[str, CallRecord] = {}
    select = f"SELECT {_CALL_COLUMNS} FROM calls c WHERE {where} ORDER BY c.rowid"
    for row in conn.execute(select, params):
        (call_id, pid, provider, direction, state, _, from_, to) = row[:8]
        (session, started, answered, ended, reason, metadata) = row[8:]
        records[call_id] = CallRecord(
            call_id=call_id,
            provider=provider,
            direction=direction,
            state=state,
            from_number=from_,
            to_number=to,
            started_at=started,
            provider_call_id=pid,
            session_key=session,
            answered_at=answered,
            ended_at=ended,
            end_reason=reason,
            metadata=json.loads(metadata),
        )
    if not records:
        return []
    for call_id, timestamp, speaker, text, is_final in conn.execute(
        "SELECT t.call_id, t.timestamp, t.speaker, t.text, t.is_final FROM calls c"
        f" CROSS JOIN transcript t ON t.call_id = c.call_id WHERE {where} ORDER BY c.rowid, t.seq",
        params,
    ):
        records[call_id].transcript.append(
            TranscriptEntry(
                timestamp=timestamp, speaker=speaker, text=text, is_final=bool(is_final)
            )
        )
    for call_id, key in conn.execute(
        "SELECT k.call_id, k.key FROM calls c"
        f" CROSS JOIN event_keys k ON k.call_id = c.call_id WHERE {where} ORDER BY c.rowid, k.seq",
        params,
    ):
        records[call_id].processed_event_ids.append(key)
    return list(records.values())


def _get_call(conn: sqlite3.Connection, ident: str) -> CallRecord | None:
    found = _select_calls(conn, "c.call_id = ?", (ident,))
    if not found:
        found = _select_calls(
            conn,
            "c.rowid = (SELECT rowid FROM calls WHERE provider_call_id = ?"
            " ORDER BY rowid DESC LIMIT 1)",
            (ident,),
        )
    return found[0] if found else None


def _recent_calls(conn: sqlite3.Connection, limit: int) -> list[CallRecord]:
    return _select_calls(
        conn, "c.rowid IN (SELECT rowid FROM calls ORDER BY rowid DESC LIMIT ?)", (_count(limit),)
    )


def _recent_event_keys(conn: sqlite3.Connection, limit: int) -> list[str]:
    rows = conn.execute("SELECT key FROM event_keys ORDER BY seq DESC LIMIT ?", (_count(limit),))
    return [key for (key,) in rows][::-1]


def _events_after(conn: sqlite3.Connection, seq: int, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT seq, json FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (int(seq), _count(limit))
    )
    return [_event(seq, body) for seq, body in rows]


def _last_events(conn: sqlite3.Connection, n: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT seq, json FROM events ORDER BY seq DESC LIMIT ?", (_count(n),))
    return [_event(seq, body) for seq, body in rows][::-1]


def _event(seq: int, body: str) -> dict[str, Any]:
    event = json.loads(body)
    event["seq"] = seq
    return event


def _count(n: int) -> int:
    if type(n) is not int or n < 0:
        raise ValueError(f"a count must be a non-negative integer, not {n!r}")
    return n


# --- read-only access for the CLI -------------------------------------------------------------


@define
class ReadOnlyStore:
    """Synchronous, read-only access to a store, for the CLI while the daemon is down."""

    _conn: sqlite3.Connection

    def get_call(self, call_id_or_provider_call_id: str) -> CallRecord | None:
        return self._read(_get_call, call_id_or_provider_call_id)

    def recent_calls(self, limit: int = 50) -> list[CallRecord]:
        return self._read(_recent_calls, limit)

    def load_active(self) -> list[CallRecord]:
        return self._read(_select_calls, "c.terminal = 0", ())

    def events_after(self, seq: int, limit: int = 1000) -> list[dict[str, Any]]:
        return self._read(_events_after, seq, limit)

    def last_events(self, n: int) -> list[dict[str, Any]]:
        return self._read(_last_events, n)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ReadOnlyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self, query: Callable[..., T], *args: Any) -> T:
        self._conn.execute("BEGIN")  # one snapshot for the whole answer
        try:
            return query(self._conn, *args)
        finally:
            self._conn.execute("COMMIT")


def open_readonly(directory: str) -> ReadOnlyStore | None:
    """
    Open the store in `directory` read-only (SQLite ``mode=ro``), or return None if it holds no
    database. Other failures (e.g. no permission to read it) raise `sqlite3.Error`.
    """
    path = os.path.abspath(os.path.join(directory, DB_FILENAME))
    if not os.path.isfile(path):
        return None
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if _schema_version(conn, path) == 0:
            conn.close()
            return None
    except BaseException:
        conn.close()
        raise
    return ReadOnlyStore(conn)
