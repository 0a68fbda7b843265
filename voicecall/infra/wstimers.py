"""
autobahn's per-factory timer, without txaio's batching.

autobahn schedules its opening/closing-handshake and ping timeouts through
C{factory._batched_timer}, a txaio batched timer: calls due within one bucket share one reactor
call. Cancelling such a call leaves its bucket's reactor call scheduled, so a connection that
closed cleanly still leaves a delayed call behind for up to a second (a daemon stopping then
does not stop cleanly, and trial reports an unclean reactor). Our factories have few such
timers (the media server's pre-start timeout is our own), so each gets a plain reactor call,
which cancelling really removes.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class UnbatchedTimer:
    """The C{call_later} autobahn asks of a batched timer, as one reactor call per timeout."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall:
        return self._clock.callLater(delay, fun, *args, **kwargs)


def unbatch(factory: Any, clock: IReactorTime) -> None:
    """Give an autobahn WebSocket factory plain reactor timers (see the module docstring)."""
    factory._batched_timer = UnbatchedTimer(clock)
