# -*- test-case-name: tests.test_fake_telnyx -*-
"""
The carrier side of the fake Telnyx: the webhook signer (our own Ed25519 signing with pynacl,
as PROVIDERS.md §2.3 describes and checked in tests against the official SDK), the `Scenario`
describing the person on the line, the `Carrier` that signs webhooks as Telnyx does and delivers
them (see delivery.py), and `FakeCall`, which plays Telnyx's part for one
call: it posts `call.initiated`, `call.answered`, `call.speak.started`/`ended`,
`call.transcription`, `call.dtmf.received`, `call.bridged` and `call.hangup` in the PROVIDERS.md §2.2
shapes, and for issue 17 answering-machine detection's `call.machine[.premium].detection.ended` and
`call.machine[.premium].greeting.ended` (a machine's greeting lasts `greeting_seconds`, then it
beeps), and `call.recording.saved` / `call.recording.error`, sent `recording_delay` seconds after
the recording stopped: after the hang-up when the call ends while recording. Every webhook carries
the call's `client_state` as it is when the webhook is sent (a transcript: when the person's
words have been recognised): each command carrying one (dial, answer, speak, transcription_start,
client_state_update, ...) replaces it, and a redelivery repeats the body it was first sent with.

The person on the line says the scenario's next utterance whenever it is their turn: when
transcription starts while the bot is silent, and each time the bot stops speaking while
transcription runs. A call's webhooks are delivered one after another, in order, unless the
carrier's `Chaos` says otherwise (duplicates re-signed with `meta.attempt` incremented and the
same `data.id`, reordering, delays, real-time playback, a callee talking over prompts).

It imports nothing of the daemon.
"""
from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence

from attrs import define, field, frozen
from nacl.signing import SigningKey
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from voicecall.testing.delivery import Courier

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
USER_AGENT = "telnyx-webhooks"
#: Observations kept per call, and command ids remembered per call (oldest dropped first).
MAX_OBSERVATIONS = 1_000
#: How long a presigned recording URL works (Telnyx: 10 minutes).
PRESIGNED_SECONDS = 600.0
OUTCOMES = ("answer", "no-answer", "busy")
#: Who picks up an answered call: a person, an answering machine, or a fax.
CALLEES = ("person", "machine", "fax")
#: `answering_machine_detection` values (the official SDK's), `disabled` being none.
AMD_MODES = ("premium", "premium_ios_call_screening_detection", "detect", "detect_beep", "detect_words", "greeting_end", "disabled")
#: Standard detection's verdict on each callee (it knows no fax), and premium detection's.
_STANDARD_RESULTS = {"person": "human", "machine": "machine", "fax": "machine"}
_PREMIUM_RESULTS = {"person": "human_residence", "machine": "machine", "fax": "fax_detected"}
#: What a machine says before its beep (transcribed when transcription runs).
MACHINE_GREETING = "Hi, you have reached Alice. Please leave a message after the tone."

#: What the person says at a turn: words, or None for silence.
Utterance = Optional[str]


@define
class Signer:
    """Signs webhooks as Telnyx does: Ed25519 over ``"<timestamp>|<raw body>"``, base64."""

    _key: SigningKey = field(repr=False)

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A fixed key pair (32-byte seed), so a standalone fake keeps its public key."""
        return cls(SigningKey(seed))

    @property
    def public_key(self) -> str:
        """The public key as the Telnyx portal shows it (and `telnyx.publicKey` takes): base64 of 32 bytes."""
        return base64.b64encode(bytes(self._key.verify_key)).decode("ascii")

    def sign(self, body: bytes, timestamp: int | str) -> str:
        message = str(timestamp).encode("ascii") + b"|" + body
        return base64.b64encode(self._key.sign(message).signature).decode("ascii")

    def headers(self, body: bytes, timestamp: int | str) -> dict[str, str]:
        """The two signature headers for `body` sent at `timestamp` (unix seconds)."""
        return {SIGNATURE_HEADER: self.sign(body, timestamp), TIMESTAMP_HEADER: str(timestamp)}


def iso8601(ts: float) -> str:
    """A UTC time as Telnyx writes `occurred_at`: ``2023-11-14T22:13:20.000000Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def envelope(
    event_type: str,
    payload: Mapping[str, Any],
    *,
    occurred_at: str,
    event_id: str | None = None,
    delivered_to: str | None = None,
) -> bytes:
    """A webhook body: ``{"data": {record_type, event_type, id, occurred_at, payload}, "meta": ...}``."""
    document: dict[str, Any] = {
        "data": {
            "record_type": "event",
            "event_type": event_type,
            "id": event_id or str(uuid.uuid4()),
            "occurred_at": occurred_at,
            "payload": dict(payload),
        }
    }
    if delivered_to is not None:
        document["meta"] = {"attempt": 1, "delivered_to": delivered_to}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def new_call_control_id() -> str:
    """A Telnyx-shaped `call_control_id` (``v3:`` and URL-safe characters)."""
    return "v3:" + secrets.token_urlsafe(24)


@frozen
class Scenario:
    """
    What the person on the far end does; times are seconds on the injected clock.

    `outcome` is `answer`, `no-answer` or `busy`: an outbound call is answered (or refused busy)
    `answer_after` seconds after the dial; an answer later than the dial's `timeout_secs` is a
    no-answer (`hangup_cause` `timeout`). `hangup_after` hangs up (as the callee) that long after
    the answer. `utterances` is a sequence consumed one per turn, or a callable
    `(call) -> Utterance` asked at each turn. Speech takes `say_seconds_per_char` per character;
    an utterance is transcribed `speech_delay` after the turn began (with an interim result
    first if `interim_results`). An inbound caller hangs up after `abandon_after` seconds
    unless answered.

    `presses` are keys the person presses instead of speaking, one entry per turn (None: they
    speak that turn), or a callable `(call) -> keys | None` asked at each turn, each key a `call.dtmf.received` `press_interval` after the last. `callee`
    says who answers: a `person`, or a `machine` whose greeting lasts `greeting_seconds` and
    ends with a beep (unless not `beep`), or a `fax`; a dial with answering-machine detection
    gets its verdict `detection_seconds` after the answer. A recording's webhook comes
    `recording_delay` seconds after it stopped (`call.recording.error` when `recording_fails`).
    """

    outcome: str = "answer"
    answer_after: float = 0.0
    utterances: Sequence[Utterance] | Callable[[Any], Utterance] = field(
        default=(), converter=lambda v: v if callable(v) else tuple(v)
    )
    hangup_after: float | None = None
    say_seconds_per_char: float = 0.0
    speech_delay: float = 0.0
    confidence: float = 0.97
    interim_results: bool = False
    abandon_after: float = 60.0
    presses: Sequence[Optional[str]] | Callable[[Any], Optional[str]] = field(
        default=(), converter=lambda v: v if callable(v) else tuple(v)
    )
    press_interval: float = 0.2
    callee: str = "person"
    detection_seconds: float = 2.0
    greeting_seconds: float = 6.0
    beep: bool = True
    recording_delay: float = 2.0
    recording_fails: bool = False

    def __attrs_post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if self.callee not in CALLEES:
            raise ValueError(f"unknown callee {self.callee!r}")


@define
class Webhook:
    """One webhook the carrier sent (or could not send), with its answer."""

    event_type: str
    url: str | None
    body: bytes
    timestamp: str | None = None
    signature: str | None = None
    status: int | None = None
    response: bytes | None = None
    error: str | None = None

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)["data"]["payload"]


@frozen
class SpeakRecord:
    text: str
    voice: str | None
    language: str | None
    #: When it started playing (the clock's seconds): a machine records only what follows its beep.
    at: float = 0.0


@define(eq=False)
class FakeRecording:
    """A recording `record_start` began: saved (or failed) `recording_delay` after it stopped."""

    id: str
    format: str
    channels: str
    started_at: float
    ended_at: float | None = None
    saved: bool = False
    #: The token of its presigned media URLs, and until when (the clock's seconds) they work.
    token: str = field(factory=lambda: secrets.token_urlsafe(16), repr=False)
    expires_at: float = 0.0


@define
class Carrier(Courier):
    """
    What all fake calls share: the clock, the HTTP client (see `Courier`; None: webhooks are
    recorded, not sent) and the signer.
    """

    signer: Signer

    def deliver(self, hook: Webhook) -> Deferred:
        """POST the hook, signed when sent; record the answer (or the error) on it."""
        if hook.url is None or self.http is None:
            self.webhooks.append(hook)
            hook.error = "no webhook URL" if hook.url is None else "no HTTP client"
            return succeed(hook)
        return Courier.deliver(self, hook)

    def _again(self, hook: Webhook) -> Webhook:
        """Telnyx's retry: the same event (`data.id`), `meta.attempt` + 1, re-signed with a fresh timestamp."""
        document = json.loads(hook.body)
        meta = document.setdefault("meta", {})
        meta["attempt"] = int(meta.get("attempt", 1)) + 1
        return Webhook(hook.event_type, hook.url, json.dumps(document, separators=(",", ":")).encode("utf-8"))

    def _signed(self, hook: Webhook) -> tuple[str, str, bytes | None, dict[str, list[str]]]:
        hook.timestamp = str(int(self.clock.seconds()))
        hook.signature = self.signer.sign(hook.body, hook.timestamp)
        headers = {
            "Content-Type": ["application/json"],
            "User-Agent": [USER_AGENT],
            SIGNATURE_HEADER: [hook.signature],
            TIMESTAMP_HEADER: [hook.timestamp],
        }
        return "POST", hook.url or "", hook.body, headers

    def _answered(self, hook: Webhook, status: int, body: bytes) -> None:
        hook.status, hook.response = status, body


@define(eq=False)
class FakeCall:
    """
    One call on the fake Telnyx. `direction` is `outgoing` (dialled through the API) or
    `incoming` (placed with `FakeTelnyx.place_inbound_call`); `state` is `bridging`, `parked`,
    `answered` or `hangup`. Observations (`speaks`, `transcription_starts`, `commands`,
    `webhooks`, `said`, `dtmf_sent`, `pressed`) are bounded deques, oldest first; `beep_at` is
    when a machine beeped, `transferred_to` the leg a `transfer` dialled, `recordings` the
    call's recordings.
    """

    _carrier: Carrier
    call_control_id: str
    direction: str
    from_: str
    to: str
    connection_id: str
    scenario: Scenario
    webhook_url: str | None = None
    client_state: str | None = None
    timeout_secs: int = 30
    call_leg_id: str = field(factory=lambda: str(uuid.uuid4()))
    call_session_id: str = field(factory=lambda: str(uuid.uuid4()))
    state: str = "bridging"
    created_at: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    hangup_cause: str | None = None
    hangup_source: str | None = None
    transcribing: bool = False
    amd: str | None = None
    media_origin: str = "http://127.0.0.1"
    beep_at: float | None = None
    transferred_to: FakeCall | None = None
    bridged_with: FakeCall | None = None
    recordings: list = field(factory=list)
    dtmf_sent: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    pressed: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    speaks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    transcription_starts: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    commands: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    webhooks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    said: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    _speaking: int = 0
    _speaking_until: float = 0.0
    _barged: bool = False
    _utterances_used: int = 0
    _turns: int = 0
    _timers: list = field(factory=list)
    _turn_timers: list = field(factory=list)
    _late_timers: list = field(factory=list)
    _command_ids: dict = field(factory=dict)
    _tail: Deferred | None = None
    _end_waiters: list = field(factory=list)
    _log = Logger()

    # -- observations ---------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self.state != "hangup"

    @property
    def is_answered(self) -> bool:
        return self.state == "answered"

    @property
    def speak_texts(self) -> list[str]:
        return [s.text for s in self.speaks]

    @property
    def last_speak(self) -> str | None:
        """What the bot said last (for utterance callables that answer questions only)."""
        return self.speaks[-1].text if self.speaks else None

    @property
    def event_types(self) -> list[str]:
        return [h.event_type for h in self.webhooks]

    def when_ended(self) -> Deferred:
        """Fires with the hangup cause once the call has ended."""
        if not self.is_alive:
            return succeed(self.hangup_cause)
        d: Deferred = Deferred()
        self._end_waiters.append(d)
        return d

    def seen_command(self, command_id: str) -> bool:
        """Whether `command_id` was used on this call before (Telnyx ignores repeats); records it."""
        if command_id in self._command_ids:
            return True
        self._command_ids[command_id] = None
        while len(self._command_ids) > MAX_OBSERVATIONS:
            del self._command_ids[next(iter(self._command_ids))]
        return False

    def to_json(self) -> dict[str, Any]:
        """The call as `GET /v2/calls/{id}` shows it."""
        data: dict[str, Any] = {
            "record_type": "call",
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "is_alive": self.is_alive,
            "client_state": self.client_state,
            "start_time": iso8601(self.created_at),
        }
        if self.answered_at is not None:
            end = self.ended_at if self.ended_at is not None else self._carrier.clock.seconds()
            data["call_duration"] = int(round(end - self.answered_at))
        if self.ended_at is not None:
            data["end_time"] = iso8601(self.ended_at)
        return data

    # -- lifecycle (started by the API) ---------------------------------------------------

    def start_outbound(self) -> None:
        """Dialling: `call.initiated`, then the scenario's outcome."""
        self._post("call.initiated", state="bridging")
        sc = self.scenario
        if sc.outcome == "busy":
            self._after(sc.answer_after, self._end, "user_busy", "callee")
        elif sc.outcome == "no-answer" or sc.answer_after > self.timeout_secs:
            self._after(self.timeout_secs, self._end, "timeout", "unknown")
        else:
            self._after(sc.answer_after, self._answer)

    def start_inbound(self) -> None:
        """A call arrives: `call.initiated` (incoming, parked) until `answer` or the caller gives up."""
        self.state = "parked"
        self._post("call.initiated", state="parked", caller_id_name=self.from_)
        self._after(self.scenario.abandon_after, self._abandon)

    def hangup_by_callee(self, cause: str = "normal_clearing") -> None:
        """The person on the line hangs up."""
        self._end(cause, "callee")

    def shutdown(self) -> None:
        """Stop the call's clockwork without posting anything (test cleanup)."""
        self._cancel_timers()
        self._cancel(self._late_timers)

    # -- commands (called by the API once validated) --------------------------------------

    def answer(self) -> None:
        self._after(0, self._answer)

    def hangup(self) -> None:
        cause = "normal_clearing" if self.is_answered else "originator_cancel"
        self._after(0, self._end, cause, "caller")

    def speak(self, text: str, voice: str | None, language: str | None) -> None:
        now = self._carrier.clock.seconds()
        start = max(now, self._speaking_until)
        self.speaks.append(SpeakRecord(text, voice, language, start))
        end = start + self._carrier.chaos.playback_seconds(text, self.scenario.say_seconds_per_char)
        self._speaking_until = end
        self._speaking += 1
        self._after(start - now, self._post, "call.speak.started")
        self._after(end - now, self._speak_ended)
        if self.transcribing and self._carrier.chaos.talks_over():
            # The person answers while the bot is still talking (their turn is spent).
            self._after(start - now + (end - start) * self._carrier.chaos.barge_point(), self._barge_in)

    def transcription_start(self, body: Mapping[str, Any]) -> None:
        self.transcription_starts.append(dict(body))
        already = self.transcribing
        self.transcribing = True
        if not already and not self._speaking:
            self._after(0, self._turn)

    def transcription_stop(self) -> None:
        self.transcribing = False
        self._cancel(self._turn_timers)

    def send_dtmf(self, digits: str, duration_millis: int) -> None:
        """Keys played into the call (Telnyx sends no webhook for them)."""
        self.dtmf_sent.append((digits, duration_millis))

    def bridge(self, other: FakeCall) -> None:
        """`transfer`: `other` (the leg dialled to the target) is connected to this call once it answers."""
        self.transferred_to = other
        other.bridged_with = self
        self.transcribing = False
        self._cancel(self._turn_timers)

    def record_start(self, fmt: str, channels: str) -> FakeRecording:
        recording = FakeRecording(str(uuid.uuid4()), fmt, channels, self._carrier.clock.seconds())
        self.recordings.append(recording)
        return recording

    def record_stop(self) -> None:
        for recording in self.recordings:
            if recording.ended_at is None:
                self._stop_recording(recording)

    # -- internals ------------------------------------------------------------------------

    def _after(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
        timer = self._carrier.clock.callLater(max(0.0, seconds), fn, *args)
        self._timers.append(timer)
        if len(self._timers) > 64:
            self._timers = [t for t in self._timers if t.active()]
        return timer

    @staticmethod
    def _cancel(timers: list) -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        timers.clear()

    def _cancel_timers(self) -> None:
        self._cancel(self._timers)
        self._cancel(self._turn_timers)

    def _answer(self) -> None:
        if not self.is_alive or self.is_answered:
            return
        self.state = "answered"
        self.answered_at = self._carrier.clock.seconds()
        self._post("call.answered", state="answered")
        if self.scenario.hangup_after is not None:
            self._after(self.scenario.hangup_after, self.hangup_by_callee)
        sc = self.scenario
        if sc.callee == "machine":
            self._after(sc.greeting_seconds, self._greeting_over)
        if self.amd not in (None, "disabled"):
            self._detect()
        if self.bridged_with is not None and self.bridged_with.is_alive:
            self.bridged_with._post("call.bridged")
            self._post("call.bridged")

    def _detect(self) -> None:
        """
        Answering-machine detection as Telnyx documents it: the verdict after `detection_seconds`;
        for a machine that beeps, `greeting.ended` (`beep_detected`) at the beep, with
        `detect_beep` only if it beeps, with `greeting_end` / `detect_words` also at a silent end
        (`ended`). Premium detection sends only `premium.greeting.ended` when the beep comes first.
        """
        sc = self.scenario
        premium = self.amd is not None and self.amd.startswith("premium")
        beeps = sc.callee == "machine" and sc.beep
        verdict_at = sc.detection_seconds
        if premium:
            if not (beeps and sc.greeting_seconds < verdict_at):
                self._after(verdict_at, self._post_alive, "call.machine.premium.detection.ended", _PREMIUM_RESULTS[sc.callee])
            if beeps:
                self._after(sc.greeting_seconds, self._post_alive, "call.machine.premium.greeting.ended", "beep_detected")
            return
        self._after(verdict_at, self._post_alive, "call.machine.detection.ended", _STANDARD_RESULTS[sc.callee])
        if sc.callee != "machine" or self.amd == "detect":
            return
        if beeps or self.amd in ("greeting_end", "detect_words"):
            result = "beep_detected" if beeps else "ended"
            self._after(max(sc.greeting_seconds, verdict_at), self._post_alive, "call.machine.greeting.ended", result)

    def _post_alive(self, event_type: str, result: str) -> None:
        if self.is_alive:
            self._post(event_type, result=result)

    def _greeting_over(self) -> None:
        """The machine's greeting ends (heard, and transcribed if transcription runs), then its beep."""
        if not self.is_alive:
            return
        if self.transcribing:
            self._transcribed(MACHINE_GREETING, True)
        if self.scenario.beep:
            self.beep_at = self._carrier.clock.seconds()

    def _abandon(self) -> None:
        if self.state == "parked":
            self._end("originator_cancel", "caller")

    def _speak_ended(self) -> None:
        if not self.is_alive:
            return
        self._speaking = max(0, self._speaking - 1)
        self._post("call.speak.ended", status="completed")
        barged, self._barged = self._barged, False
        if self.transcribing and not self._speaking and not barged:
            self._turn()

    def _barge_in(self) -> None:
        if self.is_alive and self.transcribing and self._speaking:
            self._barged = True
            self._turn()

    def _turn(self) -> None:
        """The person's turn to speak: transcribe their next utterance, if they say anything."""
        if not self.is_alive or not self.transcribing or self.scenario.callee != "person":
            return
        turn, self._turns = self._turns, self._turns + 1
        presses = self.scenario.presses
        keys = presses(self) if callable(presses) else (presses[turn] if turn < len(presses) else None)
        if keys:
            self.pressed.append(keys)
            for i, key in enumerate(keys):
                self._turn_timers.append(self._after(self.scenario.press_interval * (i + 1), self._press, key))
            return
        words = self._next_utterance()
        if not words:
            return
        self.said.append(words)
        delay = self.scenario.speech_delay + self._carrier.chaos.playback_seconds(words, self.scenario.say_seconds_per_char)
        if self.scenario.interim_results:
            partial = " ".join(words.split()[: max(1, len(words.split()) // 2)])
            self._turn_timers.append(self._after(delay / 2, self._transcribed, partial, False))
        self._turn_timers.append(self._after(delay, self._transcribed, words, True))

    def _next_utterance(self) -> Utterance:
        source = self.scenario.utterances
        if callable(source):
            return source(self)
        index = self._utterances_used
        self._utterances_used += 1
        return source[index] if index < len(source) else None

    def _press(self, key: str) -> None:
        if self.is_alive:
            self._post("call.dtmf.received", digit=key)

    def _transcribed(self, words: str, final: bool) -> None:
        if not self.is_alive or not self.transcribing:
            return
        result = {
            "transcript": words,
            "confidence": self.scenario.confidence,
            "is_final": final,
            "transcription_track": "inbound",
        }
        self._post("call.transcription", transcription_data=result)

    def _end(self, cause: str, source: str) -> None:
        if not self.is_alive:
            return
        self._cancel_timers()
        if self._speaking:
            self._speaking = 0
            self._post("call.speak.ended", status="call_hangup")
        self.state = "hangup"
        self.transcribing = False
        self.ended_at = self._carrier.clock.seconds()
        self.record_stop()
        self.hangup_cause, self.hangup_source = cause, source
        sip = {"normal_clearing": "200", "user_busy": "486", "timeout": "487", "originator_cancel": "487"}
        self._post(
            "call.hangup",
            state="hangup",
            hangup_cause=cause,
            hangup_source=source,
            sip_hangup_cause=sip.get(cause, "unspecified"),
            end_time=iso8601(self.ended_at),
        )
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(cause)
        # A bridge ends with either leg (a target that never answered ends the transferred call too).
        for partner in (self.bridged_with, self.transferred_to):
            if partner is not None and partner.is_alive:
                partner._end("normal_clearing" if partner.is_answered else "originator_cancel", "unknown")

    def _stop_recording(self, recording: FakeRecording) -> None:
        """A recording stops; Telnyx saves it (or fails to) `recording_delay` later, hang-up or not."""
        recording.ended_at = self._carrier.clock.seconds()
        # (Not a call timer: the webhook comes after the hang-up, which cancels those.)
        self._late_timers = [t for t in self._late_timers if t.active()]
        self._late_timers.append(self._carrier.clock.callLater(self.scenario.recording_delay, self._recording_done, recording))

    def _recording_done(self, recording: FakeRecording) -> None:
        if self.scenario.recording_fails:
            self._post("call.recording.error", reason="Internal server error")
            return
        recording.saved = True
        recording.expires_at = self._carrier.clock.seconds() + PRESIGNED_SECONDS
        self._post(
            "call.recording.saved",
            recording_id=recording.id,
            channels=recording.channels,
            format=recording.format,
            recording_started_at=iso8601(recording.started_at),
            recording_ended_at=iso8601(recording.ended_at or recording.started_at),
            recording_urls={recording.format: self.media_url(recording)},
            public_recording_urls={},
        )

    def media_url(self, recording: FakeRecording) -> str:
        """The recording's presigned download URL (no credentials needed; expires after 10 minutes)."""
        return f"{self.media_origin}/media/{recording.id}.{recording.format}?X-Amz-Signature={recording.token}"

    def recording_json(self, recording: FakeRecording) -> dict[str, Any]:
        """The recording as `GET /v2/recordings/{id}` shows it (its download URLs presigned afresh)."""
        recording.expires_at = self._carrier.clock.seconds() + PRESIGNED_SECONDS
        ended = recording.ended_at or recording.started_at
        return {
            "record_type": "recording",
            "id": recording.id,
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "channels": recording.channels,
            "connection_id": self.connection_id,
            "download_urls": {recording.format: self.media_url(recording)},
            "duration_millis": int(round((ended - recording.started_at) * 1000)),
            "from": self.from_,
            "to": self.to,
            "initiated_by": "StartCallRecordingAPI",
            "recording_started_at": iso8601(recording.started_at),
            "recording_ended_at": iso8601(ended),
            "source": "call",
            "status": "completed",
        }

    def _payload(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "connection_id": self.connection_id,
            "from": self.from_,
            "to": self.to,
            "direction": self.direction,
            "start_time": iso8601(self.created_at),
        }
        if self.client_state is not None:
            payload["client_state"] = self.client_state
        payload.update(extra)
        return payload

    def _post(self, event_type: str, **extra: Any) -> Webhook:
        """Queue a webhook behind this call's earlier ones; they are delivered in order."""
        body = envelope(
            event_type,
            self._payload(extra),
            occurred_at=iso8601(self._carrier.clock.seconds()),
            delivered_to=self.webhook_url,
        )
        hook = Webhook(event_type, self.webhook_url, body)
        self.webhooks.append(hook)
        previous, self._tail = self._tail, None
        if self._carrier.chaos.reorders:
            previous = None  # no per-call order: deliveries overtake each other
        d = self._carrier.track(Deferred.fromCoroutine(self._deliver_after(previous, hook)))
        self._tail = d

        def release(result: object) -> object:
            if self._tail is d:
                self._tail = None
            return result

        d.addBoth(release)
        d.addErrback(lambda f: self._log.failure("fake Telnyx webhook failed", f))
        return hook

    async def _deliver_after(self, previous: Deferred | None, hook: Webhook) -> Webhook:
        if previous is not None:
            waited: Deferred = Deferred()
            previous.addBoth(lambda result: (waited.callback(None), result)[1])
            await waited
        return await self._carrier.deliver(hook)
