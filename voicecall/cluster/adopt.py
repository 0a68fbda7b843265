# -*- test-case-name: tests.test_cluster_live -*-
"""
Adoption: the live calls of a dead node are taken over by live nodes.

A call is an orphan when it is not over (``calls.terminal`` false) and its ``owner_node`` is not a
live node (no row in ``nodes``; stopped cleanly; or a heartbeat older than that node's own lease,
kept in its row: it died). `Adopter.sweep()` (run after each heartbeat of this node, and when another node leaves)
claims this node's part of the orphans in one transaction:

    UPDATE calls SET owner_node = <me> FROM (SELECT ... FOR UPDATE SKIP LOCKED)

The live nodes, in node id order, split the orphans by a hash of the call id (node i of n takes
those whose hash is i modulo n), so a dead node's calls spread evenly over the survivors, each
taking its part at its first sweep: within ``lease * 4/3`` of the last heartbeat (every live node
sweeps after each of its beats, every ``lease / 3``). A call whose part's node did not take it
(the live nodes changed meanwhile) goes to whichever node sweeps first once its owner has been
silent for ``3 * lease``. ``SKIP LOCKED`` keeps two adopters off the same call (a row another
sweep is claiming is skipped, not waited for). A sweep repeats while it claims `MAX_CLAIM` calls
(a backlog). Only a node whose own heartbeat is fresh adopts (in the store, and by its own
monotonic clock: not while `fenced()`, see nodes.py), and a SILENT node's calls (not stopped: its
beat just older than the lease) only a node that is `steady()`: whose own beats have succeeded
without a gap for a whole lease. When the database was down (or cut off from every node) all
beats stopped together, and the first node back would otherwise take everyone's calls; this
way every node has had a lease to beat again first. A stopped node's calls (and calls with no
owner) are anyone's at once. The store's fencing then refuses every
write of the dead node to these calls, should it come back; and its next heartbeat finds the calls
another node owns now and releases them (`CallManager.release`, nodes.py), never ended, so the
two nodes do not both run them.

The claimed records are loaded from the store and handed to the manager (`CallManager.adopt`,
which checks each with the carrier and closes what ended meanwhile), then each live, answered
one is re-pointed at this node (`CallControl.repoint_call`: Twilio call update, Plivo transfer;
a streamed call so gets a fresh stream to this node). `adopt_call(call_id)` is the same for one
call, for a request that reaches this node for a dead node's call before a sweep took it (the
router's). A `continue` waiting on the dead node is lost with its RPC connection; everything the
dead node acknowledged is in the store, and so survives.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from voicecall.cluster.nodes import alive_sql, row_lease

#: Calls one sweep's transaction claims at most (a sweep repeats while it claims this many).
MAX_CLAIM = 500
#: A dead node's call that its part's node did not take goes to any node after this many leases.
ANYONE_AFTER_LEASES = 3


def _live(lease_seconds: float) -> str:
    return f"(SELECT node_id FROM nodes WHERE {alive_sql(lease_seconds)})"


def _orphan(lease_seconds: float, steady: bool) -> str:
    """A call without a live owner; unless `steady`, only one whose owner stopped (or has no row)."""
    held = _live(lease_seconds)
    if not steady:  # a silent node keeps its calls (it may only be where this node was: cut off)
        held = f"(SELECT node_id FROM nodes WHERE pid IS NOT NULL OR node_id IN {held})"
    return f"NOT c.terminal AND (c.owner_node IS NULL OR c.owner_node NOT IN {held})"


def claim_share(conn, me: str, lease_seconds: float, steady: bool = True) -> list[tuple[str, str | None]]:
    """
    Claim this node's part of the orphan calls: [(call_id, previous owner)]; none unless `me` is
    live; a silent node's calls only if `steady` (see `NodeRegistry.steady`).
    """
    row = conn.execute(
        "SELECT rank, n FROM (SELECT node_id, row_number() OVER (ORDER BY node_id) - 1 AS rank, count(*) OVER () AS n"
        f" FROM nodes WHERE node_id IN {_live(lease_seconds)}) live WHERE node_id = %s",
        (me,),
    ).fetchone()
    if row is None:
        return []  # this node's own heartbeat is stale: it may be the one cut off
    rank, live = int(row[0]), int(row[1])
    long_dead = f"(SELECT node_id FROM nodes WHERE heartbeat_at < now() - {ANYONE_AFTER_LEASES} * {row_lease(lease_seconds)})"
    return _claim(
        conn,
        me,
        f"{_orphan(lease_seconds, steady)} AND (mod(hashtext(c.call_id)::bigint + 2147483648, %s) = %s OR c.owner_node IN {long_dead})"
        " ORDER BY c.started_at LIMIT %s",
        (live, rank, MAX_CLAIM),
    )


def claim_one(conn, me: str, lease_seconds: float, call_id: str, steady: bool = True) -> list[tuple[str, str | None]]:
    """Claim `call_id` if it is an orphan (or already ours: a claim whose load did not finish)."""
    return _claim(
        conn,
        me,
        f"c.call_id = %s AND NOT c.terminal AND (c.owner_node = %s OR {_orphan(lease_seconds, steady)})",
        (call_id, me),
    )


def _claim(conn, me: str, where: str, params: Sequence[Any]) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        "WITH picked AS (SELECT c.call_id, c.owner_node FROM calls c WHERE " + where + " FOR UPDATE OF c SKIP LOCKED)"
        " UPDATE calls SET owner_node = %s FROM picked WHERE calls.call_id = picked.call_id"
        " RETURNING calls.call_id, picked.owner_node",
        (*params, me),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def release(conn, me: str, call_ids: Sequence[str]) -> None:
    """Give back calls this node claimed but could not run (no owner: an orphan for the next sweep)."""
    conn.execute("UPDATE calls SET owner_node = NULL WHERE call_id = ANY(%s) AND owner_node = %s", (list(call_ids), me))


@define(repr=False)
class Adopter:
    """Takes over the calls of dead nodes; see the module docstring."""

    _pool: Any  # voicecall.infra.pg.PgPool
    _store: Any  # the PostgreSQL store: get_call
    _manager: Any  # voicecall.domain.manager.CallManager: adopt, find
    _provider: Any  # voicecall.domain.carrier.CallControl: repoint_call
    node_id: str
    lease_seconds: float
    #: This node's webhook URL (known once it listens), where adopted calls are re-pointed.
    _webhook_url: Callable[[], "str | None"]
    #: Whether this node must not act now (NodeRegistry.fenced): it then adopts nothing.
    _fenced: Callable[[], bool] = lambda: False
    #: Whether this node may take a silent node's calls (NodeRegistry.steady); a stopped one's it always may.
    _steady: Callable[[], bool] = lambda: True
    #: Calls adopted by this node since it started (metrics).
    adopted: int = field(default=0, init=False)
    _sweeping: Deferred | None = field(default=None, init=False)
    _again: bool = field(default=False, init=False)
    #: call_id -> the adoption of that call under way (a second request for it waits for it).
    _loading: dict[str, Deferred] = field(factory=dict, init=False)
    _running: bool = field(default=False, init=False)
    _log = Logger()

    def start(self) -> Deferred[int]:
        """Adopt from now on (after this node restored its own calls), starting with a sweep."""
        self._running = True
        return self.sweep()

    def stop(self) -> Deferred[None]:
        """Adopt nothing more (the node is stopping); fires once a sweep under way has ended."""
        self._running = False
        sweeping, done = self._sweeping, Deferred()
        if sweeping is None:
            done.callback(None)
        else:
            sweeping.addBoth(lambda r: (done.callback(None), r)[1])
        return done

    def sweep(self, *_: object) -> Deferred[int]:
        """Claim and run this node's share of the orphan calls; fires with how many were claimed."""
        if not self._running or self._fenced():
            return succeed(0)
        if self._sweeping is not None:
            self._again = True  # one sweep at a time; another runs right after it
            waiting: Deferred[int] = Deferred()
            self._sweeping.addBoth(lambda r: (waiting.callback(0), r)[1])
            return waiting
        d = Deferred.fromCoroutine(self._sweep())

        def done(result: Any) -> Any:
            self._sweeping = None
            if self._again and self._running:
                self._again = False
                self.sweep()
            return result

        self._sweeping = d
        d.addBoth(done)
        d.addErrback(lambda f: (self._log.warn("Adoption sweep failed: {error}", error=f.getErrorMessage()), 0)[1])
        return d

    async def _sweep(self) -> int:
        total = 0
        while self._running:
            claimed = await self._pool.run(partial(claim_share, me=self.node_id, lease_seconds=self.lease_seconds, steady=self._steady()))
            total += len(claimed)
            if claimed:
                await self._take(claimed)
            if len(claimed) < MAX_CLAIM:
                break
        return total

    def adopt_call(self, call_id: str) -> Deferred[bool]:
        """Make this node the owner of `call_id` if its owner is dead, and run it here; True if it now runs here."""
        if not self._running or self._fenced():
            return succeed(self._manager.find(call_id) is not None)
        loading = self._loading.get(call_id)
        if loading is not None:
            waiting: Deferred[bool] = Deferred()
            loading.addBoth(lambda r: (waiting.callback(self._manager.find(call_id) is not None), r)[1])
            return waiting
        return Deferred.fromCoroutine(self._adopt_call(call_id))

    async def _adopt_call(self, call_id: str) -> bool:
        # A sweep under way may hold the call's row (SKIP LOCKED then skips it here): its end,
        # which loaded what it claimed, is waited for, before the claim and after an empty one.
        await self._sweep_ended()
        if self._manager.find(call_id) is not None:
            return True
        steady = self._steady()
        claimed = await self._pool.run(lambda conn: claim_one(conn, self.node_id, self.lease_seconds, call_id, steady))
        if claimed:
            await self._take(claimed)
        else:
            await self._sweep_ended()
        return self._manager.find(call_id) is not None

    async def _sweep_ended(self) -> None:
        sweeping = self._sweeping
        if sweeping is not None:
            ended: Deferred[None] = Deferred()
            sweeping.addBoth(lambda r: (ended.callback(None), r)[1])
            await ended

    async def _take(self, claimed: Sequence[tuple[str, "str | None"]]) -> None:
        ids = [call_id for call_id, _ in claimed if call_id not in self._loading]
        mine: Deferred = Deferred()
        for call_id in ids:
            self._loading[call_id] = mine
        try:
            owners = sorted({owner or "(none)" for _, owner in claimed})
            self._log.info("Adopting {n} call(s) of {owners}", n=len(ids), owners=", ".join(owners))
            records = []
            for call_id in ids:
                record = await self._store.get_call(call_id)
                if record is not None and not record.is_terminal:
                    records.append(record)
            held = await self._manager.adopt(records)
            self.adopted += len(held)
            self._repoint(held)
        except BaseException:
            # Claimed but not running here: give them back (an orphan again, for the next sweep).
            dropped = [call_id for call_id in ids if self._manager.find(call_id) is None]
            await self._pool.run(lambda conn: release(conn, self.node_id, dropped))
            raise
        finally:
            for call_id in ids:
                if self._loading.get(call_id) is mine:
                    del self._loading[call_id]
            mine.callback(None)

    def _repoint(self, calls: Sequence[Any]) -> None:
        url = self._webhook_url()
        if url is None:
            return
        for call in calls:
            if call.answered_at is None:
                continue  # not live at the carrier yet: it cannot be redirected (Twilio 21220)
            self._provider.repoint_call(call, url).addErrback(
                lambda f, call_id=call.call_id: self._log.warn(
                    "Could not re-point adopted call {call_id} at this node: {error}", call_id=call_id, error=f.getErrorMessage()
                )
            )
