# -*- test-case-name: tests.test_bounded -*-
"""A set with a size cap that forgets its oldest members first (SPEC §20 item 15)."""
from __future__ import annotations

from typing import Iterable, Iterator


class BoundedSet:
    """
    Insertion-ordered set of at most `limit` members. Adding an existing member does not refresh
    its position; adding past the cap evicts the oldest inserted member.
    """

    def __init__(self, limit: int = 10_000, members: Iterable[str] = ()) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self._limit = limit
        self._members: dict[str, None] = {}
        for m in members:
            self.add(m)

    def add(self, member: str) -> None:
        if member in self._members:
            return
        self._members[member] = None
        if len(self._members) > self._limit:
            del self._members[next(iter(self._members))]

    def discard(self, member: str) -> None:
        self._members.pop(member, None)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)
