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
(the database's clock) is less than its own lease old (`voicecall.cluster.nodes.alive_sql`). A
request for a call whose owner is dead is applied here once ``adopt`` (the liveness side's adoption of that call) has made this
node its owner; one for a call nobody owns yet (an inbound call's first webhook, an unknown id)
is applied here, and if its create loses the unique claim to another node
(`voicecall.domain.store.CallExistsError`), it is forwarded to the winner. A request for an
ENDED call of a dead node (a carrier's late callback) is applied here as a single node applies
it (recorded, nothing else): the router first makes this node the owner of that ended row, which
the store's fencing would otherwise refuse to write (a 500 on every retry of the carrier).

A forward that fails (its time limit, or its target seen dead or leaving: `recheck`, which tap.py
calls on each heartbeat and each node's join or leave) re-reads the owner: a dead owner's call is
adopted and applied here, one another live node took meanwhile is forwarded once more, there.
The receiving node runs the same owner check before the handler: a call it claimed but is still
loading (its adoption under way) is waited for; one that is not its own is answered ``notHere``,
which the sender re-routes. A forward whose sender gives up (its time limit, or its caller
cancelled it: a gateway's connection closed during a continue) deletes its row and NOTIFYs the
owner ``c<row id>``, which cancels the request running there, as a local one is cancelled.
"""
from __future__ import annotations

import json
import uuid
from collections import deque
from typing import Any, Awaitable, Callable, Collection, Mapping, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.cluster.nodes import alive_sql
from voicecall.domain.manager import CallError
from voicecall.domain.store import CallExistsError

#: The NOTIFY channel of a node is this prefix and its id (config's node id check keeps it an
#: identifier of at most 63 bytes).
CHANNEL_PREFIX = "voicecall_node_"
#: Forward rows older than this are dropped by a starting node (their sender gave up long ago).
STALE_SECONDS = 600


def owner_command_timeouts(rpc: float, turn: float, playback: float) -> dict[str, float]:
    """
    The RPC commands on a call that its owner runs (any other node forwards them there), by
    method, with the seconds a forward of each waits for the owner's answer: a continue waits
    for the caller (`turn`); a speak, a goodbye (end with a message), a transfer's message and
    keypad tones wait for what the call plays first, at most `playback` (the longest message's),
    on top of the `rpc` limit of any other command.
    """
    return {
        "voicecall.continue": turn,
        "voicecall.speak": rpc + playback,
        "voicecall.end": rpc + playback,
        "voicecall.transfer": rpc + playback,
        "voicecall.dtmf": rpc + playback,
    }


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
        f" coalesce({alive_sql(lease_seconds, 'n.')}, false), c.terminal"
        " FROM calls c LEFT JOIN nodes n ON n.node_id = c.owner_node"
        " WHERE c.call_id = ANY(%s) OR c.provider_call_id = ANY(%s)"
        " ORDER BY c.started_at DESC LIMIT 1",
        (list(refs), list(refs)),
    ).fetchone()
    return None if row is None else Owner(row[0], row[1], bool(row[2]), bool(row[3]))


def _take_ended(conn, call_id: str, node_id: str, lease_seconds: int) -> bool:
    """Make `node_id` the owner of ended call `call_id` while its owner stays dead (a late event is then recorded here)."""
    return conn.execute(
        "UPDATE calls c SET owner_node = %s WHERE c.call_id = %s AND c.terminal AND c.owner_node IS DISTINCT FROM %s"
        " AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = c.owner_node"
        f" AND {alive_sql(lease_seconds, 'n.')}) RETURNING 1",
        (node_id, call_id, node_id),
    ).fetchone() is not None


@define(repr=False)
class _Pending:
    """A forward waiting for its reply: the node it went to, and its waiter."""

    target: str
    waiting: Deferred


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
    #: Seconds a forward waits for its reply: by the request's ``method`` (an RPC command), else
    #: by kind, else `timeout`.
    _timeouts: Mapping[str, float] = field(factory=dict)
    _timeout: float = 10.0
    _max_pending: int = 1024
    _max_running: int = 64
    _max_queued: int = 1024
    #: Row id -> the forward waiting for its reply.
    _pending: dict[str, _Pending] = field(factory=dict)
    _queue: deque = field(factory=deque)
    _running: int = 0
    #: Row id -> the forwarded request running here (cancelled when its sender gives up).
    _serving: dict[str, Deferred] = field(factory=dict)
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
        for p in pending.values():
            if not p.waiting.called:
                p.waiting.errback(ForwardError("the node is stopping"))
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
        `request` to its live owner and return ``decode(its reply)``. A forward that fails is
        routed again once the owner is re-read (adopted here if it died; forwarded to the node
        that took it meanwhile, once). A local run that loses an inbound call's unique claim is
        forwarded to the winner.
        """
        refs = [r for r in refs if r]
        if refs and not any(self._is_local(r) for r in refs):
            target, tried = await self._target(refs), set()
            while target is not None:
                tried.add(target)
                try:
                    return decode(await self.forward(target, kind, request, refs))
                except ForwardError:
                    # An owner killed just now is still "alive" until its lease runs out (a
                    # stream's resume Redirect comes at once): if it died meanwhile the call is
                    # adopted (here, or by a third node, which then gets the request).
                    if self._stopped:
                        raise
                    target = await self._target(refs)
                    if target is not None and (target in tried or len(tried) > 1):
                        raise  # still there (it did not answer in time), or forwarded twice already
        try:
            return await local()
        except CallExistsError as e:
            winner = e.owner_node
            if winner in (None, self.node_id):
                raise
            self._log.info("{kind} for a call {node} claimed first: forwarded", kind=kind, node=winner)
            return decode(await self.forward(winner, kind, request))

    async def _target(self, refs: Sequence[str]) -> str | None:
        """The live node to forward a request for `refs` to, or None to apply it here (taking a dead node's call first)."""
        owner = await self.owner(refs)
        if owner is None or owner.node_id is None:
            return None
        if owner.node_id == self.node_id:
            if not owner.terminal:
                # Ours in the store but not held yet: this node's adoption is loading it.
                await self._adopting(owner.call_id)
            return None
        if owner.alive:
            return owner.node_id
        if owner.terminal:
            # A late event for an ended call of a dead node: recorded here, as a single node does.
            if await self._pool.run(lambda conn: _take_ended(conn, owner.call_id, self.node_id, self._lease_seconds)):
                return None
        else:
            self._log.info("adopting {call_id} from dead node {node}", call_id=owner.call_id, node=owner.node_id)
            if await self._adopting(owner.call_id):
                return None
        # Another node took it meanwhile (then it is that node's), or it cannot be taken yet:
        # never apply here what this node does not hold (it would be acknowledged and lost);
        # the carrier retries a failed request.
        again = await self.owner(refs)
        if again is not None and again.alive and again.node_id not in (None, self.node_id):
            return again.node_id
        if again is not None and again.node_id == self.node_id and not again.terminal and await self._adopting(again.call_id):
            return None  # this node's sweep claimed it meanwhile and has loaded it now
        raise ForwardError(f"call {owner.call_id} of dead node {owner.node_id} could not be taken here yet", owner.call_id)

    def _adopting(self, call_id: str) -> Deferred[bool]:
        """`adopt(call_id)`, which a request given up meanwhile (its caller gone) stops waiting for but never cancels."""
        waiting: Deferred[bool] = Deferred()
        self._adopt(call_id).chainDeferred(waiting)
        return waiting

    async def forward(self, node_id: str, kind: str, request: dict, refs: Sequence[str] = ()) -> dict:
        """
        Send `request` to `node_id` and wait for its reply; `refs` name its call, which the owner
        checks is its own (else `ForwardError`: the call is not there).
        """
        if self._stopped:
            raise ForwardError("the node is stopping")
        if len(self._pending) >= self._max_pending:
            self.counts["failed"] += 1
            raise ForwardError(f"too many forwarded requests waiting ({self._max_pending})")
        me, row_id = self.node_id, uuid.uuid4().hex
        body = json.dumps({"refs": list(refs), "request": request}, separators=(",", ":"))

        def send(conn) -> None:
            conn.execute(
                "INSERT INTO forwards (id, from_node, to_node, kind, request) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (row_id, me, node_id, kind, body),
            )
            conn.execute("SELECT pg_notify(%s, %s)", (node_channel(node_id), "q" + row_id))

        def drop(conn) -> None:
            # A request claimed but not answered is still running there: cancel it (its sender is gone).
            row = conn.execute("DELETE FROM forwards WHERE id = %s RETURNING reply IS NULL AND claimed_by IS NOT NULL", (row_id,)).fetchone()
            if row is not None and row[0]:
                conn.execute("SELECT pg_notify(%s, %s)", (node_channel(node_id), "c" + row_id))

        waiting: Deferred = Deferred()
        self._pending[row_id] = _Pending(node_id, waiting)
        limit = self._timeouts.get(str(request.get("method")), self._timeouts.get(kind, self._timeout))
        expired: list[bool] = []
        timer = self._reactor.callLater(limit, lambda: (expired.append(True), waiting.cancel()))
        try:
            await self._pool.run(send)
            self.counts["sent"] += 1
            reply = await waiting
        except CancelledError:
            if not expired:
                raise  # our caller gave up (e.g. a gateway's connection closed): not an error of the forward
            self.counts["failed"] += 1
            raise ForwardError(f"node {node_id} did not answer a forwarded {kind} request in time") from None
        except ForwardError:
            self.counts["failed"] += 1
            raise
        finally:
            self._pending.pop(row_id, None)
            if timer.active():
                timer.cancel()
            self._pool.run(drop).addErrback(lambda f: self._log.failure("could not drop a forward", f))
        if "notHere" in reply:
            self.counts["failed"] += 1
            raise ForwardError(f"node {node_id} does not hold the call (its owner: {reply['notHere']})")
        return reply

    def recheck(self, alive: Collection[str] | None = None) -> Deferred[None]:
        """
        Fail at once the forwards waiting for a node that is no longer live (`alive`: the live
        nodes' ids, e.g. a heartbeat's snapshot; None: read now), so that they are routed again.
        """
        targets = {p.target for p in self._pending.values()}
        if not targets:
            return succeed(None)
        if alive is not None:
            return succeed(self._fail_dead(targets - set(alive)))

        def live(conn) -> set[str]:
            return {r[0] for r in conn.execute(
                f"SELECT node_id FROM nodes WHERE node_id = ANY(%s) AND {alive_sql(self._lease_seconds)}",
                (list(targets),),
            )}

        d = self._pool.run(live).addCallback(lambda up: self._fail_dead(targets - up))
        return d.addErrback(lambda f: self._log.failure("could not re-check the nodes forwarded to", f))

    def _fail_dead(self, dead: Collection[str]) -> None:
        for row_id, p in list(self._pending.items()):
            if p.target in dead and not p.waiting.called:
                self._log.info("node {node} is gone: its forward {row} is routed again", node=p.target, row=row_id)
                p.waiting.errback(ForwardError(f"node {p.target} left or died before it answered"))

    def _collect(self, row_id: str) -> None:
        """Read the reply of forward `row_id`, and hand it to its waiter."""
        me = self.node_id

        def take(conn):
            row = conn.execute("SELECT reply FROM forwards WHERE id = %s AND from_node = %s AND reply IS NOT NULL", (row_id, me)).fetchone()
            return None if row is None else row[0]

        def got(reply) -> None:
            p = self._pending.get(row_id)
            if reply is not None and p is not None and not p.waiting.called:
                p.waiting.callback(reply if isinstance(reply, dict) else json.loads(reply))

        self._pool.run(take).addCallback(got).addErrback(lambda f: self._log.failure("could not read a forward's reply", f))

    # -- notifications ------------------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        kind, row_id = payload[:1], payload[1:]
        if kind == "r" and row_id in self._pending:
            self._collect(row_id)
        elif kind == "q" and row_id:
            self._enqueue(row_id)
        elif kind == "c" and row_id in self._serving:
            self._serving[row_id].cancel()

    def _reread(self) -> None:
        """Listening (again): take the rows addressed here, and the replies waited for, that were missed."""
        me, waiting, serving = self.node_id, list(self._pending), list(self._serving)

        def missed(conn) -> tuple[list[str], list[str], set[str]]:
            asked = [r[0] for r in conn.execute("SELECT id FROM forwards WHERE to_node = %s AND claimed_by IS NULL ORDER BY created_at", (me,))]
            answered = [r[0] for r in conn.execute("SELECT id FROM forwards WHERE from_node = %s AND reply IS NOT NULL AND id = ANY(%s)", (me, waiting))]
            kept = {r[0] for r in conn.execute("SELECT id FROM forwards WHERE id = ANY(%s)", (serving,))}
            return asked, answered, set(serving) - kept

        def found(ids) -> None:
            asked, answered, dropped = ids
            for row_id in answered:
                self._collect(row_id)
            for row_id in asked:
                self._enqueue(row_id)
            for row_id in dropped:  # its sender gave up while we were not listening
                if row_id in self._serving:
                    self._serving[row_id].cancel()

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
        kind, envelope = row[0], row[1] if isinstance(row[1], dict) else json.loads(row[1])
        handler = self._handlers.get(kind)
        running = self._serving[row_id] = ensureDeferred(self._handle(handler, kind, envelope))
        try:
            reply = await running
        except CancelledError:
            reply = None
        finally:
            self._serving.pop(row_id, None)
        if reply is None:  # its sender gave up: nobody reads an answer
            self._log.info("a forwarded {kind} request was cancelled by its sender", kind=kind)
            return
        self.counts["served"] += 1
        await self._answer(row_id, reply)

    async def _handle(self, handler: Callable[[dict], Awaitable[dict]] | None, kind: str, envelope: dict) -> dict:
        if handler is None:
            return {"error": {"message": f"unknown forwarded request kind {kind!r}"}}
        refs = [r for r in envelope.get("refs") or () if r]
        try:
            if refs and not any(self._is_local(r) for r in refs):
                owner = await self.owner(refs)
                if owner is not None and owner.node_id == self.node_id and not owner.terminal:
                    await self._adopting(owner.call_id)  # claimed by this node, still loading: as route() does
                elif owner is not None and owner.node_id not in (None, self.node_id):
                    return {"notHere": owner.node_id}  # the sender routes it again
            return await handler(envelope["request"])
        except CancelledError:
            raise
        except Exception:
            # Handlers encode their own errors (this is a bug, or the store failed), but the sender still gets an answer now.
            self._log.failure("a forwarded {kind} request failed", kind=kind)
            return {"error": {"message": "the owner node failed the request"}}

    def _answer(self, row_id: str, reply: dict) -> Deferred:
        body = json.dumps(reply, separators=(",", ":"))

        def store(conn) -> None:
            row = conn.execute(
                "UPDATE forwards SET reply = %s, claimed_by = coalesce(claimed_by, 'refused') WHERE id = %s RETURNING from_node", (body, row_id)
            ).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify(%s, %s)", (node_channel(row[0]), "r" + row_id))

        return self._pool.run(store)
