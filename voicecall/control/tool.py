# -*- test-case-name: tests.test_cli -*-
"""
The `voice_call` agent tool (SPEC §18.1): its JSON schema, printed by `voicecall tool-schema`,
and the mapping of each tool action onto an RPC method, for a gateway that exposes the tool.
"""
from __future__ import annotations

from typing import Any

NAME = "voice_call"
LABEL = "Voice Call"
DESCRIPTION = "Make phone calls and have voice conversations via the voice-call plugin."

_STR = {"type": "string"}
#: What an outbound call does when an answering machine picks up (domain.model.ANSWERING_MACHINE_POLICIES).
ANSWERING_MACHINE = ("ignore", "leave-message", "hang-up")
#: What a continue listens for (domain.model.TURN_INPUTS).
TURN_INPUTS = ("speech", "dtmf", "speech dtmf")


def _action(name: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"action": {"type": "string", "const": name}, **props},
        "required": ["action", *required],
        "additionalProperties": False,
    }


def schema() -> dict[str, Any]:
    """The tool definition: name, label, description and the JSON schema of its parameters."""
    return {
        "name": NAME,
        "label": LABEL,
        "description": DESCRIPTION,
        "parameters": {
            "anyOf": [
                _action(
                    "initiate_call",
                    {
                        "message": {"type": "string", "description": "Intro message"},
                        "to": _STR,
                        "mode": {"type": "string", "enum": ["notify", "conversation"]},
                        "from": {"type": "string", "description": "Caller id: fromNumber or one of allowedFromNumbers"},
                        "voice": {"type": "string", "description": "The voice this call speaks with"},
                        "greeting": {"type": "string", "description": "Said first when the call is answered, before the message"},
                        "objective": {"type": "string", "description": "What the call is for (guides the replies)"},
                        "maxDurationSeconds": {"type": "integer", "minimum": 1, "description": "Hang up after this long (at most the configured maximum)"},
                        "answeringMachine": {
                            "type": "string",
                            "enum": list(ANSWERING_MACHINE),
                            "description": "If a machine answers: go on as usual, leave the message after the beep, or hang up",
                        },
                        "record": {"type": "boolean", "description": "Record the call (a consent sentence is said first)"},
                    },
                    ["message"],
                ),
                _action(
                    "continue_call",
                    {
                        "callId": _STR,
                        "message": _STR,
                        "input": {
                            "type": "string",
                            "enum": list(TURN_INPUTS),
                            "description": "What the answer may be: words (default), keys pressed, or either",
                        },
                    },
                    ["callId", "message"],
                ),
                _action("speak_to_user", {"callId": _STR, "message": _STR}, ["callId", "message"]),
                _action(
                    "end_call",
                    {"callId": _STR, "message": {"type": "string", "description": "A goodbye said before hanging up"}},
                    ["callId"],
                ),
                _action("get_status", {"callId": _STR}, ["callId"]),
                _action(
                    "send_dtmf",
                    {
                        "callId": _STR,
                        "digits": {
                            "type": "string",
                            "pattern": "^[0-9*#w]{1,64}$",
                            "description": "Keys to press: 0-9, * and #; w waits half a second (to navigate a phone menu)",
                        },
                    },
                    ["callId", "digits"],
                ),
                _action(
                    "transfer_call",
                    {
                        "callId": _STR,
                        "to": {"type": "string", "description": "Number (E.164) or sip:user@host, listed in transfer.allowTo"},
                        "message": {"type": "string", "description": "Said to the caller before connecting them"},
                    },
                    ["callId", "to"],
                ),
                {
                    "type": "object",
                    "description": "Legacy shape (no action).",
                    "properties": {
                        "mode": {"type": "string", "enum": ["call", "status"]},
                        "to": _STR,
                        "sid": _STR,
                        "message": _STR,
                    },
                    "additionalProperties": False,
                },
            ]
        },
    }


#: tool action -> RPC method (params are passed through unchanged, less `action`).
RPC_METHODS = {
    "initiate_call": "voicecall.initiate",
    "continue_call": "voicecall.continue",
    "speak_to_user": "voicecall.speak",
    "end_call": "voicecall.end",
    "get_status": "voicecall.status",
    "send_dtmf": "voicecall.dtmf",
    "transfer_call": "voicecall.transfer",
}
