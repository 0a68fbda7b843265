# -*- test-case-name: tests.test_provider_http,tests.test_twilio,tests.test_responder -*-
"""
JSON API requests (the carriers' REST calls, the responder's chat completions): one injected treq
client, a time limit on every request, bodies always consumed (so pooled connections are
released) but never more than `MAX_RESPONSE_BYTES` of one (a larger answer drops its connection
and fails), and failures turned into an `ApiError` (the carriers pass their `ProviderError`) with
the SPEC text `<Carrier> API error: <status> <body>` (SPEC §7 shared HTTP client rules).
"""
from __future__ import annotations

import base64
import json
from typing import Any, Mapping, Sequence

from attrs import define, field
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.web.client import ResponseFailed

from voicecall.infra.bodies import BodyTooLarge, read_bounded
from voicecall.infra.private.client import response_connection

#: How much of an error body goes into an error message.
MAX_ERROR_BODY = 500
#: Largest response body read from a carrier; past it the connection is dropped unread.
MAX_RESPONSE_BYTES = 1024 * 1024


class ApiError(Exception):
    """A request failed; the message is `<prefix>: <what>` (`Twilio API error: 400 ...`)."""

    def __init__(self, message: str, status: int | None = None, code: object = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status, when the API answered
        self.code = code  # the API's own error code from the body, when it gave one


def _printable(text: str) -> str:
    clean = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return clean if len(clean) <= MAX_ERROR_BODY else clean[:MAX_ERROR_BODY] + "…"


def _abort(response: Any, result: Any, timeout: float) -> Any:
    """
    A body that stopped arriving: drop its connection (treq's reader cannot be cancelled). The
    reader's Deferred has no canceller, so cancelling it makes Twisted swallow the one firing the
    dropped connection then brings (tests.test_provider_http.BodyTimeoutTests).
    """
    connection = response_connection(response)
    if connection is not None:
        connection.loseConnection()
    raise TimeoutError(timeout, "response body")


@define
class ApiClient:
    """JSON (or form) requests to one API root."""

    _http: Any  # treq.client.HTTPClient
    _base: str
    _prefix: str  # "Twilio API error"
    _auth: tuple[str, str] | None = field(default=None, repr=False)
    _headers: Mapping[str, str] = field(factory=dict, repr=False)
    _timeout: float = 15.0
    #: Bounds the body too (treq's `timeout` stops at the headers); None: headers only.
    _clock: Any = None
    #: What a failure raises: ApiError, or a subclass of it (the carriers' ProviderError).
    _error: type[ApiError] = ApiError

    def _redact(self, text: str) -> str:
        """An answer without our credentials in it (some carriers and proxies echo the request's headers)."""
        secrets = [v.split(" ", 1)[-1] for v in self._headers.values() if v]
        if self._auth is not None:
            secrets += [self._auth[1], base64.b64encode(f"{self._auth[0]}:{self._auth[1]}".encode()).decode().rstrip("=")]
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
        return text

    async def request(
        self,
        method: str,
        path: str,
        *,
        form: Sequence[tuple[str, str]] | None = None,
        body: Any = None,
        allow_not_found: bool = False,
    ) -> Any:
        """The decoded JSON answer (None for an empty body, or a 404 when allowed)."""
        url = self._base.rstrip("/") + path
        kwargs: dict[str, Any] = {"headers": {**self._headers, "Accept": "application/json"}, "timeout": self._timeout}
        if self._auth is not None:
            kwargs["auth"] = self._auth
        if form is not None:
            kwargs["data"] = list(form)
        if body is not None:
            kwargs["json"] = body
        try:
            started = self._clock.seconds() if self._clock is not None else 0.0
            response = await self._http.request(method, url, **kwargs)
            reading = read_bounded(response, MAX_RESPONSE_BYTES)
            if self._clock is not None:
                left = max(0.0, self._timeout - (self._clock.seconds() - started))
                reading.addTimeout(left, self._clock, onTimeoutCancel=lambda r, t: _abort(response, r, t))
            content = await reading
        except (CancelledError, TimeoutError) as e:
            raise self._error(f"{self._prefix}: no answer within {self._timeout:g}s") from e
        except BodyTooLarge as e:
            raise self._error(f"{self._prefix}: answer larger than {MAX_RESPONSE_BYTES} bytes", response.code) from e
        except (ConnectError, DNSLookupError) as e:
            raise self._error(f"{self._prefix}: cannot connect ({type(e).__name__})") from e
        except ResponseFailed as e:
            # treq's time limit cancels the request, which surfaces wrapped in ResponseFailed.
            if any(r.check(CancelledError, TimeoutError) for r in getattr(e, "reasons", [])):
                raise self._error(f"{self._prefix}: no answer within {self._timeout:g}s") from e
            raise self._error(f"{self._prefix}: connection lost before a complete answer") from e
        if response.code == 404 and allow_not_found:
            return None
        text = content.decode("utf-8", "replace")
        if not 200 <= response.code < 300:
            code = None
            try:
                parsed = json.loads(text)
                code = parsed.get("code")  # Twilio, Plivo
                if code is None and isinstance(parsed.get("errors"), list) and parsed["errors"]:
                    code = parsed["errors"][0].get("code")  # Telnyx
            except (ValueError, AttributeError, TypeError, RecursionError):
                pass
            raise self._error(f"{self._prefix}: {response.code} {_printable(self._redact(text))}", response.code, code)
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._error(f"{self._prefix}: {response.code} answer is not JSON: {_printable(self._redact(text))}", response.code) from e
