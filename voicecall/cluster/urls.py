# -*- test-case-name: tests.test_cluster_route -*-
"""
The URLs a carrier may have signed a webhook for, in a cluster: besides this node's own
``publicUrl`` (which the provider checks first), the cluster's ``entryUrl`` and the ``publicUrl``
of every other row of the store's ``nodes`` table. A crashed node keeps its row, and a node that
stopped cleanly keeps its row marked stopped (nodes.py): its calls were adopted, but callbacks
signed for its URL keep coming (a Plivo call's hangup_url cannot be moved, a ringing Twilio call
is not re-pointed), and a load balancer sends them to a live node. A row not alive is pruned once
it owns no live call and every call it could have placed has ended (nodes.py `prune`); its URL is
then no longer accepted. Nothing else is: an origin a request merely claims (its Host header)
never widens the set, it only orders it: the URLs whose host is the request's are tried first,
so a bad signature costs few checks when Host names a node.

The set is cached and read again when a node joins or leaves (the node registry's notification,
wired by tap.py) and after its LISTEN reconnected. At most `MAX_NODES` URLs are held, those of
the most recent heartbeats.
"""
from __future__ import annotations

from typing import Any, Sequence
from urllib.parse import urlsplit

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
            rows = conn.execute(
                "SELECT public_url FROM nodes WHERE public_url <> '' GROUP BY public_url ORDER BY max(heartbeat_at) DESC LIMIT %s",
                (MAX_NODES,),
            )
            return [url for (url,) in rows]

        def got(urls: list[str]) -> None:
            self._nodes = tuple(urls)

        return self._pool.run(read).addCallback(got).addErrback(lambda f: self._log.failure("could not read the cluster's node URLs", f))

    def __call__(self, host: str | None = None) -> Sequence[str]:
        """The URLs to check, those whose host is `host`'s (a request's Host header) first."""
        urls = [self._entry] if self._entry else []
        urls += self._nodes
        unique = tuple(dict.fromkeys(u for u in urls if u and u != self._own))
        name = _host("//" + host) if host else None
        if name is None:
            return unique
        return tuple(sorted(unique, key=lambda url: _host(url) != name))


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None
