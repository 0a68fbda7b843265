"""
End to end on the carriers' worst day: the real daemon (in process, real reactor, loopback,
RPC socket) against each fake carrier with its chaos mode on (redelivered, reordered and delayed
webhooks, late and repeated fetches, real-time speech sped up, a callee who talks over prompts).
A conversation must still come out right: each continue gets the answer to its own question,
the transcript has no doubled entry, the call ends once, and the carrier never sees a 5xx.
"""
from __future__ import annotations

from collections import Counter

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.testing.chaos import Chaos
from voicecall.testing.stack import answer_to

from tests.harness import eventually, free_port, http_client, serve, start_daemon

CALLEE = "+15550001234"
OURS = "+15550000000"
SEED = 20261203


class Callee:
    """Answers the last question (a prompt ending in "?") heard since it last spoke, once."""

    def __init__(self, prompts):
        self.prompts = prompts
        self.heard: dict = {}

    def __call__(self, call):
        texts = list(self.prompts(call))
        start = self.heard.get(id(call), 0)
        self.heard[id(call)] = len(texts)
        questions = [t for t in texts[start:] if t.endswith("?")]
        return answer_to(questions[-1]) if questions else None


class ChaosEndToEndTests(TestCase):
    timeout = 60

    async def daemon(self, fake, provider: str, section: dict):
        base = await serve(self, fake.resource())
        port = free_port()
        webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": provider,
            "fromNumber": OURS,
            provider: {**section, "baseUrl": base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": webhook,
            "maxConcurrentCalls": 2,
            "transcriptTimeoutMs": 15000,
        }
        self.service, self.rpc = await start_daemon(self, config)

    async def conversation(self, fake, ended):
        rpc = self.rpc
        call_id = (await rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello, who is this?", "mode": "conversation"}))["callId"]

        # The first continue goes out at once, while the greeting may still be playing: it must
        # wait its turn and get the answer to its own question (the callee may or may not answer
        # the greeting first).
        for question in ("Is now a good time?", "Shall I call back tomorrow?"):
            result = await rpc.call("voicecall.continue", {"callId": call_id, "message": question})
            self.assertEqual(result["transcript"], answer_to(question))
        await rpc.call("voicecall.end", {"callId": call_id})
        record = (await rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(record["state"], "hangup-bot")
        entries = Counter((t["speaker"], t["text"]) for t in record["transcript"])
        self.assertEqual([e for e, n in entries.items() if n > 1], [])
        greeting_answer = ("user", answer_to("Hello, who is this?"))
        self.assertEqual(
            [(t["speaker"], t["text"]) for t in record["transcript"] if (t["speaker"], t["text"]) != greeting_answer],
            [
                ("bot", "Hello, who is this?"),
                ("bot", "Is now a good time?"),
                ("user", answer_to("Is now a good time?")),
                ("bot", "Shall I call back tomorrow?"),
                ("user", answer_to("Shall I call back tomorrow?")),
            ],
        )
        (call,) = fake.calls.values()
        await eventually(lambda: ended(call), timeout=10, what="the call ending at the carrier")
        await eventually(lambda: fake._carrier.settle().called, timeout=10, what="the carrier's deliveries")
        statuses = [h.status for h in fake.webhooks if h.status is not None]
        self.assertEqual([s for s in statuses if s >= 500], [])
        self.assertGreater(fake._carrier.chaos.duplicates_sent, 0)

    async def test_telnyx(self):
        from voicecall.testing.telnyx import FakeTelnyx, Scenario

        chaos = Chaos.worst_day(SEED, speed=20.0, barge_in=0.0)
        scenario = Scenario(answer_after=0.2, utterances=Callee(lambda call: call.speak_texts))
        fake = FakeTelnyx(reactor, "KEY_chaos", http_client(self), connection_id="conn", scenario=scenario, chaos=chaos)
        self.addCleanup(fake.close)
        await self.daemon(fake, "telnyx", {"apiKey": "KEY_chaos", "connectionId": "conn", "publicKey": fake.public_key})
        await self.conversation(fake, lambda call: not call.is_alive)

    async def test_twilio(self):
        from voicecall.testing.twilio import FakeTwilio, Scenario

        sid, token = "AC" + "0" * 32, "chaos-token"
        chaos = Chaos.worst_day(SEED, speed=20.0)
        scenario = Scenario(answer_after=0.2, silence=1.0, utterances=Callee(lambda call: call.say_texts))
        fake = FakeTwilio(reactor, sid, token, http_client(self), scenario=scenario, chaos=chaos)

        def hang_up():
            for call in fake.calls.values():
                if not call.is_ended:
                    call.hangup_by_callee()
            return fake._carrier.settle()

        self.addCleanup(hang_up)
        await self.daemon(fake, "twilio", {"accountSid": sid, "authToken": token})
        await self.conversation(fake, lambda call: call.is_ended)

    async def test_plivo(self):
        from voicecall.testing.plivo import FakePlivo, Scenario

        auth_id, token = "MA" + "C" * 18, "chaos-token"
        chaos = Chaos.worst_day(SEED, speed=20.0)
        scenario = Scenario(answer_after=0.2, silence=1.0, utterances=Callee(lambda call: call.speak_texts))
        fake = FakePlivo(reactor, auth_id, token, http=http_client(self), scenario=scenario, chaos=chaos)
        self.addCleanup(fake.hang_up_all)
        await self.daemon(fake, "plivo", {"authId": auth_id, "authToken": token})
        await self.conversation(fake, lambda call: call.is_ended)
