"""
A streamed call survives its daemon's restart (issue 16, "Restart without dropping calls").

The stream TwiML ends with a way back, `</Connect><Redirect>{resume URL}</Redirect>`: when the
WebSocket closes, Twilio runs the Redirect (the fake Twilio follows its TwiML as Twilio does), and
the daemon answering it gives the same call a fresh stream. The webhook port is held across
restarts the way systemd's voicecall-web.socket holds it: the test creates the listening socket
and hands it to each daemon as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=web, LISTEN_PID), so a connection made while no
daemon runs waits in its queue for the next one.

Real daemons (`twistd voicecall` children, or the daemon in this process), the fake Twilio, a real
media-stream client, the fake speech services, all on loopback.
"""
from __future__ import annotations

import math
import socket
import struct
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from voicecall.client import ConnectionClosed, RemoteError, connect
from voicecall.domain.store import open_readonly
from voicecall.infra.audio import ulaw_encode
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient

from tests.harness import (
    call_record,
    eventually,
    free_port,
    http_client,
    make_workdir,
    serve,
    speech_fakes,
    spawn_daemon,
    start_daemon,
    transcript,
    workdir,
)

SID = "AC" + "1" * 32
TOKEN = "twilio-restart-token"
TO = "+15550001234"
#: Issue 16: audio resumes within 3 s of the new process listening.
RESUME_SECONDS = 3.0


def tone(seconds: float, hz: float = 440.0, amplitude: int = 8000) -> bytes:
    """Mu-law audio loud enough for the fake STT's voice detector."""
    samples = [int(amplitude * math.sin(2 * math.pi * hz * n / 8000)) for n in range(int(8000 * seconds))]
    return ulaw_encode(struct.pack(f"<{len(samples)}h", *samples))


def held_socket(testcase) -> socket.socket:
    """A listening TCP socket on loopback, held by the test as systemd holds a .socket unit's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    testcase.addCleanup(sock.close)
    return sock


class RawHttp(Protocol):
    """One HTTP/1.1 request on a connection of its own; `answer` fires with the raw response."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        if not self.answer.called:
            self.answer.callback(self.received)


class StreamedCallRig:
    """The fakes a streamed Twilio call needs, and the media client that plays Twilio's socket."""

    def __init__(self, testcase: TestCase) -> None:
        self.testcase = testcase
        self.clients: list[TwilioMediaClient] = []

    async def start(self, port: int, transcripts=("A table for two", "At eight", "Thank you")) -> dict:
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=http_client(self.testcase), scenario=Scenario(utterances=[]))
        twilio_base = await serve(self.testcase, self.fake.resource())
        self.speech, speech_base, self.stt = await speech_fakes(self.testcase, transcripts=transcripts)
        self.testcase.addCleanup(self.hang_up)
        return {
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

    async def hang_up(self) -> None:
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()
        for client in self.clients:
            if not client.closed.called:
                client.close()
            await client.closed

    async def fake_call(self):
        return await eventually(lambda: next(iter(self.fake.calls.values()), None), 10, "the fake call")

    async def attach(self, fake_call) -> TwilioMediaClient:
        """
        Open the call's current (or next) `<Connect><Stream>` as Twilio does, and when that
        socket closes, tell the fake call: Twilio then goes on with the TwiML after `</Connect>`.
        """
        stream = await fake_call.next_stream()
        self.testcase.assertIsNotNone(stream, f"the call ended instead of streaming: {list(fake_call.errors)}")
        client = TwilioMediaClient(
            reactor,
            stream.url,
            call_sid=fake_call.sid,
            token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
        )
        self.clients.append(client)
        client.closed.addBoth(lambda result: (fake_call.end_stream() if fake_call.active_stream is stream else None, result)[1])
        await client.connect()
        return client


async def said_by(rpc_path: str, call_id: str, speaker: str) -> list[str]:
    return [text for who, text in transcript(await call_record(rpc_path, call_id)) if who == speaker]


class SocketHandOverTests(TestCase):
    timeout = 90

    async def test_a_connection_made_while_the_daemon_is_down_is_answered_by_the_next(self):
        """
        The port stays open across a restart: a request sent between one daemon's exit and the
        next one's start is queued by the held socket (its TCP connection is accepted by the
        kernel at once) and answered by the next process. Without the held socket it would be
        refused.
        """
        sock = held_socket(self)
        port = sock.getsockname()[1]
        work = make_workdir(self)
        first = await spawn_daemon(self, work, webhook_socket=sock)
        self.assertEqual(first.webhook_url, f"http://127.0.0.1:{port}/voice/webhook")
        await first.stop()
        request = b"GET /voice/hold-music HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        waiting = RawHttp(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), waiting)  # connected: queued, not refused
        self.assertFalse(waiting.answer.called)
        second = await spawn_daemon(self, work, webhook_socket=sock)
        answer = await waiting.answer
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertIn(b"<Play", answer)
        await second.stop()


async def status_of(rpc, call_id: str) -> dict:
    return (await rpc.call("voicecall.status", {"callId": call_id}))["call"]


def spoken(call: dict, speaker: str) -> list[str]:
    return [text for who, text in transcript(call) if who == speaker]


class StreamDropTests(TestCase):
    """The daemon in this process: the stream drops (the network), the daemon stays up."""

    timeout = 60

    async def start(self):
        self.rig = StreamedCallRig(self)
        config = await self.rig.start(free_port())
        config["inboundPolicy"] = "open"  # a stranger's call could be taken: a resume must not take one
        self.service, self.rpc = await start_daemon(self, config, workdir(self))
        self.call_id = (await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hi", "mode": "conversation"}))["callId"]
        self.fake_call = await self.rig.fake_call()
        self.first = await self.rig.attach(self.fake_call)
        await eventually(self.said("bot", "Hi"), 10, "the greeting")

    def said(self, speaker: str, text: str):
        async def check():
            return text in spoken(await status_of(self.rpc, self.call_id), speaker)

        return check

    async def test_a_dropped_stream_comes_back_through_the_redirect(self):
        """
        The stream drops while a `continue` waits for the answer: Twilio runs the Redirect after
        `</Connect>`, a signed POST to the resume URL, whose answer is a fresh stream (a new
        token) for the same call; the answer spoken on it answers the waiting `continue`, the
        transcript is whole, and the old token starts nothing.
        """
        await self.start()
        old_stream = self.fake_call.streams[-1]
        pending = self.rpc.call("voicecall.continue", {"callId": self.call_id, "message": "How many people?"})
        await eventually(self.said("bot", "How many people?"), 10, "the question")
        fetches = len(self.fake_call.documents)
        self.first.abort()  # the network drops the socket
        await self.first.closed
        second = await self.rig.attach(self.fake_call)
        resume = self.fake_call.documents[fetches]
        self.assertEqual((resume.kind, resume.method, resume.status), ("redirect", "POST", 200))
        self.assertIn(f"callId={self.call_id}", resume.url)
        self.assertIn("flow=resume", resume.url)
        self.assertTrue(resume.url.startswith(self.service.webhook_url + "?"), resume.url)
        new_stream = self.fake_call.streams[-1]
        self.assertNotEqual(new_stream.parameters["token"], old_stream.parameters["token"])
        second.talk(tone(0.6))
        self.assertEqual(await pending, {"success": True, "transcript": "A table for two"})
        call = await status_of(self.rpc, self.call_id)
        self.assertEqual(transcript(call), [("bot", "Hi"), ("bot", "How many people?"), ("user", "A table for two")])
        self.assertEqual(call["state"], "listening")
        stale = TwilioMediaClient(reactor, old_stream.url, call_sid=self.fake_call.sid, token=old_stream.parameters["token"],
                                  headers={"X-Twilio-Signature": sign_request(TOKEN, old_stream.url)})
        await stale.connect()
        self.assertEqual(await stale.closed, (1008, "Unknown call"))
        self.assertTrue(second.is_open)
        self.assertEqual(list(self.fake_call.errors), [])

    async def post(self, url: str, params: dict, signature: str):
        answer = await http_client(self).post(
            url, data=params, headers={"X-Twilio-Signature": [signature], "Content-Type": ["application/x-www-form-urlencoded"]}
        )
        return answer.code, (await answer.content()).decode()

    async def test_resume_requests_replayed_forged_or_for_an_ended_call(self):
        """
        The resume request is a webhook like the others: replayed byte for byte it mints no token;
        forged (a wrong signature) it is refused 401 and changes nothing; for a call that is over
        it is answered `<Hangup/>`.
        """
        await self.start()
        fetches = len(self.fake_call.documents)
        self.first.abort()
        await self.first.closed
        second = await self.rig.attach(self.fake_call)
        resume = self.fake_call.documents[fetches]
        code, body = await self.post(resume.url, resume.params, resume.signature)
        self.assertEqual(code, 200)
        self.assertNotIn("<Stream", body)
        self.assertNotIn("token", body)
        forged_url = resume.url.replace("n=", "n=0")
        code, body = await self.post(forged_url, resume.params, sign_request("not-the-token", forged_url, resume.params))
        self.assertEqual((code, body), (401, "Unauthorized"))
        self.assertTrue(second.is_open)
        self.fake_call.hangup_by_callee()
        await eventually(lambda: self.fake_call.is_ended, 5, "the callee's hang-up")
        ended = await eventually(self.ended, 10, "the call's end")
        self.assertEqual(ended, "completed")
        late_url = resume.url.replace("n=", "n=1")
        params = {**resume.params, "CallStatus": "in-progress"}
        code, body = await self.post(late_url, params, sign_request(TOKEN, late_url, params))
        self.assertEqual(code, 200)
        self.assertIn("<Response><Hangup/></Response>", body)
        # A resume naming a call nobody placed or took (an inbound CallSid) creates none.
        stranger_url = self.service.webhook_url + "?flow=resume&n=2"
        params = {**resume.params, "CallSid": "CA" + "7" * 32, "Direction": "inbound", "CallStatus": "in-progress"}
        code, body = await self.post(stranger_url, params, sign_request(TOKEN, stranger_url, params))
        self.assertEqual(code, 200)
        self.assertIn("<Response><Hangup/></Response>", body)
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])

    async def ended(self):
        state = (await status_of(self.rpc, self.call_id))["state"]
        return state if state in ("completed", "hangup-bot", "hangup-user", "failed") else None


class DaemonRestartTests(TestCase):
    """
    `twistd voicecall` children on a held webhook socket: the daemon is killed (kill -9) or
    stopped (SIGTERM, as `systemctl restart` does) mid-call and started again; the call goes on.
    """

    timeout = 120

    async def start(self):
        self.sock = held_socket(self)
        self.rig = StreamedCallRig(self)
        config = await self.rig.start(self.sock.getsockname()[1])
        self.work = make_workdir(self, config)
        self.daemon = await spawn_daemon(self, self.work, webhook_socket=self.sock)
        self.rpc = await self.connect_rpc()
        self.call_id = (await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hi", "mode": "conversation"}))["callId"]
        self.fake_call = await self.rig.fake_call()
        self.client = await self.rig.attach(self.fake_call)
        await eventually(self.said("bot", "Hi"), 10, "the greeting")
        # One whole turn, then a question whose answer the restart interrupts.
        pending = self.rpc.call("voicecall.continue", {"callId": self.call_id, "message": "How many people?"})
        await eventually(self.said("bot", "How many people?"), 10, "the question")
        self.client.talk(tone(0.6))
        self.assertEqual(await pending, {"success": True, "transcript": "A table for two"})
        self.waiting = self.rpc.call("voicecall.continue", {"callId": self.call_id, "message": "What time?"})
        # The RPC connection goes with the process: the gateway learns it (and the failure is
        # consumed here, not left for the garbage collector to log into a later test).
        self.waiting_failed: list = []
        self.waiting.addErrback(self.waiting_failed.append)
        await eventually(self.said("bot", "What time?"), 10, "the second question")
        # The status answer is the daemon's memory; what survives kill -9 is what it committed:
        # the question is on disk before the process is killed (the store is read as the CLI does).
        await eventually(self.stored("What time?"), 10, "the second question in the store")
        self.before = await call_record(self.daemon.rpc_path, self.call_id)
        self.assertEqual(self.before["state"], "listening")

    def stored(self, text: str):
        def check() -> bool:
            store = open_readonly(self.work.path)
            if store is None:
                return False
            with store:
                call = store.get_call(self.call_id)
            return call is not None and any(e.text == text for e in call.transcript)

        return check

    async def connect_rpc(self):
        client = await connect(reactor, self.daemon.rpc_path)
        self.addCleanup(client.transport.loseConnection)
        return client

    def said(self, speaker: str, text: str):
        async def check():
            return text in await said_by(self.daemon.rpc_path, self.call_id, speaker)

        return check

    async def restart_and_resume(self, stop) -> float:
        """
        Stop the daemon with `stop`, start the next one on the same socket and store, and follow
        the call's stream back; returns the seconds from the new process listening (its ready
        line) to the first audio it plays on the new stream.
        """
        fetches = len(self.fake_call.documents)
        await stop()
        await eventually(lambda: self.waiting_failed, 10, "the waiting continue to fail with its process")
        self.assertTrue(self.waiting_failed[0].check(ConnectionClosed, RemoteError), self.waiting_failed[0])
        await self.client.closed  # Twilio's socket closed: it runs the Redirect (queued by the held port)
        self.daemon = await spawn_daemon(self, self.work, webhook_socket=self.sock)
        listening = time.monotonic()
        self.client = await self.rig.attach(self.fake_call)
        self.rpc = await self.connect_rpc()
        heard = len(self.client.audio_received)
        await self.rpc.call("voicecall.speak", {"callId": self.call_id, "message": "Sorry, where were we?"})
        await eventually(lambda: len(self.client.audio_received) > heard, 10, "audio on the new stream")
        resumed = time.monotonic() - listening
        resumes = [d for d in list(self.fake_call.documents)[fetches:] if d.kind == "redirect"]
        self.assertTrue(resumes, [(d.kind, d.url) for d in self.fake_call.documents])
        self.assertTrue(all("flow=resume" in d.url and d.status == 200 for d in resumes), [(d.url, d.status, d.error) for d in resumes])
        self.assertEqual(list(self.fake_call.errors), [])
        self.assertFalse(self.fake_call.is_ended)
        return resumed

    async def check_call_goes_on(self):
        """Transcript and turn state as stored before the restart; the caller's answer is heard."""
        after = await call_record(self.daemon.rpc_path, self.call_id)
        self.assertEqual(transcript(after)[: len(transcript(self.before))], transcript(self.before))
        self.assertEqual(after["metadata"].get("turnCount"), self.before["metadata"].get("turnCount"))
        self.assertEqual(after["metadata"].get("turnCount"), 1)
        self.client.talk(tone(0.6))
        await eventually(self.said("user", "At eight"), 10, "the caller's answer on the new stream")
        pending = self.rpc.call("voicecall.continue", {"callId": self.call_id, "message": "Anything else?"})
        await eventually(self.said("bot", "Anything else?"), 10, "a question after the restart")
        self.client.talk(tone(0.6))
        self.assertEqual(await pending, {"success": True, "transcript": "Thank you"})
        self.assertEqual(
            transcript(await call_record(self.daemon.rpc_path, self.call_id)),
            [
                ("bot", "Hi"),
                ("bot", "How many people?"),
                ("user", "A table for two"),
                ("bot", "What time?"),
                ("bot", "Sorry, where were we?"),
                ("user", "At eight"),
                ("bot", "Anything else?"),
                ("user", "Thank you"),
            ],
        )

    async def test_kill9_mid_call(self):
        """kill -9 while a question waits for its answer: the next process resumes the stream within 3 s."""
        await self.start()
        resumed = await self.restart_and_resume(self.daemon.kill9)
        self.assertLess(resumed, RESUME_SECONDS)
        await self.check_call_goes_on()

    async def test_graceful_restart(self):
        """
        SIGTERM (systemctl restart): the daemon stops accepting, closes the streams so that
        Twilio runs the Redirect at once, and exits; the next process answers it.
        """
        await self.start()
        resumes = len(self.fake_call.documents)
        resumed = await self.restart_and_resume(self.daemon.stop)
        # The stopping daemon no longer accepted: Twilio's one Redirect waited for the next one.
        [resume] = [d for d in list(self.fake_call.documents)[resumes:] if d.kind == "redirect"]
        self.assertIn(b"<Stream", resume.body)
        self.assertLess(resumed, RESUME_SECONDS)
        await self.check_call_goes_on()

    async def test_without_the_held_port_the_call_ends(self):
        """
        Without the held port, Twilio's Redirect finds nothing listening: the fetch is refused
        and Twilio ends the call with an application error (11200), as the fake Twilio does.
        """
        await self.start()
        await self.daemon.kill9()
        self.sock.close()  # nobody holds the port now
        await self.client.closed
        self.assertEqual(await self.fake_call.when_ended(), "completed")
        [resume] = [d for d in self.fake_call.documents if d.kind == "redirect"]
        self.assertIn("flow=resume", resume.url)
        self.assertIsNone(resume.status)
        # Refused, or (under load: the SYN met the listening socket just before close() dropped
        # its queue) reset by peer: either way nothing holds the port.
        self.assertRegex(resume.error, "ConnectionRefused|Connection reset by peer")
        self.assertTrue(any("11200" in e for e in self.fake_call.errors), list(self.fake_call.errors))
