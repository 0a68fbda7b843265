"""
Tests for voicecall.providers.mock: the carrier-less provider of SPEC §7.4 [H] and the §19
"mock.test" bullets (the replay of a whole webhook is covered in tests/test_webhook.py).
"""
from __future__ import annotations

import json
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted.internet.defer import Deferred

from tests import test_webhook
from tests.harness import http_client, start_daemon
from voicecall.domain.model import CallRecord, CallState, EventType
from voicecall.providers.base import WebhookContext
from voicecall.providers.mock import MockProvider

NOW_MS = 1_700_000_000_000


def context(body, headers=None) -> WebhookContext:
    """A POST to the webhook path carrying `body` (bytes, or anything JSON-able)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WebhookContext(
        method="POST",
        path="/voice/webhook",
        path_and_query="/voice/webhook",
        query={},
        headers=headers or {},
        raw_body=raw,
        remote_ip="127.0.0.1",
        url="http://127.0.0.1:3334/voice/webhook",
    )


class MockProviderTestsBase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.provider = MockProvider(clock=self.clock)
        for call_id in ("c", "c1", "c2", "pid-1"):  # the calls the events below are about
            self.provider.initiate_call(call_id=call_id, from_number="+15550000000", to_number="+15550001234", webhook_url="http://x/")

    def parse(self, body):
        """Verify then parse `body` the way the webhook resource does."""
        ctx = context(body)
        verdict = self.provider.verify_webhook(ctx)
        return self.provider.parse_webhook(ctx, verdict.request_key)

    def events(self, body):
        return list(self.parse(body).events)


class VerifyTests(MockProviderTestsBase):
    """verify_webhook gives every payload a stable `mock:` request key."""

    def test_key_is_mock_prefixed_and_verified(self):
        """Any payload verifies, with a request key in the `mock:` namespace."""
        verdict = self.provider.verify_webhook(context({"event": {"type": "call.ringing", "callId": "c1"}}))
        self.assertTrue(verdict.ok)
        self.assertTrue(verdict.request_key.startswith("mock:"), verdict.request_key)
        self.assertGreater(len(verdict.request_key), len("mock:"))

    def test_same_payload_same_key(self):
        """The same bytes give the same key, across deliveries and provider instances."""
        body = {"event": {"type": "call.ringing", "callId": "c1"}}
        first = self.provider.verify_webhook(context(body)).request_key
        again = self.provider.verify_webhook(context(body)).request_key
        other = MockProvider(clock=Clock()).verify_webhook(context(body)).request_key
        self.assertEqual((again, other), (first, first))

    def test_different_payloads_different_keys(self):
        """Payloads that differ in any byte get different keys."""
        a = self.provider.verify_webhook(context(b'{"event": {"type": "call.ringing", "callId": "c1"}}'))
        b = self.provider.verify_webhook(context(b'{"event": {"type": "call.ringing", "callId": "c2"}}'))
        c = self.provider.verify_webhook(context(b'{"event": {"type": "call.ringing", "callId": "c1"}} '))
        self.assertEqual(len({a.request_key, b.request_key, c.request_key}), 3)

    def test_signature_headers_not_needed(self):
        """The pre-auth header gate lets mock webhooks through without any header."""
        self.assertTrue(self.provider.has_signature_headers({}))


class ParseTests(MockProviderTestsBase):
    """parse_webhook turns `{event}` / `{events}` bodies into normalised events."""

    def test_single_event_shape(self):
        """`{event: {...}}` gives one event with the given type and call id, answered 200 OK."""
        parsed = self.parse({"event": {"type": "call.answered", "callId": "c1"}})
        self.assertEqual([(e.type, e.call_id) for e in parsed.events], [(EventType.ANSWERED, "c1")])
        self.assertEqual((parsed.response.status, parsed.response.body), (200, b"OK"))

    def test_events_list_shape(self):
        """`{events: [...]}` gives one event per item, in order."""
        events = self.events(
            {
                "events": [
                    {"type": "call.ringing", "callId": "c1"},
                    {"type": "call.answered", "callId": "c1"},
                    {"type": "call.ended", "callId": "c1"},
                ]
            }
        )
        self.assertEqual([e.type for e in events], [EventType.RINGING, EventType.ANSWERED, EventType.ENDED])

    def test_empty_body_object(self):
        """An object with neither `event` nor `events` gives no events and a 400 showing the shape."""
        parsed = self.parse({})
        self.assertEqual((list(parsed.events), parsed.response.status), ([], 400))
        self.assertIn(b'{"event": {...}}', parsed.response.body)

    def test_generated_ids(self):
        """Events without ids get distinct generated UUIDs; explicit ids are kept."""
        events = self.events(
            {
                "events": [
                    {"type": "call.ringing", "callId": "c1"},
                    {"type": "call.ringing", "callId": "c1"},
                    {"type": "call.ringing", "callId": "c1", "id": "evt-7"},
                ]
            }
        )
        generated = [e.id for e in events[:2]]
        for value in generated:
            uuid.UUID(value)
        self.assertNotEqual(generated[0], generated[1])
        self.assertEqual(events[2].id, "evt-7")

    def test_defaults(self):
        """Absent fields take the SPEC defaults (`now`, empty text, final, completed, unknown error)."""
        events = self.events(
            {
                "events": [
                    {"type": "call.speaking", "callId": "c"},
                    {"type": "call.speech", "callId": "c"},
                    {"type": "call.silence", "callId": "c"},
                    {"type": "call.dtmf", "callId": "c"},
                    {"type": "call.error", "callId": "c"},
                    {"type": "call.ended", "callId": "c"},  # last: nothing may follow an end
                ]
            }
        )
        speaking, speech, silence, dtmf, error, ended = events
        self.assertEqual({e.timestamp for e in events}, {NOW_MS})
        self.assertEqual(speaking.text, "")
        self.assertEqual((speech.transcript, speech.is_final), ("", True))
        self.assertEqual(silence.duration_ms, 0)
        self.assertEqual(dtmf.digits, "")
        self.assertEqual(ended.reason, "completed")
        self.assertEqual((error.error, error.retryable), ("unknown error", False))

    def test_explicit_falsy_values_preserved(self):
        """Explicit falsy values (0, false, "") are kept rather than replaced by defaults."""
        events = self.events(
            {
                "events": [
                    {"type": "call.speech", "callId": "c", "transcript": "", "isFinal": False, "timestamp": 0},
                    {"type": "call.silence", "callId": "c", "durationMs": 0},
                    {"type": "call.error", "callId": "c", "error": "", "retryable": False},
                    {"type": "call.speaking", "callId": "c", "text": ""},
                ]
            }
        )
        speech, silence, error, speaking = events
        self.assertEqual((speech.transcript, speech.is_final, speech.timestamp), ("", False, 0))
        self.assertEqual(silence.duration_ms, 0)
        self.assertEqual((error.error, error.retryable), ("", False))
        self.assertEqual(speaking.text, "")

    def test_explicit_values_carried(self):
        """Given fields reach the event: transcript, digits, reason, direction, numbers, ids."""
        events = self.events(
            {
                "events": [
                    {
                        "type": "call.speech",
                        "callId": "c",
                        "transcript": "yes please",
                        "turnToken": "tok",
                        "confidence": 0.9,
                    },
                    {"type": "call.dtmf", "callId": "c", "digits": "42#"},
                    {"type": "call.ended", "callId": "c", "reason": "busy"},
                    {
                        "type": "call.initiated",
                        "callId": "pid-1",
                        "providerCallId": "pid-1",
                        "direction": "inbound",
                        "from": "+15550001234",
                        "to": "+15550000000",
                    },
                ]
            }
        )
        speech, dtmf, ended, initiated = events
        self.assertEqual((speech.transcript, speech.turn_token, speech.confidence), ("yes please", "tok", 0.9))
        self.assertEqual(dtmf.digits, "42#")
        self.assertEqual(ended.reason, "busy")
        self.assertEqual(
            (initiated.provider_call_id, initiated.direction.value, initiated.from_number, initiated.to_number),
            ("pid-1", "inbound", "+15550001234", "+15550000000"),
        )

    def test_unknown_and_incomplete_items_refused(self):
        """Items with an unknown type (or one that is no string), no type, no callId, or that are not objects are refused, each with its reason."""
        for item, reason in (
            ({"type": "call.teleported", "callId": "c"}, b'unknown event type "call.teleported"'),
            ({"type": ["call.ringing"], "callId": "c"}, b'unknown event type ["call.ringing"]'),
            ({"type": {"call.ringing": 1}, "callId": "c"}, b'unknown event type {"call.ringing": 1}'),
            ({"callId": "c"}, b'has no "type"'),
            ({"type": "call.ringing"}, b'"callId" must be a non-empty string'),
            ("call.ringing", b"must be an object"),
        ):
            parsed = self.parse({"events": [{"type": "call.ringing", "callId": "c"}, item]})
            self.assertEqual((list(parsed.events), parsed.response.status), ([], 400), item)
            self.assertTrue(parsed.response.body.startswith(b"events[1]"), parsed.response.body)
            self.assertIn(reason, parsed.response.body)

    def test_dedupe_keys_stable_per_payload(self):
        """Each event's dedupe key derives from the payload's key, the same on redelivery, distinct per event."""
        body = {"events": [{"type": "call.ringing", "callId": "c"}, {"type": "call.answered", "callId": "c"}]}
        first = [e.key for e in self.events(body)]
        again = [e.key for e in self.events(body)]
        key = self.provider.verify_webhook(context(body)).request_key
        self.assertEqual(first, again)
        self.assertEqual(len(set(first)), 2)
        for k in first:
            self.assertTrue(k.startswith(key), k)

    def test_invalid_json_is_400(self):
        """A body that is not JSON is answered 400 with no events."""
        parsed = self.parse(b"{not json")
        self.assertEqual((list(parsed.events), parsed.response.status), ([], 400))

    def test_non_object_json_is_400(self):
        """JSON that is not an object (or `events` that is not a list) is answered 400."""
        for body in ([{"type": "call.ringing", "callId": "c"}], "x", {"events": {"type": "call.ringing"}}):
            parsed = self.parse(body)
            self.assertEqual((list(parsed.events), parsed.response.status), ([], 400), body)


class CallControlTests(MockProviderTestsBase):
    """The mock's call control places nothing and answers status queries by id words."""

    def test_initiate_returns_mock_id(self):
        """initiate_call answers with the provider call id `mock-<callId>`."""
        placed = self.successResultOf(
            self.provider.initiate_call(
                call_id="abc", from_number="+15550000000", to_number="+15550001234", webhook_url="http://x/"
            )
        )
        self.assertEqual(placed.provider_call_id, "mock-abc")

    def test_other_actions_are_no_ops(self):
        """Hang-up, answer, speak and listening succeed at once."""
        call = CallRecord(
            call_id="abc",
            provider="mock",
            direction="outbound",
            state="answered",
            from_number="+15550000000",
            to_number="+15550001234",
            started_at=NOW_MS,
            provider_call_id="mock-abc",
        )
        for d in (
            self.provider.hangup_call(call, "hangup-bot"),
            self.provider.answer_call(call),
            self.provider.speak(call, "hi", None),
            self.provider.prompt(call, "hi", None, None),
            self.provider.start_listening(call, None),
            self.provider.stop_listening(call),
        ):
            self.assertIsNone(self.successResultOf(d))

    def test_status_words(self):
        """Ids containing `stale`, `ended` or `completed` are terminal `completed`; others in progress."""
        for pid in ("mock-stale-1", "ended-2", "call-completed"):
            status = self.successResultOf(self.provider.get_call_status(pid))
            self.assertEqual((status.status, status.is_terminal), ("completed", True), pid)
        status = self.successResultOf(self.provider.get_call_status("mock-abc"))
        self.assertEqual((status.status, status.is_terminal), ("in-progress", False))


    def test_a_call_hung_up_here_is_over(self):
        """A call the mock hung up reports completed (a restore after an end that was never stored ends it)."""
        call = CallRecord(
            call_id="abc", provider="mock", direction="outbound", state="answered", from_number="+15550000000",
            to_number="+15550001234", started_at=NOW_MS, provider_call_id="mock-abc",
        )  # fmt: skip
        self.successResultOf(self.provider.hangup_call(call, "hangup-bot"))
        status = self.successResultOf(self.provider.get_call_status("mock-abc"))
        self.assertEqual((status.status, status.is_terminal), ("completed", True))

class MockWebhookTests(test_webhook.WebhookTestsBase):
    """What a developer posting mock events by hand is told: every mistake is a 4xx with its reason."""

    def refused(self, body, status: int = 400) -> str:
        """Post `body`; it must be refused with `status` and change nothing; returns the one-line reason."""
        before = list(self.proxy.seen)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.post(raw)
        self.assertEqual(response.status, status, (body, response.body))
        self.assertEqual(self.proxy.seen, before, "an event reached the manager")
        text = response.body.decode()
        self.assertEqual(len(text.strip().splitlines()), 1, text)
        return text

    def test_unknown_call_id(self):
        """An event for a call nobody placed is a 404 naming the id."""
        self.place()
        self.assertIn('unknown callId "nope"', self.refused({"event": {"type": "call.answered", "callId": "nope"}}, 404))

    def test_known_ids_accepted(self):
        """Our call id and the carrier's `mock-<id>` both name a placed call."""
        call_id = self.place()
        for cid in (call_id, f"mock-{call_id}"):
            response = self.post(json.dumps({"event": {"type": "call.ringing", "callId": cid, "id": cid}}).encode())
            self.assertEqual(response.status, 200, response.body)
        self.assertEqual(self.stored(call_id).state, CallState.RINGING)

    def test_ended_call(self):
        """An event for a call that has ended is a 409 saying so."""
        call_id = self.place()
        self.successResultOf(Deferred.fromCoroutine(self.manager.end_call(call_id)))
        reason = self.refused({"event": {"type": "call.speech", "callId": call_id, "transcript": "hi"}}, 409)
        self.assertIn("has ended", reason)

    def test_unknown_event_type(self):
        """An unknown event type is a 400 listing the known ones."""
        call_id = self.place()
        reason = self.refused({"event": {"type": "call.teleported", "callId": call_id}})
        self.assertIn('unknown event type "call.teleported"', reason)
        self.assertIn("call.speech", reason)

    def test_no_event(self):
        """A body without `event` or `events` (or with an empty list) is a 400 showing the shape."""
        for body in ({}, {"evnt": {"type": "call.answered"}}, {"events": []}):
            self.assertIn('"event"', self.refused(body))

    def test_missing_fields(self):
        """An event without a type or a callId, or with wrongly typed fields, is a 400 naming the field."""
        call_id = self.place()
        cases = [
            ({"callId": call_id}, '"type"'),
            ({"type": "call.answered"}, '"callId"'),
            ({"type": "call.answered", "callId": 42}, '"callId"'),
            ({"type": "call.speech", "callId": call_id, "transcript": 5}, '"transcript"'),
            ({"type": "call.speech", "callId": call_id, "isFinal": "yes"}, '"isFinal"'),
            ({"type": "call.ended", "callId": call_id, "reason": "bored"}, '"reason"'),
            ({"type": "call.ringing", "callId": call_id, "direction": "sideways"}, '"direction"'),
            ({"type": "call.ringing", "callId": call_id, "timestamp": -1}, '"timestamp"'),
        ]
        for event, field in cases:
            self.assertIn(field, self.refused({"event": event}), event)

    def test_one_bad_event_applies_nothing(self):
        """A list with one bad event is refused whole: the good events before it are not applied."""
        call_id = self.place()
        reason = self.refused({"events": [{"type": "call.answered", "callId": call_id}, {"type": "x", "callId": call_id}]})
        self.assertIn("events[1]", reason)
        self.assertEqual(self.stored(call_id).state, CallState.INITIATED)

    def test_inbound_needs_its_fields(self):
        """An inbound event for a new call needs providerCallId, from and to; the reason names what is missing."""
        event = {"type": "call.initiated", "callId": "in-1", "direction": "inbound", "from": "+15550001234"}
        reason = self.refused({"event": event})
        self.assertIn('"providerCallId"', reason)
        self.assertIn('"to"', reason)
        self.assertNotIn('"from"', reason)

    def test_turned_away_inbound_call(self):
        """A complete inbound event is accepted; once policy turned the caller away, its later events are a 409."""
        event = {"type": "call.initiated", "callId": "in-1", "providerCallId": "in-1", "direction": "inbound",
                 "from": "+15550001234", "to": "+15550000000"}  # fmt: skip
        self.assertEqual(self.post(json.dumps({"event": event}).encode()).status, 200)  # inboundPolicy: disabled
        self.assertIn("has ended", self.refused({"event": {"type": "call.ringing", "callId": "in-1"}}, 409))

    def test_non_finite_numbers(self):
        """NaN, Infinity and 1e309 are a 400, not a 500."""
        call_id = self.place().encode()
        for number in (b"1e309", b"NaN", b"Infinity", b"-Infinity", b"-1e309"):
            body = b'{"event": {"type": "call.silence", "callId": "%s", "durationMs": %s}}' % (call_id, number)
            self.assertIn("number", self.refused(body), number)
            body = b'{"event": {"type": "call.speech", "callId": "%s", "confidence": %s}}' % (call_id, number)
            self.refused(body)
        self.assertEqual(self.resource.counts["500"], 0)

    def test_misspelled_field(self):
        """A misspelled field is a 400 naming it and the field meant, not an event with a default in its place."""
        call_id = self.place()
        reason = self.refused({"event": {"id": "ev-9", "type": "call.speech", "callId": call_id, "transcrpt": "Fine"}})
        self.assertIn('unknown field "transcrpt"', reason)
        self.assertIn('did you mean "transcript"', reason)
        reason = self.refused({"events": [{"type": "call.answered", "callId": call_id, "call_id": call_id}]})
        self.assertIn('"call_id"', reason)
        self.assertIn('"callId"', reason)

    def test_event_id_reused_for_another_event(self):
        """
        An `id` posted again with something else to say (the copied curl of the walk-through with a
        new transcript but the old id) is a 409 saying to give it a new id: it would be taken for a
        retry of the first and dropped, and the waiting `continue` would go on waiting. A true retry
        (same event, whatever else differs) is still answered 200 and applied once.
        """
        call_id = self.place()
        speech = {"id": "ev-2", "type": "call.speech", "callId": call_id, "transcript": "Fine, thanks"}
        self.assertEqual(self.post(json.dumps({"event": speech}).encode()).status, 200)
        reason = self.refused({"event": {**speech, "transcript": "Good"}}, 409)
        self.assertIn('"ev-2"', reason)
        self.assertIn("new id", reason)
        retry = self.post(json.dumps({"events": [{**speech, "confidence": 0.9}]}).encode())
        self.assertEqual(retry.status, 200, retry.body)
        self.assertEqual([e.transcript for e in self.proxy.seen if e.type is EventType.SPEECH], ["Fine, thanks", "Fine, thanks"])
        both = [{"id": "ev-3", "type": "call.dtmf", "callId": call_id, "digits": "1"}, {"id": "ev-3", "type": "call.dtmf", "callId": call_id, "digits": "2"}]
        self.assertIn('"ev-3"', self.refused({"events": both}, 409))


class MockInboundDaemonTests(TestCase):
    """The mock's inbound calls on a daemon in process, posted over loopback HTTP as README shows."""

    timeout = 30

    async def test_first_event_call_id_names_no_call(self):
        """
        A new inbound call is the carrier's `providerCallId`. The `callId` its first event must
        carry names no call (the call gets an id of ours), so a later event sent to that id is a
        404 naming it, as for any id no call has; it is not answered 200 and silently ignored.
        """
        http = http_client(self)
        service, rpc = await start_daemon(self, {"provider": "mock", "inboundPolicy": "allowlist", "allowFrom": ["+15550001234"]})

        async def post(event: dict) -> tuple[int, bytes]:
            response = await http.post(service.webhook_url, data=json.dumps({"event": event}).encode())
            return response.code, await response.content()

        first = {"id": "in-1", "type": "call.initiated", "callId": "made-up", "providerCallId": "pc-1",
                 "direction": "inbound", "from": "+15550001234", "to": "+15550000000"}  # fmt: skip
        self.assertEqual((await post(first))[0], 200)
        call = (await rpc.call("voicecall.status", {"callId": "pc-1"}))["call"]
        code, body = await post({"id": "in-2", "type": "call.speech", "callId": "made-up", "transcript": "hello"})
        self.assertEqual((code, body.decode()), (404, 'event: unknown callId "made-up": no call has this id (ours or mock-<callId>)\n'))
        self.assertEqual((await post({"id": "in-3", "type": "call.speech", "callId": "pc-1", "transcript": "hi"}))[0], 200)
        record = (await rpc.call("voicecall.status", {"callId": call["callId"]}))["call"]
        self.assertEqual([t["text"] for t in record["transcript"] if t["speaker"] == "user"], ["hi"])
