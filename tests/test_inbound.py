"""
Inbound calls end to end on every carrier (the daemon in process against each fake carrier): an
allowlisted caller is greeted and answered by the responder over several turns; unknown,
anonymous and suffix-only callers are turned away with a single hang-up and leave no record;
`inboundPolicy: "disabled"` turns everyone away.
"""
from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.domain.manager import DEFAULT_GREETING
from voicecall.testing import plivo as fplivo
from voicecall.testing import telnyx as ftelnyx
from voicecall.testing import twilio as ftwilio
from voicecall.testing.gateway import TestGateway

from tests.harness import eventually, free_port, http_client, serve, start_daemon

OURS = "+15550000000"
FRIEND = "+15550001234"
STRANGERS = ("+15559999999", "anonymous", "+99915550001234")


class InboundMixin:
    timeout = 60
    carrier = ""

    async def start(self, **overrides):
        self.http = http_client(self)
        base = await serve(self, self.make_fake())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": self.carrier,
            "fromNumber": OURS,
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "inboundPolicy": "allowlist",
            "allowFrom": [FRIEND],
            "maxConcurrentCalls": 3,
            **self.credentials(base),
            **overrides,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.gateway = await TestGateway(lambda params: f"You said {params['text']}").register(
            reactor, self.service._rpc.port.getHost().name
        )
        self.addCleanup(self.gateway.close)
        self.addCleanup(self.hang_up_all)

    def turns(self):
        """The caller's script: speak only after hearing something new from the bot."""
        script = ["hello there", "how are you"]
        state = {"heard": 0}

        def utterance(call):
            heard = len(self.spoken(call))
            if heard > state["heard"] and script:
                state["heard"] = heard
                return script.pop(0)
            return None

        return utterance

    async def test_allowlisted_caller_is_greeted_and_answered(self):
        """An allowlisted caller hears the greeting, then a reply to each thing they say."""
        await self.start()
        call = self.place(FRIEND, self.turns())
        await eventually(lambda: "You said how are you" in self.spoken(call), 20, "two replies")
        spoken = self.spoken(call)
        self.assertEqual(spoken[0], DEFAULT_GREETING)
        self.assertIn("You said hello there", spoken)
        self.assertEqual([r["text"] for r in self.gateway.requests], ["hello there", "how are you"])
        record = self.service.manager.active_calls()[0]
        self.assertEqual((record.direction.value, record.from_number), ("inbound", FRIEND))
        # A reply enters the transcript once the carrier has played it (Telnyx: call.speak.ended).
        await eventually(lambda: len(record.transcript) == 5, 5, "the last reply in the transcript")
        self.assertEqual(
            [(t.speaker.value, t.text) for t in record.transcript],
            [("bot", DEFAULT_GREETING), ("user", "hello there"), ("bot", "You said hello there"), ("user", "how are you"), ("bot", "You said how are you")],
        )

    async def test_strangers_are_turned_away(self):
        """Unknown, anonymous and suffix-only callers are hung up once each and leave no record."""
        await self.start()
        calls = [self.place(number, lambda call: None) for number in STRANGERS]
        for call in calls:
            await eventually(lambda call=call: self.ended(call), 10, "the stranger's call to end")
        # Marker: every callback the carrier sent about those calls has been answered, and a
        # hang-up the daemon would add is requested while it handles one.
        await self.fake.settle()
        for call in calls:
            self.assertEqual(self.hangups(call), 1)
        self.assertEqual(self.service.manager.active_calls(), [])
        self.assertEqual(await self.service._store.recent_calls(10), [])

    async def test_disabled_turns_everyone_away(self):
        """With inboundPolicy disabled even an allowlisted caller is turned away."""
        await self.start(inboundPolicy="disabled")
        call = self.place(FRIEND, lambda call: None)
        await eventually(lambda: self.ended(call), 10, "the call to end")
        self.assertEqual(self.hangups(call), 1)
        self.assertEqual(self.service.manager.active_calls(), [])


class TwilioInboundTests(InboundMixin, TestCase):
    carrier = "twilio"

    def make_fake(self):
        self.fake = ftwilio.FakeTwilio(reactor, "AC" + "0" * 32, "tok", http=self.http)
        return self.fake.resource()

    def credentials(self, base):
        return {"twilio": {"accountSid": "AC" + "0" * 32, "authToken": "tok", "baseUrl": base}}

    def place(self, caller, utterances):
        return self.fake.place_inbound_call(OURS, caller, self.webhook, scenario=ftwilio.Scenario(utterances=utterances, silence=0.3))

    def spoken(self, call):
        return call.say_texts

    def ended(self, call):
        return call.is_ended

    def hangups(self, call):
        """<Reject/> is the one way we turned it away: no REST hang-up may follow."""
        rest = [r for r in self.fake.requests if r.path.endswith(f"/Calls/{call.sid}.json") and r.get("Status")]
        rejected = any(b"<Reject/>" in (w.body or b"") for w in self.fake.webhooks if w.params.get("CallSid") == call.sid)
        return len(rest) + int(rejected)

    async def hang_up_all(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def test_greeting_is_followed_by_one_listen(self):
        """
        The greeting's Redirect is answered with the listen loop, and nothing replaces it: a
        second, identical Gather sent as a live update cut off a caller who spoke at once (the
        fake's callee does: the first words were lost and the call never answered).
        """
        await self.start()
        call = self.place(FRIEND, self.turns())
        await eventually(lambda: "You said how are you" in self.spoken(call), 20, "two replies")
        record = self.service.manager.active_calls()[0]
        await eventually(lambda: len(record.transcript) == 5, 5, "the last reply in the transcript")
        updates = [
            r.get("Twiml") for r in self.fake.requests if r.path.endswith(f"/Calls/{call.sid}.json") and r.get("Twiml")
        ]
        self.assertTrue(updates)
        self.assertEqual([u for u in updates if "<Say" not in u], [], "a live update only to listen again")
        spoken = [w for w in self.fake.webhooks if "flow=spoken" in w.url]
        self.assertIn(b"<Gather", spoken[0].body, "the greeting's Redirect is answered by listening")


class TelnyxInboundTests(InboundMixin, TestCase):
    carrier = "telnyx"

    def make_fake(self):
        self.fake = ftelnyx.FakeTelnyx(reactor, "KEY_fake", self.http, connection_id="123")
        return self.fake.resource()

    def credentials(self, base):
        return {"telnyx": {"apiKey": "KEY_fake", "connectionId": "123", "publicKey": self.fake.public_key, "baseUrl": base}}

    def place(self, caller, utterances):
        return self.fake.place_inbound_call(caller, OURS, self.webhook, scenario=ftelnyx.Scenario(utterances=utterances))

    def spoken(self, call):
        return call.speak_texts

    def ended(self, call):
        return not call.is_alive

    def hangups(self, call):
        return sum(1 for r in self.fake.requests if r.path.endswith(f"/calls/{call.call_control_id}/actions/hangup"))

    async def hang_up_all(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.close()


class PlivoInboundTests(InboundMixin, TestCase):
    carrier = "plivo"

    def make_fake(self):
        self.fake = fplivo.FakePlivo(reactor, "MAXXXXXXXXXXXXXXXXXX", "tok-plivo", http=self.http)
        return self.fake.resource()

    def credentials(self, base):
        return {"plivo": {"authId": "MAXXXXXXXXXXXXXXXXXX", "authToken": "tok-plivo", "baseUrl": base}}

    def place(self, caller, utterances):
        return self.fake.place_inbound_call(caller, OURS, self.webhook, scenario=fplivo.Scenario(utterances=utterances))

    def spoken(self, call):
        return call.speak_texts

    def ended(self, call):
        return call.is_ended

    def hangups(self, call):
        return sum(1 for r in self.fake.requests if r.method == "DELETE" and call.call_uuid in r.path)

    async def hang_up_all(self):
        await self.fake.hang_up_all()
