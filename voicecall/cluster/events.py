# -*- test-case-name: tests.test_cluster_route -*-
"""
`voicecall.subscribe` on any node sees every node's call events.

This node's events reach its subscribers straight from its CallManager, as on a single node (once
durable). Other nodes' events are read from the store's ``events`` table: every insert there
NOTIFYs ``voicecall_events`` with the row's seq (the PostgreSQL store does it), and on each
notification the feed reads the rows after the last one it delivered. The feed reads this node's
own rows too; they are recognised (their JSON equals one it delivered from the manager) and
skipped, so each event reaches a subscriber once. A seq notified after a higher one was read (two
transactions that committed out of their seqs' order) is read on its own. After the LISTEN
connection was lost, the rows after the last delivered one are read again. No polling.

Bounds: the JSON of at most `MAX_ECHOES` local events waits for its row to be seen (the oldest is
forgotten first); at most `MAX_SEEN` recent seqs are remembered; one read at a time (a
notification during a read asks for one more read afterwards), of at most `READ_LIMIT` rows.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from voicecall.domain.pgschema import EVENTS_CHANNEL
MAX_ECHOES = 4096
MAX_SEEN = 4096
READ_LIMIT = 1000


def _identity(event: dict) -> str:
    return json.dumps({k: v for k, v in event.items() if k != "seq"}, sort_keys=True, separators=(",", ":"))


@define(repr=False)
class ClusterEvents:
    """The cluster-wide event feed: `subscribe(listener)` as CallManager.subscribe, for every node's calls."""

    _pool: Any  # voicecall.infra.pg.PgPool
    #: This node's manager's subscribe.
    _local_subscribe: Callable[[Callable[[dict], None]], Callable[[], None]]
    #: The store's events_after(seq, limit) and last_events(n) (Deferreds of event dicts with "seq").
    _events_after: Callable[[int, int], Deferred]
    _last_events: Callable[[int], Deferred]
    _listeners: list[Callable[[dict], None]] = field(factory=list)
    _echoes: OrderedDict = field(factory=OrderedDict)
    _seen: OrderedDict = field(factory=OrderedDict)
    _last_seq: int = 0
    _reading: bool = False
    _again: bool = False
    _listener: Any = None
    _unsubscribe: Callable[[], None] | None = None
    _log = Logger()

    def start(self) -> Deferred:
        """Follow the store from its newest event on."""

        def newest(events: list) -> None:
            self._last_seq = events[-1]["seq"] if events else 0
            self._unsubscribe = self._local_subscribe(self._local)
            self._listener = self._pool.listen(EVENTS_CHANNEL, self._notified, self._read)

        return self._last_events(1).addCallback(newest)

    def stop(self) -> Deferred | None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        listener, self._listener = self._listener, None
        return listener.stop() if listener is not None else None

    def subscribe(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _deliver(self, event: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self._log.failure("call event subscriber failed")

    def _local(self, event: dict) -> None:
        """An event of this node's manager: delivered now; its row will be skipped."""
        key = _identity(event)
        self._echoes[key] = self._echoes.get(key, 0) + 1
        self._echoes.move_to_end(key)
        while len(self._echoes) > MAX_ECHOES:
            self._echoes.popitem(last=False)
        self._deliver(event)

    def _notified(self, payload: str) -> None:
        if not payload.isdigit():
            return
        seq = int(payload)
        if seq > self._last_seq:
            self._read()
        elif seq not in self._seen:
            self._events_after(seq - 1, 1).addCallback(self._rows).addErrback(self._failed)

    def _read(self) -> None:
        """Read (and deliver) the rows after the last delivered one."""
        if self._reading:
            self._again = True
            return
        self._reading = True
        self._again = False

        def done(rows: list) -> None:
            self._reading = False
            self._rows(rows)
            if self._again or len(rows) >= READ_LIMIT:
                self._read()

        def failed(f) -> None:
            self._reading = False
            self._failed(f)

        self._events_after(self._last_seq, READ_LIMIT).addCallbacks(done, failed)

    def _rows(self, rows: list) -> None:
        for event in rows:
            seq = event.get("seq")
            if not isinstance(seq, int) or seq in self._seen:
                continue
            self._seen[seq] = None
            while len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
            self._last_seq = max(self._last_seq, seq)
            key = _identity(event)
            count = self._echoes.get(key)
            if count:
                if count == 1:
                    del self._echoes[key]
                else:
                    self._echoes[key] = count - 1
                continue
            self._deliver({k: v for k, v in event.items() if k != "seq"})

    def _failed(self, failure) -> None:
        self._log.failure("could not read other nodes' call events", failure)
