# -*- test-case-name: tests.test_fake_plivo -*-
"""
The carrier side of the fake Plivo, per call: what Plivo does after the REST API accepted a
call (or one arrives for a number). `FakeCall` rings, answers, fetches the answer URL and
follows the XML element by element (`<Speak>`, `<Play>`, `<Wait>`, `<GetInput>`,
`<Redirect>`, `<Hangup>`, `<Dial>`), lets a transfer interrupt it, plays the person on the line as its
`Scenario` says, and posts the hang-up URL when the call ends. The runner itself is documents.py's.

Issue 17's features, as Plivo documents them: asynchronous answering-machine detection (the
`machine_detection_url` gets `Machine=true|false` with `Event=MachineDetection` once detection
has judged; with `machine_detection=hangup` a machine is hung up on); a machine's greeting of
`greeting_seconds`, then its beep, which `<Wait beep="true">` waits for (a beep already gone by
is not heard again: the Wait then lasts its whole `length`); keys pressed at a GetInput taking
`dtmf`; digits sent through the DTMF API (recorded, the XML running on undisturbed); `<Dial>` to a
`<Number>` or `<User>`; recordings started through the Record API, reported to their
`callback_url` `recording_delay` after they stop (usually after the hang-up).

It imports nothing of the daemon, only the fake's own modules.
"""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections import deque
from datetime import datetime, timezone
from typing import Any, Mapping

from attrs import define, field
from twisted.internet.defer import succeed

from voicecall.testing.documents import DocumentCall, Fetch, Superseded, int_attr, resolve
from voicecall.testing.plivo_carrier import (
    HANGUP_CAUSES,
    MAX_OBSERVATIONS,
    TERMINAL,
    Carrier,
    DialRecord,
    GetInputRecord,
    RecordingRecord,
    Scenario,
    SpeakRecord,
    Webhook,
)


def _timestamp(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# -- one call -----------------------------------------------------------------------------------


@define(eq=False)
class FakeCall(DocumentCall):
    """
    One call on the fake Plivo. Observations (`documents`, `speaks`, `inputs`, `plays`,
    `callbacks`, `transfers`, `errors`) are bounded deques, oldest first.
    """

    prompt_tags = ("Speak", "Play", "Wait")

    _carrier: Carrier
    request_uuid: str
    direction: str  # "outbound" or "inbound"
    to: str
    from_: str
    scenario: Scenario
    answer_url: str | None = None
    answer_method: str = "POST"
    hangup_url: str | None = None
    hangup_method: str = "POST"
    ring_url: str | None = None
    ring_method: str = "POST"
    hangup_on_ring: int | None = None
    ring_timeout: int = 120
    call_uuid: str = field(factory=lambda: str(uuid.uuid4()))
    status: str = "queued"
    created_at: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    hangup_source: str | None = None
    speaks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    inputs: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    transfers: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: Answering-machine detection asked for at the create (`machine_detection`: "true" or
    #: "hangup"), where and how its verdict is posted, and how long it may take (ms).
    machine_detection: str | None = None
    machine_detection_url: str | None = None
    machine_detection_method: str = "POST"
    machine_detection_time: int = 5000
    #: Detection's verdict once posted ("machine" or "human"); when a machine beeped.
    answered_by: str | None = None
    beep_at: float | None = None
    #: (time, text) of every `<Speak>` as it started: what a machine recorded began after its beep.
    speak_log: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: Digits sent through the DTMF API, `<Dial>`s run, recordings started (oldest first).
    dtmf_sent: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    dials: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    recordings: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    _keys_wanted: bool = False
    _pressed: bool = False

    # -- observations and controls ---------------------------------------------------------

    @property
    def is_ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def is_answered(self) -> bool:
        return self.answered_at is not None

    @property
    def speak_texts(self) -> list[str]:
        return [s.text for s in self.speaks]

    def hangup_by_callee(self) -> None:
        """The person on the line hangs up."""
        if not self.is_ended:
            self.hangup_source = "Callee"
            self._end("completed" if self.is_answered else "cancel")

    def to_json(self, auth_id: str) -> dict[str, Any]:
        """The call's details as GET /Call/{uuid}/ shows them."""
        duration = self._duration()
        return {
            "answer_time": _timestamp(self.answered_at) or None,
            "bill_duration": duration,
            "billed_duration": duration,
            "call_direction": self.direction,
            "call_duration": duration,
            "call_status": self.status,
            "call_uuid": self.call_uuid,
            "end_time": _timestamp(self.ended_at) or None,
            "from_number": self.from_,
            "hangup_cause_name": _cause_name(self.status) if self.is_ended else None,
            "hangup_source": self.hangup_source,
            "initiation_time": _timestamp(self.created_at),
            "parent_call_uuid": None,
            "request_uuid": self.request_uuid,
            "resource_uri": f"/v1/Account/{auth_id}/Call/{self.call_uuid}/",
            "to_number": self.to,
            "total_amount": "0.00000",
        }

    # -- lifecycle (called by the REST API) -------------------------------------------------

    def start_outbound(self) -> None:
        """Begin dialling: ringing after `ring_after`, then the scenario's outcome."""
        sc = self.scenario
        if sc.outcome == "failed":
            self._after(sc.ring_after + sc.answer_after, self._end, "failed")
            return
        self._after(sc.ring_after, self._ringing)

    def start_inbound(self) -> None:
        """A call arrives: Plivo fetches the answer URL while it rings."""
        self.status = "ringing"
        self._launch(Fetch("answer", self.answer_url or "", self.answer_method, {"Event": "StartApp"}))

    def transfer(self, url: str, method: str = "POST") -> None:
        """REST transfer of the A-leg: stop the current XML and follow `url`'s, like Plivo."""
        self.transfers.append(url)
        self._launch(Fetch("transfer", url, method))

    def send_digits(self, digits: str, leg: str) -> None:
        """DTMF API: play `digits` on `leg`; the XML (a GetInput listening, say) runs on undisturbed."""
        self.dtmf_sent.append(digits)

    def start_recording(
        self, media_base: str, time_limit: int, file_format: str, callback_url: str | None, callback_method: str
    ) -> RecordingRecord:
        """Record API: both parties from now until the end or `time_limit`; media under `media_base`."""
        rid = uuid.uuid4().hex
        record = RecordingRecord(
            rid, self.call_uuid, f"{media_base}/Recording/{rid}.{file_format}", file_format, time_limit,
            callback_url, callback_method, self._carrier.clock.seconds(), str(uuid.uuid4()),
        )
        self.recordings.append(record)
        self._after(time_limit, self._stop_recording, record)
        return record

    def hangup(self) -> None:
        """REST hang-up (DELETE /Call/{uuid}/)."""
        if not self.is_ended:
            self.hangup_source = "API"
            self._end("completed" if self.is_answered else "cancel")

    def cancel(self) -> None:
        """REST cancel of a call that was not answered (DELETE /Request/{uuid}/)."""
        if not self.is_ended:
            self.hangup_source = "API"
            self._end("cancel")

    # -- internals --------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"Plivo call {self.call_uuid}"

    def _document_hook(self, kind: str, url: str, method: str, params: dict[str, str]) -> Webhook:
        return Webhook(kind, url, method, params, document=True)

    def _document_ended(self) -> None:
        self.hangup_source = self.hangup_source or "Plivo"
        self._end("completed" if self.is_answered else "no-answer")

    def _ringing(self) -> None:
        self.status = "ringing"
        if self.ring_url:
            self._callback("ring", self.ring_url, self.ring_method, {"Event": "Ring"})
        sc = self.scenario
        limit = self.hangup_on_ring or self.ring_timeout
        if sc.outcome == "busy":
            self._after(sc.answer_after, self._end, "busy")
        elif sc.outcome == "no-answer" or sc.answer_after > limit:
            self._after(limit, self._end, "no-answer")
        else:
            self._after(sc.answer_after, self._answer)

    def _answer(self) -> None:
        self._mark_answered()
        sc = self.scenario
        if sc.machine:
            self._after(sc.greeting_seconds, self._beep)
        if self.machine_detection in ("true", "hangup"):
            self._after(min(sc.amd_seconds, self.machine_detection_time / 1000), self._detected)
        self._launch(Fetch("answer", self.answer_url or "", self.answer_method, {"Event": "StartApp"}))

    def _beep(self) -> None:
        self.beep_at = self._carrier.clock.seconds()

    def _detected(self) -> None:
        """Asynchronous machine detection's verdict, posted to `machine_detection_url` (Plivo's docs)."""
        machine = self.scenario.machine
        self.answered_by = "machine" if machine else "human"
        if self.machine_detection_url:
            extra = {
                "Event": "MachineDetection",
                "Machine": "true" if machine else "false",
                "IfMachine": "hangup" if self.machine_detection == "hangup" else "continue",
            }
            self._callback("amd", self.machine_detection_url, self.machine_detection_method, extra)
        if machine and self.machine_detection == "hangup":
            self.hangup_source = "Plivo"
            self._end("completed")

    def _stop_recording(self, record: RecordingRecord) -> None:
        if record.ended_at is not None:
            return
        record.ended_at = self._carrier.clock.seconds()
        if record.callback_url:
            self._after(self.scenario.recording_delay, self._recording_done, record)

    def _recording_done(self, record: RecordingRecord) -> None:
        """The Record API's callback (snake_case parameters, as Plivo documents them)."""
        assert record.ended_at is not None
        ms = int(round((record.ended_at - record.started_at) * 1000))
        params = {
            "api_id": record.api_id,
            "call_uuid": record.call_uuid,
            "record_url": record.url,
            "recording_duration": str(ms // 1000),
            "recording_duration_ms": str(ms),
            "recording_end_ms": str(int(record.ended_at * 1000)),
            "recording_id": record.recording_id,
            "recording_start_ms": str(int(record.started_at * 1000)),
        }
        self._notify(Webhook("recording", record.callback_url or "", record.callback_method.upper(), params))

    def _report_end(self, status: str) -> None:
        now = self._carrier.clock.seconds()
        for dial in self.dials:
            if dial.ended_at is None:
                dial.ended_at = now
        for record in self.recordings:
            self._stop_recording(record)
        if self.hangup_url:
            duration = str(self._duration())
            extra = {
                "Event": "Hangup",
                "HangupCause": _cause_name(status),
                "HangupCauseName": _cause_name(status).replace("_", " ").title(),
                "HangupSource": self.hangup_source or "Plivo",
                "Duration": duration,
                "BillDuration": duration,
                "StartTime": _timestamp(self.created_at),
                "AnswerTime": _timestamp(self.answered_at),
                "EndTime": _timestamp(self.ended_at),
            }
            self._callback("hangup", self.hangup_url, self.hangup_method, extra)

    def _params(self) -> dict[str, str]:
        return {
            "ALegRequestUUID": self.request_uuid,
            "ALegUUID": self.call_uuid,
            "BillRate": "0.00850",
            "CallStatus": self.status,
            "CallUUID": self.call_uuid,
            "CallerName": self.from_,
            "Direction": self.direction,
            "From": self.from_,
            "RequestUUID": self.request_uuid,
            "SessionStart": _timestamp(self.created_at),
            "To": self.to,
        }

    def _callback(self, kind: str, url: str, method: str, extra: Mapping[str, str]) -> None:
        params = self._params()
        params.update(extra)
        self._notify(Webhook(kind, url, method.upper(), params))

    def _before_elements(self, root: ET.Element) -> None:
        if not self.is_answered:
            if len(root) and root[0].tag == "Hangup":
                reason = root[0].get("reason", "")
                self._end("busy" if reason in ("busy", "rejected") else "no-answer")
                raise Superseded()
            if len(root):
                self._mark_answered()

    async def _element(self, gen: int, element: ET.Element, base: str) -> Any:
        """Run one element: False to go on, None to hang up, a Fetch to replace the document."""
        tag = element.tag
        if tag in ("Speak", "Play", "Wait"):
            await self._prompt(gen, element, base)
        elif tag == "GetInput":
            return await self._get_input(gen, element, base)
        elif tag == "Redirect":
            url = resolve(base, (element.text or "").strip())
            if url is None:
                self._error("Redirect without a usable URL")
                return None
            return Fetch("redirect", url, element.get("method", "POST"))
        elif tag == "Hangup":
            self.hangup_source = self.hangup_source or "Plivo"
            return None
        elif tag == "Dial":
            return await self._dial(gen, element, base)
        else:
            self._error(f"unsupported element <{tag}> skipped")
        return False

    async def _prompt(self, gen: int, element: ET.Element, base: str, part: float = 1.0) -> None:
        loop = int_attr(element.get("loop"), 1)
        if element.tag == "Speak":
            text = "".join(element.itertext()).strip()
            self.speaks.append(SpeakRecord(text, element.get("voice"), element.get("language"), loop))
            self.speak_log.append((self._carrier.clock.seconds(), text))
            seconds = self._carrier.chaos.playback_seconds(text, self.scenario.speak_seconds_per_char)
            await self._sleep(gen, seconds * max(loop, 1) * part)
        elif element.tag == "Play":
            self.plays.append(resolve(base, (element.text or "").strip()) or (element.text or ""))
            await self._sleep(gen, self.scenario.play_seconds * max(loop, 1))
        elif element.get("beep", "").lower() == "true":
            # Wait for a machine's beep, at most `length`: a beep already gone by is not heard.
            length = int_attr(element.get("length"), 1)
            now = self._carrier.clock.seconds()
            if self.scenario.machine and self.beep_at is None and self.answered_at is not None:
                length = min(length, max(0.0, self.answered_at + self.scenario.greeting_seconds - now))
            await self._sleep(gen, length)
        else:
            await self._sleep(gen, int_attr(element.get("length"), 1))

    async def _dial(self, gen: int, element: ET.Element, base: str) -> Any:
        """`<Dial>`: ring the first `<Number>`/`<User>`; the two talk until either hangs up."""
        target = next((child for child in element if child.tag in ("Number", "User")), None)
        if target is None or not (target.text or "").strip():
            self._error("Dial without a Number or User")
            return False
        dial = DialRecord((target.text or "").strip(), target.tag, element.get("callerId"), self._carrier.clock.seconds())
        self.dials.append(dial)
        seconds = self.scenario.dial_seconds
        await self._sleep(gen, int_attr(element.get("timeLimit"), 14400) if seconds is None else seconds)
        dial.ended_at = self._carrier.clock.seconds()
        action = resolve(base, element.get("action", "")) if element.get("action") else None
        if action is None:
            return False
        where = Fetch("action", action, element.get("method", "POST"), {"DialStatus": "completed", "DialAction": "hangup"})
        if element.get("redirect", "true").lower() != "false":
            return where
        self._callback("action", action, where.method, dict(where.extra))
        return False

    def _next_utterance(self) -> Any:
        if self.scenario.machine:
            return succeed(None)  # a machine says nothing a GetInput takes
        if self.scenario.press and self._keys_wanted and not self._pressed:
            self._pressed = True
            return succeed({"Digits": self.scenario.press})
        return DocumentCall._next_utterance(self)

    async def _get_input(self, gen: int, element: ET.Element, base: str) -> Any:
        attrs = dict(element.attrib)
        action = resolve(base, attrs["action"]) if attrs.get("action") else None
        record = GetInputRecord(attrs, action, attrs.get("method", "POST").upper())
        self.inputs.append(record)
        self._keys_wanted = "dtmf" in attrs.get("inputType", "dtmf").split()
        heard = await self._listen(gen, element, base, record, inputs="inputType", timeout="executionTimeout", default=15)
        if heard is None:
            return False
        if isinstance(heard, str):
            extra = {
                "InputType": "speech",
                "Speech": heard,
                "SpeechConfidenceScore": self.scenario.confidence,
                "Digits": "",
            }
        else:
            extra = {"InputType": "dtmf", "Speech": "", **{str(k): str(v) for k, v in heard.items()}}
        if action is None:
            self._error("GetInput without an action URL")
            return False
        where = Fetch("action", action, record.method, extra)
        if attrs.get("redirect", "true").lower() != "false":
            return where  # the XML the action answers drives the call
        self._callback("action", action, record.method, extra)
        return False


def _cause_name(status: str) -> str:
    return HANGUP_CAUSES.get(status, "NORMAL_CLEARING")

