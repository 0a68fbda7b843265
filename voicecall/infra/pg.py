# -*- test-case-name: tests.test_pg -*-
"""
PostgreSQL access for the reactor: a bounded connection pool on threads of its own, and LISTEN.

    pool = PgPool(reactor, "postgresql://voicecall:secret@db.example/voicecall", max_size=8)
    await pool.open()                               # fails with StoreError if unreachable
    n = await pool.run(lambda conn: conn.execute("SELECT count(*) FROM calls").fetchone()[0])
    listener = pool.listen("voicecall_events", on_notify, on_reconnect)
    await listener.stop(); await pool.close()

`run(fn)`: ``fn(conn)`` runs in ONE transaction on a thread of the pool's own ThreadPool (never
the reactor thread, never the reactor's default pool, which DNS uses); its Deferred fires on the
reactor thread with fn's result only once COMMIT has returned, so whatever acknowledges a change
after it fires acknowledges a durable change. Failures:

- serialization failures (40001) and deadlocks (40P01) are retried with a short, jittered,
  exponential backoff, up to `max_retries` times (then StoreError);
- a connection that breaks (the server restarted, the backend was terminated, the network
  dropped) is discarded by the pool, and the transaction is retried on another connection, also
  up to `max_retries` times. If it broke BEFORE COMMIT was sent the retry is plainly safe (the
  server rolled the transaction back). If it broke WHILE COMMIT was in flight the outcome is
  unknown: the transaction may or may not have been committed. `run` retries then too, so every
  ``fn`` given to `run` MUST BE IDEMPOTENT, i.e. running it again after its own earlier run was
  committed changes nothing more: upserts keyed by a natural key (INSERT ... ON CONFLICT DO UPDATE
  with the full new value, never ``x = x + 1``), appends keyed by a key the caller chose (INSERT
  ... ON CONFLICT DO NOTHING), deletes by key. A caller that cannot be idempotent passes
  ``retry_ambiguous=False`` and gets `CommitUnknownError` instead;
- the pool cannot hand out a connection within `acquire_timeout` (server down, all busy):
  `StoreUnavailableError`, naming the server, never the password;
- anything else: StoreError carrying the server's message (the original exception chained).
  Errors raised by ``fn`` itself that are not database errors are passed through unchanged (the
  store raises its domain errors, NotOwnerError etc., from inside fn).

Bounds: at most `max_size` connections and as many threads; at most `max_pending` operations
queued or running (more fail at once with StoreBusyError); retries as above.

Group commit, for writes, is `GroupCommit` (infra/pgcommit.py) on a pool: ops submitted while a
batch commits run together in the next transaction (one COMMIT for all), each failing alone;
same retry rules as `run`.

`listen(channel, on_notify, on_reconnect)`: a dedicated autocommit connection in a thread of its
own, blocked on ``conn.notifies(timeout=...)`` (no polling of the database: the timeout only
lets the thread notice it was stopped). Each payload is delivered on the reactor thread
(``reactor.callFromThread(on_notify, payload)``). If the connection breaks, the thread
reconnects by itself with backoff (0.1 s doubling to 5 s), LISTENs again and then calls
``on_reconnect()`` on the reactor thread, as it does after the first connect: NOTIFYs sent while
it was away are lost, so the listener re-reads the state it follows there.
A connection that is silently dead (a NAT or load balancer dropped the idle flow: no error ever
comes) is found by probing: after `listen_probe_after` seconds without a notification the thread
sends ``SELECT 1``; no answer within `listen_probe_timeout` and it shuts the socket down and
reconnects as above.

TCP: every connection (pool and LISTEN) gets libpq's keepalives and ``tcp_user_timeout``
(`KEEPALIVES`), unless the URL sets them itself, so a dead flow also fails the transactions on it
within about a minute instead of the OS's 2 hours.

`notify(conn, channel, payload)` is the sending side, for use INSIDE ``fn`` of `run`: it is just
``SELECT pg_notify(channel, payload)``, so the notification is sent by the server only if and
when that transaction commits (never for a rolled-back one), and listeners that receive it can
read the committed rows.

Secrets: the URL's password never appears in a log line, an error message or a repr; the server
is named as ``user@host:port/dbname``.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from voicecall.infra.dbwriter import StoreBusyError, StoreClosedError, StoreError

T = TypeVar("T")

_log = Logger()

DEFAULT_MAX_SIZE = 8
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_RETRIES = 5
LISTEN_WAKEUP = 0.5  # how soon a stopped listener's thread notices (no database traffic)
LISTEN_BACKOFF = (0.1, 5.0)
LISTEN_PROBE_AFTER = 30.0  # a LISTEN connection silent this long is asked SELECT 1 ...
LISTEN_PROBE_TIMEOUT = 10.0  # ... and replaced if no answer comes within this
#: libpq's TCP settings for every connection, unless the URL sets its own: a flow that a NAT,
#: firewall or load balancer dropped without a word is found dead in about a minute, not 2 hours.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,  # seconds idle before the first probe
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms that sent data may stay unacknowledged
}


class StoreUnavailableError(StoreError):
    """The PostgreSQL server cannot be reached (or no connection freed up in time)."""


class CommitUnknownError(StoreError):
    """The connection broke while COMMIT was in flight, and the caller asked not to retry."""


def describe(url: str) -> str:
    """``user@host:port/dbname`` for `url` (a libpq URL or key=value string): no password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparseable PostgreSQL URL"
    user = info.get("user") or "(default user)"
    host = info.get("host") or "(local socket)"
    port = info.get("port") or "5432"
    dbname = info.get("dbname") or "(default database)"
    return f"{user}@{host}:{port}/{dbname}"


def redactor(url: str) -> Callable[[str], str]:
    """A function that blanks `url`'s password (and the URL itself) out of a text."""
    try:
        password = conninfo_to_dict(url).get("password") or ""
    except psycopg.ProgrammingError:
        password = ""

    def redact(text: str) -> str:
        text = text.replace(url, describe(url))
        return text.replace(password, "***") if password else text

    return redact


def notify(conn: psycopg.Connection, channel: str, payload: str) -> None:
    """Send NOTIFY `channel` `payload` when `conn`'s transaction commits (use inside `PgPool.run`)."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class PgPool:
    """A psycopg connection pool driven from the reactor; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = DEFAULT_MAX_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_retries: int = DEFAULT_MAX_RETRIES,
        connect_timeout: float = 10.0,
        acquire_timeout: float = 10.0,
        application_name: str = "voicecall",
        listen_probe_after: float = LISTEN_PROBE_AFTER,
        listen_probe_timeout: float = LISTEN_PROBE_TIMEOUT,
    ) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self._reactor = reactor
        self._url = url
        self.server = describe(url)
        self._redact = redactor(url)
        self._min_size = min_size
        self._max_size = max_size
        self._max_pending = max_pending
        self._max_retries = max_retries
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._listen_probe = (listen_probe_after, listen_probe_timeout)
        try:
            in_url = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            in_url = {}
        self._connect_kwargs = {
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": application_name,
            **{key: value for key, value in KEEPALIVES.items() if key not in in_url},
        }
        self._threads = ThreadPool(minthreads=0, maxthreads=max_size, name=f"voicecall-pg-{id(self):x}")
        self._pool: ConnectionPool | None = None
        self._pending = 0
        self._idle: list[Deferred[None]] = []
        self._listeners: set[Listener] = set()
        self._open = False

    def __repr__(self) -> str:
        return f"<PgPool {self.server} open={self._open} pending={self._pending}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Start the threads and connect `min_size` connections; StoreUnavailableError if unreachable."""
        if self._open:
            return succeed(None)
        self._threads.start()
        d = self._dispatch(self._open_pool)

        def opened(pool: ConnectionPool) -> None:
            self._pool = pool
            self._open = True
            _log.info("PostgreSQL store connected: {server}", server=self.server)

        def failed(failure):
            self._threads.stop()
            return failure

        return d.addCallbacks(opened, failed)

    def _open_pool(self) -> ConnectionPool:
        pool = ConnectionPool(
            self._url,
            kwargs={**self._connect_kwargs, "autocommit": False},
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            check=ConnectionPool.check_connection,
            timeout=self._acquire_timeout,
            max_waiting=self._max_pending,
            reconnect_timeout=max(self._connect_timeout, 30.0),
            name=f"voicecall-{id(self):x}",
        )
        try:
            pool.open(wait=True, timeout=self._connect_timeout)
        except PoolTimeout:
            pool.close(timeout=0)
            raise StoreUnavailableError(self._unreachable(self._probe())) from None
        return pool

    def _dispatch(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` on one of the pool's threads; the result is delivered on the reactor thread."""
        return deferToThreadPool(self._reactor, self._threads, fn, *args)

    def _probe(self) -> str:
        """Why a connection fails (one direct attempt, for the error message)."""
        try:
            psycopg.connect(self._url, **self._connect_kwargs).close()
        except psycopg.Error as e:
            return self._redact(str(e).strip())
        return "no connection within the time allowed"

    def _unreachable(self, reason: str) -> str:
        return f"cannot connect to PostgreSQL {self.server}: {reason}"

    def close(self) -> Deferred[None]:
        """Refuse new work, let the running and queued operations finish, stop listeners, disconnect."""
        if not self._open:
            return succeed(None)
        self._open = False
        waits = [listener.stop() for listener in list(self._listeners)]
        if self._pending:
            idle: Deferred[None] = Deferred()
            self._idle.append(idle)
            waits.append(idle)
        pool = self._pool
        self._pool = None

        def disconnect(_: object) -> Deferred[None]:
            return self._dispatch(pool.close)

        def stop_threads(result: object) -> object:
            self._threads.stop()
            return result

        return gatherResults(waits).addCallback(disconnect).addBoth(stop_threads).addCallback(lambda _: None)

    # -- transactions -------------------------------------------------------------------------

    def run(self, fn: Callable[[psycopg.Connection], T], *, retry_ambiguous: bool = True) -> Deferred[T]:
        """Run ``fn(conn)`` in one transaction on a pool thread; fire with its result after COMMIT."""
        refused = self._refusal()
        if refused is not None:
            return fail(refused)
        return self._track(self._dispatch(self._transact, self._pool, fn, retry_ambiguous))

    def _refusal(self) -> StoreError | None:
        if not self._open:
            return StoreClosedError(f"the PostgreSQL store {self.server} is not open")
        if self._pending >= self._max_pending:
            return StoreBusyError(f"{self._pending} operations already wait for PostgreSQL {self.server}")
        return None

    def _track(self, d: Deferred[T]) -> Deferred[T]:
        """Count `d` as pending until it fires (`close` waits for the pending work)."""
        self._pending += 1

        def done(result: T) -> T:
            self._pending -= 1
            if not self._pending:
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)
            return result

        return d.addBoth(done)

    def _transact(self, pool: ConnectionPool, fn: Callable[[psycopg.Connection], T], retry_ambiguous: bool) -> T:
        # Runs on this pool's own worker threads (`_dispatch`), never the reactor's: blocking
        # here, including the backoff sleep between retries, holds one worker, not the reactor.
        attempt = 0
        while True:
            committing = False
            try:
                with pool.connection() as conn:
                    with conn.transaction():
                        result = fn(conn)
                        committing = True
                    return result
            except (pgerrors.SerializationFailure, pgerrors.DeadlockDetected) as e:
                reason = f"{type(e).__name__}: {self._redact(str(e).strip())}"
            except PoolTimeout as e:
                raise StoreUnavailableError(self._unreachable(
                    f"no connection within {self._acquire_timeout:g}s ({self._redact(str(e))})"
                )) from None
            except TooManyRequests:
                raise StoreBusyError(f"too many operations wait for a PostgreSQL connection ({self.server})") from None
            except psycopg.OperationalError as e:
                if not connection_lost(e):
                    raise StoreError(f"PostgreSQL {self.server}: {self._redact(str(e).strip())}") from e
                if committing and not retry_ambiguous:
                    raise CommitUnknownError(
                        f"the connection to PostgreSQL {self.server} broke during COMMIT; the outcome is unknown"
                    ) from e
                reason = f"connection lost{' during COMMIT' if committing else ''}: {self._redact(str(e).strip())}"
            except psycopg.Error as e:
                raise self._error(e) from e
            attempt += 1
            if attempt > self._max_retries:
                raise StoreError(f"PostgreSQL {self.server}: gave up after {attempt} attempts ({reason})")
            _log.info("PostgreSQL transaction retried ({attempt}/{retries}): {reason}", attempt=attempt, retries=self._max_retries, reason=reason)
            time.sleep(min(0.5, 0.01 * 2**attempt) * random.uniform(0.5, 1.5))

    def _error(self, e: Exception) -> Exception:
        """What `run` raises for `e`, raised by a transaction's statement: a database error is a StoreError."""
        if not isinstance(e, psycopg.Error):
            return e
        try:
            raise StoreError(f"PostgreSQL {self.server}: {self._redact(str(e).strip())}") from e
        except StoreError as error:  # chained as `raise ... from` chains it
            return error

    # -- notifications ------------------------------------------------------------------------

    def listen(self, channel: str, on_notify: Callable[[str], object], on_reconnect: Callable[[], object]) -> Listener:
        """LISTEN on `channel` on a dedicated connection; see the module docstring."""
        if not self._open:
            raise StoreClosedError(f"the PostgreSQL store {self.server} is not open")
        listener = Listener(self, channel, on_notify, on_reconnect)
        self._listeners.add(listener)
        listener.start()
        return listener

    def _connect_listener(self) -> psycopg.Connection:
        return psycopg.connect(self._url, autocommit=True, **self._connect_kwargs)


def connection_lost(e: psycopg.OperationalError) -> bool:
    """Whether `e` means the connection is gone (rather than a statement failing on a live one)."""
    if isinstance(e, (pgerrors.AdminShutdown, pgerrors.CrashShutdown, pgerrors.CannotConnectNow)):
        return True
    return e.sqlstate is None or e.sqlstate.startswith("08")


class Listener:
    """One LISTEN connection and its thread; `stop()` ends both."""

    def __init__(self, pool: PgPool, channel: str, on_notify: Callable[[str], object], on_reconnect: Callable[[], object]) -> None:
        self._pool = pool
        self.channel = channel
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._stopping = threading.Event()
        self._severed = threading.Event()
        self._stopped: Deferred[None] = Deferred()
        self._thread = threading.Thread(target=self._loop, name=f"voicecall-pg-listen-{channel}", daemon=True)
        self.connected = False

    def __repr__(self) -> str:
        return f"<Listener {self.channel!r} on {self._pool.server} connected={self.connected}>"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Stop listening; fires once the thread has closed its connection (within LISTEN_WAKEUP)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._pool._listeners.discard(self)
        d: Deferred[None] = Deferred()
        self._stopped.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _loop(self) -> None:
        reactor = self._pool._reactor
        backoff = LISTEN_BACKOFF[0]
        try:
            while not self._stopping.is_set():
                try:
                    conn = self._pool._connect_listener()
                except psycopg.Error as e:
                    self._wait(backoff, f"cannot connect: {self._pool._redact(str(e).strip())}")
                    backoff = min(backoff * 2, LISTEN_BACKOFF[1])
                    continue
                try:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.connected = True
                    backoff = LISTEN_BACKOFF[0]
                    reactor.callFromThread(self._on_reconnect)
                    heard = time.monotonic()
                    while not self._stopping.is_set():
                        for n in conn.notifies(timeout=LISTEN_WAKEUP):
                            heard = time.monotonic()
                            reactor.callFromThread(self._on_notify, n.payload)
                            if self._stopping.is_set():
                                break
                        if time.monotonic() - heard >= self._pool._listen_probe[0]:
                            self._probe(conn)
                            heard = time.monotonic()
                except psycopg.Error as e:
                    self.connected = False
                    reason = "no answer to a probe" if self._severed.is_set() else "connection lost"
                    self._wait(backoff, f"{reason}: {self._pool._redact(str(e).strip())}")
                    backoff = min(backoff * 2, LISTEN_BACKOFF[1])
                finally:
                    self.connected = False
                    conn.close()
        finally:
            reactor.callFromThread(self._stopped.callback, None)

    def _probe(self, conn: psycopg.Connection) -> None:
        """
        SELECT 1 on the silent `conn`. A flow dropped on the way (NAT, load balancer) answers
        nothing, not even an error, so a watchdog shuts the socket down if no answer comes within
        the probe timeout: the query then fails, and the loop reconnects.
        """
        self._severed.clear()
        answered = threading.Event()
        fd = conn.fileno()

        def watch() -> None:
            if not answered.wait(self._pool._listen_probe[1]):
                self._sever(fd)

        watchdog = threading.Thread(target=watch, name=f"voicecall-pg-probe-{self.channel}", daemon=True)
        watchdog.start()
        try:
            conn.execute("SELECT 1")
        finally:
            answered.set()
            watchdog.join()  # a watchdog already severing finishes before `conn` may be closed

    def _sever(self, fd: int) -> None:
        """Shut down the socket `fd` of a connection that did not answer its probe (not closing `fd`: libpq owns it)."""
        self._severed.set()
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the connection failed on its own

    def _wait(self, seconds: float, reason: str) -> None:
        if self._stopping.is_set():
            return
        _log.warn(
            "PostgreSQL LISTEN {channel} on {server}: {reason}; retrying in {seconds:.1f}s",
            channel=self.channel, server=self._pool.server, reason=reason, seconds=seconds,
        )
        self._stopping.wait(seconds)
