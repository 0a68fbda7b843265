# -*- test-case-name: tests.test_mock_provider -*-
"""
What every carrier adapter offers, and the values that cross its boundary.

The webhook resource hands a provider a `WebhookContext` (the request as received plus the public
URL that web/security.py reconstructed); the provider verifies it and parses it into normalised
`CallEvent`s and the body to answer with. The CallManager drives calls through the call control
it defines (`voicecall.domain.carrier.CallControl`, which `Provider` extends) and speaks through
each adapter's native speech, the `voicecall.domain.voice.Voice` it defines. Providers never import
web/, media/ or the manager.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from attrs import field, frozen

from voicecall.domain.carrier import CallControl
from voicecall.domain.model import CallEvent


@frozen
class WebhookContext:
    """One webhook request, as received."""

    method: str
    path: str  # the path, percent-encoded as received
    # The request's content is outside input and call state: never in a repr (logs).
    path_and_query: str = field(repr=False)  # request-target exactly as received (never re-encoded)
    query: Mapping[str, str] = field(repr=False)  # decoded query parameters (first value of each)
    headers: Mapping[str, str] = field(repr=False)  # lower-case names -> first value
    raw_body: bytes = field(repr=False)
    remote_ip: str | None
    url: str = field(repr=False)  # the public URL of this request, reconstructed (web/security.py)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@frozen
class Verification:
    """The outcome of checking a webhook's signature."""

    ok: bool
    reason: str | None = None
    #: Stable key of the verified request: what replay detection and event dedupe key on.
    request_key: str | None = None


@frozen
class WebhookResponse:
    status: int = 200
    body: bytes = field(default=b"OK", repr=False)  # TwiML holds messages and stream tokens
    headers: Mapping[str, str] = field(factory=dict)


@frozen
class ParsedWebhook:
    events: Sequence[CallEvent] = ()
    response: WebhookResponse = field(factory=WebhookResponse)


#: SPEC §7 normalizeProviderStatus: carrier statuses that mean the call is over, and the
#: end reason each maps to.
TERMINAL_STATUS_REASONS = {
    "completed": "completed",
    "failed": "failed",
    "busy": "busy",
    "no-answer": "no-answer",
    "canceled": "hangup-bot",
}


#: How long a carrier may take to play a message before we stop waiting for its end: a generous
#: speaking rate (5 characters a second) plus a base, capped.
SPEAK_TIMEOUT_BASE = 10.0
SPEAK_SECONDS_PER_CHAR = 0.2
SPEAK_TIMEOUT_MAX = 600.0


#: Why a speak fails when the call ends before the carrier has played its message to the end:
#: a message cut off, or never started, is not reported (nor recorded) as said.
NOT_PLAYED = "Call ended before the message was played"


def speak_timeout(text: str) -> float:
    """Seconds to wait for the carrier to report C{text} played."""
    return min(SPEAK_TIMEOUT_MAX, SPEAK_TIMEOUT_BASE + len(text) * SPEAK_SECONDS_PER_CHAR)


async def wait_until_played(clock, timers: set, played, text: str, give_up) -> None:
    """
    Wait for C{played} (the carrier's report that C{text} has played, or its failure when the call
    ended first), at most C{speak_timeout(text)}: then C{give_up()} is called, which must fire
    C{played}. The timer is kept in C{timers} while it runs, so a provider can drop it on stop.
    """
    if played.called:
        await played  # played already, or cut off by the call's end (raises)
        return
    timer = clock.callLater(speak_timeout(text), give_up)
    timers.add(timer)
    try:
        await played
    finally:
        timers.discard(timer)
        if timer.active():
            timer.cancel()


def normalize_status(status: str | None) -> str:
    value = (status or "").strip().lower()
    return value or "unknown"


class Provider(CallControl, Protocol):
    """A carrier adapter: the manager's call control, and the webhooks (their checks and parsing)."""

    name: str
    #: Whether `continue` turns carry a turn token through the carrier (Twilio `<Gather>`).
    uses_turn_tokens: bool

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        """The pre-auth gate: are the headers a signed request needs present at all?"""

    def verify_webhook(self, ctx: WebhookContext, public_url: str | None = None) -> Verification:
        """
        Check a request's signature. `public_url`: the origin the carrier may have signed instead
        of this node's publicUrl (a cluster node also accepts the entry URL and its other nodes').
        """

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        ...

    def call_refs(self, ctx: WebhookContext) -> tuple[str, ...]:
        """The ids (ours or the carrier's) of the call a verified request concerns; parses, changes nothing."""

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse | None:
        """The answer to a verified replay, or None to answer with the original's cached answer."""

