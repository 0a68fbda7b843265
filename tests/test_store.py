"""
Tests for the call store: its contract, run against both backends (SQLite: voicecall.domain.store
on a SynchronousWriter; PostgreSQL: voicecall.domain.pgstore on a real server from
tests/pgserver.py, through a SynchronousPgPool), then what is SQLite's alone (pragmas, file modes,
writers, kill -9). PostgreSQL's own tests (cluster rules under concurrency, migrations, server
failures) are in tests/test_store_pg.py.
"""
from __future__ import annotations

import gc
import os
import signal
import sqlite3
import stat
import sys
import textwrap
import threading
import uuid

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

import voicecall
from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.domain.model import CallEvent, CallRecord, CallState, Direction, Speaker, TranscriptEntry
from voicecall.providers.mock import MockProvider
from voicecall.domain import store as store_module
from voicecall.domain.store import (
    DB_FILENAME,
    CallExistsError,
    CallStore,
    StoreFullError,
    collector_paused,
    open_readonly,
)
from voicecall.infra.dbwriter import StoreBusyError, StoreClosedError, StoreError, SynchronousWriter, ThreadedWriter

from tests.harness import eventually
from tests.pgserver import SynchronousPgPool, postgres_server


def make_record(call_id: str = "call-1", **changes) -> CallRecord:
    """A plain outbound call record, with `changes` applied."""
    record = CallRecord(
        call_id=call_id,
        provider="twilio",
        direction="outbound",
        state="ringing",
        from_number="+15550001111",
        to_number="+15550002222",
        started_at=1_700_000_000_000,
        provider_call_id="CA" + call_id,
        metadata={"mode": "conversation"},
    )
    return attrs.evolve(record, **changes)


def entry(text: str, speaker: str = "user", timestamp: int = 1) -> TranscriptEntry:
    return TranscriptEntry(timestamp=timestamp, speaker=speaker, text=text)


def event(call_id: str, kind: str = "call.ringing", at: int = 1, **extra) -> dict:
    return {"callId": call_id, "at": at, "type": kind, **extra}


# --- hypothesis strategies for the round-trip properties ---

# PostgreSQL text cannot hold NUL (its store writes U+FFFD instead: tests/test_store_pg.py); SQLite's
# tests below keep NUL in their own cases.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
ints = st.integers(min_value=0, max_value=2**53)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
entries = st.builds(
    TranscriptEntry,
    timestamp=ints,
    speaker=st.sampled_from(Speaker),
    text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60),
    is_final=st.booleans(),
)
records = st.builds(
    CallRecord,
    call_id=st.just("placeholder"),
    provider=st.sampled_from(["twilio", "telnyx", "plivo", "mock"]),
    direction=st.sampled_from(Direction),
    state=st.sampled_from(CallState),
    from_number=texts,
    to_number=texts,
    started_at=ints,
    provider_call_id=st.none() | texts,
    session_key=st.none() | texts,
    answered_at=st.none() | ints,
    ended_at=st.none() | ints,
    end_reason=st.none() | texts,
    transcript=st.lists(entries, max_size=6),
    processed_event_ids=st.lists(texts, unique=True, max_size=6),
    metadata=st.dictionaries(texts, json_values, max_size=4),
)




class SqliteBackend:
    """The SQLite store on a SynchronousWriter, in a fresh directory."""

    #: What a write the database refuses fails with.
    integrity_error: type = sqlite3.IntegrityError

    def new_location(self) -> str:
        return os.path.abspath(self.mktemp())

    def make_store(self, location: str, **kwargs) -> CallStore:
        return CallStore(location, SynchronousWriter(), **kwargs)

    def raw(self, store, fn) -> Deferred:
        """Run ``fn(conn)`` on the store's own connection, in a transaction."""
        return store._writer.run(fn)

    def readonly(self, location: str):
        return open_readonly(location)

    def make_newer(self, location: str, version: int) -> None:
        os.makedirs(location)
        conn = sqlite3.connect(os.path.join(location, DB_FILENAME))
        conn.execute(f"PRAGMA user_version = {version}")
        conn.close()


class PgBackend:
    """The PostgreSQL store on a SynchronousPgPool, in a fresh database of the test run's server."""

    integrity_error: type = StoreError
    node_id = "node-a"

    def new_location(self) -> str:
        return postgres_server(self).new_database(self)

    def make_store(self, location: str, **kwargs):
        from voicecall.domain.pgstore import PgCallStore

        return PgCallStore(SynchronousPgPool(location), node_id=kwargs.pop("node_id", self.node_id), **kwargs)

    def raw(self, store, fn) -> Deferred:
        return store.pool.run(fn)

    def readonly(self, location: str):
        from voicecall.domain.pgstore import open_readonly as pg_open_readonly

        return pg_open_readonly(location)

    def make_newer(self, location: str, version: int) -> None:
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, 'from the future')", (version,))


class _StoreMixin(SqliteBackend):
    """Opens a store of the test's backend (SQLite unless a backend class comes first)."""

    def open_store(self, location: str | None = None, **kwargs):
        store = self.make_store(location or self.new_location(), **kwargs)
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        return store

    def write(self, store: CallStore, record: CallRecord | None = None, **kwargs) -> None:
        self.assertIsNone(self.successResultOf(store.write(record, **kwargs)))

    def write_whole(self, store: CallStore, record: CallRecord) -> None:
        self.write(
            store, record, transcript=record.transcript, event_keys=record.processed_event_ids
        )


class StoreContract(_StoreMixin):
    """The store interface's contract; each backend's test class mixes it in."""

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(record=records)
    def test_round_trip(self, record):
        """A record written whole reads back equal, by call id and, if live, from load_active."""
        if not hasattr(self, "_shared"):
            self._shared = self.open_store()
        store = self._shared
        call_id = str(uuid.uuid4())
        pid = None if record.provider_call_id is None else record.provider_call_id + call_id
        record = attrs.evolve(record, call_id=call_id, provider_call_id=pid)
        self.write_whole(store, record)
        self.assertEqual(self.successResultOf(store.get_call(record.call_id)), record)
        active = self.successResultOf(store.load_active())
        self.assertEqual(
            [r for r in active if r.call_id == record.call_id],
            [] if record.is_terminal else [record],
        )

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(first=records, last=records, data=st.data())
    def test_incremental_round_trip(self, first, last, data):
        """A record written in two steps reads back as the last scalars plus every appended row."""
        if not hasattr(self, "_shared"):
            self._shared = self.open_store()
        store = self._shared
        call_id = str(uuid.uuid4())
        first = attrs.evolve(first, provider_call_id=None if first.provider_call_id is None else "1" + call_id)
        last = attrs.evolve(last, provider_call_id=None if last.provider_call_id is None else "2" + call_id)
        cut_t = data.draw(st.integers(0, len(last.transcript)))
        cut_k = data.draw(st.integers(0, len(last.processed_event_ids)))
        self.write(
            store,
            attrs.evolve(first, call_id=call_id),
            transcript=last.transcript[:cut_t],
            event_keys=last.processed_event_ids[:cut_k],
        )
        final = attrs.evolve(last, call_id=call_id)
        self.write(
            store,
            final,
            transcript=last.transcript[cut_t:],
            event_keys=last.processed_event_ids[cut_k:],
        )
        self.assertEqual(self.successResultOf(store.get_call(call_id)), final)

    def test_newer_schema_refused(self):
        """A database of a newer schema version is refused with a StoreError naming the version."""
        location = self.new_location()
        self.make_newer(location, 999)
        failure = self.failureResultOf(self.make_store(location).open(), StoreError)
        self.assertIn("version 999", str(failure.value))

    def test_reopen_keeps_everything(self):
        """Closing and reopening the store gives back the records, keys and event log."""
        directory = self.new_location()
        store = self.open_store(directory)
        record = make_record(transcript=[entry("hi")], processed_event_ids=["k1", "k2"])
        self.write_whole(store, record)
        self.write(store, events=[event("call-1")])
        self.successResultOf(store.close())
        again = self.open_store(directory)
        self.assertEqual(self.successResultOf(again.get_call("call-1")), record)
        self.assertEqual(self.successResultOf(again.recent_event_keys()), ["k1", "k2"])
        self.assertEqual(
            self.successResultOf(again.last_events(5)), [{**event("call-1"), "seq": 1}]
        )

    def test_get_call_by_provider_call_id(self):
        """get_call finds a call by its provider call id, the newest one if several share it."""
        store = self.open_store()
        self.write(store, make_record("a", provider_call_id="P1"))
        self.write(store, make_record("b", provider="telnyx", provider_call_id="P1"))
        self.write(store, make_record("c", provider_call_id="P2"))
        self.assertEqual(self.successResultOf(store.get_call("P1")).call_id, "b")
        self.assertEqual(self.successResultOf(store.get_call("c")).call_id, "c")
        self.assertIsNone(self.successResultOf(store.get_call("nope")))

    def test_upsert_replaces_scalars_and_metadata(self):
        """A later write of the same call replaces its fields and metadata but keeps its rows."""
        store = self.open_store()
        self.write(store, make_record(metadata={"initialMessage": "hi"}), transcript=[entry("one")])
        later = make_record(state="active", answered_at=5, metadata={"turnCount": 1})
        self.write(store, later, transcript=[entry("two")])
        got = self.successResultOf(store.get_call("call-1"))
        self.assertEqual(got, attrs.evolve(later, transcript=[entry("one"), entry("two")]))

    def test_load_active_skips_terminal(self):
        """load_active gives the live calls, oldest first, whole; never the ended ones."""
        store = self.open_store()
        live = make_record("a", transcript=[entry("x")], processed_event_ids=["ka"])
        self.write_whole(store, live)
        self.write_whole(store, make_record("b", processed_event_ids=["kb"]))
        self.write_whole(store, make_record("c", state="listening"))
        self.write(store, make_record("b", state="completed", ended_at=9, end_reason="completed"))
        active = self.successResultOf(store.load_active())
        self.assertEqual(active, [live, make_record("c", state="listening")])

    def test_load_active_empty_store(self):
        """A new store has no active calls, keys, events or recent calls."""
        store = self.open_store()
        self.assertEqual(self.successResultOf(store.load_active()), [])
        self.assertEqual(self.successResultOf(store.recent_event_keys()), [])
        self.assertEqual(self.successResultOf(store.last_events(10)), [])
        self.assertEqual(self.successResultOf(store.recent_calls()), [])

    def test_recent_event_keys_all_calls(self):
        """recent_event_keys gives the newest keys of all calls, terminal ones too, oldest first."""
        store = self.open_store()
        self.write(store, make_record("a"), event_keys=["a1", "a2"])
        self.write(store, make_record("b"), event_keys=["b1"])
        self.write(store, make_record("a", state="completed"), event_keys=["a3"])
        self.assertEqual(self.successResultOf(store.recent_event_keys()), ["a1", "a2", "b1", "a3"])
        self.assertEqual(self.successResultOf(store.recent_event_keys(limit=2)), ["b1", "a3"])

    def test_duplicate_event_key_not_repeated(self):
        """Writing a key a call already has does not add it again."""
        store = self.open_store()
        self.write(store, make_record(), event_keys=["k1", "k2"])
        self.write(store, make_record(), event_keys=["k1"])
        got = self.successResultOf(store.get_call("call-1"))
        self.assertEqual(got.processed_event_ids, ["k1", "k2"])
        self.assertEqual(self.successResultOf(store.recent_event_keys()), ["k1", "k2"])

    def test_delete_call(self):
        """delete_call removes the call with its transcript and keys; other calls stay."""
        store = self.open_store()
        self.write_whole(
            store, make_record("a", transcript=[entry("x")], processed_event_ids=["ka"])
        )
        self.write_whole(store, make_record("b", processed_event_ids=["kb"]))
        self.successResultOf(store.delete_call("a"))
        self.assertIsNone(self.successResultOf(store.get_call("a")))
        self.assertEqual(self.successResultOf(store.recent_event_keys()), ["kb"])
        self.write(store, make_record("a"))
        self.assertEqual(self.successResultOf(store.get_call("a")), make_record("a"))

    def test_recent_calls(self):
        """recent_calls gives the most recently created calls, newest last, whole."""
        store = self.open_store()
        for name in "abcd":
            self.write(store, make_record(name), transcript=[entry(name)])
        self.write(store, make_record("b", state="completed"))
        got = self.successResultOf(store.recent_calls(limit=3))
        self.assertEqual([r.call_id for r in got], ["b", "c", "d"])
        self.assertEqual(got[0].state, CallState.COMPLETED)
        self.assertEqual(got[2].transcript, [entry("d")])

    def test_event_log(self):
        """Event-log entries get increasing seq numbers and read back whole, last n or after seq."""
        store = self.open_store()
        self.write(store, events=[event("a", "call.initiated", 1, note="x")])
        self.write(
            store, make_record("b"), events=[event("b", at=2), event("b", "call.answered", 3)]
        )
        everything = self.successResultOf(store.events_after(0))
        self.assertEqual(
            everything,
            [
                {**event("a", "call.initiated", 1, note="x"), "seq": 1},
                {**event("b", at=2), "seq": 2},
                {**event("b", "call.answered", 3), "seq": 3},
            ],
        )
        self.assertEqual(self.successResultOf(store.events_after(1, limit=1)), everything[1:2])
        self.assertEqual(self.successResultOf(store.last_events(2)), everything[1:])

    def test_event_log_bounded(self):
        """The event log is pruned to its newest entries and keeps numbering upwards."""
        store = self.open_store(events_cap=10, prune_every=4)
        for i in range(1, 41):
            self.write(store, events=[event("a", at=i)])
        kept = self.successResultOf(store.events_after(0, limit=100))
        self.assertLessEqual(len(kept), 10 + 4 - 1)
        self.assertEqual([e["seq"] for e in kept], list(range(41 - len(kept), 41)))
        self.assertEqual([e["at"] for e in kept], [e["seq"] for e in kept])

    def test_event_log_pruned_at_open(self):
        """Opening the store prunes the event log to the cap."""
        directory = self.new_location()
        store = self.open_store(directory)
        self.write(store, events=[event("a", at=i) for i in range(20)])
        self.successResultOf(store.close())
        again = self.open_store(directory, events_cap=5)
        kept = self.successResultOf(again.events_after(0))
        self.assertEqual([e["seq"] for e in kept], [16, 17, 18, 19, 20])

    def test_invalid_event_rejected(self):
        """An event-log entry lacking callId, type or an integer at fails and changes nothing."""
        store = self.open_store()
        bad_entries = [
            {"callId": "a", "type": "t"},
            {"callId": "a", "at": "1", "type": "t"},
            {"at": 1, "type": "t"},
        ]
        for bad in bad_entries:
            self.failureResultOf(store.write(make_record("a"), events=[bad]), ValueError)
        self.assertIsNone(self.successResultOf(store.get_call("a")))
        self.assertEqual(self.successResultOf(store.last_events(5)), [])

    def test_rows_need_a_record(self):
        """Transcript entries or event keys without a record fail with ValueError."""
        store = self.open_store()
        self.failureResultOf(store.write(transcript=[entry("x")]), ValueError)
        self.failureResultOf(store.write(event_keys=["k"]), ValueError)

    def test_unserialisable_metadata_rejected(self):
        """Metadata that is not plain JSON (NaN, objects) fails its write; later writes work."""
        store = self.open_store()
        self.failureResultOf(store.write(make_record(metadata={"x": float("nan")})), ValueError)
        self.failureResultOf(store.write(make_record(metadata={"x": object()})), TypeError)
        self.write(store, make_record())
        self.assertEqual(self.successResultOf(store.get_call("call-1")), make_record())

    def test_failed_write_is_atomic(self):
        """A write that fails in the database leaves no part of itself behind."""
        store = self.open_store()
        self.write(store, make_record(), transcript=[entry("one")], event_keys=["k1"])
        changed = make_record(state="active", metadata={"turnCount": 3})
        failure = self.failureResultOf(
            store.write(changed, transcript=[entry("fine"), entry("bad \ud800")], event_keys=["k2"])
        )
        self.assertIsInstance(failure.value, (UnicodeError, self.integrity_error))
        got = self.successResultOf(store.get_call("call-1"))
        self.assertEqual(got, make_record(transcript=[entry("one")], processed_event_ids=["k1"]))

    def test_missing_not_null_field_fails(self):
        """A record missing a required field fails its own write and the store goes on working."""
        store = self.open_store()
        self.failureResultOf(store.write(make_record(from_number=None)), self.integrity_error)
        self.write(store, make_record("ok"))
        self.assertIsNone(self.successResultOf(store.get_call("call-1")))
        self.assertEqual(self.successResultOf(store.get_call("ok")), make_record("ok"))

    def test_operations_need_open_store(self):
        """Before open() and after close() every operation fails with StoreClosedError."""
        store = self.make_store(self.new_location())
        self.failureResultOf(store.write(make_record()), StoreClosedError)
        self.successResultOf(store.open())
        self.successResultOf(store.close())
        self.failureResultOf(store.get_call("x"), StoreClosedError)

    def test_negative_limit_rejected(self):
        """A negative or non-integer limit fails with ValueError."""
        store = self.open_store()
        self.failureResultOf(store.last_events(-1), ValueError)
        self.failureResultOf(store.recent_calls("5"), ValueError)

    def test_one_call_per_carrier_call(self):
        """A second call with a (provider, provider call id) already stored fails, naming the first, and changes nothing."""
        store = self.open_store()
        self.write(store, make_record("first", provider_call_id="P1"))
        failure = self.failureResultOf(
            store.write(make_record("second", provider_call_id="P1"), events=[event("second")]), CallExistsError
        )
        self.assertEqual((failure.value.call_id, failure.value.owner_node), ("first", self.node_id))
        self.assertIsNone(self.successResultOf(store.get_call("second")))
        self.assertEqual(self.successResultOf(store.last_events(5)), [])
        # the same call may write again; another provider's id space is its own
        self.write(store, make_record("first", provider_call_id="P1", state="active"))
        self.write(store, make_record("third", provider="plivo", provider_call_id="P1"))

    def test_owner_recorded(self):
        """Each call row names the node that wrote it."""
        store = self.open_store()
        self.write(store, make_record())
        owner = self.successResultOf(self.raw(store, lambda conn: conn.execute("SELECT owner_node FROM calls").fetchone()[0]))
        self.assertEqual(owner, self.node_id)

    def test_admit_limit(self):
        """A new call is refused once `admit_limit` calls are live; known calls and ended ones do not count against it."""
        store = self.open_store()
        self.write(store, make_record("a"), admit_limit=2)
        self.write(store, make_record("b"), admit_limit=2)
        failure = self.failureResultOf(store.write(make_record("c"), events=[event("c")], admit_limit=2), StoreFullError)
        self.assertEqual(str(failure.value), "Maximum concurrent calls (2) reached")
        self.assertIsNone(self.successResultOf(store.get_call("c")))
        self.assertEqual(self.successResultOf(store.last_events(5)), [])
        self.write(store, make_record("a", state="active"), admit_limit=2)  # not new: admitted
        self.write(store, make_record("b", state="completed", ended_at=5))
        self.write(store, make_record("c"), admit_limit=2)


class SqliteStoreTests(StoreContract, SynchronousTestCase):
    """The contract on SQLite, and what is SQLite's alone."""

    node_id = "local"

    def test_open_creates_private_directory_and_file(self):
        """open() creates a missing directory with mode 0700, and the database and WAL with 0600."""
        directory = os.path.join(os.path.abspath(self.mktemp()), "state")
        store = self.open_store(directory)
        self.write(store, make_record())
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        for name in (DB_FILENAME, DB_FILENAME + "-wal"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode), 0o600)

    def test_pragmas(self):
        """The connection uses WAL, synchronous=FULL, foreign keys, a busy timeout and schema 2."""
        writer = SynchronousWriter()
        store = CallStore(os.path.abspath(self.mktemp()), writer)
        self.successResultOf(store.open())
        self.addCleanup(store.close)

        def pragmas(conn):
            return [
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in (
                    "journal_mode", "synchronous", "foreign_keys", "busy_timeout", "user_version"
                )
            ]

        journal, synchronous, foreign_keys, busy, version = self.successResultOf(
            writer.run(pragmas)
        )
        self.assertEqual((journal, synchronous, foreign_keys, version), ("wal", 2, 1, 2))
        self.assertGreater(busy, 0)

    def test_write_cost_independent_of_call_length(self):
        """Appending to a long call executes the same statements as appending to a new one."""
        writer = SynchronousWriter()
        store = CallStore(os.path.abspath(self.mktemp()), writer)
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        statements: list[str] = []
        self.successResultOf(writer.run(lambda conn: conn.set_trace_callback(statements.append)))

        def traced_append(call_id):
            del statements[:]
            self.write(
                store, make_record(call_id), transcript=[entry("x")], event_keys=[f"k-{call_id}"]
            )
            return [line.replace(call_id, "ID") for line in statements]

        short = traced_append("short")
        for i in range(200):
            self.write(store, make_record("long"), transcript=[entry(str(i))], event_keys=[f"k{i}"])
        self.assertEqual(traced_append("long"), short)



    def test_schema_1_upgraded(self):
        """A store of schema 1 (before owners and the unique claim) opens, keeps its calls and gains both."""
        directory = self.new_location()
        os.makedirs(directory)
        conn = sqlite3.connect(os.path.join(directory, DB_FILENAME), isolation_level=None)
        conn.executescript(store_module._SCHEMA)
        conn.execute(
            "INSERT INTO calls VALUES ('old', 'P1', 'twilio', 'outbound', 'ringing', 0, '+1', '+2', NULL, 1, NULL, NULL, NULL, '{}')"
        )
        conn.close()
        store = self.open_store(directory)
        self.assertEqual(self.successResultOf(store.get_call("P1")).call_id, "old")
        self.failureResultOf(store.write(make_record("new", provider_call_id="P1")), CallExistsError)
        self.assertEqual(self.successResultOf(self.raw(store, lambda c: c.execute("PRAGMA user_version").fetchone()[0])), 2)

    def test_nul_kept(self):
        """SQLite keeps NUL characters in text (PostgreSQL stores U+FFFD instead: test_store_pg)."""
        store = self.open_store()
        record = make_record(to_number="+1\x00", transcript=[entry("a\x00b")])
        self.write_whole(store, record)
        self.assertEqual(self.successResultOf(store.get_call("call-1")), record)


class PgStoreTests(PgBackend, StoreContract, SynchronousTestCase):
    """The contract on PostgreSQL."""


class SynchronousWriterTests(_StoreMixin, SynchronousTestCase):
    """The transaction discipline of SynchronousWriter.run."""

    def test_failed_op_rolled_back(self):
        """An op that raises after changing rows has its changes undone and its Deferred failed."""
        writer = SynchronousWriter()
        store = CallStore(os.path.abspath(self.mktemp()), writer)
        self.successResultOf(store.open())
        self.addCleanup(store.close)

        def op(conn):
            conn.execute("DELETE FROM events")
            raise RuntimeError("boom")

        self.write(store, events=[event("a")])
        self.failureResultOf(writer.run(op), RuntimeError)
        self.assertEqual(len(self.successResultOf(store.last_events(5))), 1)

    def test_op_result_returned(self):
        """run() fires with the op's return value once committed."""
        writer = SynchronousWriter()
        store = CallStore(os.path.abspath(self.mktemp()), writer)
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        self.assertEqual(self.successResultOf(writer.run(lambda conn: 42)), 42)

    def test_open_twice_refused(self):
        """Opening an already open store fails with StoreError."""
        store = self.open_store()
        self.failureResultOf(store.open(), StoreError)


class ReadOnlyStoreTests(_StoreMixin, SynchronousTestCase):
    """open_readonly, for the CLI."""

    def test_no_database(self):
        """open_readonly returns None when the directory or database does not exist."""
        directory = os.path.abspath(self.mktemp())
        self.assertIsNone(open_readonly(directory))
        os.makedirs(directory)
        self.assertIsNone(open_readonly(directory))
        open(os.path.join(directory, DB_FILENAME), "wb").close()
        self.assertIsNone(open_readonly(directory))

    def test_reads_after_daemon_closed(self):
        """A read-only store opens a closed database and cannot change it."""
        directory = os.path.abspath(self.mktemp())
        store = self.open_store(directory)
        self.write(store, make_record())
        self.successResultOf(store.close())
        with open_readonly(directory) as ro:
            self.assertEqual(ro.get_call("call-1"), make_record())
            self.assertRaises(
                sqlite3.OperationalError, ro._conn.execute, "DELETE FROM calls"
            )


# --- ThreadedWriter: real threads and the real reactor ---


class ReadOnlyContract(_StoreMixin):
    """The CLI's read-only view, on either backend."""

    def test_reads_while_daemon_store_open(self):
        """A read-only store sees what the daemon's store has committed, also later commits."""
        directory = self.new_location()
        store = self.open_store(directory)
        record = make_record(transcript=[entry("hi")], processed_event_ids=["k"])
        self.write_whole(store, record)
        self.write(store, events=[event("call-1"), event("call-1", "call.answered", 2)])
        ro = self.readonly(directory)
        self.addCleanup(ro.close)
        self.assertEqual(ro.get_call("call-1"), record)
        self.assertEqual(ro.get_call(record.provider_call_id), record)
        self.assertIsNone(ro.get_call("other"))
        self.assertEqual(ro.recent_calls(5), [record])
        self.assertEqual(ro.load_active(), [record])
        self.assertEqual([e["seq"] for e in ro.last_events(1)], [2])
        self.write(store, make_record("call-2"), events=[event("call-2")])
        self.assertEqual([e["callId"] for e in ro.events_after(2)], ["call-2"])
        self.assertEqual([r.call_id for r in ro.recent_calls(5)], ["call-1", "call-2"])



class SqliteReadOnlyTests(ReadOnlyContract, SynchronousTestCase):
    pass


class PgReadOnlyTests(PgBackend, ReadOnlyContract, SynchronousTestCase):
    def test_no_store_yet(self):
        """A database without the store's tables reads as no store."""
        self.assertIsNone(self.readonly(self.new_location()))

    def test_cannot_change_anything(self):
        import psycopg

        location = self.new_location()
        self.open_store(location)
        with self.readonly(location) as ro:
            with self.assertRaises(psycopg.errors.ReadOnlySqlTransaction):
                with ro._conn.transaction():
                    ro._conn.execute("DELETE FROM calls")


class ThreadedWriterTests(TestCase):
    """ThreadedWriter on the real reactor."""

    def setUp(self):
        from twisted.internet import reactor

        self.directory = os.path.abspath(self.mktemp())
        self.writer = ThreadedWriter(reactor)
        self.store = CallStore(self.directory, self.writer)
        self.writer.start()
        self.addCleanup(self.writer.stop)
        return self.store.open()

    def reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(os.path.join(self.directory, DB_FILENAME))
        self.addCleanup(conn.close)
        return conn

    async def test_one_commit_per_reactor_iteration(self):
        """Writes issued in one reactor iteration reach the thread together and share one commit."""
        statements: list[str] = []
        await self.writer.run(lambda conn: conn.set_trace_callback(statements.append))
        del statements[:]
        writes = [self.store.write(make_record(f"i{i}"), event_keys=[f"k{i}"]) for i in range(20)]
        await gatherResults(writes)
        self.assertEqual(statements.count("COMMIT"), 1)

    async def test_group_commit(self):
        """Writes issued during a commit share the next transaction; each fires after it commits."""
        statements: list[str] = []
        await self.writer.run(lambda conn: conn.set_trace_callback(statements.append))
        del statements[:]
        started, release = threading.Event(), threading.Event()

        def blocker(conn):
            started.set()
            release.wait(10)

        blocked = self.writer.run(blocker)
        await eventually(started.is_set, 10, "the writer thread to start the write")
        reader = self.reader()
        seen = []

        def check(_, call_id):
            query = "SELECT call_id FROM calls WHERE call_id = ?"
            row = reader.execute(query, (call_id,)).fetchone()
            seen.append((threading.current_thread() is threading.main_thread(), row))

        writes = []
        for i in range(50):
            d = self.store.write(make_record(f"c{i}"), event_keys=[f"k{i}"])
            d.addCallback(check, f"c{i}")
            writes.append(d)
        self.assertFalse(any(d.called for d in writes))
        release.set()
        await blocked
        await gatherResults(writes)
        self.assertEqual(seen, [(True, (f"c{i}",)) for i in range(50)])
        self.assertEqual(statements.count("COMMIT"), 2)

    async def test_failing_op_fails_alone(self):
        """In a batch, a failing op errbacks only its own Deferred; the others commit."""
        release = threading.Event()
        blocked = self.writer.run(lambda conn: release.wait(10))
        before = self.store.write(make_record("a"))
        bad = self.store.write(make_record("b", from_number=None))
        after = self.store.write(make_record("c"))
        release.set()
        await blocked
        await before
        with self.assertRaises(sqlite3.IntegrityError):
            await bad
        await after
        ids = [r.call_id for r in await self.store.recent_calls()]
        self.assertEqual(ids, ["a", "c"])

    async def test_stop_flushes_queue(self):
        """close() and stop() issued right after writes still commit those writes first."""
        writes = [self.store.write(make_record(f"c{i}")) for i in range(20)]
        closed = self.store.close()
        stopped = self.writer.stop()
        await stopped
        self.assertTrue(closed.called)
        self.assertTrue(all(d.called for d in writes))
        await gatherResults(writes)
        self.assertEqual(self.reader().execute("SELECT COUNT(*) FROM calls").fetchone(), (20,))
        self.assertFalse(any(t.name == "voicecall-store" for t in threading.enumerate()))

    async def test_run_after_stop_fails(self):
        """Once stopped, the writer fails new operations with StoreClosedError."""
        await self.writer.stop()
        with self.assertRaises(StoreClosedError):
            await self.store.get_call("x")

    async def test_reads_see_writes(self):
        """A read queued after a write sees it, without waiting for the write's Deferred."""
        self.store.write(make_record(), transcript=[entry("hi")])
        got = await self.store.get_call("call-1")
        self.assertEqual(got, make_record(transcript=[entry("hi")]))

    async def test_queue_bounded(self):
        """Beyond max_pending waiting operations, run() fails with StoreBusyError."""
        from twisted.internet import reactor

        writer = ThreadedWriter(reactor, max_pending=3)
        writer.start()
        self.addCleanup(writer.stop)
        await CallStore(os.path.abspath(self.mktemp()), writer).open()
        release = threading.Event()
        started = threading.Event()
        first = writer.run(lambda conn: (started.set(), release.wait(10)))
        await eventually(started.is_set, 10, "the writer thread to start the write")
        queued = [writer.run(lambda conn: None) for _ in range(3)]
        with self.assertRaises(StoreBusyError):
            await writer.run(lambda conn: None)
        release.set()
        await gatherResults([first, *queued])
        self.assertIsNone(await writer.run(lambda conn: None))


class LoadContract(_StoreMixin):
    """The bulk read path (load_active, get_call) builds whole, independent, ordinary records."""

    def test_records_are_ordinary_model_objects(self):
        """A loaded record has the model's enum members and keeps its converters and freezing."""
        store = self.open_store()
        self.write_whole(store, make_record(transcript=[entry("hi", "bot")]))
        (got,) = self.successResultOf(store.load_active())
        self.assertIs(got.direction, Direction.OUTBOUND)
        self.assertIs(got.state, CallState.RINGING)
        self.assertIs(got.transcript[0].speaker, Speaker.BOT)
        self.assertIs(got.transcript[0].is_final, True)
        self.assertEqual(hash(got.transcript[0]), hash(entry("hi", "bot")))
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            got.transcript[0].text = "changed"
        self.assertEqual(got.to_json(), make_record(transcript=[entry("hi", "bot")]).to_json())
        got.state = "active"
        self.assertIs(got.state, CallState.ACTIVE)
        with self.assertRaises(ValueError):
            got.state = "no-such-state"

    def test_records_share_no_mutable_state(self):
        """Calls with the same metadata get their own dicts and lists, also across loads."""
        store = self.open_store()
        nested = {"mode": "notify", "tags": ["a"], "extra": {"n": 1}}
        for call_id in ("a", "b"):
            self.write_whole(store, make_record(call_id, processed_event_ids=[f"k{call_id}"]))
        for call_id in ("c", "d"):
            self.write_whole(store, make_record(call_id, metadata=nested))
        for call_id in ("e", "f", "g"):
            self.write_whole(store, make_record(call_id))
        a, b, c, d, *flat = self.successResultOf(store.load_active())
        for record in flat:
            record.metadata[record.call_id] = True
        self.assertEqual(
            [r.metadata for r in flat],
            [{"mode": "conversation", k: True} for k in ("e", "f", "g")],
        )
        a.metadata["turnCount"] = 3
        a.transcript.append(entry("x"))
        a.processed_event_ids.append("extra")
        c.metadata["tags"].append("b")
        c.metadata["extra"]["n"] = 2
        self.assertEqual(b.metadata, {"mode": "conversation"})
        self.assertEqual((b.transcript, b.processed_event_ids), ([], ["kb"]))
        self.assertEqual(d.metadata, nested)
        again = self.successResultOf(store.load_active())
        self.assertEqual(again[0], make_record("a", processed_event_ids=["ka"]))
        self.assertEqual(again[2].metadata, nested)

    def test_many_calls_whole_and_in_order(self):
        """Hundreds of live calls among ended ones come back whole, oldest first."""
        location = self.new_location()
        store = self.open_store(location)
        expected = []
        for i in range(300):
            record = make_record(
                f"call-{i:03d}",
                state=("ringing", "completed", "listening")[i % 3],
                answered_at=i if i % 2 else None,
                transcript=[entry(f"line {i}.{j}", ("bot", "user")[j % 2], j) for j in range(i % 4)],
                processed_event_ids=[f"k{i}.{j}" for j in range(i % 5)],
                metadata={"mode": "conversation", "turn": i % 7},
            )
            self.write_whole(store, record)
            if not record.is_terminal:
                expected.append(record)
        # a second batch of rows for some calls: their rows stay in write order
        for record in expected[::10]:
            more = [entry(f"later {record.call_id}", "user", 99)]
            self.write(store, record, transcript=more, event_keys=[f"later-{record.call_id}"])
            record.transcript.extend(more)
            record.processed_event_ids.append(f"later-{record.call_id}")
        self.assertEqual(self.successResultOf(store.load_active()), expected)
        with self.readonly(location) as readonly:
            self.assertEqual(readonly.load_active(), expected)

    def test_bad_stored_value_fails_the_load(self):
        """A row holding a value outside the model (an edited database) fails the read."""
        store = self.open_store()
        self.write_whole(store, make_record())
        self.successResultOf(self.raw(store, lambda conn: conn.execute("UPDATE calls SET state = 'bogus'")))
        self.failureResultOf(store.load_active(), ValueError)
        self.failureResultOf(store.get_call("call-1"), ValueError)
        self.assertTrue(gc.isenabled())

class RestoreContract(_StoreMixin):
    """CallManager.restore over the real store: records come back exactly as stored."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = self.open_store()
        self.provider = MockProvider(clock=self.clock)

    def manager(self) -> CallManager:
        manager = CallManager(
            provider=self.provider,
            voice=self.provider,
            store=self.store,
            clock=self.clock,
            settings=ManagerSettings(provider_name="mock", max_duration_seconds=300),
        )
        manager.set_webhook_url("http://127.0.0.1:1/voice/webhook")
        self.addCleanup(manager.stop)
        return manager

    def test_restore_gives_back_stored_calls(self):
        """Live calls return whole; the others are closed as before; old events stay deduplicated."""
        now = int(self.clock.seconds() * 1000)
        live = []
        for i in range(50):
            record = make_record(
                f"live-{i}",
                state="listening",
                started_at=now - 1000,
                answered_at=now - 500 if i % 2 else None,
                provider_call_id=f"mock-live-{i}",
                transcript=[entry("Hello", "bot", now - 900), entry(f"caller {i}", "user", now - 800)],
                processed_event_ids=[f"live-{i}-a", f"live-{i}-b"],
                metadata={"mode": "conversation", "turnCount": i, "nested": {"i": [i]}},
            )
            self.write_whole(self.store, record)
            live.append(record)
        store = self.store
        closed = {
            "orphan": make_record("orphan", provider_call_id=None, started_at=now),
            "old": make_record("old", started_at=now - 301_000, provider_call_id="mock-old"),
            "gone": make_record("gone", started_at=now, provider_call_id="mock-ended-1"),
            "long": make_record("long", started_at=now - 200_000, answered_at=now - 300_000,
                                provider_call_id="mock-long", state="active"),
            "ended": make_record("ended", state="completed", processed_event_ids=["done-key"]),
        }
        for record in closed.values():
            self.write_whole(store, record)
        manager = self.manager()
        outcome = self.successResultOf(Deferred.fromCoroutine(manager.restore()))
        self.assertEqual(
            outcome, {"restored": 50, "no-provider-id": 1, "expired": 2, "ended-at-carrier": 1}
        )
        self.assertEqual(sorted(manager.active_calls(), key=lambda c: c.call_id),
                         sorted(live, key=lambda c: c.call_id))
        for record in live:
            self.assertEqual(manager.find(record.provider_call_id), record)
        states = {k: self.successResultOf(store.get_call(k)).state for k in closed}
        self.assertEqual(states, {
            "orphan": CallState.FAILED, "old": CallState.TIMEOUT, "gone": CallState.COMPLETED,
            "long": CallState.TIMEOUT, "ended": CallState.COMPLETED,
        })
        hangups = sorted(a[1] for a in self.provider.actions if a[0] == "hangup")
        self.assertEqual(hangups, ["mock-long", "mock-old"])
        # Replays of stored events (of live and of ended calls) are ignored.
        for call_id, key in (("live-3", "live-3-b"), ("ended", "done-key")):
            self.successResultOf(Deferred.fromCoroutine(manager.process_event(CallEvent(
                type="call.speech", call_id=call_id, id=key, timestamp=now, transcript="again",
            ))))
        self.assertEqual(len(manager.find("live-3").transcript), 2)
        self.assertEqual(len(self.successResultOf(store.get_call("live-3")).transcript), 2)
        # Answered calls run out of time 300 s after their answer, the others do not.
        self.clock.advance(299.4)
        self.assertEqual(len(manager.active_calls()), 50)
        self.clock.advance(0.2)
        self.assertEqual(len(manager.active_calls()), 25)
        self.assertTrue(gc.isenabled())


class SqliteLoadTests(LoadContract, SynchronousTestCase):
    # Here only: the PostgreSQL pool's own threads free objects, which moves the freeze count.
    def test_collector_left_as_it_was(self):
        """Loads pause the cyclic collector and leave it as they found it, frozen objects too."""
        store = self.open_store()
        self.write_whole(store, make_record())
        self.assertTrue(gc.isenabled())
        self.successResultOf(store.load_active())
        self.assertTrue(gc.isenabled())
        self.assertEqual(gc.get_freeze_count(), 0)
        gc.disable()
        try:
            self.successResultOf(store.load_active())
            self.assertFalse(gc.isenabled())
        finally:
            gc.enable()
        gc.freeze()
        try:
            frozen = gc.get_freeze_count()
            self.successResultOf(store.load_active())
            self.assertEqual(gc.get_freeze_count(), frozen)
        finally:
            gc.unfreeze()
        with self.assertRaises(KeyError), collector_paused():
            raise KeyError("boom")
        self.assertTrue(gc.isenabled())


class PgLoadTests(PgBackend, LoadContract, SynchronousTestCase):
    pass


class SqliteRestoreTests(RestoreContract, SynchronousTestCase):
    pass


class PgRestoreTests(PgBackend, RestoreContract, SynchronousTestCase):
    pass


_CHILD = textwrap.dedent(
    """
    import sys
    from twisted.internet import defer, task
    from voicecall.domain.model import CallRecord, TranscriptEntry
    from voicecall.domain.store import CallStore
    from voicecall.infra.dbwriter import ThreadedWriter

    async def main(reactor, directory):
        writer = ThreadedWriter(reactor)
        await writer.start()
        store = CallStore(directory, writer)
        await store.open()
        writes = []
        for i in range(20):
            record = CallRecord(
                call_id=f"call-{i}", provider="twilio", direction="outbound", state="initiated",
                from_number="+15550001111", to_number="+15550002222", started_at=i,
                provider_call_id=f"CA{i}", metadata={"mode": "notify", "initialMessage": "hi"},
            )
            writes.append(store.write(
                record,
                transcript=[TranscriptEntry(timestamp=i, speaker="bot", text="hello")],
                event_keys=[f"k{i}"],
                events=[{"callId": record.call_id, "at": i, "type": "call.initiated"}],
            ))
        await defer.gatherResults(writes)
        sys.stdout.write("acked\\n")
        sys.stdout.flush()
        await defer.Deferred()

    task.react(main, [sys.argv[1]])
    """
)


class _KillOnAck(ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.errors = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data):
        self.output += data
        if b"acked\n" in self.output:
            self.transport.signalProcess("KILL")

    def errReceived(self, data):
        self.errors += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class DurabilityTests(TestCase):
    """Acknowledged writes survive the daemon being killed."""

    async def test_acknowledged_write_survives_kill_9(self):
        """Records whose writes were acknowledged are there after the writer process is killed."""
        from twisted.internet import reactor

        directory = os.path.abspath(self.mktemp())
        root = os.path.dirname(os.path.dirname(os.path.abspath(voicecall.__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        proto = _KillOnAck()
        argv = [sys.executable, "-c", _CHILD, directory]
        reactor.spawnProcess(proto, sys.executable, argv, env=env)
        ended = await proto.ended
        self.assertIn(b"acked", proto.output, proto.errors.decode(errors="replace"))
        self.assertIsInstance(ended, ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGKILL)

        store = CallStore(directory, SynchronousWriter())
        await store.open()
        self.addCleanup(store.close)
        for i in (0, 19):
            record = await store.get_call(f"call-{i}")
            self.assertEqual(record.metadata, {"mode": "notify", "initialMessage": "hi"})
            self.assertEqual(record.processed_event_ids, [f"k{i}"])
            self.assertEqual([t.text for t in record.transcript], ["hello"])
        self.assertEqual(len(await store.load_active()), 20)
        self.assertEqual(len(await store.last_events(100)), 20)
