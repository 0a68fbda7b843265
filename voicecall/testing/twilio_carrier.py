# -*- test-case-name: tests.test_fake_twilio -*-
"""
What every call on the fake Twilio shares: the webhook signer (our own HMAC-SHA1
implementation of PROVIDERS.md §1.5, checked in tests against the official SDK), the
`Scenario` describing the person on the line, the observation records, and the `Carrier` that
signs webhooks as Twilio does and delivers them (see delivery.py) as badly as its `Chaos` says
(status callbacks duplicated with the same I-Twilio-Idempotency-Token, delayed and reordered;
TwiML fetches late or repeated).

It imports nothing of the daemon.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Iterable, Mapping
from urllib.parse import urlencode

from attrs import define, field, frozen

from voicecall.testing.delivery import Courier, with_query
from voicecall.testing.documents import DocumentScenario, InputRecord, PromptRecord

API_VERSION = "2010-04-01"
#: What Twilio sends as User-Agent on its webhook requests.
USER_AGENT = "TwilioProxy/1.1"
#: Observations kept per call (oldest dropped first).
MAX_OBSERVATIONS = 1_000

TERMINAL = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
#: Webhooks that only report (their answer is not followed): call status, AMD verdicts, recordings.
CALLBACK_KINDS = frozenset({"status", "amd", "recording"})
#: The events a recording may be reported at (`RecordingStatusCallbackEvent`).
RECORDING_EVENTS = ("in-progress", "completed", "absent")



def sign_request(
    auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> str:
    """
    The `X-Twilio-Signature` Twilio sends: base64 HMAC-SHA1, keyed with the auth token, of the
    URL exactly as requested followed by every form parameter as name+value, sorted by name
    (then by value), with decoded values. GET requests sign the URL alone (pass no params).
    """
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    data = url + "".join(name + value for name, value in sorted(pairs))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def new_sid(prefix: str) -> str:
    """A Twilio-shaped resource sid: a two-letter prefix and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


@frozen
class Scenario(DocumentScenario):
    """
    What the person on the far end does (see DocumentScenario). An answer later than the call's
    `Timeout` is a no-answer; `<Say>` takes `say_seconds_per_char` per character; a Gather that
    hears nothing waits `silence` (None: its own `timeout` attribute); speech is heard with
    `confidence`.
    """

    say_seconds_per_char: float = 0.0
    confidence: str = "0.9"
    #: The call is answered by a machine: its greeting (`greeting`, lasting `greeting_seconds`)
    #: plays, then it beeps and records whatever is said (`FakeCall.beep_at`). A speech Gather
    #: running during the greeting hears it as words (once); after the beep Gathers hear nothing.
    machine: bool = False
    greeting_seconds: float = 4.0
    greeting: str | None = "Hi, you have reached Sam. Please leave a message after the tone."
    #: How long answering-machine detection takes to judge a person (or a machine's start).
    amd_seconds: float = 1.5
    #: Keys the person presses at a `<Gather>` that takes them (`input` with `dtmf`), instead
    #: of the next utterance (None: they speak, as `utterances` says).
    press: str | None = None
    #: Seconds a `<Dial>`ed transfer target talks before hanging up (None: until the callee does).
    dial_seconds: float | None = None
    #: Seconds after the call's end before a recording is `completed` (Twilio processes it first).
    recording_delay: float = 2.0


@define
class Webhook:
    """One request the carrier made (TwiML fetch, Gather action, status callback), and its answer."""

    kind: str  # "twiml", "action", "redirect", "status", "amd", "recording"
    url: str
    method: str
    params: dict[str, str]
    signature: str
    status: int | None = None
    body: bytes | None = None
    error: str | None = None
    #: Sent as I-Twilio-Idempotency-Token; a redelivery of the same webhook keeps it.
    idempotency_token: str = field(factory=lambda: secrets.token_hex(16))
    #: 1 for the first delivery, 2 for a chaos duplicate.
    attempt: int = 1


@frozen
class SayRecord(PromptRecord):
    """A `<Say>` the call played."""


@define
class GatherRecord(InputRecord):
    """A `<Gather>` the call ran."""


@define
class DialRecord:
    """A `<Dial>` the call ran: its `<Number>` or `<Sip>` target and the caller id shown to it."""

    target: str
    noun: str  # "Number" or "Sip"
    caller_id: str | None
    started_at: float
    ended_at: float | None = None


@define
class RecordingRecord:
    """A recording started through the REST API (`/Calls/{sid}/Recordings.json`)."""

    sid: str
    call_sid: str
    url: str  # where its media is served (`.mp3`/`.wav` appended), with the account's Basic auth
    callback: str | None
    callback_method: str
    callback_events: frozenset
    channels: str
    started_at: float
    status: str = "in-progress"  # then "completed" or "absent"
    duration: int | None = None


@define
class StreamRecord:
    """A `<Connect><Stream>` (bidirectional) or `<Start><Stream>` (fork) the call opened."""

    url: str
    parameters: dict[str, str]
    attributes: dict[str, str]
    bidirectional: bool
    ended_by: str | None = None  # "media", "interrupted", "hangup"


@define
class Carrier(Courier):
    """
    What all fake calls share: the clock, the HTTP client webhooks go through (see `Courier`),
    the account and the auth token they are signed with.
    """

    account_sid: str
    _auth_token: str
    max_documents_per_call: int = 1_000

    def _is_document(self, hook: Webhook) -> bool:
        return hook.kind not in CALLBACK_KINDS

    def _again(self, hook: Webhook) -> Webhook:
        """Twilio's retry: the same request and idempotency token, re-signed when sent."""
        return Webhook(
            hook.kind, hook.url, hook.method, dict(hook.params), "",
            idempotency_token=hook.idempotency_token, attempt=hook.attempt + 1,
        )

    def _signed(self, hook: Webhook) -> tuple[str, str, bytes | None, dict[str, list[str]]]:
        if hook.method == "GET":
            hook.url = with_query(hook.url, hook.params)
            hook.signature = sign_request(self._auth_token, hook.url)
            body, headers = None, {}
        else:
            hook.signature = sign_request(self._auth_token, hook.url, hook.params)
            body = urlencode(hook.params).encode("ascii")
            headers = {"Content-Type": ["application/x-www-form-urlencoded"]}
        headers.update(
            {
                "X-Twilio-Signature": [hook.signature],
                "User-Agent": [USER_AGENT],
                "I-Twilio-Idempotency-Token": [hook.idempotency_token],
            }
        )
        return hook.method, hook.url, body, headers

    def _answered(self, hook: Webhook, status: int, body: bytes) -> None:
        hook.status, hook.body = status, body


def rfc2822(ts: float) -> str:
    """An RFC 2822 date in UTC, as in Twilio's `Timestamp` parameter."""
    return format_datetime(datetime.fromtimestamp(ts, timezone.utc))
