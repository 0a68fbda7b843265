"""
maxConcurrentCalls holds under a burst of concurrent `voicecall.initiate` requests, through
the RPC socket of an in-process daemon whose store commits on its writer thread.
"""
from __future__ import annotations

from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from voicecall.client import RemoteError

from tests.harness import free_port, start_daemon


class ConcurrentInitiateTests(TestCase):
    timeout = 30

    async def test_burst_respects_the_limit(self):
        """Of 8 initiates sent at once with room for 2, exactly 2 are placed; 6 get the SPEC error."""
        port = free_port()
        service, rpc = await start_daemon(self, {
            "provider": "mock",
            "serve": {"port": port, "bind": "127.0.0.1"},
            "maxConcurrentCalls": 2,
        })
        pending = [rpc.call("voicecall.initiate", {"to": f"+1555000{n:04d}", "message": "hi"}) for n in range(8)]
        results = await DeferredList(pending, consumeErrors=True)
        placed = [value["callId"] for ok, value in results if ok]
        refused = [value for ok, value in results if not ok]
        self.assertEqual(len(placed), 2)
        self.assertEqual(len(refused), 6)
        for failure in refused:
            failure.trap(RemoteError)
            self.assertEqual(str(failure.value), "Maximum concurrent calls (2) reached")
        self.assertEqual(sorted(c.call_id for c in service.manager.active_calls()), sorted(placed))
        status = await rpc.call("voicecall.status", {})
        self.assertEqual(len(status["calls"]), 2)
