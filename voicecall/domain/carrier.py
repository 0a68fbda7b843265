# -*- test-case-name: tests.test_manager -*-
"""
The call control the CallManager drives a carrier through (DESIGN.md: the manager defines the
interfaces it speaks through; providers/ implements them, tap.py wires one in): place, answer
and hang up calls, and ask a call's status, with the values and the error that cross it.
"""
from __future__ import annotations

from typing import Protocol

from attrs import field, frozen
from twisted.internet.defer import Deferred

from voicecall.domain.model import CallRecord
from voicecall.infra.jsonhttp import ApiError


class ProviderError(ApiError):
    """A carrier API call failed; the message is the SPEC text (`Twilio API error: 400 ...`)."""


@frozen
class InitiatedCall:
    provider_call_id: str
    status: str = "initiated"
    #: The carrier will say the initial message itself (Twilio notify TwiML): never speak it again.
    consumes_initial_message: bool = False
    #: With `consumes_initial_message`: fires with the message when the carrier fetches it (it is
    #: then being said), so the manager records it in the transcript; never fires if it is not.
    served: Deferred | None = field(default=None, eq=False)


@frozen
class ProviderCallStatus:
    """SPEC §7 getCallStatus: the carrier's view of a call (used when restoring)."""

    status: str
    is_terminal: bool
    is_unknown: bool = False


class CallControl(Protocol):
    """A carrier's call control. Methods return Deferreds; failures are `ProviderError`s."""

    def initiate_call(
        self,
        *,
        call_id: str,
        from_number: str,
        to_number: str,
        webhook_url: str,
        notify_message: str | None = None,
        voice: str | None = None,
    ) -> Deferred[InitiatedCall]:
        ...

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        ...

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        """Answer an accepted inbound call (Telnyx parks inbound calls until answered)."""

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        ...

    def repoint_call(self, call: CallRecord, webhook_url: str) -> Deferred[None]:
        """
        Point a live call at this node's `webhook_url` (it adopted the call from a dead node):
        the carrier's next requests for it come here (Twilio call update, Plivo transfer; a
        carrier whose webhooks reach any node does nothing).
        """
