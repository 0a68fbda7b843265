"""
Tests for voicecall.web.replay: the bounded TTL replay cache and the response cache of SPEC §9.6,
driven by a `Clock`.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from voicecall.web.replay import PRUNE_EVERY, ReplayCache, ResponseCache


class BuildError(Exception):
    """A response build that failed."""


class ReplayCacheTests(SynchronousTestCase):
    """ReplayCache tells replays from first deliveries within a bounded window."""

    def setUp(self):
        self.clock = Clock()

    def test_first_delivery_then_replay(self):
        """A key is new the first time and a replay the second."""
        cache = ReplayCache(self.clock)
        self.assertFalse(cache.check_and_record("twilio:req:a"))
        self.assertTrue(cache.check_and_record("twilio:req:a"))
        self.assertFalse(cache.check_and_record("twilio:req:b"))
        self.assertEqual(len(cache), 2)

    def test_expires_after_ttl(self):
        """A key stops being a replay once the 600 s window has passed."""
        cache = ReplayCache(self.clock)
        cache.check_and_record("k")
        self.clock.advance(599.9)
        self.assertTrue(cache.check_and_record("k"))
        self.clock.advance(0.1)
        self.assertFalse(cache.check_and_record("k"))
        self.assertTrue(cache.check_and_record("k"))

    def test_duplicate_does_not_refresh_expiry(self):
        """Seeing a replay does not extend the key's window."""
        cache = ReplayCache(self.clock, ttl=10)
        cache.check_and_record("k")
        self.clock.advance(9)
        self.assertTrue(cache.check_and_record("k"))
        self.clock.advance(1)
        self.assertFalse(cache.check_and_record("k"))

    def test_bound_evicts_oldest(self):
        """Over the cap, the oldest-inserted key is evicted and the others stay replays."""
        cache = ReplayCache(self.clock, max_entries=3)
        for key in "abcd":
            cache.check_and_record(key)
        self.assertEqual(len(cache), 3)
        self.assertTrue(cache.check_and_record("b"))
        self.assertTrue(cache.check_and_record("c"))
        self.assertTrue(cache.check_and_record("d"))
        self.assertFalse(cache.check_and_record("a"))

    def test_duplicate_does_not_refresh_order(self):
        """A replayed key keeps its insertion place, so it is still the first evicted."""
        cache = ReplayCache(self.clock, max_entries=3)
        for key in "abc":
            cache.check_and_record(key)
        self.assertTrue(cache.check_and_record("a"))
        cache.check_and_record("d")
        self.assertEqual(len(cache), 3)
        self.assertTrue(cache.check_and_record("b"))
        self.assertFalse(cache.check_and_record("a"))

    def test_default_cap(self):
        """By default at most 10,000 keys are kept."""
        cache = ReplayCache(self.clock)
        for i in range(10_050):
            cache.check_and_record(str(i))
        self.assertEqual(len(cache), 10_000)
        self.assertTrue(cache.check_and_record("10049"))
        self.assertFalse(cache.check_and_record("0"))

    def test_expired_pruned_every_64th_insert(self):
        """Expired keys are dropped on every 64th insert, not before."""
        cache = ReplayCache(self.clock, ttl=10)
        for i in range(10):
            cache.check_and_record("old%d" % (i,))
        self.clock.advance(11)
        for i in range(PRUNE_EVERY - 11):
            cache.check_and_record("new%d" % (i,))
        self.assertEqual(len(cache), PRUNE_EVERY - 1)
        cache.check_and_record("trigger")
        self.assertEqual(len(cache), PRUNE_EVERY - 10)

    def test_expired_pruned_when_over_cap(self):
        """An insert over the cap first drops expired keys, so live keys survive."""
        cache = ReplayCache(self.clock, ttl=10, max_entries=3)
        cache.check_and_record("old1")
        cache.check_and_record("old2")
        self.clock.advance(5)
        cache.check_and_record("b")
        self.clock.advance(6)
        cache.check_and_record("c")
        self.assertEqual(len(cache), 2)
        self.assertTrue(cache.check_and_record("b"))
        self.assertTrue(cache.check_and_record("c"))

    def test_discard(self):
        """A discarded key is new again; discarding an unknown key does nothing."""
        cache = ReplayCache(self.clock)
        cache.check_and_record("k")
        cache.discard("k")
        cache.discard("unknown")
        self.assertEqual(len(cache), 0)
        self.assertFalse(cache.check_and_record("k"))
        self.assertTrue(cache.check_and_record("k"))

    def test_invalid_settings(self):
        """A non-positive TTL or cap is refused."""
        self.assertRaises(ValueError, ReplayCache, self.clock, ttl=0)
        self.assertRaises(ValueError, ReplayCache, self.clock, max_entries=0)


class ResponseCacheTests(SynchronousTestCase):
    """ResponseCache builds each key's response once and shares it."""

    def setUp(self):
        self.clock = Clock()
        self.cache = ResponseCache(self.clock)
        self.builds = []

    def builder(self, result=None):
        """A build function recording its calls, returning `result` (by default a new Deferred)."""

        def build():
            d = Deferred() if result is None else result
            self.builds.append(d)
            return d

        return build

    def test_build_then_cached(self):
        """The first asker builds; a later asker gets the cached response without a build."""
        response = (200, {}, b"OK")
        self.assertEqual(
            self.successResultOf(self.cache.get_or_build("k", self.builder(succeed(response)))),
            response,
        )
        self.assertEqual(
            self.successResultOf(self.cache.get_or_build("k", self.builder())), response
        )
        self.assertEqual(len(self.builds), 1)
        self.assertEqual(self.cache.get("k"), response)

    def test_plain_value(self):
        """A build may return a plain value."""
        self.assertEqual(self.successResultOf(self.cache.get_or_build("k", lambda: "body")), "body")
        self.assertEqual(self.cache.get("k"), "body")

    def test_in_flight_shared(self):
        """Askers during a build share it, and all get its result when it fires."""
        first = self.cache.get_or_build("k", self.builder())
        second = self.cache.get_or_build("k", self.builder())
        self.assertEqual(len(self.builds), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertIsNone(self.cache.get("k"))
        self.builds[0].callback("response")
        self.assertEqual(self.successResultOf(first), "response")
        self.assertEqual(self.successResultOf(second), "response")

    def test_askers_independent(self):
        """Callbacks of one asker do not change what another asker receives."""
        first = self.cache.get_or_build("k", self.builder())
        second = self.cache.get_or_build("k", self.builder())
        first.addCallback(lambda _: "changed")
        self.builds[0].callback("response")
        self.assertEqual(self.successResultOf(second), "response")
        self.assertEqual(self.successResultOf(first), "changed")

    def test_cancel_one_asker(self):
        """Cancelling one asker detaches it only: the build goes on for the others."""
        first = self.cache.get_or_build("k", self.builder())
        second = self.cache.get_or_build("k", self.builder())
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertFalse(self.builds[0].called)
        self.builds[0].callback("response")
        self.assertEqual(self.successResultOf(second), "response")
        self.assertEqual(self.cache.get("k"), "response")

    def test_failed_build_evicted(self):
        """A failed build fails every asker and is evicted, so the next asker builds again."""
        first = self.cache.get_or_build("k", self.builder())
        second = self.cache.get_or_build("k", self.builder())
        self.builds[0].errback(BuildError())
        self.failureResultOf(first, BuildError)
        self.failureResultOf(second, BuildError)
        self.assertIsNone(self.cache.get("k"))
        self.assertEqual(len(self.cache), 0)
        third = self.cache.get_or_build("k", self.builder(succeed("again")))
        self.assertEqual(self.successResultOf(third), "again")
        self.assertEqual(len(self.builds), 2)

    def test_raising_build_evicted(self):
        """A build that raises gives a failed Deferred and leaves nothing cached."""

        def build():
            raise BuildError()

        self.failureResultOf(self.cache.get_or_build("k", build), BuildError)
        self.assertEqual(len(self.cache), 0)

    def test_failure_with_nobody_waiting_logged(self):
        """A build failing after every asker cancelled is logged, not left unhandled."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        waiter = self.cache.get_or_build("k", self.builder())
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        self.builds[0].errback(BuildError())
        self.assertEqual(len(self.flushLoggedErrors(BuildError)), 1)
        self.assertEqual(len(observer), 1)
        self.assertEqual(len(self.cache), 0)

    def test_ttl(self):
        """A cached response lasts 600 s from when it was built, then is rebuilt."""
        self.clock.advance(100)
        self.cache.get_or_build("k", self.builder())
        self.clock.advance(50)
        self.builds[0].callback("v1")
        self.clock.advance(599)
        self.assertEqual(self.cache.get("k"), "v1")
        self.clock.advance(1)
        self.assertIsNone(self.cache.get("k"))
        d = self.cache.get_or_build("k", self.builder(succeed("v2")))
        self.assertEqual(self.successResultOf(d), "v2")
        self.assertEqual(len(self.builds), 2)

    def test_expired_rebuilt_by_get_or_build(self):
        """get_or_build rebuilds an expired response."""
        self.cache.get_or_build("k", self.builder(succeed("v1")))
        self.clock.advance(600)
        self.assertEqual(
            self.successResultOf(self.cache.get_or_build("k", self.builder(succeed("v2")))), "v2"
        )

    def test_get_missing(self):
        """get of an unknown key gives None."""
        self.assertIsNone(self.cache.get("nope"))

    def test_bound_evicts_oldest(self):
        """Over the cap the oldest-inserted response is evicted."""
        cache = ResponseCache(self.clock, max_entries=2)
        for key in "abc":
            cache.get_or_build(key, lambda key=key: key.upper())
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get("a"))
        self.assertEqual((cache.get("b"), cache.get("c")), ("B", "C"))

    def test_evicted_in_flight_still_answers(self):
        """An in-flight build evicted by the cap still answers its askers, without coming back."""
        cache = ResponseCache(self.clock, max_entries=1)
        first = cache.get_or_build("a", self.builder())
        cache.get_or_build("b", lambda: "B")
        self.builds[0].callback("A")
        self.assertEqual(self.successResultOf(first), "A")
        self.assertIsNone(cache.get("a"))
        self.assertEqual(len(cache), 1)

    def test_expired_pruned_every_64th_insert(self):
        """Expired responses are dropped on every 64th insert."""
        cache = ResponseCache(self.clock, ttl=10)
        for i in range(10):
            cache.get_or_build("old%d" % (i,), lambda: "x")
        self.clock.advance(11)
        for i in range(PRUNE_EVERY - 11):
            cache.get_or_build("new%d" % (i,), lambda: "x")
        self.assertEqual(len(cache), PRUNE_EVERY - 1)
        cache.get_or_build("trigger", lambda: "x")
        self.assertEqual(len(cache), PRUNE_EVERY - 10)

    def test_in_flight_not_pruned(self):
        """A build still in flight is not pruned as expired, however long it takes."""
        cache = ResponseCache(self.clock, ttl=10)
        waiter = cache.get_or_build("slow", self.builder())
        self.clock.advance(11)
        for i in range(PRUNE_EVERY - 1):
            cache.get_or_build("n%d" % (i,), lambda: "x")
        self.assertEqual(len(cache), PRUNE_EVERY)
        shared = cache.get_or_build("slow", self.builder())
        self.assertEqual(len(self.builds), 1)
        self.builds[0].callback("done")
        self.assertEqual(self.successResultOf(waiter), "done")
        self.assertEqual(self.successResultOf(shared), "done")

    def test_failure_passed_through(self):
        """The asker receives the build's own failure."""
        error = BuildError("boom")
        d = self.cache.get_or_build("k", lambda: fail(Failure(error)))
        self.assertIs(self.failureResultOf(d, BuildError).value, error)

    def test_invalid_settings(self):
        """A non-positive TTL or cap is refused."""
        self.assertRaises(ValueError, ResponseCache, self.clock, ttl=-1)
        self.assertRaises(ValueError, ResponseCache, self.clock, max_entries=0)
