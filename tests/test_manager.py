"""
Tests for voicecall.domain.manager: the call lifecycle of SPEC §4-§6 driven through the manager's
public operations and normalised events, with a Clock, the mock provider and the real store on a
synchronous writer.
"""
from __future__ import annotations

import uuid

from attrs import define
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.manager import DEFAULT_GREETING, CallError
from voicecall.domain.model import CallEvent, CallState
from voicecall.domain.carrier import ProviderError
from voicecall.providers.mock import MockProvider

from tests.fixtures import build_manager, manager_rig


@define
class FlakyProvider(MockProvider):
    """The mock provider, with failures on demand."""

    fail_speak: int = 0
    fail_initiate: bool = False
    fail_hangup: bool = False
    turn_tokens: bool = False
    held: list = None

    def speak(self, call, text, voice):
        if self.fail_speak:
            self.fail_speak -= 1
            return fail(ProviderError("Twilio API error: 500 boom"))
        if self.held is not None:
            d = Deferred()
            self.held.append(d)
            return d
        return super().speak(call, text, voice)

    def initiate_call(self, **kw):
        if self.fail_initiate:
            return fail(ProviderError("Twilio API error: 400 bad number"))
        return super().initiate_call(**kw)

    def hangup_call(self, call, reason):
        if self.fail_hangup:
            return fail(ProviderError("Twilio API error: 503 unavailable"))
        return super().hangup_call(call, reason)

    def wants_turn_token(self, call):
        return self.turn_tokens


class ManagerTestsBase(SynchronousTestCase):
    def setUp(self):
        rig = manager_rig(self, lambda clock: FlakyProvider(clock=clock), **self.SETTINGS)
        self.clock, self.directory, self.store, self.provider, self.manager = (
            rig.clock, rig.directory, rig.store, rig.provider, rig.manager
        )

    SETTINGS = dict(
        max_concurrent_calls=2,
        max_duration_seconds=300,
        transcript_timeout_ms=1000,
        notify_hangup_delay_sec=3,
        default_mode="conversation",
        inbound_policy="allowlist",
        allow_from=("+15550001234",),
    )

    def make_manager(self, on_utterance=None, **overrides):
        """Another manager on this test's provider, store and clock (a restart), with `overrides`."""
        return build_manager(self.provider, self.store, self.clock, on_utterance=on_utterance, **{**self.SETTINGS, **overrides})

    def go(self, coro):
        return self.successResultOf(Deferred.fromCoroutine(coro))

    def fails(self, coro) -> str:
        return str(self.failureResultOf(Deferred.fromCoroutine(coro), CallError).value)

    def event(self, kind, call_id, **fields):
        fields.setdefault("id", str(uuid.uuid4()))
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        self.go(self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields)))

    def stored(self, call_id):
        return self.successResultOf(self.store.get_call(call_id))

    def actions(self, kind):
        return [a for a in self.provider.actions if a[0] == kind]


class InitiateTests(ManagerTestsBase):
    def test_initiate_is_durable_before_it_returns(self):
        """An initiated call is in the store with its carrier id when initiate returns."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi", "conversation"))
        record = self.stored(call_id)
        self.assertEqual(record.state, CallState.INITIATED)
        self.assertEqual(record.provider_call_id, f"mock-{call_id}")
        self.assertEqual(record.metadata, {"mode": "conversation", "initialMessage": "Hi"})
        self.assertEqual(self.actions("initiate"), [("initiate", f"mock-{call_id}", "+15550001234")])

    def test_concurrency_limit(self):
        """The call past maxConcurrentCalls is refused with the SPEC text and dials nothing."""
        self.go(self.manager.initiate("+15550001234", "a"))
        self.go(self.manager.initiate("+15550001234", "b"))
        self.assertEqual(self.fails(self.manager.initiate("+15550001234", "c")), "Maximum concurrent calls (2) reached")
        self.assertEqual(len(self.actions("initiate")), 2)

    def test_no_webhook_url(self):
        """Without a webhook URL nothing is dialled."""
        self.manager.set_webhook_url(None)
        self.assertEqual(self.fails(self.manager.initiate("+15550001234", "a")), "Webhook URL not configured")

    def test_invalid_number(self):
        """A `to` that is not E.164 (or a SIP URI) is refused before anything is stored."""
        message = self.fails(self.manager.initiate("5550001234", "a"))
        self.assertIn("expected E.164", message)
        self.assertEqual(self.provider.actions, [])

    def test_mock_from_number_fallback(self):
        """The mock provider dials from +15550000000 when no fromNumber is configured."""
        self.manager = self.make_manager(from_number=None)
        call_id = self.go(self.manager.initiate("+15550001234", "a"))
        self.assertEqual(self.stored(call_id).from_number, "+15550000000")

    def test_carrier_failure_marks_failed(self):
        """A carrier error fails the call durably, with the carrier's text, and frees its slot."""
        self.provider.fail_initiate = True
        failure = self.failureResultOf(Deferred.fromCoroutine(self.manager.initiate("+15550001234", "a")), CallError)
        self.assertEqual(str(failure.value), "Twilio API error: 400 bad number")
        record = self.stored(failure.value.call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.FAILED, "failed"))
        self.assertEqual(self.manager.active_calls(), [])


class ConversationTests(ManagerTestsBase):
    def answered(self, mode="conversation", message="Hi"):
        call_id = self.go(self.manager.initiate("+15550001234", message, mode))
        self.event("call.answered", call_id)
        return call_id

    def test_answer_speaks_initial_message_once(self):
        """On answer the initial message is spoken, consumed, and the call listens."""
        call_id = self.answered()
        self.assertEqual(self.actions("speak"), [("speak", f"mock-{call_id}", "Hi")])
        record = self.stored(call_id)
        self.assertNotIn("initialMessage", record.metadata)
        self.assertEqual(record.state, CallState.LISTENING)
        self.event("call.answered", call_id)
        self.assertEqual(len(self.actions("speak")), 1)

    def test_failed_initial_message_is_kept_for_a_retry(self):
        """A failed first playback keeps the message and leaves the call listening; a retry speaks it once."""
        self.provider.fail_speak = 1
        call_id = self.answered()
        record = self.stored(call_id)
        self.assertEqual(record.metadata.get("initialMessage"), "Hi")
        self.assertEqual(record.state, CallState.LISTENING)
        self.successResultOf(self.manager.speak_initial_message(call_id))
        self.successResultOf(self.manager.speak_initial_message(call_id))
        self.assertEqual(self.actions("speak"), [("speak", f"mock-{call_id}", "Hi")])
        self.assertNotIn("initialMessage", self.stored(call_id).metadata)

    def test_concurrent_initial_triggers_speak_once(self):
        """A second trigger while the first playback is in flight does not replay the message."""
        self.provider.held = []
        call_id = self.answered()
        self.manager.speak_initial_message(call_id)
        self.assertEqual(len(self.provider.held), 1)
        self.provider.held[0].callback(None)
        self.assertNotIn("initialMessage", self.stored(call_id).metadata)

    def test_continue_returns_the_answer(self):
        """continue speaks, listens, and returns the final transcript with turn metadata."""
        call_id = self.answered()
        d = Deferred.fromCoroutine(self.manager.continue_call(call_id, "How are you?"))
        self.assertNoResult(d)
        self.clock.advance(0.25)
        self.event("call.speech", call_id, transcript="Fine thanks", is_final=True)
        self.assertEqual(self.successResultOf(d), "Fine thanks")
        record = self.stored(call_id)
        self.assertEqual(
            [(t.speaker.value, t.text) for t in record.transcript],
            [("bot", "Hi"), ("bot", "How are you?"), ("user", "Fine thanks")],
        )
        self.assertEqual(record.metadata["turnCount"], 1)
        self.assertEqual(record.metadata["lastTurnLatencyMs"], 250)
        self.assertEqual(len(self.actions("stop-listening")), 1)

    def test_overlapping_continue(self):
        """A second continue while one waits fails with the SPEC text."""
        call_id = self.answered()
        first = Deferred.fromCoroutine(self.manager.continue_call(call_id, "one"))
        self.assertEqual(self.fails(self.manager.continue_call(call_id, "two")), "Already waiting for transcript")
        self.event("call.speech", call_id, transcript="yes")
        self.assertEqual(self.successResultOf(first), "yes")

    def test_continue_times_out(self):
        """Without an answer continue fails after transcriptTimeoutMs, and the next turn works."""
        call_id = self.answered()
        d = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Hello?"))
        self.clock.advance(1.0)
        self.assertEqual(str(self.failureResultOf(d, CallError).value), "Timed out waiting for transcript after 1000ms")
        d = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Hello again?"))
        self.event("call.speech", call_id, transcript="here")
        self.assertEqual(self.successResultOf(d), "here")

    def test_turn_token_must_match(self):
        """With turn tokens, speech with a missing or stale token does not satisfy the turn."""
        self.provider.turn_tokens = True
        call_id = self.answered()
        d = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Ready?"))
        token = self.actions("listen")[-1][2]
        self.assertIsNotNone(token)
        self.event("call.speech", call_id, transcript="stale", turn_token="other")
        self.event("call.speech", call_id, transcript="none")
        self.assertNoResult(d)
        self.event("call.speech", call_id, transcript="yes", turn_token=token)
        self.assertEqual(self.successResultOf(d), "yes")
        texts = [t.text for t in self.stored(call_id).transcript]
        self.assertEqual(texts, ["Hi", "Ready?", "yes"])

    def test_hangup_fails_the_waiter(self):
        """A remote hang-up while continue waits fails it with `Call ended: <reason>`."""
        call_id = self.answered()
        d = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Still there?"))
        self.event("call.ended", call_id, reason="hangup-user")
        self.assertEqual(str(self.failureResultOf(d, CallError).value), "Call ended: hangup-user")
        self.assertEqual(self.stored(call_id).state, CallState.HANGUP_USER)

    def test_redelivered_event_is_applied_once(self):
        """The same event delivered twice adds one transcript entry."""
        call_id = self.answered()
        self.event("call.speech", call_id, id="e1", dedupe_key="k1", transcript="once")
        self.event("call.speech", call_id, id="e2", dedupe_key="k1", transcript="once")
        self.assertEqual([t.text for t in self.stored(call_id).transcript], ["Hi", "once"])

    def test_dedupe_set_is_bounded(self):
        """The processed-key set forgets its oldest keys past its limit."""
        self.manager = self.make_manager(dedupe_limit=2)
        call_id = self.answered()
        for key in ("a", "b", "c"):
            self.event("call.speech", call_id, dedupe_key=key, transcript=key)
        self.event("call.speech", call_id, dedupe_key="a", transcript="a-again")
        self.event("call.speech", call_id, dedupe_key="c", transcript="c-again")
        self.assertEqual([t.text for t in self.stored(call_id).transcript][1:], ["a", "b", "c", "a-again"])

    def test_late_callback_creates_no_record(self):
        """A carrier callback arriving after we ended an outbound call creates no new record."""
        call_id = self.answered()
        self.go(self.manager.end_call(call_id))
        self.event("call.ended", f"mock-{call_id}", provider_call_id=f"mock-{call_id}", direction="outbound", reason="completed")
        self.event("call.ringing", "unknown", provider_call_id="CA-never-placed", direction="outbound")
        self.assertEqual(self.manager.active_calls(), [])
        self.assertEqual(len(self.successResultOf(self.store.recent_calls(10))), 1)

    def test_terminal_is_sticky(self):
        """Events after the end do not resurrect a call."""
        call_id = self.answered()
        self.event("call.ended", call_id, reason="completed")
        self.event("call.ringing", call_id)
        self.assertEqual(self.stored(call_id).state, CallState.COMPLETED)
        self.assertIsNone(self.manager.find(call_id))

    def test_provider_id_upgrade(self):
        """A new carrier id for a call replaces the old one in lookups."""
        call_id = self.answered()
        self.event("call.ringing", call_id, provider_call_id="CALL-UUID")
        self.assertEqual(self.manager.find("CALL-UUID").call_id, call_id)
        self.assertIsNone(self.manager.find(f"mock-{call_id}"))

    def test_speak_failure_returns_to_listening(self):
        """A failed speak reports the carrier error and leaves the call listening, not speaking."""
        call_id = self.answered()
        self.provider.fail_speak = 1
        self.assertEqual(self.fails(self.manager.speak(call_id, "x")), "Twilio API error: 500 boom")
        self.assertEqual(self.stored(call_id).state, CallState.LISTENING)

    def test_speak_errors(self):
        """speak on an unknown call fails with `Call not found`."""
        self.assertEqual(self.fails(self.manager.speak("nope", "x")), "Call not found")

    def test_end_failure_keeps_call(self):
        """If the carrier refuses the hang-up, end fails and the call stays active."""
        call_id = self.answered()
        self.provider.fail_hangup = True
        self.assertEqual(self.fails(self.manager.end_call(call_id)), "Twilio API error: 503 unavailable")
        self.assertIsNotNone(self.manager.find(call_id))

    def test_end(self):
        """end hangs up with reason hangup-bot and the call is terminal in the store."""
        call_id = self.answered()
        self.go(self.manager.end_call(call_id))
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "hangup-bot")])
        record = self.stored(call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.HANGUP_BOT, "hangup-bot"))
        self.go(self.manager.end_call(call_id))

    def test_notify_hangs_up_after_delay(self):
        """A notify call speaks its message on answer, then hangs up after notifyHangupDelaySec."""
        call_id = self.answered(mode="notify", message="Your order shipped")
        self.assertEqual(self.actions("speak"), [("speak", f"mock-{call_id}", "Your order shipped")])
        self.clock.advance(2.9)
        self.assertEqual(self.actions("hangup"), [])
        self.clock.advance(0.1)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "hangup-bot")])

    def test_max_duration(self):
        """An answered call is hung up with reason timeout after maxDurationSeconds."""
        call_id = self.answered()
        self.clock.advance(300)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])
        self.assertEqual(self.stored(call_id).state, CallState.TIMEOUT)

    def test_repeated_answer_does_not_restart_the_clock(self):
        """A later in-progress (answered) event keeps the first answer time and the max-duration deadline."""
        call_id = self.answered()
        self.clock.advance(200)
        self.event("call.answered", call_id)
        self.clock.advance(100)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])

    def test_utterance_hook_without_waiter(self):
        """A final utterance no continue waits for goes to the on_utterance hook."""
        heard = []
        self.manager = self.make_manager(on_utterance=lambda call, text: heard.append((call.call_id, text)))
        call_id = self.answered()
        self.event("call.speech", call_id, transcript="tell me a joke")
        self.assertEqual(heard, [(call_id, "tell me a joke")])


class InboundTests(ManagerTestsBase):
    def inbound(self, caller, pid="CA1", key=None):
        self.event(
            "call.initiated",
            pid,
            provider_call_id=pid,
            direction="inbound",
            from_number=caller,
            to_number="+15550000000",
            dedupe_key=key,
        )

    def test_allowlisted_caller_accepted(self):
        """An exactly matching caller gets a ringing record with the default greeting."""
        self.inbound("+1 (555) 000-1234")
        (call,) = self.manager.active_calls()
        self.assertEqual(call.state, CallState.RINGING)
        self.assertEqual(call.metadata["initialMessage"], DEFAULT_GREETING)
        uuid.UUID(call.call_id, version=4)
        self.assertEqual(self.stored(call.call_id).direction.value, "inbound")

    def test_rejected_callers(self):
        """Unknown, anonymous and suffix-only callers are hung up once each and leave no record."""
        for n, caller in enumerate(["+15559999999", "anonymous", "+99915550001234", None]):
            self.inbound(caller, pid=f"CA{n}", key=f"k{n}")
            self.inbound(caller, pid=f"CA{n}", key=f"k{n}b")
        self.assertEqual(self.manager.active_calls(), [])
        self.assertEqual([a[1] for a in self.actions("hangup")], ["CA0", "CA1", "CA2", "CA3"])
        self.assertIsNone(self.stored("CA0"))

    def test_disabled_rejects_all(self):
        """With inboundPolicy disabled even an allowlisted caller is rejected."""
        self.manager = self.make_manager(inbound_policy="disabled")
        self.inbound("+15550001234")
        self.assertEqual(self.manager.active_calls(), [])
        self.assertEqual(len(self.actions("hangup")), 1)

    def test_rejection_hangup_failure_is_contained(self):
        """A failing rejection hang-up is logged, never raised out of event processing."""
        self.provider.fail_hangup = True
        self.inbound("+15559999999")
        self.assertEqual(len(self.flushLoggedErrors(ProviderError)), 1)

    def test_greeting_on_answer(self):
        """An accepted inbound call is answered at the carrier and greeted when answered."""
        self.manager = self.make_manager(inbound_greeting="Hi, it's the assistant")
        self.inbound("+15550001234")
        (call,) = self.manager.active_calls()
        self.assertEqual(self.actions("answer"), [("answer", "CA1", None)])
        self.event("call.answered", "CA1", provider_call_id="CA1")
        self.assertEqual(self.actions("speak"), [("speak", "CA1", "Hi, it's the assistant")])


class Restarts:
    def restart(self):
        self.manager.stop()
        self.manager = self.make_manager()
        return self.go(self.manager.restore())


class RestoreTests(Restarts, ManagerTestsBase):

    def test_restore_keeps_live_calls_with_transcript(self):
        """A live call comes back after a restart with its transcript, and old events stay deduplicated."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event("call.answered", call_id, dedupe_key="ans")
        self.event("call.speech", call_id, dedupe_key="sp1", transcript="hello")
        outcome = self.restart()
        self.assertEqual(outcome["restored"], 1)
        call = self.manager.find(call_id)
        self.assertEqual([t.text for t in call.transcript], ["Hi", "hello"])
        self.event("call.speech", call_id, dedupe_key="sp1", transcript="hello")
        self.assertEqual(len(self.stored(call_id).transcript), 2)

    def test_restore_closes_calls_the_carrier_ended(self):
        """A call the carrier reports over is closed as completed on restore."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event("call.answered", call_id, provider_call_id="mock-ended-1")
        outcome = self.restart()
        self.assertEqual(outcome["ended-at-carrier"], 1)
        self.assertEqual(self.stored(call_id).state, CallState.COMPLETED)

    def test_restore_honours_remaining_duration(self):
        """A call answered 290 s before a restart is hung up 10 s after it, with reason timeout."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event("call.answered", call_id)
        self.clock.advance(290)
        self.restart()
        self.clock.advance(9.9)
        self.assertEqual(self.actions("hangup"), [])
        self.clock.advance(0.1)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])

    def test_restore_expires_old_calls(self):
        """A call older than maxDurationSeconds is marked timeout and hung up on restore."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.clock.advance(301)
        outcome = self.restart()
        self.assertEqual(outcome["expired"], 1)
        self.assertEqual(self.stored(call_id).state, CallState.TIMEOUT)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])

    def test_dedupe_keys_of_ended_calls_survive_restart(self):
        """A replay of an event of an already-ended call is ignored after a restart."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event("call.ended", call_id, dedupe_key="end-1", reason="completed")
        self.restart()
        self.event("call.initiated", "X", provider_call_id="X", direction="inbound", from_number="+15550001234", dedupe_key="end-1")
        self.assertEqual(self.manager.active_calls(), [])


class HeldStore:
    """The real store, whose writes are reported only when the test releases (or fails) them."""

    def __init__(self, store) -> None:
        self._store = store
        self.held: list[tuple[Deferred, object]] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def write(self, record, **kw):
        reported: Deferred = Deferred()
        self.held.append((reported, (record, kw)))
        return reported

    def release(self, fail_with: Exception | None = None) -> None:
        reported, (record, kw) = self.held.pop(0)
        if fail_with is not None:
            reported.errback(fail_with)
        else:
            self._store.write(record, **kw).chainDeferred(reported)


class EventOrderTests(ManagerTestsBase):
    """Events of one call are applied one at a time; a redelivery waits for its original's outcome."""

    def setUp(self):
        super().setUp()
        self.call_id = self.go(self.manager.initiate("+15550001234", None, "conversation"))
        self.event("call.answered", self.call_id, dedupe_key="ans")
        self.held = HeldStore(self.store)
        self.manager._store = self.held

    def send(self, kind, **fields):
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        fields.setdefault("id", str(uuid.uuid4()))
        return Deferred.fromCoroutine(self.manager.process_event(CallEvent(type=kind, call_id=self.call_id, **fields)))

    def test_one_at_a_time_and_a_failure_undone_first(self):
        """The second event of a call starts once the first is done; the first's failed write is undone before it."""
        first = self.send("call.speech", dedupe_key="s1", transcript="one")
        second = self.send("call.ended", dedupe_key="e1", reason="hangup-user")
        self.assertEqual(len(self.held.held), 1)  # the end waits for the speech
        call = self.manager.find(self.call_id)
        self.assertEqual([t.text for t in call.transcript], ["one"])
        self.held.release(RuntimeError("disk full"))
        self.failureResultOf(first, RuntimeError)
        self.assertEqual(call.transcript, [])
        self.assertEqual(call.state, CallState.HANGUP_USER)  # the end, in memory while it is stored
        self.assertEqual(len(self.held.held), 1)  # now the end is being stored
        self.held.release()
        self.successResultOf(second)
        self.assertEqual(self.stored(self.call_id).state, CallState.HANGUP_USER)
        self.assertEqual([t.text for t in self.stored(self.call_id).transcript], [])
        self.assertEqual(self.manager.ended_counts, {"hangup-user": 1})

    def test_a_call_whose_end_is_being_stored_is_not_listed_active(self):
        """Between an end applied in memory and its commit, status and health no longer count the call."""
        ended = self.send("call.ended", dedupe_key="e1", reason="hangup-user")
        self.assertEqual(len(self.held.held), 1)
        self.assertEqual(self.manager.active_calls(), [])
        self.held.release()
        self.successResultOf(ended)
        self.assertEqual(self.manager.active_calls(), [])

    def test_redelivery_waits_for_the_original(self):
        """A redelivery of an event still being stored answers once the original is stored, applying nothing."""
        original = self.send("call.speech", dedupe_key="s1", transcript="one")
        again = self.send("call.speech", dedupe_key="s1", transcript="one")
        self.assertNoResult(again)
        self.held.release()
        self.successResultOf(original)
        self.successResultOf(again)
        self.assertEqual(self.held.held, [])
        self.assertEqual([t.text for t in self.stored(self.call_id).transcript], ["one"])

    def test_redelivery_applies_when_the_original_failed(self):
        """If the original's write fails, the waiting redelivery applies the event itself."""
        original = self.send("call.speech", dedupe_key="s1", transcript="one")
        again = self.send("call.speech", dedupe_key="s1", transcript="one")
        self.held.release(RuntimeError("disk full"))
        self.failureResultOf(original, RuntimeError)
        self.assertNoResult(again)
        self.held.release()
        self.successResultOf(again)
        self.assertEqual([t.text for t in self.stored(self.call_id).transcript], ["one"])

    def test_alias_of_an_applied_event_is_a_redelivery(self):
        """An event known by another of its keys (an idempotency token, the signed request) is not applied again."""
        self.manager._store = self.store
        self.event("call.speech", self.call_id, dedupe_key="twilio:gather:CA1:t1:", aliases=("twilio:idem:tok",), transcript="one")
        self.event("call.speech", self.call_id, dedupe_key="twilio:req:other", aliases=("twilio:idem:tok",), transcript="one")
        self.assertEqual([t.text for t in self.stored(self.call_id).transcript], ["one"])
        self.assertIn("twilio:idem:tok", self.stored(self.call_id).processed_event_ids)


class QuietLogTests(Restarts, ManagerTestsBase):
    """At the default level the log says what happened to a call once, not the routine echoes."""

    def levels(self, observed, words):
        from twisted.logger import formatEvent

        return [e["log_level"].name for e in observed if words in formatEvent(e)]

    def test_carrier_end_after_ours_is_debug_and_other_late_events_info(self):
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event("call.ended", call_id, dedupe_key="end-1", reason="hangup-bot")
        self.event("call.ended", call_id, dedupe_key="end-2", reason="completed")
        self.event("call.answered", call_id, dedupe_key="ans-late")
        self.assertEqual(self.levels(observed, "Late call.ended"), ["debug"])
        self.assertEqual(self.levels(observed, "Late call.answered"), ["info"])

    def test_restore_of_nothing_says_nothing(self):
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.restart()
        self.assertEqual(self.levels(observed, "Restored"), [])
