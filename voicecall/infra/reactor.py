"""
The epoll reactor, made to keep its timers on time under I/O load (C{twistd --reactor=voicecall-epoll}).

Twisted's epoll reactor runs due timers, asks epoll for every ready descriptor, and handles all
of them before it looks at the clock again. With hundreds of media streams that batch is a few
milliseconds of work, and the shared playback tick (L{voicecall.media.playback}) that falls due
in the middle of it waits for the end: the frames it sends arrive that much late, a different
amount each time.

This reactor handles the same events in the same order, but when a timer falls due in the
middle of a batch it stops, lets the reactor run its timers, and then carries on with the rest
of that batch I{before} it polls again. So every descriptor a poll reported is still handled
once per round, in order, as in Twisted (none can be passed over by descriptors that stay
ready), and the timer waits for at most one event's handling rather than the whole batch.

The details:
 - A cut is made for a timer that falls due while the reactor waits in the poll (the usual
   case: it sleeps until the next timer and wakes with sockets ready) or while it handles the
   batch; then the timer waits for one event's handling at most. A timer already due before
   the poll began (one running late, a zero-delay chain such as Twisted's continuous polling)
   does not cut the batch: it is handled whole, as Twisted does, never one event per turn.
 - Timers scheduled while the batch is handled do not cut it either (a C{callLater(0)} from a
   read, such as the store's hand-over to its writer thread, still collects the whole batch).
 - The events left for after the timers are re-checked against what the timers changed: an
   event whose descriptor was removed or replaced is dropped, and read or write readiness is
   kept only if the descriptor is still registered for it (what a fresh poll would report).
   A dropped event that still matters is reported again by the next poll (level-triggered).
 - The earliest timer is read from the heap (C{_pendingTimedCalls[0].time}); a cancelled or
   postponed call there can cause one needless cut, which costs one pass over the timers.

The override relies on these attributes of Twisted's epoll reactor: C{_poller},
C{_selectables}, C{_reads}, C{_writes}, C{_doReadOrWrite}, C{_pendingTimedCalls} and the
C{_POLL_*} masks; tests/test_reactor.py fails if a Twisted release renames them.
"""
from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

__all__ = ["TimelyEPollReactor", "install"]


class TimelyEPollReactor(EPollReactor):
    """An L{EPollReactor} that runs a timer falling due mid-batch before the rest of the batch."""

    #: What voicecall.tap checks (without importing this module, which needs epoll) to advise it.
    timely = True

    #: Events of the last poll left for after the timers: (fd, event, selectable) each.
    _left: list | None = None

    def doPoll(self, timeout: float | None) -> None:
        entered = self.seconds()
        left = self._left
        if left is not None:
            # The rest of a cut batch: handled before any new poll (the timers have just run).
            self._left = None
            self._handle(left, True, entered)
            return
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        self._handle(events, False, entered)

    doIteration = doPoll

    def _handle(self, events: list, left: bool, entered: float) -> None:
        """
        Handle `events` in order, each with the selectable registered for its descriptor at that
        moment, as Twisted does; if a timer falls due on the way, keep the rest in C{_left}.
        `left` events carry the selectable they were for and are checked against the present.
        `entered`: when this turn's poll began (a timer due by then does not cut the batch).
        """
        timers = self._pendingTimedCalls
        now = self.seconds
        due = timers[0].time if timers else None
        if due is not None and due <= entered:
            due = None  # already due before the poll: no cut (see the module docstring)
        selectables, reads, writes = self._selectables, self._reads, self._writes
        handle = self._doReadOrWrite
        for i, item in enumerate(events):
            if left:
                fd, event, was = item
                selectable = selectables.get(fd)
                if selectable is was:
                    # What a fresh poll would report now: only what it is still registered for.
                    if fd not in reads:
                        event &= ~self._POLL_IN
                    if fd not in writes:
                        event &= ~self._POLL_OUT
                    if not event:
                        selectable = None
                else:
                    selectable = None  # removed, or its descriptor number reused, since the poll
            else:
                fd, event = item
                selectable = selectables.get(fd)
            if selectable is not None:
                log.callWithLogger(selectable, handle, selectable, fd, event)
            if due is not None and now() >= due:
                if i + 1 < len(events):
                    rest = events[i + 1 :]
                    if not left:
                        rest = [(fd, event, selectables.get(fd)) for fd, event in rest]
                    self._left = rest
                return


def install() -> None:
    """Install L{TimelyEPollReactor} as the global reactor (what C{--reactor=voicecall-epoll} calls)."""
    from twisted.internet.main import installReactor

    installReactor(TimelyEPollReactor())
