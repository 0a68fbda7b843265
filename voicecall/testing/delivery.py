# -*- test-case-name: tests.test_chaos_fakes -*-
"""
How every fake carrier delivers its webhooks: through an injected HTTP client on an injected
clock, as badly as its `Chaos` says (DESIGN.md "Delivery semantics"), with a log of every
delivery and a way to wait until none is in flight.

A notification (status callback, event webhook) waits `Chaos.delivery_delay()` and may be
delivered again `Chaos.duplicate_after()` later; a document fetch (TwiML, XML) waits
`Chaos.fetch_delay()` and may be made twice at once (`Chaos.repeat_fetch()`). A redelivery is
re-signed when it is sent, and its answer is ignored. Answers are read up to 64 KB.

A carrier subclasses `Courier` and supplies its wire format: `_signed` (the request as the
carrier sends it, signed now), `_again` (the redelivery of a webhook), `_answered` (where the
answer goes on its webhook record) and, if it fetches documents, `_is_document`.

It imports nothing of the daemon but its bounded body reader (L{voicecall.infra.bodies}).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping
from urllib.parse import urlencode

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from voicecall.infra.bodies import BodyTooLarge, read_bounded
from voicecall.testing.chaos import Chaos

#: The largest answer a fake carrier reads (Twilio refuses TwiML documents over 64 KB).
MAX_ANSWER_BYTES = 64 * 1024
#: Deliveries kept in a carrier's log (oldest dropped first).
MAX_LOGGED = 10_000


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` appended to its query, as a carrier's GET webhook carries them."""
    if not params:
        return url
    sep = "" if url.endswith(("?", "&")) else ("&" if "?" in url else "?")
    return url + sep + urlencode(params)


@define
class Courier:
    """
    The webhook deliveries of one fake carrier: `deliver` sends one (with its chaos), `webhooks`
    logs every delivery made (redeliveries too), `settle` waits until none is in flight.
    """

    clock: Any  # IReactorTime
    http: Any  # treq HTTPClient or StubTreq
    webhook_timeout: float = field(default=15.0, kw_only=True)
    chaos: Chaos = field(factory=Chaos, kw_only=True)
    webhooks: deque = field(factory=lambda: deque(maxlen=MAX_LOGGED), kw_only=True)
    _in_flight: set = field(factory=set, kw_only=True)
    _log = Logger()

    # -- what each carrier supplies ---------------------------------------------------------

    def _signed(self, hook: Any) -> tuple[str, str, bytes | None, dict[str, list[str]]]:
        """(method, url, body, headers) of `hook` as the carrier sends it now, signature recorded on it."""
        raise NotImplementedError

    def _again(self, hook: Any) -> Any:
        """The carrier's redelivery of `hook` (same event, next attempt; signed when sent)."""
        raise NotImplementedError

    def _answered(self, hook: Any, status: int, body: bytes) -> None:
        """Record the answer on `hook`."""
        raise NotImplementedError

    def _is_document(self, hook: Any) -> bool:
        """Whether `hook` fetches a document the call follows (not a notification)."""
        return False

    # -- delivery ---------------------------------------------------------------------------

    def deliver(self, hook: Any) -> Deferred:
        """Send a signed webhook; fire with the hook once answered (status/answer or error set)."""
        self.webhooks.append(hook)
        return self.track(Deferred.fromCoroutine(self._deliver(hook)))

    def track(self, d: Deferred) -> Deferred:
        """Count `d` as in flight until it fires (see `settle`)."""
        self._in_flight.add(d)

        def done(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(done)

    def settle(self) -> Deferred:
        """A Deferred that fires once no webhook is in flight (for tests and shutdown)."""
        if not self._in_flight:
            return succeed(None)
        d = DeferredList(list(self._in_flight), consumeErrors=True)
        d.addCallback(lambda _: self.settle())
        return d

    async def _deliver(self, hook: Any) -> Any:
        """Chaos first (a late or delayed delivery, maybe a duplicate), then the signed request."""
        document = self._is_document(hook)
        delay = self.chaos.fetch_delay() if document else self.chaos.delivery_delay()
        if delay > 0:
            await deferLater(self.clock, delay)
        if document:
            again = 0.0 if self.chaos.repeat_fetch() else None
        else:
            again = self.chaos.duplicate_after()
        if again is not None:
            d = self.track(Deferred.fromCoroutine(self._redeliver(self._again(hook), again)))
            d.addErrback(self._redelivery_failed)
        return await self._send(hook)

    def _redelivery_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self._log.failure("fake carrier redelivery failed", failure)

    async def _redeliver(self, hook: Any, after: float) -> Any:
        """The carrier's retry, `after` seconds later; its answer is ignored."""
        await deferLater(self.clock, after)
        self.webhooks.append(hook)
        return await self._send(hook)

    async def _send(self, hook: Any) -> Any:
        method, url, body, headers = self._signed(hook)
        try:
            d = self.http.request(method, url, data=body, headers=headers, allow_redirects=False)
            d.addTimeout(self.webhook_timeout, self.clock)
            response = await d
            reading = read_bounded(response, MAX_ANSWER_BYTES)
            reading.addTimeout(self.webhook_timeout, self.clock)
            self._answered(hook, response.code, await reading)
        except CancelledError:
            hook.error = "cancelled"
            raise
        except BodyTooLarge:
            hook.error = f"answer larger than {MAX_ANSWER_BYTES // 1024} KB"
        except Exception as e:
            hook.error = f"{type(e).__name__}: {e}"[:300]
        return hook
