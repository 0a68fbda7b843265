# -*- test-case-name: tests.test_fake_plivo -*-
"""
What every call on the fake Plivo shares: the webhook signer (our own implementation of
Plivo's V3 and V2 schemes, PROVIDERS.md §3.5, checked in tests against the official SDK), the
`Scenario` describing the person on the line, the observation records, and the `Carrier` that
signs callbacks as Plivo does and delivers them (see delivery.py) as badly as its `Chaos` says.

It imports nothing of the daemon.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

from attrs import define, field, frozen

from voicecall.testing.delivery import Courier, with_query
from voicecall.testing.documents import DocumentScenario, InputRecord, PromptRecord

#: What the fake sends as User-Agent on its callbacks.
USER_AGENT = "PlivoHTTP/1.0 (fake)"
#: Observations kept per call (oldest dropped first).
MAX_OBSERVATIONS = 1_000
TERMINAL = frozenset({"completed", "busy", "failed", "timeout", "no-answer", "cancel"})
HANGUP_CAUSES = {
    "completed": "NORMAL_CLEARING",
    "busy": "USER_BUSY",
    "failed": "CALL_REJECTED",
    "timeout": "NO_ANSWER",
    "no-answer": "NO_ANSWER",
    "cancel": "ORIGINATOR_CANCEL",
}



# -- signatures ---------------------------------------------------------------------------------


def new_nonce() -> str:
    """A Plivo-shaped nonce: 20 random digits."""
    return f"{secrets.randbelow(10**20):020d}"


def v3_string(method: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """
    The string Plivo's V3 signature covers, before `.nonce`: `scheme://netloc/path`, then `?` and
    the URL's query decoded and sorted as `k=v&...` (GET: the params join the query), then for
    POST params a `.` after a non-empty query and the params sorted as `kv` with no separators.
    """
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    body = list(params)
    if method.upper() == "GET":
        query, body = query + body, []
    sorted_query = "&".join(f"{k}={v}" for k, v in sorted(query))
    text = base
    if sorted_query or body:
        text += "?" + sorted_query
    if sorted_query and body:
        text += "."
    return text + "".join(k + v for k, v in sorted(body))


def _hmac_b64(token: str, data: str) -> str:
    digest = hmac.new(token.encode("utf-8"), data.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sign_v3(auth_token: str, method: str, url: str, params: Iterable[tuple[str, str]], nonce: str) -> str:
    """`X-Plivo-Signature-V3`: base64 HMAC-SHA256 of `v3_string(...) + "." + nonce`."""
    return _hmac_b64(auth_token, v3_string(method, url, params) + "." + nonce)


def sign_v2(auth_token: str, url: str, nonce: str) -> str:
    """`X-Plivo-Signature-V2`: base64 HMAC-SHA256 of `scheme://netloc/path` + nonce (no query, no body)."""
    parts = urlsplit(url)
    return _hmac_b64(auth_token, f"{parts.scheme}://{parts.netloc}{parts.path}" + nonce)


def signature_headers(
    auth_token: str, method: str, url: str, params: Iterable[tuple[str, str]], version: str = "v3"
) -> dict[str, str]:
    """The signature headers of one callback (`version`: v3, v2, both or none), fresh nonces each."""
    headers: dict[str, str] = {}
    params = list(params)
    if version in ("v3", "both"):
        nonce = new_nonce()
        signature = sign_v3(auth_token, method, url, params, nonce)
        headers.update(
            {
                "X-Plivo-Signature-V3": signature,
                "X-Plivo-Signature-Ma-V3": signature,
                "X-Plivo-Signature-V3-Nonce": nonce,
            }
        )
    if version in ("v2", "both"):
        nonce = new_nonce()
        signature = sign_v2(auth_token, url, nonce)
        headers.update(
            {
                "X-Plivo-Signature-V2": signature,
                "X-Plivo-Signature-Ma-V2": signature,
                "X-Plivo-Signature-V2-Nonce": nonce,
            }
        )
    return headers


# -- values -------------------------------------------------------------------------------------


@frozen
class Scenario(DocumentScenario):
    """
    What the person on the far end does (see DocumentScenario). An answer later than the call's
    `hangup_on_ring` (else `ring_timeout`) is a no-answer; `<Speak>` takes
    `speak_seconds_per_char` per character; a GetInput that hears nothing waits `silence` (None:
    its `executionTimeout`); speech is heard with `confidence`.
    """

    speak_seconds_per_char: float = 0.0
    confidence: str = "0.91"
    #: The call is answered by a machine: its greeting lasts `greeting_seconds`, then it beeps and
    #: records whatever is said (`FakeCall.beep_at`, `FakeCall.speak_log`). Its GetInputs hear nothing.
    machine: bool = False
    greeting_seconds: float = 4.0
    #: How long answering-machine detection takes to judge (at most `machine_detection_time`).
    amd_seconds: float = 1.5
    #: Keys the person presses at the first `<GetInput>` taking them (`inputType` with `dtmf`),
    #: instead of speaking there (None: they speak, as `utterances` says).
    press: str | None = None
    #: Seconds a `<Dial>`ed transfer target talks before hanging up (None: the Dial's `timeLimit`).
    dial_seconds: float | None = None
    #: Seconds after a recording stops (the call's end, or its `time_limit`) before Plivo posts
    #: its `callback_url` (the file is processed first: this is usually after the hang-up).
    recording_delay: float = 2.0


@define
class Webhook:
    """One request the carrier made, and its answer."""

    kind: str  # "answer", "transfer", "redirect", "action", "ring", "hangup", "amd", "recording"
    url: str
    method: str
    params: dict[str, str]
    headers: dict[str, str] = field(factory=dict)
    status: int | None = None
    body: bytes | None = None
    error: str | None = None
    #: Whether the answer is an XML document the call follows (not a notification callback).
    document: bool = False
    #: 1 for the first delivery, 2 for a chaos duplicate (re-signed with a fresh nonce).
    attempt: int = 1


@frozen
class SpeakRecord(PromptRecord):
    """A `<Speak>` the call played."""


@define
class DialRecord:
    """A `<Dial>` the call ran: its `<Number>` or `<User>` target and the `callerId` shown to it."""

    target: str
    noun: str  # "Number" or "User"
    caller_id: str | None
    started_at: float
    ended_at: float | None = None


@define
class RecordingRecord:
    """A recording started through `POST /Call/{uuid}/Record/`."""

    recording_id: str
    call_uuid: str
    url: str  # where its media is served, to the account's Basic auth
    file_format: str
    time_limit: int
    callback_url: str | None
    callback_method: str
    started_at: float
    api_id: str
    ended_at: float | None = None


@define
class GetInputRecord(InputRecord):
    """A `<GetInput>` the call ran."""

    @property
    def turn_token(self) -> str | None:
        """The `turnToken` query parameter of the action URL, if any."""
        query = dict(parse_qsl(urlsplit(self.action_url or "").query))
        return query.get("turnToken")


@define
class Carrier(Courier):
    """
    What all fake calls share: the clock, the HTTP client callbacks go through (see `Courier`),
    the auth token and scheme (`signature`: v3, v2, both or none) they are signed with.
    """

    auth_id: str
    _auth_token: str
    signature: str = "v3"
    max_documents_per_call: int = 1_000

    def _is_document(self, hook: Webhook) -> bool:
        return hook.document

    def _again(self, hook: Webhook) -> Webhook:
        """Plivo's retry: the same request, re-signed (fresh nonce) when sent."""
        return Webhook(hook.kind, hook.url, hook.method, dict(hook.params), document=hook.document, attempt=hook.attempt + 1)

    def _signed(self, hook: Webhook) -> tuple[str, str, bytes | None, dict[str, list[str]]]:
        if hook.method == "GET":
            hook.url = with_query(hook.url, hook.params)
            hook.headers = signature_headers(self._auth_token, "GET", hook.url, (), self.signature)
            body, headers = None, {}
        else:
            hook.headers = signature_headers(self._auth_token, "POST", hook.url, hook.params.items(), self.signature)
            body = urlencode(hook.params).encode("utf-8")
            headers = {"Content-Type": ["application/x-www-form-urlencoded"]}
        headers.update({k: [v] for k, v in hook.headers.items()})
        headers["User-Agent"] = [USER_AGENT]
        return hook.method, hook.url, body, headers

    def _answered(self, hook: Webhook, status: int, body: bytes) -> None:
        hook.status, hook.body = status, body
