# -*- test-case-name: tests.test_provider_http,tests.test_fake_twilio -*-
"""Reading an HTTP answer's body with a size cap: past it the connection is dropped unread."""
from __future__ import annotations

from typing import Any

import treq


class BodyTooLarge(Exception):
    """The answer's body passed the limit it was read with."""


def read_bounded(response: Any, limit: int) -> Any:
    """
    A Deferred of the whole body of treq's `response`, or failing with L{BodyTooLarge} as soon as
    more than `limit` bytes arrived (treq then drops the connection, so the rest is never read).
    """
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"answer larger than {limit} bytes")
        chunks.append(data)

    return treq.collect(response, collect).addCallback(lambda _: b"".join(chunks))
