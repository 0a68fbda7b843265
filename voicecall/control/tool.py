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
                    },
                    ["message"],
                ),
                _action("continue_call", {"callId": _STR, "message": _STR}, ["callId", "message"]),
                _action("speak_to_user", {"callId": _STR, "message": _STR}, ["callId", "message"]),
                _action("end_call", {"callId": _STR}, ["callId"]),
                _action("get_status", {"callId": _STR}, ["callId"]),
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
}
