"""
Secrets never reach the logs (issue 8): a full run of the real `twistd voicecall` daemon, with a
distinctive value for every secret in its config, then a scan of everything it and the CLI printed
for each secret, its base64 and the HTTP Basic credentials built from it.

The run: an outbound streamed Twilio call placed with the CLI (the fake Twilio, the fake OpenAI
TTS and the fake realtime STT in this process, on loopback), its media stream started with the
minted stream token, a conversation turn, a webhook with a bad signature, RPC and CLI errors, and
a carrier API error whose body echoes the request's Authorization header (as some proxies do).
"""
from __future__ import annotations

import base64
import math
import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from voicecall.client import RemoteError
from voicecall.infra.audio import ulaw_encode
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient

from tests.harness import (
    READY,
    READY_TIMEOUT,
    Daemon,
    call_record,
    daemon_argv,
    eventually,
    free_port,
    http_client,
    make_workdir,
    rpc,
    run_cli,
    serve,
    spawn,
    speech_fakes,
    webhook_client,
)

SID = "AC" + "5" * 32
SECRETS = {
    "twilio.authToken": "SECRETtwilioTok3n7f1",
    "twilio.signingKey": "SECRETsigningKey9q2w",
    "telnyx.apiKey": "KEYSECRETtelnyx0a8b",
    "plivo.authToken": "SECRETplivoTok3n5c6d",
    "streaming.openaiApiKey": "sk-SECRETsttKey1x2y",
    "tts.openai.apiKey": "sk-SECRETttsKey3z4w",
    "tts.elevenlabs.apiKey": "SECRETelevenLabs7u8i",
    "responseApiKey": "sk-SECRETresponse5o6p",
    "tunnel.ngrokAuthToken": "SECRETngrokTok3n1k2",
}


def tone(seconds: float) -> bytes:
    samples = [int(8000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(int(8000 * seconds))]
    return ulaw_encode(struct.pack(f"<{len(samples)}h", *samples))


def encodings(secret: str, user: str | None = None) -> dict[str, str]:
    """The forms a secret leaks in: itself, base64 (padded or not) and Basic credentials."""
    forms = {"raw": secret, "b64": base64.b64encode(secret.encode()).decode().rstrip("=")}
    if user:
        forms["basic"] = base64.b64encode(f"{user}:{secret}".encode()).decode().rstrip("=")
    return forms


class LogSecretsTests(TestCase):
    timeout = 90

    async def test_no_secret_in_any_output(self):
        """No configured secret or stream token appears in the daemon's log, the CLI's output or `status`."""
        http = http_client(self)
        fake = FakeTwilio(reactor, SID, SECRETS["twilio.authToken"], http=http, scenario=Scenario(utterances=[]))
        twilio_base = await serve(self, fake.resource())
        _, speech_base, stt = await speech_fakes(
            self, SECRETS["tts.openai.apiKey"], SECRETS["streaming.openaiApiKey"], ["A table for two"]
        )
        port = free_port()
        workdir = make_workdir(self, {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": SID, "authToken": SECRETS["twilio.authToken"], "baseUrl": twilio_base,
                       "signingKeys": {"SK" + "6" * 32: SECRETS["twilio.signingKey"]}},
            "telnyx": {"apiKey": SECRETS["telnyx.apiKey"], "connectionId": "123"},
            "plivo": {"authId": "MASECRETSECRETSECRET", "authToken": SECRETS["plivo.authToken"]},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "streaming": {"enabled": True, "openaiApiKey": SECRETS["streaming.openaiApiKey"], "sttBaseUrl": stt.url,
                          "silenceDurationMs": 300},
            "tts": {"provider": "openai", "openai": {"apiKey": SECRETS["tts.openai.apiKey"], "baseUrl": speech_base + "/v1"},
                    "elevenlabs": {"apiKey": SECRETS["tts.elevenlabs.apiKey"]}},
            "responseApiKey": SECRETS["responseApiKey"],
            "tunnel": {"provider": "none", "ngrokAuthToken": SECRETS["tunnel.ngrokAuthToken"]},
            "transcriptTimeoutMs": 20000,
        })
        # The webhook must listen where publicUrl says (Twilio signs the URL it posts to).
        argv = [f"tcp:{port}:interface=127.0.0.1" if a == "tcp:0:interface=127.0.0.1" else a for a in daemon_argv(workdir)]
        process = spawn(self, argv, cwd=workdir.path)
        match = await process.wait_for_output(READY, READY_TIMEOUT, "voicecall ready line")
        daemon = Daemon(workdir=workdir, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())
        outputs: dict[str, str] = {}

        async def cli(name, *args):
            result = await run_cli(self, workdir, *args)
            outputs[f"cli {name} stdout"] = result.out
            outputs[f"cli {name} stderr"] = result.err
            return result

        # An outbound streamed call, its stream started with the minted token, and a turn.
        placed = await cli("call", "call", "--to", "+15550001234", "--message", "Good evening", "--mode", "conversation")
        call_id = placed.json()["callId"]
        fake_call = await eventually(lambda: next(iter(fake.calls.values()), None), 10, "the fake call")
        stream = await fake_call.next_stream()
        self.assertIsNotNone(stream, daemon.process.stdout[-3000:] + repr(list(fake.webhooks)[-3:]))
        stream_token = stream.parameters["token"]
        client = TwilioMediaClient(reactor, stream.url, call_sid=fake_call.sid, token=stream_token,
                                   headers={"X-Twilio-Signature": sign_request(SECRETS["twilio.authToken"], stream.url)})
        await client.connect()

        async def close_client():
            if not client.closed.called:
                client.close()
            await client.closed

        self.addCleanup(close_client)
        async def said(text):
            record = await call_record(daemon.rpc_path, call_id)
            return text in [t["text"] for t in record["transcript"] if t["speaker"] == "bot"]

        await eventually(lambda: said("Good evening"), 15, "the greeting to play")
        turn = Deferred.fromCoroutine(rpc(daemon.rpc_path, "voicecall.continue", {"callId": call_id, "message": "How many people?"}))
        await eventually(lambda: said("How many people?"), 15, "the question to play")
        client.talk(tone(0.6))
        self.assertEqual((await turn)["transcript"], "A table for two")

        # A webhook with a bad signature, and one without.
        web = webhook_client(self)
        body = b"CallSid=" + fake_call.sid.encode() + b"&CallStatus=completed"
        bad = await web._http.post(daemon.webhook_url, data=body, headers={
            b"Content-Type": [b"application/x-www-form-urlencoded"], b"X-Twilio-Signature": [b"c2lnbmF0dXJl"]})
        self.assertEqual(bad.code, 401)
        await bad.content()

        # RPC and CLI errors.
        with self.assertRaises(RemoteError):
            await rpc(daemon.rpc_path, "voicecall.continue", {"callId": "no-such-call", "message": "hi"})
        await cli("continue-unknown", "continue", "--call-id", "no-such-call", "--message", "hi")

        # A carrier API error whose body echoes the Authorization header it got.
        basic = "Basic " + base64.b64encode(f"{SID}:{SECRETS['twilio.authToken']}".encode()).decode()
        fake.fail_next(401, ('{"code": 20003, "message": "Authenticate: bad credentials %s (token %s)"}'
                             % (basic, SECRETS["twilio.authToken"])).encode())
        await cli("call-fails", "call", "--to", "+15550009999", "--message", "Hi", "--mode", "notify")

        await cli("status", "status")
        await cli("status-call", "status", "--call-id", call_id)
        record = await call_record(daemon.rpc_path, call_id)
        outputs["status rpc"] = repr(record)
        for call in list(fake.calls.values()):
            call.hangup_by_callee()
        await fake.settle()
        await close_client()
        await daemon.stop()
        outputs["daemon stdout"] = daemon.process.stdout
        outputs["daemon stderr"] = daemon.process.stderr
        self.assertIn("voicecall ready", outputs["daemon stdout"])

        leaks = []
        for name, secret in {**SECRETS, "stream token": stream_token}.items():
            user = SID if name == "twilio.authToken" else None
            for form, value in encodings(secret, user).items():
                for where, text in outputs.items():
                    if value in text:
                        leaks.append(f"{name} ({form}) in {where}")
        self.assertEqual(leaks, [], "\n".join(leaks) + "\n" + outputs["daemon stdout"][-3000:])

        # The store needs none of the configured secrets.
        stored = b""
        for entry in os.listdir(workdir.path):
            if entry.startswith("voicecall") and not entry.endswith((".json", ".sock")) or entry.endswith(("-wal", ".db", ".sqlite")):
                with open(os.path.join(workdir.path, entry), "rb") as f:
                    stored += f.read()
        self.assertTrue(stored, os.listdir(workdir.path))
        for name, secret in SECRETS.items():
            self.assertNotIn(secret.encode(), stored, f"{name} in the store")
