# -*- test-case-name: tests.test_manager -*-
"""
The voice the CallManager speaks and listens through on a call (DESIGN.md: the manager defines
it; tap.py wires a provider's native speech or the media-stream bridge to it).
"""
from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from voicecall.domain.model import CallRecord


class Voice(Protocol):
    """
    How the manager speaks and listens on a call. A provider's native speech (`<Say>`, Telnyx
    speak, Plivo `<Speak>`) implements it; tap.py may wire a media-stream router in front.
    """

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        """Say `text`; fires when it has been played (or accepted by the carrier)."""

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        """
        Say `text` then listen for the answer, as one carrier instruction where possible. With
        `dtmf`, the answer may also be keys pressed (Twilio `<Gather input="speech dtmf">`, Plivo
        `inputType="dtmf speech"`): they come back as a `call.dtmf` event with the turn token.
        """

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred[None]:
        ...

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        ...

    def wants_turn_token(self, call: CallRecord) -> bool:
        """Whether the answer to a prompt on this call will carry a turn token back."""
