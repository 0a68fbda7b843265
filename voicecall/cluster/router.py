# -*- test-case-name: tests.test_cluster_route -*-
"""
Any node serves any request: a request (a verified webhook, an RPC command) for a call another
LIVE node owns is forwarded to that node through the store and answered with its answer.

A forward is a row of the ``forwards`` table (the PostgreSQL store's migration 2; UNLOGGED: a
forward lives no longer than the request that made it) and a NOTIFY on the owner's channel ``voicecall_node_<id>`` with the
payload ``q<row id>``. The owner, which LISTENs on its channel, claims the row (one UPDATE: a
row is claimed once), runs the request exactly as a local one (the handler of its kind, given
by tap.py), stores the reply in the row and NOTIFYs the sender's channel ``r<row id>``; the
sender deletes the row as it reads the reply. Nothing polls: a node whose LISTEN connection was
lost re-reads, once reconnected, the rows addressed to it and the replies it waits for.

Bounds: at most ``max_pending`` forwards wait for replies (past it a forward fails at once), at
most ``max_running`` forwarded requests run at once here and ``max_queued`` wait for a slot
(past it the request is answered with an error at once); every forward has a time limit
(its row is deleted when it runs out). Rows a node left behind (a restart, a crash) are deleted
when it starts, and rows older than ``STALE_SECONDS`` by whichever node starts.

Who owns a call is the store's ``calls.owner_node``; a node is live while its ``nodes.heartbeat_at``
(the database's clock) is less than ``lease_seconds`` old. A request for a call whose owner is
dead is applied here once ``adopt`` (the liveness side's adoption of that call) has made this
node its owner; one for a call nobody owns yet (an inbound call's first webhook, an unknown id)
is applied here, and if its create loses the unique claim to another node
(`voicecall.domain.store.CallExistsError`), it is forwarded to the winner.
"""
from __future__ import annotations

import json
import uuid
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.domain.manager import CallError
from voicecall.domain.store import CallExistsError

#: The NOTIFY channel of a node is this prefix and its id (config's node id check keeps it an
#: identifier of at most 63 bytes).
CHANNEL_PREFIX = "voicecall_node_"
#: Forward rows older than this are dropped by a starting node (their sender gave up long ago).
STALE_SECONDS = 600


def node_channel(node_id: str) -> str:
    return CHANNEL_PREFIX + node_id


class ForwardError(CallError):
    """A forward that got no answer: refused here (too many waiting), or timed out (an RPC error's text)."""


@frozen
class Owner:
    """Who owns a call, as the store says."""

    call_id: str
    node_id: str | None
    alive: bool
    terminal: bool = False


def _owner_query(conn, refs: Sequence[str], lease_seconds: int) -> Owner | None:
    row = conn.execute(
        "SELECT c.call_id, c.owner_node,"
        " coalesce(n.heartbeat_at > now() - make_interval(secs => %s), false), c.terminal"
        " FROM calls c LEFT JOIN nodes n ON n.node_id = c.owner_node"
        " WHERE c.call_id = ANY(%s) OR c.provider_call_id = ANY(%s)"
        " ORDER BY c.started_at DESC LIMIT 1",
        (lease_seconds, list(refs), list(refs)),
    ).fetchone()
    return None if row is None else Owner(row[0], row[1], bool(row[2]), bool(row[3]))


@define(repr=False)
class Router:
    """
    Forwards requests to the owners of calls, and runs the requests forwarded here.

    `pool` is the store's `voicecall.infra.pg.PgPool`; `handlers` maps a request kind
    (``"webhook"``, ``"rpc"``) to the local handler of a forwarded request (a JSON-able dict in,
    one out; errors are the handler's to encode); `is_local` says whether this node's manager
    holds a call (by our id or the carrier's); `adopt(call_id)` makes this node the owner of a
    dead node's call (a Deferred firing with whether this node now runs it).
    """

    _reactor: IReactorTime
    _pool: Any  # voicecall.infra.pg.PgPool
    node_id: str
    _lease_seconds: int
    _handlers: Mapping[str, Callable[[dict], Awaitable[dict]]]
    _is_local: Callable[[str], bool]
    _adopt: Callable[[str], Deferred]
    #: Seconds a forward waits for its reply, by kind (default: `timeout`).
    _timeouts: Mapping[str, float] = field(factory=dict)
    _timeout: float = 10.0
    _max_pending: int = 1024
    _max_running: int = 64
    _max_queued: int = 1024
    #: Row id -> the Deferred of the forward waiting for its reply.
    _pending: dict[str, Deferred] = field(factory=dict)
    _queue: deque = field(factory=deque)
    _running: int = 0
    _stopped: bool = False
    _listener: Any = None
    #: Forwards sent / served / failed, for metrics and tests.
    counts: dict[str, int] = field(factory=lambda: {"sent": 0, "served": 0, "failed": 0})
    _log = Logger()

    @property
    def channel(self) -> str:
        return node_channel(self.node_id)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Drop rows this node left behind, then LISTEN on its channel (re-reading once listening)."""
        me = self.node_id

        def tidy(conn) -> None:
            conn.execute(
                "DELETE FROM forwards WHERE from_node = %s OR (to_node = %s AND claimed_by IS NOT NULL)"
                " OR created_at < now() - make_interval(secs => %s)",
                (me, me, STALE_SECONDS),
            )

        def listen(_: object) -> None:
            self._listener = self._pool.listen(self.channel, self._notified, self._reread)

        return self._pool.run(tidy).addCallback(listen)

    def stop(self) -> Deferred:
        """Fail every forward still waiting, run no more forwarded requests, stop listening."""
        self._stopped = True
        self._queue.clear()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            if not d.called:
                d.errback(ForwardError("the node is stopping"))
        listener, self._listener = self._listener, None
        return listener.stop() if listener is not None else succeed(None)

    # -- the sending side ---------------------------------------------------------------------

    def owner(self, refs: Sequence[str]) -> Deferred[Owner | None]:
        """The owner of the call one of `refs` (our id or the carrier's) names, per the store."""
        refs = [r for r in refs if r]
        return self._pool.run(lambda conn: _owner_query(conn, refs, self._lease_seconds))

    async def route(
        self, refs: Sequence[str], kind: str, request: dict, local: Callable[[], Awaitable[Any]], decode: Callable[[dict], Any]
    ) -> Any:
        """
        Run `local()` when this node owns (or may take) the call `refs` name; else forward
        `request` to its live owner and return ``decode(its reply)``. A local run that loses an
        inbound call's unique claim is forwarded to the winner.
        """
        refs = [r for r in refs if r]
        if refs and not any(self._is_local(r) for r in refs):
            owner = await self.owner(refs)
            if owner is not None and owner.node_id == self.node_id and not owner.terminal:
                # Ours in the store but not held yet: this node's adoption is loading it.
                await self._adopt(owner.call_id)
            elif owner is not None and owner.node_id not in (None, self.node_id):
                if owner.alive:
                    try:
                        return decode(await self.forward(owner.node_id, kind, request))
                    except ForwardError:
                        # An owner killed just now is still "alive" until its lease runs out (a
                        # stream's resume Redirect comes at once): if it has died meanwhile (or
                        # this node's sweep took the call), the request is not lost but applied
                        # here, on the call adopted.
                        owner = await self.owner(refs)
                        if owner is None or owner.node_id is None or (owner.alive and owner.node_id != self.node_id):
                            raise
                self._log.info("adopting {call_id} from dead node {node}", call_id=owner.call_id, node=owner.node_id)
                if not await self._adopt(owner.call_id) and not owner.terminal:
                    # Another node took it meanwhile (then it is that node's), or it cannot be
                    # taken yet: never apply here what this node does not hold (it would be
                    # acknowledged and lost); the carrier retries a failed request.
                    again = await self.owner(refs)
                    if again is not None and again.node_id not in (None, self.node_id):
                        if again.alive:
                            return decode(await self.forward(again.node_id, kind, request))
                        raise ForwardError(f"call {owner.call_id} of dead node {owner.node_id} could not be adopted here yet", owner.call_id)
        try:
            return await local()
        except CallExistsError as e:
            winner = e.owner_node
            if winner in (None, self.node_id):
                raise
            self._log.info("{kind} for a call {node} claimed first: forwarded", kind=kind, node=winner)
            return decode(await self.forward(winner, kind, request))

    async def forward(self, node_id: str, kind: str, request: dict) -> dict:
        """Send `request` to `node_id` and wait for its reply."""
        if self._stopped:
            raise ForwardError("the node is stopping")
        if len(self._pending) >= self._max_pending:
            self.counts["failed"] += 1
            raise ForwardError(f"too many forwarded requests waiting ({self._max_pending})")
        me, row_id, body = self.node_id, uuid.uuid4().hex, json.dumps(request, separators=(",", ":"))

        def send(conn) -> None:
            conn.execute(
                "INSERT INTO forwards (id, from_node, to_node, kind, request) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (row_id, me, node_id, kind, body),
            )
            conn.execute("SELECT pg_notify(%s, %s)", (node_channel(node_id), "q" + row_id))

        waiting: Deferred = Deferred()
        self._pending[row_id] = waiting
        timer = self._reactor.callLater(self._timeouts.get(kind, self._timeout), waiting.cancel)
        try:
            await self._pool.run(send)
            self.counts["sent"] += 1
            reply = await waiting
        except CancelledError:
            self.counts["failed"] += 1
            raise ForwardError(f"node {node_id} did not answer a forwarded {kind} request in time") from None
        finally:
            self._pending.pop(row_id, None)
            if timer.active():
                timer.cancel()
            self._pool.run(lambda conn: conn.execute("DELETE FROM forwards WHERE id = %s", (row_id,))).addErrback(
                lambda f: self._log.failure("could not drop a forward", f)
            )
        return reply

    def _collect(self, row_id: str) -> None:
        """Read the reply of forward `row_id`, and hand it to its waiter."""
        me = self.node_id

        def take(conn):
            row = conn.execute("SELECT reply FROM forwards WHERE id = %s AND from_node = %s AND reply IS NOT NULL", (row_id, me)).fetchone()
            return None if row is None else row[0]

        def got(reply) -> None:
            waiting = self._pending.get(row_id)
            if reply is not None and waiting is not None and not waiting.called:
                waiting.callback(reply if isinstance(reply, dict) else json.loads(reply))

        self._pool.run(take).addCallback(got).addErrback(lambda f: self._log.failure("could not read a forward's reply", f))

    # -- notifications ------------------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        kind, row_id = payload[:1], payload[1:]
        if kind == "r" and row_id in self._pending:
            self._collect(row_id)
        elif kind == "q" and row_id:
            self._enqueue(row_id)

    def _reread(self) -> None:
        """Listening (again): take the rows addressed here, and the replies waited for, that were missed."""
        me, waiting = self.node_id, list(self._pending)

        def missed(conn) -> tuple[list[str], list[str]]:
            asked = [r[0] for r in conn.execute("SELECT id FROM forwards WHERE to_node = %s AND claimed_by IS NULL ORDER BY created_at", (me,))]
            answered = [r[0] for r in conn.execute("SELECT id FROM forwards WHERE from_node = %s AND reply IS NOT NULL AND id = ANY(%s)", (me, waiting))]
            return asked, answered

        def found(ids) -> None:
            asked, answered = ids
            for row_id in answered:
                self._collect(row_id)
            for row_id in asked:
                self._enqueue(row_id)

        self._pool.run(missed).addCallback(found).addErrback(lambda f: self._log.failure("could not re-read forwards", f))

    # -- the serving side ---------------------------------------------------------------------

    def _enqueue(self, row_id: str) -> None:
        if self._stopped:
            return
        if self._running < self._max_running:
            self._serve(row_id)
        elif len(self._queue) < self._max_queued:
            self._queue.append(row_id)
        else:
            self._log.warn("refusing a forwarded request: {n} wait already", n=self._max_queued)
            self._answer(row_id, {"error": {"message": "the owner node is overloaded"}}).addErrback(
                lambda f: self._log.failure("could not refuse a forwarded request", f)
            )

    def _serve(self, row_id: str) -> None:
        self._running += 1
        d = Deferred.fromCoroutine(self._run(row_id))
        d.addErrback(lambda f: self._log.failure("a forwarded request failed", f))
        d.addBoth(self._served)

    def _served(self, _: Any) -> None:
        self._running -= 1
        while self._queue and self._running < self._max_running and not self._stopped:
            self._serve(self._queue.popleft())

    async def _run(self, row_id: str) -> None:
        me, attempt = self.node_id, uuid.uuid4().hex

        def claim(conn):
            return conn.execute(
                "UPDATE forwards SET claimed_by = %s WHERE id = %s AND to_node = %s"
                " AND (claimed_by IS NULL OR claimed_by = %s) RETURNING kind, request",
                (attempt, row_id, me, attempt),
            ).fetchone()

        row = await self._pool.run(claim)
        if row is None:
            return  # claimed already (a re-read raced the notification), or its sender gave up
        kind, request = row
        handler = self._handlers.get(kind)
        if handler is None:
            reply: dict = {"error": {"message": f"unknown forwarded request kind {kind!r}"}}
        else:
            try:
                reply = await handler(request if isinstance(request, dict) else json.loads(request))
            except Exception:
                # Handlers encode their own errors; this is a bug, but the sender still gets an answer now.
                self._log.failure("a forwarded {kind} request failed", kind=kind)
                reply = {"error": {"message": "the owner node failed the request"}}
        self.counts["served"] += 1
        await self._answer(row_id, reply)

    def _answer(self, row_id: str, reply: dict) -> Deferred:
        body = json.dumps(reply, separators=(",", ":"))

        def store(conn) -> None:
            row = conn.execute(
                "UPDATE forwards SET reply = %s, claimed_by = coalesce(claimed_by, 'refused') WHERE id = %s RETURNING from_node", (body, row_id)
            ).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify(%s, %s)", (node_channel(row[0]), "r" + row_id))

        return self._pool.run(store)
