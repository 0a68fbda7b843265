# -*- test-case-name: tests.test_store,tests.test_store_pg -*-
"""
The call store on PostgreSQL, shared by every node of a deployment (DESIGN.md "Scale-out").

Same interface and contract as the SQLite `CallStore` (store.py): a write's Deferred fires only
once its transaction is committed (``synchronous_commit`` as the server has it: keep it ``on``),
so a webhook answered 2xx and an acknowledged initiate survive a crash of the node and of the
server. All database work runs on `PgPool` threads (infra/pg.py), never the reactor's.

Schema: versioned migrations (pgschema.py), applied at `open` under an advisory lock; a database
newer than this code is refused.

Cluster rules (the store is opened with this node's id):

- every call row names its owner, ``owner_node``; a write sets it to this node. FENCING: a write
  (or delete) of a call another node owns fails with `NotOwnerError` and changes nothing, so a
  node declared dead cannot overwrite the node that adopted its calls;
- UNIQUE (provider, provider_call_id): an inbound call is created by exactly one node; the loser
  gets `CallExistsError(call_id, owner_node)` naming the winner;
- ``write(record, admit_limit=N)`` for a call not yet stored counts the non-terminal calls of
  ALL nodes under a transaction-level advisory lock and fails with `StoreFullError` when N are
  live, so maxConcurrentCalls holds across nodes under concurrent initiates;
- `load_active` gives only this node's live calls (the others are their owners' to run, or to
  adopt); every other read sees all nodes' calls.

The event log (``events``, what ``voicecall tail`` and cross-node ``subscribe`` follow): a
bigserial ``seq``, pruned to the newest ``events_cap`` rows like SQLite's. A batch's events are
inserted by one statement, which NOTIFYs channel ``voicecall_events`` (`EVENTS_CHANNEL`, pgschema.py)
once, with its last seq as payload (a statement trigger), sent when its transaction commits: one
NOTIFY per transaction, as PostgreSQL serialises the commits of NOTIFYing transactions.
Transactions that append events take an advisory lock (`EVENTS_LOCK`, held to COMMIT), so seqs
become visible in increasing order: a follower that reads ``events_after(last_seq)`` on each
notification (and after reconnecting) misses nothing.

Group commit (`GroupCommit`, infra/pgcommit.py, as SQLite's writer does it): writes issued while a transaction is
in progress are run together in the next one, one COMMIT (one WAL flush) for all of them; each
write's Deferred still fires only after that COMMIT, and a write that fails (fenced, claim lost,
store full) is undone alone (savepoints) and fails alone. The batch's events are inserted last,
so EVENTS_LOCK is held per batch only for the insert and the COMMIT: event-writing transactions of
all nodes still commit one at a time, but each carries every write its node had queued.

NUL: PostgreSQL text cannot hold U+0000, and a carrier may send it (speech, a number): rather
than fail the write on every retry of the carrier (its effect lost), every string the store
writes to a text column has U+0000 replaced by U+FFFD, and lookups by id do the same. JSON
values (metadata, the event log) keep it, escaped. SQLite keeps U+0000 as is.

Retries (see infra/pg.py): a transaction may run again after a serialization failure, a lost
connection, or a connection lost during COMMIT, when it may already have been applied. Every
write is idempotent: call rows are upserts of whole values, event keys are INSERT ... ON CONFLICT
DO NOTHING, and a write that appends transcript entries or events first records its random
write id in ``applied_writes`` and, finding it there, appends nothing more (its row, a whole
value, is written again: a batch runs again in issue order, so its last snapshot of a call wins).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Sequence, TypeVar

import psycopg
from psycopg import errors as pgerrors
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from voicecall.domain import store as sqlite_store
from voicecall.domain.model import CallRecord, TranscriptEntry
from voicecall.domain.pgschema import ADMIT_LOCK, EVENTS_LOCK, MIGRATIONS, Migration, latest_version, migrate
from voicecall.domain.store import (
    CALL_COLUMNS,
    EVENTS_CAP,
    PRUNE_EVERY,
    CallExistsError,
    ReadOnlyStore,
    NotOwnerError,
    StoreFullError,
    _call_row,
    _count,
    _event,
    _event_row,
    build_records,
    collector_paused,
    fill_records,
)
from voicecall.infra.dbwriter import StoreError
from voicecall.infra.pg import PgPool, describe, redactor
from voicecall.infra.pgcommit import GroupCommit, Settle

T = TypeVar("T")

#: How long a write id is kept to recognise the retry of an ambiguous COMMIT. PgPool retries
#: within the same call, within about a minute at worst (5 retries, each waiting at most its
#: acquire_timeout): 10 minutes is ample, and keeps the table to ~600 rows per write/s.
APPLIED_WRITES_KEPT = "10 minutes"

_log = Logger()

_COLUMN_NAMES = [c.strip() for c in CALL_COLUMNS.split(",")]
_WRITE = (
    f"SELECT voicecall_write(%s, {', '.join(['%s'] * (len(_COLUMN_NAMES) + 1))},"
    " %s::bigint[], %s::text[], %s::text[], %s::boolean[], %s::text[])"
)
_APPEND_EVENTS = (
    "INSERT INTO events (call_id, at, type, json)"
    " SELECT e.call_id, e.at, e.type, e.json FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[])"
    " WITH ORDINALITY AS e(call_id, at, type, json, n) ORDER BY e.n"
)
_SELECT = f"SELECT {', '.join('c.' + c for c in _COLUMN_NAMES)} FROM calls c"


class PgCallStore:
    """The call store on PostgreSQL; see the module docstring. Owns `pool`'s open and close."""

    def __init__(
        self,
        pool: PgPool,
        *,
        node_id: str,
        events_cap: int = EVENTS_CAP,
        prune_every: int = PRUNE_EVERY,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.pool = pool
        self.node_id = node_id
        self._events_cap = events_cap
        self._prune_every = prune_every
        self._migrations = migrations
        self._since_prune = 0  # only an estimate when writes overlap: pruning is best effort
        self._writes = GroupCommit(pool, self._append_events)

    def __repr__(self) -> str:
        return f"<PgCallStore {self.pool.server} node={self.node_id!r}>"

    @property
    def path(self) -> str:
        """Where the store is, for messages: ``user@host:port/dbname`` (no password)."""
        return self.pool.server

    def open(self) -> Deferred[None]:
        """Connect, apply missing migrations (under an advisory lock), prune the event log."""
        d = self.pool.open()

        def migrated(applied: list[int]) -> None:
            if applied:
                _log.info("PostgreSQL store {server}: applied schema migrations {versions}", server=self.pool.server, versions=applied)

        def failed(failure):
            return self.pool.close().addBoth(lambda _: failure)

        d.addCallback(lambda _: self.pool.run(lambda conn: migrate(conn, self._migrations)).addErrback(failed))
        d.addCallback(migrated)
        d.addCallback(lambda _: self.pool.run(self._prune))
        return d

    def close(self) -> Deferred[None]:
        """Disconnect once every write issued before has been committed."""
        return self.pool.close()

    # -- writes -----------------------------------------------------------------------------

    def write(
        self,
        record: CallRecord | None = None,
        *,
        transcript: Sequence[TranscriptEntry] = (),
        event_keys: Sequence[str] = (),
        events: Sequence[dict[str, Any]] = (),
        admit_limit: int | None = None,
    ) -> Deferred[None]:
        """As `CallStore.write`, plus the cluster rules (module docstring)."""
        try:
            if record is None and (transcript or event_keys):
                raise ValueError("transcript entries and event keys need the call's record")
            row = None if record is None else _nul_free(_pg_row(record, self.node_id))
            call_id = None if record is None else row[0]
            lines = [_nul_free((call_id, t.timestamp, t.speaker.value, t.text, t.is_final)) for t in transcript]
            keys = [(call_id, k) for k in event_keys]
            if not all(isinstance(k, str) for _, k in keys):
                raise TypeError("event keys must be strings")
            keys = [_nul_free(k) for k in keys]
            log = [_nul_free(_event_row(e)) for e in events]
        except Exception:
            return fail()
        write_id = uuid.uuid4() if (lines or log) else None

        if row is None and write_id is None:
            return succeed(None)  # nothing to write
        params = (
            write_id,
            *(row if row is not None else [None] * (len(_COLUMN_NAMES) + 1)),
            [t for _, t, _, _, _ in lines], [s for _, _, s, _, _ in lines],
            [x for _, _, _, x, _ in lines], [f for _, _, _, _, f in lines],
            [k for _, k in keys],
        )

        def op(conn: psycopg.Connection) -> Settle:
            """This write but its events, in one statement; settles to the event rows `_append_events` inserts."""
            cur = conn.cursor()
            if admit_limit is not None and row is not None:
                _admit(cur, call_id, admit_limit)
            cur.execute(_WRITE, params)
            return Settle(lambda: settle(cur))

        def settle(cur: psycopg.Cursor) -> list[tuple[Any, ...]]:
            (outcome,) = cur.fetchone()
            if outcome == "replayed":
                return []  # the retry of a write whose COMMIT was in fact applied
            if outcome == "fenced":
                owner = cur.execute("SELECT owner_node FROM calls WHERE call_id = %s", (call_id,)).fetchone()
                raise NotOwnerError(call_id, owner[0] if owner else None)
            return log

        d = self._writes.submit(op)
        d.addCallback(lambda _: None)
        if record is not None and record.provider_call_id is not None:
            d.addErrback(self._claim_lost, record)
        return d

    def _append_events(self, conn: psycopg.Connection, logs: list[list[tuple[Any, ...]]]) -> None:
        """Last in each group-committed batch: its writes' events, under EVENTS_LOCK (held to COMMIT)."""
        rows = [row for log in logs for row in log]
        self._since_prune += len(rows) + len(logs)
        if self._since_prune >= self._prune_every:
            self._prune(conn)  # before EVENTS_LOCK, which the other nodes' batches wait for
        if rows:
            with conn.pipeline():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
                conn.execute(_APPEND_EVENTS, [list(column) for column in zip(*rows, strict=True)])

    def _claim_lost(self, failure, record: CallRecord):
        """Turn the unique claim's violation into CallExistsError naming the call that has it."""
        cause = failure.value.__cause__
        if not (isinstance(cause, pgerrors.UniqueViolation) and cause.diag.constraint_name == "calls_claim"):
            return failure

        def holder(conn: psycopg.Connection) -> None:
            found = conn.execute(
                "SELECT call_id, owner_node FROM calls WHERE provider = %s AND provider_call_id = %s",
                (record.provider, record.provider_call_id),
            ).fetchone()
            if found is None:  # the holder was deleted since: the caller may try again
                raise StoreError(f"call {record.call_id}: its carrier id was claimed by a call since deleted")
            raise CallExistsError(*found)

        return self.pool.run(holder)

    def delete_call(self, call_id: str) -> Deferred[None]:
        """Remove a call with its transcript and event keys (the rollback of a failed initiate); fenced."""
        me = self.node_id
        call_id = _nul_free_text(call_id)

        def op(conn: psycopg.Connection) -> None:
            found = conn.execute("SELECT owner_node FROM calls WHERE call_id = %s FOR UPDATE", (call_id,)).fetchone()
            if found is not None and found[0] not in (None, me):
                raise NotOwnerError(call_id, found[0])
            conn.execute("DELETE FROM calls WHERE call_id = %s", (call_id,))

        return self.pool.run(op)

    def _prune(self, conn: psycopg.Connection) -> None:
        self._since_prune = 0
        conn.execute("DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - %s", (self._events_cap,))
        conn.execute(f"DELETE FROM applied_writes WHERE at < now() - interval '{APPLIED_WRITES_KEPT}'")

    # -- reads ------------------------------------------------------------------------------

    def load_active(self) -> Deferred[list[CallRecord]]:
        """This node's non-terminal calls, oldest first, whole."""
        return self.pool.run(lambda conn: _load_active(conn, self.node_id))

    def recent_event_keys(self, limit: int = 10_000) -> Deferred[list[str]]:
        """The newest `limit` processed event keys of all calls (ended ones too), oldest first."""
        return self._read(_recent_event_keys, limit)

    def get_call(self, call_id_or_provider_call_id: str) -> Deferred[CallRecord | None]:
        """The call with this call id or else the newest with this provider call id (any node's)."""
        return self._read(_get_call, call_id_or_provider_call_id)

    def recent_calls(self, limit: int = 50) -> Deferred[list[CallRecord]]:
        """The `limit` most recently created calls (all nodes'), newest last."""
        return self._read(_recent_calls, limit)

    def events_after(self, seq: int, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        """Up to `limit` event-log entries with a ``seq`` above `seq`, oldest first."""
        return self._read(_events_after, seq, limit)

    def last_events(self, n: int) -> Deferred[list[dict[str, Any]]]:
        """The last `n` event-log entries, oldest first."""
        return self._read(_last_events, n)

    def _read(self, query: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            _check_args(query, args)
        except Exception:
            return fail()
        return self.pool.run(lambda conn: query(conn, *args))


def _pg_row(record: CallRecord, node_id: str) -> tuple[Any, ...]:
    """SQLite's row of `record` with ``terminal`` a boolean, and the owner appended."""
    row = _call_row(record)
    return (*row[:5], bool(row[5]), *row[6:], node_id)


def _nul_free(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """`row` with U+0000, which PostgreSQL text cannot hold, replaced by U+FFFD in its strings."""
    for value in row:  # the common case, no NUL: `row` itself, without building a copy
        if type(value) is str and "\x00" in value:
            return tuple(_nul_free_text(v) for v in row)
    return row


def _nul_free_text(value: T) -> T:
    """A string with U+0000 replaced by U+FFFD (what the store writes for it); anything else as is."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def _check_args(query: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Validate counts on the reactor thread, so a bad one fails as with SQLite (ValueError)."""
    if query in (_recent_event_keys, _recent_calls, _last_events):
        _count(args[0])
    elif query is _events_after:
        _count(args[1])


def _admit(cur: psycopg.Cursor, call_id: str, limit: int) -> None:
    """StoreFullError if `call_id` is new and `limit` calls are live (all nodes), under ADMIT_LOCK."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADMIT_LOCK,))
    if cur.execute("SELECT 1 FROM calls WHERE call_id = %s", (call_id,)).fetchone() is None:
        (live,) = cur.execute("SELECT count(*) FROM calls WHERE NOT terminal").fetchone()
        if live >= limit:
            raise StoreFullError(limit)


# --- queries (shared by PgCallStore and the CLI's ReadOnlyPgStore) -----------------------------


def _select_calls(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> list[CallRecord]:
    """The calls matching `where` (over ``calls c``), oldest first, whole: one query per table."""
    cur = conn.cursor()
    records = build_records(cur.execute(f"{_SELECT} WHERE {where} ORDER BY c.created_seq", params).fetchall())
    if not records:
        return []
    ids = list(records)
    transcript = cur.execute(
        "SELECT call_id, timestamp, speaker, text, is_final FROM transcript WHERE call_id = ANY(%s) ORDER BY seq", (ids,)
    ).fetchall()
    keys = cur.execute("SELECT call_id, key FROM event_keys WHERE call_id = ANY(%s) ORDER BY seq", (ids,)).fetchall()
    return fill_records(records, transcript, keys)


def _load_active(conn: psycopg.Connection, node_id: str | None) -> list[CallRecord]:
    with collector_paused():
        if node_id is None:
            return _select_calls(conn, "NOT c.terminal", ())
        return _select_calls(conn, "NOT c.terminal AND c.owner_node = %s", (node_id,))


def _get_call(conn: psycopg.Connection, ident: str) -> CallRecord | None:
    ident = _nul_free_text(ident)
    found = _select_calls(conn, "c.call_id = %s", (ident,))
    if not found:
        found = _select_calls(
            conn,
            "c.call_id = (SELECT call_id FROM calls WHERE provider_call_id = %s ORDER BY created_seq DESC LIMIT 1)",
            (ident,),
        )
    return found[0] if found else None


def _recent_calls(conn: psycopg.Connection, limit: int) -> list[CallRecord]:
    return _select_calls(
        conn, "c.call_id IN (SELECT call_id FROM calls ORDER BY created_seq DESC LIMIT %s)", (_count(limit),)
    )


def _recent_event_keys(conn: psycopg.Connection, limit: int) -> list[str]:
    rows = conn.execute("SELECT key FROM event_keys ORDER BY seq DESC LIMIT %s", (_count(limit),))
    return [key for (key,) in rows][::-1]


def _events_after(conn: psycopg.Connection, seq: int, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT seq, json FROM events WHERE seq > %s ORDER BY seq LIMIT %s", (int(seq), _count(limit)))
    return [_event(s, body) for s, body in rows]


def _last_events(conn: psycopg.Connection, n: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT seq, json FROM events ORDER BY seq DESC LIMIT %s", (_count(n),))
    return [_event(s, body) for s, body in rows][::-1]


# --- read-only access for the CLI --------------------------------------------------------------


class ReadOnlyPgStore(ReadOnlyStore):
    """
    `ReadOnlyStore` (the CLI's, while the daemon is down) on PostgreSQL: each of the SQLite
    store's queries is answered by its PostgreSQL counterpart; `load_active` gives every node's calls.
    """

    def _read(self, query: Callable[..., T], *args: Any) -> T:
        with self._conn.transaction():  # one snapshot (REPEATABLE READ) for the whole answer
            return _READ_ONLY_QUERIES[query](self._conn, *args)


_READ_ONLY_QUERIES: dict[Callable[..., Any], Callable[..., Any]] = {
    sqlite_store._get_call: _get_call,
    sqlite_store._recent_calls: _recent_calls,
    sqlite_store._load_active: lambda conn: _load_active(conn, None),
    sqlite_store._events_after: _events_after,
    sqlite_store._last_events: _last_events,
}


def open_readonly(url: str, *, connect_timeout: int = 5) -> ReadOnlyPgStore | None:
    """
    Connect read-only to the PostgreSQL store at `url`, or return None if it holds no store yet.
    Raises StoreError (naming the server, never the password) if it cannot be reached.
    """
    redact = redactor(url)
    try:
        conn = psycopg.connect(url, connect_timeout=connect_timeout, application_name="voicecall-cli")
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to PostgreSQL {describe(url)}: {redact(str(e).strip())}") from None
    try:
        conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        conn.set_read_only(True)
        with conn.transaction():
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] if exists else None
    except BaseException:
        conn.close()
        raise
    if version is None:
        conn.close()
        return None
    if version > latest_version():
        conn.close()
        raise StoreError(f"the PostgreSQL store {describe(url)} has schema version {version}; this voicecall knows up to {latest_version()}")
    return ReadOnlyPgStore(conn)
