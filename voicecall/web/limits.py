# -*- test-case-name: tests.test_webhook -*-
"""
Pre-auth request limits for the webhook Site (SPEC §8.1 steps 5-7 [H], §20 item 16).

twisted.web reads a whole request body before a resource sees it. These classes let the Site
screen a request once its headers are in and before its body is read: refuse it (401 unsigned,
429 too many in flight from one address, 413 declared too large) without reading the body; cap
the body actually received (413); and give the body a time budget (408). The headers get a
budget of their own, counted from the connection's opening or from a kept-alive request's first
byte (408): the idle timeout restarts with every byte, so without it a client dribbling one header
byte now and then would hold its connection forever.
"""
from __future__ import annotations

from typing import Callable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT_SECONDS = 5.0
MAX_IN_FLIGHT_PER_IP = 8
#: A connection idle this long is closed (Twisted's default is 12 h).
IDLE_TIMEOUT_SECONDS = 60
#: A request's line and headers must be in within this long.
HEADERS_TIMEOUT_SECONDS = 10.0

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


@frozen
class Refusal:
    """An answer given without reading (the rest of) the body; the connection is then closed."""

    status: int
    body: bytes


#: screen(method, path, headers, remote_ip, declared_length) -> Refusal | None, where headers map
#: lower-case names to first values. Called after the headers, before the body.
Screen = Callable[[bytes, bytes, dict, "str | None", "int | None"], "Refusal | None"]


def _write_refusal(transport, refusal: Refusal) -> None:
    reason = _REASONS.get(refusal.status, b"Error")
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (refusal.status, reason, len(refusal.body), refusal.body)
    )
    transport.loseConnection()


class ScreenedChannel(HTTPChannel):
    """
    An HTTPChannel that tells its current request its method and target before the body, and
    gives each request's headers a time budget.
    """

    _headers_deadline = None
    _awaiting_headers = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_headers_budget()

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and self._headers_deadline is None:
            self._start_headers_budget()  # the first byte of a kept-alive connection's next request
        super().dataReceived(data)

    def requestDone(self, request) -> None:
        # Set before the super call: it feeds any pipelined bytes already buffered, whose
        # headers may complete (and clear this) right there.
        self._awaiting_headers = True  # the budget starts with the next request's first byte
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._stop_headers_budget()
        super().connectionLost(reason)

    def _start_headers_budget(self) -> None:
        site = self.site
        self._headers_deadline = site.clock.callLater(site.headers_timeout, self._headers_timed_out)

    def _stop_headers_budget(self) -> None:
        deadline, self._headers_deadline = self._headers_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _headers_timed_out(self) -> None:
        self._headers_deadline = None
        self._awaiting_headers = False
        site = self.site
        site.refused(408)
        _write_refusal(self.transport, Refusal(408, f"Request headers not received within {site.headers_timeout:g}s".encode()))

    def allHeadersReceived(self) -> None:
        self._stop_headers_budget()
        self._awaiting_headers = False
        request = self.requests[-1]
        # Twisted keeps the request line on the channel until the body is complete.
        request.early_method = self._command
        request.early_uri = self._path
        super().allHeadersReceived()

    def _send100Continue(self) -> None:
        """Never invite the body of a request that was just refused."""
        if self.requests and getattr(self.requests[-1], "_refused", False):
            return
        super()._send100Continue()


class ScreenedRequest(Request):
    """A Request screened by its Site after the headers, with a capped, time-boxed body."""

    early_method: bytes = b""
    early_uri: bytes = b""
    _refused = False
    _received = 0
    _deadline = None
    _release: Callable[[], None] | None = None
    _log = Logger()

    def gotLength(self, length: int | None) -> None:
        site: ScreenedSite = self.channel.site
        refusal = site.screen_request(self, length)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._deadline = site.clock.callLater(site.read_timeout, self._timed_out)
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self._refuse(Refusal(413, b"Payload Too Large"))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_deadline()
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        self.release()
        super().connectionLost(reason)

    def finish(self) -> None:
        self.release()
        super().finish()

    def hold(self, release: Callable[[], None]) -> None:
        """Run `release` once, when this request is over however it ends."""
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _timed_out(self) -> None:
        self._deadline = None
        self._refuse(Refusal(408, f"Request body not received within {self.channel.site.read_timeout:g}s".encode()))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _refuse(self, refusal: Refusal) -> None:
        self._refused = True
        self._cancel_deadline()
        self.release()
        site: ScreenedSite = self.channel.site
        site.refused(refusal.status)
        _write_refusal(self.channel.transport, refusal)


class ScreenedSite(Site):
    """A Site whose requests are screened by `screen` before their bodies are read."""

    protocol = ScreenedChannel
    requestFactory = ScreenedRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource,
        *,
        clock: IReactorTime,
        screen: Callable[[ScreenedRequest, "int | None"], "Refusal | None"],
        max_body: int = MAX_BODY_BYTES,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        headers_timeout: float = HEADERS_TIMEOUT_SECONDS,
        on_refused: Callable[[int], None] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("timeout", IDLE_TIMEOUT_SECONDS)
        # The providers decode the raw body themselves; Twisted's own parse of it into
        # request.args (Content-Type through the email package) is wasted work.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, reactor=clock, **kwargs)
        self.clock = clock
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.headers_timeout = headers_timeout
        self._screen = screen
        self._on_refused = on_refused

    def screen_request(self, request: ScreenedRequest, length: int | None) -> Refusal | None:
        if length is not None and length > self.max_body:
            return Refusal(413, b"Payload Too Large")
        return self._screen(request, length)

    def refused(self, status: int) -> None:
        if self._on_refused is not None:
            self._on_refused(status)

    def log(self, request) -> None:
        """No per-request access log lines (they would carry query strings with call ids)."""


class InFlightLimiter:
    """At most `limit` requests in flight per remote address (missing addresses share a bucket)."""

    def __init__(self, limit: int = MAX_IN_FLIGHT_PER_IP) -> None:
        self._limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, ip: str | None) -> Callable[[], None] | None:
        """A release function, or None when `ip` already has `limit` requests in flight."""
        key = ip or ""
        count = self._counts.get(key, 0)
        if count >= self._limit:
            return None
        self._counts[key] = count + 1

        def release() -> None:
            left = self._counts.get(key, 1) - 1
            if left <= 0:
                self._counts.pop(key, None)
            else:
                self._counts[key] = left

        return release

    def __len__(self) -> int:
        return len(self._counts)
