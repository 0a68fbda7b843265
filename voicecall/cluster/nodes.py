# -*- test-case-name: tests.test_cluster_live -*-
"""
Node liveness: this node's row in the store's ``nodes`` table, kept fresh by heartbeats.

A node registers when it starts (after the store opened, before it restores its calls), beats
every ``lease_seconds / 3`` and marks its row stopped when it stops cleanly. Every time is the
DATABASE's clock (``now()``), so nodes whose clocks disagree still agree on who is alive: a node
is alive while its ``heartbeat_at`` is less than ITS OWN ``lease_seconds`` old (kept in its row:
nodes configured with different leases judge each other alike; `alive_sql`), and dead after (its
live calls are then adopted, see adopt.py). A clean stop gives the lease up at once (``heartbeat_at``
moved back by a lease, ``pid`` cleared: "stopped"), so its calls are adoptable at once; the row
stays, because callbacks signed for its URL keep coming (a Plivo call's hangup_url cannot be
moved; a ringing Twilio call is not re-pointed): urls.py accepts the URL of every row. A row
that is not alive is deleted (by any live node's beat) once it owns no live call and its last
beat is `keep_seconds` old (tap.py: maxDurationSeconds and a lease, after which every call it
placed or adopted has ended).

Heartbeats and the check for calls taken from this node run on a pool of their own (tap.py: one
connection, one thread), never behind the store's queue of webhook writes: a burst of writes
must not let a healthy node's lease run out. Each beat, in one transaction, refreshes the row,
lists the calls this node runs that another node owns now (it was taken for dead, e.g. paused or
cut off for longer than the lease) and prunes dead rows; the taken calls are released
(`on_taken`) before the node counts itself live again.

Self-fencing: `fenced` is true while the last successful beat STARTED (monotonic clock) more than
``lease - lease/4`` ago. Peers may adopt this node's calls a lease after its last beat, so a
node that was paused (SIGSTOP, a VM pause) or cut off from the database stops acting at the
carrier for its calls before that can happen (tap.py wraps the carrier and the voice in
`FencedCarrier`), and starts again only after a beat that also released what was taken.

`steady` is true once this node's beats have succeeded for a whole lease with none failing and
no fenced gap between two of them (since its registration, or since the last failure), and, after
a gap, for as long again as the gap lasted (at most `MAX_CATCH_UP`): only then does it take a
silent (not stopped) node's calls (adopt.py). A database outage stops every node's beats at once;
without this, the first node back would find the others' beats older than the lease and take
their calls while they reconnect. The extra wait covers the others' reconnection: the connection
pool retries with a backoff that doubles (1, 2, 4... s), so a node may find the database back
as late as about the outage's length after it came back (measured: 10 s after a 7.5 s outage).

Joins and leaves are announced on the NOTIFY channel ``voicecall_nodes`` (`NODES_CHANNEL`) with a
JSON payload ``{"node": <id>, "event": "join"|"leave", "url": <its publicUrl>}``, sent when the
row's transaction commits. The registry LISTENs to it and calls ``on_change(event)`` for another
node's join or leave (and after each (re)connect of the LISTEN, with ``"reconnect"``, since
notifications sent meanwhile are lost); each heartbeat calls ``on_beat()``. tap.py wires both to
the adopter's sweep, so a dead node's calls are taken at the first beat after its lease ran out,
a stopped node's at once.

One node id, one process: a row is one process instance (host, pid and the database's time of
its registration). A node refuses to start (`NodeIdInUse`) while another instance's row is alive:
on another host, or on this host with its pid still running. A live row of this host whose pid
is gone (or is this process's own: a container's pid 1 restarted) is a crashed predecessor's,
taken over at once. An instance whose row another one took over (it was paused past its lease
and replaced) is fenced for good and releases its calls.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any, Callable, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.domain.manager import CallError
from voicecall.domain.store import StoreLockedError

#: The channel on which nodes announce their joins and leaves.
NODES_CHANNEL = "voicecall_nodes"
#: Call ids listed per node (`status --cluster`); the count covers them all.
MAX_LISTED_CALLS = 1000
#: The longest a node back from a gap in its beats waits, beyond a lease, before it takes a silent node's calls.
MAX_CATCH_UP = 60.0
#: The owner named when a call's row was taken over by another process with this node id.
REPLACED = "(another process with this node id)"


class NodeIdInUse(StoreLockedError):
    """Another live process has this node id; the message says which (reported in one line at start)."""

    def __init__(self, message: str, pid: int | None) -> None:
        Exception.__init__(self, message)
        self.directory = None
        self.pid = pid


@frozen
class NodeInfo:
    """One row of ``nodes`` as the database sees it now (ages on its clock)."""

    node_id: str
    public_url: str
    host: str | None
    pid: int | None
    started_at: float | None  # Unix time (None: no row)
    heartbeat_age: float | None  # seconds since its last heartbeat (None: no row)
    alive: bool
    calls: int  # live calls it owns
    call_ids: tuple[str, ...] = ()  # the first MAX_LISTED_CALLS of them, oldest first
    stopped: bool = False  # it stopped cleanly (its row kept while its URL may be signed for)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "publicUrl": self.public_url,
            "host": self.host,
            "pid": self.pid,
            "startedAt": None if self.started_at is None else int(self.started_at * 1000),
            "heartbeatAgeSeconds": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
            "alive": self.alive,
            "stopped": self.stopped,
            "calls": self.calls,
            "callIds": list(self.call_ids),
        }


def _lease(lease_seconds: float) -> str:
    return f"make_interval(secs => {float(lease_seconds)!r})"


def row_lease(lease_seconds: float, alias: str = "") -> str:
    """The lease of a ``nodes`` row as an interval: its own (NULL, a row of an older version: `lease_seconds`)."""
    return f"make_interval(secs => coalesce({alias}lease_seconds, {float(lease_seconds)!r}))"


def alive_sql(lease_seconds: float, alias: str = "") -> str:
    """The condition that a ``nodes`` row (`alias`: "n." for a table alias n) is alive: its last beat within its own lease."""
    return f"{alias}heartbeat_at > now() - {row_lease(lease_seconds, alias)}"


def list_nodes(conn, lease_seconds: float) -> list[NodeInfo]:
    """Every registered node with its live calls; plus owners of live calls that have no row."""
    rows = conn.execute(
        "SELECT n.node_id, n.public_url, n.host, n.pid, extract(epoch FROM n.started_at),"
        " extract(epoch FROM now() - n.heartbeat_at), " + alive_sql(lease_seconds, "n.")
        + " FROM nodes n ORDER BY n.node_id"
    ).fetchall()
    calls: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for owner, n, ids in conn.execute(
        "SELECT owner_node, count(*), (array_agg(call_id ORDER BY started_at))[1:%s] FROM calls"
        " WHERE NOT terminal AND owner_node IS NOT NULL GROUP BY owner_node",
        (MAX_LISTED_CALLS,),
    ).fetchall():
        counts[owner], calls[owner] = int(n), list(ids)
    nodes = [
        NodeInfo(
            r[0], r[1], r[2], r[3], float(r[4]), max(0.0, float(r[5])), bool(r[6]), counts.pop(r[0], 0),
            tuple(calls.pop(r[0], ())), stopped=r[3] is None and not r[6],
        )
        for r in rows
    ]
    # An owner of live calls without a row (pruned, or never registered), until they are adopted.
    nodes.extend(NodeInfo(owner, "", None, None, None, None, False, n, tuple(calls[owner])) for owner, n in sorted(counts.items()))
    return nodes


def taken_from(conn, me: str, call_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Of `call_ids` (the calls this node runs), those another node owns now: [(call_id, owner)]."""
    if not call_ids:
        return []
    rows = conn.execute(
        "SELECT call_id, owner_node FROM calls WHERE call_id = ANY(%s) AND owner_node IS NOT NULL AND owner_node <> %s",
        (list(call_ids), me),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def prune(conn, keep_seconds: float, lease_seconds: float) -> int:
    """Delete the rows of nodes not alive that own no live call and last beat `keep_seconds` ago; how many."""
    return conn.execute(
        f"DELETE FROM nodes n WHERE n.heartbeat_at < now() - greatest({_lease(keep_seconds)}, {row_lease(lease_seconds, 'n.')})"
         " AND NOT EXISTS (SELECT 1 FROM calls c WHERE NOT c.terminal AND c.owner_node = n.node_id)"
    ).rowcount


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


@define(repr=False)
class NodeRegistry:
    """This node's membership of the cluster; see the module docstring."""

    _reactor: IReactorTime
    #: Its own pool (opened at start, closed at stop): heartbeats never queue behind data writes.
    _pool: Any  # voicecall.infra.pg.PgPool
    node_id: str
    public_url: str
    lease_seconds: float
    #: Called after each successful heartbeat (the adopter's sweep).
    _on_beat: Callable[[], object] = lambda: None
    #: Called with "join", "leave" (another node's) or "reconnect" (this node's LISTEN).
    _on_change: Callable[[str], object] = lambda event: None
    #: The ids of the calls this node runs (checked at each beat for calls taken from it).
    _held: Callable[[], Sequence[str]] = lambda: ()
    #: Called with (call_id, owner) for a call another node owns now (the manager's release).
    _on_taken: Callable[[str, str], object] = lambda call_id, owner: None
    #: A dead node's row (its URL accepted) is kept this long after its last beat (see prune).
    keep_seconds: float = 3600.0
    _host: str = field(factory=socket.gethostname)
    _pid: int = field(factory=os.getpid)
    _pid_alive: Callable[[int], bool] = pid_alive
    _monotonic: Callable[[], float] = time.monotonic
    #: This instance's registration time on the database's clock (with host and pid: its identity).
    _since: Any = field(default=None, init=False)
    #: The monotonic time at which the last successful beat started (None: none yet).
    _last_good: float | None = field(default=None, init=False)
    #: When the current run of good beats (none failed, none fenced in between) began (None: a beat failed).
    _steady_since: float | None = field(default=None, init=False)
    #: How long this node went without a good beat before that run (capped at MAX_CATCH_UP).
    _catch_up: float = field(default=0.0, init=False)
    #: Another process registered this node id over this one's row: fenced for good.
    replaced: bool = field(default=False, init=False)
    #: The next heartbeat's timer (None: not started, or stopped).
    _next: Any = field(default=None, init=False)
    #: The heartbeat under way, if any (a stop waits for it).
    _beating: Deferred | None = field(default=None, init=False)
    _listener: Any = field(default=None, init=False)
    #: Heartbeats that failed in a row (the store unreachable); reset by one that succeeds.
    failed_beats: int = field(default=0, init=False)
    #: The cluster as the last heartbeat saw it (metrics read it at scrape time).
    snapshot: tuple[NodeInfo, ...] = field(default=(), init=False)
    _log = Logger()

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3.0

    @property
    def fenced(self) -> bool:
        """Whether this node must not act at the carrier now (its lease may have run out)."""
        if self.replaced or self._last_good is None:
            return True
        return self._monotonic() - self._last_good > self.lease_seconds * 0.75

    @property
    def steady(self) -> bool:
        """Whether this node's beats have succeeded without a gap for a lease (it may take a silent node's calls)."""
        since = self._steady_since
        return not self.fenced and since is not None and self._monotonic() - since >= self.lease_seconds + self._catch_up

    def _good_beat(self, began: float) -> None:
        if self._steady_since is None or self.fenced:
            self._steady_since = began
            self._catch_up = 0.0 if self._last_good is None else min(began - self._last_good, MAX_CATCH_UP)
        self._last_good = began

    def start(self) -> Deferred[None]:
        """Register (NodeIdInUse if another live process has our id), then beat and listen."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self._pool.open()
        began = self._monotonic()
        nodes, self._since = await self._pool.run(self._register)
        self._good_beat(began)
        self.snapshot = tuple(nodes)
        self._log.info(
            "Cluster node {node} registered ({url}); lease {lease}s", node=self.node_id, url=self.public_url, lease=self.lease_seconds
        )
        self._listener = self._pool.listen(NODES_CHANNEL, self._notified, lambda: self._on_change("reconnect"))
        self._schedule()

    def _schedule(self) -> None:
        """The next beat, `interval` after this one ended (a slow store never stacks beats up)."""
        self._next = self._reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._beating = self._heartbeat()

        def done(_: object) -> None:
            self._beating = None
            if self._next is not None and not self.replaced:  # not stopped meanwhile
                self._schedule()

        self._beating.addBoth(done)

    def _register(self, conn) -> tuple[list[NodeInfo], Any]:
        row = conn.execute(
            "SELECT host, pid, " + alive_sql(self.lease_seconds) + " FROM nodes WHERE node_id = %s FOR UPDATE",
            (self.node_id,),
        ).fetchone()
        if row is not None and row[2]:
            host, pid = row[0], row[1]
            if host != self._host:
                raise NodeIdInUse(
                    f"cluster node id {self.node_id!r} is in use by a live node on host {host} (pid {pid}):"
                    " give each node its own cluster.nodeId",
                    pid,
                )
            if pid is not None and pid != self._pid and self._pid_alive(pid):
                raise NodeIdInUse(
                    f"cluster node id {self.node_id!r} is in use by another voicecall process on this host (pid {pid}):"
                    " give each node its own cluster.nodeId",
                    pid,
                )
            # Else a crashed predecessor on this host: its row is taken over at once.
        (since,) = conn.execute(
            "INSERT INTO nodes (node_id, public_url, host, pid, started_at, heartbeat_at, lease_seconds)"
            " VALUES (%s, %s, %s, %s, now(), now(), %s)"
            " ON CONFLICT (node_id) DO UPDATE SET public_url = excluded.public_url, host = excluded.host,"
            " pid = excluded.pid, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
            " lease_seconds = excluded.lease_seconds RETURNING started_at",
            (self.node_id, self.public_url, self._host, self._pid, float(self.lease_seconds)),
        ).fetchone()
        self._announce(conn, "join")
        return list_nodes(conn, self.lease_seconds), since

    def _announce(self, conn, event: str) -> None:
        payload = json.dumps({"node": self.node_id, "event": event, "url": self.public_url}, separators=(",", ":"))
        conn.execute("SELECT pg_notify(%s, %s)", (NODES_CHANNEL, payload))

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause matching this instance's row (not another process's with this id)."""
        return "node_id = %s AND host = %s AND pid = %s AND started_at = %s", (self.node_id, self._host, self._pid, self._since)

    def _heartbeat(self) -> Deferred[None]:
        held = list(self._held())
        began = self._monotonic()

        def beat(conn) -> tuple[list[NodeInfo], list[tuple[str, str]]] | None:
            where, params = self._mine()
            if conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE " + where, params).rowcount == 0:
                if conn.execute("SELECT 1 FROM nodes WHERE node_id = %s", (self.node_id,)).fetchone() is not None:
                    return None  # another process registered this id over our row
                # Our row was pruned (this node was silent for long): it comes back with this beat.
                conn.execute(
                    "INSERT INTO nodes (node_id, public_url, host, pid, started_at, heartbeat_at, lease_seconds)"
                    " VALUES (%s, %s, %s, %s, %s, now(), %s) ON CONFLICT (node_id) DO NOTHING",
                    (self.node_id, self.public_url, self._host, self._pid, self._since, float(self.lease_seconds)),
                )
            taken = taken_from(conn, self.node_id, held)
            prune(conn, self.keep_seconds, self.lease_seconds)
            return list_nodes(conn, self.lease_seconds), taken

        def beaten(result) -> None:
            if result is None:
                self._replaced()
                return
            nodes, taken = result
            for call_id, owner in taken:  # released before the node counts itself live again
                self._on_taken(call_id, owner)
            self._good_beat(began)
            self.snapshot = tuple(nodes)
            if self.failed_beats:
                self._log.info("Cluster heartbeat back after {n} failed", n=self.failed_beats)
            self.failed_beats = 0
            self._on_beat()

        def failed(failure) -> None:
            # Logged, never raised: a raised error would stop the loop for good.
            self.failed_beats += 1
            self._steady_since = None
            self._log.warn(
                "Cluster heartbeat failed ({n} in a row): {error}", n=self.failed_beats, error=failure.getErrorMessage()
            )

        return self._pool.run(beat).addCallbacks(beaten, failed)

    def _replaced(self) -> None:
        self.replaced = True
        self._log.error(
            "Cluster node id {node} was registered by another process: this one no longer acts for any call; stop it",
            node=self.node_id,
        )
        for call_id in list(self._held()):
            self._on_taken(call_id, REPLACED)

    def _notified(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            node, event = message["node"], message["event"]
        except (ValueError, KeyError, TypeError):
            self._log.warn("Ignored a malformed {channel} notification", channel=NODES_CHANNEL)
            return
        if node != self.node_id and event in ("join", "leave"):
            self._on_change(event)

    def nodes(self) -> Deferred[list[NodeInfo]]:
        """The cluster's nodes as the database sees them now."""
        return self._pool.run(lambda conn: list_nodes(conn, self.lease_seconds))

    def stop(self) -> Deferred[None]:
        """Stop beating and listening, and give the lease up (the row kept, stopped: its calls are adoptable at once)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        timer, self._next = self._next, None
        if timer is None:
            await self._pool.close()
            return  # never started (or its registration failed)
        if timer.active():
            timer.cancel()
        if self._beating is not None:
            await self._beating
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()

        def leave(conn) -> None:
            where, params = self._mine()
            conn.execute(
                "UPDATE nodes SET pid = NULL, heartbeat_at = now() - " + _lease(self.lease_seconds) + " WHERE " + where, params
            )
            self._announce(conn, "leave")

        try:
            if not self.replaced:
                await self._pool.run(leave)
        except Exception as e:  # the store is down: the lease runs out instead
            self._log.warn("Could not deregister cluster node {node}: {error}", node=self.node_id, error=str(e))
        else:
            self._log.info("Cluster node {node} stopped", node=self.node_id)
        await self._pool.close()


@define(repr=False)
class FencedCarrier:
    """
    The carrier (CallControl) or the voice (Voice) as the manager sees them on a cluster node:
    every action that reaches the carrier fails with a CallError while `fenced()` (this node's
    lease may have run out, see NodeRegistry.fenced); the rest is passed through.
    """

    _inner: Any
    _fenced: Callable[[], bool]
    _node_id: str

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in _CARRIER_ACTIONS:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self._fenced():
                call = args[0] if args else kwargs.get("call")
                return fail(
                    CallError(
                        f"node {self._node_id} has no fresh heartbeat (its lease may have run out): it does not act at the"
                        " carrier until its heartbeat is back",
                        getattr(call, "call_id", None),
                    )
                )
            return attr(*args, **kwargs)

        return guarded


#: The CallControl and Voice methods that act at the carrier.
_CARRIER_ACTIONS = frozenset(
    {"initiate_call", "hangup_call", "answer_call", "repoint_call", "speak", "prompt", "start_listening", "stop_listening"}
)
