"""
The carrier's REST API misbehaves: down (connection refused), silent past the request time limit,
stalling mid-body, or answering 5xx, HTML, truncated JSON or JSON of the wrong shape. For Twilio,
Telnyx and Plivo the daemon (in process, on the real reactor) must give the SPEC error text
(`<Carrier> API error: ...`) over RPC and the CLI, leave the call `failed` (never stuck in
`initiated`), send each request once (only Twilio's 21220 live-update retries repeat one), and
keep serving.
"""
from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from voicecall.client import RemoteError

from tests.harness import Workdir, eventually, free_port, http_client, run_cli, serve, start_daemon, workdir
from voicecall.testing.twilio_carrier import sign_request

SID = "AC" + "1" * 32
TO = "+15550001234"
#: The request time limit the tests give the carrier clients (production default: 15 s).
TIME_LIMIT = 0.5
HTML = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>nginx</body>\r\n</html>\r\n"

PROVIDERS = {
    "twilio": {
        "prefix": "Twilio API error",
        "config": lambda base: {"twilio": {"accountSid": SID, "authToken": "tw-token", "baseUrl": base}},
        "created": {"sid": "CA" + "2" * 32, "status": "queued"},
        "no_id": "Twilio API error: call create returned no sid",
    },
    "telnyx": {
        "prefix": "Telnyx API error",
        "config": lambda base: {
            "telnyx": {"apiKey": "KEYtest", "connectionId": "conn-1", "baseUrl": base},
            "skipSignatureVerification": True,
        },
        "created": {"data": {"call_control_id": "v3:control-1", "call_leg_id": "leg", "is_alive": True}},
        "no_id": "Telnyx API error: dial returned no call_control_id",
    },
    "plivo": {
        "prefix": "Plivo API error",
        "config": lambda base: {"plivo": {"authId": "MAXXXXXXXXXXXXXXXXXX", "authToken": "pl-token", "baseUrl": base}},
        "created": {"api_id": "a", "message": "call fired", "request_uuid": "9834029e-58b6-11e1-b8b7-a5bd0e4e126f"},
        "no_id": "Plivo call create returned no request_uuid",
    },
}


class MisbehavingCarrier(Resource):
    """A carrier API answering every request as `mode` says, and counting requests."""

    isLeaf = True

    def __init__(self, created: dict) -> None:
        super().__init__()
        self.created = created
        self.mode = "ok"
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self.held: list = []

    def render(self, request):
        self.requests.append((request.method.decode(), request.path.decode()))
        self.bodies.append(request.content.read())
        mode = self.mode
        request.setHeader(b"content-type", b"application/json")
        if mode == "ok":
            request.setResponseCode(201 if request.method == b"POST" else 200)
            return json.dumps(self.created).encode()
        if mode == "hang":
            return self._hold(request)
        if mode == "stall-body":
            request.setResponseCode(201)
            request.setHeader(b"content-length", b"400")
            request.write(b'{"sid": "CA')
            return self._hold(request)
        if mode == "cut":
            request.setResponseCode(201)
            request.setHeader(b"content-length", b"400")
            request.write(b'{"sid": "CA')
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if mode == "500":
            request.setResponseCode(500)
            return b'{"code": 20500, "message": "Internal Server Error"}'
        if mode == "html":
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/html")
            return HTML
        if mode == "html200":
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/html")
            return HTML
        if mode == "nested":
            request.setResponseCode(201)
            return b"[" * 5000 + b"]" * 5000
        if mode == "truncated":
            request.setResponseCode(201)
            return json.dumps(self.created).encode()[:15]
        if mode == "wrong-shape":
            request.setResponseCode(201)
            return b'["not", "an", "object"]'
        if mode == "21220":
            if request.path.endswith(b"/Calls.json"):
                request.setResponseCode(201)
                return json.dumps(self.created).encode()
            request.setResponseCode(400)
            return b'{"code": 21220, "message": "Call is not in-progress. Cannot redirect.", "status": 400}'
        raise AssertionError(mode)

    def _hold(self, request):
        self.held.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        """Drop every held connection (test cleanup)."""
        held, self.held = self.held, []
        for request in held:
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                transport.abortConnection()


class CarrierFaultTests(TestCase):
    timeout = 45

    async def start(self, provider: str, base: str | None = None, **extra):
        spec = PROVIDERS[provider]
        self.carrier = MisbehavingCarrier(spec["created"])
        self.addCleanup(self.carrier.release)
        if base is None:
            base = await serve(self, self.carrier)
        self.directory = workdir(self)
        config = {
            "provider": provider,
            "fromNumber": "+15550000000",
            "maxConcurrentCalls": 3,
            **spec["config"](base),
            **extra,
        }
        self.service, self.rpc = await start_daemon(self, config, self.directory)
        # The production limit is 15 s; the tests shorten it to keep the suite quick.
        self.service._provider._api._timeout = TIME_LIMIT
        return spec

    async def initiate_fails(self, expected: str, exact: bool = True) -> dict:
        """voicecall.initiate fails with `expected`; returns the failed call's record."""
        try:
            await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hello", "mode": "conversation"})
        except RemoteError as e:
            message, data = str(e), e.data
        else:
            self.fail("initiate succeeded")
        if exact:
            self.assertEqual(message, expected)
        else:
            self.assertTrue(message.startswith(expected), message)
        self.assertIsInstance(data, dict)
        status = await self.rpc.call("voicecall.status", {"callId": data["callId"]})
        self.assertTrue(status["found"])
        call = status["call"]
        self.assertEqual((call["state"], call["endReason"]), ("failed", "failed"))
        active = await self.rpc.call("voicecall.status", {})
        self.assertEqual(active["calls"], [])
        return call

    async def check_provider(self, provider: str) -> None:
        spec = await self.start(provider)
        prefix, carrier = spec["prefix"], self.carrier
        cases = [
            ("500", f'{prefix}: 500 {{"code": 20500, "message": "Internal Server Error"}}', True),
            ("html", f"{prefix}: 502 <html>  <head><title>502 Bad Gateway</title></head>  <body>nginx</body>  </html>", True),
            ("html200", f"{prefix}: 200 answer is not JSON: <html>", False),
            ("truncated", f"{prefix}: 201 answer is not JSON: " + json.dumps(spec["created"])[:15], True),
            ("nested", f"{prefix}: 201 answer is not JSON: [[[[", False),
            ("cut", f"{prefix}: connection lost before a complete answer", True),
            ("wrong-shape", spec["no_id"], True),
            ("hang", f"{prefix}: no answer within {TIME_LIMIT:g}s", True),
            ("stall-body", f"{prefix}: no answer within {TIME_LIMIT:g}s", True),
        ]
        for mode, expected, exact in cases:
            carrier.mode = mode
            before = len(carrier.requests)
            await self.initiate_fails(expected, exact)
            self.assertEqual(len(carrier.requests) - before, 1, f"{mode}: {carrier.requests[before:]}")
        carrier.release()

        # The CLI prints the same text on stderr and exits non-zero.
        carrier.mode = "500"
        before = len(carrier.requests)
        cli = await run_cli(self, Workdir(self.directory, f"{self.directory}/voicecall.json"), "call", "--to", TO, "--message", "Hi")
        self.assertNotEqual(cli.code, 0)
        self.assertIn(f"{prefix}: 500 ", cli.err)
        self.assertEqual(len(carrier.requests) - before, 1)

        # Once the carrier recovers, the same daemon places calls again.
        carrier.mode = "ok"
        answer = await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hello", "mode": "conversation"})
        self.assertTrue(answer["initiated"])
        health = await self.rpc.call("voicecall.status", {"callId": answer["callId"]})
        self.assertEqual(health["call"]["state"], "initiated")

    async def test_twilio(self):
        """Twilio: every fault gives the SPEC error, a failed call, one request, and a daemon that recovers."""
        await self.check_provider("twilio")

    async def test_telnyx(self):
        """Telnyx: every fault gives the SPEC error, a failed call, one request, and a daemon that recovers."""
        await self.check_provider("telnyx")

    async def test_plivo(self):
        """Plivo: every fault gives the SPEC error, a failed call, one request, and a daemon that recovers."""
        await self.check_provider("plivo")

    async def test_carrier_down(self):
        """Connection refused: a clear connection error per carrier, a failed call, and the daemon keeps serving."""
        for provider, spec in PROVIDERS.items():
            await self.start(provider, base=f"http://127.0.0.1:{free_port()}")
            await self.initiate_fails(f"{spec['prefix']}: cannot connect (ConnectionRefusedError)")
            await self.service.stopService()

    async def test_twilio_21220_retried_twice_only(self):
        """A live update refused with 21220 is retried exactly twice; the speak fails with the SPEC text and the call listens again."""
        port = free_port()
        public = f"http://127.0.0.1:{port}/voice/webhook"
        await self.start("twilio", serve={"port": port, "bind": "127.0.0.1"}, publicUrl=public)
        call_id = (await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hi", "mode": "conversation"}))["callId"]
        # The callee answers and hears the greeting (commands wait for it), then the carrier turns hostile.
        url = f"{public}?callId={call_id}&type=status"
        form = {"CallSid": PROVIDERS["twilio"]["created"]["sid"], "AccountSid": SID, "CallStatus": "in-progress",
                "Direction": "outbound-api", "SequenceNumber": "1"}  # fmt: skip
        answered = await http_client(self).post(
            url, data=form, headers={"X-Twilio-Signature": sign_request("tw-token", url, form)}
        )
        self.assertEqual(answered.code, 200, await answered.text())
        await eventually(lambda: self.carrier.requests[-1][1].endswith(f"/Calls/{form['CallSid']}.json"), 5, "the greeting update")
        # Twilio plays the <Say> and follows its <Redirect>: that fetch tells voicecall the greeting was heard.
        twiml = parse_qs(self.carrier.bodies[-1].decode())["Twiml"][0]
        redirect = re.search(r"<Redirect[^>]*>([^<]+)</Redirect>", twiml).group(1).replace("&amp;", "&")
        form = {"CallSid": form["CallSid"], "AccountSid": SID, "CallStatus": "in-progress"}
        spoken = await http_client(self).post(
            redirect, data=form, headers={"X-Twilio-Signature": sign_request("tw-token", redirect, form)}
        )
        body = await spoken.text()
        self.assertEqual(spoken.code, 200, body)
        self.assertIn("<Gather", body)  # that Redirect is answered by listening: no live update to listen
        record = self.service.manager.find(call_id)
        await eventually(lambda: record.state.value == "listening", 5, "the listen after the greeting")
        self.carrier.mode = "21220"
        before = len(self.carrier.requests)
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.speak", {"callId": call_id, "message": "Are you there?"})
        self.assertEqual(
            str(caught.exception),
            'Twilio API error: 400 {"code": 21220, "message": "Call is not in-progress. Cannot redirect.", "status": 400}',
        )
        updates = self.carrier.requests[before:]
        self.assertEqual(len(updates), 3, updates)
        self.assertTrue(all(path.endswith(f"/Calls/{PROVIDERS['twilio']['created']['sid']}.json") for _, path in updates))
        call = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(call["state"], "listening")
        self.assertEqual([e["text"] for e in call["transcript"]], ["Hi"])  # the refused speak is not recorded

        # A hang-up the carrier refuses keeps the call (SPEC §4.5); the next one ends it.
        self.carrier.mode = "500"
        with self.assertRaises(RemoteError) as caught:
            await self.rpc.call("voicecall.end", {"callId": call_id})
        self.assertTrue(str(caught.exception).startswith("Twilio API error: 500 "))
        self.assertEqual((await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]["state"], "listening")
        self.carrier.mode = "ok"
        self.assertEqual(await self.rpc.call("voicecall.end", {"callId": call_id}), {"success": True})
        self.assertEqual((await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]["state"], "hangup-bot")
