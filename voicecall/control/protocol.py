# -*- test-case-name: tests.test_rpc -*-
"""
What both ends of the control socket agree on: where it is, and the JSON-RPC error codes.

The server (voicecall.control.rpc) and its clients (voicecall.client, the CLI, doctor) import
this module, not each other: it imports nothing of voicecall, so a CLI command loads no
server-side code (the manager, the store, the adapters) to learn a socket path.
"""
from __future__ import annotations

import os
from typing import Mapping

#: JSON-RPC 2.0 error codes: malformed JSON, not a request (or a line over the server's limit),
#: unknown method, bad params, a failure that is no call's error.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: The method failed; `message` says why (for a call operation, the SPEC error text: `Call not found`, ...).
CALL_ERROR = -32000


def default_socket_path(store_dir: str, env: Mapping[str, str]) -> str:
    """Where the daemon listens and the CLI connects unless told: $VOICECALL_SOCKET, else <store>/voicecall.sock."""
    return env.get("VOICECALL_SOCKET") or os.path.join(store_dir, "voicecall.sock")
