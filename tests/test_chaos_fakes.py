"""
The fake carriers' chaos mode (voicecall.testing.chaos): what each fake sends on its worst day,
checked against the carriers' official SDKs (redeliveries are re-signed and still verify), and
that it is off by default and reachable from the standalone fakes' command lines.
"""
from __future__ import annotations

import argparse
import json
import random
from contextlib import nullcontext
from unittest import mock
from urllib.parse import parse_qsl

from plivo.utils import validate_v3_signature
from telnyx.lib import webhook_verification as telnyx_webhooks
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from voicecall.testing import chaos as chaos_flags
from voicecall.testing import plivo as plivo_cli
from voicecall.testing import telnyx as telnyx_cli
from voicecall.testing import twilio as twilio_cli
from voicecall.testing.chaos import Chaos
from voicecall.testing.plivo import FakePlivo
from voicecall.testing.telnyx import FakeTelnyx, Scenario as TelnyxScenario
from voicecall.testing.twilio import FakeTwilio

APP = "http://app.example/hook"
START = 1_700_000_000


class App(Resource):
    """Records every request (headers, raw body) and answers a document that hangs up."""

    isLeaf = True

    def __init__(self, body=b"<Response><Hangup/></Response>"):
        super().__init__()
        self.hits = []
        self.body = body

    def render(self, request):
        request.content.seek(0)
        raw = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.hits.append({"uri": request.uri.decode(), "headers": headers, "raw": raw})
        return self.body


def telnyx_accepts(body, headers, key, now):
    patch = mock.patch.object(telnyx_webhooks.time, "time", return_value=now)
    with patch if now is not None else nullcontext():
        try:
            telnyx_webhooks.verify_webhook_signature(body, headers, key)
        except telnyx_webhooks.WebhookVerificationError:
            return False
    return True


class ChaosSettingsTests(SynchronousTestCase):
    def test_off_by_default(self):
        """Chaos() changes nothing: no delay, no duplicate, no refetch, no barge-in, the scenario's pace."""
        chaos = Chaos()
        self.assertEqual(chaos.delivery_delay(), 0.0)
        self.assertIsNone(chaos.duplicate_after())
        self.assertFalse(chaos.repeat_fetch())
        self.assertFalse(chaos.talks_over())
        self.assertFalse(chaos.reorders)
        self.assertEqual(chaos.playback_seconds("hello", 0.5), 2.5)

    def test_seeded(self):
        """The same seed makes the same decisions."""
        a, b = Chaos.worst_day(7), Chaos.worst_day(7)
        self.assertEqual([a.delivery_delay() for _ in range(20)], [b.delivery_delay() for _ in range(20)])
        self.assertEqual([a.duplicate_after() for _ in range(20)], [b.duplicate_after() for _ in range(20)])

    def test_real_playback(self):
        """Real-time playback is 60 ms a character, divided by the speed factor."""
        self.assertAlmostEqual(Chaos(realistic_playback=True).playback_seconds("x" * 50, 0.0), 3.0)
        self.assertAlmostEqual(Chaos(realistic_playback=True, speed=10).playback_seconds("x" * 50, 0.0), 0.3)

    def test_invalid(self):
        """A probability outside 0..1, a negative time or a non-positive speed is refused."""
        self.assertRaises(ValueError, Chaos, duplicate=1.5)
        self.assertRaises(ValueError, Chaos, max_delay=-1)
        self.assertRaises(ValueError, Chaos, speed=0)

    def test_flags(self):
        """No flag: off. --chaos: the worst day, seeded. A single flag turns on only that."""
        def parse(*argv):
            parser = argparse.ArgumentParser()
            chaos_flags.add_arguments(parser)
            return chaos_flags.from_arguments(parser.parse_args(list(argv)))

        self.assertEqual((parse().duplicate, parse().reorder_window, parse().realistic_playback), (0.0, 0.0, False))
        worst = parse("--chaos", "--chaos-seed", "3")
        self.assertGreater(worst.duplicate, 0)
        self.assertTrue(worst.realistic_playback)
        self.assertEqual(worst.rng.random(), random.Random(3).random())
        one = parse("--chaos-duplicate", "1", "--chaos-playback-speed", "4")
        self.assertEqual((one.duplicate, one.reorder_window, one.speed, one.realistic_playback), (1.0, 0.0, 4.0, True))
        self.assertRaises(SystemExit, parse, "--chaos-duplicate", "2")

    def test_standalone_fakes_take_the_flags(self):
        """Each `python -m voicecall.testing.<carrier>` accepts --chaos and the finer flags."""
        t = telnyx_cli._parse(["--api-key", "k", "--chaos", "--chaos-seed", "5"])
        self.assertEqual((t.chaos, t.chaos_seed), (True, 5))
        w = twilio_cli._parse(["--account-sid", "AC" + "0" * 32, "--auth-token", "t", "--chaos-reorder", "0.5"])
        self.assertEqual((w.chaos, w.chaos_reorder), (False, 0.5))
        p = plivo_cli._parse(["--auth-id", "MA" + "A" * 18, "--auth-token", "t", "--chaos-refetch", "0.5"])
        self.assertEqual((p.chaos, p.chaos_refetch), (False, 0.5))
        self.assertEqual(chaos_flags.from_arguments(p).refetch, 0.5)


class TelnyxChaosTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.app = App(b"OK")

    def fake(self, chaos, **scenario):
        return FakeTelnyx(self.clock, "KEY", StubTreq(self.app), chaos=chaos, scenario=TelnyxScenario(**scenario))

    def test_redelivery_is_telnyx_retry(self):
        """A duplicate keeps data.id, increments meta.attempt, is re-signed at its own time, and verifies."""
        fake = self.fake(Chaos(random.Random(1), duplicate=1.0, retry_after=5.0))
        fake.place_inbound_call("+15550001234", "+15550000000", APP)
        for _ in range(60):
            self.clock.advance(0.1)
        first, again = self.app.hits[:2]
        a, b = json.loads(first["raw"]), json.loads(again["raw"])
        self.assertEqual(a["data"], b["data"])
        self.assertEqual((a["meta"]["attempt"], b["meta"]["attempt"]), (1, 2))
        self.assertNotEqual(first["headers"]["telnyx-signature-ed25519"], again["headers"]["telnyx-signature-ed25519"])
        self.assertGreater(int(again["headers"]["telnyx-timestamp"]), int(first["headers"]["telnyx-timestamp"]))
        for hit in (first, again):
            self.assertTrue(telnyx_accepts(hit["raw"], hit["headers"], fake.public_key, int(hit["headers"]["telnyx-timestamp"])))

    def test_reorder(self):
        """With a reorder window a call's webhooks overtake each other (seeded: this seed reorders)."""
        orders = set()
        for seed in range(8):
            self.app.hits.clear()
            fake = self.fake(Chaos(random.Random(seed), reorder_window=1.0), answer_after=0.0)
            call = fake.place_inbound_call("+15550001234", "+15550000000", APP)
            self.clock.advance(0.01)
            call.answer()
            self.clock.advance(0.01)
            call.hangup_by_callee()
            self.clock.advance(2)
            orders.add(tuple(json.loads(h["raw"])["data"]["event_type"] for h in self.app.hits))
        self.assertIn(("call.initiated", "call.answered", "call.hangup"), orders)
        self.assertGreater(len(orders), 1)

    def test_no_chaos_in_order(self):
        """Without chaos: one delivery each, in order, attempt 1."""
        fake = self.fake(Chaos())
        call = fake.place_inbound_call("+15550001234", "+15550000000", APP)
        self.clock.advance(0.01)
        call.answer()
        self.clock.advance(0.01)
        call.hangup_by_callee()
        self.clock.advance(1)
        docs = [json.loads(h["raw"]) for h in self.app.hits]
        self.assertEqual([d["data"]["event_type"] for d in docs], ["call.initiated", "call.answered", "call.hangup"])
        self.assertEqual({d["meta"]["attempt"] for d in docs}, {1})


class TwilioChaosTests(SynchronousTestCase):
    SID, TOKEN = "AC" + "1" * 32, "twilio-token"

    def test_repeated_fetch_keeps_idempotency_token(self):
        """A repeated TwiML fetch is the same request: same I-Twilio-Idempotency-Token, valid signature."""
        clock = Clock()
        clock.advance(START)
        app = App()
        fake = FakeTwilio(clock, self.SID, self.TOKEN, StubTreq(app), chaos=Chaos(random.Random(2), refetch=1.0))
        fake.place_inbound_call("+15550000000", "+15550001234", APP)
        clock.advance(1)
        first, again = app.hits[:2]
        self.assertEqual(first["raw"], again["raw"])
        self.assertEqual(first["headers"]["i-twilio-idempotency-token"], again["headers"]["i-twilio-idempotency-token"])
        validator = RequestValidator(self.TOKEN)
        for hit in (first, again):
            params = dict(parse_qsl(hit["raw"].decode(), keep_blank_values=True))
            self.assertTrue(validator.validate(APP, params, hit["headers"]["x-twilio-signature"]))

    def test_late_fetch(self):
        """A late fetch is made only after its delay."""
        clock = Clock()
        clock.advance(START)
        app = App()
        fake = FakeTwilio(clock, self.SID, self.TOKEN, StubTreq(app), chaos=Chaos(random.Random(2), late_fetch=5.0))
        fake.place_inbound_call("+15550000000", "+15550001234", APP)
        clock.advance(0)
        self.assertEqual(app.hits, [])
        clock.advance(5)
        self.assertEqual(len(app.hits), 1)


class PlivoChaosTests(SynchronousTestCase):
    AUTH_ID, TOKEN = "MA" + "B" * 18, "plivo-token"

    def test_repeated_fetch_fresh_nonce(self):
        """A repeated answer-XML fetch is re-signed with a fresh nonce; both verify with the SDK."""
        clock = Clock()
        clock.advance(START)
        app = App()
        fake = FakePlivo(clock, self.AUTH_ID, self.TOKEN, StubTreq(app), chaos=Chaos(random.Random(3), refetch=1.0))
        fake.place_inbound_call("+15550001234", "+15550000000", APP)
        clock.advance(1)
        first, again = app.hits[:2]
        self.assertEqual(first["raw"], again["raw"])
        nonces = {h["headers"]["x-plivo-signature-v3-nonce"] for h in (first, again)}
        self.assertEqual(len(nonces), 2)
        for hit in (first, again):
            params = dict(parse_qsl(hit["raw"].decode(), keep_blank_values=True))
            self.assertTrue(
                validate_v3_signature(
                    "POST", APP, hit["headers"]["x-plivo-signature-v3-nonce"], self.TOKEN,
                    hit["headers"]["x-plivo-signature-v3"], params,
                )
            )
