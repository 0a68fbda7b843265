# -*- test-case-name: tests.test_private_http,tests.test_provider_http -*-
"""
The connection under an HTTP client response, a private name of Twisted's C{Response}
(C{_transport}), read here and nowhere else.

The JSON client (L{voicecall.infra.jsonhttp}) bounds a response's body in time: when the body
stops arriving it fails the request and drops the connection, since treq's body reader cannot
be cancelled. Twisted hands that connection only to the body's protocol; the response keeps it
as C{_transport}. At import the module checks the name on a throw-away response (an
C{HTTP11ClientProtocol} over a C{StringTransport}): it must be there and dropping it must close
the connection. If not, it logs that once and L{response_connection} answers None. What
degrades: the request still fails at its time limit, but the stalled connection stays open
until the server closes it.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.web.client import HTTP11ClientProtocol, Request
from twisted.web.http_headers import Headers

__all__ = ["FAST", "MISSING", "PRIVATE_NAMES", "response_connection"]

_log = Logger()

#: Every private name read here, as "owner.name".
PRIVATE_NAMES = ("Response._transport",)


def _check(protocol_factory: type[HTTP11ClientProtocol] = HTTP11ClientProtocol) -> tuple[str, ...]:
    """The entries of L{PRIVATE_NAMES} that are missing or do not behave as relied on."""
    transport = StringTransport()
    protocol = protocol_factory()
    try:
        protocol.makeConnection(transport)
        responses: list[Any] = []
        protocol.request(Request(b"GET", b"/", Headers({b"host": [b"localhost"]}), None)).addCallback(responses.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        [response] = responses
    except Exception:
        _log.failure("private.client: a throw-away HTTP client protocol does not answer")
        return PRIVATE_NAMES
    connection = getattr(response, "_transport", None)
    try:
        connection.loseConnection()
    except Exception:
        return PRIVATE_NAMES
    return () if transport.disconnecting else PRIVATE_NAMES


#: The private names that are missing or changed (empty when they are read).
MISSING: tuple[str, ...] = _check()
#: Whether the private names are read (otherwise L{response_connection} answers None).
FAST = not MISSING
if MISSING:
    _log.warn(
        "Twisted's client Response private names changed ({missing}): a response body that stalls "
        "past its time limit fails the request but leaves its connection open",
        missing=", ".join(MISSING),
    )


def response_connection(response: Any) -> Any | None:
    """
    The connection `response`'s body arrives on (something with C{loseConnection}), looked
    through treq's wrapper (its C{original}); None when that cannot be read.
    """
    if not FAST:
        return None
    while hasattr(response, "original"):
        response = response.original
    return getattr(response, "_transport", None)
