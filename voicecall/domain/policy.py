# -*- test-case-name: tests.test_policy -*-
"""
Inbound call screening (SPEC §6.1). This is caller-ID screening, not authentication: caller ID
is set by the calling network and can be spoofed.
"""
from __future__ import annotations

import re
from typing import Iterable

_NON_DIGITS = re.compile(r"\D")


def digits_only(number: str | None) -> str:
    """`+1 (415) 555-0123` -> `14155550123`; None or blank -> ``."""
    return _NON_DIGITS.sub("", number or "")


def inbound_decision(policy: str, allow_from: Iterable[str], caller: str | None) -> str | None:
    """
    None when the call is accepted, else the reason it is rejected. `allowlist` and `pairing`
    accept only a caller whose digits exactly equal a listed number's: no suffix matches.
    """
    if policy == "open":
        return None
    if policy == "disabled":
        return "policy is disabled"
    wanted = digits_only(caller)
    if not wanted:
        return "missing caller ID"
    for entry in allow_from:
        if digits_only(entry) == wanted:
            return None
    return "caller not in allowFrom"
