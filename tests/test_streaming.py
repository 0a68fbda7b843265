"""
A streamed Twilio conversation end to end: the daemon in process with the fake Twilio, a real
media-stream client, the fake OpenAI speech endpoint (TTS) and the fake realtime transcription
server (STT), all on loopback.
"""
from __future__ import annotations

import math
import re

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from voicecall.infra.audio import ulaw_encode
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient, UpgradeRefused

from tests.harness import eventually, free_port, http_client, serve, speech_fakes, start_daemon, workdir

SID = "AC" + "0" * 32
TOKEN = "twilio-token"


def tone(seconds: float, hz: float = 440.0, amplitude: int = 8000) -> bytes:
    """Mu-law audio loud enough for the fake STT's voice detector."""
    import struct

    samples = [int(amplitude * math.sin(2 * math.pi * hz * n / 8000)) for n in range(int(8000 * seconds))]
    return ulaw_encode(struct.pack(f"<{len(samples)}h", *samples))


class StreamedConversationTests(TestCase):
    timeout = 60

    async def start(self, transcripts=("A table for two",)):
        http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(utterances=[]))
        twilio_base = await serve(self, self.fake.resource())
        self.speech, speech_base, self.stt = await speech_fakes(self, transcripts=transcripts)
        port = free_port()
        self.directory = workdir(self)
        self.config = {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "streaming": {"enabled": True, "openaiApiKey": "sk-stt", "sttBaseUrl": self.stt.url, "silenceDurationMs": 300},
            "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
            "maxConcurrentCalls": 2,
            "transcriptTimeoutMs": 20000,
        }
        self.service, self.rpc = await start_daemon(self, self.config, self.directory)
        self.addCleanup(self.hang_up)

    async def restart(self):
        """Stop the daemon (streams close, calls stay live in the store) and start it again."""
        await self.service.stopService()
        self.rpc.transport.loseConnection()
        self.service, self.rpc = await start_daemon(self, self.config, self.directory)

    async def hang_up(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def call(self, message="Good evening"):
        call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": message, "mode": "conversation"}))["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        stream = await fake_call.next_stream()
        return call_id, fake_call, stream

    async def connect(self, fake_call, stream, signature=None):
        client = TwilioMediaClient(
            reactor,
            stream.url,
            call_sid=fake_call.sid,
            token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": signature or sign_request(TOKEN, stream.url)},
        )
        await client.connect()
        self.addCleanup(self.close_client, client)
        return client

    async def close_client(self, client):
        if not client.closed.called:
            client.close()
        await client.closed

    async def said(self, call_id):
        record = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        return [t["text"] for t in record["transcript"] if t["speaker"] == "bot"]

    async def test_greeting_then_turn(self):
        """The greeting plays over the stream (mark-gated); continue speaks and returns what STT heard."""
        await self.start()
        call_id, fake_call, stream = await self.call()
        self.assertEqual(stream.url, self.service.webhook_url.replace("http://", "ws://").replace("/voice/webhook", "/voice/stream"))
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "Good evening"), 10, "the greeting to finish playing")
        self.assertGreater(len(client.audio_received), 8000 * 0.5)
        self.assertTrue(client.marks_echoed)
        self.assertEqual(self.speech.requests[0].json["input"], "Good evening")
        pending = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "How many people?"})
        await eventually(lambda: self._has(self.said(call_id), "How many people?"), 10, "the question to finish playing")
        client.talk(tone(0.6))
        answer = await pending
        self.assertEqual(answer, {"success": True, "transcript": "A table for two"})

    async def _has(self, said, text):
        return text in await said

    async def test_barge_in_clears_playback(self):
        """Caller speech while the bot talks makes the daemon send `clear`; the speak still completes."""
        await self.start(transcripts=("Sorry, stop",))
        call_id, fake_call, stream = await self.call("Hi")
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "Hi"), 10, "the greeting")
        speaking = self.rpc.call("voicecall.speak", {"callId": call_id, "message": "This is a very long announcement " * 4})
        await eventually(lambda: len(client.audio_received) > 16000, 10, "the announcement to start")
        client.talk(tone(0.6))
        await eventually(lambda: client.clears >= 1, 10, "a clear")
        self.assertEqual(await speaking, {"success": True})

    async def test_reconnect_grace(self):
        """
        A dropped stream comes back through a fresh signed TwiML fetch (Twilio follows the
        resume Redirect after </Connect>) with a new token, within the 2 s grace, and the call goes on; the old
        token starts nothing. A stream that does not come back ends the call.
        """
        await self.start()
        call_id, fake_call, stream = await self.call("Hi")
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "Hi"), 10, "the greeting")
        fetches = len(fake_call.documents)
        client.close()
        await client.closed
        grace = await eventually(lambda: self.service._bridge._grace.get(fake_call.sid), 5, "the dropped stream's grace timer")
        fake_call.end_stream()  # Twilio sees its socket close and runs the Redirect after </Connect>
        again = await fake_call.next_stream()
        self.assertEqual(fake_call.documents[fetches].kind, "redirect")
        self.assertIn("flow=resume", fake_call.documents[fetches].url)
        self.assertNotEqual(again.parameters["token"], stream.parameters["token"])
        await self.connect(fake_call, again)
        stale = await self.connect(fake_call, stream)
        self.assertEqual(await stale.closed, (1008, "Unknown call"))
        # The returning stream cancels the pending end of the call: nothing can end it by grace.
        await eventually(lambda: grace.cancelled, 5, "the returning stream to cancel the grace timer")
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertNotIn(status["state"], ("hangup-bot", "completed"))
        for s in list(self.service._media.sessions.values()):
            s.close()

        async def ended():
            state = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]["state"]
            return state if state not in ("initiated", "ringing", "answered", "active", "speaking", "listening") else None

        # The 2 s grace, then the hang-up through the carrier: polled (a loaded machine is slow).
        self.assertEqual(await eventually(ended, 20.0, "the call to end after the grace"), "hangup-bot")

    async def test_a_used_token_starts_no_second_stream(self):
        """A second socket presenting the token of a started stream is closed 1008; the first keeps the call."""
        await self.start()
        call_id, fake_call, stream = await self.call("Hi")
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "Hi"), 10, "the greeting")
        thief = await self.connect(fake_call, stream)
        self.assertEqual(await thief.closed, (1008, "Unknown call"))
        # Marker: a speak after the thief was turned away still plays to the first socket, so a
        # close the thief caused would already have reached it.
        heard = len(client.audio_received)
        await self.rpc.call("voicecall.speak", {"callId": call_id, "message": "Still here"})
        self.assertGreater(len(client.audio_received), heard)
        self.assertTrue(client.is_open)
        self.assertEqual([s.stream_sid for s in self.service._media.sessions.values()], [client.stream_sid])

    async def test_replayed_twiml_fetch_after_a_restart_mints_no_token(self):
        """
        The call's first TwiML fetch, replayed byte for byte after a restart (the replay cache
        is gone; the same holds after its 10 minutes), is answered without a stream token. The
        call's own stream comes back the legitimate way: Twilio follows the resume Redirect.
        """
        await self.start()
        call_id, fake_call, stream = await self.call("Hi")
        client = await self.connect(fake_call, stream)
        await eventually(lambda: self._has(self.said(call_id), "Hi"), 10, "the greeting")
        [fetch] = [d for d in fake_call.documents if d.kind == "twiml"]
        await self.restart()
        await client.closed
        answer = await http_client(self).post(
            fetch.url,
            data=fetch.params,
            headers={"X-Twilio-Signature": [fetch.signature], "Content-Type": ["application/x-www-form-urlencoded"]},
        )
        body = (await answer.content()).decode()
        self.assertEqual(answer.code, 200)
        token = re.search(r'<Parameter name="token" value="([^"]*)"', body)
        if token is not None:
            thief = TwilioMediaClient(reactor, stream.url, call_sid=fake_call.sid, token=token.group(1),
                                      headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)})
            await thief.connect()
            self.addCleanup(self.close_client, thief)
            await thief.closed
            self.assertEqual(self.service._media.active_count, 0)
        self.assertNotIn("<Stream", body)
        fake_call.end_stream()
        again = await fake_call.next_stream()
        self.assertNotEqual(again.parameters["token"], stream.parameters["token"])
        back = await self.connect(fake_call, again)
        await eventually(lambda: self.service._media.active_count == 1, 5, "the stream to come back")
        self.assertTrue(back.is_open)
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertNotIn(status["state"], ("hangup-bot", "completed", "failed"))

    async def test_bad_token_or_signature_refused(self):
        """A stream with a wrong token is closed 1008; an upgrade with a bad signature is refused."""
        await self.start()
        _, fake_call, stream = await self.call("Hi")
        bad = TwilioMediaClient(reactor, stream.url, call_sid=fake_call.sid, token="wrong", headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)})
        await bad.connect()
        code, reason = await bad.closed
        self.assertEqual((code, reason), (1008, "Unknown call"))
        forged = TwilioMediaClient(reactor, stream.url, call_sid=fake_call.sid, token=stream.parameters["token"], headers={"X-Twilio-Signature": sign_request("not-the-token", stream.url)})
        with self.assertRaises(UpgradeRefused) as refused:
            await forged.connect()
        self.assertEqual(refused.exception.status, 403)
