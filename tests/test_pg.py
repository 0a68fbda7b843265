"""
voicecall/infra/pg.py against a real PostgreSQL (tests/pgserver.py): transactions committed
before they are acknowledged, retries (serialization failure, a backend terminated mid-transaction,
a connection lost during COMMIT), the server going away and coming back, bounds, LISTEN/NOTIFY
with reconnection, and the password never shown.
"""
from __future__ import annotations

import os
import socket
import threading

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.harness import eventually, free_port
from tests.pgserver import postgres_server, private_postgres_server
from voicecall.infra.dbwriter import StoreBusyError, StoreClosedError, StoreError
from voicecall.infra.pg import KEEPALIVES, CommitUnknownError, PgPool, StoreUnavailableError, describe, notify
from voicecall.infra.pgcommit import GroupCommit

SECRET = "s3cr3t-pa55"


def capture_log(testcase) -> list[str]:
    """Every log event's formatted text and fields, as strings, while the test runs."""
    seen: list[str] = []

    def observer(event: dict) -> None:
        seen.append(repr(event))

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return seen


async def open_pool(testcase, url: str, **kwargs) -> PgPool:
    pool = PgPool(reactor, url, **kwargs)
    await pool.open()
    testcase.addCleanup(pool.close)
    return pool


def with_table_t(testcase) -> None:
    """`testcase.pg`, `testcase.url`: a fresh database holding table t, with the row ('a', 0)."""
    testcase.pg = postgres_server(testcase)
    testcase.url = testcase.pg.new_database(testcase)
    with psycopg.connect(testcase.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO t VALUES ('a', 0)")


class _Forward(Protocol):
    """One side of a proxied TCP flow: what it reads goes to `peer`, unless the proxy is frozen."""

    def __init__(self, proxy: FreezableProxy, peer: _Forward | None = None) -> None:
        self.proxy = proxy
        self.peer = peer
        self.frozen = False
        self.buffered: list[bytes] = []

    def connectionMade(self) -> None:
        self.proxy.sides.append(self)
        if self.peer is None:  # the client's side: connect to the server, buffer until then
            self.transport.pauseProducing()
            factory = ClientFactory.forProtocol(lambda: _Forward(self.proxy, self))
            reactor.connectTCP("127.0.0.1", self.proxy.target, factory)
        else:  # the server's side: pair up
            self.peer.peer = self
            self.peer.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.frozen:
            self.peer.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class FreezableProxy:
    """A loopback TCP proxy whose `freeze()` makes every open flow silently drop what it carries (a NAT that forgot it)."""

    def __init__(self, testcase, target: int) -> None:
        self.target = target
        self.sides: list[_Forward] = []
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Forward(self)), interface="127.0.0.1")
        testcase.addCleanup(self.port.stopListening)

    def freeze(self) -> None:
        for side in self.sides:
            side.frozen = True


class TransactionTests(TestCase):
    async def setUp(self) -> None:
        with_table_t(self)
        self.pool = await open_pool(self, self.pg.url(self.url.rsplit("/", 1)[1], password=SECRET), max_size=4)

    def value(self, k: str = "a"):
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT v FROM t WHERE k = %s", (k,)).fetchone()
        return row and row[0]

    async def test_fires_after_commit_on_a_pool_thread(self):
        threads = []

        def op(conn):
            threads.append(threading.current_thread())
            conn.execute("UPDATE t SET v = 7 WHERE k = 'a'")
            return "done"

        self.assertEqual(await self.pool.run(op), "done")
        self.assertEqual(self.value(), 7)  # committed: another connection sees it at once
        self.assertIsNot(threads[0], threading.main_thread())
        self.assertTrue("voicecall-pg-" in threads[0].name, threads[0].name)

    async def test_error_in_fn_rolls_back_and_passes_through(self):

        class Refused(Exception):
            pass

        def op(conn):
            conn.execute("UPDATE t SET v = 9 WHERE k = 'a'")
            raise Refused()

        with self.assertRaises(Refused):
            await self.pool.run(op)
        self.assertEqual(self.value(), 0)

    async def test_sql_error_is_a_store_error(self):
        with self.assertRaises(StoreError) as caught:
            await self.pool.run(lambda conn: conn.execute("SELECT * FROM no_such_table"))
        self.assertIn("no_such_table", str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))

    async def test_serialization_failure_is_retried(self):
        attempts = []

        def op(conn):
            attempts.append(1)
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            (v,) = conn.execute("SELECT v FROM t WHERE k = 'a'").fetchone()
            if len(attempts) == 1:  # a concurrent writer commits after our snapshot was taken
                with psycopg.connect(self.url, autocommit=True) as other:
                    other.execute("UPDATE t SET v = v + 100 WHERE k = 'a'")
            conn.execute("UPDATE t SET v = %s WHERE k = 'a'", (v + 1,))
            return v + 1

        self.assertEqual(await self.pool.run(op), 101)
        self.assertEqual(len(attempts), 2)
        self.assertEqual(self.value(), 101)

    async def test_backend_terminated_mid_transaction_is_retried(self):
        attempts = []

        def op(conn):
            attempts.append(1)
            conn.execute("INSERT INTO t VALUES (%s, 1) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (f"x{len(attempts)}",))
            if len(attempts) == 1:
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                with psycopg.connect(self.url, autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            conn.execute("SELECT 1")
            return len(attempts)

        self.assertEqual(await self.pool.run(op), 2)
        self.assertIsNone(self.value("x1"))  # the killed attempt left nothing
        self.assertEqual(self.value("x2"), 1)

    def install_commit_sabotage(self):
        """A deferred trigger that terminates its own backend AT COMMIT, once: COMMIT's outcome is unknown."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE sabotage (armed bool NOT NULL)")
            conn.execute("INSERT INTO sabotage VALUES (true)")
            conn.execute(
                "CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF (SELECT armed FROM sabotage) THEN"
                "   PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);"
                " END IF; RETURN NULL; END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER die AFTER UPDATE ON t DEFERRABLE INITIALLY DEFERRED"
                " FOR EACH ROW EXECUTE FUNCTION die_at_commit()"
            )

    async def test_connection_lost_during_commit(self):
        self.install_commit_sabotage()
        attempts = []

        def op(conn):
            attempts.append(1)
            conn.execute("UPDATE t SET v = 5 WHERE k = 'a'")
            if len(attempts) == 3:  # the second run's first attempt also dies at COMMIT; its retry disarms
                conn.execute("UPDATE sabotage SET armed = false")

        with self.assertRaises(CommitUnknownError):
            await self.pool.run(op, retry_ambiguous=False)
        self.assertEqual(len(attempts), 1)
        await self.pool.run(op)  # idempotent: retried after the ambiguous COMMIT
        self.assertEqual(len(attempts), 3)
        self.assertEqual(self.value(), 5)

    async def test_pending_is_bounded(self):
        pool = await open_pool(self, self.url, max_size=1, max_pending=2)
        gate = threading.Event()
        first = pool.run(lambda conn: gate.wait(10))
        second = pool.run(lambda conn: 2)
        with self.assertRaises(StoreBusyError):
            await pool.run(lambda conn: 3)
        gate.set()
        self.assertEqual([await first, await second], [True, 2])
        self.assertEqual(await pool.run(lambda conn: 4), 4)

    async def test_close_waits_for_running_work_then_refuses(self):
        pool = PgPool(reactor, self.url, max_size=2)
        await pool.open()
        gate = threading.Event()
        running = pool.run(lambda conn: (gate.wait(10), conn.execute("UPDATE t SET v = 3 WHERE k = 'a'"))[0])
        closed = pool.close()
        self.assertFalse(closed.called)
        gate.set()
        await closed
        self.assertTrue(await running)
        self.assertEqual(self.value(), 3)
        with self.assertRaises(StoreClosedError):
            await pool.run(lambda conn: 1)


class GroupCommitTests(TestCase):
    """GroupCommit: writes issued while a batch commits share the next transaction."""

    async def setUp(self) -> None:
        with_table_t(self)
        self.pool = await open_pool(self, self.url, max_size=4)
        self.finished: list[list] = []

    def rows(self, query: str):
        with psycopg.connect(self.url) as conn:
            return conn.execute(query).fetchall()

    def value_of(self, k: str):
        return self.rows(f"SELECT v FROM t WHERE k = '{k}'")[0][0]

    def insert(self, k: str):
        def op(conn):
            conn.execute("INSERT INTO t VALUES (%s, txid_current()) ON CONFLICT (k) DO NOTHING", (k,))  # v: the transaction
            return k

        return op

    async def test_batches_share_a_transaction_and_a_failure_stays_alone(self):
        gate = threading.Event()
        group = GroupCommit(self.pool, lambda conn, values: self.finished.append(values))

        def blocked(conn):
            gate.wait(10)
            return "first"

        class Refused(Exception):
            pass

        def refused(conn):
            conn.execute("INSERT INTO t VALUES ('refused', 1)")
            raise Refused()

        first = group.submit(blocked)
        rest = [group.submit(self.insert(f"k{i}")) for i in range(3)]
        rest.append(group.submit(refused))
        rest.append(group.submit(self.insert("k3")))
        rest.append(group.submit(lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)")))  # a database error
        gate.set()
        self.assertEqual(await first, "first")
        results = await DeferredList(rest, consumeErrors=True)
        self.assertEqual([v for ok, v in results if ok], ["k0", "k1", "k2", "k3"])
        self.assertTrue(results[3][1].check(Refused))
        self.assertTrue(results[5][1].check(StoreError))
        self.assertIsInstance(results[5][1].value.__cause__, psycopg.errors.UndefinedTable)
        self.assertEqual(self.finished, [["first"], ["k0", "k1", "k2", "k3"]])
        self.assertEqual(self.rows("SELECT count(DISTINCT v) FROM t WHERE k LIKE 'k%'"), [(1,)])
        self.assertEqual(self.rows("SELECT k FROM t WHERE k = 'refused'"), [])

    async def test_batch_retried_after_commit_lost_applies_once(self):
        TransactionTests.install_commit_sabotage(self)
        group = GroupCommit(self.pool, lambda conn, values: self.finished.append(values))

        attempts = []

        def update(conn):
            attempts.append(1)
            conn.execute("UPDATE t SET v = 5 WHERE k = 'a'")
            if len(attempts) == 2:  # the first attempt dies at COMMIT; its retry disarms
                conn.execute("UPDATE sabotage SET armed = false")
            return "updated"

        gate = threading.Event()
        first = group.submit(lambda conn: gate.wait(10))
        writes = [group.submit(update), group.submit(self.insert("b"))]
        gate.set()
        await first
        self.assertEqual([await d for d in writes], ["updated", "b"])
        self.assertEqual(self.rows("SELECT k FROM t ORDER BY k"), [("a",), ("b",)])
        self.assertEqual(self.value_of("a"), 5)
        self.assertEqual(self.finished[1:], [["updated", "b"]] * 2)  # run again after its COMMIT was lost

    async def test_close_commits_what_was_queued(self):
        pool = PgPool(reactor, self.url, max_size=2)
        await pool.open()
        group = GroupCommit(pool)
        gate = threading.Event()
        first = group.submit(lambda conn: gate.wait(10))
        queued = [group.submit(self.insert(f"q{i}")) for i in range(5)]
        closed = pool.close()
        with self.assertRaises(StoreClosedError):
            await group.submit(self.insert("late"))
        gate.set()
        await closed
        self.assertTrue(await first)
        self.assertEqual([await d for d in queued], [f"q{i}" for i in range(5)])
        self.assertEqual(self.rows("SELECT count(*) FROM t WHERE k LIKE 'q%'"), [(5,)])


class ServerDownTests(TestCase):
    async def test_unreachable_server_is_a_clear_error_without_the_password(self):
        logged = capture_log(self)
        url = f"postgresql://voicecall:{SECRET}@127.0.0.1:{free_port()}/calls"
        pool = PgPool(reactor, url, connect_timeout=1)
        self.assertNotIn(SECRET, repr(pool))
        with self.assertRaises(StoreUnavailableError) as caught:
            await pool.open()
        message = str(caught.exception)
        self.assertIn("voicecall@127.0.0.1:", message)
        self.assertIn("/calls", message)
        self.assertNotIn(SECRET, message)
        self.assertFalse(any(SECRET in line for line in logged))
        self.assertEqual(describe(url).split("@")[0], "voicecall")

    async def test_server_stopped_then_restarted(self):
        logged = capture_log(self)
        pg = private_postgres_server(self)
        url = pg.new_database()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (k int PRIMARY KEY)")
        name = url.rsplit("/", 1)[1]
        pool = await open_pool(self, pg.url(name, password=SECRET), max_size=3, acquire_timeout=1, connect_timeout=1)
        await pool.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        pg.stop()
        with self.assertRaises(StoreError) as caught:
            await pool.run(lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
        self.assertIn(pool.server, str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))
        pg.restart()

        async def write():
            try:
                await pool.run(lambda conn: conn.execute("INSERT INTO t VALUES (3) ON CONFLICT DO NOTHING"))
            except StoreError:
                return False
            return True

        await eventually(write, 30, "a write after the server came back")
        with psycopg.connect(url) as conn:
            self.assertEqual([r[0] for r in conn.execute("SELECT k FROM t ORDER BY k")], [1, 3])
        self.assertFalse(any(SECRET in line for line in logged))


class ListenTests(TestCase):
    async def test_notify_delivered_on_the_reactor_thread_after_commit(self):
        pg = postgres_server(self)
        pool = await open_pool(self, pg.new_database(self))
        got: list[tuple[str, bool]] = []
        reconnects = []
        listener = pool.listen("chan_a", lambda p: got.append((p, threading.current_thread() is threading.main_thread())), lambda: reconnects.append(1))
        self.addCleanup(listener.stop)
        await eventually(lambda: reconnects, 10, "the first connect")

        class Abort(Exception):
            pass

        def rolled_back(conn):
            notify(conn, "chan_a", "never")
            raise Abort()

        with self.assertRaises(Abort):
            await pool.run(rolled_back)
        await pool.run(lambda conn: notify(conn, "chan_a", "42"))
        await eventually(lambda: got, 10, "the notification")
        self.assertEqual(got, [("42", True)])

    async def test_reconnects_and_says_so(self):
        pg = postgres_server(self)
        url = pg.new_database(self)
        pool = await open_pool(self, url)
        got: list[str] = []
        reconnects = []
        listener = pool.listen("chan_b", got.append, lambda: reconnects.append(1))
        self.addCleanup(listener.stop)
        await eventually(lambda: listener.connected and reconnects, 10, "the first connect")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = current_database()")
        await eventually(lambda: len(reconnects) == 2, 10, "on_reconnect after the listener's backend was terminated")
        await pool.run(lambda conn: notify(conn, "chan_b", "after"))
        await eventually(lambda: got == ["after"], 10, "a notification on the new connection")

    async def test_silently_dead_connection_is_probed_and_replaced(self):
        """
        A flow dropped without a FIN or RST (a NAT or load balancer timing it out) leaves the
        LISTEN connection waiting forever: after listen_probe_after of silence the listener
        asks SELECT 1, gets no answer within listen_probe_timeout, reconnects and says so.
        """
        pg = postgres_server(self)
        url = pg.new_database(self)
        proxy = FreezableProxy(self, pg.port)
        proxied = url.replace(f":{pg.port}/", f":{proxy.port.getHost().port}/")
        pool = await open_pool(self, proxied, listen_probe_after=0.5, listen_probe_timeout=1.0)
        direct = await open_pool(self, url)
        got: list[str] = []
        reconnects = []
        listener = pool.listen("chan_d", got.append, lambda: reconnects.append(1))
        self.addCleanup(listener.stop)
        await eventually(lambda: listener.connected and reconnects, 10, "the first connect")
        await direct.run(lambda conn: notify(conn, "chan_d", "before"))
        await eventually(lambda: got == ["before"], 10, "a notification through the proxy")
        proxy.freeze()
        await eventually(lambda: len(reconnects) == 2, 10, "on_reconnect after the silent connection was probed")
        await direct.run(lambda conn: notify(conn, "chan_d", "after"))
        await eventually(lambda: got == ["before", "after"], 10, "a notification on the new connection")

    async def test_connections_keep_alive(self):
        """Every connection has TCP keepalives and a TCP user timeout (libpq's, unless the URL sets its own)."""
        pg = postgres_server(self)
        url = pg.new_database(self)

        def options(conn) -> tuple[int, int, int]:
            with socket.socket(fileno=os.dup(conn.fileno())) as s:
                return (
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )

        pool = await open_pool(self, url)
        keepalive, idle, user_timeout = await pool.run(options)
        self.assertEqual((keepalive, idle), (1, KEEPALIVES["keepalives_idle"]))
        self.assertEqual(user_timeout, KEEPALIVES["tcp_user_timeout"])
        pool = await open_pool(self, url + "?keepalives_idle=7")
        self.assertEqual((await pool.run(options))[1], 7)

    async def test_stop_ends_the_thread(self):
        pg = postgres_server(self)
        pool = await open_pool(self, pg.new_database(self))
        before = threading.active_count()
        listener = pool.listen("chan_c", lambda p: None, lambda: None)
        await eventually(lambda: listener.connected, 10, "connected")
        stopped: Deferred = listener.stop()
        await DeferredList([stopped])
        self.assertFalse(listener.connected)
        await eventually(lambda: threading.active_count() <= before, 5, "the listener thread to end")
