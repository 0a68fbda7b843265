# -*- test-case-name: tests.test_fake_twilio,tests.test_fake_plivo -*-
"""
What a fake call that follows documents shares, whether TwiML (Twilio) or XML (Plivo): the
runner that fetches a document, plays it element by element on the injected clock, and fetches
the next one where it says; a live update or a transfer supersedes it (a new generation) and an
end stops it. The person on the line answers a `<Gather>`/`<GetInput>` with the scenario's next
utterance, and may talk over its prompt when the carrier's `Chaos` says so.

A carrier's `FakeCall` subclasses `DocumentCall` and supplies its words (`document_name`,
`fetch_failure`, `parse_failure`, `prompt_tags`), its records (`_params`, `_document_hook`,
`_label`), what its elements do (`_element`, `_prompt`, `_before_elements`) and how its calls end
(`_report_end`, `_document_ended`). It needs `_carrier` (a delivery.Courier with
`max_documents_per_call`), `scenario`, `status`, `answered_at`, `ended_at`, `is_ended` and
`hangup_by_callee`.

It imports nothing of the daemon.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from typing import Any, Callable, Mapping, Sequence, Union
from urllib.parse import urljoin, urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

#: Observations kept per call (oldest dropped first).
MAX_OBSERVATIONS = 1_000
OUTCOMES = ("answer", "no-answer", "busy", "failed")

#: What a Gather/GetInput hears: speech (str), other parameters (`{"Digits": "1"}`), or nothing (None).
Utterance = Union[str, Mapping[str, str], None]


def _utterance_source(value: Any) -> Any:
    return value if callable(value) else tuple(value)


@frozen
class PromptRecord:
    """A speech prompt the call played (`<Say>`, `<Speak>`) with its attributes."""

    text: str
    voice: str | None
    language: str | None
    loop: int = 1


@define
class InputRecord:
    """An input the call gathered (`<Gather>`, `<GetInput>`): its attributes, where it posts, what it heard."""

    attributes: dict[str, str]
    action_url: str | None
    method: str
    heard: Utterance = None


@frozen
class DocumentScenario:
    """
    What the person on the far end of a document carrier's call does (the carrier's `Scenario`
    adds its speaking rate and words); times are in seconds on the injected clock.

    `outcome` is `answer`, `no-answer`, `busy` or `failed`. An outbound call rings after
    `ring_after`, then is answered (or busy, or fails) `answer_after` later. `utterances` feeds
    the Gathers/GetInputs: a sequence consumed one per input, or a callable
    `(call) -> Utterance` (or a Deferred of one). `hangup_after` hangs up that long after the
    answer. `<Play>` takes `play_seconds`; an input that hears nothing waits `silence` (None:
    its own timeout attribute); what is heard is posted `speech_delay` after the prompt ended.
    """

    outcome: str = "answer"
    ring_after: float = 0.0
    answer_after: float = 0.0
    utterances: Sequence[Utterance] | Callable[[Any], Any] = field(default=(), converter=_utterance_source)
    hangup_after: float | None = None
    play_seconds: float = 0.0
    silence: float | None = None
    speech_delay: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")


class Superseded(Exception):
    """The document a runner was following was replaced (live update, transfer) or the call ended."""


@frozen
class Fetch:
    """Where to fetch the next document, and the parameters to add to the request."""

    kind: str
    url: str
    method: str
    extra: Mapping[str, str] = field(factory=dict)


def resolve(base: str | None, url: str) -> str | None:
    """An absolute http(s) URL for `url`, relative to the document it came from."""
    if not url:
        return None
    if base:
        url = urljoin(base, url)
    return url if urlsplit(url).scheme in ("http", "https") else None


def int_attr(value: str | None, default: int) -> int:
    """An element's integer attribute, or `default` when it is missing or not a number."""
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _observations() -> deque:
    return deque(maxlen=MAX_OBSERVATIONS)


@define(kw_only=True, eq=False)
class DocumentCall:
    """The document runner and bookkeeping of one fake call (see the module docstring)."""

    documents: deque = field(factory=_observations)
    plays: deque = field(factory=_observations)
    callbacks: deque = field(factory=_observations)
    errors: deque = field(factory=_observations)
    _generation: int = 0
    _pending: Deferred | None = None
    _timers: list = field(factory=list)
    _utterances_used: int = 0
    _document_count: int = 0
    _end_waiters: list = field(factory=list)
    _log = Logger()

    #: The carrier's name for its documents, and the errors it records for failed ones.
    document_name = "XML"
    fetch_failure = "XML fetch failed"
    parse_failure = "invalid XML"
    #: The elements that play a prompt (speech, audio, silence).
    prompt_tags = ()  # a class attribute (not annotated: attrs would make it a field)

    # -- observations and controls ---------------------------------------------------------

    def when_ended(self) -> Deferred:
        """A Deferred firing with the final status once the call has ended."""
        if self.is_ended:
            return succeed(self.status)
        d: Deferred = Deferred()
        self._end_waiters.append(d)
        return d

    # -- what each carrier supplies ----------------------------------------------------------

    @property
    def _label(self) -> str:
        """The call, as log lines name it."""
        raise NotImplementedError

    def _params(self) -> dict[str, str]:
        """The parameters every request about this call carries."""
        raise NotImplementedError

    def _document_hook(self, kind: str, url: str, method: str, params: dict[str, str]) -> Any:
        """The carrier's Webhook record of a document fetch."""
        raise NotImplementedError

    def _before_elements(self, root: ET.Element) -> None:
        """A document arrived for the call (it may answer or refuse an unanswered call)."""

    async def _element(self, gen: int, element: ET.Element, base: str | None) -> Any:
        """Run one element: False to go on, None to hang up, a Fetch to replace the document."""
        raise NotImplementedError

    async def _prompt(self, gen: int, element: ET.Element, base: str | None, part: float = 1.0) -> None:
        """Play a prompt element; `part` < 1: the person talks over it that far in (barge-in)."""
        raise NotImplementedError

    def _report_end(self, status: str) -> None:
        """Tell the application the call ended (status callback, hang-up URL)."""

    def _document_ended(self) -> None:
        """The last document ran out without hanging up or going anywhere."""
        raise NotImplementedError

    # -- timers, answer and end ----------------------------------------------------------------

    def _after(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self._carrier.clock.callLater(seconds, fn, *args))

    def _mark_answered(self) -> None:
        self.status = "in-progress"
        self.answered_at = self._carrier.clock.seconds()
        if self.scenario.hangup_after is not None:
            self._after(self.scenario.hangup_after, self.hangup_by_callee)

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
        self._report_end(status)
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(status)

    def _duration(self) -> int:
        """Whole seconds from the answer to the end (or now)."""
        if self.answered_at is None:
            return 0
        end = self.ended_at if self.ended_at is not None else self._carrier.clock.seconds()
        return int(round(end - self.answered_at))

    def _notify(self, hook: Any) -> None:
        """Deliver a notification (its answer is not followed)."""
        self.callbacks.append(hook)
        self._carrier.deliver(hook).addErrback(lambda f: f.trap(CancelledError))

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self._log.info("fake {call}: {message}", call=self._label, message=message)

    # -- the runner ----------------------------------------------------------------------------

    def _interrupt(self, why: str = "interrupted") -> int:
        """Supersede whatever the current runner awaits; return the new generation."""
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
        return self._generation

    def _launch(self, source: str | Fetch) -> None:
        """Follow `source` (a document, or where to fetch one) instead of the current document."""
        gen = self._interrupt()
        d = Deferred.fromCoroutine(self._run(gen, source))
        d.addErrback(self._runner_failed)

    def _runner_failed(self, failure: Any) -> None:
        self._log.failure("fake {call}: {document} runner failed", failure, call=self._label, document=self.document_name)
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
            raise Superseded()
        return result

    async def _sleep(self, gen: int, seconds: float) -> None:
        if seconds > 0:
            await self._wait(gen, deferLater(self._carrier.clock, seconds))

    async def _run(self, gen: int, source: str | Fetch) -> None:
        try:
            if isinstance(source, str):
                doc, base = source, None
            else:
                doc, base = await self._fetch(gen, source), source.url
            while doc is not None:
                nxt = await self._follow(gen, doc, base)
                if nxt is None:
                    break
                base = nxt.url
                doc = await self._fetch(gen, nxt)
        except (Superseded, CancelledError):
            if gen == self._generation:
                raise
            return
        if gen == self._generation and not self.is_ended:
            self._document_ended()

    async def _fetch(self, gen: int, where: Fetch) -> str | None:
        self._document_count += 1
        if self._document_count > self._carrier.max_documents_per_call:
            self._error(f"too many {self.document_name} documents for one call")
            return None
        params = self._params()
        params.update(where.extra)
        hook = self._document_hook(where.kind, where.url, where.method.upper(), params)
        self.documents.append(hook)
        await self._wait(gen, self._carrier.deliver(hook))
        if hook.error is not None or hook.status is None or not 200 <= hook.status < 300:
            self._error(f"{self.fetch_failure}: {hook.url} -> {hook.error or hook.status}")
            return None
        return (hook.body or b"").decode("utf-8", "replace")

    async def _follow(self, gen: int, doc: str, base: str | None) -> Fetch | None:
        """Execute one document; return where to fetch the next one, or None to hang up."""
        try:
            root = ET.fromstring(doc.encode("utf-8"))
        except ET.ParseError as e:
            self._error(f"{self.parse_failure}: {e}")
            return None
        if root.tag != "Response":
            self._error(f"{self.parse_failure}: root element <{root.tag}>")
            return None
        self._before_elements(root)
        for element in root:
            nxt = await self._element(gen, element, base)
            if nxt is not False:
                return nxt
        return None

    # -- the person on the line ------------------------------------------------------------------

    async def _listen(
        self, gen: int, element: ET.Element, base: str | None, record: Any, *, inputs: str, timeout: str, default: int
    ) -> Any:
        """
        A Gather/GetInput: play its prompts (the person may talk over them), then hear the next
        utterance (speech only where the `inputs` attribute accepts it). Nothing heard: wait the
        silence (the scenario's, else the `timeout` attribute) and return None; else wait the
        speech delay and return what was heard. `record.heard` is set.
        """
        accepted = element.get(inputs, "")
        chaos = self._carrier.chaos
        part = chaos.barge_point() if "speech" in accepted and chaos.talks_over() else 1.0
        for child in element:
            if child.tag in self.prompt_tags:
                await self._prompt(gen, child, base, part)
                if part < 1.0:
                    break  # the person talks over the rest of the prompt
        heard = await self._wait(gen, self._next_utterance())
        if isinstance(heard, str) and (not heard or "speech" not in (accepted or "dtmf").split()):
            heard = None
        record.heard = heard
        if heard is None:
            silence = self.scenario.silence
            await self._sleep(gen, int_attr(element.get(timeout), default) if silence is None else silence)
        else:
            await self._sleep(gen, self.scenario.speech_delay)
        return heard

    def _next_utterance(self) -> Deferred:
        source = self.scenario.utterances
        if callable(source):
            result = source(self)
            return result if isinstance(result, Deferred) else succeed(result)
        index = self._utterances_used
        self._utterances_used += 1
        return succeed(source[index] if index < len(source) else None)
