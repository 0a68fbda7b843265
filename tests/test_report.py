"""
The report after the call (issue 17 item 7): the summary of an ended call (domain/summary.py),
its signed delivery to `report.url` with retries (control/report.py), the Reporter on a stand-in
manager, the config's refusals, and a real daemon on the mock provider posting a real report to
the fake receiver (voicecall/testing/report.py) with an LLM summary from the fake chat API.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from voicecall.client import connect
from voicecall.config import ConfigError, parse_config
from voicecall.control.report import ReportDelivery, Reporter
from voicecall.domain.model import CallRecord, TranscriptEntry
from voicecall.domain.summary import MAX_TRANSCRIPT_ENTRIES, summary_fields
from voicecall.speech.responder import ChatResponder
from voicecall.testing.chat import FakeChatCompletions
from voicecall.testing.report import FakeReportReceiver

from tests.harness import event, eventually, free_port, http_client, serve, start_daemon, workdir

SECRET = "s3cret-report-key"
URL = "http://reports.example/hooks/voicecall?token=abc"
EPOCH = 1_700_000_000


def ended_call(**changes) -> CallRecord:
    """A conversation call answered at EPOCH+2 s and ended 63.4 s later, with a transcript and a recording."""
    call = CallRecord(
        call_id="c-1",
        provider="mock",
        direction="outbound",
        state="transferred",
        from_number="+15550000000",
        to_number="+15550001234",
        started_at=EPOCH * 1000,
        answered_at=EPOCH * 1000 + 2000,
        ended_at=EPOCH * 1000 + 65_400,
        end_reason="transferred",
        transcript=[
            TranscriptEntry(EPOCH * 1000 + 2100, "bot", "Hello, this is the clinic."),
            TranscriptEntry(EPOCH * 1000 + 5000, "user", "I'd like to move my appointment", is_final=False),
            TranscriptEntry(EPOCH * 1000 + 5200, "user", "I'd like to move my appointment to Friday."),
        ],
        metadata={
            "mode": "conversation",
            "answeredBy": "human",
            "transferTarget": "+15550009999",
            "recordings": [{"id": "rec-1", "status": "in-progress", "startedAt": EPOCH * 1000 + 3000}],
        },
    )
    for name, value in changes.items():
        setattr(call, name, value)
    return call


def logged(testcase) -> list[str]:
    """Every log event emitted from now on, formatted (restored at cleanup)."""
    lines: list[str] = []

    def observe(e):
        lines.append((formatEvent(e) or "") + " " + repr(e))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def independent_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The README's recipe, written out here: sha256= + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


class SummaryTests(SynchronousTestCase):
    """summary_fields: what a call.summary says about an ended call."""

    def test_fields(self):
        """An answered, transferred call: outcome, times, duration answered->ended, who answered, target, recordings and the final transcript."""
        self.assertEqual(
            summary_fields(ended_call()),
            {
                "outcome": "transferred",
                "direction": "outbound",
                "from": "+15550000000",
                "to": "+15550001234",
                "startedAt": EPOCH * 1000,
                "answeredAt": EPOCH * 1000 + 2000,
                "endedAt": EPOCH * 1000 + 65_400,
                "durationSeconds": 63,
                "answeredBy": "human",
                "transferTarget": "+15550009999",
                "recordings": [{"id": "rec-1", "status": "in-progress"}],
                "transcript": [
                    {"speaker": "bot", "text": "Hello, this is the clinic.", "timestamp": EPOCH * 1000 + 2100},
                    {"speaker": "user", "text": "I'd like to move my appointment to Friday.", "timestamp": EPOCH * 1000 + 5200},
                ],
            },
        )

    def test_never_answered(self):
        """A call nobody answered lasted 0 seconds, and says so with null answer fields."""
        call = ended_call(answered_at=None, end_reason="no-answer", state="no-answer", transcript=[], metadata={})
        fields = summary_fields(call)
        self.assertEqual(
            {k: fields[k] for k in ("outcome", "answeredAt", "durationSeconds", "answeredBy", "transferTarget", "recordings", "transcript")},
            {"outcome": "no-answer", "answeredAt": None, "durationSeconds": 0, "answeredBy": None, "transferTarget": None, "recordings": [], "transcript": []},
        )

    def test_transcript_is_bounded(self):
        """A very long transcript keeps its last MAX_TRANSCRIPT_ENTRIES entries and counts the others."""
        entries = [TranscriptEntry(EPOCH * 1000 + n, "user", f"line {n}") for n in range(MAX_TRANSCRIPT_ENTRIES + 7)]
        fields = summary_fields(ended_call(transcript=entries))
        self.assertEqual(len(fields["transcript"]), MAX_TRANSCRIPT_ENTRIES)
        self.assertEqual(fields["transcript"][0]["text"], "line 7")
        self.assertEqual(fields["transcriptOmitted"], 7)


    def test_transcript_text_is_bounded(self):
        """Long utterances: only the newest entries whose text fits in MAX_TRANSCRIPT_CHARS are kept."""
        entries = [TranscriptEntry(EPOCH * 1000 + n, "bot", str(n) * 30_000) for n in range(10)]
        fields = summary_fields(ended_call(transcript=entries))
        self.assertEqual([t["text"][0] for t in fields["transcript"]], ["4", "5", "6", "7", "8", "9"])
        self.assertEqual(fields["transcriptOmitted"], 4)


class DeliveryTests(SynchronousTestCase):
    """ReportDelivery against the fake receiver through StubTreq, on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.receiver = FakeReportReceiver(secret=SECRET, clock=self.clock)
        self.stub = StubTreq(self.receiver.resource())
        self.log = logged(self)

    def delivery(self, **kwargs) -> ReportDelivery:
        return ReportDelivery(http=self.stub, clock=self.clock, url=URL, secret=SECRET, **kwargs)

    def flush(self):
        self.stub.flush()

    def test_signed_json(self):
        """The body is the entry's JSON, signed over timestamp + "." + body with the secret (checked with an independent HMAC)."""
        delivery = self.delivery()
        entry = {"type": "call.summary", "callId": "c-1", "at": 5, "summary": "Café booked."}
        delivery.send(entry)
        self.flush()
        [(timestamp, signature, body, status)] = self.receiver.requests
        self.assertEqual(status, 204)
        self.assertEqual(timestamp, str(EPOCH))
        self.assertEqual(signature, independent_signature(SECRET, timestamp, body))
        self.assertEqual(json.loads(body), entry)
        self.assertEqual(list(self.receiver.received), [entry])
        self.assertEqual((delivery.pending, delivery.counts["delivered"]), (0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_500_retried_with_backoff(self):
        """Two 500s: retried after 1 s then 2 s, each attempt signed afresh; then delivered. The secret is never logged."""
        self.receiver.fail_next(500, count=2)
        delivery = self.delivery()
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        self.flush()
        self.assertEqual([r[3] for r in self.receiver.requests], [500])
        self.clock.advance(0.999)
        self.flush()
        self.assertEqual(len(self.receiver.requests), 1)
        self.clock.advance(0.001)
        self.flush()
        self.assertEqual([r[3] for r in self.receiver.requests], [500, 500])
        self.clock.advance(2)
        self.flush()
        self.assertEqual([r[3] for r in self.receiver.requests], [500, 500, 204])
        self.assertEqual([r[0] for r in self.receiver.requests], [str(EPOCH), str(EPOCH + 1), str(EPOCH + 3)])
        self.assertEqual(len(self.receiver.received), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("retrying in 1s" in line for line in self.log), self.log)
        self.assertFalse([line for line in self.log if SECRET in line or "token=abc" in line])

    def test_400_not_retried(self):
        """A 400 is the receiver's final word: one attempt, nothing scheduled, a warning."""
        self.receiver.fail_next(400)
        delivery = self.delivery()
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        self.flush()
        self.clock.advance(700)
        self.flush()
        self.assertEqual([r[3] for r in self.receiver.requests], [400])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((delivery.pending, delivery.counts["refused"]), (0, 1))
        self.assertTrue(any("refused by http://reports.example: HTTP 400 (not retried)" in line for line in self.log), self.log)

    def test_429_honours_retry_after(self):
        """A 429 is retried, no sooner than its Retry-After."""
        self.receiver.fail_next(429, retry_after="7")
        self.delivery().send({"type": "call.summary", "callId": "c-1", "at": 5})
        self.flush()
        self.clock.advance(6.9)
        self.flush()
        self.assertEqual(len(self.receiver.requests), 1)
        self.clock.advance(0.1)
        self.flush()
        self.assertEqual([r[3] for r in self.receiver.requests], [429, 204])

    def test_gives_up_after_ten_minutes(self):
        """A receiver failing 503 for ever is tried with doubling delays for at most 600 s, then given up with a warning."""
        self.receiver.fail_next(503, count=1000)
        delivery = self.delivery(max_delay=120.0, give_up_after=600.0)
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        self.flush()
        for _ in range(700):
            self.clock.advance(1)
            self.flush()
        times = [int(r[0]) - EPOCH for r in self.receiver.requests]
        self.assertEqual(times, [0, 1, 3, 7, 15, 31, 63, 127, 247, 367, 487])
        self.assertEqual((delivery.pending, delivery.counts["gaveUp"]), (0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("after 11 attempts" in line and "given up" in line for line in self.log), self.log)

    def test_timeout_retried(self):
        """A receiver that does not answer within the time limit is retried."""
        self.receiver.stall_next()
        delivery = self.delivery(timeout=10.0)
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        self.flush()
        self.clock.advance(10)
        self.flush()
        self.assertTrue(any("no answer in time" in line for line in self.log), self.log)
        self.clock.advance(1)
        self.flush()
        self.assertEqual(len(self.receiver.received), 1)
        self.receiver.release()

    def test_queue_is_bounded(self):
        """Past max_pending waiting reports, the oldest is dropped with a warning naming its call."""
        self.receiver.fail_next(500, count=10)
        delivery = self.delivery(max_pending=2)
        for n in range(3):
            delivery.send({"type": "call.summary", "callId": f"c-{n}", "at": 5})
        self.flush()
        self.assertEqual((delivery.pending, delivery.counts["dropped"]), (2, 1))
        self.assertTrue(any("dropped the report of c-0" in line for line in self.log), self.log)
        delivery.stop()

    def test_stop_cancels_retries(self):
        """Stopping cancels the pending retries (nothing left on the clock) and says which reports were not delivered."""
        self.receiver.fail_next(500)
        delivery = self.delivery()
        delivery.send({"type": "call.summary", "callId": "c-9", "at": 5})
        self.flush()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        delivery.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("1 report(s) not delivered to http://reports.example (c-9)" in line for line in self.log), self.log)
        delivery.send({"type": "call.summary", "callId": "c-10", "at": 6})
        self.flush()
        self.assertEqual(len(self.receiver.requests), 1)


class LoopbackDeliveryTests(TestCase):
    """ReportDelivery over real loopback connections (timers still on a Clock)."""

    async def test_signed_post_on_loopback(self):
        """The fake receiver on loopback gets the report; its headers check out with an independent HMAC."""
        receiver = FakeReportReceiver(secret=SECRET, clock=reactor)
        url = await serve(self, receiver.resource())
        clock = Clock()
        clock.advance(reactor.seconds())
        delivery = ReportDelivery(http=http_client(self), clock=clock, url=url, secret=SECRET)
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        await eventually(lambda: receiver.received, 5, "the report")
        [(timestamp, signature, body, status)] = receiver.requests
        self.assertEqual(signature, independent_signature(SECRET, timestamp, body))
        self.assertEqual(status, 204)

    async def test_connection_refused_retried(self):
        """A receiver not listening yet: the connection error schedules a retry, which reaches it once it listens."""
        port = free_port()
        clock = Clock()
        delivery = ReportDelivery(http=http_client(self), clock=clock, url=f"http://127.0.0.1:{port}/r", secret=SECRET)
        delivery.send({"type": "call.summary", "callId": "c-1", "at": 5})
        await eventually(lambda: delivery.counts and [c for c in clock.getDelayedCalls() if c.getTime() == 1.0], 5, "a retry 1 s after the refused connection")
        receiver = FakeReportReceiver(secret=SECRET)
        site = Site(receiver.resource())
        site.noisy = False
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        clock.advance(1)
        await eventually(lambda: receiver.received, 5, "the retried report")
        self.assertEqual(delivery.counts["delivered"], 1)


class StubManager:
    """The manager API the Reporter uses: subscribe, publish (stores then tells subscribers), get_call."""

    def __init__(self, clock, calls):
        self.clock = clock
        self.calls = calls
        self.listeners = []
        self.published = []

    def subscribe(self, listener):
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def emit(self, entry):
        for listener in list(self.listeners):
            listener(entry)

    async def get_call(self, call_id):
        return self.calls.get(call_id)

    async def publish(self, call_id, kind, **fields):
        entry = {"type": kind, "callId": call_id, "at": int(self.clock.seconds() * 1000), **fields}
        self.published.append(entry)
        self.emit(entry)


class ReporterTests(SynchronousTestCase):
    """The Reporter on a stand-in manager: a call.ended becomes a published call.summary, which is delivered."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(EPOCH + 70)
        self.manager = StubManager(self.clock, {"c-1": ended_call()})
        self.receiver = FakeReportReceiver(secret=SECRET, clock=self.clock)
        self.stub = StubTreq(self.receiver.resource())
        self.log = logged(self)

    def reporter(self, summarize=None, **kwargs) -> Reporter:
        delivery = ReportDelivery(http=self.stub, clock=self.clock, url=URL, secret=SECRET)
        reporter = Reporter(
            clock=self.clock,
            subscribe=self.manager.subscribe,
            publish=self.manager.publish,
            get_call=self.manager.get_call,
            delivery=delivery,
            summarize=summarize,
            **kwargs,
        )
        reporter.start()
        self.addCleanup(reporter.stop)
        return reporter

    def end(self):
        self.manager.emit({"type": "call.ended", "callId": "c-1", "at": 1, "reason": "transferred"})
        self.stub.flush()

    def test_summary_published_and_delivered(self):
        """The end's summary is published as call.summary, and exactly that entry is POSTed; other events are ignored."""
        self.reporter()
        self.manager.emit({"type": "call.state", "callId": "c-1", "at": 1, "state": "active"})
        self.end()
        [entry] = self.manager.published
        self.assertEqual(entry, {"type": "call.summary", "callId": "c-1", "at": (EPOCH + 70) * 1000, **summary_fields(ended_call())})
        self.assertNotIn("summary", entry)
        self.assertEqual(list(self.receiver.received), [entry])

    def chat(self, reply=lambda body: "The caller moved the appointment to Friday."):
        fake = FakeChatCompletions(api_key="sk-chat", reply=reply)
        chat = ChatResponder(http=StubTreq(fake.resource()), base_url="http://chat.example/v1", api_key="sk-chat", model="openai/gpt-4o-mini", clock=self.clock)
        return fake, chat

    def test_llm_summary(self):
        """With summarize, the fake chat API is asked with the final transcript and its answer is the summary field."""
        fake, chat = self.chat()
        self.reporter(summarize=chat.summarize)
        self.end()
        [entry] = self.manager.published
        self.assertEqual(entry["summary"], "The caller moved the appointment to Friday.")
        [asked] = fake.requests
        self.assertEqual(asked["model"], "gpt-4o-mini")
        self.assertEqual(asked["messages"][1]["content"], "Assistant: Hello, this is the clinic.\nCaller: I'd like to move my appointment to Friday.")
        self.assertEqual(self.receiver.received[0]["summary"], entry["summary"])

    def test_llm_failure(self):
        """A failing chat API: the summary is published without `summary`, and a line says why."""
        fake, chat = self.chat()
        fake.fail_next(500)
        self.reporter(summarize=chat.summarize)
        self.end()
        [entry] = self.manager.published
        self.assertNotIn("summary", entry)
        self.assertTrue(any("no summary for c-1" in line and "500" in line for line in self.log), self.log)

    def test_llm_too_slow(self):
        """A chat API slower than the summary's time limit: published without `summary` at the limit."""
        fake, chat = self.chat(reply=lambda body: Deferred())
        self.reporter(summarize=chat.summarize, summary_timeout=5.0)
        self.end()
        self.assertEqual(self.manager.published, [])
        self.clock.advance(5)
        self.stub.flush()
        [entry] = self.manager.published
        self.assertNotIn("summary", entry)
        self.assertTrue(any("no summary for c-1 (no answer in time)" in line for line in self.log), self.log)

    def test_stop(self):
        """After stop, an end publishes nothing; a summary still being written is cancelled."""
        fake, chat = self.chat(reply=lambda body: Deferred())
        reporter = self.reporter(summarize=chat.summarize)
        self.end()
        reporter.stop()
        self.assertTrue(any("1 call summary(ies) not published" in line for line in self.log), self.log)
        self.end()
        self.clock.advance(60)
        self.assertEqual(self.manager.published, [])
        self.assertEqual(self.manager.listeners, [])


class ConfigTests(SynchronousTestCase):
    """The config refuses a report setup that cannot work."""

    def problems(self, raw, env=None) -> list[str]:
        try:
            parse_config(raw, env or {})
        except ConfigError as e:
            return list(e.lines())
        return []

    def test_url_needs_secret(self):
        """report.url without report.secret is refused, naming the key and its env fallback."""
        lines = self.problems({"provider": "mock", "report": {"url": "https://example.com/r"}})
        self.assertTrue(any("report.secret is required when report.url is set (or set VOICECALL_REPORT_SECRET env)" in line for line in lines), lines)
        self.assertEqual(self.problems({"provider": "mock", "report": {"url": "https://example.com/r"}}, {"VOICECALL_REPORT_SECRET": "x"}), [])

    def test_summarize_needs_responder(self):
        """report.summarize without the built-in responder's key is refused."""
        lines = self.problems({"provider": "mock", "report": {"summarize": True}})
        self.assertTrue(any("report.summarize needs the built-in responder" in line for line in lines), lines)
        self.assertEqual(self.problems({"provider": "mock", "report": {"summarize": True}}, {"OPENAI_API_KEY": "sk"}), [])


class DaemonReportTests(TestCase):
    """A real daemon on the mock provider reports a call the carrier ended."""

    timeout = 30

    async def test_daemon_posts_report(self):
        """Ended through the mock's webhook, a call's summary reaches an RPC subscriber and the receiver, signed, with the LLM summary."""
        receiver = FakeReportReceiver(secret=SECRET, clock=reactor)
        report_url = await serve(self, receiver.resource())
        def reply(body):
            asked_for_summary = "summarise" in body["messages"][0]["content"]
            return "A short call about a table." if asked_for_summary else '{"spoken": "See you soon."}'

        chat = FakeChatCompletions(api_key="sk-chat", reply=reply)
        chat_url = await serve(self, chat.resource())
        directory = workdir(self)
        service, rpc = await start_daemon(
            self,
            {
                "provider": "mock",
                "report": {"url": report_url + "/reports", "secret": SECRET, "summarize": True},
                "responseApiKey": "sk-chat",
                "responseBaseUrl": chat_url + "/v1",
            },
            directory,
        )
        seen = []
        watcher = await connect(reactor, f"{directory}/rpc.sock", on_notification=lambda method, entry: seen.append(entry))
        self.addCleanup(watcher.transport.loseConnection)
        await watcher.call("voicecall.subscribe", {})
        call_id = (await rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Your table is ready", "mode": "conversation"}))["callId"]
        web = http_client(self)

        async def post(body):
            answer = await web.post(service.webhook_url, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            await answer.content()
            self.assertEqual(answer.code, 200)

        await post(event("call.answered", call_id))
        await post({"event": {"type": "call.speech", "callId": call_id, "transcript": "Thanks, on my way", "isFinal": True}})
        said = lambda: [t["text"] for t in service.manager.find(call_id).to_json()["transcript"]]  # noqa: E731
        await eventually(lambda: "See you soon." in said(), 10, "the built-in responder's reply")
        await post(event("call.ended", call_id, reason="hangup-user"))
        await eventually(lambda: receiver.received, 10, "the report")
        [report] = receiver.received
        [(timestamp, signature, body, _)] = receiver.requests
        self.assertEqual(signature, independent_signature(SECRET, timestamp, body))
        self.assertEqual(
            {k: report[k] for k in ("type", "callId", "outcome", "direction", "to", "answeredBy", "summary")},
            {"type": "call.summary", "callId": call_id, "outcome": "hangup-user", "direction": "outbound", "to": "+15550001234", "answeredBy": None, "summary": "A short call about a table."},
        )
        self.assertIn(("user", "Thanks, on my way"), [(t["speaker"], t["text"]) for t in report["transcript"]])
        summaries = await eventually(lambda: [e for e in seen if e.get("type") == "call.summary"], 5, "the subscriber's call.summary")
        self.assertEqual(summaries, [report])

    async def test_daemon_stop_cancels_retries(self):
        """A report the receiver keeps failing is still being retried when the daemon stops: its retry is cancelled (nothing left on the reactor) and logged."""
        receiver = FakeReportReceiver(secret=SECRET, clock=reactor)
        receiver.fail_next(503, count=100)
        report_url = await serve(self, receiver.resource())
        service, rpc = await start_daemon(self, {"provider": "mock", "report": {"url": report_url, "secret": SECRET}})
        log = logged(self)
        call_id = (await rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hi", "mode": "conversation"}))["callId"]
        answer = await http_client(self).post(service.webhook_url, json.dumps(event("call.ended", call_id, reason="no-answer")).encode())
        await answer.content()
        await eventually(lambda: any("retrying in" in line for line in log), 10, "the first failed attempt")
        await service.stopService()
        self.assertTrue(any(f"1 report(s) not delivered to {report_url} ({call_id})" in line for line in log), log)

