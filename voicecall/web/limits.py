# -*- test-case-name: tests.test_webhook,tests.test_webhook_screening -*-
"""
Pre-auth request limits for the webhook Site (SPEC §8.1 steps 5-7 [H], §20 item 16).

twisted.web reads a whole request body before a resource sees it. These classes let the Site
screen a request once its headers are in and before its body is read: refuse it (401 unsigned,
413 declared too large) without reading the body; cap the body actually received (413); and give
the body a time budget (408). The headers get a budget of their own, counted from the
connection's opening or from a kept-alive request's first byte (408): the idle timeout restarts
with every byte, so without it a client dribbling one header byte now and then would hold its
connection forever.

Slots: what an unauthenticated client can hold, and why it cannot starve the carrier
------------------------------------------------------------------------------------
A request is *unverified* from its headers until its body is in; the signature is checked the
moment the body is complete (synchronously, before anything is awaited), so "verified" and
"body complete" are the same instant. Only unverified requests whose body is still *arriving*
hold a slot:

- A request whose whole body came in the same read as its headers (what a carrier, or a proxy
  forwarding a carrier's request, nearly always sends) never takes a slot: admission is decided
  after the read that completed the headers, and by then its body is in. No number of slow
  bodies can refuse or delay it.
- Any other request takes a slot until its body is complete, then gives it back at once (the
  time spent applying a verified event holds nothing). Slots are capped per client
  (`MAX_IN_FLIGHT_PER_IP`, 8) and in total (`MAX_PENDING_TOTAL`, 256): at most 256 x 64 KB of
  unverified bodies in memory.
- When the cap a newcomer needs is full, the oldest request in that scope loses its slot (408)
  if its body has been arriving for `EVICT_PENDING_AFTER_SECONDS` or more, and the newcomer takes
  it; otherwise the newcomer gets 429 before its body. A carrier's body that comes in a second
  segment arrives within milliseconds, so it is never the one evicted; slow bodies are. To keep
  a scope full an attacker must open fresh requests faster than one slot per half second, which
  is a request-rate flood, not a slow-body one (the caps still bound what it costs).
- The client is the socket peer, or, when the peer is in `webhookSecurity.trustedProxyIPs`, the
  rightmost address in ``X-Forwarded-For`` (``X-Real-IP``) that is not a trusted proxy
  (`voicecall.web.security.ForwardingPolicy.client_ip`): behind a proxy every request comes from
  one address, and without it one slow client would use up the proxy's slots.

Refusals are logged by `RefusalLog`: one line each, target and reason cut to 200 characters and
stripped of control characters, at most `REFUSAL_LOG_BURST` lines per
`REFUSAL_LOG_INTERVAL_SECONDS`, then one line saying further refusals are suppressed and, in the
next interval, one line counting them.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from io import BytesIO
from typing import Callable

from attrs import frozen
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from voicecall.infra.private.http import handling_request, unparsed_bytes

MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT_SECONDS = 5.0
MAX_IN_FLIGHT_PER_IP = 8
#: Unverified requests whose bodies are still arriving, over all clients.
MAX_PENDING_TOTAL = 256
#: A full cap gives the slot of a request whose body has been arriving this long to a newcomer.
EVICT_PENDING_AFTER_SECONDS = 0.5
#: Refusal log lines per interval before further refusals are only counted.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_INTERVAL_SECONDS = 10.0
#: Request targets, addresses and reasons are cut to this many characters in the log.
LOG_FIELD_LIMIT = 200
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


def _write_refusal(transport, refusal: Refusal) -> None:
    reason = _REASONS.get(refusal.status, b"Error")
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (refusal.status, reason, len(refusal.body), refusal.body)
    )
    transport.loseConnection()


def clip(value: "str | bytes | None", limit: int = LOG_FIELD_LIMIT) -> str:
    """`value` for a log line: decoded, control characters dropped, cut to `limit` characters."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value[: limit * 4].decode("latin-1")
    elif not isinstance(value, str):
        value = str(value)
    text = "".join(c for c in value[: limit * 4] if c.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_QUERY = re.compile(r"\?[^\s]*")


#: The refusal log's own namespace (a Logger class attribute would take its owner's name).
_refusal_log = Logger(namespace="voicecall.web.limits.RefusalLog")


class _LineBudget:
    """
    `burst` log lines per `interval` seconds for one kind of event (`what`, plural; `short` names
    them again in the suppression line); past it, one line saying the rest are suppressed, and
    when the next interval opens, one line counting them.
    """


    def __init__(self, clock: IReactorTime, burst: int, interval: float, what: str, short: str) -> None:
        self._clock = clock
        self._short = short
        self.burst = burst
        self.interval = interval
        self._what = what
        self._window = None
        self._lines = 0
        self._suppressed = 0

    def take(self) -> bool:
        """Whether a line may be written now (if not, it is counted)."""
        now = self._clock.seconds()
        if self._window is None or now - self._window >= self.interval:
            if self._suppressed:
                _refusal_log.warn(
                    "suppressed {count} {what} in the last {seconds:.0f}s", count=self._suppressed, what=self._what, seconds=now - self._window
                )
            self._window, self._lines, self._suppressed = now, 0, 0
        if self._lines >= self.burst:
            if not self._suppressed:
                _refusal_log.warn(
                    "more than {burst} {what} in {interval:g}s: further {short} suppressed (counted) until the interval ends",
                    burst=self.burst,
                    what=self._what,
                    short=self._short,
                    interval=self.interval,
                )
            self._suppressed += 1
            return False
        self._lines += 1
        return True


class RefusalLog:
    """
    One short line per refused webhook request, rate limited: `burst` lines per `interval`
    seconds, then one line saying the rest are suppressed, and in the next interval one line
    counting them. Lines hold only clipped text (`clip`), and no query string (the target's is
    cut, and one in the reason, e.g. the URL a signature was checked over, is dropped): callback
    queries carry call ids and turn tokens. Replayed requests (acknowledged without effect) have
    a budget of their own, so one captured signed request replayed in a loop cannot grow the log.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, burst: int = REFUSAL_LOG_BURST, interval: float = REFUSAL_LOG_INTERVAL_SECONDS) -> None:
        self._refusals = _LineBudget(clock, burst, interval, "webhook refusals", "refusals")
        self._replays = _LineBudget(clock, burst, interval, "replayed webhooks", "replays")

    def refused(self, status: int, client: "str | None", method: bytes, target: bytes, reason: str = "") -> None:
        if not self._refusals.take():
            return
        self._log.info(
            "webhook refused {status} from {client}: {method} {target}{sep}{reason}",
            status=status,
            client=clip(client or "?", 64),
            method=clip(method, 16),
            target=clip(target.split(b"?", 1)[0]),
            sep=": " if reason else "",
            reason=clip(_QUERY.sub("", reason)),
        )

    def replayed(self, provider: str) -> None:
        if self._replays.take():
            self._log.info("replayed webhook acknowledged without effect ({provider})", provider=clip(provider, 32))


class ScreenedChannel(HTTPChannel):
    """
    An HTTPChannel that tells its current request its method and target before the body, gives
    each request's headers a time budget, and admits a request whose body is still arriving
    after the read that completed its headers (one whose body came with them needs no slot).
    """

    _headers_deadline = None
    #: The transport this channel paused while a request was handled (Twisted would not have).
    _paused_transport = None
    _awaiting_headers = True
    _to_admit = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_headers_budget()

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and self._headers_deadline is None:
            self._start_headers_budget()  # the first byte of a kept-alive connection's next request
        super().dataReceived(data)
        waiting, self._to_admit = self._to_admit, None
        if waiting is not None:
            waiting.admit()

    def admit_after_read(self, request: "ScreenedRequest") -> None:
        """Admit `request` once the current read is handled (now, if its body cannot be in it)."""
        self._to_admit = request

    def requestDone(self, request) -> None:
        # Set before the super call: it feeds any pipelined bytes already buffered, whose
        # headers may complete (and clear this) right there.
        self._awaiting_headers = True  # the budget starts with the next request's first byte
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._stop_headers_budget()
        super().connectionLost(reason)

    def pauseProducing(self) -> None:
        """
        The transport's buffer of unsent answers is full: read and parse nothing more until it
        drains. Twisted pauses the socket only if no request is being handled, but here every
        answer is written while its request is handled, so a client pipelining requests without
        reading the answers was read on and on (4 MB of tiny requests queued 18 MB of answers).
        Parsing stops at once too, so at most one answer past the full buffer is queued. Once a
        WebSocket has taken the connection over (our transport is None), Twisted's rule applies.
        Twisted's parser state is read through L{voicecall.infra.private.http}.
        """
        super().pauseProducing()
        if self.transport is None:
            return
        self.paused = True  # LineReceiver stops handing over the lines it has already read
        if handling_request(self, unknown=True):
            self._paused_transport = IPushProducer(self.transport, None)
            if self._paused_transport is not None:
                self._paused_transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        super().resumeProducing()  # resumes reading unless a request is being handled
        paused, self._paused_transport = self._paused_transport, None
        if paused is not None and self.transport is None:
            paused.resumeProducing()  # taken over meanwhile: nothing else will
        if (
            self.transport is not None
            and not self.transport.disconnecting
            and unparsed_bytes(self)
            and not handling_request(self, unknown=False)
        ):
            self.dataReceived(b"")  # parse what was read before the pause

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
        peer = getattr(self.transport.getPeer(), "host", None) if self.transport is not None else None
        site.refused(408, peer, b"-", b"-", "request headers too slow")
        _write_refusal(self.transport, Refusal(408, f"Request headers not received within {site.headers_timeout:g}s".encode()))

    def lineReceived(self, line: bytes) -> None:
        opened = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > opened:
            # The line opened a request. Twisted hands its method and target to the request only
            # with the body; the screen needs them with the headers.
            parts = line.split(b" ")
            if len(parts) == 3:
                request = self.requests[-1]
                request.early_method, request.early_uri = parts[0], parts[1]

    def allHeadersReceived(self) -> None:
        self._stop_headers_budget()
        self._awaiting_headers = False
        super().allHeadersReceived()


class ScreenedRequest(Request):
    """A Request screened by its Site after the headers, with a capped, time-boxed body."""

    early_method: bytes = b""
    early_uri: bytes = b""
    #: The client address the screen counted this request against ("" when none).
    slot_client: str = ""
    _refused = False
    _discard = False
    _body_done = False
    _received = 0
    _deadline = None
    _release: Callable[[], None] | None = None
    _limiter: "InFlightLimiter | None" = None
    _client: Callable[[], str] = staticmethod(lambda: "")

    def gotLength(self, length: int | None) -> None:
        site: ScreenedSite = self.channel.site
        refusal = site.screen_request(self, length)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._deadline = site.clock.callLater(site.read_timeout, self._timed_out)
        # In memory, whatever the length: the body is capped at `max_body` anyway, and Twisted
        # would give a chunked body (no length) a temporary file, a second descriptor each.
        self.content = BytesIO()

    def discard_body(self) -> None:
        """
        Read this request's body (capped, time-boxed) without keeping it: its answer does not
        depend on it, and it holds no slot, so it must cost no memory.
        """
        self._discard = True

    def needs_slot(self, limiter: "InFlightLimiter", client: Callable[[], str]) -> None:
        """
        Count this request against `limiter` as `client()` while its body is arriving: decided
        after the current read (a body that came with the headers needs no slot, and its client
        address is never worked out), or at once when the client waits for ``100 Continue``
        before sending it.
        """
        self._client = client
        self._limiter = limiter
        expect = self.requestHeaders.getRawHeaders(b"expect") or []
        if expect and expect[0].lower() == b"100-continue":
            self.admit()
        else:
            self.channel.admit_after_read(self)

    def admit(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is None or self._refused or self._body_done:
            return
        self.slot_client = self._client()
        release = limiter.acquire(self.slot_client, self._evicted, self.channel.site.clock.seconds())
        if release is None:
            self._refuse(Refusal(429, b"Too Many Requests"))
            return
        self._release = release

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self._refuse(Refusal(413, b"Payload Too Large"))
            return
        if self._discard:
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_deadline()
        self._body_done = True
        self.release()  # verified (or refused) as soon as the body is in: the slot is free
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

    def release(self) -> None:
        """Give back this request's slot, if it holds one."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def _timed_out(self) -> None:
        self._deadline = None
        self._refuse(Refusal(408, f"Request body not received within {self.channel.site.read_timeout:g}s".encode()))

    def _evicted(self) -> None:
        self._release = None  # the limiter has taken the slot back
        self._refuse(Refusal(408, b"Request body too slow: its slot went to a newer request"))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _refuse(self, refusal: Refusal) -> None:
        if self._refused:
            return
        self._refused = True
        # Twisted invites the body (100 Continue) right after gotLength when the request asks
        # for it: a refused request no longer asks.
        self.requestHeaders.removeHeader(b"expect")
        self._limiter = None
        self._cancel_deadline()
        self.release()
        site: ScreenedSite = self.channel.site
        peer = self.slot_client or getattr(self.getClientAddress(), "host", None)
        site.refused(refusal.status, peer, self.early_method, self.early_uri, _REASONS.get(refusal.status, b"").decode())
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
        self.refusal_log = RefusalLog(clock)
        self._screen = screen
        self._on_refused = on_refused

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def screen_request(self, request: ScreenedRequest, length: int | None) -> Refusal | None:
        if length is not None and length > self.max_body:
            return Refusal(413, b"Payload Too Large")
        return self._screen(request, length)

    def refused(self, status: int, client: "str | None", method: bytes, target: bytes, reason: str) -> None:
        """Count a refusal (`on_refused`) and log it (`refusal_log`, rate limited)."""
        if self._on_refused is not None:
            self._on_refused(status)
        self.refusal_log.refused(status, client, method, target, reason)

    def log(self, request) -> None:
        """No per-request access log lines (they would carry query strings with call ids)."""


class InFlightLimiter:
    """
    Slots for unverified requests whose bodies are still arriving: at most `limit` per client
    (missing addresses share the "" client) and `total` in all. A full cap hands the slot of its
    oldest holder to a newcomer when that holder has held it `evict_after` seconds or more (the
    holder's `on_evict` is called; it must answer and close); otherwise the newcomer is refused.
    """

    def __init__(
        self,
        limit: int = MAX_IN_FLIGHT_PER_IP,
        total: int = MAX_PENDING_TOTAL,
        evict_after: float = EVICT_PENDING_AFTER_SECONDS,
    ) -> None:
        self._limit = limit
        self._total = total
        self.evict_after = evict_after
        self._counts: dict[str, int] = {}
        #: every holder, oldest first: token -> (client, since, on_evict)
        self._holders: OrderedDict[object, tuple[str, float, Callable[[], None]]] = OrderedDict()
        #: per client, its holders oldest first
        self._by_client: dict[str, OrderedDict[object, None]] = {}

    def acquire(
        self, ip: str | None, on_evict: Callable[[], None] = lambda: None, now: float = 0.0
    ) -> Callable[[], None] | None:
        """
        A release function, or None when `ip`'s cap (or the total) is full of holders younger
        than `evict_after` at time `now` (the caller's clock).
        """
        key = ip or ""
        if self._counts.get(key, 0) >= self._limit:
            if not self._evict_oldest(self._by_client[key], now):
                return None
        elif len(self._holders) >= self._total:
            if not self._evict_oldest(self._holders, now):
                return None
        token = object()
        self._holders[token] = (key, now, on_evict)
        self._by_client.setdefault(key, OrderedDict())[token] = None
        self._counts[key] = self._counts.get(key, 0) + 1
        return lambda: self._drop(token)

    def _evict_oldest(self, holders: "OrderedDict[object, object]", now: float) -> bool:
        token = next(iter(holders))
        _key, since, on_evict = self._holders[token]
        if now - since < self.evict_after:
            return False
        self._drop(token)
        on_evict()
        return True

    def _drop(self, token: object) -> None:
        held = self._holders.pop(token, None)
        if held is None:
            return
        key = held[0]
        mine = self._by_client.get(key)
        if mine is not None:
            mine.pop(token, None)
            if not mine:
                del self._by_client[key]
        left = self._counts.get(key, 1) - 1
        if left <= 0:
            self._counts.pop(key, None)
        else:
            self._counts[key] = left

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"<InFlightLimiter {len(self._holders)} held>"
