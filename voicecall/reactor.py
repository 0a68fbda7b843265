"""
The epoll reactor, made to keep its timers on time under I/O load (C{twistd --reactor=voicecall-epoll}).

Twisted's epoll reactor runs due timers, asks epoll for every ready descriptor, and handles all
of them before it looks at the clock again. With hundreds of media streams that batch is a few
milliseconds of work, and the shared playback tick (L{voicecall.media.playback}) that falls due
in the middle of it waits for the end: the frames it sends arrive that much late, a different
amount each time. This reactor handles the same events in the same order but goes back to its
timers as soon as the earliest one is due; the descriptors it did not reach are still ready
(epoll is level-triggered here, as in Twisted), so the next poll returns them at once.

Nothing else changes: the same poller, the same registrations, the same error handling per
event. Timers scheduled while the batch is being handled do not cut it short (a C{callLater(0)}
from a read would otherwise end every batch after one event).

The override relies on four attributes of Twisted's reactors (C{_poller}, C{_selectables},
C{_doReadOrWrite}, C{_pendingTimedCalls}); tests/test_reactor.py fails if a Twisted release
renames them.
"""
from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

__all__ = ["TimelyEPollReactor", "install"]


class TimelyEPollReactor(EPollReactor):
    """An L{EPollReactor} that stops handling I/O events once a timer falls due."""

    #: What voicecall.tap checks (without importing this module, which needs epoll) to advise it.
    timely = True

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        timers = self._pendingTimedCalls
        # No timer: nothing can fall due, handle the whole batch as Twisted does.
        due = timers[0].time if timers else None
        now = self.seconds
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                log.callWithLogger(selectable, handle, selectable, fd, event)
            if due is not None and now() >= due:
                return

    doIteration = doPoll


def install() -> None:
    """Install L{TimelyEPollReactor} as the global reactor (what C{--reactor=voicecall-epoll} calls)."""
    from twisted.internet.main import installReactor

    installReactor(TimelyEPollReactor())
