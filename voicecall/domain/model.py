# -*- test-case-name: tests.test_store,tests.test_manager -*-
"""
The call model: states, end reasons, transcript entries, normalised carrier events and the call
record, with the JSON shapes they have on the RPC wire and in the store (SPEC §3).

This module is a leaf: it imports nothing of ours.
"""
from __future__ import annotations

import enum
import hashlib
from typing import Any, Callable, Mapping

from attrs import define, field, frozen


class CallState(str, enum.Enum):
    """Every state a call can be in; the last nine are terminal and sticky (SPEC §3.2)."""

    INITIATED = "initiated"
    RINGING = "ringing"
    ANSWERED = "answered"
    ACTIVE = "active"
    SPEAKING = "speaking"
    LISTENING = "listening"
    COMPLETED = "completed"
    HANGUP_USER = "hangup-user"
    HANGUP_BOT = "hangup-bot"
    TIMEOUT = "timeout"
    ERROR = "error"
    FAILED = "failed"
    NO_ANSWER = "no-answer"
    BUSY = "busy"
    VOICEMAIL = "voicemail"
    #: The caller was connected to a person (`voicecall.transfer`): voicecall's part is over.
    TRANSFERRED = "transferred"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        CallState.COMPLETED,
        CallState.HANGUP_USER,
        CallState.HANGUP_BOT,
        CallState.TIMEOUT,
        CallState.ERROR,
        CallState.FAILED,
        CallState.NO_ANSWER,
        CallState.BUSY,
        CallState.VOICEMAIL,
        CallState.TRANSFERRED,
    }
)

#: The values an EndReason may take: exactly the terminal states.
END_REASONS = frozenset(s.value for s in TERMINAL_STATES)

_ORDER = [
    CallState.INITIATED,
    CallState.RINGING,
    CallState.ANSWERED,
    CallState.ACTIVE,
    CallState.SPEAKING,
    CallState.LISTENING,
]
_TALKING = frozenset({CallState.SPEAKING, CallState.LISTENING})


def next_state(current: CallState, new: CallState) -> CallState:
    """
    The state a call moves to when `new` is proposed while it is in `current` (SPEC §3.2):
    terminal states are sticky, any terminal state may be entered, speaking and listening
    alternate freely, and otherwise a call only moves forward.
    """
    if new == current or current.is_terminal:
        return current
    if new.is_terminal:
        return new
    if current in _TALKING and new in _TALKING:
        return new
    if _ORDER.index(new) > _ORDER.index(current):
        return new
    return current


class Direction(str, enum.Enum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Mode(str, enum.Enum):
    """Outbound call modes: say one message and hang up, or talk turn by turn."""

    NOTIFY = "notify"
    CONVERSATION = "conversation"


class Speaker(str, enum.Enum):
    BOT = "bot"
    USER = "user"


@frozen
class TranscriptEntry:
    """One utterance on a call, by the bot or the person on the line."""

    timestamp: int  # epoch milliseconds
    speaker: Speaker = field(converter=Speaker)
    text: str = field(repr=False)  # what was said: never in a repr (logs)
    is_final: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "speaker": self.speaker.value,
            "text": self.text,
            "isFinal": self.is_final,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TranscriptEntry:
        return cls(
            timestamp=int(data["timestamp"]),
            speaker=data["speaker"],
            text=str(data["text"]),
            is_final=bool(data.get("isFinal", True)),
        )


class EventType(str, enum.Enum):
    """Normalised carrier event types (SPEC §3.3)."""

    INITIATED = "call.initiated"
    RINGING = "call.ringing"
    ANSWERED = "call.answered"
    ACTIVE = "call.active"
    SPEAKING = "call.speaking"
    SPEECH = "call.speech"
    SILENCE = "call.silence"
    DTMF = "call.dtmf"
    ENDED = "call.ended"
    ERROR = "call.error"
    #: The carrier finished playing a message (Telnyx `call.speak.ended`): no state change.
    SPOKEN = "call.spoken"
    #: Answering-machine detection's verdict (`answered_by`), or the end of a machine's greeting
    #: (`machine_done`: the beep, time to leave a message).
    MACHINE = "call.machine"
    #: A recording of the call changed (`recording`): started, completed (with its URL) or failed.
    #: May arrive after the call has ended (carriers save recordings after the hang-up).
    RECORDING = "call.recording"


#: What answering-machine detection may say answered a call (`CallEvent.answered_by`, the
#: record's `answeredBy`). Carriers' finer verdicts map onto these (Twilio `machine_end_beep` ->
#: machine with `machine_done`; Telnyx `not_sure` -> unknown).
ANSWERED_BY = ("human", "machine", "fax", "unknown")

#: What a call does when a machine answers (`initiate` param `answeringMachine`, config
#: `outbound.answeringMachine`): nothing (no detection), leave the message after the beep, or hang up.
ANSWERING_MACHINE_POLICIES = ("ignore", "leave-message", "hang-up")

#: The keys of a recording (`CallEvent.recording`, the record's `recordings` items): `id` (the
#: carrier's recording id, required), `status` (`in-progress` | `completed` | `failed`), `url`
#: (where the carrier serves the audio, once completed), `durationSeconds`, `startedAt` (epoch ms).
RECORDING_KEYS = ("id", "status", "url", "durationSeconds", "startedAt")
RECORDING_STATUSES = ("in-progress", "completed", "failed")


#: Longest identity key kept as given; longer ones (outside input) are stored as a hash.
MAX_KEY_LENGTH = 160


def identity_key(prefix: str, *parts: object) -> str:
    """
    A dedupe key from a carrier's event identity: ``<prefix>:<part>:<part>...``, or
    ``<prefix>:sha256:<hex>`` when that would be longer than `MAX_KEY_LENGTH` or hold
    non-printable characters (the parts come from outside input).
    """
    key = ":".join((prefix, *("" if p is None else str(p) for p in parts)))
    if len(key) <= MAX_KEY_LENGTH and key.isprintable():
        return key
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return f"{prefix}:sha256:{digest.hexdigest()}"


@frozen
class CallEvent:
    """
    A carrier event after parsing, the same for every provider.

    `call_id` is our call id when the carrier echoes it back, or else the carrier's id.
    `dedupe_key` is the event's identity: the same for every delivery of one event, so that a
    redelivery (at-least-once delivery, fresh timestamp and signature) is a no-op. Providers set
    it from the carrier's own event id where there is one (Telnyx ``data.id``), else from the
    event's content (Twilio CallSid + SequenceNumber, a Gather's turn), else from the verified
    request key. `aliases` are further keys the same event is known by (the verified request
    key; a carrier's unsigned idempotency token): an event is a redelivery when any of its
    `keys` was applied before, and applying it records them all.
    """

    type: EventType = field(converter=EventType)
    call_id: str
    id: str
    timestamp: int  # epoch milliseconds
    dedupe_key: str | None = None
    provider_call_id: str | None = None
    turn_token: str | None = field(default=None, repr=False)
    direction: Direction | None = field(
        default=None, converter=lambda v: None if v is None else Direction(v)
    )
    # Numbers, words and digits are call state: never in a repr (Twisted logs objects by repr).
    from_number: str | None = field(default=None, repr=False)
    to_number: str | None = field(default=None, repr=False)
    # type-specific fields
    text: str | None = field(default=None, repr=False)  # call.speaking
    transcript: str | None = field(default=None, repr=False)  # call.speech
    is_final: bool = True  # call.speech
    confidence: float | None = None  # call.speech
    duration_ms: int | None = None  # call.silence
    digits: str | None = field(default=None, repr=False)  # call.dtmf: keys the person pressed
    answered_by: str | None = None  # call.machine: one of ANSWERED_BY
    machine_done: bool = False  # call.machine: the machine's greeting has ended (its beep)
    recording: Mapping[str, Any] | None = field(default=None, repr=False)  # call.recording: RECORDING_KEYS
    reason: str | None = None  # call.ended: one of END_REASONS
    error: str | None = None  # call.error
    retryable: bool = False  # call.error
    aliases: tuple[str, ...] = field(default=(), converter=tuple)
    #: The adapter's own effect of the event (e.g. a speech it waits for has ended), run by the
    #: manager once the event is applied: never for a redelivery, nor if it could not be stored.
    on_applied: Callable[[], None] | None = field(default=None, eq=False, repr=False)

    @property
    def key(self) -> str:
        """The key this event is deduplicated by."""
        return self.dedupe_key or self.id

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key this event is known by: `key` first, then its distinct `aliases`."""
        first = self.key
        rest = tuple(dict.fromkeys(a for a in self.aliases if a and a != first))
        return (first, *rest)


#: Metadata the record shows at its top level (`to_json`), where callers look for them: who
#: answered (answering-machine detection), the call's recordings, and whom it was transferred to.
PROMOTED_METADATA = ("answeredBy", "recordings", "transferTarget")


@define
class CallRecord:
    """
    One call, as the manager holds it and the store keeps it. Mutable: the manager is its only
    writer. `to_json` gives the SPEC §3.1 shape used on the RPC wire.
    """

    call_id: str
    provider: str
    direction: Direction = field(converter=Direction)
    state: CallState = field(converter=CallState)
    # Numbers, transcript and metadata (messages, tokens) are never in a repr (logs).
    from_number: str = field(repr=False)
    to_number: str = field(repr=False)
    started_at: int  # epoch milliseconds
    provider_call_id: str | None = None
    session_key: str | None = None
    answered_at: int | None = None
    ended_at: int | None = None
    end_reason: str | None = None
    transcript: list[TranscriptEntry] = field(factory=list, repr=False)
    processed_event_ids: list[str] = field(factory=list, repr=False)
    metadata: dict[str, Any] = field(factory=dict, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def answered_by(self) -> str | None:
        return self.metadata.get("answeredBy")

    @property
    def recordings(self) -> list[dict[str, Any]]:
        return list(self.metadata.get("recordings") or [])

    @property
    def mode(self) -> Mode | None:
        value = self.metadata.get("mode")
        return Mode(value) if value in ("notify", "conversation") else None

    def to_json(self, *, with_event_ids: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "callId": self.call_id,
            "providerCallId": self.provider_call_id,
            "provider": self.provider,
            "direction": self.direction.value,
            "state": self.state.value,
            "from": self.from_number,
            "to": self.to_number,
            "sessionKey": self.session_key,
            "startedAt": self.started_at,
            "answeredAt": self.answered_at,
            "endedAt": self.ended_at,
            "endReason": self.end_reason,
            "transcript": [t.to_json() for t in self.transcript],
            "metadata": {k: v for k, v in self.metadata.items() if k not in PROMOTED_METADATA},
        }
        out.update((k, self.metadata[k]) for k in PROMOTED_METADATA if k in self.metadata)
        if with_event_ids:
            out["processedEventIds"] = list(self.processed_event_ids)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallRecord:
        return cls(
            call_id=str(data["callId"]),
            provider=str(data["provider"]),
            direction=data["direction"],
            state=data["state"],
            from_number=str(data["from"]),
            to_number=str(data["to"]),
            started_at=int(data["startedAt"]),
            provider_call_id=data.get("providerCallId"),
            session_key=data.get("sessionKey"),
            answered_at=data.get("answeredAt"),
            ended_at=data.get("endedAt"),
            end_reason=data.get("endReason"),
            transcript=[TranscriptEntry.from_json(t) for t in data.get("transcript", [])],
            processed_event_ids=list(data.get("processedEventIds", [])),
            metadata={**(data.get("metadata") or {}), **{k: data[k] for k in PROMOTED_METADATA if k in data}},
        )


#: What a `continue` may listen for (`input` param): speech (the default), keys, or either.
TURN_INPUTS = ("speech", "dtmf", "speech dtmf")


@frozen
class Answer:
    """What a `continue` heard: the person's words, or the keys they pressed (`input` "dtmf")."""

    text: str = field(repr=False)
    input: str = "speech"  # "speech" | "dtmf"


@frozen
class CallOptions:
    """
    An outbound call's own choices (`voicecall.initiate` params), each None for the config's
    default; the manager checks them against the config (from numbers owned, at most the
    configured maxDurationSeconds, ...).
    """

    from_number: str | None = field(default=None, repr=False)
    voice: str | None = None
    #: Said first when the call is answered, before the message.
    greeting: str | None = field(default=None, repr=False)
    #: What this call is for: added to the built-in responder's system prompt, passed to the
    #: gateway's `voicecall.respond`.
    objective: str | None = field(default=None, repr=False)
    max_duration_seconds: int | None = None
    answering_machine: str | None = None  # one of ANSWERING_MACHINE_POLICIES
    record: bool | None = None
