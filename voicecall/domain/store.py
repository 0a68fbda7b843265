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

Every change goes through a `Writer` (dbwriter.py), which owns the one connection. A write's
Deferred fires only once its transaction is committed with ``synchronous=FULL``, so an
acknowledged change survives ``kill -9`` and power loss.

One daemon at a time: an open store holds an exclusive ``flock`` on ``<directory>/voicecall.lock``
(which names the holder's pid) until it is closed or the process ends, and opening a store that
another process holds fails with `StoreLockedError` before anything in the directory changes.

`open_readonly` gives the CLI synchronous, read-only access while the daemon is down (it takes
no lock, so it works while a daemon holds the store too).

The store interface is shared with the PostgreSQL store (pgstore.py), which many nodes use at
once; SQLite keeps the same columns and rules for one node, so the manager's code is one:

- every call row names its owner (``owner_node``, the id the store was opened with). On
  PostgreSQL a write to a call another node owns fails with `NotOwnerError` (fencing); on SQLite
  the store's lock is the fence (one daemon per directory), so it only records the owner;
- a (provider, provider call id) pair belongs to one call: writing a second call with it fails
  with `CallExistsError` naming the call (and owner) that has it, and changes nothing;
- ``write(record, admit_limit=N)`` for a call not yet stored fails with `StoreFullError` when N
  non-terminal calls are already stored (maxConcurrentCalls, for all nodes on PostgreSQL).
"""
from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import sqlite3
import urllib.parse
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import attrs
from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from voicecall.infra.dbwriter import StoreError, Writer
from voicecall.domain.model import CallRecord, CallState, Direction, Speaker, TranscriptEntry

T = TypeVar("T")

DB_FILENAME = "voicecall.sqlite3"
LOCK_FILENAME = "voicecall.lock"
SCHEMA_VERSION = 2
EVENTS_CAP = 100_000
PRUNE_EVERY = 1_000
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

#: Version 2: the owner of each call, and one call per (provider, provider call id).
_SCHEMA_2 = """
BEGIN IMMEDIATE;
ALTER TABLE calls ADD COLUMN owner_node TEXT;
CREATE UNIQUE INDEX calls_claim ON calls (provider, provider_call_id) WHERE provider_call_id IS NOT NULL;
PRAGMA user_version = 2;
COMMIT;
"""

CALL_COLUMNS = (
    "call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
    " session_key, started_at, answered_at, ended_at, end_reason, metadata"
)
_UPSERT = (
    f"INSERT INTO calls ({CALL_COLUMNS}, owner_node) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in [*CALL_COLUMNS.replace(" ", "").split(",")[1:], "owner_node"])
)


# --- the errors of the store interface (both backends) ------------------------------------------


class NotOwnerError(StoreError):
    """The call belongs to another node (it adopted it): this node's write changed nothing."""

    def __init__(self, call_id: str, owner: str | None) -> None:
        self.call_id = call_id
        self.owner = owner
        super().__init__(f"call {call_id} is owned by node {owner!r}; this node may no longer change it")


class CallExistsError(StoreError):
    """Another call already has this (provider, provider call id): the first to store it won."""

    def __init__(self, call_id: str, owner_node: str | None) -> None:
        self.call_id = call_id
        self.owner_node = owner_node
        super().__init__(f"the carrier's call is already stored as {call_id} (node {owner_node!r})")


class StoreFullError(StoreError):
    """``admit_limit`` non-terminal calls are already stored: a new one is not admitted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"Maximum concurrent calls ({limit}) reached")


# --- the store lock ----------------------------------------------------------------------------


class StoreLockedError(StoreError):
    """Another process (a running daemon) holds the store."""

    def __init__(self, directory: str, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"the store {directory} is in use by another voicecall daemon ({holder})")


def _lock(directory: str) -> int:
    """
    Take the store's lock (`LOCK_FILENAME`, exclusive, not waiting) and write our pid in it;
    returns its descriptor, which holds the lock until closed. Creates the directory (0700) if
    missing; when another process holds the lock, raises `StoreLockedError` having changed nothing.
    """
    _ensure_directory(directory)
    fd = os.open(os.path.join(directory, LOCK_FILENAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreLockedError(os.path.abspath(directory), holder) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> int | None:
    """The pid the lock file names, if it names one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# --- the call store ----------------------------------------------------------------------------


@define(repr=False)
class CallStore:
    """Durable call store: SQLite in WAL mode at ``<directory>/voicecall.sqlite3``."""

    _directory: str
    _writer: Writer
    #: This daemon's node id, recorded as each call's owner.
    _node_id: str = "local"
    _events_cap: int = EVENTS_CAP
    _prune_every: int = PRUNE_EVERY
    _since_prune: int = field(default=0, init=False)  # touched by operations only
    #: The descriptor holding the store's lock while it is open.
    _lock_fd: int | None = field(default=None, init=False)
    _log = Logger()

    @property
    def node_id(self) -> str:
        """The node this store was opened as (the owner it records), as `PgCallStore.node_id`."""
        return self._node_id

    @property
    def path(self) -> str:
        """The database file."""
        return os.path.join(self._directory, DB_FILENAME)

    def open(self) -> Deferred[None]:
        """
        Create the directory (mode 0700) if missing, take the store's lock, open the database,
        set it up. Fails with `StoreLockedError` if another process holds the store.
        """
        d = self._writer.connect(self._connect)
        d.addCallback(lambda _: self._log.debug("call store open at {path}", path=self.path))
        return d

    def close(self) -> Deferred[None]:
        """Close the database once every write issued before has been committed; then let go of the lock."""
        d = self._writer.disconnect()
        d.addBoth(self._unlock)
        return d

    def _unlock(self, result: T) -> T:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        return result

    def write(
        self,
        record: CallRecord | None = None,
        *,
        transcript: Sequence[TranscriptEntry] = (),
        event_keys: Sequence[str] = (),
        events: Sequence[dict[str, Any]] = (),
        admit_limit: int | None = None,
    ) -> Deferred[None]:
        """
        In one transaction: upsert `record`'s row (scalar fields and metadata, not its transcript
        or event keys), append the new `transcript` entries and processed `event_keys` to its call,
        and append `events` to the event log (each a JSON-able dict with a string ``callId`` and
        ``type`` and an integer ``at``; the store gives it an increasing ``seq``). The record is
        read now, so the caller may change it as soon as this returns. Fires once committed.

        With `admit_limit`, a record not yet stored is admitted only while fewer than that many
        calls are non-terminal (else `StoreFullError`). A record whose provider call id another
        call has fails with `CallExistsError`. Either changes nothing.
        """
        try:
            if record is None and (transcript or event_keys):
                raise ValueError("transcript entries and event keys need the call's record")
            row = None if record is None else (*_call_row(record), self._node_id)
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
                if admit_limit is not None:
                    _admit(conn, call_id, admit_limit)
                try:
                    conn.execute(_UPSERT, row)
                except sqlite3.IntegrityError as e:
                    if "provider_call_id" not in str(e):
                        raise
                    holder = conn.execute(
                        "SELECT call_id, owner_node FROM calls WHERE provider = ? AND provider_call_id = ?",
                        (record.provider, record.provider_call_id),
                    ).fetchone()
                    raise CallExistsError(*holder) from None
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
        return self._writer.run(_load_active)

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
        lock = _lock(self._directory) if self._lock_fd is None else None
        try:
            conn = _open_connection(self._directory)
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._prune(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        if lock is not None:
            self._lock_fd = lock
        return conn

    def _prune(self, conn: sqlite3.Connection) -> None:
        self._since_prune = 0
        conn.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (self._events_cap,)
        )


def _ensure_directory(directory: str) -> None:
    """Create the store's directory (mode 0700) if missing."""
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)


def _open_connection(directory: str) -> sqlite3.Connection:
    _ensure_directory(directory)
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
        if version < 2:
            conn.executescript(_SCHEMA_2)
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


def _admit(conn: sqlite3.Connection, call_id: str, limit: int) -> None:
    """Refuse (StoreFullError) a call not yet stored when `limit` calls are live; the writer serialises this."""
    if conn.execute("SELECT 1 FROM calls WHERE call_id = ?", (call_id,)).fetchone() is None:
        (live,) = conn.execute("SELECT count(*) FROM calls WHERE terminal = 0").fetchone()
        if live >= limit:
            raise StoreFullError(limit)


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


#: One encoder for every row: json.dumps with options builds a new encoder on each call.
_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


@contextmanager
def collector_paused() -> Iterator[None]:
    """
    Pause Python's cyclic garbage collector for a bulk build of acyclic objects (loading or
    restoring many calls): each full collection it would run re-walks everything built so far.
    Use around synchronous code only, never across an ``await``, and only for one-off bulk work
    such as the restore at start-up: on leaving, it moves every young object (garbage too, of
    every thread) to the oldest generation, so on a hot path cyclic garbage would pile up until
    a full collection. Leaves the collector enabled or disabled as it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():
            # Move everything tracked to the oldest generation without walking it: the objects
            # just built are long-lived, and the young generations' collections would each
            # traverse all of them once more. Garbage moved along is found by the next full
            # collection. (Skipped if someone froze objects: unfreeze would thaw theirs too.)
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


# --- queries, shared by CallStore (on its writer) and ReadOnlyStore ----------------------------


def _load_active(conn: sqlite3.Connection) -> list[CallRecord]:
    """
    Every non-terminal call, oldest first, whole, with the cyclic garbage collector paused: the
    records form no cycles, and loading 100,000 calls otherwise spent 0.5 of its 1.5 s in full
    collections re-walking the records already built. (Only here, a bulk load done at start-up:
    `collector_paused` must not run on every small read.)
    """
    with collector_paused():
        return _select_calls(conn, "c.terminal = 0", ())


def _select_calls(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...]
) -> list[CallRecord]:
    """
    The calls matching `where` (over ``calls c``), oldest first, whole: one query per table, the
    rows grouped by call in Python. The CROSS JOINs pin the join order so SQLite walks the few
    matching calls and looks their rows up by index, rather than scanning every transcript row or
    event key. The rows were written by `CallStore.write` from valid records, so they are turned
    back into records by `_record` and `_entry`, without the model's converters (restore of a
    large store spends most of its time here).
    """
    select = f"SELECT {CALL_COLUMNS} FROM calls c WHERE {where} ORDER BY c.rowid"
    records = build_records(conn.execute(select, params))
    if not records:
        return []
    return fill_records(
        records,
        conn.execute(
            "SELECT t.call_id, t.timestamp, t.speaker, t.text, t.is_final FROM calls c"
            f" CROSS JOIN transcript t ON t.call_id = c.call_id WHERE {where} ORDER BY c.rowid, t.seq",
            params,
        ),
        conn.execute(
            "SELECT k.call_id, k.key FROM calls c"
            f" CROSS JOIN event_keys k ON k.call_id = c.call_id WHERE {where} ORDER BY c.rowid, k.seq",
            params,
        ),
    )


def build_records(rows: Iterable[Sequence[Any]]) -> dict[str, CallRecord]:
    """
    Records (without transcript or event keys yet) from rows of `CALL_COLUMNS`, in row order,
    by call id. Shared with the PostgreSQL store, whose rows hold the same values.
    """
    records: dict[str, CallRecord] = {}
    metadata = _metadata_loader()
    states, directions = _STATES, _DIRECTIONS
    for (
        call_id, pid, provider, direction, state, _, from_, to, session, started, answered, ended,
        reason, meta,
    ) in rows:
        records[call_id] = _record(
            call_id,
            provider,
            directions.get(direction) or Direction(direction),
            states.get(state) or CallState(state),
            from_,
            to,
            started,
            pid,
            session,
            answered,
            ended,
            reason,
            [],
            [],
            metadata(meta),
        )
    return records


def fill_records(
    records: dict[str, CallRecord],
    transcript_rows: Iterable[Sequence[Any]],
    key_rows: Iterable[Sequence[Any]],
) -> list[CallRecord]:
    """Append (call_id, timestamp, speaker, text, is_final) and (call_id, key) rows, in order, to `records`."""
    speakers = _SPEAKERS
    for call_id, timestamp, speaker, text, is_final in transcript_rows:
        records[call_id].transcript.append(
            _entry(timestamp, speakers.get(speaker) or Speaker(speaker), text, bool(is_final))
        )
    for call_id, key in key_rows:
        records[call_id].processed_event_ids.append(key)
    return list(records.values())


# Stored values back to the model's enums, without the enum machinery's call overhead.
_STATES = {s.value: s for s in CallState}
_DIRECTIONS = {d.value: d for d in Direction}
_SPEAKERS = {s.value: s for s in Speaker}
_RECORD_FIELDS = (
    "call_id", "provider", "direction", "state", "from_number", "to_number", "started_at",
    "provider_call_id", "session_key", "answered_at", "ended_at", "end_reason", "transcript",
    "processed_event_ids", "metadata",
)
_ENTRY_FIELDS = ("timestamp", "speaker", "text", "is_final")
if tuple(a.name for a in attrs.fields(CallRecord)) != _RECORD_FIELDS or tuple(
    a.name for a in attrs.fields(TranscriptEntry)
) != _ENTRY_FIELDS:  # pragma: no cover - a model change must update _record and _entry
    raise ImportError("voicecall.domain.store: _record/_entry do not match the model's fields")


def _setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    return getattr(cls, name).__set__  # the slot's descriptor: no converter, no on_setattr hook


def _make_record() -> Callable[..., CallRecord]:
    setters = [_setter(CallRecord, name) for name in _RECORD_FIELDS]
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14) = setters
    new = object.__new__

    def record(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14):  # type: ignore
        r = new(CallRecord)
        s0(r, a0), s1(r, a1), s2(r, a2), s3(r, a3), s4(r, a4), s5(r, a5), s6(r, a6), s7(r, a7)
        s8(r, a8), s9(r, a9), s10(r, a10), s11(r, a11), s12(r, a12), s13(r, a13), s14(r, a14)
        return r

    return record


def _make_entry() -> Callable[[int, Speaker, str, bool], TranscriptEntry]:
    s0, s1, s2, s3 = [_setter(TranscriptEntry, name) for name in _ENTRY_FIELDS]
    new = object.__new__

    def entry(timestamp: int, speaker: Speaker, text: str, is_final: bool) -> TranscriptEntry:
        e = new(TranscriptEntry)
        s0(e, timestamp), s1(e, speaker), s2(e, text), s3(e, is_final)
        return e

    return entry


#: C{_record(*fields)}: a CallRecord from values already of the model's types, in the order of
#: C{_RECORD_FIELDS}; C{_entry(timestamp, speaker, text, is_final)}: likewise a TranscriptEntry.
_record = _make_record()
_entry = _make_entry()

_SCALARS = frozenset({str, int, float, bool, type(None)})


def _metadata_loader() -> Callable[[str], dict[str, Any]]:
    """
    A C{json.loads} for the metadata column that parses each distinct text once (most calls
    share a few metadata shapes) and hands out a fresh copy each time. Only flat dicts of
    immutable values are reused, so no two records ever share a mutable value.
    """
    cache: dict[str, dict[str, Any]] = {}

    def load(text: str) -> dict[str, Any]:
        known = cache.get(text)
        if known is not None:
            return known.copy()
        value = json.loads(text)
        if (
            len(cache) < 256
            and type(value) is dict
            and all(type(v) in _SCALARS for v in value.values())
        ):
            cache[text] = value
            return value.copy()
        return value

    return load


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


@define(repr=False)
class ReadOnlyStore:
    """Synchronous, read-only access to a store, for the CLI while the daemon is down."""

    _conn: sqlite3.Connection

    def get_call(self, call_id_or_provider_call_id: str) -> CallRecord | None:
        return self._read(_get_call, call_id_or_provider_call_id)

    def recent_calls(self, limit: int = 50) -> list[CallRecord]:
        return self._read(_recent_calls, limit)

    def load_active(self) -> list[CallRecord]:
        return self._read(_load_active)

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
