# -*- test-case-name: tests.test_wiring -*-
"""The one treq client, with its connection pool, through which the daemon reaches every outside HTTP API."""
from __future__ import annotations

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool


class _ApiPool(HTTPConnectionPool):
    """
    The connections to the carrier, TTS and chat APIs: a few kept open per host. What each says
    when it opens and closes is Twisted's chatter (`_drop_chatter`).
    """

    maxPersistentPerHost = 8


def build_http_client(reactor):
    """One treq client with its own connection pool for every outside HTTP API."""
    pool = _ApiPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool
