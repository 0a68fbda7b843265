# -*- test-case-name: tests.test_fake_twilio -*-
"""
The fake Twilio REST API (PROVIDERS.md §1.1): a twisted.web resource tree serving

- `POST /2010-04-01/Accounts/{sid}/Calls.json`: create a call;
- `POST /2010-04-01/Accounts/{sid}/Calls/{CallSid}.json`: live update (`Twiml`, `Url`, and
  `StatusCallback`, which then reports `completed` only) or hang up (`Status=completed|canceled`);
- `GET  /2010-04-01/Accounts/{sid}/Calls/{CallSid}.json`: fetch the call resource;
- `POST /2010-04-01/Accounts/{sid}/Calls/{CallSid}/Recordings.json`: record an in-progress call
  (`RecordingStatusCallback`, `RecordingStatusCallbackEvent`, `RecordingChannels`);
- `GET  /2010-04-01/Accounts/{sid}/Recordings/{RecordingSid}.mp3` (or `.wav`): its audio,

with Twilio's HTTP Basic auth, validation, error JSON and status codes. Every request is
recorded; tests can make the next requests fail, hang or answer late. Each created call is
driven by a `FakeCall` (see twilio_driver) when an HTTP client for webhooks was given.

It imports nothing of the daemon.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl

from attrs import define, field, frozen
from twisted.logger import Logger

from voicecall.testing.fakerest import FaultyApi, basic_auth, credentials_match, raw_headers, read_body, respond
from voicecall.testing.fakerest import Reply as _Reply
from voicecall.testing.fakerest import is_http_url as _is_http_url
from voicecall.testing.twilio_carrier import (
    API_VERSION,
    RECORDING_EVENTS,
    STATUS_EVENTS,
    Carrier,
    RecordingRecord,
    Scenario,
    new_sid,
    rfc2822,
)
from voicecall.testing.twilio_driver import FakeCall

MAX_REQUEST_BYTES = 64 * 1024
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_SID = re.compile(r"^(?P<sid>CA[0-9a-f]{32})\.json$")
_APP_SID = re.compile(r"^AP[0-9a-f]{32}$")
_MEDIA = re.compile(r"^(?P<sid>RE[0-9a-f]{32})\.(?P<ext>mp3|wav)$")
#: The audio a fake recording serves: a few bytes that start like an MP3 (an ID3 tag).
RECORDING_AUDIO = b"ID3\x03\x00\x00\x00\x00\x00\x00fake twilio recording"


def error_body(code: int, message: str, status: int) -> dict[str, Any]:
    """Twilio's REST error JSON."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


@frozen
class RecordedRequest:
    """One request the fake API received. `auth` is the Basic (user, password), if any."""

    method: str
    path: str
    form: tuple[tuple[str, str], ...]
    auth: tuple[str, str] | None
    headers: tuple[tuple[str, str], ...] = ()
    too_large: bool = False  # the body passed 64 KB and was not parsed

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of form field `name`."""
        return next((v for k, v in self.form if k == name), default)

    def getall(self, name: str) -> list[str]:
        """Every value of form field `name`, in order."""
        return [v for k, v in self.form if k == name]

    @property
    def form_dict(self) -> dict[str, str]:
        """The form as a dict (first value of each field)."""
        out: dict[str, str] = {}
        for k, v in self.form:
            out.setdefault(k, v)
        return out


@define
class FakeTwilio(FaultyApi):
    """
    A fake Twilio account. `resource()` is the twisted.web tree to serve (its root is the
    `twilio.baseUrl`). With `http` (a treq HTTPClient or StubTreq) created calls are driven:
    status callbacks, TwiML fetches and Gathers go out signed with `auth_token`. Without it
    calls stay `queued`. `scenario` (a Scenario, or a callable from the FakeCall to one) says
    what the far end does; `set_scenario` overrides it per phone number.
    """

    _reactor: Any  # IReactorTime
    account_sid: str
    _auth_token: str
    _http: Any = None
    scenario: Scenario | Callable[[FakeCall], Scenario] = Scenario()
    applications: Mapping[str, str] = field(factory=dict)  # ApplicationSid -> voice URL
    #: RecordingSid -> the recording (its call's `recordings` hold it too), oldest first.
    recordings: dict = field(factory=dict)
    max_documents_per_call: int = 1_000
    _log = Logger()

    api_root = API_VERSION.encode("ascii")

    def __attrs_post_init__(self) -> None:
        self._carrier = Carrier(
            self._reactor,
            self._http,
            self.account_sid,
            self._auth_token,
            webhook_timeout=self.webhook_timeout,
            max_documents_per_call=self.max_documents_per_call,
            chaos=self.chaos,
        )

    # -- public API -----------------------------------------------------------------------

    def place_inbound_call(
        self,
        to: str,
        from_: str,
        webhook_url: str,
        *,
        method: str = "POST",
        scenario: Scenario | None = None,
        status_callback: str | None = None,
        status_callback_method: str = "POST",
    ) -> FakeCall:
        """
        A call from `from_` arrives at our number `to`, whose voice webhook is `webhook_url`:
        Twilio posts `Direction=inbound`, `CallStatus=ringing` there and follows the answer.
        """
        if self._http is None:
            raise RuntimeError("FakeTwilio needs an HTTP client to place inbound calls")
        call = self._new_call(
            "inbound",
            to,
            from_,
            scenario or self._scenarios.get(from_),
            status_callback=status_callback,
            status_callback_method=status_callback_method,
        )
        call.start_inbound(webhook_url, method)
        return call

    # -- request handling -----------------------------------------------------------------

    def _failure_body(self, status: int) -> Mapping[str, Any]:
        return error_body(20000 + status, "Fake failure", status)

    def _call_ended(self, call: FakeCall) -> bool:
        return call.is_ended

    def _reply(self, request: Any, record: RecordedRequest) -> _Reply:
        if record.too_large:
            return _Reply(413, error_body(20001, "Request body too large", 413))
        return self._route(request, record)

    def _record(self, request: Any) -> RecordedRequest:
        raw = read_body(request, MAX_REQUEST_BYTES)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        form: tuple[tuple[str, str], ...] = ()
        if ctype.startswith("application/x-www-form-urlencoded") and len(raw) <= MAX_REQUEST_BYTES:
            form = tuple(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        too_large = len(raw) > MAX_REQUEST_BYTES
        record = RecordedRequest(
            request.method.decode("ascii", "replace"),
            request.path.decode("utf-8", "replace"),
            form,
            basic_auth(request),
            raw_headers(request),
            too_large,
        )
        self.requests.append(record)
        return record

    def _route(self, request: Any, record: RecordedRequest) -> _Reply:
        not_found = _Reply(
            404,
            error_body(20404, f"The requested resource {record.path} was not found", 404),
        )
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if len(parts) not in (3, 4, 5) or parts[0] != "Accounts":
            return not_found
        if not (credentials_match(record.auth, self.account_sid, self._auth_token) and parts[1] == self.account_sid):
            return _Reply(
                401,
                error_body(20003, "Authenticate", 401),
                ((b"www-authenticate", b'Basic realm="Twilio API"'),),
            )
        if parts[2:] == ["Calls.json"]:
            if record.method == "POST":
                return self._create(record)
            return _method_not_allowed(record.method)
        if len(parts) == 5 and parts[2] == "Calls" and parts[4] == "Recordings.json":
            call = self.calls.get(parts[3])
            if call is None:
                return not_found
            if record.method == "POST":
                return self._record_call(request, call, record)
            return _method_not_allowed(record.method)
        if len(parts) == 4 and parts[2] == "Recordings":
            m = _MEDIA.match(parts[3])
            if m is None or m.group("sid") not in self.recordings or record.method != "GET":
                return not_found
            return _Reply(200, None, ((b"x-fake-media", m.group("ext").encode()),))
        if len(parts) == 4 and parts[2] == "Calls":
            m = _SID.match(parts[3])
            call = self.calls.get(m.group("sid")) if m else None
            if call is None:
                return not_found
            if record.method == "GET":
                return _Reply(200, call.to_json(self.account_sid))
            if record.method == "POST":
                return self._update(call, record)
            return _method_not_allowed(record.method)
        return not_found

    def _handle(self, request: Any) -> bytes | int:
        """Recording media is audio, not JSON: served here once the route allowed it (auth checked)."""
        body = FaultyApi._handle(self, request)
        media = request.responseHeaders.getRawHeaders(b"x-fake-media")
        if media and request.code == 200:
            request.responseHeaders.removeHeader(b"x-fake-media")
            kind = b"audio/mpeg" if media[0] == b"mp3" else b"audio/x-wav"
            return respond(request, 200, RECORDING_AUDIO, content_type=kind)
        return body

    def _record_call(self, request: Any, call: FakeCall, record: RecordedRequest) -> _Reply:
        form = record.form_dict
        callback = form.get("RecordingStatusCallback")
        if callback is not None and not _is_http_url(callback):
            return _bad(21609, f"RecordingStatusCallback is not a valid URL: {callback}")
        events: list[str] = []
        for value in record.getall("RecordingStatusCallbackEvent"):
            events.extend(value.split())
        if any(e not in RECORDING_EVENTS for e in events):
            return _bad(20001, f"Invalid RecordingStatusCallbackEvent: {' '.join(events)}")
        method = form.get("RecordingStatusCallbackMethod", "POST").upper()
        if method not in ("GET", "POST"):
            return _bad(20001, "RecordingStatusCallbackMethod must be GET or POST")
        channels = form.get("RecordingChannels", "mono")
        if channels not in ("mono", "dual"):
            return _bad(20001, f"Invalid RecordingChannels: {channels}")
        if call.status != "in-progress":
            return _bad(21220, "Call is not in-progress. Cannot start recording.")
        sid = new_sid("RE")
        host = request.getHost()
        origin = f"{'https' if request.isSecure() else 'http'}://{host.host}:{host.port}"
        path = f"/{API_VERSION}/Accounts/{self.account_sid}/Recordings/{sid}"
        recording = call.start_recording(
            sid, origin + path, callback, method, frozenset(events or ["completed"]), channels
        )
        self.recordings[sid] = recording
        while len(self.recordings) > self.max_calls:
            del self.recordings[next(iter(self.recordings))]
        return _Reply(201, _recording_json(self.account_sid, recording, path))

    def _create(self, record: RecordedRequest) -> _Reply:
        form = record.form_dict
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            return _bad(21201, "No 'To' number is specified")
        if not from_:
            return _bad(21213, "No 'From' number is specified")
        if not _E164.match(to):
            return _bad(21211, f"The 'To' number {to} is not a valid phone number.")
        if not _E164.match(from_):
            return _bad(21212, f"The 'From' number {from_} is not a valid phone number.")
        sources = [k for k in ("Url", "Twiml", "ApplicationSid") if form.get(k)]
        if not sources:
            return _bad(
                21205,
                "Url parameter is required. For more information, see "
                "http://www.twilio.com/docs/api/twiml",
            )
        if len(sources) > 1:
            return _bad(21205, f"Only one of Url, Twiml or ApplicationSid may be given, not {sources}")
        url = form.get("Url")
        if sources == ["ApplicationSid"]:
            app = form["ApplicationSid"]
            url = self.applications.get(app) if _APP_SID.match(app) else None
            if url is None:
                return _bad(21218, "Invalid ApplicationSid")
        if url is not None and not _is_http_url(url):
            return _bad(21205, f"Url is not a valid URL: {url}")
        callback = form.get("StatusCallback")
        if callback is not None and not _is_http_url(callback):
            return _bad(21609, f"StatusCallback is not a valid URL: {callback}")
        events: list[str] = []
        for value in record.getall("StatusCallbackEvent"):
            events.extend(value.split())
        if any(e not in STATUS_EVENTS for e in events):
            return _bad(20001, f"Invalid StatusCallbackEvent: {' '.join(events)}")
        methods = [form.get("Method", "POST").upper(), form.get("StatusCallbackMethod", "POST").upper()]
        if any(m not in ("GET", "POST") for m in methods):
            return _bad(20001, "Method must be GET or POST")
        detection = form.get("MachineDetection")
        if detection is not None and detection not in ("Enable", "DetectMessageEnd"):
            return _bad(21260, f"MachineDetection must be Enable or DetectMessageEnd, not {detection}")
        async_amd = form.get("AsyncAmd", "false")
        if async_amd not in ("true", "false"):
            return _bad(20001, "AsyncAmd must be true or false")
        amd_callback = form.get("AsyncAmdStatusCallback")
        if amd_callback is not None and not _is_http_url(amd_callback):
            return _bad(21609, f"AsyncAmdStatusCallback is not a valid URL: {amd_callback}")
        amd_method = form.get("AsyncAmdStatusCallbackMethod", "POST").upper()
        if amd_method not in ("GET", "POST"):
            return _bad(20001, "AsyncAmdStatusCallbackMethod must be GET or POST")
        try:
            timeout = int(form.get("Timeout", "60"))
        except ValueError:
            timeout = -1
        if not 1 <= timeout <= 600:
            return _bad(20001, "Timeout must be an integer between 1 and 600")
        if not self._make_room():
            return _Reply(429, error_body(20429, "Too Many Requests", 429))
        call = self._new_call(
            "outbound-api",
            to,
            from_,
            self._scenarios.get(to),
            url=url,
            method=methods[0],
            twiml=form.get("Twiml"),
            status_callback=callback,
            status_callback_method=methods[1],
            status_callback_events=frozenset(events or ["completed"]),
            timeout=timeout,
            machine_detection=detection,
            async_amd=async_amd == "true",
            amd_callback=amd_callback,
            amd_callback_method=amd_method,
        )
        if self._http is not None:
            self._reactor.callLater(0, call.start_outbound)
        return _Reply(201, call.to_json(self.account_sid))

    def _update(self, call: FakeCall, record: RecordedRequest) -> _Reply:
        form = record.form_dict
        status = form.get("Status")
        if status is not None:
            if status not in ("completed", "canceled"):
                return _bad(20001, f"Invalid Status: {status}")
            call.cancel_or_complete(status)
            return _Reply(200, call.to_json(self.account_sid))
        twiml, url = form.get("Twiml"), form.get("Url")
        callback = form.get("StatusCallback")
        if callback is not None and not _is_http_url(callback):
            return _bad(21609, f"StatusCallback is not a valid URL: {callback}")
        methods = [form.get("Method", "POST").upper(), form.get("StatusCallbackMethod", "POST").upper()]
        if any(m not in ("GET", "POST") for m in methods):
            return _bad(20001, "Method must be GET or POST")
        if twiml is None and url is None and callback is None:
            return _Reply(200, call.to_json(self.account_sid))
        if url is not None and twiml is None and not _is_http_url(url):
            return _bad(21205, f"Url is not a valid URL: {url}")
        if call.status != "in-progress":
            return _bad(21220, "Call is not in-progress. Cannot redirect.")
        if callback is not None:
            # An update names no StatusCallbackEvent: Twilio then sends the `completed` status only.
            call.status_callback, call.status_callback_method = callback, methods[1]
            call.status_callback_events = frozenset({"completed"})
        if twiml is not None or url is not None:
            call.update(twiml=twiml, url=url, method=methods[0])
        return _Reply(200, call.to_json(self.account_sid))

    def _new_call(
        self, direction: str, to: str, from_: str, scenario: Scenario | None, **kwargs: Any
    ) -> FakeCall:
        call = FakeCall(
            self._carrier,
            new_sid("CA"),
            direction,
            to,
            from_,
            Scenario(),
            created_at=self._reactor.seconds(),
            **kwargs,
        )
        self._adopt(call.sid, call, scenario)
        self._log.info(
            "fake Twilio {direction} call {sid} to {to}", direction=direction, sid=call.sid, to=to
        )
        return call


def _recording_json(account_sid: str, recording: RecordingRecord, path: str) -> dict[str, Any]:
    """The call Recording resource as the REST API shows it."""
    return {
        "sid": recording.sid,
        "account_sid": account_sid,
        "call_sid": recording.call_sid,
        "api_version": API_VERSION,
        "status": recording.status,
        "channels": 2 if recording.channels == "dual" else 1,
        "source": "StartCallRecordingAPI",
        "start_time": rfc2822(recording.started_at),
        "date_updated": rfc2822(recording.started_at),
        "duration": None if recording.duration is None else str(recording.duration),
        "error_code": None,
        "uri": path + ".json",
    }


def _bad(code: int, message: str) -> _Reply:
    return _Reply(400, error_body(code, message, 400))


def _method_not_allowed(method: str) -> _Reply:
    return _Reply(405, error_body(20004, f"Method not allowed: {method}", 405))


