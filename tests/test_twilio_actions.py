"""
Issue 17 on Twilio: answering-machine detection, keypad tones, keys as answers, transfer,
recording and a goodbye that has played before the hang-up. Request shapes are checked against
the official twilio SDK (a capturing HTTP client); the rest runs the daemon (in process, real
reactor, loopback) against the fake Twilio, whose callbacks come back signed.
"""
from __future__ import annotations

import json
from urllib.parse import urlencode, urlsplit

from treq.testing import StubTreq
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.domain.carrier import DialOptions
from voicecall.domain.model import CallRecord, Direction, EventType
from voicecall.providers.base import WebhookContext
from voicecall.providers.twilio import TwilioProvider, recording_source
from voicecall.testing.twilio import Chaos, FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient

from tests.harness import (
    call_status,
    eventually,
    free_port,
    http_client,
    serve,
    speech_fakes,
    start_daemon,
    until_state,
)

SID = "AC" + "0" * 32
TOKEN = "fake-auth-token-for-tests"
API = "http://api.fake"
OURS = "+15550000000"
CALLEE = "+15550001234"
DESK = "+15550009999"
WEBHOOK = "http://daemon.test/voice/webhook"
CALL_SID = "CA" + "1" * 32
ENDED = ("completed", "hangup-bot", "hangup-user", "voicemail", "failed", "error", "timeout")


def _sdk(call, response):
    """(method, path, form pairs) the official SDK sends for `call(client)`."""
    seen = {}

    class Capture(TwilioHttpClient):
        def request(self, method, url, params=None, data=None, headers=None, auth=None, **kw):
            seen.update(method=method, url=url, data=dict(data or {}))
            return Response(201, json.dumps(response))

    call(Client(SID, TOKEN, http_client=Capture()))
    pairs = []
    for k, v in seen["data"].items():
        pairs.extend((k, str(x)) for x in (v if isinstance(v, list) else [v]))
    return seen["method"], urlsplit(seen["url"]).path, sorted(pairs)


def _record(direction=Direction.OUTBOUND):
    return CallRecord(
        call_id="c1", provider="twilio", direction=direction, state="active", from_number=OURS,
        to_number=CALLEE, started_at=0, provider_call_id=CALL_SID,
    )


class RequestShapeTests(SynchronousTestCase):
    """What the adapter sends is what the official SDK sends for the same operation."""

    def setUp(self):
        self.clock = Clock()
        self.fake = FakeTwilio(self.clock, SID, TOKEN)
        self.provider = TwilioProvider(StubTreq(self.fake.resource()), self.clock, SID, TOKEN, base_url=API)
        self.provider.set_webhook_url(WEBHOOK)

    def sent(self, d):
        self.successResultOf(d)
        request = self.fake.requests[-1]
        return request.method, request.path, sorted(request.form)

    def live_call(self):
        d = self.provider.initiate_call(call_id="c1", from_number=OURS, to_number=CALLEE, webhook_url=WEBHOOK)
        placed = self.successResultOf(d)
        call = self.fake.calls[placed.provider_call_id]
        call.status = "in-progress"
        record = _record()
        record.provider_call_id = call.sid
        return record

    def test_create_with_answering_machine_detection(self):
        d = self.provider.initiate_call(
            call_id="c1", from_number=OURS, to_number=CALLEE, webhook_url=WEBHOOK, notify_message="Hi",
            options=DialOptions(answering_machine="leave-message"),
        )
        placed = self.successResultOf(d)
        self.assertFalse(placed.consumes_initial_message, "the message waits for the verdict")
        request = self.fake.requests[-1]
        url = f"{WEBHOOK}?callId=c1"
        expected = _sdk(
            lambda c: c.calls.create(
                to=CALLEE, from_=OURS, url=url, status_callback=url + "&type=status",
                status_callback_event=["initiated", "ringing", "answered", "completed"],
                status_callback_method="POST", timeout=30, machine_detection="DetectMessageEnd",
                async_amd="true", async_amd_status_callback=url + "&type=amd",
                async_amd_status_callback_method="POST",
            ),
            {"sid": CALL_SID, "status": "queued"},
        )
        self.assertEqual((request.method, request.path, sorted(request.form)), expected)

    def test_no_detection_without_a_policy(self):
        self.successResultOf(
            self.provider.initiate_call(call_id="c1", from_number=OURS, to_number=CALLEE, webhook_url=WEBHOOK)
        )
        self.assertNotIn("MachineDetection", self.fake.requests[-1].form_dict)

    def test_dtmf_is_a_call_update_with_play_digits(self):
        call = self.live_call()
        method, path, form = self.sent(self.provider.send_dtmf(call, "12w#"))
        self.assertEqual((method, path, [k for k, _ in form]), _sdk(
            lambda c: c.calls(call.provider_call_id).update(twiml="<Response/>"), {"sid": call.provider_call_id}
        )[:2] + (["Twiml"],))
        self.assertIn('<Play digits="12w#"/>', dict(form)["Twiml"])

    def test_transfer_dials_the_target_with_our_caller_id(self):
        call = self.live_call()
        _, _, form = self.sent(self.provider.transfer_call(call, DESK))
        self.assertIn(f'<Dial callerId="{OURS}"><Number>{DESK}</Number></Dial>', dict(form)["Twiml"])
        _, _, form = self.sent(self.provider.transfer_call(call, "sip:desk@example.com"))
        self.assertIn("<Sip>sip:desk@example.com</Sip>", dict(form)["Twiml"])

    def test_inbound_transfer_keeps_the_callers_id(self):
        call = self.live_call()
        call.direction = Direction.INBOUND
        _, _, form = self.sent(self.provider.transfer_call(call, DESK))
        self.assertIn(f"<Dial><Number>{DESK}</Number></Dial>", dict(form)["Twiml"])

    def test_start_recording(self):
        call = self.live_call()
        recording = self.successResultOf(self.provider.start_recording(call))
        request = self.fake.requests[-1]
        callback = f"{WEBHOOK}?callId=c1&type=recording"
        expected = _sdk(
            lambda c: c.calls(call.provider_call_id).recordings.create(
                recording_status_callback=callback,
                recording_status_callback_event=["in-progress", "completed", "absent"],
                recording_status_callback_method="POST", recording_channels="dual",
            ),
            {"sid": "RE" + "0" * 32, "call_sid": call.provider_call_id},
        )
        self.assertEqual((request.method, request.path, sorted(request.form)), expected)
        self.assertTrue(recording["id"].startswith("RE"))
        self.assertEqual(recording["status"], "in-progress")
        self.assertIsInstance(recording["startedAt"], int)

    def test_gather_takes_keys_when_asked(self):
        call = self.live_call()
        self.successResultOf(self.provider.prompt(call, "Press 1", None, "tok", dtmf=True))
        document = self.fake.requests[-1].form_dict["Twiml"]
        self.assertIn('input="speech dtmf"', document)
        self.assertIn("turnToken=tok", document)
        self.successResultOf(self.provider.prompt(call, "Say it", None, "tok2"))
        self.assertIn('input="speech"', self.fake.requests[-1].form_dict["Twiml"])

    def test_dtmf_goes_back_to_the_listening_turn(self):
        """Tones sent while a turn listens: the same Gather (turn token, keys) follows them."""
        call = self.live_call()
        self.successResultOf(self.provider.start_listening(call, "tok", dtmf=True))
        self.successResultOf(self.provider.send_dtmf(call, "9"))
        document = self.fake.requests[-1].form_dict["Twiml"]
        self.assertLess(document.index('<Play digits="9"/>'), document.index("<Gather"))
        self.assertIn("turnToken=tok", document)
        self.assertIn('input="speech dtmf"', document)


def _ctx(params, query):
    url = WEBHOOK + "?" + urlencode(query)
    body = urlencode(params).encode()
    headers = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": sign_request(TOKEN, url, params)}
    path_and_query = urlsplit(url).path + "?" + urlsplit(url).query
    return WebhookContext(method="POST", path=urlsplit(url).path, path_and_query=path_and_query, query=query,
                          headers=headers, raw_body=body, remote_ip="127.0.0.1", url=url)


class CallbackTests(SynchronousTestCase):
    """AMD and recording callbacks, as the fake (and Twilio) send them, become call events."""

    def setUp(self):
        self.provider = TwilioProvider(StubTreq(FakeTwilio(Clock(), SID, TOKEN).resource()), Clock(), SID, TOKEN, base_url=API)

    def parse(self, params, query):
        ctx = _ctx(params, query)
        verified = self.provider.verify_webhook(ctx)
        self.assertTrue(verified.ok, verified.reason)
        return self.provider.parse_webhook(ctx, verified.request_key)

    def test_machine_end_beep(self):
        amd = {"AccountSid": SID, "CallSid": CALL_SID, "AnsweredBy": "machine_end_beep", "MachineDetectionDuration": "4200"}
        parsed = self.parse(amd, {"callId": "c1", "type": "amd"})
        (event,) = parsed.events
        self.assertEqual((event.type, event.answered_by, event.machine_done), (EventType.MACHINE, "machine", True))
        self.assertIn(b"<Response></Response>", parsed.response.body)
        again = self.parse(amd, {"callId": "c1", "type": "amd"}).events[0]
        self.assertEqual(again.dedupe_key, event.dedupe_key, "a duplicated verdict is the same event")

    def test_verdicts(self):
        for given, expected in (("human", ("human", False)), ("fax", ("fax", False)), ("unknown", ("unknown", False)),
                                ("machine_start", ("machine", False)), ("machine_end_silence", ("machine", True))):
            (event,) = self.parse({"CallSid": CALL_SID, "AnsweredBy": given}, {"callId": "c1", "type": "amd"}).events
            self.assertEqual((event.answered_by, event.machine_done), expected, given)

    def test_recording_completed(self):
        params = {
            "AccountSid": SID, "CallSid": CALL_SID, "RecordingSid": "RE" + "2" * 32,
            "RecordingUrl": f"{API}/2010-04-01/Accounts/{SID}/Recordings/RE{'2' * 32}",
            "RecordingStatus": "completed", "RecordingDuration": "12",
            "RecordingStartTime": "Thu, 03 Dec 2026 22:00:00 +0000", "RecordingChannels": "2",
        }
        (event,) = self.parse(params, {"callId": "c1", "type": "recording"}).events
        self.assertEqual(event.type, EventType.RECORDING)
        self.assertEqual(event.recording, {
            "id": params["RecordingSid"], "status": "completed", "url": params["RecordingUrl"],
            "durationSeconds": 12, "startedAt": 1796335200000,
        })
        absent = self.parse({**params, "RecordingStatus": "absent"}, {"callId": "c1", "type": "recording"}).events[0]
        self.assertEqual(absent.recording["status"], "failed")
        self.assertNotEqual(absent.dedupe_key, event.dedupe_key)


    def test_a_keys_gather_that_heard_nothing_listens_again_for_the_same_turn(self):
        """Its Redirect (after the short keys timeout) gets the same Gather back: same token, keys taken."""
        self.provider.set_webhook_url(WEBHOOK)  # (a daemon restarted since: the call's URL is rebuilt)
        fetch = {"CallSid": CALL_SID, "CallStatus": "in-progress", "Direction": "outbound-api"}
        parsed = self.parse(fetch, {"callId": "c1", "flow": "listen", "listen": "tok", "n": "1"})
        body = parsed.response.body.decode()
        self.assertIn('input="speech dtmf"', body)
        self.assertIn("turnToken=tok", body)
        self.assertIn("flow=listen", body)


class RecordingSourceTests(SynchronousTestCase):
    def test_mp3_with_basic_auth_on_the_api_origin(self):
        url = f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Recordings/RE1"
        got = self.successResultOf(recording_source(
            None, {"id": "RE1", "url": url}, base_url="https://api.twilio.com", account_sid=SID, auth_token=TOKEN,
        ))
        self.assertEqual(got[0], url + ".mp3")
        self.assertTrue(got[1]["Authorization"].startswith("Basic "))

    def test_other_hosts_refused(self):
        for url in ("https://evil.example/x", "http://api.twilio.com/x", "https://api.twilio.com:8443/x"):
            with self.assertRaises(ValueError) as e:
                recording_source(None, {"id": "RE1", "url": url}, base_url="https://api.twilio.com",
                                 account_sid=SID, auth_token=TOKEN)
            self.assertIn("twilio.baseUrl", str(e.exception))


class TwilioActionsEndToEndTests(TestCase):
    """Through the daemon's RPC socket, the fake Twilio on loopback."""

    timeout = 60

    async def start(self, scenario, chaos=None, **overrides):
        self.http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.http, scenario=scenario, chaos=chaos or Chaos())
        self.base = await serve(self, self.fake.resource())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": "twilio",
            "fromNumber": OURS,
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": self.base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "transcriptTimeoutMs": 20000,
            "transfer": {"allowTo": [DESK]},
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.hang_up_fake_calls)

    async def hang_up_fake_calls(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    def fake_call(self):
        (call,) = self.fake.calls.values()
        return call

    async def test_machine_gets_the_message_after_the_beep(self):
        await self.start(Scenario(machine=True, greeting_seconds=1.5))
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Your parcel arrives today", "mode": "notify", "answeringMachine": "leave-message",
        }))["callId"]
        record = await until_state(self.rpc, call_id, *ENDED, timeout=15)
        fake = self.fake_call()
        self.assertEqual(fake.answered_by, "machine_end_beep")
        said = [(at, text) for at, text in fake.say_started if "parcel" in text]
        self.assertTrue(said and said[0][0] >= fake.beep_at, f"said after the beep: {said} beep {fake.beep_at}")
        self.assertIn("Your parcel arrives today", fake.said)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        bot = [t["text"] for t in record["transcript"] if t["speaker"] == "bot"]
        self.assertEqual(bot, ["Your parcel arrives today"], "the greeting heard as words got no reply")

    def worst_day(self):
        """Every callback duplicated, reordered and late (Twilio's retries keep their idempotency token)."""
        return Chaos(duplicate=1.0, retry_after=0.3, reorder_window=0.3, max_delay=0.2)

    async def test_machine_on_the_carriers_worst_day(self):
        """A duplicated, late verdict: the message is left once, after the beep."""
        chaos = self.worst_day()
        await self.start(Scenario(machine=True, greeting_seconds=1.5), chaos=chaos)
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Your parcel arrives today", "mode": "notify", "answeringMachine": "leave-message",
        }))["callId"]
        record = await until_state(self.rpc, call_id, *ENDED, timeout=15)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        self.assertEqual(list(self.fake_call().said).count("Your parcel arrives today"), 1)
        await self.fake.settle()
        self.assertTrue(any(w.kind == "amd" and w.attempt == 2 for w in self.fake.webhooks), "the verdict came twice")

    async def test_recording_on_the_carriers_worst_day(self):
        """Recording callbacks duplicated and reordered (in-progress after completed): one recording, completed."""
        chaos = self.worst_day()
        await self.start(Scenario(amd_seconds=0.2, recording_delay=0.2), chaos=chaos)
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Hi", "mode": "conversation", "answeringMachine": "hang-up", "record": True,
        }))["callId"]
        await eventually(lambda: self.fake.recordings, 10, "a recording")
        await deferLater(reactor, 1.2, lambda: None)  # a recording of under a second would be "absent"
        await self.rpc.call("voicecall.end", {"callId": call_id})

        async def completed():
            recordings = (await call_status(self.rpc, call_id)).get("recordings") or []
            return recordings if any(r["status"] == "completed" for r in recordings) else None

        recordings = await eventually(completed, 10, "the recording completed after the hang-up")
        await self.fake.settle()
        await deferLater(reactor, 0.5, lambda: None)  # the late duplicates land too
        recordings = (await call_status(self.rpc, call_id))["recordings"]
        self.assertEqual([(r["id"], r["status"]) for r in recordings], [(list(self.fake.recordings)[0], "completed")])
        self.assertEqual((await call_status(self.rpc, call_id))["answeredBy"], "human")

    async def test_machine_hung_up_on(self):
        await self.start(Scenario(machine=True, greeting_seconds=1.0))
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Hello", "mode": "notify", "answeringMachine": "hang-up",
        }))["callId"]
        record = await until_state(self.rpc, call_id, *ENDED, timeout=15)
        self.assertEqual((record["endReason"], record["answeredBy"]), ("voicemail", "machine"))
        self.assertEqual(list(self.fake_call().says), [])

    async def test_human_answer_is_a_normal_call(self):
        await self.start(Scenario(amd_seconds=0.3))
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Your parcel arrives today", "mode": "notify", "answeringMachine": "leave-message",
        }))["callId"]
        await eventually(lambda: "Your parcel arrives today" in self.fake_call().said, 10, "the message said")
        record = await until_state(self.rpc, call_id, *ENDED, timeout=10)
        self.assertEqual(record["answeredBy"], "human")
        self.assertNotEqual(record["endReason"], "voicemail")

    async def test_keys_answer_a_continue(self):
        await self.start(Scenario(press="42#", silence=0.2))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        answer = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Your code?", "input": "speech dtmf"})
        self.assertEqual(answer.get("transcript"), "42#")
        self.assertEqual(answer.get("input"), "dtmf")
        await self.rpc.call("voicecall.end", {"callId": call_id})

    async def test_dtmf_while_a_continue_waits(self):
        def person(call):
            keyed = any(call.dtmf_sent)
            return "Done" if keyed and "turnToken=" in (call.gathers[-1].action_url or "") else None

        await self.start(Scenario(utterances=person, silence=0.3))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        await eventually(lambda: "Hi" in self.fake_call().said, 10, "the greeting")
        waiting = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Say done when ready"})
        await eventually(lambda: any("turnToken=" in (g.action_url or "") for g in self.fake_call().gathers), 10, "the question")
        await self.rpc.call("voicecall.dtmf", {"callId": call_id, "digits": "1w2"})
        answer = await waiting
        self.assertEqual(answer["transcript"], "Done")
        self.assertEqual(list(self.fake_call().dtmf_sent), ["1w2"])
        await self.rpc.call("voicecall.end", {"callId": call_id})

    async def test_transfer_after_its_message(self):
        await self.start(Scenario(say_seconds_per_char=0.02))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        await eventually(lambda: "Hi" in self.fake_call().said, 10, "the greeting")
        await self.rpc.call("voicecall.transfer", {"callId": call_id, "to": DESK, "message": "Connecting you now"})
        record = await until_state(self.rpc, call_id, "transferred")
        fake = self.fake_call()
        self.assertIn("Connecting you now", fake.said, "the message played to its end before the Dial")
        (dial,) = fake.dialled
        self.assertEqual((dial.target, dial.noun, dial.caller_id), (DESK, "Number", OURS))
        self.assertEqual(record["transferTarget"], DESK)
        self.assertFalse(fake.is_ended, "the caller is still connected to the target")

    async def test_recording_completed_after_the_hang_up(self):
        await self.start(Scenario(recording_delay=0.5), recording={"announcement": "This call is recorded."})
        call_id = (await self.rpc.call("voicecall.initiate", {
            "to": CALLEE, "message": "Hi", "mode": "conversation", "record": True,
        }))["callId"]
        await eventually(lambda: self.fake.recordings, 10, "a recording")
        fake = self.fake_call()
        (recording,) = self.fake.recordings.values()
        announced = [at for at, text in fake.say_started if "recorded" in text]
        self.assertTrue(announced and announced[0] <= recording.started_at, "announced before recording")
        self.assertIn("This call is recorded.", fake.said)
        await eventually(lambda: "Hi" in fake.said, 10, "the greeting, recorded")
        await deferLater(reactor, 1.2, lambda: None)  # a recording of under a second would be "absent"
        await self.rpc.call("voicecall.end", {"callId": call_id})
        await eventually(lambda: fake.is_ended, 5, "the hang-up")

        async def completed():
            record = await call_status(self.rpc, call_id)
            done = [r for r in record.get("recordings") or [] if r.get("status") == "completed"]
            return done[0] if done else None

        done = await eventually(completed, 10, "the recording completed after the hang-up")
        self.assertEqual(done["id"], recording.sid)
        self.assertEqual(done["url"], recording.url)
        self.assertIsInstance(done["durationSeconds"], int)
        url, headers = await recording_source(
            self.http, done, base_url=self.base, account_sid=SID, auth_token=TOKEN
        )
        response = await self.http.get(url, headers=headers)
        self.assertEqual((response.code, (await response.content())[:3]), (200, b"ID3"))
        anonymous = await self.http.get(url)
        self.assertEqual(anonymous.code, 401)

    async def test_end_with_message_hangs_up_after_it_played(self):
        await self.start(Scenario(say_seconds_per_char=0.03))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        await eventually(lambda: "Hi" in self.fake_call().said, 10, "the greeting")
        await self.rpc.call("voicecall.end", {"callId": call_id, "message": "Goodbye and thank you for your time"})
        await eventually(lambda: self.fake_call().is_ended, 10, "the hang-up")
        self.assertIn("Goodbye and thank you for your time", self.fake_call().said, "played to its end first")


class StreamedActionsTests(TestCase):
    """Keypad tones and transfer on a call whose audio is a media stream (the bridge's)."""

    timeout = 60

    async def start(self):
        http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(utterances=[]))
        base = await serve(self, self.fake.resource())
        _, speech_base, stt = await speech_fakes(self, transcripts=("Thanks",))
        port = free_port()
        config = {
            "provider": "twilio",
            "fromNumber": OURS,
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "streaming": {"enabled": True, "openaiApiKey": "sk-stt", "sttBaseUrl": stt.url, "silenceDurationMs": 300},
            "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
            "transcriptTimeoutMs": 20000,
            "transfer": {"allowTo": [DESK]},
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.hang_up)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        stream = await fake_call.next_stream()
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self.said(call_id, "Hi"), 10, "the greeting")
        return call_id, fake_call, stream, client

    async def hang_up(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def connect(self, fake_call, stream):
        client = TwilioMediaClient(
            reactor, stream.url, call_sid=fake_call.sid, token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
        )
        await client.connect()
        self.addCleanup(self.close_client, client)
        return client

    async def close_client(self, client):
        if not client.closed.called:
            client.close()
        await client.closed

    async def said(self, call_id, text):
        record = await call_status(self.rpc, call_id)
        return text in [t["text"] for t in record["transcript"] if t["speaker"] == "bot"]

    async def test_dtmf_then_back_to_the_stream(self):
        call_id, fake_call, stream, client = await self.start()
        streams = len(fake_call.streams)
        await self.rpc.call("voicecall.dtmf", {"callId": call_id, "digits": "5#"})
        client.close()  # Twilio closes the socket of the stream the update replaced
        await eventually(lambda: len(fake_call.streams) > streams, 10, "a fresh stream after the tones")
        self.assertEqual(list(fake_call.dtmf_sent), ["5#"])
        self.assertIn("flow=resume", fake_call.documents[-1].url)
        await self.connect(fake_call, fake_call.streams[-1])
        await deferLater(reactor, 2.5, lambda: None)  # past the bridge's reconnect grace
        self.assertNotIn((await call_status(self.rpc, call_id))["state"], ENDED)
        self.assertFalse(fake_call.is_ended)

    async def test_transfer_is_not_ended_by_the_dropped_stream(self):
        call_id, fake_call, stream, client = await self.start()
        await self.rpc.call("voicecall.transfer", {"callId": call_id, "to": DESK})
        client.close()  # the <Dial> replaced the stream
        await eventually(lambda: fake_call.dialled, 10, "the target dialled")
        await deferLater(reactor, 2.5, lambda: None)  # past the bridge's reconnect grace
        self.assertEqual((await call_status(self.rpc, call_id))["state"], "transferred")
        self.assertFalse(fake_call.is_ended, "still connected to the target")
        self.assertFalse(any(r.form_dict.get("Status") == "completed" for r in self.fake.requests), "no hang-up sent")


class FakeCarrierTests(SynchronousTestCase):
    """The fake's own documented behaviour, on a Clock: AMD both ways, tones, dialling, recordings."""

    def setUp(self):
        from tests.test_fake_twilio import App

        self.clock = Clock()
        self.app = App({"/voice": "<Response><Pause length=\"60\"/></Response>"})
        self.fake = FakeTwilio(self.clock, SID, TOKEN, StubTreq(self.app))
        self.api = StubTreq(self.fake.resource())

    def place(self, scenario, **extra):
        form = {"To": CALLEE, "From": OURS, "Url": "http://app.example/voice", "StatusCallback": "http://app.example/status",
                **extra}
        self.fake.set_scenario(CALLEE, scenario)
        response = self.successResultOf(self.api.post(f"{API}/2010-04-01/Accounts/{SID}/Calls.json", auth=(SID, TOKEN), data=form))
        sid = self.successResultOf(response.json())["sid"]
        self.clock.advance(0)
        return self.fake.calls[sid]

    def test_async_amd_reports_a_machine_after_its_beep(self):
        call = self.place(Scenario(machine=True, greeting_seconds=6), MachineDetection="DetectMessageEnd",
                          AsyncAmd="true", AsyncAmdStatusCallback="http://app.example/amd")
        self.clock.advance(5)
        self.assertEqual(self.app.by_path("/amd"), [], "nothing before the greeting ends")
        self.assertEqual(len(self.app.by_path("/voice")), 1, "the TwiML runs at once")
        self.clock.advance(1)
        (amd,) = self.app.by_path("/amd")
        self.assertEqual(amd["form"]["AnsweredBy"], "machine_end_beep")
        self.assertEqual(amd["form"]["MachineDetectionDuration"], "6000")
        self.assertEqual(call.beep_at, 6)

    def test_sync_amd_fetches_the_twiml_with_the_verdict(self):
        self.place(Scenario(amd_seconds=2), MachineDetection="Enable")
        self.clock.advance(1)
        self.assertEqual(self.app.by_path("/voice"), [])
        self.clock.advance(1.5)
        (fetch,) = self.app.by_path("/voice")
        self.assertEqual(fetch["form"]["AnsweredBy"], "human")

    def test_bad_detection_refused(self):
        response = self.successResultOf(self.api.post(
            f"{API}/2010-04-01/Accounts/{SID}/Calls.json", auth=(SID, TOKEN),
            data={"To": CALLEE, "From": OURS, "Url": "http://app.example/voice", "MachineDetection": "Yes"},
        ))
        self.assertEqual(response.code, 400)

    def test_recording_lifecycle_and_media(self):
        call = self.place(Scenario(recording_delay=3))
        self.clock.advance(1)
        path = f"{API}/2010-04-01/Accounts/{SID}/Calls/{call.sid}/Recordings.json"
        response = self.successResultOf(self.api.post(path, auth=(SID, TOKEN), data={
            "RecordingStatusCallback": "http://app.example/rec", "RecordingStatusCallbackEvent": "in-progress completed",
            "RecordingChannels": "dual",
        }))
        self.assertEqual(response.code, 201)
        body = self.successResultOf(response.json())
        self.assertEqual((body["status"], body["channels"], body["source"]), ("in-progress", 2, "StartCallRecordingAPI"))
        self.clock.advance(10)
        call.hangup_by_callee()
        self.clock.advance(2)
        self.assertEqual([h["form"]["RecordingStatus"] for h in self.app.by_path("/rec")], ["in-progress"])
        self.clock.advance(1.5)
        done = self.app.by_path("/rec")[-1]["form"]
        self.assertEqual((done["RecordingStatus"], done["RecordingDuration"]), ("completed", "10"))
        media = done["RecordingUrl"].replace(done["RecordingUrl"].split("/2010-04-01")[0], API) + ".mp3"
        self.assertEqual(self.successResultOf(self.api.get(media)).code, 401)
        got = self.successResultOf(self.api.get(media, auth=(SID, TOKEN)))
        self.assertEqual((got.code, got.headers.getRawHeaders("content-type")), (200, ["audio/mpeg"]))
        self.assertTrue(self.successResultOf(got.content()).startswith(b"ID3"))

    def test_recording_needs_a_live_call(self):
        call = self.place(Scenario(outcome="no-answer"))
        path = f"{API}/2010-04-01/Accounts/{SID}/Calls/{call.sid}/Recordings.json"
        response = self.successResultOf(self.api.post(path, auth=(SID, TOKEN), data={}))
        self.assertEqual((response.code, self.successResultOf(response.json())["code"]), (400, 21220))
