"""
Plivo V3 -> V2 downgrade (issue 12 item 3), through the daemon's real webhook: Plivo signs every
callback with V3 and with V2, and V2 covers only the URL path and a nonce. V2 headers sent alone,
or beside a V3 signature that does not match, must not carry a forged body into a live call,
unless ``plivo.allowV2Signatures`` says V2 is accepted.

The signatures are the official ``plivo`` SDK's: V3 computed with its ``signature_v3`` helpers,
V2 (which it only validates) checked with its ``validate_signature`` before being sent.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import urlencode

from plivo.utils import signature_v3, validate_signature as sdk_validate_v2
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.config import ConfigError, parse_config
from voicecall.testing.plivo import FakePlivo, Scenario

from tests.harness import eventually, free_port, http_client, serve, start_daemon

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
TOKEN = "fake-plivo-auth-token-for-tests"
CALLEE = "+15550001234"


def sdk_v3(url: str, params: dict, nonce: str) -> str:
    """X-Plivo-Signature-V3 of a POST, as the plivo SDK builds it."""
    base = signature_v3.construct_post_url(url, dict(params))
    return signature_v3.get_signature_v3(TOKEN.encode(), base.decode(), nonce.encode()).decode()


def v2_signature(url: str, nonce: str) -> str:
    """X-Plivo-Signature-V2 of any callback to `url`'s path; the SDK must accept it for `url`."""
    base = url.split("?", 1)[0]
    signature = base64.b64encode(hmac.new(TOKEN.encode(), (base + nonce).encode(), hashlib.sha256).digest()).decode()
    assert sdk_validate_v2(url, nonce, signature, TOKEN), "the plivo SDK refuses our V2 signature"
    return signature


def v2_headers(url: str) -> dict:
    nonce = str(secrets.randbelow(10**20))
    return {"X-Plivo-Signature-V2": v2_signature(url, nonce), "X-Plivo-Signature-V2-Nonce": nonce}


def v3_headers(url: str, params: dict) -> dict:
    nonce = str(secrets.randbelow(10**20))
    return {"X-Plivo-Signature-V3": sdk_v3(url, params, nonce), "X-Plivo-Signature-V3-Nonce": nonce}


class PlivoDowngradeTests(TestCase):
    """V2 alone, or V2 beside a failing V3, never gets a forged callback into a call by default."""

    timeout = 60

    async def start(self, **plivo):
        self.http = http_client(self)
        # Plivo signs every callback both ways.
        self.fake = FakePlivo(reactor, AUTH_ID, TOKEN, http=self.http, scenario=Scenario(utterances=[], silence=30), signature="both")
        base = await serve(self, self.fake.resource())
        port = free_port()
        self.webhook = f"http://127.0.0.1:{port}/voice/webhook"
        config = {
            "provider": "plivo",
            "fromNumber": "+15550000000",
            "plivo": {"authId": AUTH_ID, "authToken": TOKEN, "baseUrl": base, **plivo},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": self.webhook,
            "maxConcurrentCalls": 3,
            "transcriptTimeoutMs": 20000,
        }
        self.service, self.rpc = await start_daemon(self, config)
        self.addCleanup(self.fake.hang_up_all)
        initiated = await self.rpc.call("voicecall.initiate", {"to": CALLEE, "message": "Hello", "mode": "conversation"})
        self.call_id = initiated["callId"]
        await eventually(lambda: self.fake.calls and self.call().speak_texts, 10, "the greeting")
        await eventually(lambda: self.status_is("listening"), 10, "the call to listen")
        self.assertIn("X-Plivo-Signature-V2", self.fake.webhooks[0].headers)

    def call(self):
        (call,) = self.fake.calls.values()
        return call

    async def status(self):
        return (await self.rpc.call("voicecall.status", {"callId": self.call_id}))["call"]

    async def status_is(self, state):
        return (await self.status())["state"] == state

    async def post(self, url: str, params: dict, headers: dict) -> int:
        hdrs = {"Content-Type": ["application/x-www-form-urlencoded"], **{k: [v] for k, v in headers.items()}}
        response = await self.http.post(url, data=urlencode(params).encode(), headers=hdrs)
        await response.content()
        return response.code

    def forgeries(self):
        """A forged caller utterance and a forged hang-up for the live call: (url, params) each."""
        uuid = self.call().call_uuid
        speech = (f"{self.webhook}?provider=plivo&flow=getinput&callId={self.call_id}",
                  {"CallUUID": uuid, "CallStatus": "in-progress", "Speech": "forged words"})
        hangup = (f"{self.webhook}?provider=plivo&flow=hangup&callId={self.call_id}",
                  {"CallUUID": uuid, "CallStatus": "completed", "Event": "Hangup", "HangupCause": "NORMAL_CLEARING"})
        return [speech, hangup]

    async def assertUntouched(self, before):
        after = await self.status()
        self.assertEqual((after["state"], after["transcript"]), (before["state"], before["transcript"]))
        self.assertNotIn("forged words", [t["text"] for t in after["transcript"]])
        self.assertIsNone(self.service.manager.find(self.call_id).end_reason)

    async def test_v2_alone_refused(self):
        """V2 headers valid for the webhook's path, sent alone with a forged Speech or hang-up: 401, nothing changes."""
        await self.start()
        before = await self.status()
        codes = [await self.post(url, params, v2_headers(url)) for url, params in self.forgeries()]
        self.assertEqual(codes, [401, 401])
        await self.assertUntouched(before)

    async def test_failed_v3_does_not_fall_back_to_v2(self):
        """Both pairs, V3 over the genuine body and V2 valid, with a forged body: 401 (V3 decides), nothing changes."""
        await self.start()
        before = await self.status()
        codes = []
        for url, params in self.forgeries():
            genuine = {**params, "Speech": "hello"} if "Speech" in params else {**params, "CallStatus": "in-progress"}
            headers = {**v3_headers(url, genuine), **v2_headers(url)}
            codes.append(await self.post(url, params, headers))
        self.assertEqual(codes, [401, 401])
        await self.assertUntouched(before)

    async def test_v3_still_accepted(self):
        """A callback V3-signed by the SDK's construction (with V2 beside it, as Plivo sends) is accepted."""
        await self.start()
        url, params = self.forgeries()[0]
        params = {**params, "Speech": "real words"}
        self.assertEqual(await self.post(url, params, {**v3_headers(url, params), **v2_headers(url)}), 200)
        self.assertIn("real words", [t["text"] for t in (await self.status())["transcript"]])

    async def test_v2_accepted_when_allowed(self):
        """With plivo.allowV2Signatures, a V2-only callback is accepted: the weaker scheme is an explicit choice."""
        await self.start(allowV2Signatures=True)
        url, params = self.forgeries()[0]
        self.assertEqual(await self.post(url, params, v2_headers(url)), 200)
        self.assertIn("forged words", [t["text"] for t in (await self.status())["transcript"]])


class AllowV2ConfigTests(SynchronousTestCase):
    """plivo.allowV2Signatures: a boolean, false unless set."""

    def config(self, **plivo):
        return parse_config({"provider": "plivo", "fromNumber": "+15550000000",
                             "plivo": {"authId": AUTH_ID, "authToken": TOKEN, **plivo}}, {})

    def test_default_false(self):
        """Without the key, V2 signatures are not accepted."""
        self.assertIs(self.config().plivo.allow_v2_signatures, False)

    def test_true(self):
        """true opts in."""
        self.assertIs(self.config(allowV2Signatures=True).plivo.allow_v2_signatures, True)

    def test_not_boolean(self):
        """Anything but a boolean is a config problem naming the key."""
        with self.assertRaises(ConfigError) as caught:
            self.config(allowV2Signatures="yes")
        self.assertIn("plivo.allowV2Signatures", str(caught.exception))
