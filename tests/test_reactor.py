"""
Tests for voicecall.infra.reactor (`twistd --reactor=voicecall-epoll`): a timer that falls due while a
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

from voicecall.infra.reactor import TimelyEPollReactor

BUSY = 0.005  # seconds each ready descriptor takes to handle
DUE = 0.02  # when the test's timer falls due: long after it is set, so that it cannot be due before the poll


class Busy:
    """
    An IReadDescriptor on one end of a socket pair: reads one byte, then keeps the CPU `busy`
    seconds. Its peer sends one byte (it is ready once) or, with `always`, plenty (it stays ready).
    """

    def __init__(self, sock: socket.socket, handled: list, busy: float = BUSY, on_read=None) -> None:
        self.sock = sock
        self.handled = handled
        self.busy = busy
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.handled.append(self)  # before the read: a second, stale call would show here too
        self.sock.recv(1)
        end = time.monotonic() + self.busy
        while time.monotonic() < end:
            pass
        if self.on_read is not None:
            self.on_read()

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "Busy"


class Harness:
    """`count` readable descriptors registered with `reactor`, closed (with the reactor) by the test's cleanup."""

    def __init__(self, testcase: SynchronousTestCase, reactor, count: int, always: bool = False, **kwargs) -> None:
        self.testcase = testcase
        self.reactor = reactor
        self.handled: list[Busy] = []
        self.readers: list[Busy] = []
        self.sockets: list[socket.socket] = []
        testcase.addCleanup(self.close)
        self.add(count, always, **kwargs)

    def add(self, count: int, always: bool = False, **kwargs) -> list[Busy]:
        added = []
        for _ in range(count):
            ours, theirs = socket.socketpair()
            self.sockets += (ours, theirs)
            ours.setblocking(False)
            theirs.sendall(b"x" * (4096 if always else 1))
            reader = Busy(ours, self.handled, **kwargs)
            added.append(reader)
            self.reactor.addReader(reader)
        self.readers += added
        return added

    def close(self) -> None:
        self.reactor.removeAll()
        for call in self.reactor.getDelayedCalls():
            call.cancel()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()
        for sock in self.sockets:
            sock.close()

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
        """Ten 5 ms events and a timer due in 20 ms: the batch stops when the timer is due; the rest come next turn."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 10)
        fired: list[int] = []
        reactor.callLater(DUE, lambda: fired.append(len(h.handled)))
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

    def test_timer_due_during_the_poll_cuts_after_one_event(self):
        """The reactor wakes (its poll waited) with ten events ready and the timer due: one event, then the timer."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 10)
        poller = reactor._poller

        class Waiting:
            """The poller, taking as long as a poll that waits until after the timer is due."""

            def poll(self, timeout, maxevents):
                time.sleep(DUE * 1.5)
                return poller.poll(0, maxevents)

            def __getattr__(self, name):
                return getattr(poller, name)

        reactor._poller = Waiting()
        fired: list[int] = []
        reactor.callLater(DUE, lambda: fired.append(len(h.handled)))
        h.poll()
        self.assertEqual(len(h.handled), 1)
        h.turn()
        self.assertEqual(fired, [1])

    def test_twisted_epoll_handles_the_whole_batch(self):
        """The contrast: Twisted's EPollReactor handles all ten events before it looks at the timer."""
        reactor = EPollReactor()
        h = Harness(self, reactor, 10)
        fired: list[int] = []
        reactor.callLater(DUE, lambda: fired.append(len(h.handled)))
        h.poll()
        self.assertEqual(len(h.handled), 10)
        h.turn()
        self.assertEqual(fired, [10])

    def test_descriptors_that_stay_ready_do_not_starve_the_others(self):
        """Three always-ready 8 ms readers ahead of five one-shot ones, a 20 ms repeating timer: all five are handled in a round."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 3, always=True, busy=0.008)
        once = h.add(5, busy=0.0)
        ticks: list[int] = []

        def tick():
            ticks.append(len(h.handled))
            reactor.callLater(DUE, tick)

        reactor.callLater(DUE, tick)
        for _ in range(12):
            h.turn()
        self.assertGreater(len(ticks), 1)  # the timer cut batches
        # Every one-shot reader once, after the first three's first reads (one round).
        self.assertEqual([h.handled.count(r) for r in once], [1] * 5)
        self.assertEqual(h.handled[:3], h.readers[:3])
        self.assertEqual(set(h.handled[3:8]), set(once))

    def test_a_timer_already_due_does_not_cut_every_event(self):
        """A zero-delay timer chain (always due): one poll still handles the whole batch, not one event per turn."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 50, busy=0.0)
        runs: list[int] = []

        def again():
            runs.append(len(h.handled))
            reactor.callLater(0, again)

        reactor.callLater(0, again)
        h.turn()
        self.assertEqual(len(h.handled), 50)

    def test_left_events_follow_what_the_timer_changed(self):
        """A reader the timer removed is not read; one whose descriptor the timer gave to another object waits for a fresh poll."""
        reactor = TimelyEPollReactor()
        h = Harness(self, reactor, 10)
        removed, replaced = h.readers[9], h.readers[8]
        successor = Busy(replaced.sock, h.handled, busy=0.0)

        def change():
            reactor.removeReader(removed)
            reactor.removeReader(replaced)
            reactor.addReader(successor)

        reactor.callLater(DUE, change)
        h.poll()
        self.assertLess(len(h.handled), 8)
        h.turn()  # the timer, then the rest of the cut batch
        self.assertNotIn(removed, h.handled)
        self.assertNotIn(replaced, h.handled)
        self.assertNotIn(successor, h.handled)
        self.assertEqual(set(h.handled), set(h.readers[:8]))
        h.turn()  # a fresh poll: the successor's descriptor is still readable
        self.assertEqual(h.handled.count(successor), 1)
        self.assertEqual(len(h.handled), 9)

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
        """`voicecall-epoll` is among the reactors twistd offers (--help-reactors), installed from voicecall.infra.reactor."""
        found = {r.shortName: r for r in getReactorTypes()}
        self.assertIn("voicecall-epoll", found)
        self.assertEqual(found["voicecall-epoll"].moduleName, "voicecall.infra.reactor")
