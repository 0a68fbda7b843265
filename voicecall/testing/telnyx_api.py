# -*- test-case-name: tests.test_fake_telnyx -*-
"""
The fake Telnyx Call Control v2 REST API (PROVIDERS.md §2.1): a twisted.web resource tree serving

- `POST /v2/calls`: dial;
- `POST /v2/calls/{call_control_id}/actions/{answer,hangup,speak,transcription_start,transcription_stop}`;
- `POST /v2/calls/{call_control_id}/actions/{send_dtmf,transfer,record_start,record_stop}` (issue 17:
  keys played into the call, a transfer that dials its target as a new leg bridged on answer,
  recordings saved after they stop);
- `PUT  /v2/calls/{call_control_id}/actions/client_state_update` (the official SDK's
  `calls.actions.update_client_state`: a PUT whose body is `{"client_state"}`, required);
- `GET  /v2/calls/{call_control_id}`: the call's status;
- `GET  /v2/recordings/{recording_id}`: a saved recording, with freshly presigned `download_urls`;
- `GET  /media/{recording_id}.{mp3,wav}?X-Amz-Signature=...`: the audio, only with its presigned
  token and within 10 minutes of presigning (no Bearer token: like Telnyx's storage links),

with Bearer-token auth, Telnyx's validation and error bodies
(`{"errors": [{"code", "title", "detail", "source"?}]}`; the codes are Telnyx's published
generic ones, and 90018 "Call has already ended" for commands on a dead call), and `command_id`
de-duplication. Every request is recorded; tests can make the next requests fail, hang or
answer late. Each call is driven by a `FakeCall` (see telnyx_driver).

It imports nothing of the daemon.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from typing import Any, Callable, Mapping

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from voicecall.testing.fakerest import ApiResource, FaultyApi, raw_headers, read_body, respond
from voicecall.testing.fakerest import Reply as _Reply
from voicecall.testing.fakerest import is_http_url as _is_http_url
from voicecall.testing.telnyx_driver import AMD_MODES, Carrier, FakeCall, Scenario, Signer, new_call_control_id

API_VERSION = "v2"
MAX_REQUEST_BYTES = 64 * 1024
MAX_SPEAK_CHARS = 3000
ACTIONS = ("answer", "hangup", "speak", "transcription_start", "transcription_stop", "client_state_update",
           "send_dtmf", "transfer", "record_start", "record_stop")
#: Actions that need an answered call.
_MEDIA_ACTIONS = ("speak", "transcription_start", "transcription_stop", "send_dtmf", "transfer", "record_start", "record_stop")
#: `send_dtmf` digits (the SDK's: 0-9, A-D, *, #, and pauses w = 0.5 s, W = 1 s).
_DTMF = re.compile(r"^[0-9A-D*#wW]{1,64}$")
_SIP_URI = re.compile(r"^sips?:[^\s@]+@[^\s@]+$")
#: What a recording's audio is served as (a short MPEG frame header, then silence).
FAKE_AUDIO = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(413)
#: The HTTP method of each action (the official SDK's): all POST but `client_state_update`.
ACTION_METHODS = {action: "POST" for action in ACTIONS} | {"client_state_update": "PUT"}
TRANSCRIPTION_ENGINES = frozenset(
    {"Google", "Telnyx", "Deepgram", "Azure", "xAI", "AssemblyAI", "Speechmatics", "Soniox",
     "Parakeet", "Humain", "Reson8", "Cohere", "A", "B"}
)
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?(-[A-Z]{3})?$")

NOT_FOUND = ("10005", "Resource not found", "The requested resource or URL could not be found.")
AUTH_FAILED = ("10009", "Authentication failed", "The required authentication headers were either invalid or not included in the request.")
CALL_ENDED = ("90018", "Call has already ended", "This call is no longer active and can't receive commands.")


def error_body(code: str, title: str, detail: str, pointer: str | None = None) -> dict[str, Any]:
    """Telnyx's error JSON."""
    error: dict[str, Any] = {"code": code, "title": title, "detail": detail}
    if pointer is not None:
        error["source"] = {"pointer": pointer}
    return {"errors": [error]}


@frozen
class RecordedRequest:
    """One request the fake API received. `token` is the Bearer token sent, if any."""

    method: str
    path: str
    raw: bytes
    token: str | None
    headers: tuple[tuple[str, str], ...] = ()
    too_large: bool = False

    @property
    def json(self) -> Any:
        """The body as JSON (None if it is not JSON)."""
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _Invalid(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str, pointer: str | None = None):
        super().__init__(detail)
        self.reply = _Reply(status, error_body(code, title, detail, pointer))


def _missing(name: str) -> _Invalid:
    return _Invalid(422, "10004", "Missing required parameter", f"The '{name}' parameter is required.", "/" + name)


def _bad(name: str, detail: str) -> _Invalid:
    return _Invalid(422, "10015", "Bad Request", detail, "/" + name)


@define
class FakeTelnyx(FaultyApi):
    """
    A fake Telnyx account. `resource()` is the twisted.web tree to serve (its root is the
    `telnyx.baseUrl`). With `http` (a treq HTTPClient or StubTreq) calls are driven and their
    webhooks posted, signed by `signer` (whose `public_key` goes into `telnyx.publicKey`);
    without it webhooks are only recorded. `connection_id`, when set, is the only Call Control
    Application a dial may name; `webhook_url` is that application's webhook URL (used when a
    dial names none). `scenario` (or a callable from the FakeCall to one) says what the far end
    does; `set_scenario` overrides it per phone number.
    """

    _reactor: Any  # IReactorTime
    api_key: str = field(repr=False)
    _http: Any = None
    connection_id: str | None = None
    webhook_url: str | None = None
    signer: Signer = field(factory=Signer.generate)
    scenario: Scenario | Callable[[FakeCall], Scenario] = Scenario()
    #: Where this fake is served (taken from the requests it gets), for presigned media URLs.
    _origin: str = field(default="http://127.0.0.1", init=False)
    _log = Logger()

    api_root = API_VERSION.encode("ascii")

    def __attrs_post_init__(self) -> None:
        self._carrier = Carrier(
            self._reactor, self._http, self.signer, webhook_timeout=self.webhook_timeout, chaos=self.chaos
        )

    # -- public API -----------------------------------------------------------------------

    def resource(self) -> Any:
        """The API under `/v2`, and the recordings' presigned media under `/media`."""
        root = FaultyApi.resource(self)
        root.putChild(b"media", ApiResource(self._media))
        return root

    def recording(self, recording_id: str) -> tuple[FakeCall, Any] | None:
        """The call and recording named `recording_id`, if any."""
        for call in self.calls.values():
            for rec in call.recordings:
                if rec.id == recording_id:
                    return call, rec
        return None

    @property
    def public_key(self) -> str:
        """The webhook public key, base64 of the raw 32-byte Ed25519 key (`telnyx.publicKey`)."""
        return self.signer.public_key

    def place_inbound_call(
        self, from_: str, to: str, webhook_url: str | None = None, *, scenario: Scenario | None = None
    ) -> FakeCall:
        """
        A call from `from_` arrives at our number `to`: Telnyx posts `call.initiated` (direction
        `incoming`, state `parked`) to `webhook_url` (default: the application's) and holds the
        call until it is answered.
        """
        call = self._new_call("incoming", from_, to, scenario or self._scenarios.get(from_), webhook_url or self.webhook_url)
        self._reactor.callLater(0, call.start_inbound)
        return call

    def signed_headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """Signature headers for a hand-made webhook `body` (default timestamp: now)."""
        ts = int(self._reactor.seconds()) if timestamp is None else timestamp
        return self.signer.headers(body, ts)

    def close(self) -> Deferred:
        """Stop every call's clockwork and drop held requests; fires once webhooks settled."""
        for call in self.calls.values():
            call.shutdown()
        self.abort_held()
        return self.settle()

    # -- request handling -----------------------------------------------------------------

    def _failure_body(self, status: int) -> Mapping[str, Any]:
        return error_body("10007", "Unexpected error", "Fake failure")

    def _call_ended(self, call: FakeCall) -> bool:
        return not call.is_alive

    def _reply(self, request: Any, record: RecordedRequest) -> _Reply:
        try:
            return self._route(request, record)
        except _Invalid as e:
            return e.reply

    def _record(self, request: Any) -> RecordedRequest:
        raw = read_body(request, MAX_REQUEST_BYTES)
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        headers = raw_headers(request)
        too_large = len(raw) > MAX_REQUEST_BYTES
        record = RecordedRequest(
            request.method.decode("ascii", "replace"),
            request.path.decode("utf-8", "replace"),
            b"" if too_large else raw,
            token.strip() if scheme.lower() == "bearer" else None,
            headers,
            too_large,
        )
        self.requests.append(record)
        return record

    def _route(self, request: Any, record: RecordedRequest) -> _Reply:
        self._origin = _origin(request)
        if not self._authenticated(record):
            return _Reply(401, error_body(*AUTH_FAILED))
        if record.too_large:
            raise _Invalid(413, "10015", "Bad Request", "The request body is too large.")
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if len(parts) == 2 and parts[0] == "recordings":
            if record.method != "GET":
                return _method_not_allowed(record.method)
            found = self.recording(parts[1])
            if found is None or not found[1].saved:
                return _Reply(404, error_body(*NOT_FOUND))
            return _Reply(200, {"data": found[0].recording_json(found[1])})
        if not parts or parts[0] != "calls":
            return _Reply(404, error_body(*NOT_FOUND))
        if len(parts) == 1:
            if record.method != "POST":
                return _method_not_allowed(record.method)
            return self._dial(_body(record))
        call = self.calls.get(parts[1])
        if call is None or len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "actions"):
            return _Reply(404, error_body(*NOT_FOUND))
        if len(parts) == 2:
            if record.method != "GET":
                return _method_not_allowed(record.method)
            return _Reply(200, {"data": call.to_json()})
        if parts[3] not in ACTIONS:
            return _Reply(404, error_body(*NOT_FOUND))
        if record.method != ACTION_METHODS[parts[3]]:
            return _method_not_allowed(record.method)
        return self._command(call, parts[3], _body(record))

    def _authenticated(self, record: RecordedRequest) -> bool:
        token = (record.token or "").encode("utf-8")
        return bool(token) and hmac.compare_digest(token, self.api_key.encode("utf-8"))

    def _dial(self, body: dict[str, Any]) -> _Reply:
        connection_id = _required_str(body, "connection_id")
        to, from_ = _required_str(body, "to"), _required_str(body, "from")
        if self.connection_id is not None and connection_id != self.connection_id:
            raise _Invalid(422, "10017", "Associated resource does not exist",
                           "The requested parameter is invalid as the associated resource does not exist.",
                           "/connection_id")
        if not (_E164.match(to) or to.startswith("sip:")):
            raise _Invalid(422, "10016", "Phone number must be in +E.164 format",
                           "The specified phone number parameter must be in +E.164 format.", "/to")
        if not _E164.match(from_):
            raise _Invalid(422, "10016", "Phone number must be in +E.164 format",
                           "The specified phone number parameter must be in +E.164 format.", "/from")
        webhook_url = body.get("webhook_url")
        if webhook_url is not None and not _is_http_url(webhook_url):
            raise _Invalid(422, "10003", "Invalid URL", "The URL provided was invalid, malformed, or too long.", "/webhook_url")
        if body.get("webhook_url_method", "POST") not in ("POST", "GET"):
            raise _bad("webhook_url_method", "webhook_url_method must be POST or GET.")
        client_state = _client_state(body)
        timeout = body.get("timeout_secs", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 5 <= timeout <= 600:
            raise _bad("timeout_secs", "timeout_secs must be an integer between 5 and 600.")
        if "command_id" in body and not isinstance(body["command_id"], str):
            raise _bad("command_id", "command_id must be a string.")
        amd = body.get("answering_machine_detection")
        if amd is not None and amd not in AMD_MODES:
            raise _bad("answering_machine_detection", "answering_machine_detection is not a supported value.")
        amd_config = body.get("answering_machine_detection_config")
        if amd_config is not None and not (isinstance(amd_config, dict) and all(
                isinstance(v, (int, str, bool, float)) for v in amd_config.values())):
            raise _bad("answering_machine_detection_config", "answering_machine_detection_config must be an object.")
        if not self._make_room():
            return _Reply(429, error_body("10011", "Too many requests", "You have exceeded the maximum number of allowed requests."))
        call = self._new_call("outgoing", from_, to, self._scenarios.get(to), webhook_url or self.webhook_url,
                              connection_id=connection_id, client_state=client_state, timeout_secs=timeout, amd=amd,
                              media_origin=self._origin)
        self._reactor.callLater(0, call.start_outbound)
        data = {**call.to_json(), "is_alive": False}  # dialling is asynchronous
        return _Reply(200, {"data": data})

    def _command(self, call: FakeCall, action: str, body: dict[str, Any]) -> _Reply:
        if not call.is_alive:
            raise _Invalid(422, *CALL_ENDED)
        command_id = body.get("command_id")
        if command_id is not None and not isinstance(command_id, str):
            raise _bad("command_id", "command_id must be a string.")
        client_state = _client_state(body)
        if action == "client_state_update" and client_state is None:
            raise _missing("client_state")
        if action == "speak":
            args = _speak_args(body)
        elif action == "transcription_start":
            _check_transcription(body)
        elif action == "send_dtmf":
            args = _dtmf_args(body)
        elif action == "transfer":
            args = _transfer_args(body)
        elif action == "record_start":
            args = _record_args(body)
        if action == "answer" and call.state != "parked":
            raise _bad("call_control_id", "Only an incoming call that is parked can be answered.")
        if action in _MEDIA_ACTIONS and not call.is_answered:
            raise _bad("call_control_id", "The call must be answered first.")
        call.commands.append((action, dict(body)))
        ok = _Reply(200, {"data": {"result": "ok"}})
        if command_id is not None and call.seen_command(command_id):
            return ok
        if client_state is not None:
            # Each command carrying client_state replaces it; every later webhook carries it.
            call.client_state = client_state
        if action == "answer":
            call.answer()
        elif action == "hangup":
            call.hangup()
        elif action == "speak":
            call.speak(*args)
        elif action == "transcription_start":
            call.transcription_start(body)
        elif action == "transcription_stop":
            call.transcription_stop()
        elif action == "send_dtmf":
            call.send_dtmf(*args)
        elif action == "transfer":
            to, from_ = args
            target = self._new_call("outgoing", from_ or call.to, to, self._scenarios.get(to), call.webhook_url,
                                    connection_id=call.connection_id, media_origin=call.media_origin)
            call.bridge(target)
            self._reactor.callLater(0, target.start_outbound)
        elif action == "record_start":
            call.record_start(*args)
        elif action == "record_stop":
            call.record_stop()
        return ok

    def _media(self, request: Any) -> bytes:
        """A recording's audio, for its presigned token only, until the token expires (403 otherwise)."""
        self._origin = _origin(request)
        name = (request.postpath[0] if request.postpath else b"").decode("utf-8", "replace")
        rid, _, fmt = name.rpartition(".")
        found = self.recording(rid)
        token = (request.args.get(b"X-Amz-Signature") or [b""])[0]
        if found is None or not found[1].saved or fmt != found[1].format:
            return respond(request, 404, b"<Error><Code>NoSuchKey</Code></Error>", content_type=b"application/xml")
        rec = found[1]
        if not hmac.compare_digest(token, rec.token.encode("ascii")) or self._reactor.seconds() > rec.expires_at:
            return respond(request, 403, b"<Error><Code>AccessDenied</Code></Error>", content_type=b"application/xml")
        return respond(request, 200, FAKE_AUDIO, content_type=b"audio/mpeg" if fmt == "mp3" else b"audio/wav")

    def _new_call(self, direction: str, from_: str, to: str, scenario: Scenario | None, webhook_url: str | None, **kwargs: Any) -> FakeCall:
        kwargs.setdefault("connection_id", self.connection_id or "fake-connection")
        call = FakeCall(
            self._carrier,
            new_call_control_id(),
            direction,
            from_,
            to,
            scenario=Scenario(),
            webhook_url=webhook_url,
            created_at=self._reactor.seconds(),
            **kwargs,
        )
        self._adopt(call.call_control_id, call, scenario)
        self._log.info("fake Telnyx {direction} call {id} to {to}", direction=direction, id=call.call_control_id, to=to)
        return call


def _body(record: RecordedRequest) -> dict[str, Any]:
    if not record.raw.strip():
        return {}
    try:
        body = json.loads(record.raw)
    except (ValueError, RecursionError):
        raise _Invalid(400, "10023", "Invalid JSON", "The supplied JSON is invalid.") from None
    if not isinstance(body, dict):
        raise _Invalid(400, "10015", "Bad Request", "The request body must be a JSON object.")
    return body


def _required_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise _missing(name)
    if not isinstance(value, str):
        raise _bad(name, f"The '{name}' parameter must be a string.")
    return value


def _client_state(body: Mapping[str, Any]) -> str | None:
    value = body.get("client_state")
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("client_state", "client_state must be a valid Base-64 encoded string.") from None
    return value


def _speak_args(body: Mapping[str, Any]) -> tuple[str, str, str | None]:
    payload = _required_str(body, "payload")
    if len(payload) > MAX_SPEAK_CHARS:
        raise _bad("payload", f"payload must be at most {MAX_SPEAK_CHARS} characters.")
    voice = _required_str(body, "voice")
    if voice not in ("female", "male") and "." not in voice:
        raise _bad("voice", "voice must be 'female', 'male' or '<Provider>.<Model>.<Voice>'.")
    language = body.get("language")
    if language is not None and not (isinstance(language, str) and _LANGUAGE.match(language)):
        raise _bad("language", "language is not a supported language.")
    if body.get("payload_type", "text") not in ("text", "ssml"):
        raise _bad("payload_type", "payload_type must be 'text' or 'ssml'.")
    return payload, voice, language


def _check_transcription(body: Mapping[str, Any]) -> None:
    engine = body.get("transcription_engine")
    if engine is not None and engine not in TRANSCRIPTION_ENGINES:
        raise _bad("transcription_engine", "transcription_engine is not a supported engine.")
    if body.get("transcription_tracks", "inbound") not in ("inbound", "outbound", "both"):
        raise _bad("transcription_tracks", "transcription_tracks must be 'inbound', 'outbound' or 'both'.")
    config = body.get("transcription_engine_config")
    if config is not None and not isinstance(config, dict):
        raise _bad("transcription_engine_config", "transcription_engine_config must be an object.")
    for language in (body.get("language"), (config or {}).get("language")):
        if language is not None and not isinstance(language, str):
            raise _bad("language", "language must be a string.")


def _dtmf_args(body: Mapping[str, Any]) -> tuple[str, int]:
    digits = _required_str(body, "digits")
    if not _DTMF.match(digits):
        raise _bad("digits", "digits may only contain 0-9, A-D, *, #, w and W.")
    duration = body.get("duration_millis", 250)
    if isinstance(duration, bool) or not isinstance(duration, int) or not 100 <= duration <= 500:
        raise _bad("duration_millis", "duration_millis must be an integer between 100 and 500.")
    return digits, duration


def _transfer_args(body: Mapping[str, Any]) -> tuple[str, str | None]:
    to = _required_str(body, "to")
    if not (_E164.match(to) or _SIP_URI.match(to)):
        raise _Invalid(422, "10016", "Phone number must be in +E.164 format",
                       "The specified phone number parameter must be in +E.164 format.", "/to")
    from_ = body.get("from")
    if from_ is not None and not (isinstance(from_, str) and _E164.match(from_)):
        raise _Invalid(422, "10016", "Phone number must be in +E.164 format",
                       "The specified phone number parameter must be in +E.164 format.", "/from")
    return to, from_


def _record_args(body: Mapping[str, Any]) -> tuple[str, str]:
    fmt, channels = _required_str(body, "format"), _required_str(body, "channels")
    if fmt not in ("mp3", "wav"):
        raise _bad("format", "format must be 'mp3' or 'wav'.")
    if channels not in ("single", "dual"):
        raise _bad("channels", "channels must be 'single' or 'dual'.")
    return fmt, channels


def _origin(request: Any) -> str:
    """The scheme, host and port a request was sent to (where this fake is served)."""
    host = (request.getHeader(b"host") or b"127.0.0.1").decode("latin-1")
    return f"{'https' if request.isSecure() else 'http'}://{host}"


def _method_not_allowed(method: str) -> _Reply:
    return _Reply(405, error_body("10015", "Bad Request", f"Method not allowed: {method}"))


