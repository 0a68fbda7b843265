# -*- test-case-name: tests.test_reaper -*-
"""
The stale-call reaper (SPEC §15 [H]): every 30 s, hang up calls that never got answered and have
been around longer than `staleCallReaperSeconds`. Calls that were answered, or are speaking or
listening (live inbound Twilio calls often never report `answered`), are never reaped, and at
most one hang-up per call is in flight.
"""
from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from voicecall.domain.model import CallState

INTERVAL_SECONDS = 30.0
_LIVE = frozenset({CallState.SPEAKING, CallState.LISTENING})


@define(eq=False, repr=False)
class StaleCallReaper(Service):
    """A service that ends stale calls through the manager; disabled when max_age <= 0."""

    _manager: Any  # voicecall.domain.manager.CallManager
    _clock: IReactorTime
    _max_age_seconds: float
    _interval: float = INTERVAL_SECONDS
    _reaping: set[str] = field(factory=set)
    _loop: LoopingCall | None = None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        self.setName("reaper")

    def startService(self) -> None:
        Service.startService(self)
        if self._max_age_seconds <= 0:
            return
        self._loop = LoopingCall(self.reap_once)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self._log.failure("reaper loop stopped", f)
        )

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Service.stopService(self)

    def reap_once(self) -> None:
        """One pass; never raises (an exception would stop the LoopingCall for good)."""
        try:
            cutoff = self._clock.seconds() * 1000 - self._max_age_seconds * 1000
            for call in self._manager.active_calls():
                if (
                    call.started_at < cutoff
                    and call.answered_at is None
                    and not call.is_terminal
                    and call.state not in _LIVE
                    and call.call_id not in self._reaping
                ):
                    self._reap(call.call_id)
        except Exception:
            self._log.failure("reaper pass failed; will retry next tick")

    def _reap(self, call_id: str) -> None:
        self._reaping.add(call_id)
        self._log.info("reaping stale call {call_id}", call_id=call_id)
        d = Deferred.fromCoroutine(self._manager.end_call(call_id))
        d.addErrback(
            lambda f: self._log.failure("[voice-call] Reaper failed to end call {call_id}:", f, call_id=call_id)
        )
        d.addBoth(lambda _: self._reaping.discard(call_id))
