# -*- test-case-name: tests.test_replay -*-
"""
Bounded TTL caches for webhook replay protection (SPEC §9.6, §20 items 4 and 15).

`ReplayCache` remembers verified request keys for ten minutes so that a replayed webhook is
acknowledged without side effects; `ResponseCache` keeps the response built for a verified key
so that a non-Twilio replay gets the original answer, sharing a response still being built.

Both hold at most `max_entries` keys: every 64th insert expired entries are pruned and then the
oldest-inserted ones evicted; an insert that takes them over the cap in between evicts the oldest.
(`ReplayCache` also prunes expired keys then, which costs nothing as they expire in order.)  Time comes from
an injected `IReactorTime`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["PRUNE_EVERY", "ReplayCache", "ResponseCache"]

T = TypeVar("T")

#: Expired entries are pruned on every this-many-th insert.
PRUNE_EVERY = 64


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name.lstrip('_')} must be positive, not {value!r}")


@define(repr=False)
class ReplayCache:
    """
    Verified request keys seen in the last `ttl` seconds, oldest first.

    A key is a replay while it is present and unexpired; a replay does not refresh its entry.
    Entries expire in insertion order (the TTL is fixed), so pruning stops at the first live one.
    """

    _clock: IReactorTime
    _ttl: float = field(default=600.0, validator=_positive)
    _max_entries: int = field(default=10_000, validator=_positive)
    _entries: OrderedDict[str, float] = field(factory=OrderedDict, init=False)
    _inserts: int = field(default=0, init=False)

    def check_and_record(self, key: str) -> bool:
        """Whether `key` is a replay; if it is not, record it for `ttl` seconds."""
        now = self._clock.seconds()
        expiry = self._entries.get(key)
        if expiry is not None:
            if expiry > now:
                return True
            del self._entries[key]
        self._entries[key] = now + self._ttl
        self._inserts += 1
        if self._inserts % PRUNE_EVERY == 0 or len(self._entries) > self._max_entries:
            self._prune(now)
        return False

    def discard(self, key: str) -> None:
        """Forget `key`, so that its next delivery is processed (e.g. after a failed first try)."""
        self._entries.pop(key, None)

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest > now:
                break
            entries.popitem(last=False)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@define(repr=False)
class _Entry:
    """One cached response: in flight (with the Deferreds waiting for it) or done."""

    expires: float
    done: bool = False
    value: Any = None
    waiters: list[Deferred[Any]] = field(factory=list)

    def wait(self) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            if d in self.waiters:
                self.waiters.remove(d)

        d: Deferred[Any] = Deferred(cancel)
        self.waiters.append(d)
        return d


@define(repr=False)
class ResponseCache(Generic[T]):
    """
    Responses by verified request key, kept `ttl` seconds after they were built.

    `get_or_build` builds a response once per key: later askers share the build in flight,
    each through a Deferred of its own (cancelling one only detaches that asker).  A failed
    build is evicted, so the next asker builds again.
    """

    _clock: IReactorTime
    _ttl: float = field(default=600.0, validator=_positive)
    _max_entries: int = field(default=10_000, validator=_positive)
    _entries: OrderedDict[str, _Entry] = field(factory=OrderedDict, init=False)
    _inserts: int = field(default=0, init=False)

    _log = Logger()

    def get(self, key: str) -> T | None:
        """The cached response for `key`, or ``None`` when absent, expired or still building."""
        entry = self._entries.get(key)
        if entry is None or not entry.done:
            return None
        if entry.expires <= self._clock.seconds():
            del self._entries[key]
            return None
        return entry.value

    def get_or_build(self, key: str, build: Callable[[], Deferred[T]]) -> Deferred[T]:
        """
        A Deferred firing with the response for `key`: the cached one, the one being built, or
        the result of calling `build` now (which may also return a plain value or raise).
        """
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            if not entry.done:
                return entry.wait()
            if entry.expires > now:
                return succeed(entry.value)
            del self._entries[key]
        entry = _Entry(expires=now + self._ttl)
        self._entries[key] = entry
        self._inserts += 1
        if self._inserts % PRUNE_EVERY == 0:
            self._prune(now)
        elif len(self._entries) > self._max_entries:
            # Over the cap between prunes: evict the oldest at once rather than scanning every
            # entry for expired ones on each insert (that made a full cache O(n) per request).
            self._entries.popitem(last=False)
        waiter = entry.wait()
        built = maybeDeferred(build)
        built.addCallbacks(
            self._built, self._failed, callbackArgs=(entry,), errbackArgs=(key, entry)
        )
        return waiter

    def _built(self, value: T, entry: _Entry) -> None:
        entry.done = True
        entry.value = value
        entry.expires = self._clock.seconds() + self._ttl
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.callback(value)

    def _failed(self, failure: Failure, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
        waiters, entry.waiters = entry.waiters, []
        if not waiters:
            self._log.failure("response build failed with nobody waiting", failure)
        for waiter in waiters:
            waiter.errback(failure)

    def _prune(self, now: float) -> None:
        # Done entries expire about in insertion order (fixed TTL from completion): walk from the
        # oldest, skipping builds in flight, and stop at the first live one instead of scanning all.
        entries = self._entries
        expired = []
        for key, e in entries.items():
            if not e.done:
                continue
            if e.expires > now:
                break
            expired.append(key)
        for key in expired:
            del entries[key]
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
