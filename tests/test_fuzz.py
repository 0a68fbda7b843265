"""
Hostile input against a running daemon (issue 8): hypothesis-generated webhook requests for every
provider, media-stream frames and RPC lines, each sent over a real socket to an in-process daemon
(tests/harness.py) on loopback.

The properties: never a 5xx, never an error or failure logged, and nothing changes (no call record
created or changed, no carrier API request) unless the request carries a valid signature; a validly
signed request with garbage content changes only calls the daemon knows, only along the state
order of SPEC §3.2. A media stream whose `start` is invalid is never admitted. Every malformed RPC
line gets a JSON-RPC error object and the connection (and every other one) keeps working.

The reactor-driven tests cannot run inside `@given`, so hypothesis draws each test's inputs first
(derandomized, no example database: the same inputs on every run) and the test then sends them
one after the other to a daemon started once per test.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
from typing import Any
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from plivo.utils.signature_v3 import construct_post_url, get_signature_v3
from twilio.request_validator import RequestValidator
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from voicecall.control import rpc as rpcmod
from voicecall.domain.model import TERMINAL_STATES
from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient

from tests.harness import eventually, free_port, http_client, raw_rpc, serve, speech_fakes, start_daemon

#: Examples per fuzzing test; every test here stays well under 10 s.
EXAMPLES = int(os.environ.get("VOICECALL_FUZZ_EXAMPLES", "40"))

TWILIO_SID = "AC" + "1" * 32
TWILIO_TOKEN = "fuzz-twilio-token"
PLIVO_ID = "MAFUZZFUZZFUZZFUZZFU"
PLIVO_TOKEN = "fuzz-plivo-token"
TELNYX_KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
TELNYX_PUBLIC = base64.b64encode(TELNYX_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
KNOWN_TWILIO = "CA" + "2" * 32
KNOWN_TELNYX = "v3:fuzz-known-control-id"
KNOWN_PLIVO = "11111111-2222-3333-4444-555555555555"

ORDER = ["initiated", "ringing", "answered", "active", "speaking", "listening"]
TERMINAL = {s.value for s in TERMINAL_STATES}


def draw(strategy: st.SearchStrategy, n: int = EXAMPLES) -> list:
    """`n` inputs from `strategy`, the same on every run."""
    out: list = []

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out[:n]


def allowed_transition(before: str, after: str) -> bool:
    """SPEC §3.2: terminal is sticky; otherwise forwards only, speaking/listening alternate."""
    if before == after:
        return True
    if before in TERMINAL:
        return False
    if after in TERMINAL:
        return True
    if {before, after} <= {"speaking", "listening"}:
        return True
    return ORDER.index(after) > ORDER.index(before)


# --- a carrier that only records and answers --------------------------------------------------


class StubCarrier(Resource):
    """Every carrier's REST API at once: records each request, answers what a call create needs."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes]] = []
        self.created = 0

    def render(self, request):
        self.requests.append((request.method, request.path))
        request.setHeader(b"Content-Type", b"application/json")
        # The first call placed gets the ids the examples name; later ones ids of their own, as a
        # carrier's are (the store refuses a second call with one carrier id).
        path = request.path.rstrip(b"/")
        creates = request.method == b"POST" and path.endswith((b"/Calls.json", b"/v2/calls", b"/Call"))
        n = self.created if creates else 0
        self.created += creates

        def fresh(known: str) -> str:
            return known if n == 0 else f"{known[:-6]}{n:06d}"

        return json.dumps({
            "sid": fresh(KNOWN_TWILIO),
            "status": "queued",
            "data": {"call_control_id": fresh(KNOWN_TELNYX), "call_leg_id": "leg", "call_session_id": "session", "is_alive": True},
            "request_uuid": fresh(KNOWN_PLIVO),
            "api_id": "fuzz",
            "message": "call fired",
        }).encode()


# --- raw HTTP -------------------------------------------------------------------------------


class _Raw(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < 1024 * 1024:
            self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(bytes(self.data))


async def raw_http(port: int, payload: bytes, timeout: float) -> bytes:
    """Send `payload` on a fresh connection; everything answered until the server closes (or `timeout`)."""
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_Raw))
    cutoff = reactor.callLater(timeout, proto.transport.abortConnection)
    proto.transport.write(payload)
    data = await proto.done
    if cutoff.active():
        cutoff.cancel()
    return data


def statuses(answer: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"^HTTP/1\.[01] (\d{3})", answer, re.M)]


# --- strategies -----------------------------------------------------------------------------

_token = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True)
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=120)
_weird = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e309", "NaN", "null", "true", "[]", "{}", "\u202e\u0000", "A" * 300, "%00", "../../etc"]),
    st.integers().map(str),
)

STATUSES = ["queued", "initiated", "ringing", "in-progress", "answered", "completed", "busy", "no-answer", "failed", "canceled"]
TWILIO_KEYS = ["CallSid", "AccountSid", "CallStatus", "Direction", "From", "To", "SpeechResult", "Confidence", "Digits",
               "AnsweredBy", "CallbackSource", "SequenceNumber", "turnToken", "callId", "flow", "type"]
PLIVO_KEYS = ["CallUUID", "RequestUUID", "CallStatus", "Direction", "From", "To", "Event", "Speech", "Digits", "HangupCause",
              "ConfidenceScore", "callId", "flow", "InputType", "Unstable"]
TELNYX_EVENTS = ["call.initiated", "call.answered", "call.hangup", "call.speak.started", "call.speak.ended",
                 "call.transcription", "call.dtmf.received", "call.machine.detection.ended", "bogus.event", ""]


def _form_value(known: str) -> st.SearchStrategy:
    return st.one_of(_weird, st.sampled_from(STATUSES + [known, "inbound", "outbound-api", "outbound-dial"]))


def form_pairs(keys: list[str], known: str) -> st.SearchStrategy:
    """Form fields (duplicates allowed) drawn mostly from the provider's own field names."""
    key = st.one_of(st.sampled_from(keys or ["data"]), st.text(max_size=12))
    return st.lists(st.tuples(key, _form_value(known)), max_size=12)


def form_dict(keys: list[str], known: str) -> st.SearchStrategy:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=12)), _form_value(known), max_size=12)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _weird)
_json_any = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


def telnyx_json(known: str) -> st.SearchStrategy:
    payload = st.fixed_dictionaries(
        {},
        optional={
            "call_control_id": st.one_of(st.just(known), _json_any),
            "client_state": st.one_of(st.just(base64.b64encode(b"not-a-call").decode()), _json_any),
            "direction": st.one_of(st.sampled_from(["incoming", "outgoing"]), _json_any),
            "from": _json_any, "to": _json_any,
            "hangup_cause": _json_any,
            "transcription_data": st.one_of(_json_any, st.fixed_dictionaries({"transcript": _weird, "is_final": _json_any})),
            "digit": _json_any,
        },
    )
    data = st.fixed_dictionaries({}, optional={
        "id": _json_any, "event_type": st.one_of(st.sampled_from(TELNYX_EVENTS), _json_any),
        "occurred_at": _json_any, "payload": st.one_of(payload, _json_any),
    })
    return st.one_of(st.fixed_dictionaries({"data": st.one_of(data, _json_any)}), _json_any)


def mock_json(known: str) -> st.SearchStrategy:
    event = st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(["call.answered", "call.speech", "call.ended", "call.ringing", "call.error",
                                           "call.dtmf", "call.silence", "call.speaking", "x"]), _json_any),
        "callId": st.one_of(st.just(known), _json_any),
        "transcript": _json_any, "isFinal": _json_any, "timestamp": _json_any, "reason": _json_any,
        "direction": _json_any, "from": _json_any, "durationMs": _json_any, "confidence": _json_any, "id": _json_any,
    })
    return st.one_of(
        st.fixed_dictionaries({"event": event}),
        st.fixed_dictionaries({"events": st.lists(st.one_of(event, _json_any), max_size=4)}),
        _json_any,
    )


def encode_body(kind: str, value: Any) -> bytes:
    if kind == "form":
        return urlencode(value).encode()
    if kind == "json":
        return json.dumps(value).encode()
    return value


def bodies(keys: list[str], known: str, json_body: st.SearchStrategy) -> st.SearchStrategy:
    """(content-type, body) pairs: forms, JSON, random bytes, with odd sizes and encodings."""
    body = st.one_of(
        form_pairs(keys, known).map(lambda v: encode_body("form", v)),
        json_body.map(lambda v: encode_body("json", v)),
        st.binary(max_size=512),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"{", b"\xff\xfe\x00", b"a=%ZZ&b=%", b"=&=&&", b"\x00" * 64, b"[" * 2000 + b"]" * 2000]),
    )
    size = st.sampled_from(["as-is"] * 8 + ["huge-field", "at-cap", "over-cap"])
    content_type = st.one_of(
        st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/form-data; boundary=x",
                         "application/x-www-form-urlencoded; charset=utf-16", "", "*/*;;;", "application/json; charset=\u00e9"]),
        _header_value,
    )
    return st.tuples(content_type, body, size).map(_sized)


def _sized(item):
    content_type, body, size = item
    if size == "huge-field":
        body = body + b"&SpeechResult=" + b"x" * 40_000
    elif size == "at-cap":
        body = (body + b"&pad=" + b"y" * 65_536)[:65_536]
    elif size == "over-cap":
        body = body + b"z" * 70_000
    return content_type, body


def paths(base: str) -> st.SearchStrategy:
    query = st.one_of(
        st.just(""),
        st.lists(st.tuples(st.text(max_size=8), _weird), max_size=4).map(lambda q: "?" + urlencode(q)),
        st.text(max_size=30).map(lambda t: "?" + quote(t, safe="=&%")),
        st.sampled_from(["?", "?&&", "?a=1&a=2", "?callId=x&flow=answer&token=abc", "?%ff%fe=%00"]),
    )
    odd = st.one_of(
        st.sampled_from([base + "/", "/voice/hold-music", "/voice/stream", "/", "//voice/webhook", "/voice/webhook/..", "/VOICE/WEBHOOK"]),
        st.text(max_size=20).map(lambda t: "/" + quote(t)),
    )
    path = st.sampled_from([True] * 5 + [False]).flatmap(lambda ours: st.just(base) if ours else odd)
    return st.tuples(path, query).map("".join)


SIGNATURE_HEADERS = ["X-Twilio-Signature", "telnyx-signature-ed25519", "telnyx-timestamp", "X-Plivo-Signature-V3",
                     "X-Plivo-Signature-V3-Nonce", "X-Plivo-Signature-V2", "X-Plivo-Signature-V2-Nonce",
                     "X-Twilio-Webhooks-Signature-Settings", "X-Forwarded-Host", "X-Forwarded-Proto", "Host", "Expect",
                     "Transfer-Encoding", "Connection", "X-Forwarded-For"]


def headers() -> st.SearchStrategy:
    value = st.one_of(
        _header_value,
        st.sampled_from(["", "=", "AAAA", base64.b64encode(os.urandom(64)).decode(), "100-continue", "chunked",
                         str(int(time.time())), "keep-alive", "evil.example", "a,b,c", "[::1]:80", "x@y"]),
    )
    name = st.one_of(st.sampled_from(SIGNATURE_HEADERS), _token)
    return st.lists(st.tuples(name, value), max_size=8)


#: The signature headers each provider's pre-auth gate wants.
GATES = {
    "twilio": ["X-Twilio-Signature"],
    "telnyx": ["telnyx-signature-ed25519", "telnyx-timestamp"],
    "plivo": ["X-Plivo-Signature-V3", "X-Plivo-Signature-V3-Nonce"],
    "plivo-v2": ["X-Plivo-Signature-V2", "X-Plivo-Signature-V2-Nonce"],
    "mock": [],
}


def garbage_signatures(gates: list[str]) -> st.SearchStrategy:
    """Either nothing, or every header of one of the provider's gates, with garbage values."""
    value = st.one_of(
        _header_value.filter(bool),
        st.sampled_from([base64.b64encode(os.urandom(20)).decode(), base64.b64encode(os.urandom(64)).decode(),
                         str(int(time.time())), "nonce", "A" * 2000, "=,=,="]),
    )
    options = [st.just([])] + [st.tuples(*[st.tuples(st.just(n), value) for n in GATES[g]]).map(list) for g in gates if GATES[g]]
    return st.one_of(*options)


def requests(base: str, keys: list[str], known: str, json_body: st.SearchStrategy, gates: list[str] = ()) -> st.SearchStrategy:
    """Whole requests: method, target, headers (duplicates allowed), body, content-length skew."""
    method = st.sampled_from(["POST"] * 24 + ["GET", "PUT", "HEAD", "OPTIONS", "P0ST"])
    skew = st.sampled_from([0] * 6 + [-1, -7, 3])
    all_headers = st.tuples(garbage_signatures(list(gates)), headers()).map(lambda pair: pair[0] + pair[1])
    return st.fixed_dictionaries({
        "method": method, "target": paths(base), "headers": all_headers, "body": bodies(keys, known, json_body), "skew": skew,
    })


def render_request(req: dict, port: int, extra: list[tuple[str, str]] = ()) -> tuple[bytes, float]:
    """The request's bytes, and how long to wait for the server to close the connection."""
    content_type, body = req["body"]
    length = max(0, len(body) + req["skew"])
    lines = [f"{req['method']} {req['target']} HTTP/1.1".encode("latin-1", "replace")]
    given_names = {n.lower() for n, _ in list(req["headers"]) + list(extra)}
    if "host" not in given_names:
        lines.append(f"Host: 127.0.0.1:{port}".encode())
    for name, value in list(req["headers"]) + list(extra):
        if name.lower() in ("content-length", "connection"):
            continue
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1", "replace"))
    lines.append(b"Content-Type: " + content_type.encode("latin-1", "replace"))
    lines.append(b"Content-Length: %d" % length)
    lines.append(b"Connection: close")
    # A declared length above what is sent leaves the server waiting for the rest: we hang up.
    timeout = 0.3 if req["skew"] > 0 else 8.0
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, timeout


# --- the daemon -----------------------------------------------------------------------------


class FuzzBase(TestCase):
    timeout = 120

    def setUp(self):
        self.logged: list[dict] = []

        def observe(event):
            if event.get("log_failure") is not None or event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
                self.logged.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def assertNothingLogged(self, what=""):
        from twisted.logger import formatEvent

        bad = [formatEvent(e) + (f"\n{e['log_failure'].getTraceback()}" if e.get("log_failure") else "") for e in self.logged]
        self.logged.clear()
        self.flushLoggedErrors()
        self.assertEqual(bad, [], f"errors logged for {what!r}")

    async def start(self, provider: str, **extra):
        self.carrier = StubCarrier()
        base = await serve(self, self.carrier)
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        config = {
            "provider": provider,
            "fromNumber": "+15550000000",
            "serve": {"port": self.port, "bind": "127.0.0.1"},
            "publicUrl": f"{self.origin}/voice/webhook",
            "twilio": {"accountSid": TWILIO_SID, "authToken": TWILIO_TOKEN, "baseUrl": base},
            "telnyx": {"apiKey": "KEY-fuzz", "connectionId": "123", "publicKey": TELNYX_PUBLIC, "baseUrl": base},
            "plivo": {"authId": PLIVO_ID, "authToken": PLIVO_TOKEN, "baseUrl": base},
            "maxConcurrentCalls": 3,
            **extra,
        }
        if provider == "mock":
            for key in ("twilio", "telnyx", "plivo"):
                config.pop(key)
        self.service, self.rpc = await start_daemon(self, config)
        answer = await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "conversation"})
        self.known = answer["callId"]
        record = await self.rpc.call("voicecall.status", {"callId": self.known})
        self.known_provider_id = record["call"].get("providerCallId") or self.known
        self.logged.clear()

    async def snapshot(self) -> dict:
        """Every stored call record, plus what the manager holds in memory, plus the carrier's request count."""
        stored = {r.call_id: r.to_json() for r in await self.service._store.recent_calls(1000)}
        live = {c.call_id: c.to_json() for c in self.service.manager.active_calls()}
        return {"stored": stored, "live": live, "carrier": len(self.carrier.requests)}

    async def send(self, req: dict, extra=()) -> list[int]:
        payload, timeout = render_request(req, self.port, extra)
        answer = await raw_http(self.port, payload, timeout)
        codes = statuses(answer)
        self.assertFalse([c for c in codes if c >= 500], f"5xx for {payload[:600]!r}: {answer[:300]!r}")
        return codes

    async def check_unsigned(self, strategy):
        """No request without a valid signature is answered 5xx, logs an error or changes anything."""
        before = await self.snapshot()
        for req in draw(strategy):
            await self.send(req)
            self.assertNothingLogged(req)
            after = await self.snapshot()
            self.assertEqual(after, before, f"state changed by an unsigned request: {req!r}")
        # The daemon still works: a health check answers.
        self.assertTrue((await self.rpc.call("voicecall.health", {}))["ok"])

    async def check_signed(self, examples, sign):
        """Validly signed garbage: no 5xx, no error logged, no new call, known calls only move forwards."""
        before = await self.snapshot()
        for req in examples:
            await self.send(req, sign(req))
            self.assertNothingLogged(req)
            after = await self.snapshot()
            self.assertEqual(set(after["stored"]), set(before["stored"]), f"a call appeared or vanished: {req!r}")
            for call_id, old in before["stored"].items():
                new = after["stored"][call_id]
                self.assertTrue(allowed_transition(old["state"], new["state"]), f"{old['state']} -> {new['state']} by {req!r}")
                self.assertEqual(new["transcript"][: len(old["transcript"])], old["transcript"], f"transcript rewritten by {req!r}")
            before = after
        # Marker: a call placed now goes through the carrier and back, after whatever the
        # examples set off with it (hang-ups, speaks) was sent.
        await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "notify"})
        self.assertNothingLogged("after the signed examples")
        self.assertTrue((await self.rpc.call("voicecall.health", {}))["ok"])


def plausible_form(required: dict, optional: dict) -> st.SearchStrategy:
    """A body that looks like the carrier's own, about the call we know, with garbage here and there."""
    return st.fixed_dictionaries(required, optional=optional)


def with_path(strategy: st.SearchStrategy, target: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(strategy, target).map(lambda pair: {**pair[0], "target": pair[1]})


class WebhookFuzzTests(FuzzBase):
    """Unsigned or badly signed requests of every shape, to every provider's webhook."""

    async def test_twilio_unsigned(self):
        """Twilio: no request without a valid X-Twilio-Signature changes anything or gets a 5xx."""
        await self.start("twilio")
        await self.check_unsigned(requests("/voice/webhook", TWILIO_KEYS, KNOWN_TWILIO, _json_any, ["twilio"]))

    async def test_telnyx_unsigned(self):
        """Telnyx: no request without a valid Ed25519 signature changes anything or gets a 5xx."""
        await self.start("telnyx")
        await self.check_unsigned(requests("/voice/webhook", [], KNOWN_TELNYX, telnyx_json(KNOWN_TELNYX), ["telnyx"]))

    async def test_plivo_unsigned(self):
        """Plivo: no request without a valid V3/V2 signature changes anything or gets a 5xx."""
        await self.start("plivo")
        await self.check_unsigned(requests("/voice/webhook", PLIVO_KEYS, KNOWN_PLIVO, _json_any, ["plivo", "plivo-v2"]))

    async def test_twilio_forged_signatures(self):
        """Twilio: bodies signed with the wrong token, or for another URL, change nothing."""
        await self.start("twilio")
        wrong = RequestValidator("not-the-token")
        examples = draw(requests("/voice/webhook", TWILIO_KEYS, KNOWN_TWILIO, _json_any))
        before = await self.snapshot()
        for req in examples:
            params = dict(parse_pairs(req["body"][1]))
            signature = wrong.compute_signature(self.origin + req["target"], params)
            await self.send(req, [("X-Twilio-Signature", signature)])
            self.assertNothingLogged(req)
        self.assertEqual(await self.snapshot(), before)


def parse_pairs(body: bytes) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return []


class SignedGarbageTests(FuzzBase):
    """Validly signed (official SDKs / Ed25519) requests whose content is garbage."""

    def signed_requests(self, body_strategy):
        target = st.one_of(st.just("/voice/webhook"), st.sampled_from(["/voice/webhook?flow=answer", "/voice/webhook?callId=nope",
                                                                       "/voice/webhook?z=1&a=2&a=1", "/voice/webhook/"]))
        return st.fixed_dictionaries({
            "method": st.just("POST"), "target": target, "headers": st.just([]), "body": body_strategy, "skew": st.just(0),
        })

    async def test_twilio_signed_garbage(self):
        """Twilio: signed garbage forms never 5xx and only move the known call forwards."""
        await self.start("twilio")
        validator = RequestValidator(TWILIO_TOKEN)
        form = st.one_of(form_dict(TWILIO_KEYS, KNOWN_TWILIO), plausible_form(
            {"CallSid": st.just(KNOWN_TWILIO), "CallStatus": st.sampled_from(STATUSES), "Direction": st.just("outbound-api")},
            {"SpeechResult": _weird, "Digits": _weird, "Confidence": _weird, "AccountSid": st.just(TWILIO_SID), "turnToken": _weird},
        ))
        body = form.map(lambda d: ("application/x-www-form-urlencoded", urlencode(d).encode(), d))
        prepared = []
        for req in draw(self.signed_requests(body)):
            signature = validator.compute_signature(self.origin + req["target"], req["body"][2])
            prepared.append(({**req, "body": req["body"][:2]}, [("X-Twilio-Signature", signature)]))
        await self.check_signed_prepared(prepared)

    async def test_plivo_signed_garbage(self):
        """Plivo: V3-signed garbage forms never 5xx and only move the known call forwards."""
        await self.start("plivo")
        form = st.one_of(form_dict(PLIVO_KEYS, KNOWN_PLIVO), plausible_form(
            {"CallUUID": st.just(KNOWN_PLIVO), "RequestUUID": st.just(KNOWN_PLIVO), "CallStatus": st.sampled_from(STATUSES)},
            {"Event": _weird, "Speech": _weird, "Digits": _weird, "Direction": st.just("outbound"), "HangupCause": _weird},
        ))
        body = form.map(lambda d: ("application/x-www-form-urlencoded", urlencode(d).encode(), d))
        flows = st.sampled_from(["answer", "hangup", "getinput", "spoken", "xml-speak", "xml-listen", "ring", "x"])
        target = st.tuples(flows, st.sampled_from([self.known, "unknown-call", ""])).map(
            lambda f: "/voice/webhook?" + urlencode({"provider": "plivo", "flow": f[0], "callId": f[1]}))
        examples = draw(with_path(self.signed_requests(body), target))
        prepared = []
        for n, req in enumerate(examples):
            nonce = f"nonce-{n}-{os.urandom(4).hex()}"
            base_url = construct_post_url(self.origin + req["target"], dict(req["body"][2])).decode()
            signature = get_signature_v3(PLIVO_TOKEN, base_url, nonce).decode()
            prepared.append(({**req, "body": req["body"][:2]}, [("X-Plivo-Signature-V3", signature), ("X-Plivo-Signature-V3-Nonce", nonce)]))
        await self.check_signed_prepared(prepared)

    async def test_telnyx_signed_garbage(self):
        """Telnyx: Ed25519-signed garbage never 5xxs and only moves the known call forwards."""
        await self.start("telnyx")
        state = base64.b64encode(self.known.encode()).decode()
        plausible = st.fixed_dictionaries({
            "event_type": st.sampled_from(TELNYX_EVENTS), "id": st.uuids().map(str),
            "payload": plausible_form({"call_control_id": st.just(KNOWN_TELNYX), "client_state": st.just(state)},
                                      {"hangup_cause": _weird, "transcription_data": _json_any, "digit": _weird}),
        }).map(lambda data: {"data": data})
        body = st.one_of(
            plausible.map(lambda v: json.dumps(v).encode()),
            telnyx_json(KNOWN_TELNYX).map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=256),
        ).map(lambda b: ("application/json", b))
        prepared = []
        for req in draw(self.signed_requests(body)):
            ts = str(int(time.time()))
            signature = base64.b64encode(TELNYX_KEY.sign(ts.encode() + b"|" + req["body"][1])).decode()
            prepared.append((req, [("telnyx-signature-ed25519", signature), ("telnyx-timestamp", ts)]))
        await self.check_signed_prepared(prepared)
        # Telnyx's hang-up report ends the call and whatever speak still waits for its end.
        hangup = json.dumps({"data": {"event_type": "call.hangup", "id": "bye", "payload": {
            "call_control_id": KNOWN_TELNYX, "client_state": state, "hangup_cause": "normal_clearing"}}}).encode()
        ts = str(int(time.time()))
        signature = base64.b64encode(TELNYX_KEY.sign(ts.encode() + b"|" + hangup)).decode()
        await self.send({"method": "POST", "target": "/voice/webhook", "headers": [], "body": ("application/json", hangup), "skew": 0},
                        [("telnyx-signature-ed25519", signature), ("telnyx-timestamp", ts)])

    async def test_mock_garbage(self):
        """Mock (unsigned by design): garbage never 5xxs and only moves the known call forwards."""
        await self.start("mock")
        strategy = requests("/voice/webhook", [], self.known, mock_json(self.known))
        await self.check_signed_prepared([(req, []) for req in draw(strategy)])

    async def check_signed_prepared(self, prepared):
        extras = {id(req): extra for req, extra in prepared}
        await self.check_signed([req for req, _ in prepared], lambda req: extras[id(req)])


# --- RPC lines --------------------------------------------------------------------------------

RPC_CODES = {rpcmod.PARSE_ERROR, rpcmod.INVALID_REQUEST, rpcmod.METHOD_NOT_FOUND, rpcmod.INVALID_PARAMS, rpcmod.CALL_ERROR}
#: The params each method reads; a wrong type in any of them must be refused before anything happens.
RPC_PARAMS = {
    "voicecall.initiate": ["to", "message", "mode", "sessionKey"],
    "voicecall.start": ["to", "message", "mode", "sessionKey"],
    "voicecall.continue": ["callId", "message"],
    "voicecall.speak": ["callId", "message"],
    "voicecall.end": ["callId"],
    "voicecall.status": ["callId", "sid"],
    "voicecall.health": [],
}
_non_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(_json_leaf, max_size=3),
                        st.dictionaries(st.text(max_size=5), _json_leaf, max_size=3))


def wrong_params() -> st.SearchStrategy:
    """(method, params) where params is not an object, or one param the method reads has a non-string value."""

    def for_method(method):
        names = RPC_PARAMS[method]
        good = st.dictionaries(st.sampled_from(names + ["extra"]), st.one_of(st.text(max_size=20), st.none()), max_size=4)
        if not names:
            return st.tuples(st.just(method), st.one_of(st.lists(_json_leaf, max_size=3), st.integers(), st.text(max_size=5)))
        bad = st.tuples(good, st.sampled_from(names), _non_string).map(lambda t: {**t[0], t[1]: t[2]})
        return st.tuples(st.just(method), st.one_of(bad, st.lists(_json_leaf, max_size=3), st.integers(), st.text(max_size=5)))

    return st.sampled_from(sorted(RPC_PARAMS)).flatmap(for_method)


def garbage_lines() -> st.SearchStrategy:
    """Lines that are not valid requests: bytes, broken JSON, JSON that is not a request."""
    request_like = st.fixed_dictionaries({}, optional={
        "jsonrpc": st.one_of(st.just("2.0"), _json_leaf), "method": st.one_of(st.sampled_from(sorted(RPC_PARAMS) + ["nope", ""]), _json_leaf),
        "id": st.one_of(st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2), st.just({})),
        "params": _json_any,
    })
    return st.one_of(
        st.binary(min_size=1, max_size=300),
        st.text(min_size=1, max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        _json_any.map(lambda v: json.dumps(v).encode()),
        request_like.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"{", b'{"jsonrpc":"2.0"', b"[" * 5000 + b"]" * 5000, b"\xff\xfe", b'{"a":1}{"b":2}', b"null", b"1e99999"]),
    ).map(lambda line: line.replace(b"\n", b" "))


class RpcFuzzTests(FuzzBase):
    """Garbage and wrongly typed requests on the control socket."""

    async def test_garbage_lines(self):
        """Each garbage line gets nothing or a JSON-RPC error object; the connection keeps answering."""
        await self.start("mock")
        path = self.service._rpc.port.getHost().name
        conn = await raw_rpc(self, path)
        other = await raw_rpc(self, path)
        before = await self.snapshot()
        for n, line in enumerate(draw(garbage_lines())):
            conn.send(line)
            conn.request(f"probe-{n}", "voicecall.health")
            await conn.answer_to(f"probe-{n}")
            for message in conn.received:
                error = message.get("error")
                self.assertIsInstance(error, dict, f"{line[:200]!r} -> {message!r}")
                self.assertIn(error.get("code"), RPC_CODES, f"{line[:200]!r} -> {message!r}")
            conn.received.clear()
            self.assertNothingLogged(line[:200])
        self.assertEqual(await self.snapshot(), before)
        other.request("other", "voicecall.health")
        self.assertTrue((await other.answer_to("other"))["result"]["ok"])

    async def test_overlong_lines(self):
        """A line over 1 MiB is refused with -32600 and the next request is answered."""
        await self.start("mock")
        conn = await raw_rpc(self, self.service._rpc.port.getHost().name)
        conn.send(b'{"jsonrpc":"2.0","id":1,"method":"voicecall.status","params":{"x":"' + b"a" * (rpcmod.MAX_LINE_BYTES + 10) + b'"}}')
        error = await conn.answer(lambda m: "error" in m)
        self.assertEqual(error["error"]["code"], rpcmod.INVALID_REQUEST)
        conn.request(2, "voicecall.health")
        self.assertTrue((await conn.answer_to(2))["result"]["ok"])
        self.assertNothingLogged("overlong line")

    async def test_wrong_param_types(self):
        """Every method refuses wrongly typed params with an error object and changes nothing."""
        await self.start("mock")
        conn = await raw_rpc(self, self.service._rpc.port.getHost().name)
        before = await self.snapshot()
        for n, (method, params) in enumerate(draw(wrong_params())):
            conn.request(n, method, params)
            answer = await conn.answer_to(n)
            what = f"{method} {params!r} -> {answer!r}"
            if method in ("voicecall.status", "voicecall.health") and "result" in answer:
                continue  # reads only; a valid callId may win over a wrong sid
            self.assertIn("error", answer, what)
            self.assertIn(answer["error"]["code"], {rpcmod.INVALID_PARAMS, rpcmod.CALL_ERROR}, what)
            self.assertNothingLogged(what)
        self.assertEqual(await self.snapshot(), before)


# --- media-stream frames ----------------------------------------------------------------------


def frames() -> st.SearchStrategy:
    """(payload, binary) frames: garbage, broken JSON, wrong events, huge payloads, odd sequence numbers."""
    event = st.one_of(st.sampled_from(["media", "mark", "stop", "dtmf", "connected", "start", "clear", "START", ""]), _json_leaf)
    message = st.fixed_dictionaries({"event": event}, optional={
        "sequenceNumber": st.one_of(st.integers(-5, 10**12).map(str), _json_leaf),
        "streamSid": st.one_of(st.just("MZ" + "9" * 32), _json_leaf),
        "media": st.one_of(st.fixed_dictionaries({"payload": st.one_of(st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode()), _json_leaf)},
                                                 optional={"chunk": _json_leaf, "timestamp": _json_leaf, "track": _json_leaf}), _json_any),
        "mark": _json_any, "dtmf": _json_any, "start": _json_any,
    })
    return st.one_of(
        message.map(lambda m: (json.dumps(m).encode(), False)),
        st.binary(max_size=300).map(lambda b: (b, True)),
        st.binary(min_size=1, max_size=300).map(lambda b: (b, False)),
        _json_any.map(lambda v: (json.dumps(v).encode(), False)),
        st.sampled_from([
            (b'{"event":"media","media":{"payload":"' + base64.b64encode(b"\xff" * 48_000) + b'"}}', False),
            (b'{"event":"media","media":{"payload":"!!!not base64"}}', False),
            (b"[" * 3000 + b"]" * 3000, False),
            (b'{"event":"stop"', False),
            (b"\xc3\x28", False),
        ]),
    )


def bad_starts(call_sid: str, token: str) -> st.SearchStrategy:
    """`start` messages that must not admit the socket: unknown calls, wrong or missing tokens, junk ids."""
    sid = st.one_of(st.just(call_sid), st.just("CA" + "3" * 32), _json_leaf, st.text(max_size=40))
    wrong_token = st.one_of(st.none(), st.just(""), st.just(token[:-1]), st.just(token + "x"), st.just(token.upper()), _json_leaf)
    start = st.fixed_dictionaries({"callSid": sid, "customParameters": st.one_of(
        st.fixed_dictionaries({"token": wrong_token}), _json_any)}, optional={"streamSid": _json_leaf, "accountSid": _json_leaf})
    return st.fixed_dictionaries({"event": st.just("start"), "start": st.one_of(start, _json_any)},
                                 optional={"streamSid": st.one_of(st.just("MZ" + "8" * 32), _json_leaf), "sequenceNumber": _json_leaf})


class MediaFuzzTests(FuzzBase):
    """Arbitrary frames on the Twilio media stream, before and after `start`."""

    async def start_streaming(self):
        http = http_client(self)
        self.fake = FakeTwilio(reactor, TWILIO_SID, TWILIO_TOKEN, http=http, scenario=Scenario(utterances=[]))
        twilio_base = await serve(self, self.fake.resource())
        _, speech_base, stt = await speech_fakes(self)
        port = free_port()
        self.service, self.rpc = await start_daemon(self, {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": TWILIO_SID, "authToken": TWILIO_TOKEN, "baseUrl": twilio_base},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "streaming": {"enabled": True, "openaiApiKey": "sk-stt", "sttBaseUrl": stt.url, "preStartTimeoutMs": 10000},
            "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
        })
        self.addCleanup(self.hang_up)
        self.call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hi", "mode": "conversation"}))["callId"]
        self.fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        self.stream = await self.fake_call.next_stream()
        self.logged.clear()

    async def hang_up(self):
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def client(self, **kw) -> TwilioMediaClient:
        client = TwilioMediaClient(reactor, self.stream.url, call_sid=self.fake_call.sid, stream_media=False,
                                   headers={"X-Twilio-Signature": sign_request(TWILIO_TOKEN, self.stream.url)}, **kw)
        await client.connect()

        async def close():
            if not client.closed.called:
                client.abort()
            await client.closed

        self.addCleanup(close)
        return client

    async def closed(self, client, payload: bytes) -> tuple[int, str]:
        """The code and reason the daemon closed `client` with, once it has (after `payload`)."""
        await eventually(lambda: client.closed.called, 10, f"the daemon to close the stream after {payload[:80]!r}")
        return await client.closed

    async def call_state(self):
        return (await self.rpc.call("voicecall.status", {"callId": self.call_id}))["call"]

    async def test_invalid_start_never_admits(self):
        """A `start` for an unknown call, or with a wrong token, closes the socket 1008 and admits nothing."""
        await self.start_streaming()
        token = self.stream.parameters["token"]
        before = await self.call_state()
        for start in draw(bad_starts(self.fake_call.sid, token), max(10, EXAMPLES // 2)):
            client = await self.client(auto_start=False)
            client.send_raw(json.dumps(start).encode())
            code, _reason = await client.closed
            self.assertEqual(code, 1008, f"{start!r} was not refused")
            self.assertEqual(dict(self.service._media.sessions), {}, f"{start!r} was admitted")
            self.assertNothingLogged(start)
        after = await self.call_state()
        self.assertEqual((after["state"], after["transcript"]), (before["state"], before["transcript"]))

    async def test_frames_before_start(self):
        """
        Garbage before `start` admits nothing, changes nothing and crashes nothing: text that is
        not UTF-8 closes the socket 1007, any `start` (none can carry the call's token) 1008,
        and every other frame leaves it open and pending.
        """
        await self.start_streaming()
        before = await self.call_state()
        client = await self.client(auto_start=False)
        for payload, binary in draw(frames()) + [(b'{"event": "start", "start": {}}', False)]:
            expected = expected_close(payload, binary, started=False)
            client.send_raw(payload, binary)
            if expected is not None:
                code, reason = await self.closed(client, payload)
                self.assertEqual(code, expected[0], f"{payload[:200]!r}: {reason}")
                self.assertIn(reason, expected[1], f"{payload[:200]!r}")
                self.assertEqual(dict(self.service._media.sessions), {}, f"{payload[:200]!r} was admitted")
                client = await self.client(auto_start=False)
        # The last socket was closed by the `start` added last, after every frame before it.
        self.assertEqual(dict(self.service._media.sessions), {})
        self.assertNothingLogged("frames before start")
        after = await self.call_state()
        self.assertEqual((after["state"], after["transcript"]), (before["state"], before["transcript"]))

    async def test_frames_after_valid_start(self):
        """
        After a valid `start`, garbage frames never crash the stream or the daemon: every frame
        but a `stop` or text that is not UTF-8 (which close it, 1000 or 1007: see the test before)
        leaves it open, as the `stop` sent last shows by closing it 1000; the call goes on (a
        dropped stream has a grace period to come back in).
        """
        await self.start_streaming()
        client = await self.client(token=self.stream.parameters["token"])
        await eventually(lambda: self.service._media.sessions, 5, "the stream to be admitted")
        state_at_start = (await self.call_state())["state"]
        stop = (json.dumps({"event": "stop", "streamSid": client.stream_sid}).encode(), False)
        garbage = [frame for frame in draw(frames()) if expected_close(*frame, started=True) is None]
        self.assertGreater(len(garbage), EXAMPLES // 2)
        for payload, binary in garbage + [stop]:
            client.send_raw(payload, binary)
        # The close answers the `stop`, after every frame sent before it.
        self.assertEqual(await self.closed(client, stop[0]), (1000, "Stream stopped"))
        self.assertEqual(dict(self.service._media.sessions), {})
        self.assertNothingLogged("frames after start")
        state = (await self.call_state())["state"]
        self.assertIn(state, LIVE)
        self.assertTrue(allowed_transition(state_at_start, state), f"{state_at_start} -> {state}")
        self.assertTrue((await self.rpc.call("voicecall.health", {}))["ok"])


#: States of a call that is up, as it is while its stream is away for its grace period.
LIVE = ["answered", "active", "speaking", "listening"]


#: The close reasons of a refused `start` (none can carry the call's one-time token).
START_REFUSED = {"Missing callSid", "Missing streamSid", "Unknown call", "Duplicate streamSid"}


def expected_close(payload: bytes, binary: bool, started: bool) -> tuple[int, set[str]] | None:
    """The code and possible reasons the daemon closes a stream with on this frame; None when it keeps it open."""
    if binary:
        return None
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return 1007, {"Invalid UTF-8 in a text frame"}
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    event = message.get("event") if isinstance(message, dict) else None
    if event == "stop" and started:
        return 1000, {"Stream stopped"}
    if event == "start" and not started:
        return 1008, START_REFUSED
    return None
