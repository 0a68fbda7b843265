"""
A real PostgreSQL server for the tests, started by the test process itself.

    from tests.pgserver import postgres_server, private_postgres_server

    pg = postgres_server(self)            # the process's shared server (skips if none installed)
    url = pg.new_database(self)           # a fresh empty database, dropped by a cleanup
    url = pg.url(dbname, password="x")    # postgresql://voicecall:x@127.0.0.1:PORT/dbname

    pg = private_postgres_server(self)    # a server of this test alone, for stop()/kill()/restart()
    pg.kill()                             # SIGKILL the postmaster and every backend (a crash)
    pg.restart()                          # start again: same data directory, same port

One shared server per test process (trial -j2 runs two workers: each starts its own, on its own
port and directory, so they never see each other's databases); it is started on first use and
stopped when the process exits (atexit). Private servers are stopped by a cleanup of the test
that made them. `initdb` runs once per process; every server starts from a copy of that
template directory, so a private server costs one postmaster start (~0.3 s), not an initdb.

The server is the one production runs: fsync and synchronous_commit on (the store's durability
is under test), listening on 127.0.0.1 on a free port, with its unix socket in its own temporary
directory. Authentication is `trust` for the superuser `voicecall`, so any password in a URL is
accepted (the tests that check a password never leaks put one there).

initdb and postgres refuse to run as root. When the tests run as root (CI does), the directory
is given to the `postgres` user (or `nobody`) and the programs are run through
`setpriv --reuid --regid --clear-groups`.

The binaries are looked for on PATH, then in /usr/lib/postgresql/*/bin (newest first). If none is
found, `postgres_server()` skips the test with the reason, and the run ends with one line on
stderr: "PostgreSQL not found: N store/cluster tests skipped; install postgresql".
"""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional
from unittest import SkipTest

import psycopg
from psycopg import sql
from twisted.internet.defer import maybeDeferred

from voicecall.infra.pg import PgPool

SUPERUSER = "voicecall"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

_PROGRAMS = ("initdb", "postgres")


def find_postgres_bin() -> Optional[str]:
    """The directory holding initdb and postgres: PATH first, then /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        directory = os.path.dirname(os.path.realpath(on_path))
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in _PROGRAMS):
            return directory

    def version(path: str) -> tuple:
        name = path.split(os.sep)[-2]
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in _PROGRAMS):
            return directory
    return None


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> Optional[pwd.struct_passwd]:
    """The unprivileged account to run PostgreSQL as, when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def _chown_tree(path: str, account: Optional[pwd.struct_passwd]) -> None:
    if account is None:
        return
    for root, _dirs, files in os.walk(path):
        os.chown(root, account.pw_uid, account.pw_gid)
        for name in files:
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)


def _argv(account: Optional[pwd.struct_passwd], argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if account is None:
        # the server dies with the test process, even one that ends without running atexit
        return [setpriv, "--pdeathsig=KILL", *argv] if setpriv else argv
    if setpriv:
        return [
            setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups",
            "--pdeathsig=KILL", *argv,
        ]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", account.pw_name, "--", *argv]
    raise RuntimeError("running as root and neither setpriv nor runuser is available to drop privileges")


class _Installation:
    """The binaries, the account, and one initdb'd template data directory for this process."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.account = _run_as()
        self.base = tempfile.mkdtemp(prefix=f"voicecall-pg-{os.getpid()}-")
        os.chmod(self.base, 0o755)
        self.template = os.path.join(self.base, "template")
        self._counter = itertools.count(1)
        _chown_tree(self.base, self.account)
        result = subprocess.run(
            _argv(self.account, [
                os.path.join(bindir, "initdb"), "-D", self.template, "-U", SUPERUSER, "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            ]),
            cwd=self.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}")

    def new_directory(self) -> str:
        """A fresh server directory: `data` (a copy of the template) and the unix socket beside it."""
        directory = os.path.join(self.base, f"server-{next(self._counter)}")
        os.mkdir(directory)
        shutil.copytree(self.template, os.path.join(directory, "data"), symlinks=True)
        _chown_tree(directory, self.account)
        os.chmod(os.path.join(directory, "data"), 0o700)
        return directory

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class PostgresServer:
    """One postmaster on 127.0.0.1:`port`, its data and socket under `directory`."""

    def __init__(self, installation: _Installation):
        self._installation = installation
        self.directory = installation.new_directory()
        self.datadir = os.path.join(self.directory, "data")
        self.logfile = os.path.join(self.directory, "postgres.log")
        self.port = _free_port()
        self._process: Optional[subprocess.Popen] = None
        self._databases = itertools.count(1)
        _servers.add(self)
        self.start()

    # -- addresses ------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", *, password: Optional[str] = None) -> str:
        auth = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        """A plain autocommit connection (for test setup and for sabotage: pg_terminate_backend)."""
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def new_database(self, testcase=None) -> str:
        """Create an empty database and return its URL; with a testcase, drop it in a cleanup."""
        name = f"vc_{os.getpid()}_{next(self._databases)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        if testcase is not None:
            testcase.addCleanup(self.drop_database, name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not self.running:
            return
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        argv = _argv(self._installation.account, [
            os.path.join(self._installation.bindir, "postgres"), "-D", self.datadir,
            "-h", "127.0.0.1", "-p", str(self.port), "-k", self.directory,
            "-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "max_connections=200",
            "-c", "shared_buffers=16MB", "-c", "logging_collector=off", "-c", "log_min_messages=warning",
        ])
        log = open(self.logfile, "ab")
        try:
            # its own session: kill() takes the postmaster and every backend down at once
            self._process = subprocess.Popen(argv, cwd=self.directory, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT:g}s:\n{self.log_tail()}") from e
                time.sleep(0.05)

    def stop(self) -> None:
        """A clean, fast shutdown (SIGINT): clients are disconnected, committed data is kept."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """
        A crash: SIGKILL to the postmaster and every process it started (each backend is in a
        session of its own, so not in the postmaster's process group; the postmaster is stopped
        first so it forks no more). Committed data survives (fsync).
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        children: list[int] = []
        try:
            os.kill(process.pid, signal.SIGSTOP)
            children = list(_children(process.pid))
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        # SIGKILL is delivered asynchronously: return only once every backend has died (exited
        # or a zombie), as after a real crash nothing of the server runs any more.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.01)

    def restart(self) -> None:
        """Start again after stop() or kill(): same data, same port (crash recovery runs if killed)."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        _servers.discard(self)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


# -- the process-wide state ---------------------------------------------------------------------

_installation: Optional[_Installation] = None
_shared: Optional[PostgresServer] = None
_servers: set[PostgresServer] = set()
_skipped = 0
_NOT_FOUND = "PostgreSQL not found (no initdb on PATH or in /usr/lib/postgresql/*/bin); install postgresql"


def _install() -> _Installation:
    global _installation
    if _installation is None:
        bindir = find_postgres_bin()
        if bindir is None:
            global _skipped
            _skipped += 1
            raise SkipTest(_NOT_FOUND)
        _installation = _Installation(bindir)
    return _installation


def postgres_server(testcase=None) -> PostgresServer:
    """The shared server of this test process, started on first use; skips if none is installed."""
    global _shared
    installation = _install()
    if _shared is None or not _shared.running:
        if _shared is not None:
            _shared.destroy()
        _shared = PostgresServer(installation)
    return _shared


def private_postgres_server(testcase) -> PostgresServer:
    """A server for this test alone (to stop, kill and restart), destroyed by a cleanup."""
    server = PostgresServer(_install())
    testcase.addCleanup(server.destroy)
    return server


def _at_exit() -> None:
    for server in list(_servers):
        server.destroy()
    if _installation is not None:
        _installation.remove()
    if _skipped:
        sys.stderr.write(f"\nPostgreSQL not found: {_skipped} store/cluster tests skipped; install postgresql\n")
        sys.stderr.flush()


atexit.register(_at_exit)


class SynchronousPgPool(PgPool):
    """
    A PgPool that runs each transaction at once in the calling thread (same retries, same
    errors): the store contract tests drive the PostgreSQL store from SynchronousTestCase with
    it, as they drive the SQLite store with SynchronousWriter. The threaded dispatch itself is
    tested in tests/test_pg.py.
    """

    def __init__(self, url: str, **kwargs) -> None:
        super().__init__(None, url, **kwargs)

    def _dispatch(self, fn, *args):
        return maybeDeferred(fn, *args)
