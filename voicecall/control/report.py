# -*- test-case-name: tests.test_report -*-
"""
The report after the call (issue 17 item 7).

`Reporter` listens to this node's CallManager (so only the node that ended a call reports it).
When a call ends it builds the call's summary (domain/summary.py), adds a short LLM summary of
the transcript when asked (`report.summarize`, the built-in responder's chat client, bounded in
time; a failure leaves it out), and publishes it with `manager.publish` as a `call.summary`
event: stored with the call's other events, it reaches every subscriber (`voicecall tail`,
`voicecall.subscribe`, other nodes). It runs only after the end was committed, and nothing the
call's end waits for waits for it.

`ReportDelivery` POSTs each `call.summary` event, exactly as subscribers see it, to `report.url`:

    POST <report.url>
    Content-Type: application/json
    X-Voicecall-Timestamp: <Unix time in seconds, this attempt's>
    X-Voicecall-Signature: sha256=<hex HMAC-SHA256 with report.secret of
                                   timestamp + "." + the body's exact bytes>

A 2xx answer delivers it. Connection errors, timeouts (`timeout` seconds per attempt), 429 and
5xx are retried after 1, 2, 4 ... seconds (at most `max_delay` apart; a 429's Retry-After is
honoured up to that) until `give_up_after` seconds have passed since the first attempt; any other
answer (a 4xx: the receiver refuses it) is final. Each attempt is signed afresh (a receiver may
refuse old timestamps). At most `max_pending` reports wait: past that the oldest is dropped with
a warning. Redirects are not followed (the signed body goes only to the configured URL). Logs
name the receiver by its origin only (a URL may carry a token), never the secret.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import voicecall
from voicecall.domain.model import CallRecord, TranscriptEntry
from voicecall.domain.summary import SUMMARY_EVENT, final_transcript, summary_fields
from voicecall.infra.bodies import BodyTooLarge, read_bounded
from voicecall.infra.private.client import response_connection

SIGNATURE_HEADER = "X-Voicecall-Signature"
TIMESTAMP_HEADER = "X-Voicecall-Timestamp"
#: How much of a receiver's answer is read (then the connection is dropped): only its status counts.
MAX_ANSWER_BYTES = 64 * 1024


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Voicecall-Signature` value: ``sha256=`` + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def origin(url: str) -> str:
    """`url` without its path, query and credentials: how logs name the receiver."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _retry_after(value: bytes | None) -> float | None:
    """A Retry-After header's delay in seconds (the delta-seconds form only)."""
    try:
        seconds = float(value.decode("ascii")) if value else None
    except (UnicodeDecodeError, ValueError):
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


@define(repr=False)
class _Pending:
    """One report on its way: its body, when it was first tried, and what it is waiting for."""

    serial: int
    call_id: str
    body: bytes
    first: float
    attempts: int = 0
    timer: IDelayedCall | None = None
    request: Deferred | None = None

    def sending(self, request: Deferred) -> None:
        self.attempts += 1
        self.timer = None
        self.request = request

    def answered(self) -> None:
        self.request = None

    def waiting(self, timer: IDelayedCall) -> None:
        self.timer = timer

    def cancel(self) -> None:
        """Stop waiting: the retry timer and the request in flight, if any, are cancelled."""
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        request, self.request = self.request, None
        if request is not None:
            request.cancel()


class _Answer(Exception):
    """The receiver answered with a status that is not a success."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


@define(repr=False)
class ReportDelivery:
    """Signed POSTs of call summaries to one URL, retried with backoff (see the module docstring)."""

    _http: Any  # treq.client.HTTPClient
    _clock: IReactorTime
    _url: str = field(repr=False)
    _secret: str = field(repr=False)
    _timeout: float = 10.0
    _first_delay: float = 1.0
    _max_delay: float = 120.0
    _give_up_after: float = 600.0
    _max_pending: int = 1000
    _pending: OrderedDict[int, _Pending] = field(factory=OrderedDict)
    _serial: int = 0
    _stopped: bool = False
    #: Reports delivered, refused (a final answer), given up (retried too long) and dropped (queue full, stop).
    counts: dict[str, int] = field(factory=lambda: dict.fromkeys(("delivered", "refused", "gaveUp", "dropped"), 0))
    _log = Logger()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, entry: dict) -> None:
        """Deliver `entry` (a `call.summary` event) as JSON; never raises, never waits."""
        call_id = str(entry.get("callId"))
        if self._stopped:
            self._log.warn("report of {call_id} not sent: voicecall is stopping", call_id=call_id)
            return
        body = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        while len(self._pending) >= self._max_pending:
            _, oldest = self._pending.popitem(last=False)
            self._drop(oldest)
            self._log.warn(
                "report queue full ({limit} waiting): dropped the report of {call_id}",
                limit=self._max_pending,
                call_id=oldest.call_id,
            )
        self._serial += 1
        report = _Pending(self._serial, call_id, body, self._clock.seconds())
        self._pending[report.serial] = report
        self._attempt(report)

    def stop(self) -> None:
        """Cancel every retry and request in flight (the daemon is stopping); says how many were dropped."""
        self._stopped = True
        dropped = [self._pending.pop(serial) for serial in list(self._pending)]
        for report in dropped:
            self._drop(report)
        if dropped:
            self._log.warn(
                "voicecall stopping: {n} report(s) not delivered to {where} ({call_ids})",
                n=len(dropped),
                where=origin(self._url),
                call_ids=", ".join(r.call_id for r in dropped[:10]) + (" ..." if len(dropped) > 10 else ""),
            )

    def _drop(self, report: _Pending) -> None:
        self.counts["dropped"] += 1
        report.cancel()

    def _attempt(self, report: _Pending) -> None:
        timestamp = str(int(self._clock.seconds()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"voicecall/{voicecall.__version__}",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, report.body),
        }
        d = self._post(report.body, headers)
        report.sending(d)
        d.addCallbacks(self._delivered, self._failed, callbackArgs=(report,), errbackArgs=(report,))
        d.addErrback(lambda f: self._log.failure("report delivery of {call_id} failed", f, call_id=report.call_id))

    def _post(self, body: bytes, headers: dict[str, str]) -> Deferred[None]:
        """One attempt: fires on a 2xx answer, fails with `_Answer` for another, or the connection's error."""
        answered: list[Any] = []

        def read(response: Any) -> Deferred:
            answered.append(response)
            reading = read_bounded(response, MAX_ANSWER_BYTES)
            reading.addErrback(lambda f: f.trap(BodyTooLarge) and None)  # the status is what counts
            return reading.addCallback(lambda _: response)

        def judge(response: Any) -> None:
            if not 200 <= response.code < 300:
                raise _Answer(response.code, _retry_after(response.headers.getRawHeaders(b"retry-after", [None])[0]))

        def timed_out(result: Any, timeout: float) -> None:
            # treq's body reader cannot be cancelled: drop the connection under a stalled answer.
            connection = response_connection(answered[0]) if answered else None
            if connection is not None:
                connection.loseConnection()
            raise TimeoutError(timeout, "report receiver")

        d = self._http.post(self._url, data=body, headers=headers, allow_redirects=False)
        d.addCallback(read).addCallback(judge)
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=timed_out)
        return d

    def _current(self, report: _Pending) -> bool:
        return self._pending.get(report.serial) is report

    def _delivered(self, _: None, report: _Pending) -> None:
        if not self._current(report):
            return
        del self._pending[report.serial]
        self.counts["delivered"] += 1
        self._log.info(
            "report of {call_id} delivered to {where} (attempt {attempt})",
            call_id=report.call_id,
            where=origin(self._url),
            attempt=report.attempts,
        )

    def _failed(self, failure: Failure, report: _Pending) -> None:
        if not self._current(report) or failure.check(CancelledError):
            return  # dropped or stopped meanwhile: said there
        report.answered()
        where = origin(self._url)
        answer = failure.value if failure.check(_Answer) else None
        if answer is not None and answer.status != 429 and answer.status < 500:
            del self._pending[report.serial]
            self.counts["refused"] += 1
            self._log.warn(
                "report of {call_id} refused by {where}: HTTP {status} (not retried)",
                call_id=report.call_id,
                where=where,
                status=answer.status,
            )
            return
        why = str(answer) if answer is not None else _describe(failure)
        delay = min(self._first_delay * 2 ** (report.attempts - 1), self._max_delay)
        if answer is not None and answer.retry_after is not None:
            delay = max(delay, min(answer.retry_after, self._max_delay))
        if self._clock.seconds() + delay - report.first > self._give_up_after:
            del self._pending[report.serial]
            self.counts["gaveUp"] += 1
            self._log.warn(
                "report of {call_id} not delivered to {where} after {attempts} attempts ({why}): given up",
                call_id=report.call_id,
                where=where,
                attempts=report.attempts,
                why=why,
            )
            return
        self._log.info(
            "report of {call_id} to {where} failed ({why}): retrying in {delay:g}s",
            call_id=report.call_id,
            where=where,
            why=why,
            delay=delay,
        )
        report.waiting(self._clock.callLater(delay, self._attempt, report))


def _describe(failure: Failure) -> str:
    """A short reason for a failed attempt (the connection's error, or the time limit)."""
    if failure.check(TimeoutError):
        return "no answer in time"
    reasons = getattr(failure.value, "reasons", None)  # treq's ResponseFailed / RequestTransmissionFailed
    if reasons:
        return f"{type(failure.value).__name__}: {reasons[0].getErrorMessage()}"[:200]
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"[:200]


def _too_slow(result: Any, timeout: float) -> None:
    """A summary cut off at its time limit, whatever the chat client made of the cancel."""
    raise TimeoutError(timeout, "summary")


#: summarize(transcript) -> Deferred of a short summary text (the built-in responder's chat client).
Summarize = Callable[[Sequence[TranscriptEntry]], "Deferred[str]"]


@define(repr=False)
class Reporter:
    """
    Publishes a `call.summary` event for every call this node ends, and hands each one to
    `delivery` (when `report.url` is set). `start()` subscribes to the manager; `stop()`
    unsubscribes and cancels what is in flight.
    """

    _clock: IReactorTime
    _subscribe: Callable[[Callable[[dict], None]], Callable[[], None]]
    _publish: Callable[..., Awaitable[None]]
    _get_call: Callable[[str], Awaitable[CallRecord | None]]
    _delivery: ReportDelivery | None = None
    _summarize: Summarize | None = None
    _summary_timeout: float = 20.0
    #: Summaries being written by the model at once; a call ending past that is reported without one.
    _max_summarizing: int = 50
    _summarizing: int = 0
    _tasks: set[Deferred] = field(factory=set)
    _unsubscribe: Callable[[], None] | None = None
    _stopped: bool = False
    _log = Logger()

    def start(self) -> None:
        if self._unsubscribe is None:
            self._stopped = False
            self._unsubscribe = self._subscribe(self._on_event)

    def stop(self) -> None:
        self._stopped = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            self._log.warn("voicecall stopping: {n} call summary(ies) not published", n=len(tasks))
        if self._delivery is not None:
            self._delivery.stop()

    def _on_event(self, entry: dict) -> None:
        kind = entry.get("type")
        if kind == "call.ended":
            call_id = entry.get("callId")
            task = Deferred.fromCoroutine(self._report(call_id))
            if not task.called:
                self._tasks.add(task)
                task.addBoth(self._done, task)
            task.addErrback(self._report_failed, call_id)
        elif kind == SUMMARY_EVENT and self._delivery is not None:
            self._delivery.send(entry)

    def _done(self, result: Any, task: Deferred) -> Any:
        self._tasks.discard(task)
        return result

    def _report_failed(self, failure: Failure, call_id: str) -> None:
        if failure.check(CancelledError):
            return  # stopping: counted there
        self._log.failure("could not publish the summary of {call_id}", failure, call_id=call_id)

    async def _report(self, call_id: str) -> None:
        # The end is committed (subscribers hear of it once stored); the record is still the one
        # the manager holds, so this reads it as it ended.
        call = await self._get_call(call_id)
        if call is None:
            self._log.warn("no record of ended call {call_id}: no summary", call_id=call_id)
            return
        fields = summary_fields(call)
        if self._summarize is not None:
            summary = await self._summary_of(call)
            if summary:
                fields["summary"] = summary
        if self._stopped:
            raise CancelledError()  # stopping while the summary was being written: counted there
        await self._publish(call_id, SUMMARY_EVENT, **fields)

    async def _summary_of(self, call: CallRecord) -> str | None:
        """The model's summary of the call's transcript, or None (no words, too busy, failed, too slow)."""
        transcript = final_transcript(call)
        if not transcript:
            return None
        if self._summarizing >= self._max_summarizing:
            self._log.warn("{n} summaries being written: {call_id} is reported without one", n=self._summarizing, call_id=call.call_id)
            return None
        self._summarizing += 1
        try:
            asked = self._summarize(transcript)
            asked.addTimeout(self._summary_timeout, self._clock, onTimeoutCancel=_too_slow)
            summary = await asked
        except Exception as e:
            if self._stopped:
                raise CancelledError() from e  # the chat client turns the cancel into its own error
            why = "no answer in time" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"[:200]
            self._log.warn("no summary for {call_id} ({why}): reported without one", call_id=call.call_id, why=why)
            return None
        finally:
            self._summarizing -= 1
        return summary.strip() if isinstance(summary, str) and summary.strip() else None
