"""
Automatic replies: the spoken-output extraction, and callers answered through the real daemon
(mock provider) by a registered gateway or by the built-in chat client against a fake API.
"""
from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.domain.model import CallOptions
from voicecall.control.rpc import GatewayError
from voicecall.speech.responder import APOLOGY, extract_spoken, model_name
from voicecall.testing.chat import FakeChatCompletions
from voicecall.testing.gateway import TestGateway

from tests.harness import eventually, http_client, serve, start_daemon


class ExtractSpokenTests(SynchronousTestCase):
    def test_direct_json(self):
        """A direct JSON answer gives its spoken field."""
        self.assertEqual(extract_spoken('{"spoken": " Hello there. "}'), "Hello there.")

    def test_fenced_json(self):
        """JSON inside a code fence is found."""
        self.assertEqual(extract_spoken('Sure!\n```json\n{"spoken": "It is 5 pm."}\n```'), "It is 5 pm.")

    def test_inline_key(self):
        """An inline spoken key inside other text is found, escapes decoded."""
        self.assertEqual(extract_spoken('Answer: "spoken": "Say \\"hi\\" to Bob" -- done'), 'Say "hi" to Bob')

    def test_plain_text_without_planning(self):
        """Plain text is spoken less its leading planning paragraphs."""
        text = "Thinking: the caller wants the time.\n\nLet me check.\n\nIt's five o'clock."
        self.assertEqual(extract_spoken(text), "It's five o'clock.")

    def test_empty_spoken(self):
        """An empty spoken string means say nothing."""
        self.assertEqual(extract_spoken('{"spoken": ""}'), "")

    def test_model_name(self):
        """provider/model keeps the model; a bare name is kept; none gives the default."""
        self.assertEqual(model_name("openai/gpt-4o-mini"), "gpt-4o-mini")
        self.assertEqual(model_name("gpt-4.1"), "gpt-4.1")
        self.assertEqual(model_name(None), "gpt-4o-mini")


class AutoReplyTests(TestCase):
    timeout = 30

    async def start(self, **config):
        self.http = http_client(self)
        self.chat = FakeChatCompletions(api_key="sk-test", reply=lambda body: '{"spoken": "Built-in answer."}')
        base = await serve(self, self.chat.resource())
        self.service, self.rpc = await start_daemon(
            self,
            {
                "provider": "mock",
                "inboundPolicy": "allowlist",
                "allowFrom": ["+15550001234"],
                "responseBaseUrl": base + "/v1",
                "responseApiKey": "sk-test",
                "responseTimeoutMs": 1000,
                **config,
            },
        )

    async def post(self, event: dict):
        response = await self.http.post(self.service.webhook_url, data=json.dumps({"event": event}).encode())
        await response.content()
        return response.code

    async def inbound(self) -> str:
        await self.post({"type": "call.initiated", "callId": "CA1", "providerCallId": "CA1", "direction": "inbound", "from": "+15550001234", "to": "+15550000000"})
        await self.post({"type": "call.answered", "callId": "CA1", "providerCallId": "CA1"})
        call = await eventually(lambda: self.service.manager.find("CA1"), 5, "the inbound call")
        await self.until_said(call.call_id, "Hello! How can I help you today?")
        return call.call_id

    async def said(self, call_id):
        record = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        return [t["text"] for t in record["transcript"] if t["speaker"] == "bot"]

    async def until_said(self, call_id, text):
        async def spoken():
            return text in await self.said(call_id)

        await eventually(spoken, 5, f"the bot to say {text!r}")

    async def gateway(self, answer):
        gateway = await TestGateway(answer).register(reactor, self.service._rpc.port.getHost().name)
        self.addCleanup(gateway.close)
        return gateway

    async def test_builtin_answers(self):
        """Without a gateway, the built-in client answers with the spoken field and the conversation so far."""
        await self.start()
        call_id = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "What time is it?"})
        await self.until_said(call_id, "Built-in answer.")
        body = self.chat.requests[-1]
        self.assertEqual(body["model"], "gpt-4o-mini")
        self.assertEqual(body["messages"][-1], {"role": "user", "content": "What time is it?"})
        self.assertIn("Conversation so far:\nYou: Hello! How can I help you today?\n\nAnswer", body["messages"][0]["content"])
        self.assertIn('{"spoken"', body["messages"][0]["content"])

    async def test_gateway_wins(self):
        """A registered gateway is asked instead of the built-in client, with the call and transcript."""
        await self.start()
        gateway = await self.gateway(lambda params: f"You said: {params['text']}")
        call_id = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "hello"})
        await self.until_said(call_id, "You said: hello")
        self.assertEqual(len(self.chat.requests), 0)
        request = gateway.requests[-1]
        self.assertEqual((request["callId"], request["direction"], request["from"], request["text"]), (call_id, "inbound", "+15550001234", "hello"))
        self.assertEqual(request["transcript"][-1]["text"], "hello")

    async def test_stale_reply_dropped(self):
        """A reply still being generated when the caller speaks again is never spoken."""
        await self.start()
        pending: dict[str, Deferred] = {}

        def answer(params):
            d = Deferred()
            pending[params["text"]] = d
            return d

        await self.gateway(answer)
        call_id = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "first"})
        await eventually(lambda: "first" in pending, 5, "the first request")
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "second"})
        await eventually(lambda: "second" in pending, 5, "the second request")
        pending["first"].callback("reply to first")
        pending["second"].callback("reply to second")
        await self.until_said(call_id, "reply to second")
        self.assertNotIn("reply to first", await self.said(call_id))

    async def test_failing_responder_apologises(self):
        """A failing responder is logged, the caller hears the apology, and the call goes on."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await self.start()
        await self.gateway(lambda params: (_ for _ in ()).throw(RuntimeError("gateway broke")))
        call_id = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "hello?"})
        await self.until_said(call_id, APOLOGY)
        self.assertEqual((await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]["state"], "listening")
        self.assertEqual(len(self.flushLoggedErrors(GatewayError)), 1)
        # The operator sees one warning line with the reason; the traceback is for debug level only.
        failures = [e for e in observed if "log_failure" in e]
        self.assertEqual([e["log_level"] for e in failures], [LogLevel.debug])
        warned = [formatEvent(e) for e in observed if e["log_level"] == LogLevel.warn and "responder failed" in formatEvent(e)]
        self.assertEqual(len(warned), 1)
        self.assertIn("gateway broke", warned[0])

    async def test_slow_builtin_times_out(self):
        """A built-in client slower than responseTimeoutMs leads to the apology, not a dead call."""
        await self.start()
        self.chat.reply = lambda body: Deferred()
        call_id = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "hello?"})
        await self.until_said(call_id, APOLOGY)
        self.flushLoggedErrors()

    async def test_outbound_notify_not_answered(self):
        """Utterances on an outbound notify call get no automatic reply."""
        await self.start()
        call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hi", "mode": "notify"}))["callId"]
        await self.post({"type": "call.speech", "callId": call_id, "transcript": "who is this?"})
        # Marker: a caller on an inbound call, who speaks after that, is answered; a reply to
        # the notify call's utterance would have been asked for first.
        inbound = await self.inbound()
        await self.post({"type": "call.speech", "callId": "CA1", "transcript": "hello"})
        await self.until_said(inbound, "Built-in answer.")
        self.assertEqual(len(self.chat.requests), 1)
        self.assertNotIn("who is this?", json.dumps(self.chat.requests[0]))

    async def test_objective_reaches_the_builtin_responder_and_the_gateway(self):
        """A call's objective is in the built-in responder's system prompt and in voicecall.respond's params."""
        await self.start()
        options = CallOptions(objective="Confirm the 8pm booking for two")
        call_id = await self.service.manager.initiate("+15550001234", "Hi, it's the restaurant.", "conversation", options=options)
        await self.post({"type": "call.answered", "callId": call_id})
        await self.until_said(call_id, "Hi, it's the restaurant.")
        await self.post({"type": "call.speech", "callId": call_id, "transcript": "Yes?"})
        await self.until_said(call_id, "Built-in answer.")
        self.assertIn("The objective of this call: Confirm the 8pm booking for two", self.chat.requests[-1]["messages"][0]["content"])
        gateway = await self.gateway(lambda params: "Noted.")
        await self.post({"type": "call.speech", "callId": call_id, "transcript": "See you then"})
        await self.until_said(call_id, "Noted.")
        self.assertEqual(gateway.requests[-1]["objective"], "Confirm the 8pm booking for two")

