"""
Twilio end to end: the daemon (in process, real reactor, loopback) against the fake Twilio,
driven through the RPC socket; plus the Twilio adapter's REST failure handling.
"""
from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.client import RemoteError
from voicecall.domain.model import CallRecord, Direction
from voicecall.domain.carrier import ProviderError
from voicecall.providers.twilio import TwilioProvider
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request

from tests.harness import call_status, eventually, free_port, http_client, serve, start_daemon, until_state

SID = "AC" + "0" * 32
TOKEN = "fake-auth-token-for-tests"
CALLEE = "+15550001234"


class TwilioEndToEndTests(TestCase):
    timeout = 60

    async def start(self, scenario=None, **overrides):
        self.http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.http, scenario=Scenario() if scenario is None else scenario)
        base = await serve(self, self.fake.resource())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "maxConcurrentCalls": 3,
            "transcriptTimeoutMs": 20000,
            **overrides,
        }
        config = {k: v for k, v in config.items() if v is not None}
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.hang_up_fake_calls)

    async def hang_up_fake_calls(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    def fake_call(self):
        (call,) = self.fake.calls.values()
        return call

    async def post_signed(self, params, query="", url=None, signature=None, headers=None):
        url = url or self.webhook + query
        sig = signature if signature is not None else sign_request(TOKEN, url, params)
        hdrs = {"Content-Type": ["application/x-www-form-urlencoded"]}
        if sig:
            hdrs["X-Twilio-Signature"] = [sig]
        for k, v in (headers or {}).items():
            hdrs[k] = [v]
        response = await self.http.post(self.webhook + query, data=urlencode(params).encode(), headers=hdrs)
        return response.code, await response.content()

    async def test_notify_call(self):
        """A notify call: Twilio is asked for the four status events, fetches the notify TwiML once, and completes."""
        await self.start()
        result = await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Your parcel & co. arrive today", "mode": "notify"})
        call_id = result["callId"]
        await until_state(self.rpc, call_id, "completed")
        create = next(r for r in self.fake.requests if r.path.endswith("/Calls.json"))
        self.assertEqual(create.getall("StatusCallbackEvent"), ["initiated", "ringing", "answered", "completed"])
        self.assertEqual(create.get("Url"), f"{self.webhook}?callId={call_id}")
        call = self.fake_call()
        self.assertEqual(call.say_texts, ["Your parcel & co. arrive today"])
        twiml_fetches = [w for w in self.fake.webhooks if w.kind == "twiml"]
        self.assertEqual(len(twiml_fetches), 1)
        self.assertIn(b"<Hangup/>", twiml_fetches[0].body)
        record = await call_status(self.rpc, call_id)
        self.assertNotIn("initialMessage", record["metadata"])

    async def test_notify_message_in_transcript(self):
        """The notify message Twilio says from the stored TwiML is in the transcript, once, like other carriers'."""
        await self.start()
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Your table is ready", "mode": "notify"}))["callId"]
        await until_state(self.rpc, call_id, "completed")
        record = await call_status(self.rpc, call_id)
        self.assertEqual([(t["speaker"], t["text"]) for t in record["transcript"]], [("bot", "Your table is ready")])

    async def test_conversation_call(self):
        """A conversation: the greeting is said, continue speaks over a Gather and returns the caller's words."""
        def person(call):
            """Silent, except when asked the question (the Gather that carries a turn token)."""
            return "It's Alice" if "turnToken=" in (call.gathers[-1].action_url or "") else None

        await self.start(Scenario(utterances=person, silence=0.2))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi there", "mode": "conversation"}))["callId"]
        await eventually(lambda: "Hi there" in self.fake_call().say_texts, 10, "the greeting")
        answer = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(answer, {"success": True, "transcript": "It's Alice"})
        record = await call_status(self.rpc, call_id)
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"]],
            [("bot", "Hi there"), ("bot", "Who is this?"), ("user", "It's Alice")],
        )
        action = [g for g in self.fake_call().gathers if "turnToken=" in (g.action_url or "")]
        self.assertTrue(action, "the continue Gather carries a turn token")
        await self.rpc.call("voicecall.end", {"callId": call_id})
        await eventually(lambda: self.fake_call().status in ("completed", "canceled"), 5, "hang-up at Twilio")

    async def test_continue_before_the_answer(self):
        """The gateway's usual flow, `continue` at once after `initiate`: it waits for the answer and the greeting."""
        await self.test_continue_during_the_greeting(during_greeting=False)

    async def test_continue_during_the_greeting(self, during_greeting=True):
        """Issue 13.1: a `continue` sent while the greeting is said waits for its end; each answer is its own question's."""
        greeting = "Hello there, thanks for picking up the phone today"  # 50 characters: 1.5 s said

        def person(call):
            """Answers only a question (a Gather whose action carries a turn token), naming what it last heard."""
            return f"answer to {call.say_texts[-1]}" if "turnToken=" in (call.gathers[-1].action_url or "") else None

        await self.start(Scenario(utterances=person, silence=0.3, say_seconds_per_char=0.03, answer_after=0.0 if during_greeting else 0.5), transcriptTimeoutMs=8000)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": greeting, "mode": "conversation"}))["callId"]
        if during_greeting:
            await eventually(lambda: self.fake.calls and greeting in self.fake_call().say_texts, 10, "the greeting")
        first = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Who is this?"})
        self.assertEqual(first, {"success": True, "transcript": "answer to Who is this?"})
        second = await self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Where are you?"})
        self.assertEqual(second, {"success": True, "transcript": "answer to Where are you?"})
        self.assertEqual(self.fake_call().say_texts, [greeting, "Who is this?", "Where are you?"])
        self.assertEqual(list(self.fake_call().said), [greeting, "Who is this?", "Where are you?"], "nothing was cut short")
        asked = [g for g in self.fake_call().gathers if "turnToken=" in (g.action_url or "")]
        self.assertEqual(len(asked), 2)
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

    async def test_stale_turn_token_does_not_answer(self):
        """A Gather result with a stale or missing turn token does not satisfy a waiting continue."""
        await self.start(Scenario(utterances=[], silence=30))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello", "mode": "conversation"}))["callId"]
        await eventually(lambda: self.fake_call().say_texts, 10, "the greeting")
        waiting = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Ready?"})
        token = await eventually(
            lambda: next((g.action_url.split("turnToken=")[1] for g in self.fake_call().gathers if "turnToken=" in (g.action_url or "")), None),
            5,
            "the turn's Gather",
        )
        sid = self.fake_call().sid
        params = {"CallSid": sid, "AccountSid": SID, "CallStatus": "in-progress", "Direction": "outbound-api", "SpeechResult": "stale words"}
        code, _ = await self.post_signed(params, f"?callId={call_id}&turnToken=not-the-token")
        self.assertEqual(code, 200)
        code, _ = await self.post_signed({**params, "SpeechResult": "no token"}, f"?callId={call_id}")
        self.assertEqual(code, 200)
        # Marker: answers on one RPC connection come in order, and the webhooks above were
        # answered after their speech was applied, so a continue they satisfied answers first.
        await call_status(self.rpc, call_id)
        self.assertFalse(waiting.called)
        code, _ = await self.post_signed({**params, "SpeechResult": "real answer"}, f"?callId={call_id}&turnToken={token}")
        self.assertEqual((await waiting)["transcript"], "real answer")

    async def test_replayed_callback(self):
        """A replayed signed callback answers 200 with empty TwiML and changes nothing."""
        await self.start(Scenario(utterances=[], silence=30))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello", "mode": "conversation"}))["callId"]
        await eventually(lambda: self.fake_call().say_texts, 10, "the greeting")
        params = {"CallSid": self.fake_call().sid, "AccountSid": SID, "CallStatus": "in-progress", "Direction": "outbound-api", "SpeechResult": "just once"}
        first = await self.post_signed(params, f"?callId={call_id}")
        second = await self.post_signed(params, f"?callId={call_id}")
        self.assertEqual(first[0], 200)
        self.assertEqual(second, (200, b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'))
        texts = [t["text"] for t in (await call_status(self.rpc, call_id))["transcript"]]
        self.assertEqual(texts.count("just once"), 1)

    async def test_forged_requests_are_refused(self):
        """A tampered body, a signature over another URL, or no signature: 401 and no state change."""
        await self.start(Scenario(utterances=[], silence=30))
        call_id = (await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello", "mode": "conversation"}))["callId"]
        await eventually(lambda: self.fake_call().say_texts, 10, "the greeting")
        await until_state(self.rpc, call_id, "listening")  # the greeting has been said
        before = await call_status(self.rpc, call_id)
        params = {"CallSid": self.fake_call().sid, "CallStatus": "completed", "Direction": "outbound-api"}
        good = sign_request(TOKEN, f"{self.webhook}?callId={call_id}", params)
        tampered = await self.post_signed({**params, "CallStatus": "busy"}, f"?callId={call_id}", signature=good)
        other_url = await self.post_signed(params, f"?callId={call_id}", url="https://evil.example/voice/webhook")
        unsigned = await self.post_signed(params, f"?callId={call_id}", signature="")
        self.assertEqual([tampered[0], other_url[0], unsigned[0]], [401, 401, 401])
        after = await call_status(self.rpc, call_id)
        self.assertEqual(after["state"], before["state"])
        self.assertEqual(self.service.manager.find(call_id).end_reason, None)

    async def test_api_error_reaches_rpc(self):
        """A Twilio 4xx on create reaches the RPC with the SPEC text and the call ends failed."""
        await self.start()
        self.fake.fail_next(400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400})
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi"})
        message = str(caught.exception)
        self.assertTrue(message.startswith("Twilio API error: 400 "), message)
        self.assertIn("21211", message)
        record = await call_status(self.rpc, caught.exception.data["callId"])
        self.assertEqual(record["state"], "failed")
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])

    async def test_server_error_and_refused_connection(self):
        """A Twilio 5xx and an unreachable API both fail initiate cleanly and free the call slot."""
        await self.start()
        self.fake.fail_next(503, b"upstream unavailable")
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi"})
        self.assertEqual(str(caught.exception), "Twilio API error: 503 upstream unavailable")
        self.service._provider._api._base = "http://127.0.0.1:1/2010-04-01/Accounts/" + SID
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hi"})
        self.assertIn("Twilio API error: cannot connect", str(caught.exception))
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])

    async def test_forwarded_host_needs_a_trusted_proxy(self):
        """A spoofed X-Forwarded-Host is ignored unless the request comes from a trusted proxy."""
        await self.start(publicUrl=None)
        params = {"CallSid": "CA" + "1" * 32, "CallStatus": "ringing", "Direction": "outbound-api"}
        spoofed = sign_request(TOKEN, "https://evil.example/voice/webhook", params)
        code, _ = await self.post_signed(params, signature=spoofed, headers={"X-Forwarded-Host": "evil.example"})
        self.assertEqual(code, 401)
        await self.service.stopService()
        await self.start(
            publicUrl=None,
            webhookSecurity={"allowedHosts": ["evil.example"], "trustForwardingHeaders": True, "trustedProxyIPs": ["127.0.0.1"]},
        )
        code, _ = await self.post_signed(params, signature=spoofed, headers={"X-Forwarded-Host": "evil.example"})
        self.assertEqual(code, 200)


class TwilioRestTests(TestCase):
    """The adapter's REST calls against the fake Twilio: retries, 404 tolerance, time limits."""

    timeout = 30

    async def setUp(self):
        self.http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN)
        self.base = await serve(self, self.fake.resource())
        self.provider = TwilioProvider(http=self.http, clock=reactor, account_sid=SID, auth_token=TOKEN, base_url=self.base)
        self.addCleanup(lambda: [c.hangup_by_callee() for c in list(self.fake.calls.values())])

    def call(self, sid) -> CallRecord:
        return CallRecord(call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state="answered", from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=sid)

    async def test_hangup_of_unknown_call_is_tolerated(self):
        """Hanging up a call Twilio does not know (404) succeeds."""
        await self.provider.hangup_call(self.call("CA" + "f" * 32), "hangup-bot")

    async def test_status(self):
        """Status maps Twilio's answer; an unknown call is terminal `not-found`."""
        placed = await self.provider.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url="http://127.0.0.1:9/voice/webhook")
        status = await self.provider.get_call_status(placed.provider_call_id)
        self.assertEqual((status.status, status.is_terminal), ("queued", False))
        status = await self.provider.get_call_status("CA" + "e" * 32)
        self.assertEqual((status.status, status.is_terminal), ("not-found", True))

    async def test_live_update_retries_21220(self):
        """A live update refused with 21220 (call not in progress yet) is tried three times in all, then fails."""
        placed = await self.provider.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url="http://127.0.0.1:9/voice/webhook")
        with self.assertRaises(ProviderError) as caught:
            await self.provider.speak(self.call(placed.provider_call_id), "hello", None)
        self.assertEqual(caught.exception.code, 21220)
        updates = [r for r in self.fake.requests if "Twiml" in r.form_dict]
        self.assertEqual(len(updates), 3)

    async def test_live_update_recovers_after_21220(self):
        """A live update refused once with 21220 succeeds on the retry."""
        placed = await self.provider.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url="http://127.0.0.1:9/voice/webhook")
        self.fake.calls[placed.provider_call_id].status = "in-progress"
        body = {"code": 21220, "message": "Call is not in-progress. Cannot redirect.", "status": 400}
        self.fake.fail_next(400, body, match=lambda r: "Twiml" in r.form_dict)
        await self.provider.speak(self.call(placed.provider_call_id), "hello", None)
        updates = [r for r in self.fake.requests if "Twiml" in r.form_dict]
        self.assertEqual(len(updates), 2)

    async def test_hanging_api_times_out(self):
        """An API that never answers fails the request after the time limit, with the SPEC prefix."""
        self.provider._api._timeout = 0.3
        self.fake.hang_next()
        d = self.provider.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url="http://127.0.0.1:9/voice/webhook")
        try:
            await d
        except ProviderError as e:
            self.assertEqual(str(e), "Twilio API error: no answer within 0.3s")
        else:
            self.fail("no error")
        self.fake.abort_held()
