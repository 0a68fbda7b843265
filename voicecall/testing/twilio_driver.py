# -*- test-case-name: tests.test_fake_twilio -*-
"""
The carrier side of the fake Twilio, per call: what Twilio does after the REST API accepted a
call (or one arrives for a number). `FakeCall` posts status callbacks, fetches TwiML and
follows it verb by verb (`<Say>`, `<Play>`, `<Pause>`, `<Gather>`, `<Redirect>`, `<Hangup>`,
`<Connect><Stream>`, `<Start><Stream>`, `<Enqueue>`, `<Play digits>`, `<Dial>`), lets a live
update interrupt it, and plays the person (or answering machine) on the line as its `Scenario`
says: async answering-machine detection posts its verdict (`AsyncAmdStatusCallback`), a machine
beeps when its greeting ends, recordings started through the REST API are reported to their
`RecordingStatusCallback`, completed only after the hang-up. The runner itself is documents.py's.

It imports nothing of the daemon, only the fake's own modules.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from typing import Any, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, succeed

from voicecall.testing.documents import DocumentCall, Fetch, Superseded, int_attr, resolve
from voicecall.testing.twilio_carrier import (
    API_VERSION,
    MAX_OBSERVATIONS,
    TERMINAL,
    Carrier,
    DialRecord,
    GatherRecord,
    RecordingRecord,
    SayRecord,
    Scenario,
    StreamRecord,
    Webhook,
    rfc2822,
)


@define(eq=False)
class FakeCall(DocumentCall):
    """
    One call on the fake carrier: the resource the REST API reports and the driver that plays
    Twilio's part for it. Observations (`documents`, `says`, `plays`, `gathers`, `streams`,
    `enqueued`, `callbacks`, `errors`) are bounded deques, oldest first.
    """

    document_name = "TwiML"
    fetch_failure = "11200 HTTP retrieval failure"
    parse_failure = "12100 Document parse failure"
    prompt_tags = ("Say", "Play", "Pause")

    _carrier: Carrier
    sid: str
    direction: str  # "outbound-api" or "inbound"
    to: str
    from_: str
    scenario: Scenario
    url: str | None = None
    method: str = "POST"
    twiml: str | None = None
    status_callback: str | None = None
    status_callback_method: str = "POST"
    status_callback_events: frozenset = frozenset({"completed"})
    timeout: int = 60
    status: str = "queued"
    created_at: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    says: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: The `<Say>` texts said to their end (not cut short by a live update or a hang-up).
    said: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    gathers: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    streams: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    enqueued: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: Answering-machine detection asked for at create: `Enable` or `DetectMessageEnd` (None: off).
    machine_detection: str | None = None
    async_amd: bool = False
    amd_callback: str | None = None
    amd_callback_method: str = "POST"
    #: The detection's verdict once made (`AnsweredBy`); when a machine beeped (its greeting ended).
    answered_by: str | None = None
    beep_at: float | None = None
    #: (time, text) of every `<Say>` as it started: what a machine recorded is what began after its beep.
    say_started: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: The keypad tones the call played (`<Play digits>`), and the transfers it dialled (`<Dial>`).
    dtmf_sent: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    dialled: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    recordings: list = field(factory=list)
    _pressed: bool = False
    _sequence: int = 0
    _stream_gate: Deferred | None = None
    _stream_waiters: list = field(factory=list)

    # -- observations and controls -------------------------------------------------------

    @property
    def is_ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def say_texts(self) -> list[str]:
        return [s.text for s in self.says]

    @property
    def active_stream(self) -> StreamRecord | None:
        """The `<Connect><Stream>` the call is in right now, if any."""
        if self._stream_gate is not None and self.streams:
            return self.streams[-1]
        return None

    def next_stream(self) -> Deferred:
        """
        A Deferred firing with the StreamRecord of the current or next `<Connect><Stream>`,
        or with None if the call ends first.
        """
        active = self.active_stream
        if active is not None:
            return succeed(active)
        d: Deferred = Deferred()
        self._stream_waiters.append(d)
        return d

    def end_stream(self) -> None:
        """The media stream closed: carry on with the TwiML after `<Connect>` (or its action)."""
        gate, self._stream_gate = self._stream_gate, None
        if gate is not None:
            self.streams[-1].ended_by = "media"
            gate.callback(None)

    def hangup_by_callee(self) -> None:
        """The person on the line hangs up."""
        if not self.is_ended:
            self._end("completed" if self.answered_at is not None else "canceled")

    def to_json(self, account_sid: str) -> dict[str, Any]:
        """The Call resource as the REST API shows it."""

        def date(ts: float | None) -> str | None:
            return None if ts is None else rfc2822(ts)

        duration = None
        if self.ended_at is not None:
            duration = str(self._duration())
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "status": self.status,
            "direction": self.direction,
            "api_version": API_VERSION,
            "date_created": date(self.created_at),
            "date_updated": date(self.ended_at or self.answered_at or self.created_at),
            "start_time": date(self.answered_at),
            "end_time": date(self.ended_at),
            "duration": duration,
            "answered_by": self.answered_by,
            "parent_call_sid": None,
            "price": None,
            "price_unit": "USD",
            "uri": f"/{API_VERSION}/Accounts/{account_sid}/Calls/{self.sid}.json",
        }

    # -- lifecycle (called by the REST API) ----------------------------------------------

    def start_outbound(self) -> None:
        """Begin dialling: initiated, then ringing, then the scenario's outcome."""
        self._status_callback("initiated", "initiated")
        sc = self.scenario
        if sc.outcome == "failed":
            self._after(sc.answer_after, self._end, "failed")
            return
        self._after(sc.ring_after, self._ringing)

    def start_inbound(self, webhook_url: str, method: str = "POST") -> None:
        """A call arrives at a number whose voice webhook is `webhook_url`."""
        self.status = "ringing"
        self._launch(Fetch("twiml", webhook_url, method))

    def update(self, twiml: str | None = None, url: str | None = None, method: str = "POST") -> None:
        """Live update: stop the current TwiML and follow the new document, like Twilio."""
        if twiml is not None:
            self._launch(twiml)
        elif url is not None:
            self._launch(Fetch("twiml", url, method))

    def cancel_or_complete(self, status: str) -> None:
        """REST `Status=completed|canceled`: end a live call as Twilio would."""
        if self.is_ended:
            return
        if self.answered_at is None:
            self._end("canceled")
        elif status == "completed":
            self._end("completed")
        # `canceled` only affects queued or ringing calls

    # -- internals ------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"call {self.sid}"

    def _document_hook(self, kind: str, url: str, method: str, params: dict[str, str]) -> Webhook:
        return Webhook(kind, url, method, params, "")

    def _document_ended(self) -> None:
        self._end("completed")

    def _ringing(self) -> None:
        self.status = "ringing"
        self._status_callback("ringing", "ringing")
        sc = self.scenario
        if sc.outcome == "busy":
            self._after(sc.answer_after, self._end, "busy")
        elif sc.outcome == "no-answer" or sc.answer_after > self.timeout:
            self._after(self.timeout, self._end, "no-answer")
        else:
            self._after(sc.answer_after, self._answer)

    def start_recording(
        self, sid: str, url: str, callback: str | None, method: str, events: frozenset, channels: str
    ) -> RecordingRecord:
        """REST `POST /Calls/{sid}/Recordings.json`: record both parties from now on."""
        record = RecordingRecord(sid, self.sid, url, callback, method, events, channels, self._carrier.clock.seconds())
        self.recordings.append(record)
        self._recording_callback(record)
        return record

    def _answer(self) -> None:
        self._mark_answered()
        self._start_detection()
        generation = self._generation
        self._status_callback("answered", "in-progress")
        if self._generation != generation:
            # A live update (made by the answered callback's handler) already replaced the
            # answer's TwiML: it is not run after it, which would cut the update off.
            return
        if self.machine_detection is not None and not self.async_amd:
            # Synchronous AMD: Twilio fetches the call's TwiML only once it has a verdict, and
            # the fetch carries it (`AnsweredBy`).
            self._after(self._detection_seconds(), self._run_answer, generation)
            return
        self._run_answer(generation)

    def _detection_seconds(self) -> float:
        sc = self.scenario
        if sc.machine and self.machine_detection == "DetectMessageEnd":
            return sc.greeting_seconds
        return sc.amd_seconds

    def _run_answer(self, generation: int) -> None:
        if self._generation != generation or self.is_ended:
            return
        if self.machine_detection is not None and not self.async_amd and self.answered_by is None:
            machine = "machine_end_beep" if self.machine_detection == "DetectMessageEnd" else "machine_start"
            self.answered_by = machine if self.scenario.machine else "human"
        if self.twiml is not None:
            self._launch(self.twiml)
        elif self.url is not None:
            self._launch(Fetch("twiml", self.url, self.method))
        else:
            self._error("no TwiML source for the call")
            self._end("failed")

    def _start_detection(self) -> None:
        """Answering-machine detection runs from the answer, beside the call's TwiML (async AMD)."""
        if self.machine_detection is None:
            return
        sc = self.scenario
        if sc.machine:
            self._after(sc.greeting_seconds, self._beep)
            if self.machine_detection == "Enable":
                self._after(sc.amd_seconds, self._verdict, "machine_start")
        else:
            self._after(sc.amd_seconds, self._verdict, "human")

    def _beep(self) -> None:
        self.beep_at = self._carrier.clock.seconds()
        if self.machine_detection == "DetectMessageEnd":
            self._verdict("machine_end_beep")

    def _verdict(self, answered_by: str) -> None:
        self.answered_by = answered_by
        if not self.async_amd or not self.amd_callback:
            return
        seconds = self._carrier.clock.seconds() - (self.answered_at or 0.0)
        params = {
            "AccountSid": self._carrier.account_sid,
            "CallSid": self.sid,
            "AnsweredBy": answered_by,
            "MachineDetectionDuration": str(int(seconds * 1000)),
        }
        self._notify(Webhook("amd", self.amd_callback, self.amd_callback_method, params, ""))

    def _recording_callback(self, record: RecordingRecord) -> None:
        if not record.callback or record.status not in record.callback_events:
            return
        params = {
            "AccountSid": self._carrier.account_sid,
            "CallSid": self.sid,
            "RecordingSid": record.sid,
            "RecordingUrl": record.url,
            "RecordingStatus": record.status,
            "RecordingChannels": "2" if record.channels == "dual" else "1",
            "RecordingStartTime": rfc2822(record.started_at),
            "RecordingSource": "StartCallRecordingAPI",
            "RecordingTrack": "both",
            "ErrorCode": "0",
        }
        if record.duration is not None:
            params["RecordingDuration"] = str(record.duration)
        self._notify(Webhook("recording", record.callback, record.callback_method, params, ""))

    def _finish_recording(self, record: RecordingRecord) -> None:
        record.status = "completed" if record.duration else "absent"
        self._recording_callback(record)

    def _end(self, status: str) -> None:
        if self.is_ended:
            return
        DocumentCall._end(self, status)
        for record in self.recordings:
            if record.status == "in-progress":
                # Twilio stops a recording with its call, then processes it: `completed` comes late.
                record.status = "processing"
                record.duration = int(round((self.ended_at or 0.0) - record.started_at))
                self._after(self.scenario.recording_delay, self._finish_recording, record)
        stream_waiters, self._stream_waiters = self._stream_waiters, []
        for d in stream_waiters:
            d.callback(None)

    def _report_end(self, status: str) -> None:
        self._status_callback("completed", status, {"CallDuration": str(self._duration())})

    def _params(self, status: str | None = None) -> dict[str, str]:
        if self.answered_by is not None and not self.async_amd:
            return {**self._call_params(status), "AnsweredBy": self.answered_by}
        return self._call_params(status)

    def _call_params(self, status: str | None = None) -> dict[str, str]:
        return {
            "AccountSid": self._carrier.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.sid,
            "CallStatus": status or self.status,
            "Called": self.to,
            "Caller": self.from_,
            "Direction": self.direction,
            "From": self.from_,
            "To": self.to,
        }

    def _status_callback(self, event: str, status: str, extra: Mapping[str, str] = {}) -> None:
        if not self.status_callback or event not in self.status_callback_events:
            return
        params = self._params(status)
        params.update(
            CallbackSource="call-progress-events",
            SequenceNumber=str(self._sequence),
            Timestamp=rfc2822(self._carrier.clock.seconds()),
        )
        params.update(extra)
        self._sequence += 1
        self._notify(Webhook("status", self.status_callback, self.status_callback_method, params, ""))

    def _interrupt(self, why: str = "interrupted") -> int:
        """Supersede whatever the current runner awaits (a stream too); return the new generation."""
        gate, self._stream_gate = self._stream_gate, None
        if gate is not None:
            self.streams[-1].ended_by = why
        generation = DocumentCall._interrupt(self, why)
        if gate is not None and not gate.called:
            gate.cancel()
        return generation

    def _before_elements(self, root: ET.Element) -> None:
        if self.direction == "inbound" and self.answered_at is None:
            if len(root) and root[0].tag == "Reject":
                self._end("busy" if root[0].get("reason") == "busy" else "no-answer")
                raise Superseded()
            self._mark_answered()

    async def _element(self, gen: int, verb: ET.Element, base: str | None) -> Any:
        """Run one verb: False to continue, None to hang up, a Fetch to replace the document."""
        tag = verb.tag
        if tag in ("Say", "Play", "Pause"):
            await self._prompt(gen, verb, base)
        elif tag == "Gather":
            return await self._gather(gen, verb, base)
        elif tag == "Redirect":
            url = resolve(base, (verb.text or "").strip())
            if url is None:
                self._error("Redirect without an absolute URL")
                return None
            return Fetch("redirect", url, verb.get("method", "POST"))
        elif tag in ("Hangup", "Reject"):
            return None
        elif tag == "Connect":
            return await self._connect(gen, verb, base)
        elif tag == "Start":
            for child in verb:
                if child.tag == "Stream":
                    self._record_stream(child, bidirectional=False)
        elif tag == "Dial":
            return await self._dial(gen, verb)
        elif tag == "Enqueue":
            self.enqueued.append((verb.text or "").strip())
            await self._wait(gen, Deferred())
        else:
            self._error(f"unsupported verb <{tag}> skipped")
        return False

    async def _prompt(self, gen: int, verb: ET.Element, base: str | None, part: float = 1.0) -> None:
        loop = int_attr(verb.get("loop"), 1)
        if verb.tag == "Play" and verb.get("digits") is not None:
            digits = verb.get("digits") or ""
            self.dtmf_sent.append(digits)
            self._log.info("fake {call}: keypad tones {digits}", call=self._label, digits=digits)
            await self._sleep(gen, 0.1 * len(digits.replace("w", "")) + 0.5 * digits.count("w"))
            return
        if verb.tag == "Say":
            text = "".join(verb.itertext()).strip()
            self.say_started.append((self._carrier.clock.seconds(), text))
            self.says.append(SayRecord(text, verb.get("voice"), verb.get("language"), loop))
            seconds = self._carrier.chaos.playback_seconds(text, self.scenario.say_seconds_per_char)
            await self._sleep(gen, seconds * max(loop, 1) * part)
            self.said.append(text)
        elif verb.tag == "Play":
            self.plays.append(resolve(base, (verb.text or "").strip()) or (verb.text or ""))
            if loop == 0:
                await self._wait(gen, Deferred())  # plays until something interrupts it
            await self._sleep(gen, self.scenario.play_seconds * loop)
        else:
            await self._sleep(gen, int_attr(verb.get("length"), 1))

    async def _gather(self, gen: int, verb: ET.Element, base: str | None) -> Any:
        attrs = dict(verb.attrib)
        action = resolve(base, attrs.get("action", "")) if attrs.get("action") else base
        record = GatherRecord(attrs, action, attrs.get("method", "POST").upper())
        self.gathers.append(record)
        keys = "dtmf" in attrs.get("input", "dtmf").split()
        sc = self.scenario
        if sc.machine:
            # A machine: its greeting is heard as words by a speech Gather while it plays (once).
            heard = None
            if sc.greeting and self.beep_at is None and not self._pressed and "speech" in attrs.get("input", "dtmf").split():
                self._pressed = True
                heard = sc.greeting
            record.heard = heard
            if heard is None:
                await self._sleep(gen, sc.silence if sc.silence is not None else int_attr(attrs.get("timeout"), 5))
            else:  # posted once the greeting has been said (speechTimeout="auto")
                playing = sc.greeting_seconds - (self._carrier.clock.seconds() - (self.answered_at or 0.0))
                await self._sleep(gen, max(playing, 0.0) + sc.speech_delay)
        elif sc.press and keys and not self._pressed:
            self._pressed = True  # the person presses their keys once, at the first Gather taking them
            for child in verb:
                if child.tag in self.prompt_tags:
                    await self._prompt(gen, child, base)
            heard: Any = {"Digits": self.scenario.press}
            record.heard = heard
            await self._sleep(gen, 0.2 * len(self.scenario.press))
        else:
            heard = await self._listen(gen, verb, base, record, inputs="input", timeout="timeout", default=5)
        if isinstance(heard, Mapping) and "Digits" in heard and not keys:
            heard = record.heard = None  # keys need input="dtmf"
        if heard is None:
            if attrs.get("actionOnEmptyResult") != "true":
                return False
            extra: dict[str, str] = {}
        else:
            if isinstance(heard, str):
                extra = {"SpeechResult": heard, "Confidence": self.scenario.confidence}
            else:
                extra = {str(k): str(v) for k, v in heard.items()}
        if action is None:
            self._error("Gather without an absolute action URL")
            return None
        return Fetch("action", action, record.method, extra)

    async def _dial(self, gen: int, verb: ET.Element) -> Any:
        """Connect the call to a `<Number>` or `<Sip>`: it lasts until either side hangs up."""
        noun = next((c for c in verb if c.tag in ("Number", "Sip")), None)
        target = ((noun.text if noun is not None else verb.text) or "").strip()
        record = DialRecord(target, noun.tag if noun is not None else "Number", verb.get("callerId"), self._carrier.clock.seconds())
        self.dialled.append(record)
        self._log.info("fake {call}: dialling {target} (transfer)", call=self._label, target=target)
        if self.scenario.dial_seconds is None:
            await self._wait(gen, Deferred())  # until the callee hangs up (or a live update)
        else:
            await self._sleep(gen, self.scenario.dial_seconds)
        record.ended_at = self._carrier.clock.seconds()
        return False

    async def _connect(self, gen: int, verb: ET.Element, base: str | None) -> Any:
        stream = next((c for c in verb if c.tag == "Stream"), None)
        if stream is None:
            self._error("Connect without Stream is not simulated")
            return False
        self._record_stream(stream, bidirectional=True)
        gate: Deferred = Deferred()
        self._stream_gate = gate
        waiters, self._stream_waiters = self._stream_waiters, []
        for d in waiters:
            d.callback(self.streams[-1])
        await self._wait(gen, gate)
        action = verb.get("action")
        if action:
            url = resolve(base, action)
            if url is not None:
                return Fetch("action", url, verb.get("method", "POST"))
        return False

    def _record_stream(self, stream: ET.Element, bidirectional: bool) -> None:
        parameters = {
            p.get("name", ""): p.get("value", "") for p in stream if p.tag == "Parameter"
        }
        self.streams.append(
            StreamRecord(stream.get("url", ""), parameters, dict(stream.attrib), bidirectional)
        )

