"""
Telnyx end to end: the daemon (in process, real reactor, loopback) against the fake Telnyx,
driven through the RPC socket.
"""
from __future__ import annotations

import base64
import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.client import RemoteError
from voicecall.testing.telnyx import FakeTelnyx, Scenario, envelope, error_body, iso8601

from tests.harness import call_status, eventually, free_port, http_client, serve, start_daemon, until_state

API_KEY = "KEY0123456789_fake_telnyx"
CONNECTION = "1234567890"
OURS = "+15550000000"
CALLEE = "+15550001234"


class TelnyxEndToEndTests(TestCase):
    timeout = 60

    async def start(self, scenario=None, **overrides):
        self.http = http_client(self)
        self.fake = FakeTelnyx(reactor, API_KEY, self.http, connection_id=CONNECTION, scenario=Scenario() if scenario is None else scenario)
        base = await serve(self, self.fake.resource())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": "telnyx",
            "fromNumber": OURS,
            "telnyx": {"apiKey": API_KEY, "connectionId": CONNECTION, "publicKey": self.fake.public_key, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "maxConcurrentCalls": 3,
            "transcriptTimeoutMs": 20000,
            "outbound": {"notifyHangupDelaySec": 1},
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.hang_up_fake_calls)

    async def hang_up_fake_calls(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.close()

    def fake_call(self):
        (call,) = self.fake.calls.values()
        return call

    async def initiate(self, message, mode):
        result = await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": message, "mode": mode})
        return result["callId"]

    async def post(self, body, headers):
        hdrs = {"Content-Type": ["application/json"], **{k: [v] for k, v in headers.items()}}
        response = await self.http.post(self.webhook, data=body, headers=hdrs)
        return response.code, await response.content()

    def transcription(self, call, words):
        payload = {
            "call_control_id": call.call_control_id,
            "client_state": call.client_state,
            "direction": "outgoing",
            "transcription_data": {"transcript": words, "is_final": True, "confidence": 0.9},
        }
        return envelope("call.transcription", payload, occurred_at=iso8601(reactor.seconds()))

    async def test_notify_call(self):
        """A notify call is dialled with our call id as client_state, spoken on answer, then hung up after the delay."""
        await self.start()
        call_id = await self.initiate("Your parcel arrives today", "notify")
        record = await until_state(self.rpc, call_id, "hangup-bot")
        dial = next(r for r in self.fake.requests if r.path == "/v2/calls")
        body = dial.json
        self.assertEqual(dial.header("Authorization"), f"Bearer {API_KEY}")
        self.assertEqual(base64.b64decode(body["client_state"]).decode(), call_id)
        self.assertEqual(
            {k: body[k] for k in ("connection_id", "to", "from", "webhook_url", "timeout_secs")},
            {"connection_id": CONNECTION, "to": CALLEE, "from": OURS, "webhook_url": self.webhook, "timeout_secs": 30},
        )
        call = self.fake_call()
        await eventually(lambda: not call.is_alive, 5, "the hang-up at Telnyx")
        self.assertEqual(call.speak_texts, ["Your parcel arrives today"])
        self.assertEqual((call.speaks[0].voice, call.speaks[0].language), ("female", "en-US"))
        self.assertEqual((call.hangup_cause, call.hangup_source), ("normal_clearing", "caller"))
        self.assertEqual([t["text"] for t in record["transcript"]], ["Your parcel arrives today"])
        self.assertGreaterEqual(record["endedAt"] - record["answeredAt"], 1000)
        commands = [r.json["command_id"] for r in self.fake.requests if r.json and "command_id" in r.json]
        self.assertEqual(len(commands), len(set(commands)))

    async def test_notify_waits_for_the_message_to_end(self):
        """A long notify message is heard out: the hang-up delay counts from call.speak.ended."""
        message = "Your parcel arrives today between noon and four"  # 47 characters: 1.88 s spoken
        await self.start(Scenario(say_seconds_per_char=0.04))
        call_id = await self.initiate(message, "notify")
        record = await until_state(self.rpc, call_id, "hangup-bot")
        self.assertEqual(self.fake_call().speak_texts, [message])
        self.assertGreaterEqual(record["endedAt"] - record["answeredAt"], 1880 + 1000)

    async def test_conversation_call(self):
        """The greeting is spoken and transcribed for; continue speaks and returns the caller's words."""
        def person(call):
            return "It's Alice" if call.last_speak == "Who is this?" else None

        await self.start(Scenario(utterances=person))
        call_id = await self.initiate("Hi there", "conversation")
        await eventually(lambda: self.fake_call().transcribing, 10, "transcription after the greeting")
        answer = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(answer, {"success": True, "transcript": "It's Alice"})
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"]],
            [("bot", "Hi there"), ("bot", "Who is this?"), ("user", "It's Alice")],
        )
        call = self.fake_call()
        self.assertEqual(call.speak_texts, ["Hi there", "Who is this?"])
        # The greeting's transcription (plain client_state), stopped and started again for the
        # turn, with its turn token.
        greeting, turn = call.transcription_starts
        self.assertEqual(base64.b64decode(greeting["client_state"]).decode(), call_id)
        self.assertEqual(set(json.loads(base64.b64decode(turn["client_state"]))), {"c", "t"})
        self.assertEqual(turn["transcription_engine_config"]["language"], "en")
        await eventually(lambda: not call.transcribing, 5, "transcription_stop")
        await self.rpc.call("voicecall.end", {"callId": call_id})
        await eventually(lambda: not call.is_alive, 5, "hang-up at Telnyx")

    async def test_continue_during_the_greeting(self):
        """Issue 13.1: a `continue` sent at once after `initiate` waits for the greeting; each answer is its own question's."""
        greeting = "Hello there, thanks for picking up the phone today"  # 50 characters: 1.5 s spoken

        scenario = Scenario(utterances=lambda call: f"answer to {call.last_speak}", say_seconds_per_char=0.03, answer_after=0.5)
        await self.start(scenario, transcriptTimeoutMs=8000)
        call_id = await self.initiate(greeting, "conversation")  # the continue follows at once, before the answer
        first = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(first, {"success": True, "transcript": "answer to Who is this?"})
        second = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Where are you?"})
        self.assertEqual(second, {"success": True, "transcript": "answer to Where are you?"})
        self.assertEqual(self.fake_call().speak_texts, [greeting, "Who is this?", "Where are you?"])
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"] if t["text"] != f"answer to {greeting}"],
            [
                ("bot", greeting),
                ("bot", "Who is this?"),
                ("user", "answer to Who is this?"),
                ("bot", "Where are you?"),
                ("user", "answer to Where are you?"),
            ],
        )
        await self.rpc.call("voicecall.end", {"callId": call_id})

    async def test_each_continue_gets_its_own_answer(self):
        """
        Issue 13 on Telnyx: initiate('Greeting 1?'), speak, continue('Question 3?') returns the
        answer to 'Question 3?'. The callee is slow to answer the greeting (its transcript would
        arrive while the continue waits), and a transcript Telnyx sent before the turn listened
        (the plain client_state: no turn token) delivered late is ignored; the turn's own
        answer carries its token in client_state.
        """
        def person(call):
            asked = call.last_speak or ""
            return f"answer to {asked}" if asked.endswith("?") else None

        await self.start(Scenario(utterances=person, answer_after=0.2, speech_delay=1.0, say_seconds_per_char=0.01))
        call_id = await self.initiate("Greeting 1?", "conversation")
        await eventually(lambda: self.fake_call().transcribing, 10, "transcription after the greeting")
        call = self.fake_call()
        plain = call.client_state
        self.assertEqual(base64.b64decode(plain).decode(), call_id)
        await self.rpc.call("voicecall.speak", {"callId": call_id, "message": "Please hold."})
        asked = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Question 3?"})
        await eventually(lambda: call.client_state != plain, 10, "the turn's client_state")
        self.assertEqual(set(json.loads(base64.b64decode(call.client_state))), {"c", "t"})
        late = self.transcription(call, "answer to Greeting 1?")
        late = late.replace(call.client_state.encode(), plain.encode())
        self.assertEqual(await self.post(late, self.fake.signed_headers(late)), (200, b"OK"))
        self.assertEqual(await asked, {"success": True, "transcript": "answer to Question 3?"})
        self.assertIn("answer to Greeting 1?", list(call.said))  # said, never taken as an answer
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"]],
            [("bot", "Greeting 1?"), ("bot", "Please hold."), ("bot", "Question 3?"), ("user", "answer to Question 3?")],
        )
        await self.rpc.call("voicecall.end", {"callId": call_id})

    async def test_callee_hangs_up(self):
        """The callee hanging up (normal_clearing) completes the call."""
        await self.start(Scenario(hangup_after=0.5))
        call_id = await self.initiate("Hello", "conversation")
        record = await until_state(self.rpc, call_id, "completed")
        self.assertEqual(record["endReason"], "completed")
        self.assertEqual(self.fake_call().hangup_source, "callee")
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])

    async def test_inbound_call_is_answered(self):
        """An accepted inbound call is answered through the API, greeted, and carries our call id afterwards."""
        await self.start(inboundPolicy="open", inboundGreeting="Welcome")
        call = self.fake.place_inbound_call("+15557654321", OURS, self.webhook)
        await eventually(lambda: call.transcribing, 10, "transcription after the greeting")
        self.assertEqual(call.speak_texts, ["Welcome"])
        answer = next(body for action, body in call.commands if action == "answer")
        (active,) = (await self.rpc.call("voicecall.status", {}))["calls"]
        self.assertEqual(base64.b64decode(answer["client_state"]).decode(), active["callId"])
        self.assertEqual((active["direction"], active["from"], active["providerCallId"]), ("inbound", "+15557654321", call.call_control_id))

    async def test_replayed_webhook(self):
        """The same signed request twice: 200 both times and a single effect."""
        await self.start(Scenario(utterances=[]))
        call_id = await self.initiate("Hello", "conversation")
        await eventually(lambda: self.fake_call().transcribing, 10, "transcription")
        body = self.transcription(self.fake_call(), "just once")
        headers = self.fake.signed_headers(body)
        first = await self.post(body, headers)
        second = await self.post(body, headers)
        self.assertEqual(first, (200, b"OK"))
        self.assertEqual(second, (200, b"OK"))
        texts = [t["text"] for t in (await call_status(self.rpc, call_id))["transcript"]]
        self.assertEqual(texts.count("just once"), 1)

    async def test_forged_requests_are_refused(self):
        """A tampered body, an unsigned request and a 301 s old timestamp get 401 and change nothing."""
        await self.start(Scenario(utterances=[]))
        call_id = await self.initiate("Hello", "conversation")
        await eventually(lambda: self.fake_call().transcribing, 10, "transcription")
        before = await call_status(self.rpc, call_id)
        call = self.fake_call()
        hangup = envelope(
            "call.hangup",
            {"call_control_id": call.call_control_id, "client_state": call.client_state, "hangup_cause": "user_busy"},
            occurred_at=iso8601(reactor.seconds()),
        )
        signed = self.fake.signed_headers(hangup)
        tampered = await self.post(hangup.replace(b"user_busy", b"call_rejected"), signed)
        unsigned = await self.post(hangup, {})
        stale = await self.post(hangup, self.fake.signed_headers(hangup, int(reactor.seconds()) - 301))
        self.assertEqual([tampered[0], unsigned[0], stale[0]], [401, 401, 401])
        after = await call_status(self.rpc, call_id)
        self.assertEqual((after["state"], after.get("endReason")), (before["state"], None))
        self.assertEqual(after["transcript"], before["transcript"])
        self.assertTrue(call.is_alive)

    async def test_api_error_on_dial(self):
        """A Telnyx API error on dial reaches the RPC as `Telnyx API error: <status> <body>` and the call fails."""
        await self.start()
        body = error_body("10016", "Phone number must be in +E.164 format", "The specified phone number parameter must be in +E.164 format.")
        self.fake.fail_next(422, body)
        with self.assertRaises(RemoteError) as caught:
            await self.initiate("Hi", "notify")
        self.assertEqual(str(caught.exception), "Telnyx API error: 422 " + json.dumps(body))
        record = await call_status(self.rpc, caught.exception.data["callId"])
        self.assertEqual(record["state"], "failed")
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])
        self.assertEqual(self.fake.calls, {})
