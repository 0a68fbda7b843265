# -*- test-case-name: tests.test_fake_twilio -*-
"""
The carrier side of the fake Twilio, per call: what Twilio does after the REST API accepted a
call (or one arrives for a number). `FakeCall` posts status callbacks, fetches TwiML and
follows it verb by verb (`<Say>`, `<Play>`, `<Pause>`, `<Gather>`, `<Redirect>`, `<Hangup>`,
`<Connect><Stream>`, `<Start><Stream>`, `<Enqueue>`), lets a live update interrupt it, and
plays the person on the line as its `Scenario` says.

It imports nothing of the daemon, only the fake's own modules.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from typing import Any, Callable, Mapping
from urllib.parse import urljoin, urlsplit

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from voicecall.testing.twilio_carrier import (
    API_VERSION,
    MAX_OBSERVATIONS,
    TERMINAL,
    Carrier,
    GatherRecord,
    SayRecord,
    Scenario,
    StreamRecord,
    Webhook,
    rfc2822,
)


class _Superseded(Exception):
    """The TwiML a runner was following was replaced (live update) or the call ended."""


class _Fetch:
    """Where the current document says to go next."""

    def __init__(self, kind: str, url: str, method: str, extra: Mapping[str, str] = {}):
        self.kind, self.url, self.method, self.extra = kind, url, method, dict(extra)


@define(eq=False)
class FakeCall:
    """
    One call on the fake carrier: the resource the REST API reports and the driver that plays
    Twilio's part for it. Observations (`documents`, `says`, `plays`, `gathers`, `streams`,
    `enqueued`, `callbacks`, `errors`) are bounded deques, oldest first.
    """

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
    documents: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    says: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    #: The `<Say>` texts said to their end (not cut short by a live update or a hang-up).
    said: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    plays: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    gathers: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    streams: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    callbacks: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    enqueued: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    errors: deque = field(factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    _sequence: int = 0
    _generation: int = 0
    _pending: Deferred | None = None
    _stream_gate: Deferred | None = None
    _timers: list = field(factory=list)
    _utterances_used: int = 0
    _document_count: int = 0
    _end_waiters: list = field(factory=list)
    _stream_waiters: list = field(factory=list)
    _log = Logger()

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

    def when_ended(self) -> Deferred:
        """A Deferred firing with the final status once the call has ended."""
        if self.is_ended:
            return succeed(self.status)
        d: Deferred = Deferred()
        self._end_waiters.append(d)
        return d

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
            "answered_by": None,
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
        self._launch(_Fetch("twiml", webhook_url, method))

    def update(self, twiml: str | None = None, url: str | None = None, method: str = "POST") -> None:
        """Live update: stop the current TwiML and follow the new document, like Twilio."""
        if twiml is not None:
            self._launch(twiml)
        elif url is not None:
            self._launch(_Fetch("twiml", url, method))

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

    def _after(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        self._timers.append(self._carrier.clock.callLater(seconds, fn, *args))

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

    def _answer(self) -> None:
        self.status = "in-progress"
        self.answered_at = self._carrier.clock.seconds()
        if self.scenario.hangup_after is not None:
            self._after(self.scenario.hangup_after, self.hangup_by_callee)
        generation = self._generation
        self._status_callback("answered", "in-progress")
        if self._generation != generation:
            # A live update (made by the answered callback's handler) already replaced the
            # answer's TwiML: it is not run after it, which would cut the update off.
            return
        if self.twiml is not None:
            self._launch(self.twiml)
        elif self.url is not None:
            self._launch(_Fetch("twiml", self.url, self.method))
        else:
            self._error("no TwiML source for the call")
            self._end("failed")

    def _end(self, status: str) -> None:
        if self.is_ended:
            return
        self.status = status
        self.ended_at = self._carrier.clock.seconds()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._interrupt("hangup")
        extra = {"CallDuration": str(self._duration())}
        self._status_callback("completed", status, extra)
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(status)
        stream_waiters, self._stream_waiters = self._stream_waiters, []
        for d in stream_waiters:
            d.callback(None)

    def _duration(self) -> int:
        if self.answered_at is None or self.ended_at is None:
            return 0
        return int(round(self.ended_at - self.answered_at))

    def _params(self, status: str | None = None) -> dict[str, str]:
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
        hook = Webhook("status", self.status_callback, self.status_callback_method, params, "")
        self.callbacks.append(hook)
        d = self._carrier.deliver(hook)
        d.addErrback(lambda f: f.trap(CancelledError))

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self._log.info("fake call {sid}: {message}", sid=self.sid, message=message)

    def _interrupt(self, why: str) -> int:
        """Supersede whatever the current runner awaits; return the new generation."""
        self._generation += 1
        gate, self._stream_gate = self._stream_gate, None
        if gate is not None:
            self.streams[-1].ended_by = why
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
        if gate is not None and not gate.called:
            gate.cancel()
        return self._generation

    def _launch(self, source: str | _Fetch) -> None:
        gen = self._interrupt("interrupted")
        d = Deferred.fromCoroutine(self._run(gen, source))
        d.addErrback(self._runner_failed)

    def _runner_failed(self, failure: Any) -> None:
        self._log.failure("fake call {sid}: TwiML runner failed", failure, sid=self.sid)
        self._error(f"runner failed: {failure.getErrorMessage()}")
        self._end("completed" if self.answered_at is not None else "failed")

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

    async def _run(self, gen: int, source: str | _Fetch) -> None:
        try:
            base = None
            if isinstance(source, str):
                doc = source
            else:
                base = source.url
                doc = await self._fetch(gen, source)
            while doc is not None:
                nxt = await self._follow(gen, doc, base)
                if nxt is None:
                    break
                base = nxt.url
                doc = await self._fetch(gen, nxt)
        except (_Superseded, CancelledError):
            if gen == self._generation:
                raise
            return
        if gen == self._generation and not self.is_ended:
            self._end("completed")

    async def _fetch(self, gen: int, where: _Fetch) -> str | None:
        self._document_count += 1
        if self._document_count > self._carrier.max_documents_per_call:
            self._error("too many TwiML documents for one call")
            return None
        params = self._params()
        params.update(where.extra)
        hook = Webhook(where.kind, where.url, where.method.upper(), params, "")
        self.documents.append(hook)
        await self._wait(gen, self._carrier.deliver(hook))
        if hook.error is not None or hook.status is None or not 200 <= hook.status < 300:
            self._error(f"11200 HTTP retrieval failure: {hook.url} -> {hook.error or hook.status}")
            return None
        return (hook.body or b"").decode("utf-8", "replace")

    async def _follow(self, gen: int, doc: str, base: str | None) -> _Fetch | None:
        """Execute one document; return where to fetch the next one, or None to hang up."""
        try:
            root = ET.fromstring(doc.encode("utf-8"))
        except ET.ParseError as e:
            self._error(f"12100 Document parse failure: {e}")
            return None
        if root.tag != "Response":
            self._error(f"12100 Document parse failure: root element <{root.tag}>")
            return None
        if self.direction == "inbound" and self.answered_at is None:
            if len(root) and root[0].tag == "Reject":
                self._end("busy" if root[0].get("reason") == "busy" else "no-answer")
                raise _Superseded()
            self.status = "in-progress"
            self.answered_at = self._carrier.clock.seconds()
            if self.scenario.hangup_after is not None:
                self._after(self.scenario.hangup_after, self.hangup_by_callee)
        for verb in root:
            nxt = await self._verb(gen, verb, base)
            if nxt is not False:
                return nxt
        return None

    async def _verb(self, gen: int, verb: ET.Element, base: str | None) -> Any:
        """Run one verb: False to continue, None to hang up, a _Fetch to replace the document."""
        tag = verb.tag
        if tag in ("Say", "Play", "Pause"):
            await self._prompt(gen, verb, base)
        elif tag == "Gather":
            return await self._gather(gen, verb, base)
        elif tag == "Redirect":
            url = _resolve(base, (verb.text or "").strip())
            if url is None:
                self._error("Redirect without an absolute URL")
                return None
            return _Fetch("redirect", url, verb.get("method", "POST"))
        elif tag in ("Hangup", "Reject"):
            return None
        elif tag == "Connect":
            return await self._connect(gen, verb, base)
        elif tag == "Start":
            for child in verb:
                if child.tag == "Stream":
                    self._record_stream(child, bidirectional=False)
        elif tag == "Enqueue":
            self.enqueued.append((verb.text or "").strip())
            await self._wait(gen, Deferred())
        else:
            self._error(f"unsupported verb <{tag}> skipped")
        return False

    async def _prompt(self, gen: int, verb: ET.Element, base: str | None, part: float = 1.0) -> None:
        """Play a prompt verb; `part` < 1: the person talks over it that far in (barge-in)."""
        loop = _int(verb.get("loop"), 1)
        if verb.tag == "Say":
            text = "".join(verb.itertext()).strip()
            self.says.append(SayRecord(text, verb.get("voice"), verb.get("language"), loop))
            seconds = self._carrier.chaos.playback_seconds(text, self.scenario.say_seconds_per_char)
            await self._sleep(gen, seconds * max(loop, 1) * part)
            self.said.append(text)
        elif verb.tag == "Play":
            self.plays.append(_resolve(base, (verb.text or "").strip()) or (verb.text or ""))
            if loop == 0:
                await self._wait(gen, Deferred())  # plays until something interrupts it
            await self._sleep(gen, self.scenario.play_seconds * loop)
        else:
            await self._sleep(gen, _int(verb.get("length"), 1))

    async def _gather(self, gen: int, verb: ET.Element, base: str | None) -> Any:
        attrs = dict(verb.attrib)
        action = _resolve(base, attrs.get("action", "")) if attrs.get("action") else base
        record = GatherRecord(attrs, action, attrs.get("method", "POST").upper())
        self.gathers.append(record)
        chaos = self._carrier.chaos
        part = chaos.barge_point() if "speech" in attrs.get("input", "") and chaos.talks_over() else 1.0
        for child in verb:
            if child.tag in ("Say", "Play", "Pause"):
                await self._prompt(gen, child, base, part)
                if part < 1.0:
                    break  # the person talks over the rest of the prompt
        heard = await self._wait(gen, self._next_utterance())
        inputs = attrs.get("input", "dtmf").split()
        if isinstance(heard, str) and (not heard or "speech" not in inputs):
            heard = None
        record.heard = heard
        if heard is None:
            silence = self.scenario.silence
            await self._sleep(gen, _int(attrs.get("timeout"), 5) if silence is None else silence)
            if attrs.get("actionOnEmptyResult") != "true":
                return False
            extra: dict[str, str] = {}
        else:
            await self._sleep(gen, self.scenario.speech_delay)
            if isinstance(heard, str):
                extra = {"SpeechResult": heard, "Confidence": self.scenario.confidence}
            else:
                extra = {str(k): str(v) for k, v in heard.items()}
        if action is None:
            self._error("Gather without an absolute action URL")
            return None
        return _Fetch("action", action, record.method, extra)

    def _next_utterance(self) -> Deferred:
        source = self.scenario.utterances
        if callable(source):
            result = source(self)
            return result if isinstance(result, Deferred) else succeed(result)
        index = self._utterances_used
        self._utterances_used += 1
        return succeed(source[index] if index < len(source) else None)

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
            url = _resolve(base, action)
            if url is not None:
                return _Fetch("action", url, verb.get("method", "POST"))
        return False

    def _record_stream(self, stream: ET.Element, bidirectional: bool) -> None:
        parameters = {
            p.get("name", ""): p.get("value", "") for p in stream if p.tag == "Parameter"
        }
        self.streams.append(
            StreamRecord(stream.get("url", ""), parameters, dict(stream.attrib), bidirectional)
        )


def _resolve(base: str | None, url: str) -> str | None:
    """An absolute http(s) URL for `url`, relative to the document it came from."""
    if not url:
        return None
    if base is not None:
        url = urljoin(base, url)
    return url if urlsplit(url).scheme in ("http", "https") else None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
