"""
tests/pgserver.py: the real PostgreSQL the store and cluster tests run against.
"""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg
from twisted.trial.unittest import SynchronousTestCase

from tests import pgserver
from tests.pgserver import postgres_server, private_postgres_server

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


class SharedServerTests(SynchronousTestCase):
    def test_fresh_databases_are_isolated(self):
        pg = postgres_server(self)
        first, second = pg.new_database(self), pg.new_database(self)
        self.assertNotEqual(first, second)
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
        with psycopg.connect(second, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('t')").fetchone()[0]
        self.assertIsNone(exists)

    def test_durability_settings_and_loopback(self):
        pg = postgres_server(self)
        with pg.connect() as conn:
            settings = dict(conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('fsync', 'synchronous_commit', 'listen_addresses', 'unix_socket_directories')"
            ).fetchall())
            user = conn.execute("SELECT current_user").fetchone()[0]
        self.assertEqual(settings["fsync"], "on")
        self.assertEqual(settings["synchronous_commit"], "on")
        self.assertEqual(settings["listen_addresses"], "127.0.0.1")
        self.assertEqual(settings["unix_socket_directories"], pg.directory)
        self.assertEqual(user, "voicecall")

    def test_never_runs_as_root(self):
        pg = postgres_server(self)
        with pg.connect() as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.assertNotEqual(os.stat(f"/proc/{pid}").st_uid, 0)

    def test_password_in_url_is_accepted(self):
        pg = postgres_server(self)
        with psycopg.connect(pg.url("postgres", password="hunter2")) as conn:
            self.assertEqual(conn.execute("SELECT 1").fetchone()[0], 1)

    def test_dropped_with_the_test(self):
        pg = postgres_server(self)
        url = pg.new_database()
        name = url.rsplit("/", 1)[1]
        pg.drop_database(name)
        with pg.connect() as conn:
            self.assertIsNone(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone())


class PrivateServerTests(SynchronousTestCase):
    def test_kill_then_restart_keeps_committed_data(self):
        pg = private_postgres_server(self)
        self.assertNotEqual(pg.port, postgres_server(self).port)
        url = pg.new_database()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        held = psycopg.connect(url, autocommit=True)
        self.addCleanup(held.close)
        backend = held.execute("SELECT pg_backend_pid()").fetchone()[0]
        pg.kill()
        self.assertFalse(pg.running)
        self.assertFalse(alive(backend), "a backend survived kill()")  # each backend has a session of its own
        with self.assertRaises(psycopg.OperationalError):
            held.execute("SELECT 1")
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        pg.restart()
        with psycopg.connect(url) as conn:
            self.assertEqual(conn.execute("SELECT x FROM t").fetchall(), [(42,)])

    def test_stop_then_restart(self):
        pg = private_postgres_server(self)
        url = pg.new_database()
        pg.stop()
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        pg.restart()
        with psycopg.connect(url) as conn:
            self.assertEqual(conn.execute("SELECT 1").fetchone()[0], 1)


class NotInstalledTests(SynchronousTestCase):
    def test_skips_and_says_so_loudly(self):
        """Without a server binary: SkipTest with the reason, and one line on stderr at exit."""
        script = (
            "import unittest\n"
            "from tests import pgserver\n"
            "pgserver.find_postgres_bin = lambda: None\n"
            "for _ in range(3):\n"
            "    try:\n"
            "        pgserver.postgres_server()\n"
            "    except unittest.SkipTest as e:\n"
            "        print('skip:', e)\n"
        )
        result = subprocess.run([sys.executable, "-c", script], cwd=CHECKOUT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.count("skip: PostgreSQL not found"), 3, result.stdout)
        self.assertIn("PostgreSQL not found: 3 store/cluster tests skipped; install postgresql", result.stderr)

    def test_finds_the_installed_server(self):
        if pgserver.find_postgres_bin() is None:
            self.skipTest("no PostgreSQL installed here")
        self.assertTrue(os.access(os.path.join(pgserver.find_postgres_bin(), "postgres"), os.X_OK))
