# -*- test-case-name: tests.test_telephony -*-
"""
The rules of issue 17's telephony actions, as pure functions the CallManager applies: an
outbound call's own choices checked against the config, keypad tones, transfer targets,
answering-machine verdicts, and a call's recordings. Nothing here has state or does I/O; a
rule that is broken raises `ValueError` with the text the caller sees.
"""
from __future__ import annotations

from typing import Any, Mapping

from attrs import frozen

from voicecall.domain.carrier import DTMF_CHARACTERS, MAX_DTMF_DIGITS
from voicecall.domain.model import (
    ANSWERED_BY,
    ANSWERING_MACHINE_POLICIES,
    RECORDING_KEYS,
    RECORDING_STATUSES,
    TURN_INPUTS,
    CallOptions,
    CallRecord,
)

#: How long a call waits for the carrier's answering-machine verdict after the answer before it
#: goes on as if a person answered (the verdict is then "unknown"). Carriers decide within
#: 30 s by default (Twilio MachineDetectionTimeout, Plivo machine_detection_time max).
MACHINE_VERDICT_WAIT_SECONDS = 35.0
#: How long a "leave-message" call waits for a machine's greeting to end (the beep) before it
#: leaves the message anyway.
MACHINE_GREETING_WAIT_SECONDS = 40.0
#: Recordings kept per call (a carrier's updates of one recording replace each other).
MAX_RECORDINGS = 20
#: Longest per-call text accepted for a greeting, objective or voice name.
MAX_OPTION_TEXT = 4000
#: How a keypad entry appears in a call's transcript: ``[dtmf] 12#``.
DTMF_PREFIX = "[dtmf] "


@frozen
class Limits:
    """What the config allows an initiate to choose."""

    from_number: str | None
    allowed_from_numbers: tuple[str, ...]
    max_duration_seconds: int
    answering_machine: str
    recording_enabled: bool


def call_metadata(options: CallOptions, limits: Limits) -> tuple[str | None, dict[str, Any]]:
    """
    An initiate's own choices checked against the config: (its caller id, or None for the
    configured one; the metadata to store with the call). Raises ValueError naming the choice.
    """
    meta: dict[str, Any] = {}
    caller = options.from_number
    if caller is not None and caller != limits.from_number and caller not in limits.allowed_from_numbers:
        raise ValueError(f"from number not allowed: {caller} (use fromNumber or one of allowedFromNumbers)")
    seconds = options.max_duration_seconds
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= limits.max_duration_seconds:
            raise ValueError(f"maxDurationSeconds must be an integer from 1 to {limits.max_duration_seconds}")
        meta["maxDurationSeconds"] = seconds
    policy = limits.answering_machine if options.answering_machine is None else options.answering_machine
    if policy not in ANSWERING_MACHINE_POLICIES:
        choices = ", ".join(f'"{p}"' for p in ANSWERING_MACHINE_POLICIES)
        raise ValueError(f"answeringMachine must be one of {choices}")
    if policy != "ignore":
        meta["answeringMachine"] = policy
    record = limits.recording_enabled if options.record is None else options.record
    if not isinstance(record, bool):
        raise ValueError("record must be true or false")
    if record:
        meta["record"] = True
    for name, value in (("voice", options.voice), ("greeting", options.greeting), ("objective", options.objective)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string")
        if len(value) > MAX_OPTION_TEXT:
            raise ValueError(f"{name} is too long (at most {MAX_OPTION_TEXT} characters)")
        meta[name] = value.strip()
    return caller, meta


def opening(message: str | None, greeting: str | None) -> str | None:
    """What an outbound call says first: its greeting, then its message."""
    parts = [p.strip() for p in (greeting, message) if p and p.strip()]
    return " ".join(parts) or None


def check_digits(digits: object) -> str:
    """Keypad tones to send: 0-9, *, # and w (a half-second pause)."""
    if not isinstance(digits, str) or not digits:
        raise ValueError("digits required")
    if not set(digits) <= DTMF_CHARACTERS:
        raise ValueError("digits may only contain 0-9, *, # and w (a half-second pause)")
    if len(digits) > MAX_DTMF_DIGITS:
        raise ValueError(f"too many digits (at most {MAX_DTMF_DIGITS})")
    return digits


def check_input(value: object) -> str:
    """What a `continue` listens for."""
    if value not in TURN_INPUTS:
        raise ValueError('input must be "speech", "dtmf" or "speech dtmf"')
    return value


def check_transfer_target(to: object, allowed: tuple[str, ...]) -> str:
    """A transfer target listed in transfer.allowTo."""
    if not isinstance(to, str) or not to:
        raise ValueError("to required")
    if not allowed:
        raise ValueError("Transfer is not configured: list the numbers a call may be transferred to in transfer.allowTo")
    if to not in allowed:
        raise ValueError(f"Transfer target not allowed: {to} (transfer.allowTo lists the numbers a call may be transferred to)")
    return to


def policy_of(call: CallRecord) -> str:
    """The call's answering-machine policy ("ignore" when detection is off)."""
    return call.metadata.get("answeringMachine") or "ignore"


def verdict(answered_by: str | None, machine_done: bool) -> str:
    """A carrier's answering-machine verdict, as the record keeps it."""
    if machine_done:
        return "machine"
    return answered_by if answered_by in ANSWERED_BY else "unknown"


def awaiting_machine(call: CallRecord) -> bool:
    """Whether the call's first words wait for answering-machine detection (or the machine's beep)."""
    policy = policy_of(call)
    if policy == "ignore":
        return False
    answered_by = call.metadata.get("answeredBy")
    if answered_by is None:
        return True
    return answered_by == "machine" and policy == "leave-message" and not call.metadata.get("machineGreetingEnded")


def hangs_up_on(call: CallRecord) -> bool:
    """Whether detection's verdict ends the call without a word (a machine told to hang up, a fax)."""
    answered_by = call.metadata.get("answeredBy")
    policy = policy_of(call)
    if policy == "ignore":
        return False
    return answered_by == "fax" or (answered_by == "machine" and policy == "hang-up")


def leaves_message(call: CallRecord) -> bool:
    """Whether the call's first words are a voicemail message (then the call hangs up)."""
    return policy_of(call) == "leave-message" and call.metadata.get("answeredBy") == "machine"


def merge_recording(recordings: list[dict[str, Any]], update: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    `recordings` with `update` (a carrier's news of one recording, by id) applied: known keys
    only; a recording's later state never goes back to "in-progress"; the newest MAX_RECORDINGS kept.
    """
    rid = update.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError("a recording needs an id")
    clean = {k: update[k] for k in RECORDING_KEYS if update.get(k) is not None}
    if clean.get("status") not in (None, *RECORDING_STATUSES):
        clean.pop("status")
    out = [dict(r) for r in recordings]
    for existing in out:
        if existing.get("id") == rid:
            if existing.get("status") in ("completed", "failed") and clean.get("status") == "in-progress":
                clean.pop("status")
            existing.update(clean)
            return out
    clean.setdefault("status", "in-progress")
    out.append(clean)
    return out[-MAX_RECORDINGS:]
