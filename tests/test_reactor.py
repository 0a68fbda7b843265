"""
Tests for voicecall.reactor (`twistd --reactor=voicecall-epoll`): a timer that falls due while a
batch of I/O events is being handled runs before the rest of the batch, and nothing else about
the epoll reactor changes. Each test builds private reactors (never installed, never run) and
turns them by hand, against Twisted's own EPollReactor for contrast.
"""
from __future__ import annotations

import socket
import time

from twisted.application.reactors import getReactorTypes
from twisted.internet.epollreactor import EPollReactor
from twisted.trial.unittest import SynchronousTestCase

from voicecall.reactor import TimelyEPollReactor

BUSY = 0.002  # seconds each ready descriptor takes to handle


class Busy:
    """An IReadDescriptor on one end of a socket pair: reads its byte, then keeps the CPU `busy` seconds."""

    def __init__(self, sock: socket.socket, handled: list, busy: float = BUSY, on_read=None) -> None:
        self.sock = sock
        self.handled = handled
        self.busy = busy
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.sock.recv(16)
        end = time.monotonic() + self.busy
        while time.monotonic() < end:
            pass
        self.handled.append(self)
        if self.on_read is not None:
            self.on_read()

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "Busy"


class Harness:
    """`count` readable descriptors registered with `reactor`, closed (with the reactor) by the test's cleanup."""

    def __init__(self, testcase: SynchronousTestCase, reactor, count: int, **kwargs) -> None:
        self.reactor = reactor
        self.handled: list[Busy] = []
        self.readers = []
        for _ in range(count):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.sendall(b"x")
            reader = Busy(ours, self.handled, **kwargs)
            self.readers.append(reader)
            reactor.addReader(reader)
            testcase.addCleanup(ours.close)
            testcase.addCleanup(theirs.close)
        testcase.addCleanup(self.close)

    def close(self) -> None:
        self.reactor.removeAll()
        for call in self.reactor.getDelayedCalls():
            call.cancel()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def poll(self) -> None:
        """The second half of a turn of ReactorBase.mainLoop: timeout() (which files new timers), one poll."""
        self.reactor.timeout()
        self.reactor.doIteration(0)

    def turn(self) -> None:
        """One turn of the reactor's loop, as mainLoop does it: due timers, then one poll."""
        self.reactor.runUntilCurrent()
        self.poll()


class TimelyTests(SynchronousTestCase):
    def test_timer_due_mid_batch_runs_before_the_rest(self):
        """Ten 2 ms events and a timer due in 5 ms: the batch stops when the timer is due; the rest come next turn."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 10)
        fired: list[int] = []
        reactor.callLater(0.005, lambda: fired.append(len(h.handled)))
        h.poll()
        self.assertGreaterEqual(len(h.handled), 1)
        self.assertLess(len(h.handled), 10)
        self.assertEqual(fired, [])
        h.turn()
        # The timer ran before any of the events the first poll had left.
        self.assertEqual(len(fired), 1)
        self.assertLess(fired[0], 10)
        for _ in range(10):
            h.turn()
        # Every descriptor handled exactly once: none lost, none starved, none repeated.
        self.assertEqual(sorted(map(id, h.handled)), sorted(map(id, h.readers)))

    def test_twisted_epoll_handles_the_whole_batch(self):
        """The contrast: Twisted's EPollReactor handles all ten events before it looks at the timer."""
        reactor = EPollReactor()
        h = Harness(self, reactor, 10)
        fired: list[int] = []
        reactor.callLater(0.005, lambda: fired.append(len(h.handled)))
        h.poll()
        self.assertEqual(len(h.handled), 10)
        h.turn()
        self.assertEqual(fired, [10])

    def test_timers_scheduled_during_the_batch_do_not_cut_it_short(self):
        """Events that schedule callLater(0) (a far timer pending too) are all handled in one poll."""
        reactor = TimelyEPollReactor()
        soon: list[float] = []
        h = Harness(self, reactor, 5, busy=0.0, on_read=lambda: reactor.callLater(0, soon.append, 1))
        reactor.callLater(10, lambda: None)
        h.poll()
        self.assertEqual(len(h.handled), 5)
        h.turn()
        self.assertEqual(len(soon), 5)

    def test_without_timers_the_whole_batch_is_handled(self):
        """No timer pending: one poll handles every ready descriptor, as Twisted's does."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 5, busy=0.001)
        h.poll()
        self.assertEqual(len(h.handled), 5)


class PluginTests(SynchronousTestCase):
    def test_twistd_finds_the_reactor(self):
        """`voicecall-epoll` is among the reactors twistd offers (--help-reactors), installed from voicecall.reactor."""
        found = {r.shortName: r for r in getReactorTypes()}
        self.assertIn("voicecall-epoll", found)
        self.assertEqual(found["voicecall-epoll"].moduleName, "voicecall.reactor")
