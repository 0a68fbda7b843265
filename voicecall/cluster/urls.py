# -*- test-case-name: tests.test_cluster_route -*-
"""
The URLs a carrier may have signed a webhook for, in a cluster: besides this node's own
``publicUrl`` (which the provider checks first), the cluster's ``entryUrl`` and every other
node's ``publicUrl`` in the store's ``nodes`` table. A crashed node keeps its row until it
comes back, and its URL stays accepted meanwhile: a load balancer sends its calls' callbacks to
a live node, which adopts the call (its carrier signed them for the crashed node's URL). A node
that stopped cleanly deletes its row, and its URL is no longer accepted (its calls were adopted
and re-pointed at once). Nothing else is: an origin a request merely claims (its Host header)
never widens the set.

The set is cached and read again when a node joins or leaves (the node registry's notification,
wired by tap.py) and after its LISTEN reconnected. At most `MAX_NODES` URLs are held.
"""
from __future__ import annotations

from typing import Any, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger

MAX_NODES = 256


@define(repr=False)
class SignedUrls:
    """Callable: the other URLs a webhook may be signed for (this node's own first; not repeated)."""

    _pool: Any  # voicecall.infra.pg.PgPool
    #: This node's publicUrl (checked by the provider already, so left out here).
    _own: str | None
    _entry: str | None
    _nodes: tuple[str, ...] = field(default=())
    _log = Logger()

    def start(self) -> Deferred:
        return self.refresh()

    def stop(self) -> None:
        """Nothing to stop: it reads when told to."""

    def refresh(self, *_: object) -> Deferred:
        """Read the nodes' URLs again."""

        def read(conn) -> list[str]:
            return [url for (url,) in conn.execute("SELECT DISTINCT public_url FROM nodes ORDER BY public_url LIMIT %s", (MAX_NODES,))]

        def got(urls: list[str]) -> None:
            self._nodes = tuple(urls)

        return self._pool.run(read).addCallback(got).addErrback(lambda f: self._log.failure("could not read the cluster's node URLs", f))

    def __call__(self) -> Sequence[str]:
        urls = [self._entry] if self._entry else []
        urls += self._nodes
        return tuple(dict.fromkeys(u for u in urls if u and u != self._own))
