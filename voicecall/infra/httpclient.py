# -*- test-case-name: tests.test_wiring,tests.test_tap -*-
"""
The one treq client, with its connection pool, through which the daemon reaches every outside
HTTP API (the carriers, TTS, chat).

Each connection the pool opens would log Twisted's "Starting factory"/"Stopping factory" pair
(twisted/twisted#9330) to every log destination twistd sets up. twistd gives a plugin no public
hook on all of them (``--logger`` wins over the Application's observer, and the log file and
syslog observers are twistd's own), so the pool quiets them at the source, through public APIs
only: it overrides `HTTPConnectionPool.getConnection` to hand the endpoint a factory whose
`Factory.noisy` is False and which builds the pool's protocols.
"""
from __future__ import annotations

from treq.client import HTTPClient
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer


class _QuietFactory(Factory):
    """The pool's connection factory without Factory's start/stop log lines (it has no start/stop work)."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr):
        return self._factory.buildProtocol(addr)


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint that connects the factories it is given through `_QuietFactory`."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory):
        return self._endpoint.connect(_QuietFactory(protocolFactory))


class _ApiPool(HTTPConnectionPool):
    """The connections to the carrier, TTS and chat APIs: a few kept open per host, opened quietly."""

    maxPersistentPerHost = 8

    def getConnection(self, key, endpoint):
        return super().getConnection(key, _QuietEndpoint(endpoint))


def build_http_client(reactor):
    """One treq client with its own connection pool for every outside HTTP API."""
    pool = _ApiPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool
