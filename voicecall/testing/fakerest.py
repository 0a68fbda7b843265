"""
What the fake carriers' REST APIs share: the resource tree, reading a request, answering it, the
faults a test can inject (a failure, a request never answered, an answer delayed), and the
account's calls (scenarios, room for more).

A fake API (FakeTwilio, FakeTelnyx, FakePlivo) mixes in L{FaultyApi}, keeps the attributes it
names, and supplies its carrier's parts: L{FaultyApi.api_root}, L{FaultyApi._record} (the request
as that carrier's RecordedRequest), L{FaultyApi._reply} (route it to a L{Reply}),
L{FaultyApi._failure_body} (the carrier's error body for an injected failure) and
L{FaultyApi._call_ended}.
"""
from __future__ import annotations

import hmac
import json
from collections import deque
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from voicecall.testing.chaos import Chaos

JSON = b"application/json; charset=utf-8"


@define
class Fault:
    """One injected fault, for the next C{count} requests that C{match}."""

    kind: str  # "fail", "hang", "delay"
    count: int
    match: Callable[[Any], bool] | None
    status: int = 500
    body: bytes = b""
    seconds: float = 0.0


@frozen
class Reply:
    """A routed answer: status, JSON body (None: empty) and extra headers."""

    status: int
    body: Mapping[str, Any] | None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def read_body(request: Any, limit: int) -> bytes:
    """Up to C{limit + 1} bytes of the body: more than C{limit} means too large."""
    if request.content is None:
        return b""
    request.content.seek(0)
    return request.content.read(limit + 1)


def raw_headers(request: Any) -> tuple[tuple[str, str], ...]:
    """Every request header as received, in order."""
    return tuple(
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, values in request.requestHeaders.getAllRawHeaders()
        for v in values
    )


def basic_auth(request: Any) -> tuple[str, str] | None:
    """The HTTP Basic credentials of a request, if it has an Authorization header."""
    if not request.getHeader(b"authorization"):
        return None
    return request.getUser().decode("utf-8", "replace"), request.getPassword().decode("utf-8", "replace")


def credentials_match(given: tuple[str, str] | None, user: str, password: str) -> bool:
    """Whether Basic credentials `given` are (`user`, `password`), compared in constant time."""
    given_user, given_password = given or ("", "")
    ok_user = hmac.compare_digest(given_user.encode("utf-8"), user.encode("utf-8"))
    ok_password = hmac.compare_digest(given_password.encode("utf-8"), password.encode("utf-8"))
    return ok_user and ok_password


def respond(request: Any, status: int, body: bytes, headers: tuple = (), content_type: bytes = JSON) -> bytes:
    """Set the status (and the JSON content type when there is a body) and return the body."""
    request.setResponseCode(status)
    if body:
        request.setHeader(b"content-type", content_type)
    for name, value in headers:
        request.setHeader(name, value)
    return body


def is_http_url(url: object) -> bool:
    """An absolute http(s) URL with a host, as the carriers require for callbacks."""
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class ApiResource(Resource):
    """A fake API's subtree: every request below it is answered by `handle` (the fake's handler)."""

    isLeaf = True

    def __init__(self, handle: Callable[[Any], bytes | int]) -> None:
        super().__init__()
        self._handle = handle

    def render(self, request: Any) -> bytes | int:
        return self._handle(request)


@define(kw_only=True)
class FaultyApi:
    """
    The request cycle of a fake REST API with fault injection, and the account's calls. A
    carrier's fake adds C{_reactor}, C{scenario} and its credentials, and builds C{_carrier} (a
    delivery.Courier) after construction.
    """

    max_calls: int = 10_000
    webhook_timeout: float = 15.0
    chaos: Chaos = field(factory=Chaos)
    requests: deque = field(factory=lambda: deque(maxlen=10_000))
    calls: dict = field(factory=dict)  # call id -> FakeCall, oldest first
    _scenarios: dict = field(factory=dict)
    _faults: deque = field(factory=deque)
    _held: dict = field(factory=dict)  # request -> pending delayed answer (or None)
    _carrier: Any = field(init=False)

    #: The content type of JSON answers.
    content_type = JSON
    #: The first path segment of the API (C{b"2010-04-01"}, C{b"v1"}, C{b"v2"}).
    api_root = b""

    def resource(self) -> Resource:
        """The root resource: serve it with a Site; its URL is the API base URL."""
        root = Resource()
        root.putChild(self.api_root, ApiResource(self._handle))
        return root

    @property
    def webhooks(self) -> deque:
        """Every webhook (callback, document fetch) sent for any call, oldest first."""
        return self._carrier.webhooks

    def set_scenario(self, number: str, scenario: Any) -> None:
        """Calls to (outbound) or from (inbound) `number` follow `scenario`."""
        self._scenarios[number] = scenario

    def settle(self) -> Deferred:
        """Fires once no webhook is in flight."""
        return self._carrier.settle()

    def fail_next(
        self,
        status: int = 500,
        body: Mapping[str, Any] | bytes | None = None,
        *,
        count: int = 1,
        match: Callable[[Any], bool] | None = None,
    ) -> None:
        """The next `count` API requests (that `match`) get `status` and `body`, unprocessed."""
        if body is None:
            body = self._failure_body(status)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        self._faults.append(Fault("fail", count, match, status=status, body=raw))

    def hang_next(self, *, count: int = 1, match: Callable[[Any], bool] | None = None) -> None:
        """The next `count` API requests are never answered (nor processed)."""
        self._faults.append(Fault("hang", count, match))

    def delay_next(self, seconds: float, *, count: int = 1, match: Callable[[Any], bool] | None = None) -> None:
        """The next `count` API requests are processed at once but answered `seconds` later."""
        self._faults.append(Fault("delay", count, match, seconds=seconds))

    def abort_held(self) -> None:
        """Drop the connections of requests that were hung or are still delayed."""
        held, self._held = self._held, {}
        for request, later in held.items():
            if later is not None and later.active():
                later.cancel()
            request.loseConnection()

    # -- what each carrier supplies ---------------------------------------------------------

    def _record(self, request: Any) -> Any:
        raise NotImplementedError

    def _reply(self, request: Any, record: Any) -> Reply:
        raise NotImplementedError

    def _failure_body(self, status: int) -> Mapping[str, Any]:
        raise NotImplementedError

    def _call_ended(self, call: Any) -> bool:
        raise NotImplementedError

    def _forget(self, call: Any) -> None:
        """An ended call was dropped from `calls` (to make room)."""

    # -- the account's calls ----------------------------------------------------------------

    def _adopt(self, key: str, call: Any, scenario: Any) -> Any:
        """Keep a new call under `key`, following `scenario` (None: the account's default for it)."""
        if scenario is None:
            scenario = self.scenario(call) if callable(self.scenario) else self.scenario
        call.scenario = scenario
        self.calls[key] = call
        return call

    def _make_room(self, n: int = 1) -> bool:
        """Forget the oldest ended calls until `n` more fit in `max_calls`; False if too many are live."""
        for key in [k for k, c in self.calls.items() if self._call_ended(c)]:
            if len(self.calls) + n <= self.max_calls:
                break
            self._forget(self.calls.pop(key))
        return len(self.calls) + n <= self.max_calls

    # -- the cycle --------------------------------------------------------------------------

    def _handle(self, request: Any) -> bytes | int:
        record = self._record(request)
        fault = self._take_fault(record)
        if fault is not None and fault.kind == "fail":
            return respond(request, fault.status, fault.body, content_type=self.content_type)
        if fault is not None and fault.kind == "hang":
            self._hold(request, None)
            return NOT_DONE_YET
        reply = self._reply(request, record)
        body = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        if fault is not None:  # delay: processed now, answered later
            later = self._reactor.callLater(fault.seconds, self._answer_later, request, reply, body)
            self._hold(request, later)
            return NOT_DONE_YET
        return respond(request, reply.status, body, reply.headers, self.content_type)

    def _take_fault(self, record: Any) -> Fault | None:
        for fault in self._faults:
            if fault.match is None or fault.match(record):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _hold(self, request: Any, later: Any) -> None:
        self._held[request] = later

        def gone(_: object) -> None:
            if self._held.pop(request, None) is not None and later.active():
                later.cancel()

        request.notifyFinish().addBoth(gone)

    def _answer_later(self, request: Any, reply: Reply, body: bytes) -> None:
        self._held.pop(request, None)
        request.write(respond(request, reply.status, body, reply.headers, self.content_type))
        request.finish()
