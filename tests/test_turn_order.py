"""
Issue 13.1: commands sent while something plays take effect in order, and each `continue` gets
the answer to its own question. The carriers' own tests (test_plivo_e2e, test_twilio,
test_telnyx_e2e) cover native speech; here: the manager's queue with the mock provider (playback
that takes time on an injected clock) and a Twilio call over a media stream.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.domain.manager import MAX_QUEUED_COMMANDS, CallError, CallManager
from voicecall.domain.model import CallEvent, EventType
from voicecall.providers.mock import MockProvider

from tests import test_streaming as streamed
from tests.fixtures import answered_call, build_manager, carrier_stack
from tests.harness import eventually

GREETING = "Hello there, thanks for picking up the phone today"


class _MemoryStore:
    """The store's write/read surface, in memory."""

    def __init__(self):
        self.calls = {}

    def write(self, call, transcript=(), event_keys=(), events=(), admit_limit=None):
        from twisted.internet.defer import succeed

        self.calls[call.call_id] = call
        return succeed(None)

    async def get_call(self, call_id):
        return self.calls.get(call_id)


class _MockCalls(SynchronousTestCase):
    """The mock provider with playback that takes time: speak fires len(text) * 60 ms later."""

    def setUp(self):
        self.clock = Clock()
        self.mock = MockProvider(self.clock, speak_seconds_per_char=0.06)
        self.manager = self.make_manager()
        self.events = 0

    def make_manager(self, on_utterance=None) -> CallManager:
        """A manager speaking through `self.mock` (at most 2 calls, 30 s for an answer)."""
        return build_manager(
            self.mock, _MemoryStore(), self.clock, on_utterance=on_utterance, max_concurrent_calls=2, transcript_timeout_ms=30_000
        )

    def run_(self, coroutine) -> Deferred:
        return Deferred.fromCoroutine(coroutine)

    def event(self, call_id, kind, **extra):
        self.events += 1
        key = f"e{self.events}"
        return self.successResultOf(
            self.run_(self.manager.process_event(CallEvent(type=kind, call_id=call_id, id=key, timestamp=0, dedupe_key=key, **extra)))
        )

    def initiate(self):
        return self.successResultOf(self.run_(self.manager.initiate("+15550001234", GREETING, "conversation")))

    def wait(self, seconds):
        """Let `seconds` pass in 50 ms steps (playback scheduled meanwhile starts when it would)."""
        for _ in range(int(round(seconds / 0.05))):
            self.clock.advance(0.05)

    def played(self):
        """What the mock played to its end, in order."""
        return [detail for action, _, detail in self.mock.actions if action == "spoken"]


class MockTurnOrderTests(_MockCalls):
    """Commands on a mock call whose playback takes time take effect in order."""

    def test_continue_sent_before_the_answer(self):
        """Initiate, continue at once: the greeting plays first, then the question; the answer is the question's."""
        call_id = self.initiate()
        answer = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        self.assertEqual([a for a in self.mock.actions if a[0] == "speak"], [])
        self.event(call_id, EventType.ANSWERED)
        self.wait(1.0)  # the greeting is still playing (3 s)
        self.event(call_id, EventType.SPEECH, transcript="Hello?")  # the callee talks over it
        self.assertNoResult(answer)
        self.wait(2.1)  # the greeting ends; the question starts
        self.assertEqual(self.played(), [GREETING])
        self.wait(0.75)
        self.assertEqual(self.played(), [GREETING, "Who is this?"])
        self.assertNoResult(answer)
        self.event(call_id, EventType.SPEECH, transcript="It's Alice")
        self.assertEqual(self.successResultOf(answer), "It's Alice")
        speaks = [detail for action, _, detail in self.mock.actions if action == "speak"]
        self.assertEqual(speaks, [GREETING, "Who is this?"])

    def test_each_continue_answers_its_own_question(self):
        """A speak queued behind a question waits for it; the next continue is answered by its own words."""
        call_id = self.initiate()
        self.event(call_id, EventType.ANSWERED)
        first = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        spoken = self.run_(self.manager.speak(call_id, "One moment."))
        self.wait(10)
        self.event(call_id, EventType.SPEECH, transcript="Alice")
        self.assertEqual(self.successResultOf(first), "Alice")
        self.successResultOf(spoken)
        second = self.run_(self.manager.continue_call(call_id, "Where are you?"))
        self.wait(10)
        self.event(call_id, EventType.SPEECH, transcript="Home")
        self.assertEqual(self.successResultOf(second), "Home")
        self.assertEqual(self.played(), [GREETING, "Who is this?", "One moment.", "Where are you?"])

    def test_queue_is_bounded_and_ends_with_the_call(self):
        """At most MAX_QUEUED_COMMANDS wait; the call's end fails the waiting ones with 'Call has ended'."""
        call_id = self.initiate()
        waiting = [self.run_(self.manager.speak(call_id, f"line {n}")) for n in range(MAX_QUEUED_COMMANDS - 1)]
        refused = self.failureResultOf(self.run_(self.manager.speak(call_id, "one too many")), CallError)
        self.assertEqual(str(refused.value), f"Too many commands waiting on this call ({MAX_QUEUED_COMMANDS})")
        self.event(call_id, EventType.ENDED, reason="completed")
        for d in waiting:
            self.assertEqual(str(self.failureResultOf(d, CallError).value), "Call has ended")
        self.assertEqual(self.manager._commands, {})


class StreamedTurnOrderTests(TestCase):
    """A Twilio call over a media stream: a continue sent before the stream is up waits for the greeting."""

    timeout = 60
    start = streamed.StreamedConversationTests.start
    hang_up = streamed.StreamedConversationTests.hang_up
    connect = streamed.StreamedConversationTests.connect
    close_client = streamed.StreamedConversationTests.close_client
    said = streamed.StreamedConversationTests.said
    _has = streamed.StreamedConversationTests._has

    async def test_continue_before_the_stream(self):
        await self.start(transcripts=("A table for two", "At eight"))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Good evening", "mode": "conversation"}))["callId"]
        pending = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "How many people?"})
        fake_call = await eventually(self._fake_call, 10, "the fake call")
        stream = await fake_call.next_stream()
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "How many people?"), 10, "the question to finish playing")
        self.assertEqual(await self.said(call_id), ["Good evening", "How many people?"])
        client.talk(streamed.tone(0.6))
        self.assertEqual(await pending, {"success": True, "transcript": "A table for two"})
        pending = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "What time?"})
        await eventually(lambda: self._has(self.said(call_id), "What time?"), 10, "the second question")
        client.talk(streamed.tone(0.6))
        self.assertEqual(await pending, {"success": True, "transcript": "At eight"})
        self.assertEqual(len(fake_call.streams), 1, "no TwiML update replaced the stream")

    async def _fake_call(self):
        return next(iter(self.fake.calls.values()), None)


class AutoReplyWhileAContinueWaitsTests(_MockCalls):
    """What the caller says before a queued `continue` is asked is not auto-answered over the turn."""

    def test_no_auto_reply_while_a_continue_is_queued(self):
        from voicecall.speech.responder import AutoResponder

        asked = []

        def gateway(call, text):
            asked.append(text)
            return Deferred()

        self.manager = self.make_manager(on_utterance=lambda call, text: responder.on_utterance(call, text))
        responder = AutoResponder(manager=self.manager, clock=self.clock, gateway=gateway)
        call_id = self.initiate()
        self.event(call_id, EventType.ANSWERED)
        answer = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        self.wait(1.0)  # the greeting is still playing
        self.event(call_id, EventType.SPEECH, transcript="Hello?")
        self.assertEqual(asked, [])
        self.wait(3.0)
        self.event(call_id, EventType.SPEECH, transcript="Alice")
        self.assertEqual(self.successResultOf(answer), "Alice")
        self.event(call_id, EventType.SPEECH, transcript="What's the time?")
        self.assertEqual(asked, ["What's the time?"], "answered again once no continue waits")


class _StalledPrompt(MockProvider):
    """A mock whose prompts are never acknowledged (a carrier request that hangs)."""

    def prompt(self, call, text, voice, turn_token, dtmf=False):
        self.actions.append(("prompt-stalled", call.provider_call_id, text))
        return Deferred()


class _GoneAtTheCarrier(MockProvider):
    """A mock whose call has ended at the carrier: listening is refused 404 (as Plivo does)."""

    def start_listening(self, call, turn_token, dtmf=False):
        from twisted.internet.defer import fail

        from voicecall.domain.carrier import ProviderError

        return fail(ProviderError("Plivo API error: 404 call not in progress", status=404))


class BoundedContinueTests(_MockCalls):
    """A continue resolves within transcriptTimeoutMs of being issued, even while it waits in the queue."""

    def test_continue_on_a_call_never_answered(self):
        """The greeting holds the queue forever (no answer): the continue times out, and order is kept."""
        call_id = self.initiate()
        answer = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        self.wait(29.9)
        self.assertNoResult(answer)
        self.wait(0.2)
        failure = self.failureResultOf(answer, CallError)
        self.assertEqual(str(failure.value), "Timed out waiting for transcript after 30000ms")
        self.assertFalse(self.manager.turn_pending(call_id))
        # A speak sent now still waits for the greeting: the timed-out continue kept its place.
        spoken = self.run_(self.manager.speak(call_id, "Goodbye."))
        self.event(call_id, EventType.ANSWERED)
        self.wait(5)
        self.successResultOf(spoken)
        self.assertEqual(self.played(), [GREETING, "Goodbye."])
        self.assertEqual(self.manager._commands, {})

    def test_a_new_continue_after_a_timed_out_one(self):
        """The timed-out continue no longer counts as waiting: the next one is accepted."""
        call_id = self.initiate()
        first = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        self.wait(30.1)
        self.failureResultOf(first, CallError)
        second = self.run_(self.manager.continue_call(call_id, "Are you there?"))
        self.event(call_id, EventType.ANSWERED)
        self.wait(5)
        self.event(call_id, EventType.SPEECH, transcript="Yes")
        self.assertEqual(self.successResultOf(second), "Yes")


class AbandonedWaiterTests(SynchronousTestCase):
    """A turn abandoned before it awaited its answer leaves no unhandled failure behind."""

    def check_abandoned(self, finish):
        import gc

        clock = Clock()
        mock = _StalledPrompt(clock)
        manager = build_manager(mock, _MemoryStore(), clock, transcript_timeout_ms=5000)
        call_id = self.successResultOf(Deferred.fromCoroutine(manager.initiate("+15550001234", None, "conversation")))
        key = "answered"
        manager_event = CallEvent(type=EventType.ANSWERED, call_id=call_id, id=key, timestamp=0, dedupe_key=key)
        self.successResultOf(Deferred.fromCoroutine(manager.process_event(manager_event)))
        Deferred.fromCoroutine(manager.continue_call(call_id, "Who is this?"))
        self.assertIn(("prompt-stalled", f"mock-{call_id}", "Who is this?"), mock.actions)
        finish(manager, clock)
        # The daemon is gone (a restart): the turn's coroutine, its prompt and its waiter with it.
        del manager, mock, clock
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_timed_out_while_the_prompt_hangs(self):
        self.check_abandoned(lambda manager, clock: clock.advance(6))

    def test_stopped_while_the_prompt_hangs(self):
        self.check_abandoned(lambda manager, clock: manager.stop())


class GreetingThenHangUpTests(_MockCalls):
    """The callee hangs up as the greeting ends: listening refused by the carrier is one info line."""

    def setUp(self):
        super().setUp()
        self.mock = _GoneAtTheCarrier(self.clock, speak_seconds_per_char=0.06)
        self.manager = self.make_manager()

    def test_listen_refused_after_the_greeting(self):
        from twisted.logger import globalLogPublisher

        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        call_id = self.initiate()
        self.event(call_id, EventType.ANSWERED)
        self.wait(4)
        self.assertEqual(self.played(), [GREETING])
        self.assertEqual(self.flushLoggedErrors(), [])
        lines = [e for e in seen if "404 call not in progress" in str(e.get("error", ""))]
        self.assertEqual([e["log_level"].name for e in lines], ["info"])


class _CarrierStack(SynchronousTestCase):
    """The daemon's call path in memory against a fake carrier (voicecall.testing.stack), chaos off."""

    def stack(self, provider, chaos=None):
        return carrier_stack(self, provider, chaos, transcript_timeout_ms=4000, prefix="vc-turns-")

    def answered(self, stack):
        """A conversation call whose greeting has played."""
        return answered_call(self, stack)

    def fake_call(self, stack, call_id):
        return stack.carrier.calls()[stack.manager.find(call_id).provider_call_id]

    def bot_said(self, stack, call_id):
        record = stack.manager.find(call_id) or self.successResultOf(stack.store.get_call(call_id))
        return [t.text for t in record.transcript if t.speaker.value == "bot"]


class SpeakWhileAContinueWaitsTests(_CarrierStack):
    """
    A speak sent while a continue waits for its answer replaces the carrier's listening (Plivo's
    GetInput, Twilio's Gather); once it has played, listening for the waiting turn resumes with
    the same turn token, so the answer to the question still answers the continue.
    """

    def check(self, provider):
        from voicecall.testing.stack import answer_to

        stack = self.stack(provider)
        call_id = self.answered(stack)
        question = "Who is calling?"
        answer = Deferred.fromCoroutine(stack.manager.continue_call(call_id, question))
        spoken = Deferred.fromCoroutine(stack.manager.speak(call_id, "One moment."))
        stack.advance(6)
        self.successResultOf(spoken)
        self.assertEqual(self.successResultOf(answer), answer_to(question))
        return stack, call_id

    def test_plivo(self):
        stack, call_id = self.check("plivo")
        # The greeting's GetInput (no turn), the question's, then the one after the speak.
        tokens = [r.turn_token for r in self.fake_call(stack, call_id).inputs]
        self.assertEqual(len(tokens), 3, tokens)
        self.assertIsNotNone(tokens[1])
        self.assertEqual(tokens[1], tokens[2], "listening resumed with the turn's token")

    def test_plivo_question_not_fetched_yet(self):
        """
        The speak's transfer comes before Plivo fetched the question's document (a late fetch):
        the question is still asked first, then the statement, then the call listens for the
        answer. (`make soak`: the question was never played, and the answer to the greeting,
        a question too, answered the continue.)
        """
        import random

        from voicecall.testing.chaos import Chaos
        from voicecall.testing.stack import CALLEE, answer_to

        stack = self.stack("plivo", Chaos(random.Random(0), late_fetch=1.0))
        d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Hello, is that Bob?", "conversation"))
        stack.advance(6)
        call_id = self.successResultOf(d)
        answer = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Who is calling?"))
        stack.pump()
        spoken = Deferred.fromCoroutine(stack.manager.speak(call_id, "One moment."))
        stack.advance(8)
        self.successResultOf(spoken)
        self.assertEqual(self.fake_call(stack, call_id).speak_texts[-2:], ["Who is calling?", "One moment."])
        self.assertEqual(self.successResultOf(answer), answer_to("Who is calling?"))

    def test_twilio(self):
        self.check("twilio")

    def test_telnyx(self):
        self.check("telnyx")


class HangUpDuringASpeakTests(_CarrierStack):
    """A message cut off by the call's end is not acknowledged, nor recorded as said."""

    def test_plivo_callee_hangs_up_while_it_plays(self):
        self.check_callee_hangs_up_while_it_plays("plivo")

    def test_twilio_callee_hangs_up_while_it_plays(self):
        self.check_callee_hangs_up_while_it_plays("twilio")

    def test_telnyx_callee_hangs_up_while_it_plays(self):
        self.check_callee_hangs_up_while_it_plays("telnyx")

    def check_callee_hangs_up_while_it_plays(self, provider):
        stack = self.stack(provider)
        call_id = self.answered(stack)
        text = "Please hold the line while I look that up for you."
        spoken = Deferred.fromCoroutine(stack.manager.speak(call_id, text))
        stack.pump()
        fake = self.fake_call(stack, call_id)
        self.assertEqual(stack.carrier.spoken(fake)[-1], text)  # it started playing
        fake.hangup_by_callee()
        stack.advance(2)
        failure = self.failureResultOf(spoken, CallError)
        self.assertIn("ended", str(failure.value))
        self.assertNotIn(text, self.bot_said(stack, call_id))

    def test_plivo_bot_hangs_up_before_it_is_fetched(self):
        stack = self.stack("plivo")
        call_id = self.answered(stack)
        text = "Please hold the line."
        spoken = Deferred.fromCoroutine(stack.manager.speak(call_id, text))
        ended = Deferred.fromCoroutine(stack.manager.end_call(call_id))
        stack.advance(2)
        self.successResultOf(ended)
        self.failureResultOf(spoken, CallError)
        self.assertNotIn(text, self.bot_said(stack, call_id))


class CancelledContinueTests(_MockCalls):
    """A continue cancelled by its caller (the RPC connection closed) leaves nothing behind."""

    def test_cancelled_while_waiting_for_the_answer(self):
        import gc

        call_id = self.initiate()
        self.event(call_id, EventType.ANSWERED)
        self.wait(4)
        answer = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        self.wait(1)
        answer.cancel()
        self.failureResultOf(answer)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertFalse(self.manager.turn_pending(call_id))

    def test_cancelled_while_queued(self):
        """Its place stays until what is ahead has played, and its timer goes."""
        call_id = self.initiate()
        answer = self.run_(self.manager.continue_call(call_id, "Who is this?"))
        answer.cancel()
        self.failureResultOf(answer)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        spoken = self.run_(self.manager.speak(call_id, "Goodbye."))
        self.event(call_id, EventType.ANSWERED)
        self.wait(5)
        self.successResultOf(spoken)
        self.assertEqual(self.played(), [GREETING, "Goodbye."])
