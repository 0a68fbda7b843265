"""
Plivo end to end: the daemon (in process, real reactor, loopback) against the fake Plivo,
driven through the RPC socket.
"""
from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.client import RemoteError
from voicecall.testing.plivo import FakePlivo, Scenario, signature_headers

from tests.harness import call_status, eventually, free_port, http_client, serve, start_daemon, until_state

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
TOKEN = "fake-plivo-auth-token-for-tests"
CALLEE = "+15550001234"


class PlivoEndToEndTests(TestCase):
    timeout = 60

    async def start(self, scenario=None, signature="v3", plivo=None, **overrides):
        self.http = http_client(self)
        self.fake = FakePlivo(reactor, AUTH_ID, TOKEN, http=self.http, scenario=Scenario() if scenario is None else scenario, signature=signature)
        base = await serve(self, self.fake.resource())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": "plivo",
            "fromNumber": "+15550000000",
            "plivo": {"authId": AUTH_ID, "authToken": TOKEN, "baseUrl": base, **(plivo or {})},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "maxConcurrentCalls": 3,
            "transcriptTimeoutMs": 20000,
            "outbound": {"notifyHangupDelaySec": 1},
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.fake.hang_up_all)

    def fake_call(self):
        (call,) = self.fake.calls.values()
        return call

    async def post_signed(self, params, query="", *, signed_url=None, headers=None, signed=True):
        """Post a callback to the daemon as Plivo would, V3-signed over `signed_url` (default: the URL posted to)."""
        url = self.webhook + query
        hdrs = {"Content-Type": ["application/x-www-form-urlencoded"]}
        if signed:
            for name, value in signature_headers(TOKEN, "POST", signed_url or url, list(params.items())).items():
                hdrs[name] = [value]
        for name, value in (headers or {}).items():
            hdrs[name] = [value]
        response = await self.http.post(url, data=urlencode(params).encode(), headers=hdrs)
        return response.code, await response.content()

    async def conversation(self, scenario):
        await self.start(scenario)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello", "mode": "conversation"}))["callId"]
        await eventually(lambda: self.fake.calls and self.fake_call().speak_texts, 10, "the greeting")
        await until_state(self.rpc, call_id, "listening")  # the greeting has played
        return call_id

    async def test_notify_call(self):
        """A notify call: the message is spoken on answer by an A-leg transfer, then the call is hung up by CallUUID."""
        await self.start()
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Your parcel & co. arrive today", "mode": "notify"}))["callId"]
        await until_state(self.rpc, call_id, "hangup-bot")
        call = self.fake_call()
        self.assertEqual(call.speak_texts, ["Your parcel & co. arrive today"])
        create = next(r for r in self.fake.requests if r.method == "POST" and r.path.endswith("/Call/"))
        self.assertEqual(create.get("answer_url"), f"{self.webhook}?provider=plivo&callId={call_id}&flow=answer")
        self.assertEqual(create.get("hangup_on_ring"), 30)
        transfers = [r for r in self.fake.requests if r.method == "POST" and r.path.endswith(f"/Call/{call.call_uuid}/")]
        self.assertEqual(len(transfers), 1)
        self.assertIn("flow=xml-speak", transfers[0].get("aleg_url"))
        deletes = [r.path for r in self.fake.requests if r.method == "DELETE"]
        self.assertEqual(deletes, [f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/"])
        await eventually(lambda: call.is_ended, 5, "the hang-up at Plivo")
        record = await call_status(self.rpc, call_id)
        self.assertEqual(record["providerCallId"], call.call_uuid)
        self.assertNotIn("initialMessage", record["metadata"])

    async def test_notify_waits_for_the_message_to_end(self):
        """A long notify message is heard out: the hang-up delay counts from the end of <Speak>."""
        message = "Your parcel arrives today between noon and four"  # 47 characters: 1.88 s spoken
        await self.start(Scenario(speak_seconds_per_char=0.04))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": message, "mode": "notify"}))["callId"]
        await until_state(self.rpc, call_id, "hangup-bot")
        record = await call_status(self.rpc, call_id)
        self.assertEqual(self.fake_call().speak_texts, [message])
        self.assertGreaterEqual(record["endedAt"] - record["answeredAt"], 1880 + 1000)

    async def test_v2_signed_callbacks(self):
        """With plivo.allowV2Signatures, callbacks signed with the legacy V2 scheme only are accepted: a notify call completes."""
        await self.start(signature="v2", plivo={"allowV2Signatures": True})
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "V2 here", "mode": "notify"}))["callId"]
        await until_state(self.rpc, call_id, "hangup-bot")
        self.assertEqual(self.fake_call().speak_texts, ["V2 here"])
        self.assertNotIn("X-Plivo-Signature-V3", self.fake.webhooks[0].headers)

    async def test_conversation_call(self):
        """A conversation: the greeting is spoken, continue asks through one GetInput and returns the caller's words."""

        def person(call):
            """Silent, except when asked a question (a GetInput whose action carries a turn token)."""
            return "It's Alice" if call.inputs[-1].turn_token else None

        call_id = await self.conversation(Scenario(utterances=person, silence=0.2))
        self.assertEqual(self.fake_call().speak_texts, ["Hello"])
        answer = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(answer, {"success": True, "transcript": "It's Alice"})
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"]],
            [("bot", "Hello"), ("bot", "Who is this?"), ("user", "It's Alice")],
        )
        asked = [i for i in self.fake_call().inputs if i.turn_token]
        self.assertEqual(len(asked), 1)
        self.assertEqual(self.fake_call().speak_texts, ["Hello", "Who is this?"])
        await self.rpc.call("voicecall.end", {"callId": call_id})
        await eventually(lambda: self.fake_call().is_ended, 5, "the hang-up at Plivo")

    async def test_stale_turn_token_does_not_answer(self):
        """A GetInput result with a wrong or missing turn token does not satisfy a waiting continue; the right one does."""
        call_id = await self.conversation(Scenario(utterances=[], silence=30))
        waiting = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Ready?"})
        token = await eventually(
            lambda: next((i.turn_token for i in self.fake_call().inputs if i.turn_token), None), 10, "the turn's GetInput"
        )
        uuid = self.fake_call().call_uuid
        params = {"CallUUID": uuid, "CallStatus": "in-progress", "Direction": "outbound", "InputType": "speech", "Speech": "stale words"}
        code, _ = await self.post_signed(params, f"?provider=plivo&flow=getinput&callId={call_id}&turnToken=not-the-token")
        self.assertEqual(code, 200)
        code, _ = await self.post_signed({**params, "Speech": "no token"}, f"?provider=plivo&flow=getinput&callId={call_id}")
        self.assertEqual(code, 200)
        # Marker: answers on one RPC connection come in order, and the webhooks above were
        # answered after their speech was applied, so a continue they satisfied answers first.
        await call_status(self.rpc, call_id)
        self.assertFalse(waiting.called)
        code, _ = await self.post_signed(
            {**params, "Speech": "real answer"}, f"?provider=plivo&flow=getinput&callId={call_id}&turnToken={token}"
        )
        self.assertEqual(code, 200)
        self.assertEqual((await waiting)["transcript"], "real answer")
        texts = [t["text"] for t in (await call_status(self.rpc, call_id))["transcript"]]
        self.assertNotIn("stale words", texts)

    async def test_replayed_callback(self):
        """The same signed callback twice: 200 and the same answer both times, one effect."""
        call_id = await self.conversation(Scenario(utterances=[], silence=30))
        params = {"CallUUID": self.fake_call().call_uuid, "CallStatus": "in-progress", "Speech": "just once"}
        url = f"{self.webhook}?provider=plivo&flow=getinput&callId={call_id}"
        headers = signature_headers(TOKEN, "POST", url, list(params.items()))
        query = url[len(self.webhook):]
        first = await self.post_signed(params, query, headers=headers, signed=False)
        second = await self.post_signed(params, query, headers=headers, signed=False)
        self.assertEqual(first, (200, b'<Response><Wait length="300" /></Response>'))
        self.assertEqual(second, first)
        texts = [t["text"] for t in (await call_status(self.rpc, call_id))["transcript"]]
        self.assertEqual(texts.count("just once"), 1)

    async def test_forged_requests_are_refused(self):
        """A tampered body, a signature over another URL, or no signature: 401 and no state change."""
        call_id = await self.conversation(Scenario(utterances=[], silence=30))
        before = await call_status(self.rpc, call_id)
        params = {"CallUUID": self.fake_call().call_uuid, "CallStatus": "completed", "Event": "Hangup"}
        query = f"?provider=plivo&flow=hangup&callId={call_id}"
        good = signature_headers(TOKEN, "POST", self.webhook + query, list(params.items()))
        tampered = await self.post_signed({**params, "CallStatus": "busy"}, query, headers=good, signed=False)
        other_url = await self.post_signed(params, query, signed_url="https://evil.example/voice/webhook" + query)
        unsigned = await self.post_signed(params, query, signed=False)
        self.assertEqual([tampered[0], other_url[0], unsigned[0]], [401, 401, 401])
        after = await call_status(self.rpc, call_id)
        self.assertEqual(after["state"], before["state"])
        self.assertIsNone(self.service.manager.find(call_id).end_reason)

    async def test_api_error_reaches_rpc(self):
        """A Plivo 4xx on make-call reaches the RPC as `Plivo API error: <status> <body>` and the call ends failed."""
        await self.start()
        self.fake.fail_next(400, b'{"api_id": "a-1", "error": "invalid destination"}')
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi"})
        self.assertEqual(str(caught.exception), 'Plivo API error: 400 {"api_id": "a-1", "error": "invalid destination"}')
        record = await call_status(self.rpc, caught.exception.data["callId"])
        self.assertEqual(record["state"], "failed")
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])
        self.assertEqual(self.fake.calls, {})

    async def test_inbound_call(self):
        """An inbound call is answered by our XML, greeted through a transfer, and a rejected caller is hung up."""
        await self.start(inboundPolicy="allowlist", allowFrom=["+15551230000"], inboundGreeting="Welcome in")
        call = self.fake.place_inbound_call("+15551230000", "+15550000000", self.webhook, hangup_url=self.webhook)
        await eventually(lambda: call.speak_texts, 10, "the inbound greeting")
        self.assertEqual(call.speak_texts, ["Welcome in"])
        (active,) = (await self.rpc.call("voicecall.status", {}))["calls"]
        self.assertEqual((active["direction"], active["providerCallId"], active["from"]), ("inbound", call.call_uuid, "+15551230000"))
        stranger = self.fake.place_inbound_call("+15559999999", "+15550000000", self.webhook)
        await eventually(lambda: stranger.is_ended, 10, "the rejected caller's hang-up")
        self.assertEqual(stranger.speak_texts, [])
        self.assertEqual(len((await self.rpc.call("voicecall.status", {}))["calls"]), 1)

    async def test_continue_before_the_answer(self):
        """The gateway's usual flow, `continue` at once after `initiate`: it waits for the answer and the greeting."""
        await self.test_continue_during_the_greeting(during_greeting=False)

    async def test_continue_during_the_greeting(self, during_greeting=True):
        """Issue 13.1: a `continue` sent while the greeting plays waits for it, and each answer is its own question's."""
        greeting = "Hello there, thanks for picking up the phone today"  # 50 characters: 1.5 s spoken

        def person(call):
            """Answers only a question carrying a turn token, naming the question it heard."""
            record = call.inputs[-1]
            return f"answer to {call.speak_texts[-1]}" if record.turn_token else None

        await self.start(Scenario(utterances=person, silence=0.3, speak_seconds_per_char=0.03, answer_after=0.0 if during_greeting else 0.5), transcriptTimeoutMs=8000)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": greeting, "mode": "conversation"}))["callId"]
        if during_greeting:
            await eventually(lambda: self.fake.calls and self.fake_call().speak_texts, 10, "the greeting")
        first = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(first, {"success": True, "transcript": "answer to Who is this?"})
        second = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Where are you?"})
        self.assertEqual(second, {"success": True, "transcript": "answer to Where are you?"})
        self.assertEqual(self.fake_call().speak_texts, [greeting, "Who is this?", "Where are you?"])
        spoken = [h for h in self.fake.webhooks if "flow=spoken" in h.url]
        self.assertEqual(len(spoken), 1, "the greeting was played to its end")
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"]],
            [
                ("bot", greeting),
                ("bot", "Who is this?"),
                ("user", "answer to Who is this?"),
                ("bot", "Where are you?"),
                ("user", "answer to Where are you?"),
            ],
        )
        await self.rpc.call("voicecall.end", {"callId": call_id})
