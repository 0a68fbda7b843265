"""
One-time media-stream tokens (DESIGN.md threat model): the bridge mints a token per stream TwiML
fetch, the token starts exactly one stream, expires unused after 60 s (injected clock), is stored
hashed and kept out of every repr, and a replayed TwiML fetch mints none. Driven through the real
media-stream server (in memory) with the real L{StreamBridge} as its handler.
"""
from __future__ import annotations

import re

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from voicecall.media.bridge import STREAM_TOKEN_TTL_SECONDS, StreamBridge
from voicecall.domain.model import Direction

from tests.test_media_stream import STREAM_PATH, MemoryTestCase, result

RESUME = "http://127.0.0.1/voice/webhook?callId=c1&flow=resume&n=abc"


@define
class Call:
    call_id: str = "c1"
    processed_event_ids: list = field(factory=list)
    is_terminal: bool = False


class Manager:
    def __init__(self, calls) -> None:
        self.calls = calls
        self.initial: list = []

    def find(self, sid):
        return self.calls.get(sid)

    def speak_initial_message(self, sid):
        self.initial.append(sid)
        return succeed(None)

    listeners: list = []

    def subscribe(self, listener):
        self.listeners = [*self.listeners, listener]
        return lambda: self.listeners.remove(listener)

    def emit(self, entry: dict) -> None:
        for listener in list(self.listeners):
            listener(entry)


class STT:
    def __init__(self, **callbacks) -> None:
        self.audio = 0

    def connect(self) -> Deferred:
        return succeed(None)

    def send_audio(self, ulaw: bytes) -> None:
        self.audio += 1

    def close(self) -> Deferred:
        return succeed(None)


def token_of(document: str) -> str | None:
    match = re.search(r'<Parameter name="token" value="([^"]*)"', document)
    return match.group(1) if match else None


class StreamTokenTests(MemoryTestCase):
    def setUp(self):
        self.clock = Clock()
        self.call = Call()
        self.manager = Manager({"CA1": self.call})
        self.bridge = StreamBridge(
            clock=self.clock,
            fallback=None,
            synthesize=None,
            new_transcriber=STT,
            stream_path=STREAM_PATH,
            public_url=lambda: "http://127.0.0.1/voice/webhook",
            manager=lambda: self.manager,
            max_streams=4,
        )
        self.net = self.serve(handler=self.bridge)
        self.media = self.net.server

    def mint(self, request_key: str | None = None) -> str:
        document = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, request_key=request_key, resume_url=RESUME)
        token = token_of(document)
        self.assertIsNotNone(token, document)
        return token

    def start(self, token: str, call_sid: str = "CA1", **kwargs):
        return self.net.client(call_sid=call_sid, token=token, stream_media=False, **kwargs)

    def refused(self, token: str, call_sid: str = "CA1", **kwargs):
        """How a start with `token` was refused (its close code and reason)."""
        client = self.net.client(call_sid=call_sid, token=token, stream_media=False, **kwargs)
        return result(client.closed)

    def test_a_token_starts_one_stream(self):
        """A second socket presenting a used token is closed 1008; the first keeps the call."""
        token = self.mint()
        first = self.start(token)
        self.assertIn(first.stream_sid, self.media.sessions)
        self.assertEqual(self.refused(token), (1008, "Unknown call"))
        self.assertTrue(first.is_open)
        self.assertEqual(list(self.media.sessions), [first.stream_sid])

    def test_the_end_of_the_call_closes_its_stream(self):
        """
        When the call ends, its stream is closed 1000 and frees its slot: a peer that kept the
        socket after the call ended kept its session (and its STT session) without end, and with
        one stream slot every inbound caller waited in the hold queue. Other calls' streams stay.
        """
        self.manager.calls["CA2"] = Call(call_id="c2")
        first = self.start(self.mint())
        other = self.start(token_of(self.bridge.stream_twiml("CA2", Direction.OUTBOUND, resume_url=RESUME)), call_sid="CA2")
        self.assertIn(other.stream_sid, self.media.sessions)
        del self.manager.calls["CA1"]
        self.manager.emit({"type": "call.state", "callId": "c1", "state": "completed"})
        self.net.flush()
        self.assertTrue(first.is_open)
        self.manager.emit({"type": "call.ended", "callId": "c1", "reason": "completed"})
        self.net.flush()
        self.assertEqual(result(first.closed), (1000, "Call ended"))
        self.assertEqual(list(self.media.sessions), [other.stream_sid])
        self.assertTrue(other.is_open)
        self.assertFalse(self.bridge.stream_busy())

    def test_an_unused_token_expires(self):
        """A token not used within 60 s starts nothing; one used just in time does."""
        late = self.mint()
        self.clock.advance(STREAM_TOKEN_TTL_SECONDS + 1)
        self.assertEqual(self.refused(late), (1008, "Unknown call"))
        in_time = self.mint()
        self.clock.advance(STREAM_TOKEN_TTL_SECONDS - 1)
        client = self.start(in_time)
        self.assertIn(client.stream_sid, self.media.sessions)

    def test_each_fetch_mints_a_new_token_and_retires_the_last(self):
        """A fresh TwiML fetch gets a new token; the unused one before it no longer starts a stream."""
        old, new = self.mint(), self.mint()
        self.assertNotEqual(old, new)
        self.assertEqual(self.refused(old), (1008, "Unknown call"))
        client = self.start(new)
        self.assertIn(client.stream_sid, self.media.sessions)

    def test_a_refused_start_does_not_use_the_token(self):
        """A wrong token, or a start refused for its stream SID, leaves the real token usable."""
        token = self.mint()
        other = self.start(self.mint_for_other_call(), call_sid="CA2")
        self.assertIn(other.stream_sid, self.media.sessions)
        self.assertEqual(self.refused(token[:-1] + ("A" if token[-1] != "A" else "B")), (1008, "Unknown call"))
        self.assertEqual(self.refused(token, stream_sid=other.stream_sid), (1008, "Duplicate streamSid"))
        client = self.start(token)
        self.assertIn(client.stream_sid, self.media.sessions)

    def mint_for_other_call(self) -> str:
        self.manager.calls["CA2"] = Call(call_id="c2")
        return token_of(self.bridge.stream_twiml("CA2", Direction.OUTBOUND, request_key=None, resume_url=RESUME))

    def test_a_replayed_fetch_mints_no_token(self):
        """A TwiML fetch whose verified key the call has already processed (a replay the replay
        cache no longer knows: after a restart or its 10 minutes) gets no stream, and the token of
        the real fetch still works."""
        token = self.mint(request_key="twilio:req:first")
        self.call.processed_event_ids.append("twilio:req:first")
        replayed = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, request_key="twilio:req:first", resume_url=RESUME)
        self.assertIsNone(token_of(replayed))
        self.assertNotIn("<Stream", replayed)
        client = self.start(token)
        self.assertIn(client.stream_sid, self.media.sessions)

    def test_the_stream_twiml_leads_back_to_the_daemon(self):
        """
        A `<Redirect>` follows `</Connect>`: when the socket closes Twilio runs it, and the
        resume fetch gets a fresh token for the same call (the old one starts nothing).
        """
        document = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, request_key=None, resume_url=RESUME)
        self.assertIn(
            '</Stream></Connect><Redirect method="POST">http://127.0.0.1/voice/webhook?callId=c1&amp;flow=resume&amp;n=abc</Redirect></Response>',
            document,
        )
        self.assertNotIn("action=", document)
        again = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, resume_url=RESUME, resuming=True)
        self.assertNotEqual(token_of(again), token_of(document))
        self.assertEqual(self.refused(token_of(document)), (1008, "Unknown call"))
        self.assertIn(self.start(token_of(again)).stream_sid, self.media.sessions)

    def test_a_resume_for_a_call_not_live_hangs_up(self):
        """A resume fetch for a call that is over (or unknown here) gets <Hangup/> and mints nothing."""
        del self.manager.calls["CA1"]
        document = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, resume_url=RESUME, resuming=True)
        self.assertIn("<Response><Hangup/></Response>", document)
        self.assertEqual(self.bridge._tokens, {})

    def test_a_resume_while_stopping_comes_back_later(self):
        """
        A resume fetch that reaches a daemon that is stopping (on a connection it still has)
        neither mints a token nor hangs up: Twilio is sent back a second later, to the next
        process.
        """
        self.successResultOf(self.bridge.stop())
        document = self.bridge.stream_twiml("CA1", Direction.OUTBOUND, resume_url=RESUME, resuming=True)
        self.assertIn('<Pause length="1"/><Redirect method="POST">http://127.0.0.1/voice/webhook?callId=c1&amp;flow=resume&amp;n=abc</Redirect>', document)
        self.assertEqual(self.bridge._tokens, {})

    def test_tokens_stay_out_of_reprs(self):
        """Tokens are stored hashed: neither the bridge's repr nor a session's shows one."""
        token = self.mint()
        spare = self.mint_for_other_call()
        client = self.start(token)
        session = self.media.sessions[client.stream_sid]
        for text in (repr(self.bridge), repr(session), repr(self.bridge._tokens)):
            self.assertNotIn(token, text)
            self.assertNotIn(spare, text)
        self.assertNotIn("token", session.custom_parameters)
