# -*- test-case-name: tests.test_cluster_live -*-
"""
Node liveness: this node's row in the store's ``nodes`` table, kept fresh by heartbeats.

A node registers when it starts (after the store opened, before it restores its calls), beats
every ``lease_seconds / 3`` and deletes its row when it stops cleanly. Every time is the
DATABASE's clock (``now()``), so nodes whose clocks disagree still agree on who is alive: a node
is alive while its ``heartbeat_at`` is less than ``lease_seconds`` old, and dead after (its live
calls are then adopted, see adopt.py). A node that stopped cleanly has no row: its calls are
adoptable at once.

Joins and leaves are announced on the NOTIFY channel ``voicecall_nodes`` (`NODES_CHANNEL`) with a
JSON payload ``{"node": <id>, "event": "join"|"leave", "url": <its publicUrl>}``, sent when the
row's transaction commits. The registry LISTENs to it and calls ``on_change(event)`` for another
node's join or leave (and after each (re)connect of the LISTEN, with ``"reconnect"``, since
notifications sent meanwhile are lost); each heartbeat calls ``on_beat()``. tap.py wires both to
the adopter's sweep, so a dead node's calls are taken at the first beat after its lease ran out,
a stopped node's at once.

Two processes with one node id would defeat the store's fencing: a node refuses to start while
another host's process holds its id with a fresh heartbeat (`NodeIdInUse`). The same host is
taken for this node restarting (e.g. after kill -9, within its lease).
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: The channel on which nodes announce their joins and leaves.
NODES_CHANNEL = "voicecall_nodes"
#: Call ids listed per node (`status --cluster`); the count covers them all.
MAX_LISTED_CALLS = 1000


class NodeIdInUse(Exception):
    """Another live process on another host has this node id; the message says which."""


@frozen
class NodeInfo:
    """One row of ``nodes`` as the database sees it now (ages on its clock)."""

    node_id: str
    public_url: str
    host: str | None
    pid: int | None
    started_at: float | None  # Unix time (None: no row, the node stopped)
    heartbeat_age: float | None  # seconds since its last heartbeat (None: no row)
    alive: bool
    calls: int  # live calls it owns
    call_ids: tuple[str, ...] = ()  # the first MAX_LISTED_CALLS of them, oldest first

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "publicUrl": self.public_url,
            "host": self.host,
            "pid": self.pid,
            "startedAt": None if self.started_at is None else int(self.started_at * 1000),
            "heartbeatAgeSeconds": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
            "alive": self.alive,
            "calls": self.calls,
            "callIds": list(self.call_ids),
        }


def _lease(lease_seconds: float) -> str:
    return f"make_interval(secs => {float(lease_seconds)!r})"


def list_nodes(conn, lease_seconds: float) -> list[NodeInfo]:
    """Every registered node with its live calls; plus owners of live calls that have no row (stopped)."""
    rows = conn.execute(
        "SELECT n.node_id, n.public_url, n.host, n.pid, extract(epoch FROM n.started_at),"
        " extract(epoch FROM now() - n.heartbeat_at), n.heartbeat_at > now() - " + _lease(lease_seconds)
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
        NodeInfo(r[0], r[1], r[2], r[3], float(r[4]), max(0.0, float(r[5])), bool(r[6]), counts.pop(r[0], 0), tuple(calls.pop(r[0], ())))
        for r in rows
    ]
    # A node that stopped (no row) but still owns live calls, until they are adopted.
    nodes.extend(NodeInfo(owner, "", None, None, None, None, False, n, tuple(calls[owner])) for owner, n in sorted(counts.items()))
    return nodes


@define(repr=False)
class NodeRegistry:
    """This node's membership of the cluster; see the module docstring."""

    _reactor: IReactorTime
    _pool: Any  # voicecall.infra.pg.PgPool
    node_id: str
    public_url: str
    lease_seconds: float
    #: Called after each successful heartbeat (the adopter's sweep).
    _on_beat: Callable[[], object] = lambda: None
    #: Called with "join", "leave" (another node's) or "reconnect" (this node's LISTEN).
    _on_change: Callable[[str], object] = lambda event: None
    _host: str = field(factory=socket.gethostname)
    _pid: int = field(factory=os.getpid)
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

    def start(self) -> Deferred[None]:
        """Register (NodeIdInUse if another host's live process has our id), then beat and listen."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.snapshot = tuple(await self._pool.run(self._register))
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
            if self._next is not None:  # not stopped meanwhile
                self._schedule()

        self._beating.addBoth(done)

    def _register(self, conn) -> list[NodeInfo]:
        row = conn.execute(
            "SELECT host, pid, heartbeat_at > now() - " + _lease(self.lease_seconds) + " FROM nodes WHERE node_id = %s FOR UPDATE",
            (self.node_id,),
        ).fetchone()
        if row is not None and row[2] and row[0] != self._host:
            raise NodeIdInUse(
                f"cluster node id {self.node_id!r} is in use by a live node on host {row[0]} (pid {row[1]}):"
                " give each node its own cluster.nodeId"
            )
        conn.execute(
            "INSERT INTO nodes (node_id, public_url, host, pid, started_at, heartbeat_at) VALUES (%s, %s, %s, %s, now(), now())"
            " ON CONFLICT (node_id) DO UPDATE SET public_url = excluded.public_url, host = excluded.host,"
            " pid = excluded.pid, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
            (self.node_id, self.public_url, self._host, self._pid),
        )
        self._announce(conn, "join")
        return list_nodes(conn, self.lease_seconds)

    def _announce(self, conn, event: str) -> None:
        payload = json.dumps({"node": self.node_id, "event": event, "url": self.public_url}, separators=(",", ":"))
        conn.execute("SELECT pg_notify(%s, %s)", (NODES_CHANNEL, payload))

    def _heartbeat(self) -> Deferred[None]:
        def beat(conn) -> list[NodeInfo]:
            # An upsert: a row someone deleted (or never committed) comes back with this beat.
            conn.execute(
                "INSERT INTO nodes (node_id, public_url, host, pid, started_at, heartbeat_at) VALUES (%s, %s, %s, %s, now(), now())"
                " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.node_id, self.public_url, self._host, self._pid),
            )
            return list_nodes(conn, self.lease_seconds)

        def beaten(nodes: list[NodeInfo]) -> None:
            self.snapshot = tuple(nodes)
            if self.failed_beats:
                self._log.info("Cluster heartbeat back after {n} failed", n=self.failed_beats)
            self.failed_beats = 0
            self._on_beat()

        def failed(failure) -> None:
            # Logged, never raised: a raised error would stop the loop for good.
            self.failed_beats += 1
            self._log.warn(
                "Cluster heartbeat failed ({n} in a row): {error}", n=self.failed_beats, error=failure.getErrorMessage()
            )

        return self._pool.run(beat).addCallbacks(beaten, failed)

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
        """Stop beating and listening, and delete this node's row (its calls are then adoptable at once)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        timer, self._next = self._next, None
        if timer is None:
            return  # never started
        if timer.active():
            timer.cancel()
        if self._beating is not None:
            await self._beating
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()

        def leave(conn) -> None:
            conn.execute("DELETE FROM nodes WHERE node_id = %s AND pid = %s", (self.node_id, self._pid))
            self._announce(conn, "leave")

        try:
            await self._pool.run(leave)
        except Exception as e:  # the store is down: the lease runs out instead
            self._log.warn("Could not deregister cluster node {node}: {error}", node=self.node_id, error=str(e))
        else:
            self._log.info("Cluster node {node} deregistered", node=self.node_id)

