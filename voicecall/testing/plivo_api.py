# -*- test-case-name: tests.test_fake_plivo -*-
"""
The fake Plivo REST API (PROVIDERS.md §3.1): a twisted.web resource tree serving

- `POST   /v1/Account/{authId}/Call/`: make a call (201 `call fired`, `request_uuid`);
- `POST   /v1/Account/{authId}/Call/{uuid}/`: transfer (`legs=aleg`, `aleg_url`; 202);
- `DELETE /v1/Account/{authId}/Call/{uuid}/`: hang up (204);
- `DELETE /v1/Account/{authId}/Request/{request_uuid}/`: cancel a call not yet answered (204);
- `GET    /v1/Account/{authId}/Call/{uuid}/`: the call's details (`call_status`, ...);
- `POST   /v1/Account/{authId}/Call/{uuid}/DTMF/`: send digits (`digits`, `leg`; 202 `digits sent`);
- `POST   /v1/Account/{authId}/Call/{uuid}/Record/`: record the call (`time_limit`, `file_format`,
  `callback_url`, `callback_method`; 202 with `url`, `recording_id`);
- `GET    /v1/Account/{authId}/Recording/{recording_id}.mp3` (or `.wav`): a recording's audio,

with Plivo's HTTP Basic auth, JSON (or form) bodies, paths that end with `/`, and error JSON
`{"api_id": ..., "error": ...}`. Every request is recorded; tests can make the next requests
fail, hang or answer late. Each created call is driven by a `FakeCall` (plivo_driver) when an
HTTP client for callbacks was given.

It imports nothing of the daemon.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from voicecall.testing.fakerest import FaultyApi, basic_auth, credentials_match, raw_headers, read_body, respond
from voicecall.testing.fakerest import Reply as _Reply
from voicecall.testing.fakerest import is_http_url as _is_http_url
from voicecall.testing.plivo_carrier import Carrier, Scenario
from voicecall.testing.plivo_driver import FakeCall

MAX_REQUEST_BYTES = 64 * 1024
_NUMBER = re.compile(r"^\+?[0-9]{6,15}$")
#: What the DTMF API plays: digits, `*`, `#`, and `w` (a half-second wait, as in `sendDigits`).
_DIGITS = re.compile(r"^[0-9*#wW]{1,64}$")
_MEDIA = re.compile(r"^(?P<id>[0-9a-f]{32})\.(?P<ext>mp3|wav)$")
#: The audio a fake recording serves: a few bytes that start like an MP3 (an ID3 tag).
RECORDING_AUDIO = b"ID3\x03\x00\x00\x00\x00\x00\x00fake plivo recording"


def error_body(message: Any) -> dict[str, Any]:
    """Plivo's REST error JSON."""
    return {"api_id": str(uuid.uuid4()), "error": message}


@frozen
class RecordedRequest:
    """One request the fake API received. `auth` is the Basic (user, password), if any."""

    method: str
    path: str
    body: Mapping[str, Any]
    auth: tuple[str, str] | None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = ""
    too_large: bool = False

    def get(self, name: str, default: Any = None) -> Any:
        return self.body.get(name, default)


@define
class FakePlivo(FaultyApi):
    """
    A fake Plivo account. `resource()` is the twisted.web tree to serve (its root is the
    `plivo.baseUrl`). With `http` (a treq HTTPClient or StubTreq) calls are driven and
    callbacks go out signed with `auth_token` (`signature`: v3, v2, both or none); without it
    calls stay queued. `scenario` (a Scenario, or a callable from the FakeCall to one) says
    what the far end does; `set_scenario` overrides it per phone number.
    """

    _reactor: Any  # IReactorTime
    auth_id: str
    _auth_token: str
    _http: Any = None
    scenario: Scenario | Callable[[FakeCall], Scenario] = Scenario()
    signature: str = "v3"
    max_documents_per_call: int = 1_000
    _by_request: dict = field(factory=dict)  # request_uuid -> FakeCall
    #: recording_id -> RecordingRecord (its call's `recordings` hold it too), oldest first.
    recordings: dict = field(factory=dict)
    _log = Logger()

    api_root = b"v1"

    def __attrs_post_init__(self) -> None:
        self._carrier = Carrier(
            self._reactor,
            self._http,
            self.auth_id,
            self._auth_token,
            signature=self.signature,
            webhook_timeout=self.webhook_timeout,
            max_documents_per_call=self.max_documents_per_call,
            chaos=self.chaos,
        )

    # -- public API -------------------------------------------------------------------------

    def call_by_request(self, request_uuid: str) -> FakeCall | None:
        return self._by_request.get(request_uuid)

    def place_inbound_call(
        self,
        from_: str,
        to: str,
        answer_url: str,
        *,
        method: str = "POST",
        hangup_url: str | None = None,
        scenario: Scenario | None = None,
    ) -> FakeCall:
        """
        A call from `from_` arrives at our number `to`, whose application's answer URL is
        `answer_url`: Plivo posts `Direction=inbound`, `CallStatus=ringing`, `Event=StartApp`
        there and follows the XML (running it answers the call).
        """
        if self._http is None:
            raise RuntimeError("FakePlivo needs an HTTP client to place inbound calls")
        call = self._new_call(
            "inbound", to, from_, scenario or self._scenarios.get(from_),
            answer_url=answer_url, answer_method=method.upper(), hangup_url=hangup_url,
        )
        call.start_inbound()
        return call

    def hang_up_all(self) -> Deferred:
        """End every live call (the callee hangs up) and fire once no callback is in flight."""
        for call in list(self.calls.values()):
            call.hangup_by_callee()
        return self.settle()

    # -- request handling -------------------------------------------------------------------

    content_type = b"application/json"

    def _failure_body(self, status: int) -> Mapping[str, Any]:
        return error_body("fake failure")

    def _call_ended(self, call: FakeCall) -> bool:
        return call.is_ended

    def _forget(self, call: FakeCall) -> None:
        self._by_request.pop(call.request_uuid, None)

    def _reply(self, request: Any, record: RecordedRequest) -> _Reply:
        if record.too_large:
            return _Reply(413, error_body("request body too large"))
        return self._route(request, record)

    def _record(self, request: Any) -> RecordedRequest:
        raw = read_body(request, MAX_REQUEST_BYTES)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        too_large = len(raw) > MAX_REQUEST_BYTES
        body: dict[str, Any] = {}
        if not too_large and raw:
            if ctype == "application/json":
                try:
                    parsed = json.loads(raw)
                    body = parsed if isinstance(parsed, dict) else {"_": parsed}
                except ValueError:
                    body = {"_invalid_json": True}
            elif ctype == "application/x-www-form-urlencoded":
                body = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        record = RecordedRequest(
            request.method.decode("ascii", "replace"),
            request.path.decode("utf-8", "replace"),
            body,
            basic_auth(request),
            raw_headers(request),
            ctype,
            too_large,
        )
        self.requests.append(record)
        return record

    def _route(self, request: Any, record: RecordedRequest) -> _Reply:
        not_found = _Reply(404, error_body("not found"))
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        # /v1/Account/{id}/Call/ -> ["Account", id, "Call", ""]
        if len(parts) == 4 and parts[0] == "Account" and parts[2] == "Recording":
            parts = [*parts, ""]  # a recording's media URL ends with its extension, not `/`
        if len(parts) < 4 or parts[0] != "Account" or parts[-1] != "":
            return not_found
        if not (credentials_match(record.auth, self.auth_id, self._auth_token) and parts[1] == self.auth_id):
            return _Reply(401, error_body("Authentication failed"))
        if record.body.get("_invalid_json"):
            return _Reply(400, error_body("invalid JSON in request body"))
        rest = parts[2:-1]
        if rest == ["Call"]:
            if record.method == "POST":
                return self._create(record)
            return _method_not_allowed()
        if len(rest) == 2 and rest[0] == "Call":
            call = self.calls.get(rest[1])
            if call is None:
                return not_found
            if record.method == "GET":
                return _Reply(200, {"api_id": str(uuid.uuid4()), **call.to_json(self.auth_id)})
            if record.method == "POST":
                return self._transfer(call, record)
            if record.method == "DELETE":
                if call.is_ended:
                    return not_found
                call.hangup()
                return _Reply(204, None)
            return _method_not_allowed()
        if len(rest) == 3 and rest[0] == "Call" and rest[2] in ("DTMF", "Record"):
            call = self.calls.get(rest[1])
            if call is None:
                return not_found
            if record.method != "POST":
                return _method_not_allowed()
            if call.is_ended or not call.is_answered:
                return _Reply(404, error_body("call not in progress"))
            return self._digits(call, record) if rest[2] == "DTMF" else self._record_call(request, call, record)
        if len(rest) == 2 and rest[0] == "Recording":
            m = _MEDIA.match(rest[1])
            if m is None or m.group("id") not in self.recordings or record.method != "GET":
                return not_found
            return _Reply(200, None, ((b"x-fake-media", m.group("ext").encode()),))
        if len(rest) == 2 and rest[0] == "Request":
            if record.method != "DELETE":
                return _method_not_allowed()
            call = self._by_request.get(rest[1])
            if call is None or call.is_ended or call.is_answered:
                return not_found
            call.cancel()
            return _Reply(204, None)
        return not_found

    def _create(self, record: RecordedRequest) -> _Reply:
        body = record.body
        for name in ("from", "to", "answer_url"):
            if not str(body.get(name) or "").strip():
                return _bad(f"{name} parameter is required")
        from_, to = str(body["from"]), str(body["to"])
        destinations = to.split("<")
        for number in (from_, *destinations):
            if not (_NUMBER.match(number) or number.lower().startswith("sip:")):
                return _bad(f"invalid number: {number}")
        urls = {k: body.get(k) for k in ("answer_url", "hangup_url", "ring_url") if body.get(k) is not None}
        for name, value in urls.items():
            if not _is_http_url(str(value)):
                return _bad(f"{name} is not a valid URL")
        methods = {k: str(body.get(k, "POST")).upper() for k in ("answer_method", "hangup_method", "ring_method")}
        if any(m not in ("GET", "POST") for m in methods.values()):
            return _bad("method must be GET or POST")
        try:
            hangup_on_ring = int(body["hangup_on_ring"]) if body.get("hangup_on_ring") is not None else None
            ring_timeout = int(body.get("ring_timeout", 120))
        except (TypeError, ValueError):
            return _bad("hangup_on_ring and ring_timeout must be integers")
        if (hangup_on_ring is not None and hangup_on_ring < 1) or not 1 <= ring_timeout <= 120:
            return _bad("hangup_on_ring must be positive and ring_timeout between 1 and 120")
        detection = body.get("machine_detection")
        detection = None if detection is None else str(detection).lower()
        if detection not in (None, "true", "hangup", "false"):
            return _bad("machine_detection must be true or hangup")
        amd_url = body.get("machine_detection_url")
        if amd_url is not None and not _is_http_url(str(amd_url)):
            return _bad("machine_detection_url is not a valid URL")
        amd_method = str(body.get("machine_detection_method") or "POST").upper()
        try:
            amd_time = int(body.get("machine_detection_time", 5000))
        except (TypeError, ValueError):
            return _bad("machine_detection_time must be an integer")
        if amd_method not in ("GET", "POST") or not 2000 <= amd_time <= 10000:
            return _bad("machine_detection_method must be GET or POST, machine_detection_time 2000 to 10000")
        if not self._make_room(len(destinations)):
            return _Reply(429, error_body("too many calls"))
        created = []
        for number in destinations:
            call = self._new_call(
                "outbound", number, from_, self._scenarios.get(number),
                answer_url=str(body["answer_url"]), answer_method=methods["answer_method"],
                hangup_url=urls.get("hangup_url"), hangup_method=methods["hangup_method"],
                ring_url=urls.get("ring_url"), ring_method=methods["ring_method"],
                hangup_on_ring=hangup_on_ring, ring_timeout=ring_timeout,
                machine_detection=None if detection == "false" else detection,
                machine_detection_url=None if amd_url is None else str(amd_url),
                machine_detection_method=amd_method, machine_detection_time=amd_time,
            )
            created.append(call)
            if self._http is not None:
                self._reactor.callLater(0, call.start_outbound)
        uuids: Any = [c.request_uuid for c in created]
        return _Reply(
            201,
            {"api_id": str(uuid.uuid4()), "message": "call fired", "request_uuid": uuids[0] if len(uuids) == 1 else uuids},
        )

    def _handle(self, request: Any) -> bytes | int:
        """Recording media is audio, not JSON: served here once the route allowed it (auth checked)."""
        body = FaultyApi._handle(self, request)
        media = request.responseHeaders.getRawHeaders(b"x-fake-media")
        if media and request.code == 200:
            request.responseHeaders.removeHeader(b"x-fake-media")
            kind = b"audio/mpeg" if media[0] == b"mp3" else b"audio/x-wav"
            return respond(request, 200, RECORDING_AUDIO, content_type=kind)
        return body

    def _digits(self, call: FakeCall, record: RecordedRequest) -> _Reply:
        digits = str(record.body.get("digits") or "")
        leg = str(record.body.get("leg") or "aleg")
        if not _DIGITS.match(digits):
            return _bad("digits must be 0-9, *, # or w (1 to 64 of them)")
        if leg not in ("aleg", "bleg"):
            return _bad("leg must be aleg or bleg")
        if leg == "bleg":
            return _bad("this call has no B leg")
        call.send_digits(digits, leg)
        return _Reply(202, {"api_id": str(uuid.uuid4()), "message": "digits sent"})

    def _record_call(self, request: Any, call: FakeCall, record: RecordedRequest) -> _Reply:
        body = record.body
        file_format = str(body.get("file_format") or "mp3")
        if file_format not in ("mp3", "wav"):
            return _bad("file_format must be mp3 or wav")
        try:
            time_limit = int(body.get("time_limit", 60))
        except (TypeError, ValueError):
            return _bad("time_limit must be an integer")
        if time_limit < 1:
            return _bad("time_limit must be positive")
        callback = body.get("callback_url")
        if callback is not None and not _is_http_url(str(callback)):
            return _bad("callback_url is not a valid URL")
        method = str(body.get("callback_method") or "POST").upper()
        if method not in ("GET", "POST"):
            return _bad("callback_method must be GET or POST")
        root = request.prePathURL().decode("utf-8", "replace").rsplit("/", 1)[0]
        recording = call.start_recording(
            f"{root}/v1/Account/{self.auth_id}", time_limit, file_format,
            None if callback is None else str(callback), method,
        )
        self.recordings[recording.recording_id] = recording
        while len(self.recordings) > self.max_calls:
            del self.recordings[next(iter(self.recordings))]
        return _Reply(
            202,
            {
                "api_id": recording.api_id,
                "message": "call recording started",
                "recording_id": recording.recording_id,
                "url": recording.url,
            },
        )

    def _transfer(self, call: FakeCall, record: RecordedRequest) -> _Reply:
        body = record.body
        legs = body.get("legs")
        if legs not in ("aleg", "bleg", "both"):
            return _bad("legs must be aleg, bleg or both")
        if legs == "bleg":
            return _bad("this call has no B leg")
        url = body.get("aleg_url")
        if not url or not _is_http_url(str(url)):
            return _bad("aleg_url is required and must be a valid URL")
        method = str(body.get("aleg_method", "POST")).upper()
        if method not in ("GET", "POST"):
            return _bad("aleg_method must be GET or POST")
        if call.is_ended or not call.is_answered:
            return _Reply(404, error_body("call not in progress"))
        call.transfer(str(url), method)
        return _Reply(202, {"api_id": str(uuid.uuid4()), "message": "call transferred"})

    def _new_call(self, direction: str, to: str, from_: str, scenario: Scenario | None, **kwargs: Any) -> FakeCall:
        call = FakeCall(
            self._carrier,
            str(uuid.uuid4()),
            direction,
            to,
            from_,
            Scenario(),
            created_at=self._reactor.seconds(),
            **kwargs,
        )
        self._adopt(call.call_uuid, call, scenario)
        self._by_request[call.request_uuid] = call
        self._log.info("fake Plivo {direction} call {uuid} to {to}", direction=direction, uuid=call.call_uuid, to=to)
        return call


def _bad(message: str) -> _Reply:
    return _Reply(400, error_body(message))


def _method_not_allowed() -> _Reply:
    return _Reply(405, error_body("method not allowed"))


