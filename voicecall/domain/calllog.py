# -*- test-case-name: tests.test_tap -*-
"""The daemon's log line per call milestone, read from the manager's durable call events."""
from __future__ import annotations

from twisted.logger import Logger


class CallLog:
    """
    The daemon's line per call milestone at the default level, from the manager's durable call
    events (the manager itself logs "placed"): answered, ended with its reason, and a call the
    carrier's API refused or never answered, naming that API's root (never a credential).
    """

    _log = Logger()

    def __init__(self, api_root: str | None) -> None:
        self._api_root = api_root
        self._refused: str | None = None  # the call whose "ended" line the refusal line replaces

    def __call__(self, entry: dict) -> None:
        kind, call_id = entry.get("type"), entry.get("callId")
        if kind == "call.state" and entry.get("state") == "answered":
            self._log.info("call {call_id} answered", call_id=call_id)
        elif kind == "call.state" and entry.get("state") == "failed" and entry.get("previous") == "initiated":
            self._refused = call_id
            self._log.warn(
                "call {call_id} failed at the carrier ({api})",
                call_id=call_id,
                api=self._api_root or "the carrier API",
            )
        elif kind == "call.ended":
            if self._refused == call_id:
                self._refused = None
                return
            self._log.info("call {call_id} ended: {reason}", call_id=call_id, reason=entry.get("reason"))
