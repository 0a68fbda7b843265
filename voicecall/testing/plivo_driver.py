# -*- test-case-name: tests.test_fake_plivo -*-
"""
The carrier side of the fake Plivo, per call: what Plivo does after the REST API accepted a
call (or one arrives for a number). `FakeCall` rings, answers, fetches the answer URL and
follows the XML element by element (`<Speak>`, `<Play>`, `<Wait>`, `<GetInput>`,
`<Redirect>`, `<Hangup>`), lets a transfer interrupt it, plays the person on the line as its
`Scenario` says, and posts the hang-up URL when the call ends.

It imports nothing of the daemon, only the fake's own modules.
"""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Mapping
from urllib.parse import urljoin, urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

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


class _Superseded(Exception):
    """The XML a runner was following was replaced (transfer) or the call ended."""


@frozen
class _Fetch:
    """Where to fetch the next document."""

    kind: str
    url: str
    method: str
    extra: Mapping[str, str] = field(factory=dict)


# -- one call -----------------------------------------------------------------------------------


@define(eq=False)
class FakeCall:
    """
    One call on the fake Plivo. Observations (`documents`, `speaks`, `inputs`, `plays`,
    `callbacks`, `transfers`, `errors`) are bounded deques, oldest first.
    """

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
    documents: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    speaks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    inputs: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    plays: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    callbacks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    transfers: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    errors: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    _generation: int = 0
    _pending: Deferred | None = None
    _timers: list = field(factory=list)
    _utterances_used: int = 0
    _document_count: int = 0
    _end_waiters: list = field(factory=list)
    _log = Logger()

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

    def when_ended(self) -> Deferred:
        """A Deferred firing with the final status once the call has ended."""
        if self.is_ended:
            return succeed(self.status)
        d: Deferred = Deferred()
        self._end_waiters.append(d)
        return d

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
        self._launch(_Fetch("answer", self.answer_url or "", self.answer_method, {"Event": "StartApp"}))

    def transfer(self, url: str, method: str = "POST") -> None:
        """REST transfer of the A-leg: stop the current XML and follow `url`'s, like Plivo."""
        self.transfers.append(url)
        self._launch(_Fetch("transfer", url, method))

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

    def _after(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self._carrier.clock.callLater(seconds, fn, *args))

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

    def _mark_answered(self) -> None:
        self.status = "in-progress"
        self.answered_at = self._carrier.clock.seconds()
        if self.scenario.hangup_after is not None:
            self._after(self.scenario.hangup_after, self.hangup_by_callee)

    def _answer(self) -> None:
        self._mark_answered()
        self._launch(_Fetch("answer", self.answer_url or "", self.answer_method, {"Event": "StartApp"}))

    def _end(self, status: str) -> None:
        if self.is_ended:
            return
        self.status = status
        self.ended_at = self._carrier.clock.seconds()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._interrupt()
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
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(status)

    def _duration(self) -> int:
        if self.answered_at is None:
            return 0
        end = self.ended_at if self.ended_at is not None else self._carrier.clock.seconds()
        return int(round(end - self.answered_at))

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
        hook = Webhook(kind, url, method.upper(), params)
        self.callbacks.append(hook)
        d = self._carrier.deliver(hook)
        d.addErrback(lambda f: f.trap(CancelledError))

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self._log.info("fake Plivo call {uuid}: {message}", uuid=self.call_uuid, message=message)

    def _interrupt(self) -> int:
        """Supersede whatever the current runner awaits; return the new generation."""
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
        return self._generation

    def _launch(self, source: _Fetch) -> None:
        gen = self._interrupt()
        d = Deferred.fromCoroutine(self._run(gen, source))
        d.addErrback(self._runner_failed)

    def _runner_failed(self, failure: Any) -> None:
        self._log.failure("fake Plivo call {uuid}: XML runner failed", failure, uuid=self.call_uuid)
        self._error(f"runner failed: {failure.getErrorMessage()}")
        self._end("completed" if self.is_answered else "failed")

    async def _wait(self, gen: int, d: Deferred) -> Any:
        self._pending = d
        try:
            result = await d
        finally:
            if self._pending is d:
                self._pending = None
        if gen != self._generation:
            raise _Superseded()
        return result

    async def _sleep(self, gen: int, seconds: float) -> None:
        if seconds > 0:
            await self._wait(gen, deferLater(self._carrier.clock, seconds))

    async def _run(self, gen: int, source: _Fetch) -> None:
        try:
            where: _Fetch | None = source
            while where is not None:
                doc = await self._fetch(gen, where)
                if doc is None:
                    break
                where = await self._follow(gen, doc, where.url)
        except (_Superseded, CancelledError):
            if gen == self._generation:
                raise
            return
        if gen == self._generation and not self.is_ended:
            self.hangup_source = self.hangup_source or "Plivo"
            self._end("completed" if self.is_answered else "no-answer")

    async def _fetch(self, gen: int, where: _Fetch) -> str | None:
        self._document_count += 1
        if self._document_count > self._carrier.max_documents_per_call:
            self._error("too many XML documents for one call")
            return None
        params = self._params()
        params.update(where.extra)
        hook = Webhook(where.kind, where.url, where.method.upper(), params, document=True)
        self.documents.append(hook)
        await self._wait(gen, self._carrier.deliver(hook))
        if hook.error is not None or hook.status is None or not 200 <= hook.status < 300:
            self._error(f"XML fetch failed: {hook.url} -> {hook.error or hook.status}")
            return None
        return (hook.body or b"").decode("utf-8", "replace")

    async def _follow(self, gen: int, doc: str, base: str) -> _Fetch | None:
        """Execute one document; return where to fetch the next one, or None to hang up."""
        try:
            root = ET.fromstring(doc.encode("utf-8"))
        except ET.ParseError as e:
            self._error(f"invalid XML: {e}")
            return None
        if root.tag != "Response":
            self._error(f"invalid XML: root element <{root.tag}>")
            return None
        if not self.is_answered:
            if len(root) and root[0].tag == "Hangup":
                reason = root[0].get("reason", "")
                self._end("busy" if reason in ("busy", "rejected") else "no-answer")
                raise _Superseded()
            if len(root):
                self._mark_answered()
        for element in root:
            nxt = await self._element(gen, element, base)
            if nxt is not False:
                return nxt
        return None

    async def _element(self, gen: int, element: ET.Element, base: str) -> Any:
        """Run one element: False to go on, None to hang up, a _Fetch to replace the document."""
        tag = element.tag
        if tag in ("Speak", "Play", "Wait"):
            await self._prompt(gen, element, base)
        elif tag == "GetInput":
            return await self._get_input(gen, element, base)
        elif tag == "Redirect":
            url = _resolve(base, (element.text or "").strip())
            if url is None:
                self._error("Redirect without a usable URL")
                return None
            return _Fetch("redirect", url, element.get("method", "POST"))
        elif tag == "Hangup":
            self.hangup_source = self.hangup_source or "Plivo"
            return None
        else:
            self._error(f"unsupported element <{tag}> skipped")
        return False

    async def _prompt(self, gen: int, element: ET.Element, base: str, part: float = 1.0) -> None:
        """Play a prompt element; `part` < 1: the person talks over it that far in (barge-in)."""
        loop = _int(element.get("loop"), 1)
        if element.tag == "Speak":
            text = "".join(element.itertext()).strip()
            self.speaks.append(SpeakRecord(text, element.get("voice"), element.get("language"), loop))
            seconds = self._carrier.chaos.playback_seconds(text, self.scenario.speak_seconds_per_char)
            await self._sleep(gen, seconds * max(loop, 1) * part)
        elif element.tag == "Play":
            self.plays.append(_resolve(base, (element.text or "").strip()) or (element.text or ""))
            await self._sleep(gen, self.scenario.play_seconds * max(loop, 1))
        else:
            await self._sleep(gen, _int(element.get("length"), 1))

    async def _get_input(self, gen: int, element: ET.Element, base: str) -> Any:
        attrs = dict(element.attrib)
        action = _resolve(base, attrs["action"]) if attrs.get("action") else None
        record = GetInputRecord(attrs, action, attrs.get("method", "POST").upper())
        self.inputs.append(record)
        chaos = self._carrier.chaos
        part = chaos.barge_point() if "speech" in attrs.get("inputType", "") and chaos.talks_over() else 1.0
        for child in element:
            if child.tag in ("Speak", "Play", "Wait"):
                await self._prompt(gen, child, base, part)
                if part < 1.0:
                    break  # the person talks over the rest of the prompt
        heard = await self._wait(gen, self._next_utterance())
        kinds = attrs.get("inputType", "dtmf").split()
        if isinstance(heard, str) and (not heard or "speech" not in kinds):
            heard = None
        record.heard = heard
        if heard is None:
            silence = self.scenario.silence
            await self._sleep(gen, _int(attrs.get("executionTimeout"), 15) if silence is None else silence)
            return False
        await self._sleep(gen, self.scenario.speech_delay)
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
        where = _Fetch("action", action, record.method, extra)
        if attrs.get("redirect", "true").lower() != "false":
            return where  # the XML the action answers drives the call
        self._callback("action", action, record.method, extra)
        return False

    def _next_utterance(self) -> Deferred:
        source = self.scenario.utterances
        if callable(source):
            result = source(self)
            return result if isinstance(result, Deferred) else succeed(result)
        index = self._utterances_used
        self._utterances_used += 1
        return succeed(source[index] if index < len(source) else None)


def _cause_name(status: str) -> str:
    return HANGUP_CAUSES.get(status, "NORMAL_CLEARING")


def _resolve(base: str | None, url: str) -> str | None:
    """An absolute http(s) URL for `url`, relative to the document it came from."""
    if not url:
        return None
    if base:
        url = urljoin(base, url)
    return url if urlsplit(url).scheme in ("http", "https") else None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
