"""
Tests for the cluster's routing (voicecall.cluster.router): the `cluster` config section, and
any node serving any request: webhooks and RPC for a call another live node owns are forwarded
to it through the store, and answered with the owner's answer.
"""
from __future__ import annotations

import json
import os
from urllib.parse import urlencode

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.fixtures import manager_rig
from tests.harness import READY, READY_TIMEOUT, Daemon, call_status, daemon_argv, eventually, event, free_port, http_client, make_workdir, rpc, serve, spawn, speech, transcript, until_state, webhook_client, workdir
from tests.test_webhook import Conn
from tests.pgserver import postgres_server
from voicecall import tap
from voicecall.client import RemoteError, connect
from voicecall.cluster.events import ClusterEvents
from voicecall.cluster.router import ForwardError, Router
from voicecall.cluster.urls import SignedUrls
from voicecall.config import ConfigError, parse_config
from voicecall.domain.pgstore import migrate
from voicecall.domain.store import CallExistsError
from voicecall.infra.pg import PgPool
from voicecall.providers.base import WebhookContext
from voicecall.providers.mock import MockProvider
from voicecall.providers.plivo import PlivoProvider
from voicecall.providers.telnyx import TelnyxProvider, encode_client_state
from voicecall.providers.twilio import TwilioProvider
from voicecall.web.limits import ScreenedSite
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.webhook import RootResource, WebhookResource, WebhookScreen
from voicecall.testing.twilio import FakeTwilio, Scenario
from twilio.request_validator import RequestValidator

ENV = {"HOME": "/h"}
TOKEN = "twilio-auth-token"
SID = "AC" + "0" * 32


class ClusterConfigTests(SynchronousTestCase):
    """The `cluster` section: nodeId, leaseSeconds, entryUrl."""

    def test_defaults(self):
        cluster = parse_config({}, ENV).cluster
        self.assertEqual((cluster.node_id, cluster.lease_seconds, cluster.entry_url), (None, 10, None))

    def test_values(self):
        cluster = parse_config({"cluster": {"nodeId": "node-a.1_x", "leaseSeconds": 4, "entryUrl": "https://voice.example.com"}}, ENV).cluster
        self.assertEqual((cluster.node_id, cluster.lease_seconds, cluster.entry_url), ("node-a.1_x", 4, "https://voice.example.com"))

    def test_bad_values(self):
        """A node id that cannot name a NOTIFY channel, a lease too short to heartbeat in, a relative URL."""
        for bad, where in (
            ({"nodeId": "a b"}, "cluster.nodeId"),
            ({"nodeId": "-a"}, "cluster.nodeId"),
            ({"nodeId": "a" * 49}, "cluster.nodeId"),
            ({"nodeId": "é"}, "cluster.nodeId"),
            ({"leaseSeconds": 2}, "cluster.leaseSeconds"),
            ({"entryUrl": "/voice"}, "cluster.entryUrl"),
            ({"nodeid": "a"}, "cluster.nodeid"),
        ):
            e = self.assertRaises(ConfigError, parse_config, {"cluster": bad}, ENV)
            self.assertEqual(len(e.problems), 1, e.problems)
            self.assertIn("$." + where + ":", e.problems[0].replace("plugins.entries.voice-call.config", "$"))


# -- the router, two nodes on one real PostgreSQL --------------------------------------------------



def soon(check, what: str = "the condition"):
    return eventually(check, 10, what)


class _Node:
    """One node's router, its handlers recording what they were asked."""

    def __init__(self, testcase, pool, node_id: str, **kwargs) -> None:
        self.asked: list[dict] = []
        self.local: set[str] = set()
        self.adopted: list[str] = []
        self.gate: Deferred | None = None
        self.can_adopt = True
        self.on_adopt = None

        async def echo(request: dict) -> dict:
            self.asked.append(request)
            if self.gate is not None:
                await self.gate
            return {"node": node_id, "echo": request}

        def adopt(call_id: str) -> Deferred:
            self.adopted.append(call_id)
            if self.on_adopt is not None:
                self.on_adopt(call_id)
            if self.can_adopt:
                self.local.add(call_id)
            return succeed(self.can_adopt)

        self.router = Router(
            reactor=reactor,
            pool=pool,
            node_id=node_id,
            lease_seconds=10,
            handlers={"rpc": echo},
            is_local=lambda ref: ref in self.local,
            adopt=adopt,
            **kwargs,
        )
        testcase.addCleanup(self.router.stop)


class RouterTests(TestCase):
    """Forwarding through the `forwards` table and NOTIFY, between two routers (two nodes)."""

    async def setUp(self) -> None:
        self.pg = postgres_server(self)
        self.url = self.pg.new_database(self)
        with psycopg.connect(self.url) as conn:
            migrate(conn)
        self.pool_a = await self.open_pool()
        self.pool_b = await self.open_pool()
        self.a = _Node(self, self.pool_a, "a", timeout=5.0)
        self.b = _Node(self, self.pool_b, "b", timeout=5.0)
        self.sql("INSERT INTO nodes (node_id, public_url, started_at, heartbeat_at) VALUES ('a', 'https://a.example', now(), now()),"
                 " ('b', 'https://b.example', now(), now()), ('dead', 'https://dead.example', now(), now() - interval '1 hour')")

    async def open_pool(self) -> PgPool:
        pool = PgPool(reactor, self.url, max_size=4)
        await pool.open()
        self.addCleanup(pool.close)
        return pool

    def sql(self, query: str, params=()) -> list:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    async def started(self, *nodes: _Node) -> None:
        for node in nodes:
            await node.router.start()
        # LISTEN is issued on the listener's own thread: wait until the server has it.
        await soon(lambda: len(self.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")) >= len(nodes))

    async def test_forward_is_answered_by_the_owner(self):
        await self.started(self.a, self.b)
        reply = await self.a.router.forward("b", "rpc", {"method": "voicecall.speak", "n": 1})
        self.assertEqual(reply, {"node": "b", "echo": {"method": "voicecall.speak", "n": 1}})
        self.assertEqual(self.b.asked, [{"method": "voicecall.speak", "n": 1}])
        await soon(lambda: self.sql("SELECT count(*) FROM forwards") == [(0,)])

    async def test_a_handler_that_raises_still_answers(self):
        await self.started(self.a)
        async def broken(request):
            raise RuntimeError("bug")

        b = Router(reactor=reactor, pool=self.pool_b, node_id="b", lease_seconds=10, handlers={"rpc": broken},
                   is_local=lambda _: False, adopt=lambda _: succeed(True))
        self.addCleanup(b.stop)
        await b.start()
        await soon(lambda: len(self.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")) >= 2)
        self.assertEqual(await self.a.router.forward("b", "rpc", {}), {"error": {"message": "the owner node failed the request"}})
        self.flushLoggedErrors(RuntimeError)

    async def test_many_forwards_at_once_each_get_their_own_reply(self):
        await self.started(self.a, self.b)
        replies = await gatherResults([Deferred.fromCoroutine(self.a.router.forward("b", "rpc", {"n": n})) for n in range(40)])
        self.assertEqual([r["echo"]["n"] for r in replies], list(range(40)))

    async def test_a_call_this_nodes_sweep_took_meanwhile_is_waited_for(self):
        """
        The single-call adoption finds the call already claimed by this node's own sweep (not
        loaded yet): the request waits for it and runs here, instead of a 500 that ends a streamed
        call whose resume Redirect it was (seen in the failover benchmark).
        """
        await self.started(self.a)
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-x', 'CAX', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dead')",
        )
        self.a.can_adopt = False

        asked: list[str] = []

        def swept(call_id: str) -> None:
            if not asked:  # the sweep's claim committed first, its loading not done: this ask fails
                self.sql("UPDATE calls SET owner_node = 'a' WHERE call_id = %s", (call_id,))
            else:  # asked again, the sweep has loaded it
                self.a.can_adopt = True
            asked.append(call_id)

        self.a.on_adopt = swept

        async def here():
            return "here"

        self.assertEqual(await self.a.router.route(["c-x"], "rpc", {}, here, lambda reply: reply), "here")
        self.assertEqual(self.a.adopted, ["c-x", "c-x"])

    async def test_each_owner_is_judged_by_its_own_lease(self):
        """A node on a 60 s lease, silent for 20 s, is alive to a node on a 10 s lease: its call is not taken."""
        self.sql("INSERT INTO nodes (node_id, public_url, started_at, heartbeat_at, lease_seconds)"
                 " VALUES ('slow', 'https://slow.example', now(), now() - interval '20 seconds', 60)")
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-slow', 'CA9', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'slow')",
        )
        owner = await self.a.router.owner(["c-slow"])
        self.assertEqual((owner.node_id, owner.alive), ("slow", True))
        self.sql("UPDATE nodes SET heartbeat_at = now() - interval '2 minutes' WHERE node_id = 'slow'")
        self.assertFalse((await self.a.router.owner(["c-slow"])).alive)

    async def test_route_local_live_dead_unknown(self):
        """Mine or unknown: run here; a live node's: forwarded; a dead node's: adopted, then run here."""
        await self.started(self.a, self.b)
        for call_id, carrier_id, owner in (("c-a", "CA1", "a"), ("c-b", "CA2", "b"), ("c-dead", "CA3", "dead")):
            self.sql(
                "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
                " started_at, metadata, owner_node) VALUES (%s, %s, 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', %s)",
                (call_id, carrier_id, owner),
            )
        self.a.local.add("c-a")

        async def here():
            return "here"

        async def route(*refs):
            return await self.a.router.route(list(refs), "rpc", {"refs": list(refs)}, here, lambda reply: reply["node"])

        self.assertEqual(await route("c-a"), "here")
        self.assertEqual(await route("CA2"), "b")  # by the carrier's id
        self.assertEqual(await route("c-b", "CA2"), "b")
        self.assertEqual(await route("nope"), "here")
        self.assertEqual(await route(), "here")
        self.assertEqual(self.a.adopted, [])
        self.assertEqual(await route("c-dead"), "here")
        self.assertEqual(self.a.adopted, ["c-dead"])
        self.assertEqual(len(self.b.asked), 2)

    async def test_a_dead_nodes_call_not_adopted_here(self):
        """Taken by a live node meanwhile: forwarded there; not takeable yet: an error (the carrier retries), never applied here."""
        await self.started(self.a, self.b)
        self.a.can_adopt = False
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-x', 'CAX', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dead')"
        )

        async def here():
            return "here"

        async def route():
            return await self.a.router.route(["c-x"], "rpc", {}, here, lambda reply: reply["node"])

        with self.assertRaises(ForwardError):
            await route()
        # Another node's sweep takes it while this one tries.
        self.a.on_adopt = lambda call_id: self.sql("UPDATE calls SET owner_node = 'b' WHERE call_id = %s", (call_id,))
        self.assertEqual(await route(), "b")

    async def test_a_call_this_node_is_adopting_is_waited_for(self):
        """Ours in the store, not held yet (this node's sweep is loading it): adoption is awaited, then run here."""
        await self.started(self.a, self.b)
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-y', 'CAY', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'a'),"
            " ('c-z', 'CAZ', 'mock', 'outbound', 'completed', true, '+1', '+2', 0, '{}', 'a')"
        )

        async def here():
            return "here"

        self.assertEqual(await self.a.router.route(["c-y"], "rpc", {}, here, lambda reply: reply["node"]), "here")
        self.assertEqual(await self.a.router.route(["c-z"], "rpc", {}, here, lambda reply: reply["node"]), "here")
        self.assertEqual(self.a.adopted, ["c-y"])
        self.assertEqual(self.b.asked, [])

    async def test_lost_inbound_claim_goes_to_the_winner(self):
        await self.started(self.a, self.b)

        async def claimed_by_b():
            raise CallExistsError("c-9", "b")

        self.assertEqual(await self.a.router.route(["CA9"], "rpc", {"x": 1}, claimed_by_b, lambda r: r["node"]), "b")

    async def test_an_owner_that_does_not_answer_times_out(self):
        """A forward to a node that never answers fails after its time limit and leaves no row."""
        await self.started(self.a, self.b)
        self.b.gate = Deferred()
        self.addCleanup(lambda: self.b.gate.called or self.b.gate.callback(None))
        router = Router(reactor=reactor, pool=self.pool_a, node_id="a2", lease_seconds=10, handlers={}, is_local=lambda _: False,
                        adopt=lambda _: succeed(None), timeouts={"rpc": 0.5})
        started = reactor.seconds()
        with self.assertRaises(ForwardError) as e:
            await router.forward("b", "rpc", {})
        self.assertIn("did not answer", str(e.exception))
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        await soon(lambda: self.sql("SELECT count(*) FROM forwards WHERE from_node = 'a2'") == [(0,)])

    async def test_requests_sent_while_the_owner_was_not_listening_are_served_when_it_listens(self):
        await self.started(self.a)
        forward = Deferred.fromCoroutine(self.a.router.forward("b", "rpc", {"early": True}))
        await soon(lambda: self.sql("SELECT count(*) FROM forwards") == [(1,)])
        await self.started(self.b)  # its first LISTEN re-reads what is addressed to it
        self.assertEqual((await forward)["echo"], {"early": True})

    async def test_waiting_forwards_are_bounded(self):
        await self.started(self.a, self.b)
        self.b.gate = Deferred()
        router = Router(reactor=reactor, pool=self.pool_a, node_id="a3", lease_seconds=10, handlers={}, is_local=lambda _: False,
                        adopt=lambda _: succeed(None), max_pending=2, timeout=5.0)
        await router.start()
        self.addCleanup(router.stop)
        first = [Deferred.fromCoroutine(router.forward("b", "rpc", {"n": n})) for n in range(2)]
        with self.assertRaises(ForwardError) as e:
            await router.forward("b", "rpc", {"n": 2})
        self.assertIn("too many", str(e.exception))
        self.b.gate.callback(None)
        self.assertEqual([r["echo"]["n"] for r in await gatherResults(first)], [0, 1])

    async def test_served_requests_are_bounded(self):
        """At most max_running run at once on the owner; the rest wait their turn, none is lost."""
        self.b.router = Router(reactor=reactor, pool=self.pool_b, node_id="b", lease_seconds=10, handlers=self.b.router._handlers,
                               is_local=lambda _: False, adopt=lambda _: succeed(None), max_running=2)
        self.addCleanup(self.b.router.stop)
        self.b.gate = Deferred()
        await self.started(self.a, self.b)
        forwards = [Deferred.fromCoroutine(self.a.router.forward("b", "rpc", {"n": n})) for n in range(6)]
        await soon(lambda: len(self.b.asked) == 2)
        self.assertEqual(len(self.b.asked), 2)
        self.b.gate.callback(None)
        self.assertEqual(sorted(r["echo"]["n"] for r in await gatherResults(forwards)), list(range(6)))


    async def test_a_third_node_that_took_the_call_gets_it(self):
        """The owner dies during a forward and a third live node adopts the call: forwarded there, once."""
        await self.started(self.a, self.b)
        self.sql("INSERT INTO nodes (node_id, public_url, started_at, heartbeat_at) VALUES ('dying', 'https://d.example', now(), now())")
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-1', 'CA1', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dying')"
        )
        a = _Node(self, self.pool_a, "a2", timeout=1.0)
        await a.router.start()

        async def here():
            return "here"

        reactor.callLater(0.3, lambda: self.sql("UPDATE calls SET owner_node = 'b' WHERE call_id = 'c-1';"
                                                 " UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE node_id = 'dying'"))
        self.assertEqual(await a.router.route(["c-1"], "rpc", {"x": 1}, here, lambda r: r["node"]), "b")
        self.assertEqual((a.adopted, [q for q in self.b.asked]), ([], [{"x": 1}]))

    async def test_a_forward_to_a_node_seen_dead_fails_at_once_and_is_routed_again(self):
        """recheck() (each heartbeat, each join or leave) fails the forwards to a node no longer live, long before their limit."""
        await self.started(self.a, self.b)
        self.sql("INSERT INTO nodes (node_id, public_url, started_at, heartbeat_at) VALUES ('dying', 'https://d.example', now(), now())")
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-1', 'CA1', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dying'),"
            " ('c-2', 'CA2', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dying')"
        )
        a = _Node(self, self.pool_a, "a2", timeout=600.0)
        await a.router.start()

        async def here():
            return "here"

        first = Deferred.fromCoroutine(a.router.route(["c-1"], "rpc", {"n": 1}, here, lambda r: r["node"]))
        await soon(lambda: self.sql("SELECT count(*) FROM forwards WHERE to_node = 'dying'") == [(1,)])
        await a.router.recheck()  # still live: nothing happens
        self.assertFalse(first.called)
        # It dies; another node takes its call: the waiting forward goes there at once.
        self.sql("UPDATE calls SET owner_node = 'b' WHERE call_id = 'c-1'; UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE node_id = 'dying'")
        await a.router.recheck()
        self.assertEqual(await first, "b")
        # Seen dead in a heartbeat's snapshot (the live nodes' ids): its call is adopted here.
        self.sql("UPDATE nodes SET heartbeat_at = now() WHERE node_id = 'dying'")
        second = Deferred.fromCoroutine(a.router.route(["c-2"], "rpc", {"n": 2}, here, lambda r: r["node"]))
        await soon(lambda: self.sql("SELECT count(*) FROM forwards WHERE to_node = 'dying'") == [(1,)])
        self.sql("UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE node_id = 'dying'")
        await a.router.recheck({"a", "b", "a2"})
        self.assertEqual(await second, "here")
        self.assertEqual(a.adopted, ["c-2"])
        await soon(lambda: self.sql("SELECT count(*) FROM forwards") == [(0,)])

    async def test_time_limits_by_method(self):
        """A continue waits as long as its turn may; any other command (and a webhook) gets a short limit."""
        await self.started(self.a, self.b)
        self.b.gate = Deferred()
        self.addCleanup(lambda: self.b.gate.called or self.b.gate.callback(None))
        router = Router(reactor=reactor, pool=self.pool_a, node_id="a2", lease_seconds=10, handlers={}, is_local=lambda _: False,
                        adopt=lambda _: succeed(None), timeouts={"rpc": 0.5, "voicecall.continue": 60.0})
        await router.start()
        self.addCleanup(router.stop)
        turn = Deferred.fromCoroutine(router.forward("b", "rpc", {"method": "voicecall.continue"}))
        with self.assertRaises(ForwardError):
            await router.forward("b", "rpc", {"method": "voicecall.end"})
        self.assertFalse(turn.called)
        self.b.gate.callback(None)
        self.assertEqual((await turn)["echo"], {"method": "voicecall.continue"})

    async def test_a_call_the_receiver_is_still_adopting_is_waited_for(self):
        """Forwarded to a node that claimed the call and is loading it: the request runs once its adoption is done."""
        await self.started(self.a, self.b)
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-1', 'CA1', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'b')"
        )
        loading: Deferred = Deferred()
        adopt = self.b.router._adopt
        self.b.router._adopt = lambda call_id: loading.addCallback(lambda _: adopt(call_id))
        reply = Deferred.fromCoroutine(self.a.router.forward("b", "rpc", {"n": 1}, ["CA1"]))
        await soon(lambda: self.b.adopted or loading.callbacks, "b to wait for its adoption")
        self.assertEqual(self.b.asked, [])
        loading.callback(None)
        self.assertEqual((await reply)["echo"], {"n": 1})
        self.assertEqual(self.b.adopted, ["c-1"])

    async def test_a_request_given_up_does_not_cancel_an_adoption(self):
        """The caller of a request waiting for an adoption goes away (its connection closed): the adoption goes on."""
        await self.started(self.a)
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-1', 'CA1', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'dead')"
        )
        adoption: Deferred = Deferred()
        router = Router(reactor=reactor, pool=self.pool_a, node_id="a2", lease_seconds=10, handlers={}, is_local=lambda _: False,
                        adopt=lambda _: adoption)

        async def here():
            return "here"

        asked = Deferred.fromCoroutine(router.route(["c-1"], "rpc", {}, here, lambda r: r))
        await soon(lambda: adoption.callbacks, "the adoption awaited")
        asked.cancel()
        self.failureResultOf(asked)
        self.assertFalse(adoption.called)
        adoption.callback(True)

    async def test_a_call_the_receiver_does_not_hold_is_sent_back(self):
        """Forwarded to a node the call is not (or no longer) on: not run there; the sender routes it again."""
        await self.started(self.a, self.b)
        self.sql(
            "INSERT INTO calls (call_id, provider_call_id, provider, direction, state, terminal, from_number, to_number,"
            " started_at, metadata, owner_node) VALUES ('c-1', 'CA1', 'mock', 'outbound', 'active', false, '+1', '+2', 0, '{}', 'a')"
        )
        with self.assertRaises(ForwardError) as e:
            await self.a.router.forward("b", "rpc", {"n": 1}, ["c-1"])
        self.assertIn("does not hold the call", str(e.exception))
        self.assertEqual(self.b.asked, [])

    async def test_a_forward_its_sender_cancels_is_cancelled_on_the_owner(self):
        await self.started(self.a, self.b)
        self.b.gate = Deferred()
        forward = Deferred.fromCoroutine(self.a.router.forward("b", "rpc", {"n": 1}))
        await soon(lambda: self.b.asked, "b to run it")
        forward.cancel()
        self.failureResultOf(forward)
        await soon(lambda: self.b.gate.called, "the request on b cancelled")
        self.assertEqual(self.b.router._serving, {})
        await soon(lambda: self.sql("SELECT count(*) FROM forwards") == [(0,)])


class CallRefsTests(SynchronousTestCase):
    """Each carrier adapter names the call a request concerns without parsing it for effect."""

    def ctx(self, body: bytes, query: dict | None = None, content_type: str = "application/x-www-form-urlencoded") -> WebhookContext:
        return WebhookContext(method="POST", path="/voice/webhook", path_and_query="/voice/webhook", query=query or {},
                              headers={"content-type": content_type}, raw_body=body, remote_ip="127.0.0.1", url="https://a.example/voice/webhook")

    def test_twilio(self):
        provider = TwilioProvider(http=None, clock=Clock(), account_sid="AC" + "0" * 32, auth_token="t")
        self.assertEqual(provider.call_refs(self.ctx(b"CallSid=CA1&CallStatus=ringing", {"callId": "c-1"})), ("c-1", "CA1"))
        self.assertEqual(provider.call_refs(self.ctx(b"CallSid=CA1")), ("CA1",))
        self.assertEqual(provider.call_refs(self.ctx(b"\xff\xfe")), ())

    def test_plivo(self):
        provider = PlivoProvider(http=None, clock=Clock(), auth_id="MA1", auth_token="t")
        self.assertEqual(provider.call_refs(self.ctx(b"CallUUID=u1&RequestUUID=r1", {"callId": "c-1"})), ("c-1", "u1", "r1"))

    def test_telnyx(self):
        provider = TelnyxProvider(http=None, clock=Clock(), api_key="k", connection_id="c", public_key=None)
        body = json.dumps({"data": {"event_type": "call.answered", "payload": {"call_control_id": "v3:x", "client_state": encode_client_state("c-1")}}})
        self.assertEqual(provider.call_refs(self.ctx(body.encode(), content_type="application/json")), ("c-1", "v3:x"))
        self.assertEqual(provider.call_refs(self.ctx(b"[1]", content_type="application/json")), ())

    def test_mock(self):
        provider = MockProvider(clock=Clock())
        body = json.dumps({"events": [{"type": "call.speech", "callId": "c-1"}, {"type": "call.ended", "callId": "c-1"}, {"type": "call.ended", "callId": "c-2"}]})
        self.assertEqual(provider.call_refs(self.ctx(body.encode(), content_type="application/json")), ("c-1", "c-2"))
        self.assertEqual(provider.call_refs(self.ctx(b"nope")), ())


class ClusterEventsTests(TestCase):
    """Every node's call events reach a subscriber on any node, once each."""

    async def setUp(self) -> None:
        self.pg = postgres_server(self)
        self.url = self.pg.new_database(self)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE events (seq BIGSERIAL PRIMARY KEY, json TEXT NOT NULL)")
        self.pool = PgPool(reactor, self.url, max_size=2)
        await self.pool.open()
        self.addCleanup(self.pool.close)
        self.manager_listeners: list = []

        def events_after(seq: int, limit: int) -> Deferred:
            def read(conn):
                rows = conn.execute("SELECT seq, json FROM events WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit))
                return [dict(json.loads(body), seq=s) for s, body in rows]

            return self.pool.run(read)

        def last_events(n: int) -> Deferred:
            return self.pool.run(lambda conn: [{"seq": s} for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT %s", (n,))])

        def local_subscribe(listener):
            self.manager_listeners.append(listener)
            return lambda: self.manager_listeners.remove(listener)

        self.insert({"type": "call.state", "callId": "before", "at": 0})  # history: not replayed
        self.feed = ClusterEvents(pool=self.pool, local_subscribe=local_subscribe, events_after=events_after, last_events=last_events)
        await self.feed.start()
        self.addCleanup(self.feed.stop)
        self.got: list[dict] = []
        self.feed.subscribe(self.got.append)
        await soon(lambda: self.pg_listening(), "LISTEN voicecall_events")

    def pg_listening(self) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'").fetchall())

    def insert(self, event: dict, seq: int | None = None) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            if seq is None:
                (seq,) = conn.execute("INSERT INTO events (json) VALUES (%s) RETURNING seq", (json.dumps(event),)).fetchone()
            else:
                conn.execute("INSERT INTO events (seq, json) VALUES (%s, %s)", (seq, json.dumps(event)))
            conn.execute("SELECT pg_notify('voicecall_events', %s)", (str(seq),))

    async def test_local_and_remote_events_once_each(self):
        mine = {"type": "call.state", "callId": "c-a", "at": 1, "state": "ringing"}
        for listener in self.manager_listeners:
            listener(mine)
        self.assertEqual(self.got, [mine])  # at once, not after a round trip
        self.insert(mine)  # its row: skipped
        theirs = {"type": "call.transcript", "callId": "c-b", "at": 2, "text": "hi"}
        self.insert(theirs)
        await soon(lambda: len(self.got) == 2, "the other node's event")
        self.assertEqual(self.got, [mine, theirs])

    async def test_a_seq_committed_late_is_read(self):
        self.insert({"type": "a", "callId": "x", "at": 1}, seq=100)
        await soon(lambda: len(self.got) == 1, "seq 100")
        self.insert({"type": "b", "callId": "x", "at": 2}, seq=50)
        await soon(lambda: len(self.got) == 2, "seq 50, committed after 100")
        self.assertEqual([e["type"] for e in self.got], ["a", "b"])


class SignedUrlsTests(SynchronousTestCase):
    """
    A node accepts a webhook signed for its own publicUrl, the entry URL or another node's
    publicUrl (the list `SignedUrls` keeps), and nothing else, whatever Host the request names.
    """

    def setUp(self):
        rig = manager_rig(self, lambda clock: TwilioProvider(http=None, clock=clock, account_sid="AC" + "0" * 32,
                                                             auth_token=TOKEN, public_url="https://a.example/voice/webhook"))
        self.others = ["https://voice.example", "https://b.example"]
        resource = WebhookResource(
            provider=rig.provider,
            manager=rig.manager,
            reconstruct_url=lambda pq, headers, ip: "https://" + headers["host"] + pq,
            path="/voice/webhook",
            replays=ReplayCache(rig.clock),
            responses=ResponseCache(rig.clock),
            signed_urls=self.signed_urls,
        )
        self.site = ScreenedSite(RootResource(webhook=resource), clock=rig.clock,
                                 screen=WebhookScreen(provider=rig.provider, path="/voice/webhook", skip_signature=False))

    def post(self, signed_for: str, host: str = "a.example", sid: str = "CA1") -> int:
        path = "/voice/webhook?type=status"
        params = {"CallSid": sid, "CallStatus": "completed", "Direction": "outbound-api"}
        signature = RequestValidator(TOKEN).compute_signature(signed_for + path, params)
        body = urlencode(params).encode()
        conn = Conn(self.site, "203.0.113.7")
        self.addCleanup(conn.lose)
        conn.send(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\nX-Twilio-Signature: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), signature.encode(), len(body), body)
        )
        return conn.response().status

    def signed_urls(self, host: str | None = None) -> list[str]:
        self.asked_for.append(host)
        return self.others

    def test_own_entry_and_other_nodes_urls(self):
        self.asked_for: list = []
        self.assertEqual(self.post("https://a.example"), 200)
        self.assertEqual(self.post("https://voice.example", host="voice.example", sid="CA2"), 200)
        self.assertEqual(self.post("https://b.example", host="b.example", sid="CA3"), 200)
        # The list is asked only when this node's own URL fails, with the request's Host, which
        # SignedUrls tries first.
        self.assertEqual(self.asked_for, ["voice.example", "b.example"])

    def test_nothing_else(self):
        """A URL no node has, even with the Host header naming it."""
        self.asked_for = []
        self.assertEqual(self.post("https://evil.example", host="evil.example"), 401)
        self.others = []
        self.assertEqual(self.post("https://b.example", host="b.example"), 401)

    def test_the_list(self):
        """SignedUrls: the entry URL, then each node's URL from the store, without this node's own."""
        pool = _RowsPool([("https://a.example",), ("https://b.example",), ("https://c.example",)])
        urls = SignedUrls(pool=pool, own="https://a.example", entry="https://voice.example")
        self.assertEqual(urls(), ("https://voice.example",))
        urls.refresh()
        self.assertEqual(urls(), ("https://voice.example", "https://b.example", "https://c.example"))


class _RowsPool:
    """A PgPool stand-in whose run() hands fn a connection returning `rows` for any query."""

    def __init__(self, rows):
        self.rows = rows

    def run(self, fn):
        rows = self.rows

        class Conn:
            def execute(self, query, params=()):
                return rows

        return succeed(fn(Conn()))


# -- end to end: daemons on one PostgreSQL ---------------------------------------------------------


async def start_node(testcase, store_url: str, node_id: str, **config):
    """A daemon in this process on the PostgreSQL store at `store_url`; returns (service, rpc client, webhook URL)."""
    directory = workdir(testcase)
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}/voice/webhook"
    config = {
        "provider": "mock",
        "store": store_url,
        "publicUrl": webhook_url,
        "serve": {"port": port},
        "cluster": {"nodeId": node_id, "leaseSeconds": 3},
        "outbound": {"defaultMode": "conversation"},
        **config,
    }
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump(config, f)
    options = tap.Options()
    options.parseOptions(["--config", path, "--rpc", f"unix:{directory}/rpc.sock"])
    service = tap.makeService(options, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    await service.ready
    client = await connect(reactor, f"{directory}/rpc.sock")
    testcase.addCleanup(client.transport.loseConnection)
    return service, client, webhook_url


class ClusterRouteE2ETests(TestCase):
    """Two daemons on one PostgreSQL, the mock carrier's webhooks and RPC sent to the "wrong" node."""

    timeout = 60

    async def setUp(self) -> None:
        self.url = postgres_server(self).new_database(self)
        self.web = webhook_client(self)

    async def nodes(self, **config):
        a = await start_node(self, self.url, "node-a", **config)
        b = await start_node(self, self.url, "node-b", **config)
        return a, b

    async def test_rpc_and_webhooks_on_the_other_node(self):
        (_, rpc_a, _), (_, rpc_b, hook_b) = await self.nodes(maxConcurrentCalls=4)
        seen: list[dict] = []
        subscriber = await connect(reactor, rpc_b.transport.getPeer().name, on_notification=lambda method, params: seen.append(params))
        self.addCleanup(subscriber.transport.loseConnection)
        await subscriber.call("voicecall.subscribe", {})
        call_id = (await rpc_a.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]

        # The carrier's answer reaches B: B forwards it to A, which greets.
        answered = await self.web.post(hook_b, event("call.answered", call_id))
        self.assertEqual(answered.code, 200, answered.body)
        await until_state(rpc_b, call_id, "listening", timeout=10)  # B reads the shared store

        # A continue asked on B waits on A for the caller; the caller's words reach B.
        turn = rpc_b.call("voicecall.continue", {"callId": call_id, "message": "How are you?"})
        await eventually(lambda: self.said(rpc_b, call_id, "How are you?"), 10, "the prompt spoken by A")
        self.assertFalse(turn.called)
        spoken = await self.web.post(hook_b, speech(call_id, "Fine thanks"))
        self.assertEqual(spoken.code, 200, spoken.body)
        self.assertEqual(await turn, {"success": True, "transcript": "Fine thanks"})

        self.assertEqual(await rpc_b.call("voicecall.speak", {"callId": call_id, "message": "Bye now"}), {"success": True})
        self.assertEqual(await rpc_b.call("voicecall.end", {"callId": call_id}), {"success": True})
        record = await call_status(rpc_a, call_id)
        self.assertEqual((record["state"], record["endReason"]), ("hangup-bot", "hangup-bot"))
        self.assertEqual(transcript(record), [("bot", "Hi"), ("bot", "How are you?"), ("user", "Fine thanks"), ("bot", "Bye now")])
        # B's subscriber saw A's events, once each.
        await eventually(lambda: any(e.get("type") == "call.ended" for e in seen), 10, "the end, on B's subscription")
        said = [e["text"] for e in seen if e.get("type") == "call.transcript"]
        self.assertEqual(said, ["Hi", "How are you?", "Fine thanks", "Bye now"])

        # An error on the owner comes back as the same error.
        with self.assertRaises(RemoteError) as here:
            await rpc_a.call("voicecall.speak", {"callId": call_id, "message": "again"})
        with self.assertRaises(RemoteError) as there:
            await rpc_b.call("voicecall.speak", {"callId": call_id, "message": "again"})
        self.assertEqual((there.exception.code, str(there.exception)), (here.exception.code, str(here.exception)))

    async def said(self, rpc, call_id: str, text: str) -> bool:
        return ("bot", text) in transcript(await call_status(rpc, call_id))

    async def test_inbound_call_given_to_both_nodes_is_claimed_once(self):
        (_, rpc_a, hook_a), (_, rpc_b, hook_b) = await self.nodes(inboundPolicy="open", maxConcurrentCalls=4)
        body = event("call.initiated", "CA-in-1", direction="inbound", providerCallId="CA-in-1", **{"from": "+15550002222", "to": "+15550003333"})
        answers = await gatherResults([Deferred.fromCoroutine(self.web.post(hook, body)) for hook in (hook_a, hook_b)])
        self.assertEqual([a.code for a in answers], [200, 200], [a.body for a in answers])
        active = (await rpc_a.call("voicecall.status", {}))["calls"] + (await rpc_b.call("voicecall.status", {}))["calls"]
        self.assertEqual(len(active), 1, active)

    async def test_max_concurrent_calls_holds_across_nodes(self):
        (_, rpc_a, _), (_, rpc_b, _) = await self.nodes(maxConcurrentCalls=3)

        async def place(rpc):
            try:
                return (await rpc.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
            except Exception as e:
                return str(e)

        results = await gatherResults([Deferred.fromCoroutine(place(rpc)) for rpc in (rpc_a, rpc_b) * 4])
        placed = [r for r in results if not r.startswith("Maximum")]
        self.assertEqual(len(placed), 3, results)


    async def test_a_forwarded_callback_holding_nul_is_applied(self):
        """
        A callback whose query and text hold U+0000 reaches the owner through the store like any
        other (PostgreSQL's JSONB refuses U+0000: kept there, it failed with 500 on every retry).
        """
        (_, rpc_a, _), (_, rpc_b, hook_b) = await self.nodes()
        call_id = (await rpc_a.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
        answered = await self.web.post(hook_b, event("call.answered", call_id))
        self.assertEqual(answered.code, 200, answered.body)
        await until_state(rpc_b, call_id, "listening", timeout=10)
        spoken = await self.web.post(hook_b + "?note=%00", speech(call_id, "nul\x00here"))
        self.assertEqual(spoken.code, 200, spoken.body)
        await eventually(lambda: self.heard(rpc_a, call_id), 10, "the words on the owner")

    async def heard(self, rpc, call_id: str) -> bool:
        return any(who == "user" and text.startswith("nul") for who, text in transcript(await call_status(rpc, call_id)))

    async def test_a_replay_is_answered_where_it_arrives(self):
        """A captured callback replayed to a node that does not own its call costs no forward: answered there."""
        (_, rpc_a, _), (service_b, _, hook_b) = await self.nodes()
        call_id = (await rpc_a.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
        body = event("call.answered", call_id)
        first = await self.web.post(hook_b, body)
        self.assertEqual(first.code, 200, first.body)
        router_b = service_b._routing[0]
        sent = router_b.counts["sent"]
        for _ in range(3):
            again = await self.web.post(hook_b, body)
            self.assertEqual((again.code, again.body), (first.code, first.body))
        self.assertEqual(router_b.counts["sent"], sent)

    async def test_a_continue_cancelled_on_the_node_it_reached_is_cancelled_on_the_owner(self):
        """The gateway's connection to B closes during a continue B forwarded to A: A stops waiting, so the gateway's retry works."""
        (_, rpc_a, hook_a), (_, rpc_b, hook_b) = await self.nodes()
        call_id = (await rpc_a.call("voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
        self.assertEqual((await self.web.post(hook_a, event("call.answered", call_id))).code, 200)
        await until_state(rpc_a, call_id, "listening", timeout=10)
        gateway = await connect(reactor, rpc_b.transport.getPeer().name)
        turn = gateway.call("voicecall.continue", {"callId": call_id, "message": "How are you?"})
        turn.addErrback(lambda f: None)  # its connection closes
        await eventually(lambda: self.said(rpc_b, call_id, "How are you?"), 10, "the prompt spoken by A")
        gateway.transport.loseConnection()
        await eventually(lambda: self.forwards() == 0, 10, "B to drop its forward")
        retry = rpc_b.call("voicecall.continue", {"callId": call_id, "message": "Still there?"})
        await eventually(lambda: retry.called or self.said(rpc_b, call_id, "Still there?"), 10, "the retry's prompt spoken by A")
        self.assertFalse(retry.called, retry)
        self.assertEqual((await self.web.post(hook_b, speech(call_id, "Yes"))).code, 200)
        self.assertEqual(await retry, {"success": True, "transcript": "Yes"})

    def forwards(self) -> int:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM forwards").fetchone()[0]


class EntryUrlTests(SynchronousTestCase):
    def test_stream_resume_uses_the_entry_url(self):
        """The way back of a dropped stream names the cluster's entry URL, which reaches any live node."""
        creds = {"twilio": {"accountSid": "AC" + "0" * 32, "authToken": TOKEN}, "fromNumber": "+15550001111"}
        cfg = parse_config({"provider": "twilio", "publicUrl": "https://a.example/voice/webhook", **creds,
                            "cluster": {"entryUrl": "https://voice.example/voice/webhook"}}, ENV)
        provider = tap.build_provider(cfg, Clock(), None)
        provider.set_webhook_url("https://a.example/voice/webhook")
        self.assertEqual(provider.resume_base_url(), "https://voice.example/voice/webhook")
        alone = tap.build_provider(parse_config({"provider": "twilio", "publicUrl": "https://a.example/voice/webhook", **creds}, ENV), Clock(), None)
        alone.set_webhook_url("https://a.example/voice/webhook")
        self.assertEqual(alone.resume_base_url(), "https://a.example/voice/webhook")


def _answers_turns(text: str):
    """The callee says `text` at each Gather of a `continue` (its action carries a turn token), nothing at others."""
    return lambda call: text if call.gathers and "turnToken=" in (call.gathers[-1].action_url or "") else None


class _ToPort:
    """An endpoint factory sending every URL's connection to one loopback port (Host and path kept)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


class ClusterTwilioE2ETests(TestCase):
    """
    Twilio's callbacks for node A's call, every one delivered to node B (as a load balancer might):
    B accepts their signatures (made for A's URL), A applies them, and Twilio gets A's TwiML.
    """

    timeout = 60

    async def test_every_callback_reaches_the_other_node(self):
        url = postgres_server(self).new_database(self)
        port_a, port_b = free_port(), free_port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        fake = FakeTwilio(reactor, SID, TOKEN, http=HTTPClient(Agent.usingEndpointFactory(reactor, _ToPort(port_b), pool=pool)),
                          scenario=Scenario(utterances=_answers_turns("I am fine"), silence=0.5))
        self.addCleanup(fake.settle)
        twilio_base = await serve(self, fake.resource())

        def node(name: str, port: int) -> dict:
            return {"provider": "twilio", "fromNumber": "+15550009999", "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
                    "publicUrl": f"https://{name}.voice.test/voice/webhook", "serve": {"port": port}}

        _, rpc_a, _ = await start_node(self, url, "node-a", **node("node-a", port_a))
        _, rpc_b, _ = await start_node(self, url, "node-b", **node("node-b", port_b))
        call_id = (await rpc_a.call("voicecall.initiate", {"to": "+15550001111", "message": "Hello there"}))["callId"]
        asked = rpc_b.call("voicecall.continue", {"callId": call_id, "message": "How are you?"})
        await eventually(lambda: asked.called, 20, f"the turn; the carrier's requests: {fake.webhooks}")
        turn = await asked
        self.assertEqual(turn, {"success": True, "transcript": "I am fine"})
        call = next(iter(fake.calls.values()))
        self.assertEqual(call.say_texts[:2], ["Hello there", "How are you?"])  # A's TwiML, served through B
        self.assertTrue(fake.webhooks)
        self.assertTrue(all(h.url.startswith("https://node-a.voice.test/") for h in fake.webhooks), [h.url for h in fake.webhooks])
        self.assertEqual({h.status for h in fake.webhooks if h.status is not None}, {200}, [(h.kind, h.status, h.body) for h in fake.webhooks])
        record = await call_status(rpc_b, call_id)
        self.assertEqual(transcript(record), [("bot", "Hello there"), ("bot", "How are you?"), ("user", "I am fine")])


class LateCallbackTests(TestCase):
    """A carrier's late callback for a call that ENDED on a node that is now dead."""

    timeout = 60

    async def test_recorded_and_acknowledged_where_it_arrives(self):
        """Recorded (not applied) by the node it reaches, as a single node records it: a 200, not 500s until the carrier gives up."""
        url = postgres_server(self).new_database(self)
        http = http_client(self)
        entry = "https://voice.test/voice/webhook"

        def node(name: str) -> dict:
            return {"provider": "twilio", "fromNumber": "+15550009999", "inboundPolicy": "open",
                    "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": "http://127.0.0.1:9"},
                    "publicUrl": f"https://{name}.voice.test/voice/webhook", "cluster": {"nodeId": name, "leaseSeconds": 3, "entryUrl": entry}}

        service_a, rpc_a, hook_a = await start_node(self, url, "node-a", **node("node-a"))
        _, rpc_b, hook_b = await start_node(self, url, "node-b", **node("node-b"))

        async def callback(hook: str, **params: str):
            form = {"AccountSid": SID, "CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550009999", "Direction": "inbound", **params}
            signature = RequestValidator(TOKEN).compute_signature(entry, form)
            body = urlencode(form).encode()
            response = await http.post(hook, data=body, headers={"Content-Type": ["application/x-www-form-urlencoded"], "X-Twilio-Signature": [signature]})
            return response.code, await response.content()

        self.assertEqual((await callback(hook_a, CallStatus="ringing"))[0], 200)
        self.assertEqual((await callback(hook_a, CallStatus="completed"))[0], 200)
        record = await call_status(rpc_a, "CA" + "1" * 32)
        self.assertEqual(record["state"], "completed")
        await service_a.stopService()  # node-a is gone (its row deleted: a dead node)
        late = await callback(hook_b, CallStatus="completed", CallDuration="7")
        self.assertEqual(late[0], 200, late[1])
        with psycopg.connect(url, autocommit=True) as conn:
            (n,) = conn.execute("SELECT count(*) FROM events WHERE call_id = %s AND type = 'call.event.late'", (record["callId"],)).fetchone()
        self.assertEqual(n, 1)
        self.assertEqual((await call_status(rpc_b, record["callId"]))["state"], "completed")


class KilledOwnerTests(TestCase):
    """Three daemons (processes) on one PostgreSQL; the one running a call is killed with -9."""

    timeout = 120

    async def node(self, store_url: str, node_id: str) -> Daemon:
        port = free_port()
        work = make_workdir(self, {"provider": "mock", "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
                                   "outbound": {"defaultMode": "conversation"}, "cluster": {"nodeId": node_id, "leaseSeconds": 3}})
        with open(work.config_path, encoding="utf-8") as f:
            written = json.load(f)
        with open(work.config_path, "w", encoding="utf-8") as f:
            json.dump({**written, "store": store_url}, f)
        process = spawn(self, [a.replace("tcp:0:", f"tcp:{port}:") for a in daemon_argv(work)], cwd=work.path)
        match = await process.wait_for_output(READY, READY_TIMEOUT, f"node {node_id}'s ready line")
        return Daemon(workdir=work, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())

    async def test_a_command_sent_at_once_to_a_third_node(self):
        """
        Sent to c just after the kill, while a's lease runs: forwarded to a, which never answers. It
        fails as soon as a heartbeat sees a dead (not at its time limit: 780 s for any command before),
        and goes where the call is adopted, here or on b.
        """
        store_url = postgres_server(self).new_database(self)
        a, b, c = [await self.node(store_url, n) for n in ("a", "b", "c")]
        call_id = (await rpc(a.rpc_path, "voicecall.initiate", {"to": "+15550001111", "message": "Hi"}))["callId"]
        answered = await webhook_client(self).post(a.webhook_url, event("call.answered", call_id))
        self.assertEqual(answered.code, 200, answered.body)
        await eventually(lambda: self.state(c, call_id), 10, "the call listening, as c reads it")
        await a.kill9()
        killed_at = reactor.seconds()
        self.assertEqual(await rpc(c.rpc_path, "voicecall.speak", {"callId": call_id, "message": "Still here"}), {"success": True})
        self.assertLess(reactor.seconds() - killed_at, 25)  # the time limit of a forwarded speak is 30 s
        with psycopg.connect(store_url, autocommit=True) as conn:
            (owner,) = conn.execute("SELECT owner_node FROM calls WHERE call_id = %s", (call_id,)).fetchone()
        self.assertIn(owner, ("b", "c"))
        self.assertEqual(await rpc(b.rpc_path, "voicecall.end", {"callId": call_id}), {"success": True})
        record = (await rpc(c.rpc_path, "voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(transcript(record), [("bot", "Hi"), ("bot", "Still here")])

    async def state(self, daemon: Daemon, call_id: str) -> bool:
        return (await rpc(daemon.rpc_path, "voicecall.status", {"callId": call_id}))["call"]["state"] == "listening"


class PlivoSignedOriginTests(SynchronousTestCase):
    """Plivo verifies against a given origin too (the cluster's other URLs), the SDK as the oracle."""

    def test_other_origin(self):
        from plivo.utils import signature_v3

        provider = PlivoProvider(http=None, clock=Clock(), auth_id="MA1", auth_token=TOKEN, public_url="https://a.example/voice/webhook")
        body = b"CallUUID=u1&CallStatus=completed"
        nonce = "12345678901234567890"
        signed = "https://b.example/voice/webhook?callId=c-1"
        base = signature_v3.construct_post_url(signed, {"CallUUID": "u1", "CallStatus": "completed"})
        signature = signature_v3.get_signature_v3(TOKEN.encode(), base.decode(), nonce.encode()).decode()
        ctx = WebhookContext(method="POST", path="/voice/webhook", path_and_query="/voice/webhook?callId=c-1", query={"callId": "c-1"},
                             headers={"content-type": "application/x-www-form-urlencoded", "x-plivo-signature-v3": signature,
                                      "x-plivo-signature-v3-nonce": nonce},
                             raw_body=body, remote_ip="127.0.0.1", url="https://b.example/voice/webhook?callId=c-1")
        self.assertFalse(provider.verify_webhook(ctx).ok)  # this node's own publicUrl
        self.assertTrue(provider.verify_webhook(ctx, "https://b.example/voice/webhook").ok)
        self.assertFalse(provider.verify_webhook(ctx, "https://c.example/voice/webhook").ok)
