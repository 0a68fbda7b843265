# -*- test-case-name: tests.test_private_http -*-
"""
The webhook channel's view of Twisted's HTTP parser: two private names of C{HTTPChannel} (and
of the C{LineReceiver} under it), read here and nowhere else.

The webhook's channel (L{voicecall.web.limits.ScreenedChannel}) stops reading a client whose
answers pile up, and starts parsing again what it read meanwhile once they drain. Doing that
exactly needs two facts Twisted keeps private:

  - whether the channel is I{handling} a request: its body is in and its answer is not done
    (Twisted parses nothing of the next request meanwhile), C{HTTPChannel._handlingRequest};
  - whether bytes read from the connection still wait unparsed, C{LineReceiver._buffer}.

At import the module checks both, on a throw-away C{HTTPChannel} over a C{StringTransport}
(L{PRIVATE_NAMES}). If one is missing or behaves otherwise it logs that once, and the accessors
answer for the public path: L{handling_request} gives the caller's safe answer (C{unknown}),
L{unparsed_bytes} says "perhaps". What degrades: after a pause the channel parses again on
every resume, even when nothing waits, which restarts the connection's idle timer each time its
client drains answers (the 60 s idle limit then counts from the client's last read as well as
its last write). The headers and body budgets, the caps and the pipelining bound are unchanged.
"""
from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, Request

__all__ = ["FAST", "MISSING", "PRIVATE_NAMES", "handling_request", "unparsed_bytes"]

_log = Logger()

#: Every private name read here, as "owner.name".
PRIVATE_NAMES = ("HTTPChannel._handlingRequest", "LineReceiver._buffer")


class _Held(Request):
    """A request whose answer never comes: the channel stays handling it."""

    def process(self) -> None:
        pass


def _check(channel_factory: type[HTTPChannel] = HTTPChannel) -> tuple[str, ...]:
    """The entries of L{PRIVATE_NAMES} that are missing or do not behave as relied on."""
    channel = channel_factory()
    channel.requestFactory = _Held
    try:
        channel.makeConnection(StringTransport())
        states = [(getattr(channel, "_handlingRequest", None), getattr(channel, "_buffer", None))]
        channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
        states.append((getattr(channel, "_handlingRequest", None), getattr(channel, "_buffer", None)))
        channel.dataReceived(b"st: x\r\n\r\n")
        states.append((getattr(channel, "_handlingRequest", None), getattr(channel, "_buffer", None)))
    except Exception:
        _log.failure("private.http: a throw-away HTTPChannel does not parse a request")
        return PRIVATE_NAMES
    missing = []
    if [handling for handling, _ in states] != [False, False, True]:
        missing.append("HTTPChannel._handlingRequest")
    if [buffered for _, buffered in states] != [b"", b"Ho", b""]:
        missing.append("LineReceiver._buffer")
    return tuple(missing)


#: The private names that are missing or changed (empty when they are read).
MISSING: tuple[str, ...] = _check()
#: Whether the private names are read (otherwise the accessors answer for the public path).
FAST = not MISSING
if MISSING:
    _log.warn(
        "Twisted's HTTPChannel private names changed ({missing}): the webhook parses again on every "
        "resume after a full send buffer, and its idle timer restarts with each",
        missing=", ".join(MISSING),
    )


def handling_request(channel: HTTPChannel, unknown: bool) -> bool:
    """
    Whether `channel` is handling a request (its body is in, its answer not done); `unknown`
    when that cannot be read: the answer that is safe for the caller.
    """
    return channel._handlingRequest if FAST else unknown


def unparsed_bytes(channel: HTTPChannel) -> bool:
    """Whether bytes read from `channel`'s connection wait unparsed (True when that cannot be read)."""
    return bool(channel._buffer) if FAST else True
