"""
The PostgreSQL store's own tests (the contract shared with SQLite is in tests/test_store.py):
the cluster rules under real concurrency (two PgPools = two nodes), migrations, the server going
away, the idempotence that makes retries safe, the events channel, the `store` config key, and
one daemon end to end (initiate over RPC, kill -9, restart: the call is restored).
"""
from __future__ import annotations

import json
import os

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import (
    BASE_CONFIG,
    event as mock_event,
    eventually,
    free_port,
    make_workdir,
    run_cli,
    spawn_daemon,
    speech,
    until_state,
    webhook_client,
)
from tests.pgserver import postgres_server, private_postgres_server
from tests.test_store import entry, event, make_record
from voicecall.config import ConfigError, parse_config
from voicecall.domain.manager import CallError, CallManager, ManagerSettings
from voicecall.domain.pgschema import EVENTS_CHANNEL
from voicecall.domain.pgstore import MIGRATIONS, Migration, PgCallStore, latest_version
from voicecall.domain.store import CallExistsError, NotOwnerError, StoreFullError
from voicecall.infra.dbwriter import StoreError
from voicecall.infra.pg import PgPool
from voicecall.providers.mock import MockProvider

SECRET = "pg-s3cret"


async def open_node(testcase, url: str, node_id: str, **kwargs) -> PgCallStore:
    """A store as a node opens it: its own threaded PgPool."""
    store = PgCallStore(PgPool(reactor, url, max_size=4), node_id=node_id, **kwargs)
    await store.open()
    testcase.addCleanup(store.close)
    return store


def rows(url: str, query: str, *params):
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


class ClusterRuleTests(TestCase):
    async def setUp(self):
        self.url = postgres_server(self).new_database(self)
        self.a = await open_node(self, self.url, "node-a")
        self.b = await open_node(self, self.url, "node-b")

    async def test_concurrent_admission_never_exceeds_the_limit(self):
        """40 new calls written at once by two nodes, limit 3: exactly 3 admitted."""
        writes = [
            (self.a if i % 2 else self.b).write(make_record(f"c{i}", provider_call_id=None), admit_limit=3)
            for i in range(40)
        ]
        results = await DeferredList(writes, consumeErrors=True)
        admitted = [ok for ok, _ in results if ok]
        refused = [f for ok, f in results if not ok]
        self.assertEqual(len(admitted), 3)
        self.assertTrue(all(f.check(StoreFullError) for f in refused), [f.value for f in refused])
        self.assertEqual(rows(self.url, "SELECT count(*) FROM calls"), [(3,)])

    async def test_inbound_claimed_once(self):
        """Two nodes create the same carrier call at once: one wins, the other is told who."""
        results = await DeferredList(
            [
                self.a.write(make_record("in-a", direction="inbound", provider_call_id="CA-same"), events=[event("in-a")]),
                self.b.write(make_record("in-b", direction="inbound", provider_call_id="CA-same"), events=[event("in-b")]),
            ],
            consumeErrors=True,
        )
        (winner,) = rows(self.url, "SELECT call_id, owner_node FROM calls")
        losers = [f.value for ok, f in results if not ok]
        self.assertEqual(len(losers), 1)
        self.assertIsInstance(losers[0], CallExistsError)
        self.assertEqual((losers[0].call_id, losers[0].owner_node), winner)
        self.assertEqual(rows(self.url, "SELECT call_id FROM events"), [(winner[0],)])

    async def test_fencing(self):
        """After another node adopted a call, the old owner's writes and deletes change nothing."""
        await self.a.write(make_record("c1"), transcript=[entry("one")], event_keys=["k1"])
        with self.assertRaises(NotOwnerError) as caught:
            await self.b.write(make_record("c1", state="active"), transcript=[entry("b")], events=[event("c1")])
        self.assertEqual((caught.exception.call_id, caught.exception.owner), ("c1", "node-a"))
        with psycopg.connect(self.url, autocommit=True) as conn:  # node-b adopts it (cluster/adopt.py does this)
            conn.execute("UPDATE calls SET owner_node = 'node-b' WHERE call_id = 'c1'")
        with self.assertRaises(NotOwnerError) as caught:
            await self.a.write(make_record("c1", state="completed"), transcript=[entry("late")], event_keys=["k2"], events=[event("c1")])
        self.assertEqual(caught.exception.owner, "node-b")
        with self.assertRaises(NotOwnerError):
            await self.a.delete_call("c1")
        got = await self.b.get_call("c1")
        self.assertEqual((got.state.value, [t.text for t in got.transcript], got.processed_event_ids), ("ringing", ["one"], ["k1"]))
        self.assertEqual(await self.a.last_events(5), [])
        await self.b.write(make_record("c1", state="active"))
        self.assertEqual([r.call_id for r in await self.b.load_active()], ["c1"])
        self.assertEqual(await self.a.load_active(), [])  # each node restores only its own

    async def test_manager_limit_holds_across_nodes(self):
        """Two managers (two nodes) with maxConcurrentCalls 2, three initiates each at once: 2 calls in all."""
        managers = []
        for store in (self.a, self.b):
            provider = MockProvider(clock=reactor)
            manager = CallManager(
                provider=provider, voice=provider, store=store, clock=reactor,
                settings=ManagerSettings(provider_name="mock", max_concurrent_calls=2),
            )
            manager.set_webhook_url("http://127.0.0.1:1/voice/webhook")
            self.addCleanup(manager.stop)
            managers.append(manager)
        attempts = [Deferred.fromCoroutine(m.initiate("+15550001234", "hi")) for m in managers for _ in range(3)]
        results = await DeferredList(attempts, consumeErrors=True)
        placed = [value for ok, value in results if ok]
        refused = [f.value for ok, f in results if not ok]
        self.assertEqual(len(placed), 2, refused)
        self.assertTrue(all(isinstance(e, CallError) and str(e) == "Maximum concurrent calls (2) reached" for e in refused), refused)

    async def test_events_notified_once_per_transaction_in_order(self):
        """
        A transaction that appends events NOTIFYs voicecall_events once, with its last seq, once
        committed (PostgreSQL serialises the commits of NOTIFYing transactions: one NOTIFY per row
        would cost as much as one per write).
        """
        got: list[str] = []
        ready: list[int] = []
        listener = self.b.pool.listen(EVENTS_CHANNEL, got.append, lambda: ready.append(1))
        self.addCleanup(listener.stop)
        await eventually(lambda: ready, 10, "LISTEN in place")
        await self.a.write(make_record("c1"), events=[event("c1", at=1), event("c1", at=2)])
        await self.a.write(events=[event("c1", at=3)])
        await gatherResults([self.a.write(events=[event("c1", at=4 + i)]) for i in range(5)])  # one batch
        seqs = [e["seq"] for e in await self.b.events_after(0)]
        await eventually(lambda: len(got) >= 3, 10, "three notifications")
        await self.b.events_after(0)  # a round trip: a fourth notification would have arrived by now
        self.assertEqual([int(p) for p in got], [seqs[1], seqs[2], seqs[7]])

    async def test_retried_write_applies_once(self):
        """A write run twice (the retry after an ambiguous COMMIT that had in fact committed) applies once."""
        pool = self.a.pool
        real_transact = pool._transact

        def twice(connections, fn, retry_ambiguous):
            real_transact(connections, fn, retry_ambiguous)
            return real_transact(connections, fn, retry_ambiguous)

        self.patch(pool, "_transact", twice)
        await self.a.write(make_record("c1"), transcript=[entry("once")], event_keys=["k"], events=[event("c1")])
        got = await self.b.get_call("c1")
        self.assertEqual(([t.text for t in got.transcript], got.processed_event_ids), (["once"], ["k"]))
        self.assertEqual(len(await self.b.last_events(10)), 1)

    async def test_concurrent_writes_share_commits(self):
        """Writes issued together are group-committed: 40 writes, 2 transactions (the first alone, then the rest)."""
        await gatherResults([
            self.a.write(make_record(f"c{i}"), transcript=[entry(f"t{i}")], event_keys=[f"k{i}"], events=[event(f"c{i}")])
            for i in range(40)
        ])
        (transactions,) = rows(self.url, "SELECT count(DISTINCT xmin::text) FROM applied_writes")[0]
        self.assertEqual(transactions, 2)
        self.assertEqual(rows(self.url, "SELECT call_id FROM events ORDER BY seq"), [(f"c{i}",) for i in range(40)])
        self.assertEqual(rows(self.url, "SELECT count(*) FROM transcript"), [(40,)])

    async def test_failing_write_fails_alone_in_its_batch(self):
        """A fenced write and a lost claim among good writes of one batch: only they fail, the others commit."""
        await self.b.write(make_record("theirs"))
        await self.b.write(make_record("claimed", provider_call_id="CA-1"))
        writes = [self.a.write(make_record(f"c{i}"), events=[event(f"c{i}")]) for i in range(3)]
        writes.append(self.a.write(make_record("theirs"), events=[event("theirs")]))
        writes += [self.a.write(make_record(f"c{i}"), events=[event(f"c{i}")]) for i in range(3, 6)]
        writes.append(self.a.write(make_record("mine", provider_call_id="CA-1"), events=[event("mine")]))
        writes.append(self.a.write(make_record("c6"), events=[event("c6")]))
        results = await DeferredList(writes, consumeErrors=True)
        failed = {i: f.value for i, (ok, f) in enumerate(results) if not ok}
        self.assertEqual(sorted(failed), [3, 7])
        self.assertIsInstance(failed[3], NotOwnerError)
        self.assertIsInstance(failed[7], CallExistsError)
        self.assertEqual(rows(self.url, "SELECT call_id FROM events ORDER BY seq"), [(f"c{i}",) for i in range(7)])
        self.assertEqual(rows(self.url, "SELECT owner_node FROM calls WHERE call_id = 'theirs'"), [("node-b",)])

    async def test_nul_replaced(self):
        """
        PostgreSQL text cannot hold NUL: a U+0000 in a text column is stored as U+FFFD (README);
        JSON values (metadata, the event log) keep it, escaped.
        """
        record = make_record("c1", provider_call_id="CA\x00", to_number="+1\x00", metadata={"note": "m\x00"})
        await self.a.write(record, transcript=[entry("a\x00b")], event_keys=["k\x00"], events=[event("c1", text="x\x00")])
        got = await self.b.get_call("c1")
        self.assertEqual((got.provider_call_id, got.to_number), ("CA\ufffd", "+1\ufffd"))
        self.assertEqual(([t.text for t in got.transcript], got.processed_event_ids), (["a\ufffdb"], ["k\ufffd"]))
        self.assertEqual((await self.b.get_call("CA\x00")).call_id, "c1")
        self.assertEqual((got.metadata["note"], (await self.b.last_events(1))[0]["text"]), ("m\x00", "x\x00"))


class IssueOrderContract:
    """
    Writes of one call commit in the order they were issued, on a threaded store: the manager
    overlaps them (a turn's persist racing a webhook's hang-up), and a stale snapshot committed
    last would leave an ended call live. Subclasses give `open_store()`.
    """

    async def overlapping_writes(self, store, call_id: str, *, plain: tuple[int, ...] = ()) -> None:
        """Six writes of one record issued without waiting (those in `plain` with no event): the last one's is stored."""
        record = make_record(call_id)
        await store.write(record)
        writes = []
        for n in range(6):  # the manager's pattern: mutate the one record, write it, don't wait
            record.metadata["n"] = n
            events = [] if n in plain else [event(call_id, "call.x", at=n, n=n)]
            writes.append(store.write(record, events=events))
        await gatherResults(writes)
        got = await store.get_call(call_id)
        self.assertEqual(got.metadata["n"], 5)
        logged = [e["n"] for e in await store.events_after(0, 1000) if e["callId"] == call_id]
        self.assertEqual(logged, [n for n in range(6) if n not in plain])

    async def test_writes_of_one_call_commit_in_issue_order(self):
        store = await self.open_store()
        for trial in range(20):
            await self.overlapping_writes(store, f"c{trial}")


class SqliteIssueOrderTests(IssueOrderContract, TestCase):
    async def open_store(self):
        from voicecall.domain.store import CallStore
        from voicecall.infra.dbwriter import ThreadedWriter

        writer = ThreadedWriter(reactor)
        store = CallStore(os.path.abspath(self.mktemp()), writer)
        writer.start()
        self.addCleanup(writer.stop)
        await store.open()
        return store


class PgIssueOrderTests(IssueOrderContract, TestCase):
    async def open_store(self):
        self.url = postgres_server(self).new_database(self)
        return await open_node(self, self.url, "node-a")

    async def test_issue_order_kept_across_a_retried_ambiguous_commit(self):
        """The first batch's connection dies AT COMMIT (outcome unknown) and is retried: later writes wait for it."""
        store = await self.open_store()
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE SEQUENCE fuse START 2")  # not transactional: burns once though rolled back
            conn.execute(
                "CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF nextval('fuse') = 1 THEN"
                "   PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);"
                " END IF; RETURN NULL; END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER die AFTER INSERT OR UPDATE ON calls DEFERRABLE INITIALLY DEFERRED"
                " FOR EACH ROW EXECUTE FUNCTION die_at_commit()"
            )
        for trial in range(3):
            rows(self.url, "SELECT setval('fuse', 1, false)")  # the next COMMIT of a calls write dies
            await self.overlapping_writes(store, f"c{trial}")
            self.assertGreater(rows(self.url, "SELECT last_value FROM fuse")[0][0], 1)


    async def test_issue_order_kept_when_a_committed_batch_runs_again(self):
        """
        A batch whose COMMIT was in fact applied runs again (the connection broke as COMMIT
        returned): a write without events in it re-applies its snapshot, and the later write,
        already applied, must still leave its own, newer, snapshot as the stored one.
        """
        store = await self.open_store()
        real_transact = store.pool._transact

        def twice(connections, fn, retry_ambiguous):
            real_transact(connections, fn, retry_ambiguous)
            return real_transact(connections, fn, retry_ambiguous)

        self.patch(store.pool, "_transact", twice)
        await self.overlapping_writes(store, "c1", plain=(4,))


class PruneTests(TestCase):
    async def test_applied_writes_pruned_by_index(self):
        """The periodic prune of old write ids reads an index, not the whole table (a row per write)."""
        url = postgres_server(self).new_database(self)
        await open_node(self, url, "node-a")
        with psycopg.connect(url) as conn:
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN DELETE FROM applied_writes WHERE at < now() - interval '10 minutes'"))
        self.assertIn("applied_writes_at", plan)


class MigrationTests(TestCase):
    async def test_fresh_reopen_and_concurrent_open(self):
        url = postgres_server(self).new_database(self)
        stores = [PgCallStore(PgPool(reactor, url), node_id=f"n{i}") for i in range(3)]
        await gatherResults([s.open() for s in stores])  # three nodes starting at once
        for s in stores:
            self.addCleanup(s.close)
        self.assertEqual(rows(url, "SELECT version FROM schema_migrations"), [(m.version,) for m in MIGRATIONS])
        again = await open_node(self, url, "n9")
        await again.write(make_record())
        self.assertEqual(len(rows(url, "SELECT version FROM schema_migrations")), len(MIGRATIONS))

    async def test_appended_migration_applied_on_open(self):
        url = postgres_server(self).new_database(self)
        first = await open_node(self, url, "n1")
        await first.close()
        extra = Migration(latest_version() + 1, "a test table", "CREATE TABLE extra_test (x int)")
        await open_node(self, url, "n1", migrations=(*MIGRATIONS, extra))
        self.assertEqual(rows(url, "SELECT to_regclass('extra_test') IS NOT NULL"), [(True,)])
        # the code without it now refuses the newer database, and changes nothing
        with self.assertRaises(StoreError) as caught:
            await PgCallStore(PgPool(reactor, url), node_id="old").open()
        self.assertIn(f"schema version {extra.version}", str(caught.exception))

    async def test_failed_migration_changes_nothing(self):
        url = postgres_server(self).new_database(self)
        bad = Migration(latest_version() + 1, "broken", "CREATE TABLE half (x int); SELECT no_such_function()")
        with self.assertRaises(StoreError):
            await open_node(self, url, "n1", migrations=(*MIGRATIONS, bad))
        self.assertEqual(rows(url, "SELECT to_regclass('schema_migrations') IS NULL, to_regclass('half') IS NULL"), [(True, True)])


class ServerFailureTests(TestCase):
    async def test_server_down_then_back(self):
        """Writes fail clearly while the server is down, succeed again by themselves once it is back; nothing acknowledged is lost."""
        pg = private_postgres_server(self)
        name = pg.new_database().rsplit("/", 1)[1]
        store = PgCallStore(PgPool(reactor, pg.url(name, password=SECRET), acquire_timeout=1, connect_timeout=1), node_id="n1")
        await store.open()
        self.addCleanup(store.close)
        await store.write(make_record("before"), transcript=[entry("kept")])
        pg.kill()
        with self.assertRaises(StoreError) as caught:
            await store.write(make_record("during"))
        self.assertIn(store.path, str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))
        pg.restart()

        async def writes():
            try:
                await store.write(make_record("after"))
            except StoreError:
                return False
            return True

        await eventually(writes, 30, "a write once the server is back")
        self.assertEqual([t.text for t in (await store.get_call("before")).transcript], ["kept"])
        self.assertEqual(sorted(r.call_id for r in await store.recent_calls()), ["after", "before"])

    async def test_unreachable_at_open(self):
        url = f"postgresql://voicecall:{SECRET}@127.0.0.1:{free_port()}/calls"
        with self.assertRaises(StoreError) as caught:
            await PgCallStore(PgPool(reactor, url, connect_timeout=1), node_id="n1").open()
        self.assertIn("voicecall@127.0.0.1:", str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))


#: A cluster node's own URL, which a PostgreSQL store requires.
PUBLIC = {"publicUrl": "https://a.example/voice/webhook"}


class StoreConfigTests(SynchronousTestCase):
    def test_directory_or_url(self):
        env = {"HOME": "/h"}
        self.assertEqual(parse_config({"store": "state"}, env).store, os.path.abspath("state"))
        url = f"postgresql://vc:{SECRET}@db.example:5433/calls?sslmode=require"
        cfg = parse_config({"store": url, **PUBLIC}, env)
        self.assertEqual((cfg.store, cfg.store_is_postgres), (url, True))
        self.assertNotIn(SECRET, cfg.store_shown)
        self.assertEqual(cfg.state_dir, os.path.expanduser("~/.openclaw/voice-calls"))
        self.assertTrue(parse_config({"store": "postgres://db/calls", **PUBLIC}, env).store_is_postgres)

    def test_env_fallback(self):
        url = "postgresql://vc@db/calls"
        self.assertEqual(parse_config(PUBLIC, {"HOME": "/h", "VOICECALL_STORE": url}).store, url)
        self.assertEqual(parse_config({"store": "/srv/vc"}, {"HOME": "/h", "VOICECALL_STORE": url}).store, "/srv/vc")

    def test_bad_urls_refused_without_the_password(self):
        for bad in (f"mysql://vc:{SECRET}@db/calls", f"postgresql://vc:{SECRET}@db:99999/calls", f"postgresql://vc:{SECRET}@db/ca lls"):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"store": bad}, {"HOME": "/h"})
            text = "\n".join(caught.exception.lines())
            self.assertIn("store:", text)
            self.assertNotIn(SECRET, text)

    def test_store_opened_as_this_node(self):
        """tap.build_store: SQLite or PostgreSQL by the store value, opened as cluster.nodeId, else the host name."""
        from voicecall import tap

        env = {"HOME": "/h"}
        sqlite = tap.build_store(parse_config({"store": "/tmp/x", "cluster": {"nodeId": "n7"}}, env), reactor, None)
        self.assertEqual((type(sqlite).__name__, sqlite.node_id), ("CallStore", "n7"))
        pg = tap.build_store(parse_config({"store": "postgresql://vc@db/calls", **PUBLIC}, env), reactor, None)
        self.assertEqual((type(pg).__name__, pg.node_id), ("PgCallStore", tap.host_node_id()))
        self.patch(tap.socket, "gethostname", lambda: "-Web 01.example.com/" + "x" * 60)
        self.assertEqual(tap.host_node_id(), ("Web-01.example.com-" + "x" * 60)[:48])

    def test_psycopg_missing_is_a_clear_error(self):
        import sys

        from voicecall import tap

        cfg = parse_config({"store": "postgresql://vc@db/calls", **PUBLIC}, {"HOME": "/h"})
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in ("psycopg", "psycopg_pool") or name in ("voicecall.infra.pg", "voicecall.domain.pgstore")}
        self.addCleanup(sys.modules.update, saved)
        sys.modules["psycopg"] = None  # as if not installed
        self.addCleanup(sys.modules.pop, "psycopg", None)
        with self.assertRaises(SystemExit) as caught:
            tap.build_store(cfg, reactor, None)
        self.assertEqual(
            str(caught.exception),
            "voicecall: the store is PostgreSQL (postgresql://vc@db/calls) but psycopg is not installed:"
            " pip install 'voicecall[postgresql]'",
        )


class DaemonTests(TestCase):
    async def test_call_restored_after_kill_9(self):
        """A daemon on the PostgreSQL store: initiate over RPC, kill -9, restart: the call is back, as this node's."""
        url = postgres_server(self).new_database(self)
        config = {**BASE_CONFIG, "store": url, "publicUrl": "https://solo.example/voice/webhook", "maxConcurrentCalls": 3, "cluster": {"nodeId": "solo"}}
        workdir = make_workdir(self, raw=json.dumps(config))
        daemon = await spawn_daemon(self, workdir)
        result = await run_cli(self, workdir, "call", "--to", "+15550001234", "--message", "Hi", "--mode", "conversation")
        call_id = result.json()["callId"]
        await daemon.kill9()
        self.assertEqual(rows(url, "SELECT owner_node, terminal FROM calls WHERE call_id = %s", call_id), [("solo", False)])
        down = await run_cli(self, workdir, "status", "--call-id", call_id)  # the CLI reads the store while the daemon is down
        self.assertEqual(down.json()["callId"], call_id)
        self.assertIn("read the store at postgresql://voicecall@127.0.0.1", down.err)
        await spawn_daemon(self, workdir)
        up = await run_cli(self, workdir, "status", "--call-id", call_id)
        self.assertEqual((up.json()["callId"], up.json()["state"]), (call_id, down.json()["state"]))
        self.assertEqual(rows(url, "SELECT type FROM events ORDER BY seq")[0], ("call.created",))


class NulWebhookTests(TestCase):
    timeout = 60

    async def test_speech_with_nul_is_acknowledged_and_stored(self):
        """
        A carrier webhook whose speech holds U+0000, on a PostgreSQL-backed daemon: answered 200
        (it failed with 500 on every retry of the carrier, and the words were lost), stored with U+FFFD.
        """
        from tests.test_cluster_route import start_node

        url = postgres_server(self).new_database(self)
        _, rpc, hook = await start_node(self, url, "solo")
        web = webhook_client(self)
        call_id = (await rpc.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
        self.assertEqual((await web.post(hook, mock_event("call.answered", call_id))).code, 200)
        await until_state(rpc, call_id, "listening", timeout=10)
        answer = await web.post(hook, speech(call_id, "Fine\x00thanks"))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(
            rows(url, "SELECT speaker, text FROM transcript ORDER BY seq"), [("bot", "Hi"), ("user", "Fine\ufffdthanks")]
        )


class SecretTests(TestCase):
    async def test_doctor_and_cli_never_show_the_password(self):
        """doctor and the CLI (reading the store while no daemon runs) name the server, never the URL's password."""
        url = f"postgresql://vc:{SECRET}@127.0.0.1:{free_port()}/calls"
        workdir = make_workdir(self, raw=json.dumps({**BASE_CONFIG, "store": url, "publicUrl": "https://a.example/voice/webhook"}))
        doctor = await run_cli(self, workdir, "doctor")
        self.assertIn("PostgreSQL postgresql://vc:***@127.0.0.1:", doctor.out + doctor.err)
        status = await run_cli(self, workdir, "status")
        self.assertNotEqual(status.code, 0)
        self.assertIn("cannot connect to PostgreSQL vc@127.0.0.1:", status.err)
        for result in (doctor, status):
            self.assertNotIn(SECRET, result.out + result.err)
