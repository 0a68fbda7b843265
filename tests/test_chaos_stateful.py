"""
Stateful property tests (hypothesis RuleBasedStateMachine), one machine per provider: random
interleavings of gateway commands (initiate, continue, speak, end, status through the
CallManager's public API) and carrier behaviour (the fake carrier on its worst day: answers,
speech, silence, hang-ups, redelivered, reordered and delayed webhooks, a callee talking over
prompts; and daemon restarts that re-open the store and restore), all in memory on one Clock
(voicecall.testing.stack), checking after every step:

- every `continue` resolves with the answer to its own question, or a CallError, in bounded time;
- no prompt silently dropped (an acknowledged speak/continue is in the transcript and was played);
- no duplicate transcript entry;
- a call ends exactly once, and an ended call no longer holds a slot;
- states never go backwards (every durable transition obeys SPEC §3.2; terminal is final);
- after a restart the store holds what was acknowledged;
- never a 5xx to the carrier.

Each violation is tagged; `KNOWN_TAGS` maps the tags to the daemon bugs being fixed
concurrently (`KNOWN`). The plain tests ignore only those tags and must pass; the
`*_all_invariants` tests check everything, and the one that still finds a known bug is `todo`
with that bug's name (flip it once the fix lands). Settings: profile "voicecall-chaos" (few
examples, derandomized, no database) by default; HYPOTHESIS_PROFILE=soak (make soak) runs
many more examples and shrinks failures.
"""
from __future__ import annotations

import gc
import os
import sqlite3
import random
import shutil
import tempfile
from collections import Counter

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.manager import CallError
from voicecall.domain.model import CallState, next_state
from voicecall.infra.dbwriter import StoreError
from voicecall.testing.chaos import Chaos
from voicecall.testing.stack import CALLEE, START, Stack, answer_to

from tests.fixtures import answered_call, carrier_stack

settings.register_profile(
    "voicecall-chaos",
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "soak",
    max_examples=int(os.environ.get("VOICECALL_SOAK_EXAMPLES", "300")),
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
PROFILE = settings.get_profile("soak" if SOAK else "voicecall-chaos")
#: make test replays the same examples every run (VOICECALL_CHAOS_SEED picks others); the soak
#: run draws fresh ones each time and prints the seed of a failure.
SEED = None if SOAK else int(os.environ.get("VOICECALL_CHAOS_SEED", "20261203"))

TIMEOUT_MS = 4000
#: What a gateway command may fail with: the manager's errors, or the store's own (disk full).
CLEAR_ERRORS = (CallError, sqlite3.Error, StoreError)
#: Time that passes after a gateway command (the carrier acts meanwhile).
PAUSE = st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5])
#: A continue must be settled this long after it was issued (its prompt waits behind earlier
#: speech, plays, then the transcript timeout runs).
CONTINUE_BOUND = 40.0

#: Violation tags that are the known daemon bugs being fixed concurrently, per provider.
KNOWN = {
    "a": "(a) a continue issued while the greeting plays hangs / answers one question late",
    "b": "(b) redelivered Telnyx webhooks (same data.id, new signature) applied twice",
    "c": "(c) out-of-order events moving states backwards or acting late",
    "d": "(d) a failed store write leaving memory changed",
}
#: ("continue-hung" is checked everywhere: a continue's wait in the command queue is bounded by
#: the transcript timeout, tests/test_turn_order.py BoundedContinueTests.)
KNOWN_TAGS: dict[str, dict[str, str]] = {
    # All four bugs are fixed (deterministic regressions in KnownBugTests, tests/test_delivery.py,
    # tests/test_turn_order.py): make test checks every invariant on every provider.
    "mock": {},
    "telnyx": {},
    "twilio": {},
    "plivo": {},
}


class Violation(AssertionError):
    def __init__(self, tag: str, detail: str) -> None:
        super().__init__(f"[{tag}] {detail}")
        self.tag = tag


class _Op:
    """A gateway command in flight: what was asked, when, and how it ended."""

    def __init__(self, kind, call_id, text, d: Deferred, at: float, epoch: int, log=None) -> None:
        self.kind, self.call_id, self.text, self.at, self.epoch = kind, call_id, text, at, epoch
        self.result: object = None
        self.done = False
        self.log = log
        d.addBoth(self._done)

    def _done(self, result: object) -> None:
        self.done = True
        self.result = result
        if self.log is not None:
            outcome = result.getErrorMessage()[:60] if isinstance(result, Failure) else repr(result)[:60]
            self.log(f"  -> {self.kind}({self.text!r}) = {outcome}")
        if isinstance(result, Failure):
            result.trap(Exception)  # consumed here; judged by the invariants


class CallMachine(RuleBasedStateMachine):
    """The shared machine; subclasses name the provider and add carrier rules."""

    provider = "mock"
    chaos_on = True
    ignore: frozenset = frozenset()

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="vc-chaos-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.stack: Stack | None = None
        self.ops: list[_Op] = []
        self.acked: dict[str, dict] = {}  # call id -> {"bot": [texts acknowledged], "state": last seen}
        self.epoch = 0
        self.counter = 0
        self.seen_events = 0
        self.last_state: dict[str, CallState] = {}
        self.ended: Counter = Counter()
        self.history: list[str] = []
        self.failed_writes = 0

    # -- set-up and tear-down ----------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**16))
    def boot(self, seed: int) -> None:
        chaos = Chaos.worst_day(seed, speed=10.0) if self.chaos_on else Chaos()
        self.seed = seed
        self.history.append(f"boot(seed={seed}, chaos={self.chaos_on})")
        self.stack = Stack.build(self.provider, self.directory, chaos, transcript_timeout_ms=TIMEOUT_MS, max_calls=2)

    def teardown(self) -> None:
        try:
            if self.stack is not None:
                self._settle_and_check()
        finally:
            if self.stack is not None:
                self.stack.close()
            shutil.rmtree(self.directory, True)

    def _settle_and_check(self) -> None:
        """Everyone hangs up; once the carrier is quiet every call is over and no slot is held."""
        stack = self.stack
        stack.store.fail_writes = 0  # the disk has room again
        if stack.carrier is not None:
            for call in list(stack.carrier.calls().values()):
                if not stack.carrier.ended(call):
                    stack.carrier.hang_up(call)
        else:
            for call in list(stack.manager.active_calls()):
                stack.post_mock({"type": "call.ended", "callId": call.call_id, "reason": "hangup-user"})
        stack.advance(CONTINUE_BOUND + 5, step=0.25)
        self.check_all()
        if stack.manager.active_calls() and not self.failed_writes:  # a 500 may have lost the hang-up
            left = [(c.call_id, c.state.value) for c in stack.manager.active_calls()]
            self._violation("slot-held", f"calls still active after every call ended at the carrier: {left}")

    # -- helpers -------------------------------------------------------------------------------

    def _violation(self, tag: str, detail: str) -> None:
        if tag in self.ignore:
            return
        steps = "\n  ".join(self.history[-40:])
        raise Violation(
            tag,
            f"{detail} (provider {self.provider}, chaos seed {getattr(self, 'seed', None)}, "
            f"t={self.stack.clock.seconds() - START:.2f} s)\nlast steps:\n  {steps}",
        )

    def _next(self, what: str) -> str:
        self.counter += 1
        return f"{what} {self.counter}." if what == "Statement" else f"{what} {self.counter}?"

    def _note(self, what: str) -> None:
        t = self.stack.clock.seconds() - START if self.stack is not None else 0.0
        self.history.append(f"t={t:.2f} {what}")

    def _op(self, kind: str, call_id: str, text: str | None, coro) -> _Op:
        self._note(f"{kind}({call_id[:8]}, {text!r})")
        op = _Op(kind, call_id, text, Deferred.fromCoroutine(coro), self.stack.clock.seconds(), self.epoch, self._note)
        self.ops.append(op)
        self.stack.pump()
        return op

    def _stored(self, call_id: str):
        d = self.stack.store.get_call(call_id)
        box: list = []
        d.addBoth(box.append)
        return box[0] if box and not isinstance(box[0], Failure) else None

    # -- gateway commands ----------------------------------------------------------------------

    @precondition(lambda self: self.stack is not None and len(self.stack.manager.active_calls()) < self.stack.max_calls)
    @rule(target=calls, pause=PAUSE)
    def initiate(self, pause):
        greeting = self._next("Greeting")
        op = self._op("initiate", "", greeting, self.stack.manager.initiate(CALLEE, greeting, "conversation"))
        self.stack.advance(pause)
        if op.done and not isinstance(op.result, Failure):
            call_id = op.result
            self.acked[call_id] = {"bot": [], "state": CallState.INITIATED}
            return call_id
        if op.done and isinstance(op.result, Failure) and not op.result.check(*CLEAR_ERRORS):
            self._violation("crash", f"initiate failed with {op.result.getErrorMessage()!r}")
        return "none"

    @rule(call=calls, pause=PAUSE)
    def ask(self, call, pause):
        if call == "none":
            return
        question = self._next("Question")
        self._op("continue", call, question, self.stack.manager.continue_call(call, question))
        self.stack.advance(pause)

    @rule(call=calls, pause=PAUSE)
    def say(self, call, pause):
        if call == "none":
            return
        text = self._next("Statement")
        self._op("speak", call, text, self.stack.manager.speak(call, text))
        self.stack.advance(pause)

    @rule(call=calls, pause=PAUSE)
    def end(self, call, pause):
        if call == "none":
            return
        self._op("end", call, None, self.stack.manager.end_call(call))
        self.stack.advance(pause)

    @rule(call=calls)
    def status(self, call):
        if call == "none":
            return
        d = Deferred.fromCoroutine(self.stack.manager.get_call(call))
        self.stack.pump()
        box: list = []
        d.addBoth(box.append)
        if not box or isinstance(box[0], Failure) or box[0] is None:
            self._violation("lost", f"status of acknowledged call {call} -> {box}")

    @rule()
    def restart(self):
        self._note("restart")
        self.stack.restart()
        self.epoch += 1
        for call_id, acked in self.acked.items():
            record = self._stored(call_id)
            if record is None:
                self._violation("lost", f"acknowledged call {call_id} missing from the store after a restart")
                continue
            bot = [t.text for t in record.transcript if t.speaker.value == "bot"]
            for text in acked["bot"]:
                if text not in bot:
                    self._violation("lost", f"acknowledged prompt {text!r} missing from the store after a restart")

    @rule(writes=st.integers(1, 2))
    def disk_full(self, writes):
        """The next store writes fail: whatever they carried must not stay changed in memory."""
        self._note(f"disk_full({writes})")
        self.stack.store.fail_writes = writes
        self.failed_writes += writes

    # -- carrier behaviour ---------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.5, 1.0, 3.0, 6.0]))
    def wait(self, seconds):
        self._note(f"wait({seconds})")
        self.stack.advance(seconds)

    @rule(call=calls)
    def callee_hangs_up(self, call):
        pcid = self._pcid(call)
        if pcid is None:
            return
        self._note(f"callee_hangs_up({call[:8]})")
        if self.stack.carrier is None:
            self.stack.post_mock({"type": "call.ended", "callId": call, "reason": "hangup-user"})
        else:
            fake = self.stack.carrier.calls().get(pcid)
            if fake is not None:
                self.stack.carrier.hang_up(fake)
            self.stack.pump()

    @rule(call=calls, mood=st.sampled_from(["talk", "silent"]))
    def callee_mood(self, call, mood):
        pcid = self._pcid(call)
        if pcid is not None:
            self._note(f"callee_mood({call[:8]}, {mood})")
            self.stack.moods[pcid] = mood

    def _pcid(self, call_id: str) -> str | None:
        if call_id == "none":
            return None
        record = self.stack.manager.find(call_id) or self._stored(call_id)
        return record.provider_call_id if record is not None else None

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def check_all(self) -> None:
        if self.stack is None:
            return
        self._check_webhooks()
        self._check_events()
        self._check_ops()
        self._check_transcripts()
        self._check_slots()
        self._check_memory_is_stored()

    def _check_webhooks(self) -> None:
        # A failed store write is answered 500 on purpose (the carrier retries): at most one
        # 5xx per injected failure.
        errors = [status for status, _ in self.stack.webhook_statuses() if status is not None and status >= 500]
        if len(errors) > self.failed_writes:
            self._violation("5xx", f"{len(errors)} webhooks answered {sorted(set(errors))}, {self.failed_writes} store writes failed")

    def _check_events(self) -> None:
        events = self.stack.events
        for entry in events[self.seen_events:]:
            call_id = entry.get("callId")
            if entry["type"] == "call.state":
                before, after = CallState(entry["previous"]), CallState(entry["state"])
                if next_state(before, after) != after or before.is_terminal:
                    self._violation("backwards", f"call {call_id} moved {before.value} -> {after.value}")
                self.last_state[call_id] = after
            elif entry["type"] == "call.ended":
                self.ended[call_id] += 1
                if self.ended[call_id] > 1:
                    self._violation("ended-twice", f"call {call_id} ended {self.ended[call_id]} times")
        self.seen_events = len(events)

    def _check_ops(self) -> None:
        now = self.stack.clock.seconds()
        for op in self.ops:
            if op.epoch != self.epoch:
                continue  # the gateway's connection died with the daemon it talked to
            if not op.done:
                if op.kind == "continue" and now - op.at > CONTINUE_BOUND:
                    self._violation("continue-hung", f"continue {op.text!r} on {op.call_id} unresolved after {now - op.at:.1f} s")
                continue
            if isinstance(op.result, Failure):
                if not op.result.check(*CLEAR_ERRORS):
                    self._violation("crash", f"{op.kind} failed with {op.result.type.__name__}: {op.result.getErrorMessage()}")
                continue
            if op.kind == "continue" and op.result != answer_to(op.text):
                self._violation("wrong-answer", f"continue {op.text!r} resolved with {op.result!r}")
            if op.kind in ("continue", "speak") and op.call_id in self.acked:
                if op.text not in self.acked[op.call_id]["bot"]:
                    self.acked[op.call_id]["bot"].append(op.text)

    def _check_transcripts(self) -> None:
        for call_id, acked in self.acked.items():
            record = self.stack.manager.find(call_id) or self._stored(call_id)
            if record is None:
                self._violation("lost", f"acknowledged call {call_id} is neither active nor stored")
                continue
            texts = Counter((t.speaker.value, t.text) for t in record.transcript)
            for (speaker, text), n in texts.items():
                if n > 1:
                    self._violation("duplicate-transcript", f"{speaker} entry {text!r} recorded {n} times on {call_id}")
            bot = {t for s, t in texts if s == "bot"}
            for text in acked["bot"]:
                if text not in bot:
                    self._violation("dropped", f"acknowledged prompt {text!r} missing from the transcript of {call_id}")
            played = self._played(record.provider_call_id)
            if played is not None:
                for text in acked["bot"]:
                    if text not in played:
                        self._violation("dropped", f"acknowledged prompt {text!r} never played by the carrier")

    def _played(self, pcid: str | None):
        if pcid is None:
            return None
        if self.stack.carrier is None:
            return [a[2] for a in self.stack.provider.actions if a[0] == "speak" and a[1] == pcid] or None
        fake = self.stack.carrier.calls().get(pcid)
        return None if fake is None else self.stack.carrier.spoken(fake)

    def _check_memory_is_stored(self) -> None:
        """With a synchronous writer, what memory holds of an active call is what the store holds."""
        if self.stack.store.fail_writes:
            return  # a write is still to fail: judge once it has
        for call in self.stack.manager.active_calls():
            stored = self._stored(call.call_id)
            if stored is None:
                continue  # being created (initiate stores it first)
            mem = (call.state.value, [(t.speaker.value, t.text) for t in call.transcript])
            disk = (stored.state.value, [(t.speaker.value, t.text) for t in stored.transcript])
            if mem != disk:
                self._violation("memory-ahead", f"call {call.call_id} in memory {mem} but stored {disk}")

    def _check_slots(self) -> None:
        active = self.stack.manager.active_calls()
        if len(active) > self.stack.max_calls:
            self._violation("slot-held", f"{len(active)} active calls over the limit {self.stack.max_calls}")
        for call in active:
            if call.is_terminal:
                self._violation("slot-held", f"ended call {call.call_id} ({call.state.value}) still holds a slot")


class MockMachine(CallMachine):
    """The mock provider: carrier behaviour is JSON events posted through the webhook resource."""

    provider = "mock"
    chaos_on = False

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple] = []

    def _post(self, *events):
        self._note(f"post{[(e['type'], e['callId'][:8]) for e in events]}")
        self.bodies.append(events)
        self.stack.post_mock(*events)

    @rule(call=CallMachine.calls)
    def carrier_answers(self, call):
        if call != "none":
            self._post({"type": "call.answered", "callId": call})

    @rule(call=CallMachine.calls)
    def carrier_rings_late(self, call):
        """A reordered (late) `ringing` after whatever the call reached."""
        if call != "none":
            self._post({"type": "call.ringing", "callId": call})

    @rule(call=CallMachine.calls)
    def callee_speaks(self, call):
        pcid = self._pcid(call)
        if pcid is None or self.stack.moods.get(pcid, "talk") != "talk":
            return
        prompts = self._played(pcid) or []
        words = self.stack.utterance(pcid, prompts)
        if words:
            self._post({"type": "call.speech", "callId": call, "transcript": words, "isFinal": True})

    @precondition(lambda self: bool(getattr(self, "bodies", None)))
    @rule(data=st.data())
    def carrier_redelivers(self, data):
        """The same webhook body again (a carrier retry): a replay, acknowledged without effect."""
        events = data.draw(st.sampled_from(self.bodies))
        self.stack.post_mock(*events)


class TelnyxMachine(CallMachine):
    provider = "telnyx"


class TwilioMachine(CallMachine):
    provider = "twilio"


class PlivoMachine(CallMachine):
    provider = "plivo"


def _flush_findings(case) -> None:
    """
    The injected disk-full failures, logged where they happen, as they should be. Nothing else
    may be logged as an error: a carrier refusing to listen on a call that has just ended is an
    info line, and an abandoned transcript waiter is never an "Unhandled error in Deferred"
    (collected now, so that one would be blamed on this test, not the next).
    """
    gc.collect()
    case.flushLoggedErrors(sqlite3.Error, StoreError)


def _run(machine: type, ignore: frozenset) -> None:
    machine.ignore = ignore
    runner = type(machine.__name__, (machine,), {})
    if SEED is not None:
        runner = seed(SEED)(runner)
    try:
        run_state_machine_as_test(runner, settings=PROFILE)
    finally:
        machine.ignore = frozenset()


class StatefulChaosTests(SynchronousTestCase):
    """Every provider's machine: all invariants but the known bugs' (must pass), and all of them (todo)."""

    def tearDown(self):
        _flush_findings(self)

    def test_mock(self):
        _run(MockMachine, frozenset(KNOWN_TAGS["mock"]))

    def test_telnyx(self):
        _run(TelnyxMachine, frozenset(KNOWN_TAGS["telnyx"]))

    def test_twilio(self):
        _run(TwilioMachine, frozenset(KNOWN_TAGS["twilio"]))

    def test_plivo(self):
        _run(PlivoMachine, frozenset(KNOWN_TAGS["plivo"]))

    if SOAK:
        # make soak also checks the invariants the known bugs break (make test has the
        # deterministic regression tests below for those).

        def test_mock_all_invariants(self):
            _run(MockMachine, frozenset())

        def test_telnyx_all_invariants(self):
            _run(TelnyxMachine, frozenset())

        def test_twilio_all_invariants(self):
            _run(TwilioMachine, frozenset())

        def test_plivo_all_invariants(self):
            _run(PlivoMachine, frozenset())


class KnownBugTests(SynchronousTestCase):
    """
    What the machines found, replayed deterministically: each test fails while its bug is there
    (marked todo with the bug's name; remove the mark once the fix lands).
    """

    def tearDown(self):
        _flush_findings(self)

    def stack(self, provider, chaos=None):
        return carrier_stack(self, provider, chaos, transcript_timeout_ms=TIMEOUT_MS, prefix="vc-chaos-")

    def answered(self, stack):
        return answered_call(self, stack)

    def check_failed_write_changes_nothing(self, provider):
        """(d): a continue whose first store write fails leaves memory as the store has it."""
        stack = self.stack(provider)
        call_id = self.answered(stack)
        before = stack.manager.find(call_id).state
        stack.store.fail_writes = 1
        d = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Is now a good time?"))
        stack.advance(TIMEOUT_MS / 1000 + 2)
        self.failureResultOf(d)
        _flush_findings(self)
        call = stack.manager.find(call_id)
        stored = self.successResultOf(stack.store.get_call(call_id))
        self.assertEqual((call.state, stored.state), (before, before))

    def test_failed_write_changes_nothing_telnyx(self):
        self.check_failed_write_changes_nothing("telnyx")

    def test_failed_write_changes_nothing_plivo(self):
        self.check_failed_write_changes_nothing("plivo")

    def test_failed_write_changes_nothing_mock(self):
        stack = self.stack("mock")
        d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Hello?", "conversation"))
        stack.pump()
        call_id = self.successResultOf(d)
        stack.post_mock({"type": "call.answered", "callId": call_id})
        before = stack.manager.find(call_id).state
        stack.store.fail_writes = 1
        d = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Is now a good time?"))
        stack.advance(TIMEOUT_MS / 1000 + 2)
        self.failureResultOf(d)
        _flush_findings(self)
        stored = self.successResultOf(stack.store.get_call(call_id))
        self.assertEqual((stack.manager.find(call_id).state, stored.state), (before, before))

    def test_mock_hang_up_retried_after_failed_write_is_applied(self):
        """
        NEW (not one of the known bugs): the mock provider records a call as ended when it
        parses `call.ended`, before the event is applied; when applying fails (store write ->
        500), the carrier's retry is refused 409 and the call never ends (a continue queued on
        it then waits forever).
        """
        stack = self.stack("mock")
        d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Hello?", "conversation"))
        stack.pump()
        call_id = self.successResultOf(d)
        stack.store.fail_writes = 1
        ended = {"type": "call.ended", "callId": call_id, "reason": "hangup-user"}
        self.assertEqual(stack.post_mock(ended), 500)
        self.assertEqual(stack.post_mock(ended), 200)
        self.assertEqual(stack.manager.active_calls(), [])

    def test_twilio_restored_call_can_speak(self):
        """
        NEW (not one of the known bugs): after a restart, an outbound Twilio call (no media
        stream) that was restored cannot be spoken to: the provider knows call URLs only from
        initiate (or inbound webhooks), so speak fails with "Missing webhook URL for this call
        (provider state not initialized)" instead of using the daemon's webhook URL.
        """
        stack = self.stack("twilio")
        call_id = self.answered(stack)
        self.assertEqual(stack.restart()["restored"], 1)
        d = Deferred.fromCoroutine(stack.manager.speak(call_id, "Still there."))
        stack.advance(3)
        self.successResultOf(d)

    def test_telnyx_redelivery_applied_once(self):
        """(b): every Telnyx webhook delivered twice (same data.id, attempt 2, new signature): one transcript entry each."""
        stack = self.stack("telnyx", Chaos(random.Random(1), duplicate=1.0, retry_after=0.5))
        call_id = self.answered(stack)
        d = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Is now a good time?"))
        stack.advance(3)
        self.assertEqual(self.successResultOf(d), answer_to("Is now a good time?"))
        texts = [t.text for t in stack.manager.find(call_id).transcript]
        self.assertEqual(sorted(set(texts)), sorted(texts))


    def test_telnyx_late_greeting_answer_is_not_the_next_answer(self):
        """
        (a) on Telnyx: the callee's late answer to the greeting, transcribed while a `continue`
        waits, is not that continue's answer. The turn token travels in the `client_state` of
        the turn's listening command, and Telnyx echoes the latest one in each webhook.
        """
        stack = self.stack("telnyx")
        d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Greeting 1?", "conversation"))
        for _ in range(100):
            stack.advance(0.05)
            calls = list(stack.carrier.calls().values())
            if calls and calls[0].transcribing:
                break
        call_id = self.successResultOf(d)
        (call,) = stack.carrier.calls().values()
        self.assertTrue(call.transcribing)  # the greeting was said; its answer is on the way
        said = Deferred.fromCoroutine(stack.manager.speak(call_id, "Please hold."))
        asked = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Question 3?"))
        stack.advance(TIMEOUT_MS / 1000 + 2)
        self.successResultOf(said)
        self.assertEqual(self.successResultOf(asked), answer_to("Question 3?"))
        self.assertIn(answer_to("Greeting 1?"), list(call.said))  # it was said, and heard late

    def test_telnyx_answer_in_flight_from_before_a_turn_is_ignored(self):
        """
        (a) on Telnyx: a transcript Telnyx sent before the turn listened (it carries the
        client_state of that time: the plain call id, no turn token), delivered late while the
        turn waits, is not its answer; the turn's own answer (carrying its token) is.
        """
        import json

        from voicecall.testing.telnyx import envelope, iso8601

        stack = self.stack("telnyx")
        call_id = self.answered(stack)
        (call,) = stack.carrier.calls().values()
        plain = call.client_state
        asked = Deferred.fromCoroutine(stack.manager.continue_call(call_id, "Question 3?"))
        for _ in range(100):
            stack.advance(0.05)
            if call.transcribing:
                break
        self.assertNotEqual(call.client_state, plain)  # the turn's token is set
        payload = {
            "call_control_id": call.call_control_id,
            "client_state": plain,
            "direction": "outgoing",
            "transcription_data": {"transcript": answer_to("Greeting 1?"), "is_final": True, "confidence": 0.9},
        }
        body = envelope("call.transcription", payload, occurred_at=iso8601(stack.clock.seconds()))
        headers = {k: [v] for k, v in stack.carrier.fake.signed_headers(body).items()}
        d = stack._to_daemon.request("POST", "http://daemon.test/voice/webhook", data=body,
                                     headers={"Content-Type": ["application/json"], **headers})
        stack.pump()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertNoResult(asked)
        stack.advance(TIMEOUT_MS / 1000)
        self.assertEqual(self.successResultOf(asked), answer_to("Question 3?"))
        answer = [h for h in call.webhooks if h.event_type == "call.transcription"][-1]
        self.assertEqual(json.loads(answer.body)["data"]["payload"]["client_state"], call.client_state)
