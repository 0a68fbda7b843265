"""
Issue 17 on Telnyx: answering-machine detection, keypad tones (sent, and pressed as answers),
transfer, recording (its start, its webhooks after the hang-up, where to download it), and a
message that has played before the next step.

Three tiers: the provider against the fake Telnyx (its REST requests land on the fake, whose
webhooks come back signed and are verified and parsed by the provider); the request shapes
against the official `telnyx` SDK; and the daemon end to end (real reactor, loopback, RPC)
against the fake carrier.
"""
from __future__ import annotations

import base64
import json

import httpx
import telnyx
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.domain.carrier import DialOptions, ProviderError
from voicecall.domain.model import Answer, CallOptions, CallRecord, CallState, Direction, EventType
from voicecall.providers.base import WebhookContext
from voicecall.providers.telnyx import TelnyxProvider, recording_of, recording_source
from voicecall.testing.chaos import Chaos
from voicecall.testing.telnyx import FakeTelnyx, Scenario, Signer

from tests.harness import call_status, eventually, free_port, http_client, serve, start_daemon


NOW = 1_700_000_000
KEY = "KEY_actions_0123456789"
CONNECTION = "conn-17"
API = "http://telnyx.fake"
OURS = "+15005550006"
CALLEE = "+15005550001"
TARGET = "+15005550099"
CALL_ID = "0b9e5c1e-7d7e-4a57-9d55-5d2f5f0c1a11"
WEBHOOK = "https://voice.example.com/voice/webhook"


def ctx(body: bytes, headers: dict) -> WebhookContext:
    return WebhookContext(
        method="POST", path="/voice/webhook", path_and_query="/voice/webhook", query={},
        headers={"content-type": "application/json", **headers}, raw_body=body,
        remote_ip="127.0.0.1", url=WEBHOOK,
    )


class _ProviderCase(SynchronousTestCase):
    """The provider's requests go to the fake Telnyx; the fake's webhooks are signed, verified and parsed."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.signer = Signer.generate()
        self.fake = FakeTelnyx(self.clock, KEY, connection_id=CONNECTION, signer=self.signer)
        self.provider = TelnyxProvider(
            http=StubTreq(self.fake.resource()), clock=self.clock, api_key=KEY,
            connection_id=CONNECTION, public_key=self.signer.public_key, base_url=API,
        )
        self.seen = 0

    def dial(self, scenario: Scenario | None = None, policy: str = "ignore", to: str = CALLEE) -> tuple[CallRecord, object]:
        if scenario is not None:
            self.fake.set_scenario(to, scenario)
        placed = self.successResultOf(self.provider.initiate_call(
            call_id=CALL_ID, from_number=OURS, to_number=to, webhook_url=WEBHOOK,
            options=DialOptions(answering_machine=policy),
        ))
        self.clock.advance(0)
        call = CallRecord(call_id=CALL_ID, provider="telnyx", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
                          from_number=OURS, to_number=to, started_at=NOW * 1000, provider_call_id=placed.provider_call_id)
        return call, self.fake.calls[placed.provider_call_id]

    def events(self, kinds: tuple[str, ...] | None = None) -> list:
        """The events of the webhooks the fake sent since the last look, each verified as received."""
        out = []
        hooks = list(self.fake.webhooks)[self.seen:]
        self.seen += len(hooks)
        for hook in hooks:
            if kinds is not None and hook.event_type not in kinds:
                continue
            request = ctx(hook.body, self.signer.headers(hook.body, int(self.clock.seconds())))
            verdict = self.provider.verify_webhook(request)
            self.assertTrue(verdict.ok, verdict.reason)
            out.extend(self.provider.parse_webhook(request, verdict.request_key).events)
        return out

    def bodies(self, action: str) -> list[dict]:
        return [r.json for r in self.fake.requests if r.path.endswith("/actions/" + action)]


class AnsweringMachineTests(_ProviderCase):
    def test_dial_asks_for_detection(self):
        """leave-message dials with detect_beep (and a greeting followed up to 35 s), hang-up with detect, ignore with none."""
        for policy, mode in (("leave-message", "detect_beep"), ("hang-up", "detect"), ("ignore", None)):
            self.dial(policy=policy)
            body = self.fake.requests[-1].json
            self.assertEqual(body.get("answering_machine_detection"), mode, policy)
            config = body.get("answering_machine_detection_config")
            self.assertEqual(config, {"greeting_total_analysis_time_millis": 35000} if mode == "detect_beep" else None)

    def test_machine_then_beep(self):
        """A machine: its verdict, then, seconds later, its beep (machine_done) as call.machine events."""
        call, fake = self.dial(Scenario(callee="machine", detection_seconds=2, greeting_seconds=7), "leave-message")
        self.clock.advance(2)
        (verdict,) = self.events(("call.machine.detection.ended",))
        self.assertEqual((verdict.type, verdict.answered_by, verdict.machine_done, verdict.call_id), (EventType.MACHINE, "machine", False, CALL_ID))
        self.clock.advance(4.9)
        self.assertEqual(self.events(("call.machine.greeting.ended",)), [])
        self.clock.advance(0.1)
        (beep,) = self.events(("call.machine.greeting.ended",))
        self.assertEqual((beep.answered_by, beep.machine_done), ("machine", True))
        self.assertEqual(fake.beep_at, NOW + 7)

    def test_human_and_fax(self):
        """A person is `human`; a fax is a `machine` to standard detection (it knows no fax)."""
        self.dial(Scenario(callee="person"), "hang-up")
        self.clock.advance(2)
        self.assertEqual([e.answered_by for e in self.events(("call.machine.detection.ended",))], ["human"])
        self.dial(Scenario(callee="fax"), "hang-up")
        self.clock.advance(2)
        self.assertEqual([e.answered_by for e in self.events(("call.machine.detection.ended",))], ["machine"])
        self.clock.advance(30)
        self.assertEqual(self.events(("call.machine.greeting.ended",)), [])  # detect: no greeting events

    def test_results_map(self):
        """Every documented verdict maps onto ANSWERED_BY; premium's beep alone says machine + done."""
        cases = {
            ("call.machine.detection.ended", "not_sure"): ("unknown", False),
            ("call.machine.premium.detection.ended", "human_residence"): ("human", False),
            ("call.machine.premium.detection.ended", "human_business"): ("human", False),
            ("call.machine.premium.detection.ended", "fax_detected"): ("fax", False),
            ("call.machine.premium.detection.ended", "silence"): ("unknown", False),
            ("call.machine.premium.detection.ended", "machine"): ("machine", False),
            ("call.machine.premium.greeting.ended", "beep_detected"): ("machine", True),
            ("call.machine.greeting.ended", "ended"): ("machine", True),
        }
        for (kind, result), expected in cases.items():
            body = json.dumps({"data": {"event_type": kind, "id": f"{kind}-{result}", "payload": {
                "call_control_id": "v3:x", "client_state": base64.b64encode(CALL_ID.encode()).decode(), "result": result}}}).encode()
            (ev,) = self.provider.parse_webhook(ctx(body, {}), "k").events
            self.assertEqual((ev.type, ev.answered_by, ev.machine_done), (EventType.MACHINE, *expected), (kind, result))
        body = json.dumps({"data": {"event_type": "call.machine.greeting.ended", "id": "n", "payload": {
            "call_control_id": "v3:x", "result": "not_sure"}}}).encode()
        self.assertEqual(self.provider.parse_webhook(ctx(body, {}), "k").events, ())


class DtmfTests(_ProviderCase):
    def test_send_dtmf_keeps_the_turn(self):
        """send_dtmf sends the keys (w as Telnyx's pause too) without client_state: the turn's token and transcription stay."""
        call, fake = self.dial()
        self.successResultOf(self.provider.start_listening(call, "turn-1", dtmf=True))
        state = fake.client_state
        self.successResultOf(self.provider.send_dtmf(call, "12w#"))
        (body,) = self.bodies("send_dtmf")
        body.pop("command_id")
        self.assertEqual(body, {"digits": "12w#", "duration_millis": 250})
        self.assertEqual(list(fake.dtmf_sent), [("12w#", 250)])
        self.assertEqual((fake.client_state, fake.transcribing), (state, True))
        self.assertEqual(self.bodies("transcription_stop"), [])

    def test_keys_pressed_answer_the_turn(self):
        """Keys the person presses come back one per webhook, each with the turn's token."""
        call, fake = self.dial(Scenario(presses=["4#"]))
        self.successResultOf(self.provider.start_listening(call, "turn-9", dtmf=True))
        self.clock.advance(0)
        self.clock.advance(1)
        events = self.events(("call.dtmf.received",))
        self.assertEqual([(e.type, e.digits, e.turn_token) for e in events], [(EventType.DTMF, "4", "turn-9"), (EventType.DTMF, "#", "turn-9")])

    def test_ended_call(self):
        """Keys for a call that is over fail with Telnyx's error."""
        call, fake = self.dial()
        fake.hangup_by_callee()
        self.failureResultOf(self.provider.send_dtmf(call, "1"), ProviderError)


class TransferTests(_ProviderCase):
    def test_transfer_dials_the_target(self):
        """Transcription stops, then `transfer` to the target with our number as from; the fake dials and bridges it."""
        call, fake = self.dial()
        self.successResultOf(self.provider.start_listening(call, None))
        self.successResultOf(self.provider.transfer_call(call, TARGET))
        paths = [r.path.rsplit("/", 1)[-1] for r in self.fake.requests]
        self.assertEqual(paths[-2:], ["transcription_stop", "transfer"])
        (body,) = self.bodies("transfer")
        body.pop("command_id")
        self.assertEqual(body, {"to": TARGET, "from": OURS})
        self.clock.advance(0)
        target = fake.transferred_to
        self.assertEqual((target.to, target.from_, target.is_answered), (TARGET, OURS, True))
        self.assertIn("call.bridged", fake.event_types)
        # The new leg's webhooks name no call of ours (no client_state): its own call_control_id.
        legs = {e.call_id for e in self.events() if e.provider_call_id == target.call_control_id}
        self.assertEqual(legs, {target.call_control_id})

    def test_inbound_keeps_telnyx_default_from(self):
        call, fake = self.dial()
        inbound = CallRecord(call_id=CALL_ID, provider="telnyx", direction=Direction.INBOUND, state=CallState.ANSWERED,
                             from_number=CALLEE, to_number=OURS, started_at=0, provider_call_id=call.provider_call_id)
        self.successResultOf(self.provider.transfer_call(inbound, "sip:desk@pbx.example.com"))
        (body,) = self.bodies("transfer")
        self.assertEqual(body["to"], "sip:desk@pbx.example.com")
        self.assertNotIn("from", body)


class RecordingTests(_ProviderCase):
    def test_recording_saved_after_the_hangup(self):
        """record_start (mp3, dual); the hang-up stops it; call.recording.saved comes later with url and duration."""
        call, fake = self.dial(Scenario(recording_delay=3))
        self.assertIsNone(self.successResultOf(self.provider.start_recording(call)))
        (body,) = self.bodies("record_start")
        body.pop("command_id")
        self.assertEqual(body, {"format": "mp3", "channels": "dual"})
        self.clock.advance(12.5)
        fake.hangup_by_callee()
        self.clock.advance(0)
        self.assertEqual([e.type for e in self.events()][-1], EventType.ENDED)
        self.clock.advance(3)
        (saved,) = self.events(("call.recording.saved",))
        (rec,) = fake.recordings
        self.assertEqual((saved.type, saved.call_id), (EventType.RECORDING, CALL_ID))
        self.assertEqual(saved.recording, {
            "id": rec.id, "status": "completed", "url": fake.media_url(rec),
            "durationSeconds": 12.5, "startedAt": NOW * 1000,
        })

    def test_recording_error(self):
        call, fake = self.dial(Scenario(recording_fails=True, recording_delay=1))
        self.successResultOf(self.provider.start_recording(call))
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        self.clock.advance(0)
        self.clock.advance(1)
        (failed,) = self.events(("call.recording.error",))
        self.assertEqual(failed.recording["status"], "failed")
        self.assertTrue(failed.recording["id"])

    def test_documented_payload_without_recording_id(self):
        """The API reference's example has no recording_id: the recording is named after its leg and start (stable on redelivery)."""
        payload = {"call_leg_id": "leg-1", "recording_started_at": "2018-02-02T22:20:27.521992Z",
                   "recording_ended_at": "2018-02-02T22:20:37.021992Z", "channels": "single",
                   "recording_urls": {"mp3": "http://example.com/recording.mp3", "wav": "http://example.com/recording.wav"},
                   "public_recording_urls": {"mp3": "http://example.com/public.mp3"}}
        rec = recording_of("call.recording.saved", payload)
        self.assertEqual(rec, {"id": "leg-1@1517610027521", "status": "completed", "url": "http://example.com/recording.mp3",
                               "startedAt": 1517610027521, "durationSeconds": 9.5})
        self.assertEqual(recording_of("call.recording.saved", payload), rec)
        with self.assertRaises(ValueError):
            recording_source(None, rec, base_url=API, api_key=KEY)

    def test_recording_source(self):
        """The recording is looked up with the API key for a fresh presigned URL, fetched without credentials."""
        call, fake = self.dial(Scenario(recording_delay=1))
        self.successResultOf(self.provider.start_recording(call))
        self.clock.advance(5)
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        self.clock.advance(0)
        self.clock.advance(1)
        (saved,) = self.events(("call.recording.saved",))
        http = StubTreq(self.fake.resource())
        self.clock.advance(601)  # the webhook's URL has expired
        self.assertEqual(self.successResultOf(http.get(saved.recording["url"])).code, 403)
        url, headers = self.successResultOf(recording_source(http, saved.recording, base_url=API + "/", api_key=KEY))
        self.assertEqual(headers, {})
        lookup = self.fake.requests[-1]
        self.assertEqual((lookup.method, lookup.path, lookup.token), ("GET", f"/v2/recordings/{saved.recording['id']}", KEY))
        response = self.successResultOf(http.get(url))
        self.assertEqual((response.code, response.headers.getRawHeaders("content-type")), (200, ["audio/mpeg"]))
        self.assertTrue(self.successResultOf(response.content()).startswith(b"ID3"))
        self.assertEqual(self.successResultOf(http.get(url.split("?")[0] + "?X-Amz-Signature=forged")).code, 403)
        failure = self.failureResultOf(recording_source(http, saved.recording, base_url=API, api_key="wrong"), ProviderError)
        self.assertIn("401", str(failure.value))
        for bad in ("../calls", "a/b", "", None):
            with self.assertRaises(ValueError):
                recording_source(http, {"id": bad}, base_url=API, api_key=KEY)


class SdkShapeTests(_ProviderCase):
    """Our requests have the official SDK's method, path and body (its JSON keys and values)."""

    def sdk(self, act):
        sent = []

        def handler(request):
            sent.append(request)
            return httpx.Response(200, json={"data": {"result": "ok", "call_control_id": "v3:sdk"}})

        client = telnyx.Telnyx(api_key=KEY, base_url="https://api.telnyx.com/v2",
                               http_client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=0)
        act(client)
        (request,) = sent
        return request.method, request.url.path.replace("v3:sdk", "{id}"), json.loads(request.content) if request.content else None

    def ours(self, action: str, control_id: str):
        request = [r for r in self.fake.requests if r.path.endswith(action)][-1]
        body = dict(request.json or {})
        body.pop("command_id", None)
        return request.method, request.path.replace(control_id, "{id}") if control_id else request.path, body

    def test_actions(self):
        call, fake = self.dial()
        pid = call.provider_call_id
        self.successResultOf(self.provider.send_dtmf(call, "1w2"))
        self.assertEqual(self.ours("send_dtmf", pid), self.sdk(lambda c: c.calls.actions.send_dtmf("v3:sdk", digits="1w2", duration_millis=250)))
        self.successResultOf(self.provider.start_recording(call))
        self.assertEqual(self.ours("record_start", pid), self.sdk(lambda c: c.calls.actions.start_recording("v3:sdk", format="mp3", channels="dual")))
        self.successResultOf(self.provider.transfer_call(call, TARGET))
        self.assertEqual(self.ours("transfer", pid), self.sdk(lambda c: c.calls.actions.transfer("v3:sdk", to=TARGET, from_=OURS)))

    def test_dial(self):
        self.dial(policy="leave-message")
        method, path, body = self.ours("/calls", "")
        body.pop("client_state")
        sdk = self.sdk(lambda c: c.calls.dial(
            connection_id=CONNECTION, to=CALLEE, from_=OURS, webhook_url=WEBHOOK, webhook_url_method="POST", timeout_secs=30,
            answering_machine_detection="detect_beep",
            answering_machine_detection_config={"greeting_total_analysis_time_millis": 35000},
        ))
        self.assertEqual((method, path, body), sdk)

    def test_recording_lookup(self):
        sent = []

        def handler(request):
            sent.append(request)
            return httpx.Response(200, json={"data": {"id": "r-1"}})

        client = telnyx.Telnyx(api_key=KEY, base_url="https://api.telnyx.com/v2",
                               http_client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=0)
        client.recordings.retrieve("0f1e2d3c-aaaa-bbbb-cccc-000000000001")
        stub = StubTreq(self.fake.resource())
        self.failureResultOf(recording_source(stub, {"id": "0f1e2d3c-aaaa-bbbb-cccc-000000000001"}, base_url=API, api_key=KEY), ProviderError)
        ours = self.fake.requests[-1]
        self.assertEqual((ours.method, ours.path, ours.header("authorization")),
                         (sent[0].method, sent[0].url.path, sent[0].headers["authorization"]))


class TelnyxActionsEndToEndTests(TestCase):
    """The daemon (in process, real reactor, loopback HTTP) against the fake Telnyx, each webhook delivered twice."""

    timeout = 60
    MESSAGE = "Your parcel arrives today"

    async def start(self, scenario: Scenario, **overrides):
        self.http = http_client(self)
        chaos = Chaos(duplicate=1.0, retry_after=0.2)
        self.fake = FakeTelnyx(reactor, KEY, self.http, connection_id=CONNECTION, scenario=scenario, chaos=chaos)
        base = await serve(self, self.fake.resource())
        port = free_port()
        config = {
            "provider": "telnyx",
            "fromNumber": OURS,
            "telnyx": {"apiKey": KEY, "connectionId": CONNECTION, "publicKey": self.fake.public_key, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "transcriptTimeoutMs": 20000,
            "outbound": {"notifyHangupDelaySec": 1},
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.manager = self.service.manager
        self.addCleanup(self.hang_up_fake_calls)

    async def hang_up_fake_calls(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.close()

    def fake_call(self, to=CALLEE):
        (call,) = [c for c in self.fake.calls.values() if c.to == to]
        return call

    async def ended(self, call_id: str) -> dict:
        async def over():
            record = await call_status(self.rpc, call_id)
            return record if record["state"] in ("completed", "hangup-bot", "hangup-user", "voicemail", "transferred", "failed") else None
        return await eventually(over, 15, f"the end of {call_id}")

    def dial_body(self):
        return next(r.json for r in self.fake.requests if r.path == "/v2/calls")

    async def test_machine_leave_message(self):
        """A machine answers a notify call: the message is spoken after its beep, then the call hangs up (voicemail)."""
        await self.start(Scenario(callee="machine", detection_seconds=0.3, greeting_seconds=1.5))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="leave-message"))
        record = await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(self.dial_body()["answering_machine_detection"], "detect_beep")
        self.assertEqual(call.speak_texts, [self.MESSAGE])
        self.assertGreaterEqual(call.speaks[0].at, call.beep_at)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        await eventually(lambda: not call.is_alive, 5, "the hang-up at Telnyx")

    async def test_machine_hang_up(self):
        """With hang-up, a machine is hung up on without a word (voicemail)."""
        await self.start(Scenario(callee="machine", detection_seconds=0.3, greeting_seconds=1.5))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="hang-up"))
        record = await self.ended(call_id)
        call = self.fake_call()
        await eventually(lambda: not call.is_alive, 5, "the hang-up at Telnyx")
        self.assertEqual(self.dial_body()["answering_machine_detection"], "detect")
        self.assertEqual((call.speak_texts, call.hangup_source), ([], "caller"))
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))

    async def test_human_answer(self):
        """A person answers: the message is spoken once detection says human, and the call goes on as usual."""
        await self.start(Scenario(callee="person", detection_seconds=0.3))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="leave-message"))
        record = await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(call.speak_texts, [self.MESSAGE])
        self.assertGreaterEqual(call.speaks[0].at, call.answered_at + 0.3)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("hangup-bot", "human"))

    async def conversation(self, scenario: Scenario, **overrides) -> tuple[str, object]:
        await self.start(scenario, **overrides)
        call_id = await self.manager.initiate(CALLEE, "Hi there", "conversation")
        call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the dial")
        await eventually(lambda: call.transcribing, 10, "transcription after the greeting")
        return call_id, call

    async def test_dtmf_while_a_continue_waits(self):
        """Keys sent while a continue waits for its answer: the continue still gets the person's words."""
        def person(call):
            return "It's Alice" if call.last_speak == "Who is this?" else None

        call_id, call = await self.conversation(Scenario(utterances=person, speech_delay=1.5))
        asked = Deferred.fromCoroutine(self.manager.continue_turn(call_id, "Who is this?"))
        # The greeting's transcription, then the turn's (stopped and started again with its token).
        await eventually(lambda: len(call.transcription_starts) == 2 and call.transcribing, 5, "the turn's transcription")
        starts = len(call.transcription_starts)
        await self.manager.send_dtmf(call_id, "1w2")
        self.assertEqual(list(call.dtmf_sent), [("1w2", 250)])
        answer = await asked
        self.assertEqual(answer, Answer("It's Alice", "speech"))
        self.assertEqual(len(call.transcription_starts), starts)
        record = await call_status(self.rpc, call_id)
        self.assertIn(("bot", "[dtmf] 1w2"), [(t["speaker"], t["text"]) for t in record["transcript"]])

    async def test_keys_answer_a_continue(self):
        """A continue listening for speech or keys is answered by the key the person presses."""
        def keys(call):
            return "7" if call.last_speak == "Press 7 to confirm?" else None

        call_id, call = await self.conversation(Scenario(presses=keys))
        answer = await self.manager.continue_turn(call_id, "Press 7 to confirm?", input="speech dtmf")
        self.assertEqual(answer, Answer("7", "dtmf"))
        record = await call_status(self.rpc, call_id)
        self.assertIn(("user", "[dtmf] 7"), [(t["speaker"], t["text"]) for t in record["transcript"]])

    async def test_transfer(self):
        """Transfer says its message (played), then Telnyx dials the target; the record is transferred."""
        message = "Connecting you now"
        call_id, call = await self.conversation(Scenario(say_seconds_per_char=0.02), transfer={"allowTo": [TARGET]})
        await self.manager.transfer(call_id, TARGET, message=message)
        record = await call_status(self.rpc, call_id)
        self.assertEqual((record["state"], record["transferTarget"]), ("transferred", TARGET))
        target = await eventually(lambda: call.transferred_to, 5, "the target's leg")
        self.assertEqual((target.to, target.from_), (TARGET, OURS))
        spoken = next(s for s in call.speaks if s.text == message)
        self.assertGreaterEqual(target.created_at, spoken.at + len(message) * 0.02 - 0.001)
        await eventually(lambda: target.is_answered and "call.bridged" in call.event_types, 5, "the bridge")
        self.assertFalse(call.transcribing)

    async def test_recording(self):
        """The announcement plays before recording starts; the recording saved after the hang-up shows in status."""
        await self.start(Scenario(say_seconds_per_char=0.02, recording_delay=0.5),
                         recording={"enabled": True, "announcement": "This call is recorded."})
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify")
        await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(call.speak_texts[0], "This call is recorded.")
        (recording,) = call.recordings
        self.assertGreaterEqual(recording.started_at, call.speaks[0].at + len("This call is recorded.") * 0.02 - 0.001)

        async def saved():
            record = await call_status(self.rpc, call_id)
            return [r for r in record.get("recordings", []) if r.get("status") == "completed"]

        (shown,) = await eventually(saved, 10, "the recording saved after the hang-up")
        self.assertEqual(shown["id"], recording.id)
        self.assertEqual(shown["url"], call.media_url(recording))
        self.assertLess(abs(shown["durationSeconds"] - (call.ended_at - recording.started_at)), 0.01)

    async def test_end_with_message(self):
        """end with a message hangs up only once the message has played."""
        message = "Goodbye, and thank you"
        call_id, call = await self.conversation(Scenario(say_seconds_per_char=0.03))
        await self.manager.end_call(call_id, message=message)
        await eventually(lambda: not call.is_alive, 5, "the hang-up at Telnyx")
        spoken = next(s for s in call.speaks if s.text == message)
        self.assertGreaterEqual(call.ended_at, spoken.at + len(message) * 0.03 - 0.001)
        self.assertEqual(call.hangup_source, "caller")


class StandaloneFlagsTests(SynchronousTestCase):
    def test_callee_flags(self):
        """`--machine --greeting-seconds 8 --no-beep --press 1 --press ""` reach the fake's scenario."""
        from voicecall.testing import telnyx as standalone

        args = standalone._parse(["--api-key", KEY, "--machine", "--greeting-seconds", "8", "--no-beep", "--press", "1", "--press", "",
                                  "--detection-seconds", "1.5", "--recording-delay", "4"])
        fake = standalone._build(args)(Clock(), None)
        sc = fake.scenario
        self.assertEqual((sc.callee, sc.greeting_seconds, sc.beep, sc.presses, sc.detection_seconds, sc.recording_delay),
                         ("machine", 8.0, False, ("1", None), 1.5, 4.0))
        self.assertEqual(standalone._build(standalone._parse(["--api-key", KEY, "--fax"]))(Clock(), None).scenario.callee, "fax")
