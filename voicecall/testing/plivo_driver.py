# -*- test-case-name: tests.test_fake_plivo -*-
"""
The carrier side of the fake Plivo, per call: what Plivo does after the REST API accepted a
call (or one arrives for a number). `FakeCall` rings, answers, fetches the answer URL and
follows the XML element by element (`<Speak>`, `<Play>`, `<Wait>`, `<GetInput>`,
`<Redirect>`, `<Hangup>`), lets a transfer interrupt it, plays the person on the line as its
`Scenario` says, and posts the hang-up URL when the call ends. The runner itself is documents.py's.

It imports nothing of the daemon, only the fake's own modules.
"""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections import deque
from datetime import datetime, timezone
from typing import Any, Mapping

from attrs import define, field

from voicecall.testing.documents import DocumentCall, Fetch, Superseded, int_attr, resolve
from voicecall.testing.plivo_carrier import (
    HANGUP_CAUSES,
    MAX_OBSERVATIONS,
    TERMINAL,
    Carrier,
    GetInputRecord,
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
        self._launch(Fetch("answer", self.answer_url or "", self.answer_method, {"Event": "StartApp"}))

    def _report_end(self, status: str) -> None:
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
        else:
            self._error(f"unsupported element <{tag}> skipped")
        return False

    async def _prompt(self, gen: int, element: ET.Element, base: str, part: float = 1.0) -> None:
        loop = int_attr(element.get("loop"), 1)
        if element.tag == "Speak":
            text = "".join(element.itertext()).strip()
            self.speaks.append(SpeakRecord(text, element.get("voice"), element.get("language"), loop))
            seconds = self._carrier.chaos.playback_seconds(text, self.scenario.speak_seconds_per_char)
            await self._sleep(gen, seconds * max(loop, 1) * part)
        elif element.tag == "Play":
            self.plays.append(resolve(base, (element.text or "").strip()) or (element.text or ""))
            await self._sleep(gen, self.scenario.play_seconds * max(loop, 1))
        else:
            await self._sleep(gen, int_attr(element.get("length"), 1))

    async def _get_input(self, gen: int, element: ET.Element, base: str) -> Any:
        attrs = dict(element.attrib)
        action = resolve(base, attrs["action"]) if attrs.get("action") else None
        record = GetInputRecord(attrs, action, attrs.get("method", "POST").upper())
        self.inputs.append(record)
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

