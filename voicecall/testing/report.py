"""
A fake receiver of voicecall's call reports (`report.url`, control/report.py): a twisted.web
resource that checks each POST's `X-Voicecall-Signature` against its own HMAC-SHA256 of
``timestamp + "." + body`` with the shared secret (written here from the README's description,
not imported from voicecall) and a timestamp within `tolerance` seconds of its clock, and keeps
every report it accepted. It can answer the next requests with a status of your choice, or
stall them (never answer) until `release()`.

    receiver = FakeReportReceiver(secret="s3cret", clock=reactor)
    url = await serve(self, receiver.resource())          # tests.harness.serve
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


@define
class FakeReportReceiver:
    secret: str = field(repr=False)
    #: Whose time the timestamp is checked against (None: not checked).
    clock: IReactorTime | None = None
    tolerance: float = 300.0
    #: Every report accepted (the decoded JSON body), oldest first.
    received: deque = field(factory=lambda: deque(maxlen=1000))
    #: Every request as (timestamp header, signature header, raw body, status answered or None while stalled).
    requests: deque = field(factory=lambda: deque(maxlen=1000))
    _faults: deque = field(factory=deque)
    _stalled: list = field(factory=list)

    def fail_next(self, status: int = 500, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next `count` requests with `status` (signature checked first), keeping nothing."""
        self._faults.extend([("status", status, retry_after)] * count)

    def stall_next(self, count: int = 1) -> None:
        """Never answer the next `count` requests (until `release()` or the client gives up)."""
        self._faults.extend([("stall", None, None)] * count)

    def release(self) -> None:
        """Answer every stalled request 503."""
        stalled, self._stalled = self._stalled, []
        for request, gone in stalled:
            if not gone:
                request.setResponseCode(503)
                request.finish()

    def verified(self, timestamp: str | None, signature: str | None, body: bytes) -> bool:
        """Whether the request is signed with the secret, at a time within tolerance."""
        if not timestamp or not signature or not timestamp.isdigit():
            return False
        if self.clock is not None and abs(self.clock.seconds() - int(timestamp)) > self.tolerance:
            return False
        mac = hmac.new(self.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest("sha256=" + mac, signature)

    def resource(self) -> Resource:
        fake = self

        class Reports(Resource):
            isLeaf = True

            def render_POST(self, request):
                return fake._handle(request)

        return Reports()

    def _handle(self, request: Any) -> Any:
        body = request.content.read()
        timestamp = request.getHeader("X-Voicecall-Timestamp")
        signature = request.getHeader("X-Voicecall-Signature")
        record = [timestamp, signature, body, None]
        self.requests.append(record)
        if not self.verified(timestamp, signature, body):
            record[3] = 401
            request.setResponseCode(401)
            return b"bad signature"
        if request.getHeader("Content-Type") != "application/json":
            record[3] = 415
            request.setResponseCode(415)
            return b"expected application/json"
        if self._faults:
            kind, status, retry_after = self._faults.popleft()
            if kind == "stall":
                gone: list[bool] = []
                request.notifyFinish().addErrback(lambda _: gone.append(True))
                self._stalled.append((request, gone))
                return NOT_DONE_YET
            record[3] = status
            request.setResponseCode(status)
            if retry_after is not None:
                request.setHeader("Retry-After", retry_after)
            return b"fault"
        try:
            report = json.loads(body)
        except ValueError:
            record[3] = 400
            request.setResponseCode(400)
            return b"not JSON"
        self.received.append(report)
        record[3] = 204
        request.setResponseCode(204)
        return b""
