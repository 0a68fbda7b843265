# -*- test-case-name: tests.test_store_pg -*-
"""
The PostgreSQL store's schema (pgstore.py): versioned migrations, applied at open in one
transaction under an advisory lock, so nodes starting together do not race; each applied version
is a row of ``schema_migrations``. A database whose version is newer than this code knows is
refused. To change the schema, APPEND a `Migration` to `MIGRATIONS` (never edit an applied one).

The event log's channel, `EVENTS_CHANNEL`, is defined here, once: the trigger of ``events``
NOTIFYs it (one NOTIFY per inserting statement, with the statement's last seq as payload), and
followers (cluster/events.py) LISTEN on it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import psycopg
from attrs import frozen

from voicecall.infra.dbwriter import StoreError

#: The channel the events trigger notifies, once per inserting statement, with its last seq as payload.
EVENTS_CHANNEL = "voicecall_events"
#: Transaction-level advisory lock keys (one namespace: 0x766f6963 is "voic").
MIGRATION_LOCK = 0x766F6963_0001
ADMIT_LOCK = 0x766F6963_0002
EVENTS_LOCK = 0x766F6963_0003


@frozen
class Migration:
    """One schema step: `sql` (statements separated by ';' are run as one script) or a callable(conn)."""

    version: int
    description: str
    sql: str | Callable[[psycopg.Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "calls, transcript, event keys, event log, nodes", f"""
CREATE TABLE calls (
    call_id TEXT PRIMARY KEY,
    created_seq BIGSERIAL NOT NULL,
    provider_call_id TEXT,
    provider TEXT NOT NULL,
    direction TEXT NOT NULL,
    state TEXT NOT NULL,
    terminal BOOLEAN NOT NULL,
    from_number TEXT NOT NULL,
    to_number TEXT NOT NULL,
    session_key TEXT,
    started_at BIGINT NOT NULL,
    answered_at BIGINT,
    ended_at BIGINT,
    end_reason TEXT,
    metadata TEXT NOT NULL,
    owner_node TEXT
);
CREATE INDEX calls_created ON calls (created_seq);
CREATE INDEX calls_by_provider_call_id ON calls (provider_call_id, created_seq);
CREATE UNIQUE INDEX calls_claim ON calls (provider, provider_call_id) WHERE provider_call_id IS NOT NULL;
CREATE INDEX calls_active ON calls (owner_node, created_seq) WHERE NOT terminal;
CREATE TABLE transcript (
    seq BIGSERIAL PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    timestamp BIGINT NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT NOT NULL,
    is_final BOOLEAN NOT NULL
);
CREATE INDEX transcript_by_call ON transcript (call_id, seq);
CREATE TABLE event_keys (
    seq BIGSERIAL PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    UNIQUE (call_id, key)
);
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    call_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    type TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE FUNCTION voicecall_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{EVENTS_CHANNEL}', NEW.seq::text);
    RETURN NULL;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION voicecall_events_notify();
CREATE TABLE applied_writes (
    write_id UUID PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    public_url TEXT NOT NULL,
    host TEXT,
    pid INTEGER,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
)
"""),
    # cluster/router.py: a request forwarded to the node that owns its call, and its reply.
    # UNLOGGED: a row lives no longer than the request it carries. The id is the sender's and
    # claimed_by the claiming attempt's, so every statement on a row is idempotent (retries).
    Migration(2, "forwards: requests forwarded to a call's owner", """
CREATE UNLOGGED TABLE forwards (
    id TEXT PRIMARY KEY,
    from_node TEXT NOT NULL,
    to_node TEXT NOT NULL,
    kind TEXT NOT NULL,
    request JSONB NOT NULL,
    reply JSONB,
    claimed_by TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX forwards_unclaimed ON forwards (to_node) WHERE claimed_by IS NULL;
CREATE INDEX forwards_answered ON forwards (from_node) WHERE reply IS NOT NULL
"""),
    # PgCallStore.write in one statement (one round trip instead of four): a write's statements,
    # but its events, which the group commit inserts last. The calls columns are migration 1's.
    Migration(3, "voicecall_write: a write's statements in one call", """
CREATE FUNCTION voicecall_write(
    p_write UUID,
    p_call_id TEXT, p_provider_call_id TEXT, p_provider TEXT, p_direction TEXT, p_state TEXT,
    p_terminal BOOLEAN, p_from_number TEXT, p_to_number TEXT, p_session_key TEXT, p_started_at BIGINT,
    p_answered_at BIGINT, p_ended_at BIGINT, p_end_reason TEXT, p_metadata TEXT, p_owner_node TEXT,
    p_timestamps BIGINT[], p_speakers TEXT[], p_texts TEXT[], p_finals BOOLEAN[], p_keys TEXT[]
) RETURNS TEXT LANGUAGE plpgsql AS $$
BEGIN
    -- 'replayed': this write id was committed already (the retry of an ambiguous COMMIT).
    IF p_write IS NOT NULL THEN
        INSERT INTO applied_writes (write_id) VALUES (p_write) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'replayed';
        END IF;
    END IF;
    IF p_call_id IS NULL THEN
        RETURN 'applied';
    END IF;
    -- 'fenced': another node owns the call; the caller rolls back.
    INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number,
                       to_number, session_key, started_at, answered_at, ended_at, end_reason, metadata, owner_node)
    VALUES (p_call_id, p_provider_call_id, p_provider, p_direction, p_state, p_terminal, p_from_number,
            p_to_number, p_session_key, p_started_at, p_answered_at, p_ended_at, p_end_reason, p_metadata, p_owner_node)
    ON CONFLICT (call_id) DO UPDATE SET
        provider_call_id = excluded.provider_call_id, provider = excluded.provider,
        direction = excluded.direction, state = excluded.state, terminal = excluded.terminal,
        from_number = excluded.from_number, to_number = excluded.to_number,
        session_key = excluded.session_key, started_at = excluded.started_at,
        answered_at = excluded.answered_at, ended_at = excluded.ended_at,
        end_reason = excluded.end_reason, metadata = excluded.metadata, owner_node = excluded.owner_node
    WHERE calls.owner_node IS NULL OR calls.owner_node = excluded.owner_node;
    IF NOT FOUND THEN
        RETURN 'fenced';
    END IF;
    INSERT INTO transcript (call_id, timestamp, speaker, text, is_final)
    SELECT p_call_id, t.ts, t.speaker, t.text, t.final
    FROM unnest(p_timestamps, p_speakers, p_texts, p_finals) WITH ORDINALITY AS t(ts, speaker, text, final, n)
    ORDER BY t.n;
    INSERT INTO event_keys (call_id, key)
    SELECT p_call_id, k.key FROM unnest(p_keys) WITH ORDINALITY AS k(key, n) ORDER BY k.n
    ON CONFLICT DO NOTHING;
    RETURN 'applied';
END $$
"""),
    # The prune of applied_writes (by age, every PRUNE_EVERY writes) scanned the whole table.
    Migration(4, "applied_writes pruned by an index", """
CREATE INDEX applied_writes_at ON applied_writes (at)
"""),
    # PostgreSQL serialises the commits of all NOTIFYing transactions server-wide: one NOTIFY per
    # transaction (the store appends a batch's events in one statement), not one per row.
    Migration(5, "one events NOTIFY per statement, with its last seq", f"""
DROP TRIGGER events_notify ON events;
CREATE OR REPLACE FUNCTION voicecall_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_seq BIGINT;
BEGIN
    SELECT max(seq) INTO last_seq FROM new_rows;
    IF last_seq IS NOT NULL THEN
        PERFORM pg_notify('{EVENTS_CHANNEL}', last_seq::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION voicecall_events_notify()
"""),
    # JSONB refuses U+0000, which a carrier's request may hold (a decoded %00 in its query): a
    # forwarded request or its answer is kept as the JSON text the router wrote, escapes and all.
    Migration(6, "forwards keep their JSON as text", """
ALTER TABLE forwards ALTER COLUMN request TYPE TEXT USING request::text,
    ALTER COLUMN reply TYPE TEXT USING reply::text
"""),
    # Each node is judged by its own cluster.leaseSeconds (NULL: a row an older version wrote).
    Migration(7, "nodes keep their lease", """
ALTER TABLE nodes ADD COLUMN lease_seconds DOUBLE PRECISION
"""),
    # A batch whose COMMIT was applied but not acknowledged runs again: a replayed write still
    # upserts its row (idempotent), so that an earlier write of the batch re-applying an older
    # snapshot of the same call is overwritten again; only its appends are skipped.
    Migration(8, "voicecall_write: a replayed write upserts its row again", """
CREATE OR REPLACE FUNCTION voicecall_write(
    p_write UUID,
    p_call_id TEXT, p_provider_call_id TEXT, p_provider TEXT, p_direction TEXT, p_state TEXT,
    p_terminal BOOLEAN, p_from_number TEXT, p_to_number TEXT, p_session_key TEXT, p_started_at BIGINT,
    p_answered_at BIGINT, p_ended_at BIGINT, p_end_reason TEXT, p_metadata TEXT, p_owner_node TEXT,
    p_timestamps BIGINT[], p_speakers TEXT[], p_texts TEXT[], p_finals BOOLEAN[], p_keys TEXT[]
) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    replayed BOOLEAN := false;
BEGIN
    -- 'replayed': this write id was committed already (the retry of an ambiguous COMMIT): its
    -- row is written again, its transcript entries and event keys (and the caller's events) not.
    IF p_write IS NOT NULL THEN
        INSERT INTO applied_writes (write_id) VALUES (p_write) ON CONFLICT DO NOTHING;
        replayed := NOT FOUND;
    END IF;
    IF p_call_id IS NULL THEN
        RETURN CASE WHEN replayed THEN 'replayed' ELSE 'applied' END;
    END IF;
    -- 'fenced': another node owns the call; the caller rolls back.
    INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number,
                       to_number, session_key, started_at, answered_at, ended_at, end_reason, metadata, owner_node)
    VALUES (p_call_id, p_provider_call_id, p_provider, p_direction, p_state, p_terminal, p_from_number,
            p_to_number, p_session_key, p_started_at, p_answered_at, p_ended_at, p_end_reason, p_metadata, p_owner_node)
    ON CONFLICT (call_id) DO UPDATE SET
        provider_call_id = excluded.provider_call_id, provider = excluded.provider,
        direction = excluded.direction, state = excluded.state, terminal = excluded.terminal,
        from_number = excluded.from_number, to_number = excluded.to_number,
        session_key = excluded.session_key, started_at = excluded.started_at,
        answered_at = excluded.answered_at, ended_at = excluded.ended_at,
        end_reason = excluded.end_reason, metadata = excluded.metadata, owner_node = excluded.owner_node
    WHERE calls.owner_node IS NULL OR calls.owner_node = excluded.owner_node;
    IF replayed THEN
        RETURN 'replayed';  -- fenced now or not, it was applied when it first committed
    END IF;
    IF NOT FOUND THEN
        RETURN 'fenced';
    END IF;
    INSERT INTO transcript (call_id, timestamp, speaker, text, is_final)
    SELECT p_call_id, t.ts, t.speaker, t.text, t.final
    FROM unnest(p_timestamps, p_speakers, p_texts, p_finals) WITH ORDINALITY AS t(ts, speaker, text, final, n)
    ORDER BY t.n;
    INSERT INTO event_keys (call_id, key)
    SELECT p_call_id, k.key FROM unnest(p_keys) WITH ORDINALITY AS k(key, n) ORDER BY k.n
    ON CONFLICT DO NOTHING;
    RETURN 'applied';
END $$
"""),
)


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return max(m.version for m in migrations)


def migrate(conn: psycopg.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """
    Bring the schema up to date inside `conn`'s transaction, under `MIGRATION_LOCK`; return the
    versions applied. Raises StoreError, changing nothing, if the database is newer than `migrations`.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    applied = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
    known = latest_version(migrations)
    if applied and max(applied) > known:
        raise StoreError(
            f"the PostgreSQL store has schema version {max(applied)}; this voicecall knows up to"
            f" {known}: upgrade voicecall on this node (nodes of one deployment run the same version)"
        )
    done = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in applied:
            continue
        if callable(m.sql):
            m.sql(conn)
        else:
            conn.execute(m.sql)
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, %s)", (m.version, m.description))
        done.append(m.version)
    return done
