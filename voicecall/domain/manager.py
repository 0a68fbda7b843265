# -*- test-case-name: tests.test_manager -*-
"""
The CallManager: the one owner of call state (SPEC §4, §5, §6 with the [H] behaviour).

It applies normalised carrier events (`process_event`), runs the operations the RPC offers
(`initiate`, `speak`, `continue_call`, `end_call`), owns the timers (max duration, notify hang-up,
transcript waits) and persists every change through the store before reporting it. It talks to
the carrier through interfaces of the domain, a `CallControl` (domain/carrier.py) and a `Voice`
(speech), and never imports the providers, web, media, speech or RPC layers: they call it.

Commands on a call take effect in order (DESIGN.md): `speak`, `continue` and automatic replies
wait in a small per-call queue until what the call is playing has played, and an initial
message still to be spoken holds the head of that queue, so a `continue` sent right after
`initiate` is asked after the greeting and answered by its own question's words.

Every failure a caller should see is a `CallError` whose message is the SPEC text.
"""
from __future__ import annotations

import re
import uuid
from collections import Counter
from typing import Any, Callable, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredLock, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from voicecall.infra.bounded import BoundedSet
from voicecall.domain import telephony
from voicecall.domain.model import (
    Answer,
    CallEvent,
    CallOptions,
    CallRecord,
    CallState,
    Direction,
    EventType,
    Mode,
    Speaker,
    TranscriptEntry,
    next_state,
)
from voicecall.domain.policy import inbound_decision
from voicecall.domain.carrier import CallControl, DialOptions, ProviderError
from voicecall.domain.voice import Voice
from voicecall.domain.store import StoreFullError, collector_paused

DEFAULT_GREETING = "Hello! How can I help you today?"
MOCK_FROM_NUMBER = "+15550000000"
_PHONE = re.compile(r"^\+[1-9]\d{1,14}$")


class CallError(Exception):
    """An operation failed; `str(exc)` is the SPEC error text."""

    def __init__(self, message: str, call_id: str | None = None) -> None:
        super().__init__(message)
        self.call_id = call_id


@frozen
class ManagerSettings:
    """The parts of the config the manager needs, as plain values (built in tap.py)."""

    provider_name: str
    from_number: str | None = None
    max_concurrent_calls: int = 1
    max_duration_seconds: int = 300
    transcript_timeout_ms: int = 180_000
    notify_hangup_delay_sec: int = 3
    default_mode: Mode = field(default=Mode.NOTIFY, converter=Mode)
    inbound_policy: str = "disabled"
    allow_from: tuple[str, ...] = ()
    inbound_greeting: str | None = None
    tts_voice: str | None = None
    dedupe_limit: int = 10_000
    allowed_from_numbers: tuple[str, ...] = ()
    answering_machine: str = "ignore"
    transfer_allow_to: tuple[str, ...] = ()
    recording_enabled: bool = False
    recording_announcement: str = "This call is being recorded."

    @property
    def limits(self) -> telephony.Limits:
        return telephony.Limits(
            from_number=self.from_number,
            allowed_from_numbers=self.allowed_from_numbers,
            max_duration_seconds=self.max_duration_seconds,
            answering_machine=self.answering_machine,
            recording_enabled=self.recording_enabled,
        )


def _snippet(text: str, limit: int = 80) -> str:
    """A log-safe excerpt: control characters stripped, length capped."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


@define(repr=False)
class _Waiter:
    """
    A `continue`'s wait for its answer. `deferred` is fired by whatever settles it (the answer,
    the call's end, the timeout, a stop); the outcome is kept here until the turn asks for it
    (`outcome`), so a turn abandoned before it got that far (its prompt never acknowledged, the
    daemon stopped meanwhile) leaves no unhandled failure behind.
    """

    deferred: Deferred
    turn_token: str | None
    #: What the turn listens for: "speech", "dtmf" or "speech dtmf" (model.TURN_INPUTS).
    input: str = "speech"
    _result: list = field(factory=list)
    _asked: Deferred | None = None

    def __attrs_post_init__(self) -> None:
        self.deferred.addBoth(self._settled)

    def _settled(self, result: Any) -> None:
        self._result.append(result)
        asked, self._asked = self._asked, None
        if asked is not None and not asked.called:  # (called: the turn was cancelled meanwhile)
            asked.errback(result) if isinstance(result, Failure) else asked.callback(result)

    @property
    def dtmf(self) -> bool:
        return "dtmf" in self.input

    def outcome(self) -> Deferred[Answer]:
        """The answer, or the failure, once settled (for the one turn that awaits it)."""
        if self._result:
            result = self._result[0]
            return fail(result) if isinstance(result, Failure) else succeed(result)
        self._asked = Deferred()
        return self._asked


def _remove_last(entries: list, entry: Any) -> None:
    """Remove the last occurrence of `entry` itself (identity, not equality) from `entries`, if any."""
    for i in range(len(entries) - 1, -1, -1):
        if entries[i] is entry:
            del entries[i]
            return


_FIELDS = ("state", "answered_at", "ended_at", "end_reason", "provider_call_id")
#: The metadata a carrier event may change (answering-machine detection, recordings): taken back
#: with the rest when the event's commit fails.
_EVENT_METADATA = ("answeredBy", "machineGreetingEnded", "recordings")


@frozen
class _Fields:
    """The scalar fields of a record an event may change, to take such a change back."""

    values: tuple = field(repr=False)  # call state: never in a repr

    @classmethod
    def of(cls, call: CallRecord) -> _Fields:
        return cls(tuple(getattr(call, name) for name in _FIELDS))

    def get(self, name: str) -> Any:
        return self.values[_FIELDS.index(name)]

    def restore(self, call: CallRecord, after: _Fields) -> None:
        """Put back each field the change moved from this value to `after`'s, unless it has moved on since."""
        for name, old, new in zip(_FIELDS, self.values, after.values, strict=True):
            if old != new and getattr(call, name) == new:
                setattr(call, name, old)


#: Commands (speak, continue, reply) one call may have waiting behind what it is playing.
MAX_QUEUED_COMMANDS = 16
#: A max-duration hang-up the carrier refuses is retried after these delays (seconds); after
#: the last one fails, the call is ended here (reason `error`) so it stops holding its slot.
MAX_DURATION_RETRY_DELAYS = (1.0, 2.0, 4.0)
#: Per-turn latencies kept in a call's metadata (`turnLatenciesMs`, `turnListenWaitsMs`).
MAX_TURN_SAMPLES = 100


@define
class _Commands:
    """
    One call's command queue: each command starts when the one before it has taken effect
    (its speech played, its question asked). `greeting` holds the place of an initial message
    that is still to be spoken, so commands sent before it wait for it.
    """

    tail: Deferred | None = field(default=None, repr=False)
    depth: int = 0
    greeting: Deferred | None = field(default=None, repr=False)


@define(repr=False)
class CallManager:
    _provider: CallControl
    _voice: Voice
    _store: Any  # voicecall.domain.store.CallStore
    _clock: IReactorTime
    _settings: ManagerSettings
    _webhook_url: str | None = None
    _active: dict[str, CallRecord] = field(factory=dict)
    _by_provider_id: dict[str, str] = field(factory=dict)
    _processed: BoundedSet = field(default=None)
    #: Keys of the events being applied -> Deferreds of their redeliveries waiting for the outcome.
    _in_flight: dict[str, list[Deferred]] = field(factory=dict)
    #: One lock per call (or carrier id of a call not known yet) with events being applied.
    _event_locks: dict[str, DeferredLock] = field(factory=dict)
    _rejected: dict[str, object] = field(factory=dict)
    _turns: set[str] = field(factory=set)
    _waiters: dict[str, _Waiter] = field(factory=dict)
    _max_timers: dict[str, IDelayedCall] = field(factory=dict)
    _notify_timers: dict[str, IDelayedCall] = field(factory=dict)
    #: Answered calls waiting for the answering-machine verdict (or a machine's beep).
    _machine_timers: dict[str, IDelayedCall] = field(factory=dict)
    #: Calls whose first words are due (answered, stream up) but wait for that verdict.
    _greeting_held: set[str] = field(factory=set)
    #: Calls answered by a machine whose beep is being waited for (its timer runs).
    _machine_greeting_timing: set[str] = field(factory=set)
    _initial_in_flight: set[str] = field(factory=set)
    #: Per-call command queues (only for active calls; dropped when empty or at the call's end).
    _commands: dict[str, _Commands] = field(factory=dict)
    #: Answered calls whose initial message waits for their media stream.
    _greeting_deferred: set[str] = field(factory=set)
    #: When this manager started (ms): a call answered before it (restored) has nobody to greet.
    _started_ms: int = field(init=False, default=0)
    #: Outbound calls being stored: they count against maxConcurrentCalls already.
    _reserved: set[str] = field(factory=set)
    _subscribers: list[Callable[[dict], None]] = field(factory=list)
    #: Called with (call, text) for each final caller utterance no `continue` was waiting for.
    _on_utterance: Callable[[CallRecord, str], None] | None = None
    #: Called with each completed turn's latency in seconds (metrics).
    _on_turn_latency: Callable[[float], None] | None = None
    #: Calls ended since start, by end reason (metrics).
    ended_counts: Counter = field(factory=Counter)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._started_ms = self._now()
        if self._processed is None:
            self._processed = BoundedSet(self._settings.dedupe_limit)

    # -- lookups ----------------------------------------------------------------------------------

    def set_webhook_url(self, url: str | None) -> None:
        self._webhook_url = url

    def active_calls(self) -> list[CallRecord]:
        # A call whose end is being stored is still held (its end's effects run after the
        # commit) but is no longer active.
        return [call for call in self._active.values() if not call.is_terminal]

    def find(self, id_or_provider_id: str) -> CallRecord | None:
        """An active call by our id, else by the carrier's id."""
        call = self._active.get(id_or_provider_id)
        if call is None:
            cid = self._by_provider_id.get(id_or_provider_id)
            call = self._active.get(cid) if cid else None
        return call

    async def get_call(self, id_or_provider_id: str) -> CallRecord | None:
        """An active call, or else any stored call (ended ones too)."""
        call = self.find(id_or_provider_id)
        if call is None:
            call = await self._store.get_call(id_or_provider_id)
        return call

    def subscribe(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call `listener` with every call event once it is durable; returns the unsubscriber."""
        self._subscribers.append(listener)
        return lambda: self._subscribers.remove(listener) if listener in self._subscribers else None

    # -- persistence ------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _log_entry(self, call: CallRecord, kind: str, **extra: Any) -> dict:
        entry = {"type": kind, "callId": call.call_id, "at": self._now()}
        entry.update(extra)
        return entry

    async def _persist(
        self,
        call: CallRecord,
        *,
        transcript: Sequence[TranscriptEntry] = (),
        keys: Sequence[str] = (),
        events: Sequence[dict] = (),
        admit_limit: int | None = None,
    ) -> None:
        await self._store.write(call, transcript=transcript, event_keys=keys, events=events, admit_limit=admit_limit)
        for entry in events:
            for listener in list(self._subscribers):
                try:
                    listener(entry)
                except Exception:
                    self._log.failure("call event subscriber failed")

    def _move(self, call: CallRecord, new: CallState, events: list[dict]) -> None:
        """Apply the SPEC §3.2 transition rule, noting a change in `events`."""
        before = call.state
        call.state = next_state(before, new)
        if call.state != before:
            events.append(self._log_entry(call, "call.state", state=call.state.value, previous=before.value))

    def _gone(self, call: CallRecord) -> bool:
        """Whether `call` is over, or no longer the record held for its id."""
        return call.is_terminal or self._active.get(call.call_id) is not call

    def _forget(self, call: CallRecord) -> None:
        self._active.pop(call.call_id, None)
        self._drop_commands(call.call_id)
        if call.provider_call_id and self._by_provider_id.get(call.provider_call_id) == call.call_id:
            del self._by_provider_id[call.provider_call_id]
        self._greeting_held.discard(call.call_id)
        self._machine_greeting_timing.discard(call.call_id)
        for timers in (self._max_timers, self._notify_timers, self._machine_timers):
            timer = timers.pop(call.call_id, None)
            if timer is not None and timer.active():
                timer.cancel()

    def _finish(self, call: CallRecord, reason: str, waiter_error: str, events: list[dict]) -> None:
        """Make `call` terminal with `reason` (in memory; the caller persists)."""
        self._end_record(call, reason, events)
        self._ended(call, reason, waiter_error)

    def _end_record(self, call: CallRecord, reason: str, events: list[dict]) -> None:
        """The record's side of a call's end: end time and reason, terminal state, log entries."""
        call.ended_at = self._now()
        call.end_reason = reason
        self._move(call, CallState(reason), events)
        events.append(self._log_entry(call, "call.ended", reason=reason))

    def _ended(self, call: CallRecord, reason: str, waiter_error: str) -> None:
        """The rest of a call's end: counted, forgotten (timers, queue), its waiter failed."""
        self.ended_counts[reason] += 1
        self._forget(call)
        waiter = self._waiters.pop(call.call_id, None)
        if waiter is not None and not waiter.deferred.called:
            waiter.deferred.errback(CallError(waiter_error, call.call_id))

    # -- carrier events ---------------------------------------------------------------------------
    #
    # Carriers deliver at least once, in no guaranteed order (DESIGN.md, "Delivery semantics").
    # An event is applied once per identity (`CallEvent.keys`), durably: its keys are committed
    # with its change and restored at start. The events of one call are applied one at a time.
    # Applying one changes the record in memory first (so that any write of the call made
    # meanwhile carries the change), then commits; everything else it causes (timers, waiters,
    # hooks, the call leaving the active set, counters, an inbound call's answer) runs only once
    # the commit succeeded. A failed commit undoes the record's change and raises, so the webhook
    # is answered 500 and the carrier's retry applies the event. States only move forward, a
    # terminal state is final, and an event for a call that is over is recorded, never acted on.

    async def process_event(self, event: CallEvent) -> None:
        """Apply one normalised carrier event (SPEC §4.2). Redelivered events are no-ops."""
        keys = event.keys
        while True:
            if any(k in self._processed for k in keys):
                return
            twin = next((self._in_flight[k] for k in keys if k in self._in_flight), None)
            if twin is None:
                break
            # The same event is being applied: answer once it is durable, or apply it here if
            # that attempt failed (a 200 must mean that the event is on disk).
            done: Deferred[None] = Deferred()
            twin.append(done)
            await done
        waiting: list[Deferred[None]] = []
        for k in keys:
            self._in_flight[k] = waiting
        try:
            await self._one_at_a_time(event)
        finally:
            for k in keys:
                if self._in_flight.get(k) is waiting:
                    del self._in_flight[k]
            for d in waiting:
                d.callback(None)

    def _lock_key(self, event: CallEvent) -> str:
        call = self._resolve(event)
        if call is not None:
            return call.call_id
        return event.provider_call_id or event.call_id

    def _resolve(self, event: CallEvent) -> CallRecord | None:
        call = self.find(event.call_id)
        if call is None and event.provider_call_id:
            call = self.find(event.provider_call_id)
        return call

    async def _one_at_a_time(self, event: CallEvent) -> None:
        """Run `_process(event)` holding its call's lock (the call's id, or the carrier's id of a call not known yet)."""
        while True:
            name = self._lock_key(event)
            lock = self._event_locks.get(name)
            if lock is None:
                lock = self._event_locks[name] = DeferredLock()
            await lock.acquire()
            try:
                if self._lock_key(event) == name:  # else: the call became known while we waited
                    await self._process(event)
                    return
            finally:
                lock.release()
                if not lock.locked and not lock.waiting and self._event_locks.get(name) is lock:
                    del self._event_locks[name]

    def _remember(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._processed.add(k)

    async def _process(self, event: CallEvent) -> None:
        keys = event.keys
        call = self._resolve(event)
        created = False
        events: list[dict] = []
        if call is None or call.is_terminal:
            over = call or await self._stored(event)
            if over is not None and event.type is EventType.RECORDING:
                # Carriers save a recording after the hang-up: news of it still counts.
                await self._record_recording(over, event, keys)
                return
            if over is not None:
                await self._record_late(over, event, keys)
                return
            if not (event.provider_call_id and event.direction is Direction.INBOUND):
                # Only an inbound call is created from a carrier event. An unknown outbound
                # call is one we never placed (or whose record is gone): ignored.
                self._log.info("Ignoring {type} for unknown call", type=event.type.value)
                self._remember(keys)
                self._applied(event)
                return
            why = inbound_decision(self._settings.inbound_policy, self._settings.allow_from, event.from_number)
            if why is not None:
                self._remember(keys)
                self._applied(event)
                self._reject_inbound(event, why)
                return
            call = self._create_from_event(event, events)
            created = True

        before = _Fields.of(call)
        meta_before = {k: call.metadata[k] for k in _EVENT_METADATA if k in call.metadata}
        old_pid = call.provider_call_id
        if event.provider_call_id and event.provider_call_id != old_pid:
            call.provider_call_id = event.provider_call_id
            self._by_provider_id[event.provider_call_id] = call.call_id
            if old_pid and self._by_provider_id.get(old_pid) == call.call_id:
                del self._by_provider_id[old_pid]
        call.processed_event_ids.extend(keys)
        transcript: list[TranscriptEntry] = []
        effects: list[Callable[[], None]] = []
        if created and call.direction is Direction.INBOUND:
            effects.append(lambda: self._background(self._provider.answer_call(call), "Failed to answer inbound call"))

        kind = event.type
        if kind is EventType.SPEAKING and call.state is CallState.LISTENING:
            # The carrier reporting speech that started before what we already heard ended
            # (`speak.started` delivered after `speak.ended`): recorded, the state stays.
            events.append(self._late_entry(call, event))
        elif kind in (EventType.INITIATED, EventType.RINGING, EventType.ACTIVE, EventType.SPEAKING):
            self._move(call, CallState(kind.value.split(".", 1)[1]), events)
        elif kind is EventType.ANSWERED and call.answered_at is None:
            # Only the first answer counts: carriers repeat "in-progress" on every later request
            # of the call, which must not restart the max-duration clock.
            call.answered_at = event.timestamp
            self._move(call, CallState.ANSWERED, events)
            effects.append(lambda: self._answered(call))
        elif kind is EventType.SPEECH:
            text = (event.transcript or "").strip()
            if event.is_final and text:
                waiter = self._waiters.get(call.call_id)
                if waiter is not None and waiter.turn_token and waiter.turn_token != event.turn_token:
                    self._log.warn(
                        "Ignoring speech event with mismatched turn token for {call_id}",
                        call_id=call.call_id,
                    )
                else:
                    entry = TranscriptEntry(event.timestamp, Speaker.USER, text)
                    call.transcript.append(entry)
                    transcript.append(entry)
                    events.append(self._log_entry(call, "call.transcript", speaker="user", text=text))
                    self._move(call, CallState.LISTENING, events)
                    if waiter is not None and "speech" in waiter.input:
                        effects.append(lambda: self._resolve_waiter(call, waiter, Answer(text, "speech")))
                    elif waiter is None and self._on_utterance is not None and not telephony.awaiting_machine(call):
                        # (Words heard before detection's verdict may be a machine's greeting: not answered.)
                        hook = self._on_utterance
                        effects.append(lambda: hook(call, text))
        elif kind is EventType.DTMF:
            digits = "".join(ch for ch in (event.digits or "") if ch.isprintable())[:64]
            if digits:
                waiter = self._waiters.get(call.call_id)
                entry = TranscriptEntry(event.timestamp, Speaker.USER, telephony.DTMF_PREFIX + digits)
                call.transcript.append(entry)
                transcript.append(entry)
                events.append(self._log_entry(call, "call.dtmf", digits=digits))
                answers = waiter is not None and waiter.dtmf and (not waiter.turn_token or not event.turn_token or waiter.turn_token == event.turn_token)
                if answers:
                    effects.append(lambda: self._resolve_waiter(call, waiter, Answer(digits, "dtmf")))
        elif kind is EventType.MACHINE:
            found = telephony.verdict(event.answered_by, event.machine_done)
            known = call.metadata.get("answeredBy")
            # A later "unknown" never overrides a verdict; a machine's beep confirms it is one.
            if known is None or (found != "unknown" and found != known):
                call.metadata["answeredBy"] = found
            if event.machine_done:
                call.metadata["machineGreetingEnded"] = True
            events.append(self._log_entry(call, "call.machine", answeredBy=call.metadata["answeredBy"], greetingEnded=event.machine_done))
            effects.append(lambda: self._machine_verdict(call))
        elif kind is EventType.RECORDING:
            if self._merge_recording(call, event):
                events.append(self._log_entry(call, "call.recording", recording=self._recording_of(call, event)))
        elif kind is EventType.ENDED or (kind is EventType.ERROR and not event.retryable):
            reason = (event.reason or "completed") if kind is EventType.ENDED else "error"
            why = f"Call ended: {reason}" if kind is EventType.ENDED else f"Call error: {event.error}"
            self._end_record(call, reason, events)
            effects.append(lambda: self._ended(call, reason, why))

        try:
            await self._persist(call, transcript=transcript, keys=keys, events=events)
        except BaseException:
            self._undo(call, before, _Fields.of(call), transcript, keys, old_pid, created)
            for k in _EVENT_METADATA:
                call.metadata.pop(k, None)
            call.metadata.update(meta_before)
            raise
        self._remember(keys)
        # Committed: the webhook is answered 200 whatever an effect does.
        for effect in effects:
            try:
                effect()
            except Exception:
                self._log.failure("applying {type} to {call_id} failed after it was stored", type=event.type.value, call_id=call.call_id)
        self._applied(event)

    def _applied(self, event: CallEvent) -> None:
        """Run the adapter's own effect of an event applied for the first time."""
        if event.on_applied is not None:
            try:
                event.on_applied()
            except Exception:
                self._log.failure("the carrier adapter's effect of {type} failed", type=event.type.value)

    def _undo(
        self,
        call: CallRecord,
        before: _Fields,
        after: _Fields,
        transcript: Sequence[TranscriptEntry],
        keys: Sequence[str],
        old_pid: str | None,
        created: bool,
    ) -> None:
        """Take back an event's change to `call` after its commit failed (what others changed since stays)."""
        self._log.warn(
            "Store write failed: {call_id} left as it was (the carrier's retry applies the event)",
            call_id=call.call_id,
        )
        if created:
            self._active.pop(call.call_id, None)
            if self._by_provider_id.get(call.provider_call_id or "") == call.call_id:
                del self._by_provider_id[call.provider_call_id]
        before.restore(call, after)
        new = after.get("provider_call_id")
        if call.provider_call_id == old_pid and new != old_pid and not created:
            if new and self._by_provider_id.get(new) == call.call_id:
                del self._by_provider_id[new]
            if old_pid:
                self._by_provider_id[old_pid] = call.call_id
        for entry in transcript:
            _remove_last(call.transcript, entry)
        for k in keys:
            for i in range(len(call.processed_event_ids) - 1, -1, -1):
                if call.processed_event_ids[i] == k:
                    del call.processed_event_ids[i]
                    break

    async def _stored(self, event: CallEvent) -> CallRecord | None:
        """The stored call an event names, if any (a call that is over is not in memory)."""
        ids = dict.fromkeys(i for i in (event.call_id, event.provider_call_id) if i)
        for ident in ids:
            stored = await self._store.get_call(ident)
            if stored is not None:
                return stored
        return None

    def _late_entry(self, call: CallRecord, event: CallEvent) -> dict:
        return self._log_entry(call, "call.event.late", event=event.type.value, state=call.state.value)

    async def _record_late(self, call: CallRecord, event: CallEvent, keys: Sequence[str]) -> None:
        """An event for a call that is over: its keys and a log entry are stored, nothing else happens."""
        # The carrier's own report of an end we already applied (our hang-up, then its
        # "completed") is routine: debug. Anything else arriving late is worth a line.
        log = self._log.debug if event.type is EventType.ENDED else self._log.info
        log(
            "Late {type} for call {call_id} ({state}): recorded, not applied",
            type=event.type.value,
            call_id=call.call_id,
            state=call.state.value,
        )
        await self._persist(call, keys=keys, events=[self._late_entry(call, event)])
        self._remember(keys)
        self._applied(event)

    def _answered(self, call: CallRecord) -> None:
        if self._gone(call):
            return  # ended while the answer was being stored
        self._start_max_timer(call, self._max_seconds(call))
        if telephony.policy_of(call) != "ignore" and call.metadata.get("answeredBy") is None:
            self._machine_timer(call.call_id, telephony.MACHINE_VERDICT_WAIT_SECONDS)
        self._on_answered(call)

    def _max_seconds(self, call: CallRecord) -> int:
        return call.metadata.get("maxDurationSeconds") or self._settings.max_duration_seconds

    def _voice_of(self, call: CallRecord) -> str | None:
        return call.metadata.get("voice") or self._settings.tts_voice

    # -- answering machines -----------------------------------------------------------------------
    #
    # A call placed with an answering-machine policy says nothing until the carrier's detection
    # has a verdict (or MACHINE_VERDICT_WAIT_SECONDS have passed: "unknown", treated as a person).
    # A person hears the call as usual; a machine (with "hang-up") or a fax is hung up on (end
    # reason voicemail); with "leave-message" the first words wait for the machine's beep (at most
    # MACHINE_GREETING_WAIT_SECONDS), are left as a message, and the call hangs up (voicemail).
    # The verdict may arrive before the answer: it is recorded and acted on at the answer.

    def _machine_timer(self, call_id: str, seconds: float) -> None:
        old = self._machine_timers.pop(call_id, None)
        if old is not None and old.active():
            old.cancel()
        self._machine_timers[call_id] = self._clock.callLater(seconds, self._machine_wait_over, call_id)

    def _machine_wait_over(self, call_id: str) -> None:
        self._machine_timers.pop(call_id, None)
        call = self._active.get(call_id)
        if call is None or call.is_terminal:
            return
        meta = call.metadata
        if meta.get("answeredBy") is None:
            meta["answeredBy"] = "unknown"
            self._log.info("no answering-machine verdict for {call_id}: going on as if a person answered", call_id=call_id)
        elif telephony.awaiting_machine(call):
            meta["machineGreetingEnded"] = True
            self._log.info("no beep heard on {call_id}: leaving the message anyway", call_id=call_id)
        d = Deferred.fromCoroutine(self._publish(call, "call.machine", answeredBy=meta["answeredBy"], greetingEnded=bool(meta.get("machineGreetingEnded")), timedOut=True))
        d.addCallback(lambda _: self._machine_verdict(call))
        self._background(d, "acting on the answering-machine wait's end failed")

    def _machine_verdict(self, call: CallRecord) -> None:
        """Act on what answered the call, once the call is answered (its verdict is stored)."""
        if self._gone(call) or call.answered_at is None or telephony.policy_of(call) == "ignore":
            return
        if telephony.hangs_up_on(call):
            timer = self._machine_timers.pop(call.call_id, None)
            if timer is not None and timer.active():
                timer.cancel()
            what = call.metadata.get("answeredBy")
            self._log.info("call {call_id} answered by a {what}: hanging up", call_id=call.call_id, what=what)
            self._background(Deferred.fromCoroutine(self.end_call(call.call_id, "voicemail")), f"hanging up on a {what} failed")
            return
        if telephony.awaiting_machine(call):
            if call.metadata.get("answeredBy") == "machine" and call.call_id not in self._machine_greeting_timing:
                self._machine_greeting_timing.add(call.call_id)
                self._machine_timer(call.call_id, telephony.MACHINE_GREETING_WAIT_SECONDS)
            return
        timer = self._machine_timers.pop(call.call_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        if call.call_id in self._greeting_held:
            self._greeting_held.discard(call.call_id)
            self.speak_initial_message(call.call_id)

    def _resolve_waiter(self, call: CallRecord, waiter: _Waiter, answer: Answer) -> None:
        if self._waiters.get(call.call_id) is waiter:
            del self._waiters[call.call_id]
        if not waiter.deferred.called:
            waiter.deferred.callback(answer)

    # -- recordings -------------------------------------------------------------------------------

    def _merge_recording(self, call: CallRecord, event: CallEvent) -> bool:
        """Apply a carrier's news of a recording to the record (in memory); False if unusable."""
        try:
            call.metadata["recordings"] = telephony.merge_recording(call.recordings, event.recording or {})
        except ValueError as e:
            self._log.warn("ignoring a recording update for {call_id}: {why}", call_id=call.call_id, why=str(e))
            return False
        return True

    @staticmethod
    def _recording_of(call: CallRecord, event: CallEvent) -> dict:
        rid = (event.recording or {}).get("id")
        return next((dict(r) for r in call.recordings if r.get("id") == rid), {})

    async def _record_recording(self, call: CallRecord, event: CallEvent, keys: Sequence[str]) -> None:
        """A recording's news for a call that is over (saved after the hang-up): stored with the call."""
        before = call.metadata.get("recordings")
        merged = self._merge_recording(call, event)
        events = [self._log_entry(call, "call.recording", recording=self._recording_of(call, event))] if merged else []
        try:
            await self._persist(call, keys=keys, events=events)
        except BaseException:
            if before is None:
                call.metadata.pop("recordings", None)
            else:
                call.metadata["recordings"] = before
            raise
        self._remember(keys)
        self._applied(event)

    async def _start_recording(self, call: CallRecord) -> None:
        """Say the recording announcement (played), then have the carrier record the call."""
        call.metadata["recordingRequested"] = True
        await self._speak(call, self._settings.recording_announcement)
        if self._gone(call):
            return
        try:
            started = await self._provider.start_recording(call)
        except Exception as e:
            self._log.warn("could not start recording {call_id}: {error}", call_id=call.call_id, error=str(e))
            await self._publish(call, "call.recording.failed", error=str(e) or "start_recording failed")
            return
        if started:
            news = CallEvent(type=EventType.RECORDING, call_id=call.call_id, id="", timestamp=self._now(), recording=started)
            if self._merge_recording(call, news):
                await self._persist(call, events=[self._log_entry(call, "call.recording", recording=self._recording_of(call, news))])

    async def publish(self, call_id: str, kind: str, **fields: Any) -> None:
        """Store an event about a call (live or ended) with its others, then tell the subscribers."""
        call = await self.get_call(call_id)
        if call is None:
            raise CallError("Call not found")
        await self._publish(call, kind, **fields)

    async def _publish(self, call: CallRecord, kind: str, **fields: Any) -> None:
        await self._persist(call, events=[self._log_entry(call, kind, **fields)])

    def _create_from_event(self, event: CallEvent, events: list[dict]) -> CallRecord:
        """A call the carrier told us of (in memory, to be stored; answering it waits for the commit)."""
        inbound = event.direction is Direction.INBOUND
        call = CallRecord(
            call_id=str(uuid.uuid4()),
            provider=self._settings.provider_name,
            direction=event.direction,
            state=CallState.RINGING,
            from_number=event.from_number or "unknown",
            to_number=event.to_number or self._settings.from_number or "unknown",
            started_at=self._now(),
            provider_call_id=event.provider_call_id,
        )
        if inbound:
            call.metadata["initialMessage"] = self._settings.inbound_greeting or DEFAULT_GREETING
            if self._settings.recording_enabled:
                call.metadata["record"] = True
        self._active[call.call_id] = call
        self._by_provider_id[event.provider_call_id] = call.call_id
        events.append(self._created_entry(call))
        self._log.info(
            "{direction} call {call_id} from the carrier, state ringing",
            direction=call.direction.value,
            call_id=call.call_id,
        )
        return call

    def _created_entry(self, call: CallRecord) -> dict:
        return self._log_entry(
            call,
            "call.created",
            direction=call.direction.value,
            provider=call.provider,
            to=call.to_number,
            state=call.state.value,
            **{"from": call.from_number},
        )

    def _reject_inbound(self, event: CallEvent, why: str) -> None:
        pid = event.provider_call_id
        self._log.info("Inbound call rejected: {why}", why=why)
        if pid in self._rejected:
            return
        token = object()
        self._rejected[pid] = token
        while len(self._rejected) > self._settings.dedupe_limit:
            del self._rejected[next(iter(self._rejected))]
        stub = CallRecord(
            call_id=event.call_id or pid,
            provider=self._settings.provider_name,
            direction=Direction.INBOUND,
            state=CallState.RINGING,
            from_number=event.from_number or "unknown",
            to_number=event.to_number or "unknown",
            started_at=self._now(),
            provider_call_id=pid,
        )
        d = Deferred.fromCoroutine(self._await(self._provider.hangup_call(stub, "hangup-bot")))

        def failed(f):
            self._log.failure("Failed to reject inbound call {pid}", f, pid=pid)
            if self._rejected.get(pid) is token:
                del self._rejected[pid]

        d.addErrback(failed)

    @staticmethod
    async def _await(d: Deferred) -> Any:
        return await d

    def _background(self, d: Deferred, what: str) -> None:
        d.addErrback(lambda f: self._log.failure(what, f))

    # -- the initial message ----------------------------------------------------------------------

    def _on_answered(self, call: CallRecord) -> None:
        if telephony.hangs_up_on(call) or telephony.awaiting_machine(call):
            self._machine_verdict(call)  # (a verdict that came before the answer)
        if not call.metadata.get("initialMessage"):
            if call.metadata.get("record") and not call.metadata.get("recordingRequested"):
                d = Deferred.fromCoroutine(self._in_order(call, lambda: self._start_recording(call)))
                d.addErrback(lambda f: self._log.warn("recording {call_id} did not start: {error}", call_id=call.call_id, error=f.getErrorMessage()))
            return
        if call.mode is Mode.NOTIFY or not self._voice_defers_initial(call):
            self.speak_initial_message(call.call_id)
        else:
            # Spoken once the media stream is up: commands sent meanwhile still wait for it.
            self._greeting_deferred.add(call.call_id)

    def _voice_defers_initial(self, call: CallRecord) -> bool:
        defers = getattr(self._voice, "defers_initial_message", None)
        return bool(defers and defers(call))

    def speak_initial_message(self, id_or_provider_id: str) -> Deferred[None]:
        """Speak a call's initial message once (SPEC §5.2 [H]); never raises."""
        d = Deferred.fromCoroutine(self._speak_initial(id_or_provider_id))
        d.addErrback(lambda f: self._log.failure("Failed to speak initial message", f))
        return d

    async def _speak_initial(self, id_or_provider_id: str) -> None:
        call = self.find(id_or_provider_id)
        if call is None:
            self._log.warn("speakInitialMessage: no call found for {pid}", pid=id_or_provider_id)
            return
        message = call.metadata.get("initialMessage")
        if not message or call.call_id in self._initial_in_flight or telephony.hangs_up_on(call):
            return
        if telephony.awaiting_machine(call):
            # Due now (answered; the stream is up), but who answered is not known yet.
            self._greeting_deferred.discard(call.call_id)
            self._greeting_held.add(call.call_id)
            return
        self._greeting_deferred.discard(call.call_id)
        queue = self._commands.get(call.call_id)
        held = queue.greeting if queue is not None else None
        try:
            if held is not None:
                # Its place at the head of the queue was kept for it: commands sent before the
                # answer (or the stream) wait behind it.
                queue.greeting = None
                try:
                    await self._greet(call, message)
                finally:
                    self._release(call.call_id, queue, held)
            else:
                await self._in_order(call, lambda: self._greet(call, message), greeting=True)
        except CallError as e:
            self._log.warn("Failed to speak initial message: {error}", error=str(e))

    async def _greet(self, call: CallRecord, message: str) -> None:
        voicemail = telephony.leaves_message(call)
        self._initial_in_flight.add(call.call_id)
        try:
            if call.metadata.get("record") and not call.metadata.get("recordingRequested") and not voicemail:
                await self._start_recording(call)
            await self._speak(call, message)
        finally:
            self._initial_in_flight.discard(call.call_id)
        if call.is_terminal:
            return
        call.metadata.pop("initialMessage", None)
        events: list[dict] = []
        if voicemail:
            # The message is left: the call is over (both modes).
            await self._persist(call, events=events)
            self._background(Deferred.fromCoroutine(self.end_call(call.call_id, "voicemail")), "hanging up after leaving a message failed")
            return
        if call.mode is Mode.NOTIFY:
            delay = self._settings.notify_hangup_delay_sec
            self._notify_timers[call.call_id] = self._clock.callLater(delay, self._notify_hangup, call.call_id)
            await self._persist(call, events=events)
        else:
            self._move(call, CallState.LISTENING, events)
            await self._persist(call, events=events)
            if call.call_id in self._turns:
                return  # a `continue` is next in line: its question listens for the answer
            try:
                await self._voice.start_listening(call, None)
            except ProviderError as e:
                self._listen_refused(call, e)

    def _listen_refused(self, call: CallRecord, error: ProviderError) -> None:
        """
        The carrier refused to listen after the greeting. Usually the callee hung up as it ended
        (Plivo 404 "call not in progress"): the hang-up's webhook ends the call, so that is one
        info line, not a failure; anything else is a warning (the call lives on, unheard).
        """
        if self._gone(call) or error.status == 404:
            self._log.info("call {call_id} ended as its greeting did; not listening ({error})", call_id=call.call_id, error=str(error))
        else:
            self._log.warn("could not listen on {call_id} after its greeting: {error}", call_id=call.call_id, error=str(error))

    # -- the command queue ------------------------------------------------------------------------

    def _greeting_expected(self, call: CallRecord) -> bool:
        """Whether the call's initial message is still to be spoken (on the answer, or when its stream starts)."""
        if not call.metadata.get("initialMessage") or call.is_terminal:
            return False
        # Answered in this run: the answer's hook speaks it (or waits for the stream) even if it
        # has not run yet (the answer is being stored). Answered before a restart: nobody will.
        return call.answered_at is None or call.answered_at >= self._started_ms or call.call_id in self._greeting_deferred

    async def _in_order(
        self, call: CallRecord, op: Callable[[], Any], greeting: bool = False, limit: float | None = None
    ) -> Any:
        """
        Run `op` (speak, ask, reply) once every command sent on the call before it has taken
        effect: what a carrier plays is never cut short by a later command, and a question is
        only asked (and its answer only awaited) after what comes before it was heard.

        With `limit` (seconds), a command that has waited that long gives up (a continue: the
        transcript timeout); its place in the queue is kept until what is ahead of it is done,
        so the commands behind it still wait for that.
        """
        queue = self._commands.get(call.call_id)
        if queue is None:
            queue = self._commands[call.call_id] = _Commands()
            if not greeting and self._greeting_expected(call):
                queue.greeting = queue.tail = Deferred()
                queue.depth = 1
        if queue.depth >= MAX_QUEUED_COMMANDS:
            raise CallError(f"Too many commands waiting on this call ({MAX_QUEUED_COMMANDS})", call.call_id)
        before, mine = queue.tail, Deferred()
        queue.tail = mine
        queue.depth += 1
        try:
            if before is not None and not before.called:
                await (before if limit is None else self._bounded(before, limit, call.call_id))
            if self._gone(call):
                raise CallError("Call has ended", call.call_id)
            return await op()
        finally:
            if before is not None and not before.called:
                # Gave up waiting: the place is handed on only once what is ahead is done.
                before.addBoth(lambda result: (self._release(call.call_id, queue, mine), result)[1])
            else:
                self._release(call.call_id, queue, mine)

    def _bounded(self, slot: Deferred, limit: float, call_id: str) -> Deferred[None]:
        """Fires when `slot` does, or fails with the transcript timeout after `limit` seconds."""

        def give_up() -> None:
            if not gate.called:
                gate.errback(self._timed_out(call_id))

        timer = self._clock.callLater(limit, give_up)
        # Cancelled (the caller went away): its timer goes too; the place is kept as on a timeout.
        gate: Deferred[None] = Deferred(lambda _: timer.cancel() if timer.active() else None)

        def reached(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if not gate.called:
                gate.callback(None)
            return result

        slot.addBoth(reached)
        return gate

    def _release(self, call_id: str, queue: _Commands, slot: Deferred) -> None:
        queue.depth -= 1
        if queue.depth <= 0 and self._commands.get(call_id) is queue:
            del self._commands[call_id]
        if not slot.called:
            slot.callback(None)

    def _drop_commands(self, call_id: str) -> None:
        """The call is over: commands waiting behind an unspoken greeting go on (and fail)."""
        self._greeting_deferred.discard(call_id)
        queue = self._commands.pop(call_id, None)
        if queue is not None and queue.greeting is not None:
            held, queue.greeting = queue.greeting, None
            if not held.called:
                held.callback(None)

    def _notify_hangup(self, call_id: str) -> None:
        self._notify_timers.pop(call_id, None)
        if call_id in self._active:
            d = Deferred.fromCoroutine(self.end_call(call_id))
            d.addErrback(lambda f: self._log.failure("notify hang-up of {call_id} failed", f, call_id=call_id))

    # -- timers -----------------------------------------------------------------------------------

    def _start_max_timer(self, call: CallRecord, seconds: float) -> None:
        old = self._max_timers.pop(call.call_id, None)
        if old is not None and old.active():
            old.cancel()
        self._max_timers[call.call_id] = self._clock.callLater(max(0.0, seconds), self._max_duration_reached, call.call_id)

    def _max_duration_reached(self, call_id: str, attempt: int = 0) -> None:
        self._max_timers.pop(call_id, None)
        if call_id not in self._active:
            return
        if attempt == 0:
            self._log.debug("call {call_id} reached its maximum duration", call_id=call_id)
        d = Deferred.fromCoroutine(self.end_call(call_id, "timeout"))
        d.addErrback(self._max_duration_hangup_failed, call_id, attempt)
        d.addErrback(lambda f: self._log.failure("max-duration hang-up of {call_id} failed", f, call_id=call_id))

    def _max_duration_hangup_failed(self, failure, call_id: str, attempt: int) -> Deferred | None:
        """Retry with backoff; once out of retries, end the call here (it must not hold its slot forever)."""
        call = self._active.get(call_id)
        if call is None or call.is_terminal:
            return None
        error = failure.getErrorMessage()
        if attempt < len(MAX_DURATION_RETRY_DELAYS):
            delay = MAX_DURATION_RETRY_DELAYS[attempt]
            self._log.warn(
                "max-duration hang-up of {call_id} failed ({error}); retry {n} of {of} in {delay}s",
                call_id=call_id, error=error, n=attempt + 1, of=len(MAX_DURATION_RETRY_DELAYS), delay=delay,
            )  # fmt: skip
            self._max_timers[call_id] = self._clock.callLater(delay, self._max_duration_reached, call_id, attempt + 1)
            return None
        why = f"max-duration hang-up failed at the carrier {attempt + 1} times: {error}"
        self._log.error("call {call_id}: {why}; ending it here (reason error)", call_id=call_id, why=why)
        return Deferred.fromCoroutine(self._end_here(call, "error", why))

    async def _end_here(self, call: CallRecord, reason: str, why: str) -> None:
        """End a call in our records only (the carrier could not be told): frees its slot."""
        call.metadata["endError"] = why
        events: list[dict] = []
        self._finish(call, reason, f"Call ended: {reason}", events)
        await self._persist(call, events=events)

    # -- operations -------------------------------------------------------------------------------

    async def initiate(
        self,
        to: str,
        message: str | None = None,
        mode: Mode | str | None = None,
        session_key: str | None = None,
        options: CallOptions | None = None,
    ) -> str:
        """Place an outbound call; returns its id once the record is durable and the carrier has it."""
        try:
            caller, extra = telephony.call_metadata(options or CallOptions(), self._settings.limits)
        except ValueError as e:
            raise CallError(str(e)) from None
        mode = Mode(mode) if mode in ("notify", "conversation", Mode.NOTIFY, Mode.CONVERSATION) else self._settings.default_mode
        if not (_PHONE.match(to) or to.startswith("sip:")):
            raise CallError(f"Invalid phone number: {to} (expected E.164, e.g. +15550001234)")
        if not self._webhook_url:
            raise CallError("Webhook URL not configured")
        limit = self._settings.max_concurrent_calls
        # Calls still being stored hold their slot too: a burst must not get past the limit.
        if len(self._active) + len(self._reserved) >= limit:
            raise CallError(f"Maximum concurrent calls ({limit}) reached")
        from_number = caller or self._settings.from_number
        if not from_number and self._settings.provider_name == "mock":
            from_number = MOCK_FROM_NUMBER
        if not from_number:
            raise CallError("fromNumber not configured")
        call_id = str(uuid.uuid4())
        self._reserved.add(call_id)
        try:
            return await self._initiate(call_id, to, message, mode, session_key, from_number, extra)
        finally:
            self._reserved.discard(call_id)

    async def _initiate(
        self, call_id: str, to: str, message: str | None, mode: Mode, session_key: str | None, from_number: str,
        extra: dict[str, Any],
    ) -> str:

        call = CallRecord(
            call_id=call_id,
            provider=self._settings.provider_name,
            direction=Direction.OUTBOUND,
            state=CallState.INITIATED,
            from_number=from_number,
            to_number=to,
            started_at=self._now(),
            session_key=session_key,
            metadata={"mode": mode.value, **extra},
        )
        message = telephony.opening(message, extra.get("greeting"))
        if message:
            call.metadata["initialMessage"] = message
        limit = self._settings.max_concurrent_calls
        try:
            # The store counts the live calls of every node sharing it (PostgreSQL) under a lock.
            await self._persist(call, events=[self._created_entry(call)], admit_limit=limit)
        except StoreFullError as e:
            raise CallError(f"Maximum concurrent calls ({limit}) reached") from e
        except Exception as e:
            self._log.failure("could not store a new call; nothing was dialled")
            raise CallError(f"Failed to persist call: {e}") from e
        self._active[call.call_id] = call
        self._reserved.discard(call.call_id)

        # With answering-machine detection the message waits for the verdict: the carrier must not say it by itself.
        notify = message if mode is Mode.NOTIFY and telephony.policy_of(call) == "ignore" else None
        try:
            placed = await self._provider.initiate_call(
                call_id=call.call_id,
                from_number=from_number,
                to_number=to,
                webhook_url=self._webhook_url,
                notify_message=notify,
                voice=self._voice_of(call),
                options=DialOptions(answering_machine=telephony.policy_of(call)),
            )
        except Exception as e:
            events: list[dict] = []
            self._finish(call, "failed", "Call ended: failed", events)
            call.metadata["error"] = str(e)
            await self._persist(call, events=events)
            raise CallError(str(e) or "initiate failed", call.call_id) from e

        call.provider_call_id = placed.provider_call_id
        self._by_provider_id[placed.provider_call_id] = call.call_id
        if getattr(placed, "consumes_initial_message", False):
            call.metadata.pop("initialMessage", None)
        served = getattr(placed, "served", None)
        if served is not None:
            # The carrier says the message itself (Twilio notify TwiML): it enters the
            # transcript when the carrier fetches it, as a spoken message does when played.
            served.addCallback(self._notify_served, call)
            served.addErrback(lambda f: self._log.failure("recording the notify message of {call_id} failed", f, call_id=call.call_id))
        try:
            await self._persist(call)
        except Exception as e:
            self._log.failure("could not store the carrier id of {call_id}; hanging up", call_id=call.call_id)
            self._forget(call)
            self._background(self._provider.hangup_call(call, "failed"), "rollback hang-up failed")
            raise CallError(f"Failed to persist call: {e}", call.call_id) from e
        self._log.info("call {call_id} placed ({mode})", call_id=call.call_id, mode=mode.value)
        return call.call_id

    def _connected(self, call_id: str) -> CallRecord:
        call = self.find(call_id)
        if call is None:
            raise CallError("Call not found")
        if not call.provider_call_id:
            raise CallError("Call not connected")
        if call.is_terminal:
            raise CallError("Call has ended")
        return call

    async def speak(self, call_id: str, text: str) -> None:
        """Say `text` after whatever the call is playing or has queued (the greeting included)."""
        call = self._connected(call_id)
        await self._in_order(call, lambda: self._speak(call, text))

    async def reply(self, call_id: str, text: str) -> None:
        """Say `text` and listen again (an automatic reply): no turn, no waiter."""
        call = self._connected(call_id)
        await self._in_order(call, lambda: self._speak(call, text, listen=True))

    async def _commit(self, call: CallRecord, state: CallState | None = None, said: str | None = None) -> None:
        """
        Move `call` to `state` and/or record the bot saying `said`, durably. A failed store write
        puts the record in memory back as the store has it and raises CallError.
        """
        before, events = call.state, []
        entry = TranscriptEntry(self._now(), Speaker.BOT, said) if said is not None else None
        if entry is not None:
            call.transcript.append(entry)
            events.append(self._log_entry(call, "call.transcript", speaker="bot", text=said))
        if state is not None:
            self._move(call, state, events)
        moved = call.state
        try:
            await self._persist(call, transcript=[entry] if entry is not None else [], events=events)
        except Exception as e:
            if call.state is moved:
                call.state = before
            if entry is not None:
                _remove_last(call.transcript, entry)
            self._log.warn("could not store {call_id} ({error}): left as it was", call_id=call.call_id, error=str(e))
            raise CallError(f"Failed to persist call: {e}", call.call_id) from e

    async def _speak(self, call: CallRecord, text: str, listen: bool = False) -> None:
        await self._commit(call, CallState.SPEAKING)
        try:
            if listen:
                await self._voice.prompt(call, text, self._voice_of(call), None)
            else:
                await self._voice.speak(call, text, self._voice_of(call))
        except Exception as e:
            await self._commit(call, CallState.LISTENING)
            raise CallError(str(e) or "speak failed", call.call_id) from e
        waiting = None if listen else self._waiters.get(call.call_id)
        await self._record_bot(call, text, listening=listen or waiting is not None)
        if waiting is not None and not waiting.deferred.called and not call.is_terminal:
            await self._listen_again(call, waiting)

    async def _listen_again(self, call: CallRecord, waiter: _Waiter) -> None:
        """
        A speak played while a `continue` waits for its answer: on a carrier whose speech
        replaces its listening (Plivo's GetInput, Twilio's Gather) the answer would be lost, so
        listening for that turn resumes, with its turn token.
        """
        try:
            await self._voice.start_listening(call, waiter.turn_token, dtmf=waiter.dtmf)
        except Exception as e:
            if self._gone(call):
                return
            self._log.warn("could not listen again on {call_id} after a speak: {error}", call_id=call.call_id, error=str(e))

    def _notify_served(self, text: str, call: CallRecord) -> Deferred[None] | None:
        if self._gone(call):
            return None
        return Deferred.fromCoroutine(self._record_bot(call, text))

    async def _record_bot(self, call: CallRecord, text: str, listening: bool = False) -> None:
        await self._commit(call, CallState.LISTENING if listening else None, said=text)

    def turn_pending(self, call_id: str) -> bool:
        """Whether a `continue` is queued or waiting on the call (the gateway drives its next turn)."""
        return call_id in self._turns

    async def continue_call(self, call_id: str, prompt: str) -> str:
        """Speak `prompt`, then wait for and return what the person says next."""
        return (await self.continue_turn(call_id, prompt)).text

    async def continue_turn(self, call_id: str, prompt: str, input: str = "speech") -> Answer:
        """Speak `prompt`, then wait for and return what the person says (or, with `input`, the keys they press) next."""
        try:
            input = telephony.check_input(input)
        except ValueError as e:
            raise CallError(str(e)) from None
        call = self._connected(call_id)
        if call.call_id in self._turns or call.call_id in self._waiters:
            raise CallError("Already waiting for transcript")
        self._turns.add(call.call_id)
        mine: list[_Waiter] = []
        try:
            # Waiting behind what plays before it counts against the transcript timeout too: a
            # continue on a call that is never answered (its greeting never spoken) must end.
            limit = self._settings.transcript_timeout_ms / 1000.0
            asked = await self._in_order(call, lambda: self._ask(call, prompt, mine, input), limit=limit)
            return await self._turn(call, *asked)
        finally:
            self._turns.discard(call.call_id)
            for waiter in mine:
                if self._waiters.get(call.call_id) is waiter:
                    del self._waiters[call.call_id]
                if not waiter.deferred.called:
                    waiter.deferred.cancel()

    async def _ask(self, call: CallRecord, prompt: str, mine: list[_Waiter], input: str = "speech") -> tuple[_Waiter, int, int]:
        """Ask `prompt` (its turn in the queue has come); the answer is awaited outside the queue."""
        started = self._now()
        token = str(uuid.uuid4()) if self._voice.wants_turn_token(call) else None
        await self._commit(call, CallState.SPEAKING)
        answer = self._wait_for_transcript(call.call_id, token, input)
        mine.append(answer)
        try:
            await self._voice.prompt(call, prompt, self._voice_of(call), token, dtmf=answer.dtmf)
            failed: Exception | None = None
        except Exception as e:
            failed = e
        listen_started = self._now()
        try:
            if failed is not None:
                await self._commit(call, CallState.LISTENING)
                raise CallError(str(failed) or "continue failed", call.call_id) from failed
            if not call.is_terminal:
                await self._commit(call, CallState.LISTENING, said=prompt)
        except BaseException:
            answer.deferred.cancel()
            raise
        return answer, started, listen_started

    async def _turn(self, call: CallRecord, answer: _Waiter, started: int, listen_started: int) -> Answer:
        transcript = await answer.outcome()
        try:
            await self._voice.stop_listening(call)
        except Exception:
            self._log.failure("stop listening failed (ignored)")
        done = self._now()
        meta = call.metadata
        meta["turnCount"] = int(meta.get("turnCount", 0)) + 1
        meta["lastTurnLatencyMs"] = done - started
        meta["lastTurnListenWaitMs"] = done - listen_started
        meta["lastTurnCompletedAt"] = done
        # Every turn counts in `voicecall latency`, not only the last (the newest kept, bounded).
        for key, value in (("turnLatenciesMs", done - started), ("turnListenWaitsMs", done - listen_started)):
            samples = meta.get(key)
            samples = list(samples) if isinstance(samples, list) else []
            samples.append(value)
            meta[key] = samples[-MAX_TURN_SAMPLES:]
        await self._persist(call)
        if self._on_turn_latency is not None:
            self._on_turn_latency((done - started) / 1000.0)
        self._log.debug(
            "[voice-call] continueCall latency call={call_id} totalMs={total} listenWaitMs={wait}",
            call_id=call.call_id,
            total=done - started,
            wait=done - listen_started,
        )
        return transcript

    def _timed_out(self, call_id: str) -> CallError:
        return CallError(f"Timed out waiting for transcript after {self._settings.transcript_timeout_ms}ms", call_id)

    def _wait_for_transcript(self, call_id: str, token: str | None, input: str = "speech") -> _Waiter:
        timeout_ms = self._settings.transcript_timeout_ms
        d: Deferred[Answer] = Deferred()

        def timed_out(f):
            f.trap(TimeoutError, CancelledError)
            if f.check(TimeoutError):
                raise self._timed_out(call_id)
            return f

        d.addTimeout(timeout_ms / 1000.0, self._clock)
        d.addErrback(timed_out)
        waiter = self._waiters[call_id] = _Waiter(d, token, input)
        return waiter

    async def end_call(self, call_id: str, reason: str = "hangup-bot", message: str | None = None) -> None:
        """
        Hang up; the call stays active if the carrier refuses. With `message`, say it first (after
        whatever the call is playing) and hang up once it has played; a call not answered yet is
        hung up without it (nobody would hear it).
        """
        if message:
            call = self.find(call_id)
            if call is not None and call.answered_at is not None and not call.is_terminal:
                try:
                    await self._in_order(call, lambda: self._speak(call, message))
                except CallError:
                    if self._gone(call):
                        return  # the person hung up first: the call is over
                    raise
        call = self.find(call_id)
        if call is None:
            stored = await self._store.get_call(call_id)
            if stored is not None and stored.is_terminal:
                return
            raise CallError("Call not found")
        if not call.provider_call_id:
            raise CallError("Call not connected")
        try:
            await self._provider.hangup_call(call, reason)
        except Exception as e:
            raise CallError(str(e) or "end failed", call.call_id) from e
        if call.is_terminal or call.call_id not in self._active:
            return
        # All or nothing, like the turn path: the call leaves memory (and frees its slot) only
        # once its end is stored; a failed write leaves it active as the store has it, and the
        # carrier's hang-up webhook or another end completes it.
        events: list[dict] = []
        before = _Fields.of(call)
        self._end_record(call, reason, events)
        try:
            await self._persist(call, events=events)
        except Exception as e:
            before.restore(call, _Fields.of(call))
            self._log.warn("could not store the end of {call_id} ({error}): still active", call_id=call.call_id, error=str(e))
            raise CallError(f"Failed to persist call: {e}", call.call_id) from e
        if self._active.get(call.call_id) is call:
            self._ended(call, reason, f"Call ended: {reason}")

    def _answered_call(self, call_id: str) -> CallRecord:
        call = self._connected(call_id)
        if call.answered_at is None:
            raise CallError("Call not answered yet", call.call_id)
        return call

    async def send_dtmf(self, call_id: str, digits: str) -> None:
        """Play keypad tones on the call, after what it is playing; a waiting `continue` keeps waiting."""
        try:
            digits = telephony.check_digits(digits)
        except ValueError as e:
            raise CallError(str(e)) from None
        call = self._answered_call(call_id)

        async def send() -> None:
            try:
                await self._provider.send_dtmf(call, digits)
            except Exception as e:
                raise CallError(str(e) or "dtmf failed", call.call_id) from e
            if self._gone(call):
                return
            entry = TranscriptEntry(self._now(), Speaker.BOT, telephony.DTMF_PREFIX + digits)
            call.transcript.append(entry)
            await self._persist(call, transcript=[entry], events=[self._log_entry(call, "call.dtmf.sent", digits=digits)])

        await self._in_order(call, send)

    async def transfer(self, call_id: str, to: str, message: str | None = None) -> None:
        """
        Connect the caller to `to` (listed in transfer.allowTo), after saying `message`; the call
        then ends here with reason `transferred`. The call stays as it was if the carrier refuses.
        """
        try:
            to = telephony.check_transfer_target(to, self._settings.transfer_allow_to)
        except ValueError as e:
            raise CallError(str(e)) from None
        call = self._answered_call(call_id)

        async def hand_over() -> None:
            if message:
                await self._speak(call, message)
            if self._gone(call):
                raise CallError("Call has ended", call.call_id)
            try:
                await self._provider.transfer_call(call, to)
            except Exception as e:
                raise CallError(str(e) or "transfer failed", call.call_id) from e

        await self._in_order(call, hand_over)
        if call.is_terminal or call.call_id not in self._active:
            return
        events: list[dict] = []
        before = _Fields.of(call)
        call.metadata["transferTarget"] = to
        self._end_record(call, CallState.TRANSFERRED.value, events)
        events[-1]["to"] = to
        try:
            await self._persist(call, events=events)
        except Exception as e:
            before.restore(call, _Fields.of(call))
            call.metadata.pop("transferTarget", None)
            raise CallError(f"Failed to persist call: {e}", call.call_id) from e
        if self._active.get(call.call_id) is call:
            self._ended(call, CallState.TRANSFERRED.value, "Call ended: transferred")
        self._log.info("call {call_id} transferred", call_id=call.call_id)

    # -- restore (SPEC §14.3 [H]) -----------------------------------------------------------------

    async def restore(self) -> dict[str, int]:
        """
        Load the calls that were live at the last stop and check each with the carrier. The calls
        to close are closed after each pass over the records; the passes run with the cyclic
        garbage collector paused (with 100,000 calls, each full collection re-walks them all).
        """
        for key in await self._store.recent_event_keys(self._settings.dedupe_limit):
            self._processed.add(key)
        outcome = await self._take_over(await self._store.load_active())
        if outcome["restored"]:
            self._log.info("Restored {n} active call(s) from store", n=outcome["restored"])
        for what, n in outcome.items():
            if what != "restored" and n:
                self._log.info("Skipped {n} restored call(s): {what}", n=n, what=what)
        return outcome

    async def adopt(self, records: Sequence[CallRecord]) -> list[CallRecord]:
        """
        Run the live calls of a dead node, which this node now owns in the store (cluster/adopt.py
        claimed them), as restore() runs this node's own after a restart: each is checked with
        the carrier, closed if it ended there or outlived maxDurationSeconds, else held with its
        transcript, processed events and remaining max duration. Returns the calls now held here
        (to re-point at the carrier). A call already held here is left as it is.
        """
        fresh = [call for call in records if call.call_id not in self._active]
        outcome = await self._take_over(fresh)
        self._log.info("Adopted {n} call(s) ({outcome})", n=outcome["restored"], outcome=outcome)
        return [call for call in fresh if self._active.get(call.call_id) is call]

    def release(self, call_id: str, owner: str) -> None:
        """
        Stop running a call another node now owns (this node was taken for dead and the call
        adopted; the store refuses this node's writes to it): it is forgotten here, not ended,
        and a `continue` waiting on it fails, naming the node that runs the call now.
        """
        call = self._active.get(call_id)
        if call is None:
            return
        self._forget(call)
        waiter = self._waiters.pop(call_id, None)
        if waiter is not None and not waiter.deferred.called:
            waiter.deferred.errback(CallError(f"Call moved to node {owner}", call_id))
        self._log.warn("Call {call_id} is now run by node {owner}: released here", call_id=call_id, owner=owner)

    async def _take_over(self, records: Sequence[CallRecord]) -> dict[str, int]:
        """Hold `records` (live in the store) as this manager's active calls, closing the ones that are over."""
        now = self._now()
        max_ms = self._settings.max_duration_seconds * 1000
        outcome = {"restored": 0, "no-provider-id": 0, "expired": 0, "ended-at-carrier": 0}
        candidates = []
        closing: list[tuple[CallRecord, str, str]] = []  # (call, outcome, end reason)
        with collector_paused():
            for call in records:
                for key in call.processed_event_ids[-64:]:
                    self._processed.add(key)
                if not call.provider_call_id:
                    closing.append((call, "no-provider-id", "failed"))
                elif now - call.started_at > max_ms:
                    closing.append((call, "expired", "timeout"))
                else:
                    candidates.append(call)
        await self._close_all_restored(closing, outcome)
        with collector_paused():
            checks = [self._provider.get_call_status(c.provider_call_id) for c in candidates]
            statuses = DeferredList(checks, consumeErrors=True) if checks else succeed([])
        results = await statuses
        closing = []
        with collector_paused():
            for call, (ok, status) in zip(candidates, results, strict=True):
                if ok and status.is_terminal and not status.is_unknown:
                    closing.append((call, "ended-at-carrier", "completed"))
                    continue
                if call.answered_at is not None:
                    remaining = self._max_seconds(call) * 1000 - (now - call.answered_at)
                    if remaining <= 0:
                        closing.append((call, "expired", "timeout"))
                        continue
                    self._start_max_timer(call, remaining / 1000.0)
                self._active[call.call_id] = call
                self._by_provider_id[call.provider_call_id] = call.call_id
                outcome["restored"] += 1
        await self._close_all_restored(closing, outcome)
        return outcome

    async def _close_all_restored(
        self, closing: list[tuple[CallRecord, str, str]], outcome: dict[str, int]
    ) -> None:
        for call, what, reason in closing:
            outcome[what] += 1
            await self._close_restored(call, reason, hang_up=reason == "timeout")

    async def _close_restored(self, call: CallRecord, reason: str, hang_up: bool = False) -> None:
        events: list[dict] = []
        self._finish(call, reason, f"Call ended: {reason}", events)
        await self._persist(call, events=events)
        if hang_up:
            self._background(self._provider.hangup_call(call, reason), "hang-up of an expired restored call failed")

    def stop(self) -> None:
        """Cancel every timer and fail pending waits (the daemon is stopping)."""
        for timers in (self._max_timers, self._notify_timers, self._machine_timers):
            for timer in timers.values():
                if timer.active():
                    timer.cancel()
            timers.clear()
        for call_id, waiter in list(self._waiters.items()):
            if not waiter.deferred.called:
                waiter.deferred.errback(CallError("voicecall is shutting down", call_id))
        self._waiters.clear()
