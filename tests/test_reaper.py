"""
Tests for voicecall.domain.reaper: the stale-call reaper of SPEC §15 [H] and the §19
"stale-call-reaper.test" bullets, on a Clock with a real CallManager and store.
"""
from __future__ import annotations

import uuid

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.manager import CallError
from voicecall.domain.model import CallEvent, CallState
from voicecall.domain.carrier import ProviderError
from voicecall.providers.mock import MockProvider
from voicecall.domain.reaper import INTERVAL_SECONDS, StaleCallReaper

from tests.fixtures import manager_rig

MAX_AGE = 120


@define
class HangupProvider(MockProvider):
    """The mock provider, whose hang-ups can be held on Deferreds the test fires."""

    hold_hangups: bool = False
    held: list = field(factory=list)

    def hangup_call(self, call, reason):
        if not self.hold_hangups:
            return super().hangup_call(call, reason)
        self.actions.append(("hangup", call.provider_call_id, reason))
        d = Deferred()
        self.held.append(d)
        return d


class ReaperTestsBase(SynchronousTestCase):
    max_age: float = MAX_AGE

    def setUp(self):
        rig = manager_rig(
            self,
            lambda clock: HangupProvider(clock=clock),
            max_concurrent_calls=10,
            max_duration_seconds=3600,
            transcript_timeout_ms=3_600_000,
            inbound_policy="open",
        )
        self.clock, self.store, self.provider, self.manager = rig.clock, rig.store, rig.provider, rig.manager
        self.reaper = StaleCallReaper(manager=self.manager, clock=self.clock, max_age_seconds=self.max_age)
        self.reaper.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.reaper.running:
            self.reaper.stopService()

    def place(self) -> str:
        return self.successResultOf(Deferred.fromCoroutine(self.manager.initiate("+15550001234")))

    def event(self, kind: str, call_id: str, **fields) -> None:
        fields.setdefault("id", str(uuid.uuid4()))
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        self.successResultOf(Deferred.fromCoroutine(self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields))))

    def hangups(self) -> list:
        return [a for a in self.provider.actions if a[0] == "hangup"]

    def state(self, call_id: str) -> CallState:
        return self.successResultOf(self.store.get_call(call_id)).state

    def ticks(self, n: int) -> None:
        for _ in range(n):
            self.clock.advance(INTERVAL_SECONDS)


class ReaperTests(ReaperTestsBase):
    """Which calls the reaper ends, and when."""

    def test_reaps_stale_unanswered_call(self):
        """An unanswered call older than the threshold is hung up on the next 30 s tick."""
        call_id = self.place()
        self.ticks(MAX_AGE // 30)
        self.assertEqual(self.hangups(), [], "a call exactly at the threshold is not yet stale")
        self.ticks(1)
        self.assertEqual(self.hangups(), [("hangup", f"mock-{call_id}", "hangup-bot")])
        self.assertEqual(self.state(call_id), CallState.HANGUP_BOT)
        self.assertEqual(self.manager.active_calls(), [])

    def test_runs_only_on_ticks(self):
        """A call that turns stale between ticks is reaped at the next 30 s tick, not before."""
        self.clock.advance(10)
        call_id = self.place()
        for _ in range(10, 149):
            self.clock.advance(1)
        self.assertEqual(self.hangups(), [])
        self.clock.advance(1)
        self.assertEqual(self.hangups(), [("hangup", f"mock-{call_id}", "hangup-bot")])

    def test_young_call_kept(self):
        """A call younger than the threshold is left alone while an older one is reaped."""
        old = self.place()
        self.ticks(3)
        young = self.place()
        self.ticks(2)
        self.assertEqual(self.hangups(), [("hangup", f"mock-{old}", "hangup-bot")])
        self.assertEqual(self.state(young), CallState.INITIATED)

    def test_answered_call_kept(self):
        """A call the carrier reported answered is never reaped."""
        call_id = self.place()
        self.event("call.answered", call_id)
        self.ticks(20)
        self.assertEqual(self.hangups(), [])
        self.assertEqual(self.state(call_id), CallState.ANSWERED)

    def test_speaking_and_listening_calls_kept(self):
        """Calls speaking or listening (live, though never answered) are never reaped."""
        speaking = self.place()
        self.event("call.speaking", speaking, text="hi")
        listening = self.place()
        self.event("call.speech", listening, transcript="hello", is_final=True)
        self.ticks(20)
        self.assertEqual(self.hangups(), [])
        self.assertEqual((self.state(speaking), self.state(listening)), (CallState.SPEAKING, CallState.LISTENING))

    def test_ringing_call_reaped(self):
        """A call stuck ringing past the threshold is reaped."""
        call_id = self.place()
        self.event("call.ringing", call_id)
        self.ticks(5)
        self.assertEqual(self.state(call_id), CallState.HANGUP_BOT)

    def test_no_overlapping_reaps(self):
        """While a call's hang-up is pending no second one starts; after it fails, a later tick retries."""
        self.provider.hold_hangups = True
        call_id = self.place()
        self.ticks(5)
        self.assertEqual(len(self.hangups()), 1)
        self.ticks(4)
        self.assertEqual(len(self.hangups()), 1)
        self.provider.held.pop().errback(ProviderError("carrier unavailable"))
        self.assertEqual(len(self.flushLoggedErrors(CallError)), 1)
        self.ticks(1)
        self.assertEqual(len(self.hangups()), 2)
        self.provider.held.pop().callback(None)
        self.assertEqual(self.state(call_id), CallState.HANGUP_BOT)
        self.ticks(3)
        self.assertEqual(len(self.hangups()), 2)

    def test_failure_logged_and_loop_keeps_running(self):
        """A failing end_call is logged and the reaper keeps trying on every tick."""
        self.provider.hold_hangups = True
        call_id = self.place()
        for attempt in range(1, 4):
            self.ticks(5 if attempt == 1 else 1)
            self.assertEqual(len(self.hangups()), attempt)
            self.provider.held.pop().errback(ProviderError("carrier unavailable"))
            errors = self.flushLoggedErrors(CallError)
            self.assertEqual(len(errors), 1)
            self.assertEqual(str(errors[0].value), "carrier unavailable")
        self.assertEqual(self.state(call_id), CallState.INITIATED)
        self.provider.hold_hangups = False
        self.ticks(1)
        self.assertEqual(self.state(call_id), CallState.HANGUP_BOT)

    def test_one_failure_does_not_stop_others(self):
        """A call whose hang-up fails does not keep other stale calls from being reaped."""
        self.provider.hold_hangups = True
        first = self.place()
        second = self.place()
        self.ticks(5)
        self.assertEqual(len(self.provider.held), 2)
        self.provider.held[0].errback(ProviderError("carrier unavailable"))
        self.provider.held[1].callback(None)
        self.flushLoggedErrors(CallError)
        self.assertEqual((self.state(first), self.state(second)), (CallState.INITIATED, CallState.HANGUP_BOT))

    def test_stop_service(self):
        """After stopService no more reaps happen and no timer is left behind."""
        self.place()
        self.reaper.stopService()
        self.ticks(10)
        self.assertEqual(self.hangups(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DisabledReaperTests(ReaperTestsBase):
    """With staleCallReaperSeconds at 0 the reaper does nothing."""

    max_age = 0

    def test_disabled(self):
        """A disabled reaper schedules nothing and never hangs up."""
        call_id = self.place()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.ticks(100)
        self.assertEqual(self.hangups(), [])
        self.assertEqual(self.state(call_id), CallState.INITIATED)


class NegativeReaperTests(DisabledReaperTests):
    """A negative staleCallReaperSeconds also disables the reaper."""

    max_age = -5
