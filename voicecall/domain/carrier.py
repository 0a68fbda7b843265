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
class DialOptions:
    """The per-call choices a carrier acts on when it places a call."""

    #: One of model.ANSWERING_MACHINE_POLICIES. Anything but "ignore" asks the carrier for
    #: answering-machine detection: its verdict comes back as a `call.machine` event (and, for
    #: "leave-message", a second one with `machine_done` when the machine's greeting has ended).
    #: While detection runs the carrier must not speak anything by itself: the manager speaks
    #: the initial message once it knows who answered (a notify message is not consumed).
    answering_machine: str = "ignore"


#: The options of a call placed with none chosen (the default of `initiate_call`'s `options`).
NO_OPTIONS = DialOptions()


#: Keypad tones a call may send (`voicecall.dtmf`): digits, `*`, `#`, and `w` for a half-second
#: pause (the pause character of Twilio `<Play digits>`, Telnyx `send_dtmf` and Plivo's DTMF API).
DTMF_CHARACTERS = frozenset("0123456789*#w")
MAX_DTMF_DIGITS = 64


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
        options: DialOptions = NO_OPTIONS,
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

    def send_dtmf(self, call: CallRecord, digits: str) -> Deferred[None]:
        """
        Play keypad tones (`digits`: DTMF_CHARACTERS, already checked) on an answered call, then
        go on as before: a turn listening for an answer keeps listening (Twilio `<Play digits>`
        then back to the Gather or the media stream; Telnyx `send_dtmf`; Plivo's DTMF API).
        Fires once the carrier has accepted them.
        """

    def transfer_call(self, call: CallRecord, to: str) -> Deferred[None]:
        """
        Connect the caller to `to` (E.164, or `sip:` on carriers that dial SIP), ending
        voicecall's part of the call (Twilio `<Dial>`, Telnyx `transfer`, Plivo `<Dial>`). Anything
        to say first has been said (and played) before this is called. Fires once the carrier
        has accepted it.
        """

    def start_recording(self, call: CallRecord) -> Deferred[dict | None]:
        """
        Record the call from now on (both parties). Fires with the recording (model.RECORDING_KEYS,
        status "in-progress") when the carrier names it at once, else None; either way its later
        states (completed with its URL and duration, or failed) come as `call.recording` events.
        """

