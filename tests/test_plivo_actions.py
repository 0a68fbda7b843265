"""
Issue 17 on Plivo: answering-machine detection (and waiting for a machine's beep), keypad tones
(sent, and pressed as answers), transfer, recording (its start, its callback after the hang-up,
where to download it), and a message that has played before the next step.

Three tiers: the provider against the fake Plivo on one Clock (the provider's REST requests land
on the fake, whose callbacks come back V3-signed and are verified and parsed by the provider, as
the webhook does); the request shapes against the official `plivo` SDK; and the daemon end to end
(real reactor, loopback, RPC) against the fake carrier.
"""
from __future__ import annotations

import base64
from urllib.parse import parse_qsl, urlsplit

import plivo
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from voicecall.domain.carrier import DialOptions, ProviderError
from voicecall.domain.model import Answer, CallOptions, CallRecord, CallState, Direction, EventType
from voicecall.providers.base import WebhookContext
from voicecall.providers.plivo import PlivoProvider, recording_source
from voicecall.testing.chaos import Chaos
from voicecall.testing.plivo import FakePlivo, Scenario, signature_headers

from tests.harness import call_status, eventually, free_port, http_client, serve, start_daemon


NOW = 1_700_000_000
AUTH_ID = "MAACTIONS17XXXXXXXXX"
TOKEN = "plivo-actions-token-0123456789"
API = "http://plivo.fake"
OURS = "+15005550006"
CALLEE = "+15005550001"
TARGET = "+15005550099"
CALL_ID = "0b9e5c1e-7d7e-4a57-9d55-5d2f5f0c1a17"
PUBLIC = "https://voice.example.com"
WEBHOOK = PUBLIC + "/voice/webhook"


class _Daemon(Resource):
    """The daemon's webhook, reduced to the provider: verify, parse, keep the events, answer."""

    isLeaf = True

    def __init__(self, case: _ProviderCase) -> None:
        super().__init__()
        self.case = case

    def render(self, request):
        case = self.case
        raw = request.content.read()
        query = {k.decode(): v[0].decode() for k, v in request.args.items()} if request.method == b"GET" else {
            k: v for k, v in parse_qsl(urlsplit(request.uri.decode()).query, keep_blank_values=True)
        }
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        ctx = WebhookContext(
            method=request.method.decode(), path=request.path.decode(), path_and_query=request.uri.decode(),
            query=query, headers=headers, raw_body=raw, remote_ip="127.0.0.1", url=PUBLIC + request.uri.decode(),
        )
        verdict = case.provider.verify_webhook(ctx)
        case.assertTrue(verdict.ok, verdict.reason)
        parsed = case.provider.parse_webhook(ctx, verdict.request_key)
        for event in parsed.events:
            if event.key in case.applied:
                continue  # a redelivery: the manager applies an event once
            case.applied.add(event.key)
            case.seen.append(event)
            if event.on_applied is not None:
                event.on_applied()
        response = parsed.response
        request.setResponseCode(response.status)
        for name, value in (response.headers or {}).items():
            request.setHeader(name, value)
        return response.body


class _ProviderCase(SynchronousTestCase):
    """The provider's requests go to the fake Plivo; the fake's callbacks come back to the provider."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.seen: list = []
        self.applied: set = set()
        self.to_daemon = StubTreq(_Daemon(self))
        self.fake = FakePlivo(self.clock, AUTH_ID, TOKEN, self.to_daemon, scenario=Scenario(answer_after=0.5))
        self.api = StubTreq(self.fake.resource())
        self.provider = PlivoProvider(
            http=self.api, clock=self.clock, auth_id=AUTH_ID, auth_token=TOKEN, base_url=API, public_url=PUBLIC,
        )

    def pump(self) -> None:
        for _ in range(6):
            self.api.flush()
            self.to_daemon.flush()
            self.clock.advance(0)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.clock.seconds() + seconds
        self.pump()
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.pump()

    def result(self, d):
        self.pump()
        return self.successResultOf(d)

    def dial(self, scenario: Scenario | None = None, policy: str = "ignore") -> tuple[CallRecord, object]:
        if scenario is not None:
            self.fake.set_scenario(CALLEE, scenario)
        placed = self.result(self.provider.initiate_call(
            call_id=CALL_ID, from_number=OURS, to_number=CALLEE, webhook_url=WEBHOOK,
            options=DialOptions(answering_machine=policy),
        ))
        self.advance(1.0)  # rung, answered, the answer XML fetched
        call = self.fake.call_by_request(placed.provider_call_id)
        record = CallRecord(
            call_id=CALL_ID, provider="plivo", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
            from_number=OURS, to_number=CALLEE, started_at=NOW * 1000, provider_call_id=placed.provider_call_id,
        )
        return record, call

    def events(self, kind: EventType) -> list:
        return [e for e in self.seen if e.type is kind]

    def requests(self, suffix: str) -> list:
        return [r for r in self.fake.requests if r.method == "POST" and r.path.endswith(suffix)]


def _sdk(call) -> tuple[str, str, dict]:
    """(method, path, body) of the request the official Plivo SDK sends for `call(client)`."""
    seen: dict = {}
    client = plivo.RestClient(AUTH_ID, TOKEN)

    def send(method, path, data=None, **kw):
        seen.update(method=method, path="/".join(("", "v1", "Account", AUTH_ID) + tuple(path)) + "/", data=data)
        return {"api_id": "x", "message": "ok", "request_uuid": "r", "url": "u", "recording_id": "i"}

    client.request = lambda method, path, data=None, **kw: send(method, path, data)
    call(client)
    data = dict(seen["data"])
    data.pop("call_uuid", None)  # the SDK repeats the path's uuid in the body (its to_param_dict)
    return seen["method"], seen["path"], data


class AnsweringMachineTests(_ProviderCase):
    def test_dial_asks_for_async_detection(self):
        """A policy asks for machine_detection=true with a signed detection URL; "ignore" for none."""
        self.dial(policy="leave-message")
        (create,) = self.requests("/Call/")
        url = create.get("machine_detection_url")
        self.assertEqual(url, WEBHOOK + f"?provider=plivo&callId={CALL_ID}&flow=amd&amd=leave-message")
        self.assertEqual(
            (create.get("machine_detection"), create.get("machine_detection_method"), create.get("machine_detection_time")),
            ("true", "POST", 5000),
        )
        method, path, sdk = _sdk(lambda c: c.calls.create(
            from_=create.get("from"), to_=create.get("to"), answer_url=create.get("answer_url"), answer_method="POST",
            hangup_url=create.get("hangup_url"), hangup_method="POST", hangup_on_ring=30,
            machine_detection="true", machine_detection_url=url, machine_detection_method="POST", machine_detection_time=5000,
        ))
        self.assertEqual((create.method, create.path), (method, path))
        self.assertEqual({k: sdk.get(k) for k in create.body}, dict(create.body))  # every field as the SDK sends it
        self.fake.requests.clear()
        self.dial(policy="ignore")
        (create,) = self.requests("/Call/")
        self.assertNotIn("machine_detection", create.body)
        self.assertNotIn("machine_detection_url", create.body)

    def test_machine_leave_message_waits_for_the_beep(self):
        """Machine=true is a verdict without the greeting's end; the beep wait's Redirect then says machine_done."""
        call, fake = self.dial(Scenario(answer_after=0.5, machine=True, greeting_seconds=8, amd_seconds=1.5), "leave-message")
        self.advance(1.5)
        (verdict,) = self.events(EventType.MACHINE)
        self.assertEqual((verdict.answered_by, verdict.machine_done, verdict.call_id), ("machine", False, CALL_ID))
        self.assertIn("flow=xml-beep", fake.transfers[-1])  # a silent Wait for the beep
        self.advance(5.0)
        self.assertEqual(len(self.events(EventType.MACHINE)), 1)  # still greeting
        self.advance(1.5)
        self.assertIsNotNone(fake.beep_at)
        done = self.events(EventType.MACHINE)[1:]
        self.assertEqual([(e.answered_by, e.machine_done) for e in done], [("machine", True)])
        self.assertNotEqual(done[0].key, verdict.key)
        # The message is said after the beep, and speak fires once it has played.
        fake.scenario = Scenario(machine=True, greeting_seconds=8, speak_seconds_per_char=0.1)
        spoken = self.provider.speak(call, "Please call us back", None)
        self.advance(1.0)
        self.assertNoResult(spoken)
        self.advance(2.0)
        self.successResultOf(spoken)
        ((at, text),) = fake.speak_log
        self.assertEqual(text, "Please call us back")
        self.assertGreaterEqual(at, fake.beep_at)

    def test_human_and_hang_up_policy(self):
        """A person is `human`; with "hang-up" a machine is reported and nothing waits for its beep."""
        call, fake = self.dial(Scenario(answer_after=0.5, amd_seconds=1.0), "hang-up")
        self.advance(1.0)
        self.assertEqual([(e.answered_by, e.machine_done) for e in self.events(EventType.MACHINE)], [("human", False)])
        self.seen.clear()
        call, fake = self.dial(Scenario(answer_after=0.5, machine=True, amd_seconds=1.0), "hang-up")
        self.advance(1.0)
        self.assertEqual([(e.answered_by, e.machine_done) for e in self.events(EventType.MACHINE)], [("machine", False)])
        self.assertEqual([t for t in fake.transfers if "xml-beep" in t], [])

    def test_a_redelivered_verdict_is_the_same_event(self):
        """Plivo re-signs a retry (new nonce): the verdict's identity is the call's, not the request's."""
        self.fake.chaos.duplicate = 1.0
        call, fake = self.dial(Scenario(answer_after=0.5, machine=True, amd_seconds=1.0, greeting_seconds=3), "leave-message")
        self.advance(5.0)
        amd = [h for h in self.fake.webhooks if h.kind == "amd"]
        self.assertGreaterEqual(len(amd), 2)
        self.assertEqual([(e.answered_by, e.machine_done) for e in self.events(EventType.MACHINE)], [("machine", False), ("machine", True)])
        self.assertEqual(len([t for t in fake.transfers if "xml-beep" in t]), 1)


class KeypadTests(_ProviderCase):
    def test_send_dtmf_keeps_the_turn_listening(self):
        """Digits go to the DTMF API (as the SDK sends them); the GetInput in progress still answers its turn."""
        call, fake = self.dial(Scenario(answer_after=0.5, speak_seconds_per_char=0.1, utterances=["yes it is"]))
        self.result(self.provider.prompt(call, "Is this the billing department?", None, "turn-7"))
        self.advance(1.0)  # the question is being spoken inside the GetInput
        transfers = len(fake.transfers)
        self.result(self.provider.send_dtmf(call, "12w#"))
        self.assertEqual(list(fake.dtmf_sent), ["12w#"])
        (sent,) = self.requests("/DTMF/")
        method, path, sdk = _sdk(lambda c: c.calls.send_digits(fake.call_uuid, "12w#", leg="aleg"))
        self.assertEqual((sent.method, sent.path, dict(sent.body)), (method, path, sdk))
        self.assertEqual(len(fake.transfers), transfers)  # the GetInput was not replaced
        self.advance(5.0)
        (speech,) = self.events(EventType.SPEECH)
        self.assertEqual((speech.transcript, speech.turn_token), ("yes it is", "turn-7"))

    def test_keys_answer_a_turn_that_takes_them(self):
        """dtmf=True listens with inputType="dtmf speech"; the keys come back as call.dtmf with the turn token."""
        call, fake = self.dial(Scenario(answer_after=0.5, press="42#", utterances=["words"]))
        self.result(self.provider.prompt(call, "Your PIN?", None, "turn-9", dtmf=True))
        self.advance(2.0)
        self.assertEqual(fake.inputs[-1].attributes["inputType"], "dtmf speech")
        (keys,) = self.events(EventType.DTMF)
        self.assertEqual((keys.digits, keys.turn_token), ("42#", "turn-9"))
        self.result(self.provider.start_listening(call, "turn-10"))
        self.advance(2.0)
        self.assertEqual(fake.inputs[-1].attributes["inputType"], "speech")
        self.assertEqual([e.turn_token for e in self.events(EventType.SPEECH)], ["turn-10"])

    def test_dtmf_refused_by_plivo_is_an_error(self):
        call, fake = self.dial()
        self.fake.fail_next(400, {"api_id": "x", "error": "invalid digits"})
        d = self.provider.send_dtmf(call, "1")
        self.pump()
        self.failureResultOf(d, ProviderError)


class TransferTests(_ProviderCase):
    def test_transfer_dials_the_target(self):
        """An A-leg transfer (as the SDK sends it) to `<Dial callerId=ours><Number>`: the fake dials it."""
        call, fake = self.dial(Scenario(answer_after=0.5, dial_seconds=3))
        self.result(self.provider.transfer_call(call, TARGET))
        self.advance(0.5)
        ((dial),) = fake.dials
        self.assertEqual((dial.target, dial.noun, dial.caller_id), (TARGET, "Number", OURS))
        transfer = self.requests(f"/Call/{fake.call_uuid}/")[-1]
        method, path, sdk = _sdk(lambda c: c.calls.transfer(
            fake.call_uuid, legs="aleg", aleg_url=transfer.get("aleg_url"), aleg_method="POST"))
        self.assertEqual((transfer.method, transfer.path, dict(transfer.body)), (method, path, sdk))
        self.advance(4.0)
        self.assertTrue(fake.is_ended)  # the target hung up: the A-leg's XML ran out

    def test_transfer_to_sip_dials_a_user(self):
        call, fake = self.dial()
        self.result(self.provider.transfer_call(call, "sip:desk@pbx.example.com"))
        self.advance(0.5)
        self.assertEqual([(d.target, d.noun) for d in fake.dials], [("sip:desk@pbx.example.com", "User")])


class RecordingTests(_ProviderCase):
    def test_recording_completes_after_the_hang_up(self):
        """Record API (as the SDK sends it): in progress at once; its callback after the hang-up completes it."""
        call, fake = self.dial(Scenario(answer_after=0.5, recording_delay=3))
        started = self.result(self.provider.start_recording(call))
        (rec,) = fake.recordings
        self.assertEqual(started, {"id": rec.recording_id, "status": "in-progress", "startedAt": NOW * 1000 + 1000})
        (request,) = self.requests("/Record/")
        self.assertEqual(request.get("callback_url"), WEBHOOK + f"?provider=plivo&callId={CALL_ID}&flow=recording")
        self.assertEqual((request.get("file_format"), request.get("callback_method")), ("mp3", "POST"))
        self.assertGreaterEqual(request.get("time_limit"), 3600)  # Plivo's default would cut it at 60 s
        method, path, sdk = _sdk(lambda c: c.calls.record(
            fake.call_uuid, time_limit=request.get("time_limit"), file_format="mp3",
            callback_url=request.get("callback_url"), callback_method="POST"))
        self.assertEqual((request.method, request.path, dict(request.body)), (method, path, sdk))
        self.advance(12.0)
        self.result(self.provider.hangup_call(call, "hangup-bot"))
        self.advance(2.0)
        self.assertEqual(self.events(EventType.RECORDING), [])  # still being processed
        self.advance(1.5)
        (done,) = self.events(EventType.RECORDING)
        self.assertEqual(done.call_id, CALL_ID)
        self.assertEqual(
            dict(done.recording),
            {"id": rec.recording_id, "status": "completed", "url": rec.url, "durationSeconds": 12, "startedAt": NOW * 1000 + 1000},
        )

    def test_record_xml_spelling_and_failures(self):
        """The `<Record>` action's CamelCase names are read too; no URL is a failure; no id is nothing."""
        provider = PlivoProvider(http=None, clock=self.clock, auth_id=AUTH_ID, auth_token=TOKEN, base_url=API, public_url=PUBLIC)

        def parse(params):
            url = WEBHOOK + f"?provider=plivo&callId={CALL_ID}&flow=recording"
            headers = {k.lower(): v for k, v in signature_headers(TOKEN, "POST", url, params.items()).items()}
            headers["content-type"] = "application/x-www-form-urlencoded"
            from urllib.parse import urlencode

            ctx = WebhookContext(
                method="POST", path="/voice/webhook", path_and_query=url[len(PUBLIC):],
                query=dict(parse_qsl(urlsplit(url).query)), headers=headers, raw_body=urlencode(params).encode(),
                remote_ip="127.0.0.1", url=url,
            )
            verdict = provider.verify_webhook(ctx)
            self.assertTrue(verdict.ok, verdict.reason)
            return provider.parse_webhook(ctx, verdict.request_key).events

        (event,) = parse({"RecordUrl": "https://media.plivo.com/v1/Account/X/Recording/r1.mp3", "RecordingID": "r1",
                          "RecordingDuration": "7", "RecordingStartMs": "1700000001000", "CallUUID": "u-1"})
        self.assertEqual(dict(event.recording), {"id": "r1", "status": "completed", "url": "https://media.plivo.com/v1/Account/X/Recording/r1.mp3",
                                                 "durationSeconds": 7, "startedAt": 1700000001000})
        (event,) = parse({"recording_id": "r2", "call_uuid": "u-1", "record_url": ""})
        self.assertEqual(dict(event.recording), {"id": "r2", "status": "failed"})
        self.assertEqual(list(parse({"record_url": "https://media.plivo.com/x.mp3", "call_uuid": "u-1"})), [])

    def test_recording_source(self):
        """Basic auth to the fake's own origin (base_url) or media.plivo.com only; the media needs it."""
        call, fake = self.dial(Scenario(answer_after=0.5, recording_delay=0.5))
        self.result(self.provider.start_recording(call))
        self.advance(2.0)
        self.result(self.provider.hangup_call(call, "hangup-bot"))
        self.advance(1.0)
        (done,) = self.events(EventType.RECORDING)
        url, headers = self.successResultOf(recording_source(self.api, done.recording, base_url=API + "/", auth_id=AUTH_ID, auth_token=TOKEN))
        self.assertEqual(url, done.recording["url"])
        self.assertEqual(headers, {"Authorization": "Basic " + base64.b64encode(f"{AUTH_ID}:{TOKEN}".encode()).decode()})
        response = self.result(self.api.get(url, headers=headers))
        self.assertEqual((response.code, self.result(response.content())[:3]), (200, b"ID3"))
        response = self.result(self.api.get(url))
        self.assertEqual(response.code, 401)
        media = {"id": "r", "url": "https://media.plivo.com/v1/Account/X/Recording/r.mp3"}
        self.assertEqual(self.successResultOf(recording_source(None, media, base_url=API, auth_id=AUTH_ID, auth_token=TOKEN))[0], media["url"])
        for bad in ("https://evil.example/r.mp3", "http://media.plivo.com/r.mp3", "https://media.plivo.com.evil.example/r.mp3",
                    "http://plivo.fake:8080/r.mp3", "file:///etc/passwd", None):
            with self.assertRaises(ValueError, msg=bad):
                recording_source(None, {"id": "r", "url": bad}, base_url=API, auth_id=AUTH_ID, auth_token=TOKEN)


class SpeakTests(_ProviderCase):
    def test_speak_fires_only_once_played(self):
        """A goodbye's speak fires once Plivo has played it (its Redirect), not when the transfer is accepted."""
        call, fake = self.dial(Scenario(answer_after=0.5, speak_seconds_per_char=0.1))
        spoken = self.provider.speak(call, "Goodbye for now", None)  # 15 chars: 1.5 s
        self.advance(1.0)
        self.assertNoResult(spoken)
        self.assertEqual(fake.speak_texts, ["Goodbye for now"])
        self.advance(1.0)
        self.successResultOf(spoken)


class PlivoActionsEndToEndTests(TestCase):
    """The daemon (in process, real reactor, loopback HTTP) against the fake Plivo, each callback delivered twice."""

    timeout = 60
    MESSAGE = "Your parcel arrives today"

    async def start(self, scenario: Scenario, **overrides):
        self.http = http_client(self)
        chaos = Chaos(duplicate=1.0, retry_after=0.2)
        self.fake = FakePlivo(reactor, AUTH_ID, TOKEN, self.http, scenario=scenario, chaos=chaos)
        base = await serve(self, self.fake.resource())
        port = free_port()
        config = {
            "provider": "plivo",
            "fromNumber": OURS,
            "plivo": {"authId": AUTH_ID, "authToken": TOKEN, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "transcriptTimeoutMs": 20000,
            "outbound": {"notifyHangupDelaySec": 1},
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.manager = self.service.manager
        self.addCleanup(self.fake.hang_up_all)

    def fake_call(self):
        (call,) = self.fake.calls.values()
        return call

    async def ended(self, call_id: str) -> dict:
        async def over():
            record = await call_status(self.rpc, call_id)
            return record if record["state"] in ("completed", "hangup-bot", "hangup-user", "voicemail", "transferred", "failed") else None
        return await eventually(over, 15, f"the end of {call_id}")

    def create_body(self) -> dict:
        return next(r.body for r in self.fake.requests if r.method == "POST" and r.path.endswith("/Call/"))

    async def test_machine_leave_message(self):
        """A machine answers a notify call: the message is spoken after its beep, then the call hangs up (voicemail)."""
        await self.start(Scenario(machine=True, amd_seconds=0.3, greeting_seconds=1.5, speak_seconds_per_char=0.01))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="leave-message"))
        record = await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(self.create_body()["machine_detection"], "true")
        self.assertEqual(call.speak_texts, [self.MESSAGE])
        self.assertGreaterEqual(call.speak_log[0][0], call.beep_at)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        await eventually(lambda: call.is_ended, 5, "the hang-up at Plivo")
        self.assertGreaterEqual(call.ended_at, call.speak_log[0][0] + len(self.MESSAGE) * 0.01 - 0.001)

    async def test_machine_hang_up(self):
        """With hang-up, a machine is hung up on without a word (voicemail)."""
        await self.start(Scenario(machine=True, amd_seconds=0.3, greeting_seconds=1.5))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="hang-up"))
        record = await self.ended(call_id)
        call = self.fake_call()
        await eventually(lambda: call.is_ended, 5, "the hang-up at Plivo")
        self.assertEqual((call.speak_texts, call.hangup_source), ([], "API"))
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        self.assertEqual([t for t in call.transfers if "xml-beep" in t], [])

    async def test_human_answer(self):
        """A person answers: the message is spoken once detection says human, and the call goes on as usual."""
        await self.start(Scenario(amd_seconds=0.3))
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify", options=CallOptions(answering_machine="leave-message"))
        record = await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(call.speak_texts, [self.MESSAGE])
        self.assertGreaterEqual(call.speak_log[0][0], call.answered_at + 0.3)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("hangup-bot", "human"))

    async def conversation(self, scenario: Scenario, **overrides) -> tuple[str, object]:
        await self.start(scenario, **overrides)
        call_id = await self.manager.initiate(CALLEE, "Hi there", "conversation")
        call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the dial")
        await eventually(lambda: call.inputs, 10, "listening after the greeting")
        return call_id, call

    async def test_dtmf_while_a_continue_waits(self):
        """Keys sent while a continue waits for its answer: the GetInput goes on, the continue gets the words."""
        def person(call):
            return "It's Alice" if call.speak_texts[-1:] == ["Who is this?"] else None

        call_id, call = await self.conversation(Scenario(utterances=person, speech_delay=1.5, silence=30))
        asked = Deferred.fromCoroutine(self.manager.continue_turn(call_id, "Who is this?"))
        await eventually(lambda: call.inputs[-1].heard == "It's Alice", 5, "the person answering")
        transfers = len(call.transfers)
        await self.manager.send_dtmf(call_id, "1w2")
        self.assertEqual(list(call.dtmf_sent), ["1w2"])
        answer = await asked
        self.assertEqual(answer, Answer("It's Alice", "speech"))
        self.assertEqual(len(call.transfers), transfers)  # the GetInput was never replaced
        record = await call_status(self.rpc, call_id)
        self.assertIn(("bot", "[dtmf] 1w2"), [(t["speaker"], t["text"]) for t in record["transcript"]])

    async def test_keys_answer_a_continue(self):
        """A continue listening for speech or keys is answered by the keys the person presses."""
        call_id, call = await self.conversation(Scenario(press="7", silence=30))
        answer = await self.manager.continue_turn(call_id, "Press 7 to confirm?", input="speech dtmf")
        self.assertEqual(answer, Answer("7", "dtmf"))
        self.assertEqual(call.inputs[-1].attributes["inputType"], "dtmf speech")
        record = await call_status(self.rpc, call_id)
        self.assertIn(("user", "[dtmf] 7"), [(t["speaker"], t["text"]) for t in record["transcript"]])

    async def test_transfer(self):
        """Transfer says its message (played), then Plivo dials the target; the record is transferred."""
        message = "Connecting you now"
        call_id, call = await self.conversation(Scenario(speak_seconds_per_char=0.02, silence=30), transfer={"allowTo": [TARGET]})
        await self.manager.transfer(call_id, TARGET, message=message)
        record = await call_status(self.rpc, call_id)
        self.assertEqual((record["state"], record["transferTarget"]), ("transferred", TARGET))
        (dial,) = await eventually(lambda: list(call.dials), 5, "the target dialled")
        self.assertEqual((dial.target, dial.noun, dial.caller_id), (TARGET, "Number", OURS))
        spoken = next(at for at, text in call.speak_log if text == message)
        self.assertGreaterEqual(dial.started_at, spoken + len(message) * 0.02 - 0.001)

    async def test_recording(self):
        """The announcement plays before recording starts; the recording saved after the hang-up shows in status."""
        await self.start(Scenario(speak_seconds_per_char=0.02, recording_delay=0.5),
                         recording={"enabled": True, "announcement": "This call is recorded."})
        call_id = await self.manager.initiate(CALLEE, self.MESSAGE, "notify")
        await self.ended(call_id)
        call = self.fake_call()
        self.assertEqual(call.speak_texts[0], "This call is recorded.")
        (recording,) = call.recordings
        self.assertGreaterEqual(recording.started_at, call.speak_log[0][0] + len("This call is recorded.") * 0.02 - 0.001)

        async def saved():
            record = await call_status(self.rpc, call_id)
            return [r for r in record.get("recordings", []) if r.get("status") == "completed"]

        (shown,) = await eventually(saved, 10, "the recording saved after the hang-up")
        self.assertEqual((shown["id"], shown["url"]), (recording.recording_id, recording.url))
        self.assertEqual(shown["durationSeconds"], int((recording.ended_at - recording.started_at) * 1000) // 1000)

    async def test_end_with_message(self):
        """end with a message hangs up only once the message has played."""
        message = "Goodbye, and thank you"
        call_id, call = await self.conversation(Scenario(speak_seconds_per_char=0.03, silence=30))
        await self.manager.end_call(call_id, message=message)
        await eventually(lambda: call.is_ended, 5, "the hang-up at Plivo")
        spoken = next(at for at, text in call.speak_log if text == message)
        self.assertGreaterEqual(call.ended_at, spoken + len(message) * 0.03 - 0.001)
        self.assertEqual(call.hangup_source, "API")
