"""
Node liveness and adoption (issue 16, "Node death"): a live call another node ran is re-pointed
at its adopter through the carrier's REST API (Twilio call update, Plivo transfer), with the
request shapes of the carriers' official SDKs; the fakes follow the update as the carriers do.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from urllib.parse import parse_qsl, urlsplit

from twisted.internet import reactor
import psycopg
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from voicecall import tap
from voicecall.cluster.adopt import Adopter, claim_one, claim_share
from voicecall.cluster.nodes import REPLACED, FencedCarrier, NodeIdInUse, NodeInfo, NodeRegistry
from voicecall.cluster.urls import MAX_NODES, SignedUrls
from voicecall.config import ConfigError, parse_config
from voicecall.cluster.router import Router
from voicecall.control.metrics import Metrics, VoicecallCollector
from voicecall.control.rpc import RpcMethods
from voicecall.domain.manager import CallError
from voicecall.domain.pgstore import migrate
from voicecall.domain.model import CallEvent, CallRecord, CallState, Direction, EventType
from voicecall.infra.dbwriter import StoreError
from voicecall.infra.pg import PgPool
from voicecall.providers.mock import MockProvider
from voicecall.providers.plivo import PlivoProvider
from voicecall.providers.twilio import TwilioProvider
from voicecall.testing.plivo import FakePlivo
from voicecall.testing.plivo import Scenario as PlivoScenario
from voicecall.testing.twilio import FakeTwilio, Scenario

from tests import test_manager
from tests.fixtures import build_manager, manager_rig
from tests.harness import (
    READY,
    READY_TIMEOUT,
    Daemon,
    call_record,
    daemon_argv,
    eventually,
    free_port,
    http_client,
    make_workdir,
    rpc,
    run_cli,
    serve,
    spawn,
    spawn_daemon,
    transcript,
)
from tests.pgserver import postgres_server, private_postgres_server
from tests.test_restart import StreamedCallRig, tone

SID = "AC" + "0" * 32
TOKEN = "fake-auth-token-for-tests"
PLIVO_ID = "MA" + "A" * 18
CALLEE = "+15550001234"


class _Node(Resource):
    """A node's webhook: records what reaches it and answers with a long pause (XML)."""

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict, dict]] = []  # (method, uri, headers, form)
        self._document = document

    def render(self, request):
        form = dict(parse_qsl(request.content.read().decode()))
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method.decode(), request.uri.decode(), headers, form))
        request.setHeader(b"content-type", b"application/xml")
        return self._document


TWIML_PAUSE = b'<?xml version="1.0" encoding="UTF-8"?><Response><Pause length="60"/></Response>'
PLIVO_WAIT = b'<?xml version="1.0" encoding="utf-8"?><Response><Wait length="60" /></Response>'


def _sdk_twilio_update(sid: str, **params) -> tuple[str, str, dict]:
    """The request the official Twilio SDK sends for `client.calls(sid).update(**params)`."""
    from twilio.base.version import Version  # noqa: F401 (the SDK is the oracle)
    from twilio.http.http_client import TwilioHttpClient
    from twilio.http.response import Response
    from twilio.rest import Client

    seen = {}

    class Capture(TwilioHttpClient):
        def request(self, method, url, params=None, data=None, headers=None, auth=None, **kw):
            seen.update(method=method, url=url, data=dict(data or {}))
            return Response(200, json.dumps({"sid": sid, "account_sid": SID, "status": "in-progress"}))

    Client(SID, TOKEN, http_client=Capture()).calls(sid).update(**params)
    return seen["method"], urlsplit(seen["url"]).path, seen["data"]


def _sdk_plivo_transfer(uuid: str, **params) -> tuple[str, str, dict]:
    """The request the official Plivo SDK sends for `client.calls.transfer(uuid, **params)`."""
    import plivo

    seen = {}
    client = plivo.RestClient(PLIVO_ID, TOKEN)

    def send(method, path, data=None, **kw):
        seen.update(method=method, path=path, data=data)
        return {"api_id": "x", "message": "call transferred"}

    client.request = lambda method, path, data=None, **kw: send(method, path, data)
    client.calls.transfer(uuid, **params)
    return seen["method"], "/".join(("",) + tuple(seen["path"])) + "/", seen["data"]


async def _hang_up(fake, call) -> None:
    call.hangup_by_callee()
    await fake.settle()


class TwilioRepointTests(TestCase):
    """A Twilio call placed by node A, re-pointed at node B by B's provider (a call update)."""

    timeout = 30

    async def test_update_moves_twiml_and_status_callback(self):
        http = http_client(self)
        fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(ring_after=0.01, answer_after=0.01))
        base = await serve(self, fake.resource())
        node_a, node_b = _Node(TWIML_PAUSE), _Node(TWIML_PAUSE)
        url_a = await serve(self, node_a) + "/voice/webhook"
        url_b = await serve(self, node_b) + "/voice/webhook"
        a = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_a)
        b = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_b)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        call = fake.calls[placed.provider_call_id]
        self.addCleanup(_hang_up, fake, call)
        await eventually(lambda: node_a.requests and call.status == "in-progress", 5, "the call runs A's TwiML")
        record = CallRecord(
            call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call.sid,
        )

        await b.repoint_call(record, url_b)

        update = fake.requests[-1]
        method, path, data = _sdk_twilio_update(
            call.sid, url=update.get("Url"), method="POST",
            status_callback=update.get("StatusCallback"), status_callback_method="POST",
        )
        self.assertEqual((update.method, update.path), (method, path))
        self.assertEqual(update.form_dict, data)
        self.assertTrue(update.get("Url").startswith(url_b + "?callId=c1&n="))
        self.assertEqual(update.get("StatusCallback"), url_b + "?callId=c1&type=status")
        # Twilio follows the update at once: B's TwiML, fetched with a POST signed for B's URL.
        await eventually(lambda: node_b.requests, 5, "Twilio fetches B's TwiML")
        fetch_method, uri, headers, form = node_b.requests[0]
        self.assertEqual(fetch_method, "POST")
        self.assertEqual(form["CallSid"], call.sid)
        self.assertEqual(form["CallStatus"], "in-progress")
        from twilio.request_validator import RequestValidator

        self.assertTrue(RequestValidator(TOKEN).validate(url_b.split("/voice")[0] + uri, form, headers["x-twilio-signature"]))
        # ...and the call's end is reported to B (only `completed`, as for any update).
        seen_at_a = len(node_a.requests)
        call.hangup_by_callee()
        await eventually(lambda: any(r[3].get("CallStatus") == "completed" for r in node_b.requests), 5, "B hears the end")
        self.assertEqual(len(node_a.requests), seen_at_a)
        status = next(r for r in node_b.requests if r[3].get("CallStatus") == "completed")
        self.assertEqual(status[1], "/voice/webhook?callId=c1&type=status")

    async def test_update_of_a_call_not_answered_is_refused(self):
        """Twilio cannot redirect a ringing call (21220): the adopter is told, nothing changes."""
        http = http_client(self)
        fake = FakeTwilio(reactor, SID, TOKEN, http=http, scenario=Scenario(ring_after=0.01, answer_after=30))
        base = await serve(self, fake.resource())
        node_a = _Node(TWIML_PAUSE)
        url_a = await serve(self, node_a) + "/voice/webhook"
        a = TwilioProvider(http, reactor, SID, TOKEN, base_url=base, webhook_url=url_a)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        call = fake.calls[placed.provider_call_id]
        self.addCleanup(_hang_up, fake, call)
        record = CallRecord(
            call_id="c1", provider="twilio", direction=Direction.OUTBOUND, state=CallState.RINGING,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call.sid,
        )
        from voicecall.domain.carrier import ProviderError

        with self.assertRaises(ProviderError) as caught:
            await a.repoint_call(record, "http://127.0.0.1:9/voice/webhook")
        self.assertEqual(caught.exception.code, 21220)
        self.assertEqual(call.status_callback, url_a + "?callId=c1&type=status")


class PlivoRepointTests(TestCase):
    """A Plivo call placed by node A, transferred to node B's XML by B's provider."""

    timeout = 30

    async def test_transfer_to_the_adopter(self):
        http = http_client(self)
        fake = FakePlivo(reactor, PLIVO_ID, TOKEN, http, scenario=PlivoScenario(ring_after=0.01, answer_after=0.01))
        base = await serve(self, fake.resource())
        node_a = _Node(PLIVO_WAIT)
        url_a = await serve(self, node_a) + "/voice/webhook"
        node_b = _Node(PLIVO_WAIT)
        url_b = await serve(self, node_b) + "/voice/webhook"
        a = PlivoProvider(http, reactor, PLIVO_ID, TOKEN, base_url=base, webhook_url=url_a)
        b = PlivoProvider(http, reactor, PLIVO_ID, TOKEN, base_url=base, webhook_url=url_b)
        placed = await a.initiate_call(call_id="c1", from_number="+15550000000", to_number=CALLEE, webhook_url=url_a)
        await eventually(lambda: node_a.requests, 5, "the call runs A's XML")
        call_uuid = node_a.requests[0][3]["CallUUID"]
        call = fake.calls[call_uuid] if call_uuid in fake.calls else next(iter(fake.calls.values()))
        self.addCleanup(_hang_up, fake, call)
        self.assertNotEqual(placed.provider_call_id, call_uuid)
        record = CallRecord(
            call_id="c1", provider="plivo", direction=Direction.OUTBOUND, state=CallState.ANSWERED,
            from_number="+15550000000", to_number=CALLEE, started_at=0, provider_call_id=call_uuid,
        )

        await b.repoint_call(record, url_b)

        transfer = fake.requests[-1]
        method, path, data = _sdk_plivo_transfer(call_uuid, legs="aleg", aleg_url=transfer.body["aleg_url"], aleg_method="POST")
        self.assertEqual((transfer.method, transfer.path), (method, f"/v1/Account/{PLIVO_ID}{path}"))
        data.pop("call_uuid")  # the SDK repeats the path's uuid in the body (its to_param_dict)
        self.assertEqual(transfer.body, data)
        self.assertTrue(transfer.body["aleg_url"].startswith(url_b + "?provider=plivo&flow=xml-listen&callId=c1&n="))
        await eventually(lambda: node_b.requests, 5, "Plivo fetches B's XML")
        self.assertEqual(node_b.requests[0][0], "POST")
        self.assertEqual(node_b.requests[0][3]["CallUUID"], call_uuid)


class ManagerAdoptTests(test_manager.ManagerTestsBase):
    """CallManager.adopt: the live calls of a dead node, loaded from the store, run here."""

    def dead_node_call(self, **answered):
        """A call initiated and answered by this test's manager, which then dies (node A)."""
        call_id = self.go(self.manager.initiate("+15550001234", "Hi"))
        self.event(EventType.ANSWERED, call_id, dedupe_key="ans", **answered)
        self.event(EventType.SPEECH, call_id, dedupe_key="sp1", transcript="hello", is_final=True)
        self.manager.stop()
        return call_id

    def test_adopted_call_runs_here(self):
        """The adopter holds the call with its transcript; an event A applied is not applied twice."""
        call_id = self.dead_node_call()
        adopter = self.make_manager()
        record = self.stored(call_id)
        self.manager = adopter
        adopted = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([record])))
        self.assertEqual([c.call_id for c in adopted], [call_id])
        self.assertIs(adopter.find(call_id), adopted[0])
        self.assertEqual([t.text for t in adopter.find(call_id).transcript], ["Hi", "hello"])
        self.event(EventType.SPEECH, call_id, dedupe_key="sp1", transcript="hello", is_final=True)
        self.assertEqual(len(self.stored(call_id).transcript), 2)
        self.event(EventType.SPEECH, call_id, dedupe_key="sp2", transcript="again", is_final=True)
        self.assertEqual([t.text for t in self.stored(call_id).transcript], ["Hi", "hello", "again"])

    def test_adopting_twice_keeps_the_held_call(self):
        """A call this node already holds is not taken over again (nor returned to re-point)."""
        call_id = self.dead_node_call()
        adopter = self.make_manager()
        record = self.stored(call_id)
        first = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([record])))
        again = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.assertEqual(again, [])
        self.assertIs(adopter.find(call_id), first[0])

    def test_adopted_call_keeps_its_max_duration(self):
        """A call answered 290 s before its adoption is hung up 10 s after it (reason timeout)."""
        call_id = self.dead_node_call()
        self.clock.advance(290)
        adopter = self.make_manager()
        self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.clock.advance(9.9)
        self.assertEqual(self.actions("hangup"), [])
        self.clock.advance(0.1)
        self.assertEqual(self.actions("hangup"), [("hangup", f"mock-{call_id}", "timeout")])

    def test_call_ended_at_the_carrier_is_closed(self):
        """A call that ended while its node was dead is closed (completed), not adopted."""
        call_id = self.dead_node_call(provider_call_id="mock-ended-1")
        adopter = self.make_manager()
        adopted = self.successResultOf(Deferred.fromCoroutine(adopter.adopt([self.stored(call_id)])))
        self.assertEqual(adopted, [])
        self.assertEqual(self.stored(call_id).state, CallState.COMPLETED)


# -- liveness and adoption on a real PostgreSQL ------------------------------------------------------

class _PgCase(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.pg = postgres_server(self)
        self.url = self.pg.new_database(self)
        with psycopg.connect(self.url) as conn:
            migrate(conn)  # the PostgreSQL store's schema

    async def open_pool(self) -> PgPool:
        pool = PgPool(reactor, self.url, max_size=4)
        await pool.open()
        self.addCleanup(pool.close)
        return pool

    def calls(self, *rows: tuple) -> None:
        """Store calls (call_id, owner_node, terminal, started_at), the other columns plausible."""
        for call_id, owner, terminal, started in rows:
            self.sql(
                "INSERT INTO calls (call_id, owner_node, terminal, started_at, provider, direction, state,"
                " from_number, to_number, metadata) VALUES (%s, %s, %s, %s, 'mock', 'outbound', %s, '+15550000000',"
                " '+15550001234', '{}')",
                (call_id, owner, terminal, started, "completed" if terminal else "answered"),
            )

    def sql(self, query: str, params=()) -> list:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    async def registry(self, node_id: str, lease: float = 9, **kwargs) -> NodeRegistry:
        registry = NodeRegistry(reactor, await self.open_pool(), node_id, f"https://{node_id}.example/voice/webhook", lease, **kwargs)
        await registry.start()
        self.addCleanup(registry.stop)
        return registry

    def kill(self, node_id: str, seconds_ago: int = 60) -> None:
        """`node_id` stopped beating `seconds_ago` (on the database's clock)."""
        self.sql("UPDATE nodes SET heartbeat_at = now() - make_interval(secs => %s) WHERE node_id = %s", (seconds_ago, node_id))


class NodeRegistryTests(_PgCase):
    async def test_register_beat_deregister(self):
        """A node registers at start, beats every lease/3 on the database's clock, and leaves no row at a clean stop."""
        a = await self.registry("a", lease=0.9)
        (row,) = self.sql("SELECT node_id, public_url, pid, heartbeat_at FROM nodes")
        self.assertEqual(row[:3], ("a", "https://a.example/voice/webhook", os.getpid()))
        self.kill("a", 5)
        await eventually(lambda: self.sql("SELECT heartbeat_at > now() - interval '1 second' FROM nodes")[0][0], 5, "a beat")
        (info,) = await a.nodes()
        self.assertEqual((info.node_id, info.alive, info.calls), ("a", True, 0))
        self.assertLess(info.heartbeat_age, 0.9)
        await a.stop()
        # The lease given up at once (its calls adoptable), the row kept, marked stopped.
        self.assertEqual(self.sql("SELECT node_id, pid, heartbeat_at <= now() - interval '0.9 second' FROM nodes"), [("a", None, True)])

    async def test_dead_and_gone_nodes_are_listed(self):
        """status --cluster's view: a silent node is dead; a stopped one that still owns live calls is listed too."""
        a = await self.registry("a")
        await self.registry("b")
        self.kill("b", 10)
        self.calls(("c1", "b", False, 1), ("c2", "b", True, 2), ("c3", "gone", False, 3))
        nodes = {n.node_id: n for n in await a.nodes()}
        self.assertEqual(sorted(nodes), ["a", "b", "gone"])
        self.assertTrue(nodes["a"].alive)
        self.assertEqual((nodes["b"].alive, nodes["b"].calls), (False, 1))
        self.assertGreaterEqual(nodes["b"].heartbeat_age, 10)
        self.assertEqual((nodes["gone"].alive, nodes["gone"].calls, nodes["gone"].heartbeat_age), (False, 1, None))
        self.assertEqual((nodes["b"].call_ids, nodes["gone"].call_ids), (("c1",), ("c3",)))
        self.assertEqual([n.node_id for n in a.snapshot], ["a"])  # as of a's registration: b joined after it
        self.assertEqual(nodes["b"].to_json()["alive"], False)

    async def test_joins_and_leaves_are_announced(self):
        """Another node's join and clean leave reach a registry through NOTIFY voicecall_nodes."""
        seen: list[str] = []
        await self.registry("a", on_change=seen.append)
        await eventually(lambda: "reconnect" in seen, 10, "a listens")
        b = await self.registry("b")
        await eventually(lambda: "join" in seen, 10, "b's join")
        await b.stop()
        await eventually(lambda: "leave" in seen, 10, "b's leave")

    async def test_node_id_of_a_live_node_elsewhere_is_refused(self):
        """Two processes with one node id would defeat fencing: the second, on another host, does not start."""
        self.sql("INSERT INTO nodes VALUES ('a', 'https://a.example', 'other-host', 7, now(), now())")
        registry = NodeRegistry(reactor, await self.open_pool(), "a", "https://a2.example", 9, host="this-host")
        with self.assertRaises(NodeIdInUse) as caught:
            await registry.start()
        self.assertIn("other-host", str(caught.exception))
        self.assertEqual(self.sql("SELECT public_url FROM nodes"), [("https://a.example",)])
        # The same id after its owner died (or on the same host: a restart) is taken over.
        self.kill("a")
        await registry.start()
        self.addCleanup(registry.stop)
        self.assertEqual(self.sql("SELECT public_url, host FROM nodes"), [("https://a2.example", "this-host")])

    async def test_node_id_of_a_live_process_on_this_host_is_refused(self):
        """
        Two daemons on one host share its name as node id: the second does not start while the
        first's pid runs; a crashed predecessor's fresh row (its pid gone) is taken over at once.
        """
        self.sql("INSERT INTO nodes VALUES ('a', 'https://a.example', 'this-host', 4242, now(), now())")
        running = {4242}
        registry = NodeRegistry(
            reactor, await self.open_pool(), "a", "https://a2.example", 9, host="this-host", pid=5151, pid_alive=running.__contains__
        )
        with self.assertRaises(NodeIdInUse) as caught:
            await registry.start()
        self.assertIn("another voicecall process on this host (pid 4242)", str(caught.exception))
        self.assertEqual(self.sql("SELECT pid FROM nodes"), [(4242,)])
        running.clear()  # 4242 crashed (kill -9): its row is still fresh, and taken over now
        await registry.start()
        self.addCleanup(registry.stop)
        self.assertEqual(self.sql("SELECT pid, public_url FROM nodes"), [(5151, "https://a2.example")])

    async def test_an_instance_replaced_by_another_process_is_fenced_and_lets_go(self):
        """Another process registered this node id over our row: our beats do not take it back; we hold nothing."""
        taken: list[tuple[str, str]] = []
        a = await self.registry("a", lease=0.9, held=lambda: ["c1"], on_taken=lambda call_id, owner: taken.append((call_id, owner)))
        self.assertFalse(a.fenced)
        self.sql("UPDATE nodes SET pid = pid + 1, started_at = now()")  # the other process's registration
        await eventually(lambda: a.replaced, 5, "a to find its row taken")
        self.assertTrue(a.fenced)
        self.assertEqual(taken, [("c1", REPLACED)])
        await a.stop()
        self.assertEqual(self.sql("SELECT pid = %s, heartbeat_at > now() - interval '0.9 second' FROM nodes", (os.getpid() + 1,)), [(True, True)])

    async def test_a_call_taken_is_released_at_the_next_beat(self):
        """The beat itself (on the registry's own pool) finds the calls this node runs that another node owns now."""
        taken: list[tuple[str, str]] = []
        self.calls(("c1", "a", False, 1), ("c2", "a", False, 2))
        await self.registry("a", lease=0.9, held=lambda: ["c1", "c2"], on_taken=lambda call_id, owner: taken.append((call_id, owner)))
        self.sql("UPDATE calls SET owner_node = 'c' WHERE call_id = 'c2'")  # c adopted it while a was cut off
        await eventually(lambda: taken, 5, "a beat")
        self.assertEqual(taken[0], ("c2", "c"))


class StoppedNodeTests(_PgCase):
    """A node's URL is accepted while callbacks may still be signed for it; rows of long-dead nodes go."""

    async def test_a_stopped_nodes_url_stays_accepted(self):
        """
        Removing a node (README): stopped cleanly, its calls are adopted at once, but a Plivo
        call's hangup_url (which a transfer cannot move) and a ringing Twilio call's next fetch
        still name its URL: a live node keeps accepting signatures for it.
        """
        a = await self.registry("a", lease=0.9, keep_seconds=3600)
        b = await self.registry("b", lease=0.9)
        self.calls(("c1", "b", False, 1))
        await b.stop()
        self.sql("UPDATE calls SET owner_node = 'a'")  # adopted by a
        beats = a.snapshot
        await eventually(lambda: a.snapshot is not beats, 5, "a beat")  # a beat prunes what it may
        urls = SignedUrls(pool=await self.open_pool(), own="https://a.example/voice/webhook", entry=None)
        await urls.refresh()
        self.assertEqual(urls(), ("https://b.example/voice/webhook",))
        (info,) = [n for n in await a.nodes() if n.node_id == "b"]
        self.assertEqual((info.alive, info.stopped, info.calls), (False, True, 0))

    async def test_rows_of_long_dead_nodes_owning_no_call_are_pruned(self):
        """A crash with a host-name id adds a row; it goes once it owns no live call and every call it placed has ended."""
        self.sql("INSERT INTO nodes VALUES ('old', 'https://old.example', 'h', 1, now(), now() - interval '2 hours'),"
                 " ('busy', 'https://busy.example', 'h', 2, now(), now() - interval '2 hours'),"
                 " ('recent', 'https://recent.example', 'h', 3, now(), now() - interval '1 minute')")
        self.calls(("c1", "busy", False, 1), ("c2", "old", True, 2))
        a = await self.registry("a", lease=0.9, keep_seconds=3600)
        beats = a.snapshot
        await eventually(lambda: a.snapshot is not beats, 5, "a beat")
        self.assertEqual([r[0] for r in self.sql("SELECT node_id FROM nodes ORDER BY node_id")], ["a", "busy", "recent"])

    async def test_urls_of_the_latest_beats_and_the_requests_host_first(self):
        """Past MAX_NODES rows the live nodes' URLs are kept (latest heartbeats); Host's URL is tried first."""
        self.sql("INSERT INTO nodes SELECT 'dead' || i, 'https://dead' || i || '.example/w', 'h', i, now(),"
                 " now() - make_interval(secs => 100 + i) FROM generate_series(1, %s) i", (MAX_NODES + 5,))
        self.sql("INSERT INTO nodes VALUES ('live', 'https://zz-live.example/w', 'h', 1, now(), now())")
        urls = SignedUrls(pool=await self.open_pool(), own=None, entry="https://voice.example/w")
        await urls.refresh()
        self.assertEqual(len(urls()), MAX_NODES + 1)  # the entry URL and MAX_NODES nodes'
        self.assertIn("https://zz-live.example/w", urls())
        self.assertEqual(urls("zz-live.example:443")[0], "https://zz-live.example/w")
        self.assertEqual(urls("DEAD7.example")[0], "https://dead7.example/w")
        self.assertEqual(urls("nowhere.example"), urls())


class BeatPoolTests(_PgCase):
    """The heartbeat has a connection of its own (tap.py): webhook writes queued in the store never delay it."""

    async def test_beats_while_the_store_is_saturated(self):
        cfg = parse_config({"provider": "mock", "store": self.url, "publicUrl": "https://a.example/voice/webhook",
                            "cluster": {"nodeId": "a", "leaseSeconds": 3}}, {"HOME": "/h"})
        store = tap.build_store(cfg, reactor, None)
        await store.open()
        self.addCleanup(store.close)
        rig = manager_rig(self, lambda clock: MockProvider(clock=clock))
        node, adopter = tap.build_liveness(cfg, reactor, store, rig.manager, rig.provider, lambda: None)
        # Every connection of the store's pool busy for 20 s, more work queued behind.
        blocked = [store.pool.run(lambda conn: conn.execute("SELECT pg_sleep(20)")) for _ in range(16)]
        for d in blocked:
            d.addErrback(lambda f: None)
        self.addCleanup(self.sql, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)'")
        await node.start()
        self.addCleanup(node.stop)
        self.kill("a", 2)
        await eventually(lambda: self.sql("SELECT heartbeat_at > now() - interval '1 second' FROM nodes")[0][0], 10, "a beat")
        self.assertFalse(any(d.called for d in blocked))
        self.assertFalse(node.fenced)


class ClaimTests(_PgCase):
    """The claim's SQL: a dead node's live calls are spread over the live nodes, never taken twice."""

    async def dead_node_with_calls(self, silent_for: int) -> None:
        """Live nodes a and b; node `dead`, silent for `silent_for` s, owned 40 live calls."""
        self.sql("INSERT INTO nodes VALUES ('a', '', null, null, now(), now()), ('b', '', null, null, now(), now()),"
                 " ('dead', '', null, null, now(), now() - make_interval(secs => %s))", (silent_for,))
        self.calls(*((f"c{i}", "dead", False, i) for i in range(1, 41)), ("over", "dead", True, 0), ("alive", "a", False, 0))

    async def test_parts_spread_and_never_overlap(self):
        """Each live node takes its part of a dead node's calls (about half each here), never the other's."""
        await self.dead_node_with_calls(15)
        pool_a, pool_b = await self.open_pool(), await self.open_pool()
        got_a = await pool_a.run(lambda conn: claim_share(conn, "a", 10))
        self.assertEqual(await pool_a.run(lambda conn: claim_share(conn, "a", 10)), [])  # the rest is b's
        got_b = await pool_b.run(lambda conn: claim_share(conn, "b", 10))
        ids_a, ids_b = {c for c, _ in got_a}, {c for c, _ in got_b}
        self.assertFalse(ids_a & ids_b)
        self.assertEqual(ids_a | ids_b, {f"c{i}" for i in range(1, 41)})
        self.assertTrue(10 <= len(ids_a) <= 30, len(ids_a))
        self.assertEqual({owner for _, owner in got_a + got_b}, {"dead"})
        self.assertEqual(dict(self.sql("SELECT call_id, owner_node FROM calls WHERE call_id IN ('over', 'alive')")),
                         {"over": "dead", "alive": "a"})

    async def test_concurrent_claims_never_overlap(self):
        """Two adopters claiming at once (their parts, and what is anyone's) never take one call twice."""
        await self.dead_node_with_calls(60)  # silent 3 leases and more: any node may take any of its calls
        pool_a, pool_b = await self.open_pool(), await self.open_pool()
        got_a, got_b = await gatherResults([
            pool_a.run(lambda conn: claim_share(conn, "a", 10)),
            pool_b.run(lambda conn: claim_share(conn, "b", 10)),
        ])
        ids_a, ids_b = {c for c, _ in got_a}, {c for c, _ in got_b}
        self.assertFalse(ids_a & ids_b)
        self.assertEqual(ids_a | ids_b, {f"c{i}" for i in range(1, 41)})

    async def test_a_part_not_taken_goes_to_anyone_later(self):
        """A call whose part's node never took it is anyone's once its owner has been silent 3 leases."""
        await self.dead_node_with_calls(25)
        pool = await self.open_pool()
        mine = await pool.run(lambda conn: claim_share(conn, "a", 10))
        self.assertLess(len(mine), 40)
        self.kill("dead", 31)
        rest = await pool.run(lambda conn: claim_share(conn, "a", 10))
        self.assertEqual(len(mine) + len(rest), 40)

    async def test_only_a_live_node_adopts(self):
        """A node whose own heartbeat is stale claims nothing (it may be the one that is cut off)."""
        self.sql("INSERT INTO nodes VALUES ('a', '', null, null, now(), now() - interval '1 minute')")
        self.calls(("c1", "gone", False, 0))
        pool = await self.open_pool()
        self.assertEqual(await pool.run(lambda conn: claim_share(conn, "a", 10)), [])
        self.assertEqual(await pool.run(lambda conn: claim_one(conn, "a", 10, "c1")), [("c1", "gone")])

    async def test_a_node_not_steady_leaves_a_silent_nodes_calls(self):
        """Back from a gap in its beats, a node takes a stopped node's calls, not yet a silent one's."""
        self.sql("INSERT INTO nodes VALUES ('a', '', 'h', 1, now(), now()),"
                 " ('silent', '', 'h', 2, now(), now() - interval '15 seconds'),"
                 " ('stopped', '', 'h', null, now(), now() - interval '15 seconds')")
        self.calls(("c1", "silent", False, 0), ("c2", "stopped", False, 0), ("c3", None, False, 0))
        pool = await self.open_pool()
        self.assertEqual(await pool.run(lambda conn: claim_one(conn, "a", 10, "c1", steady=False)), [])
        self.assertEqual(sorted(await pool.run(lambda conn: claim_share(conn, "a", 10, steady=False))), [("c2", "stopped"), ("c3", None)])
        self.assertEqual(await pool.run(lambda conn: claim_share(conn, "a", 10, steady=True)), [("c1", "silent")])

    async def test_each_node_is_judged_by_its_own_lease(self):
        """A node on a 3 s lease takes nothing from one on 30 s that beat 5 s ago (and sees it alive); past 30 s it does."""
        a = await self.registry("a", lease=3)
        await self.registry("b", lease=30)  # its next beat is 10 s away
        self.calls(("c1", "b", False, 0))
        self.kill("b", 5)
        pool = await self.open_pool()
        self.assertEqual(await pool.run(lambda conn: claim_share(conn, "a", 3)), [])
        self.assertEqual(await pool.run(lambda conn: claim_one(conn, "a", 3, "c1")), [])
        self.assertEqual({n.node_id: n.alive for n in await a.nodes()}, {"a": True, "b": True})
        self.kill("b", 31)
        self.assertEqual({n.node_id: n.alive for n in await a.nodes()}, {"a": True, "b": False})
        self.assertEqual(await pool.run(lambda conn: claim_share(conn, "a", 3)), [("c1", "b")])

    async def test_claim_one_leaves_a_live_owners_call(self):
        """One call is claimed only from a dead (or no) owner, or again by its adopter."""
        self.sql("INSERT INTO nodes VALUES ('a', '', null, null, now(), now()), ('b', '', null, null, now(), now())")
        self.calls(("c1", "b", False, 0), ("c2", None, False, 0), ("c3", "a", False, 0), ("c4", "gone", True, 0))
        pool = await self.open_pool()
        claims = [await pool.run(lambda conn, c=c: claim_one(conn, "a", 10, c)) for c in ("c1", "c2", "c3", "c4")]
        self.assertEqual(claims, [[], [("c2", None)], [("c3", "a")], []])


class DyingOwnerTests(_PgCase):
    """A request forwarded to an owner killed just now (still within its lease) is not lost."""

    async def test_applied_here_once_the_owner_is_dead(self):
        """
        A stream's resume Redirect reaches a survivor at once after kill -9: the owner's lease
        has not run out, so the survivor forwards it, unanswered. When the forward times out and
        the owner's lease has run out meanwhile, the survivor adopts the call and applies the
        request itself (the carrier would otherwise get a 500 and end the call).
        """
        self.sql("INSERT INTO nodes VALUES ('a', '', null, null, now(), now()), ('killed', '', null, null, now(), now())")
        self.calls(("c1", "killed", False, 0))
        adopted: list[str] = []

        def adopt(call_id: str) -> Deferred:
            adopted.append(call_id)
            return succeed(True)  # Adopter.adopt_call: the call now runs here

        async def local() -> str:
            return "applied here"

        router = Router(
            reactor=reactor, pool=await self.open_pool(), node_id="a", lease_seconds=1, handlers={},
            is_local=lambda ref: False, adopt=adopt, timeouts={"rpc": 1.5},
        )
        await router.start()
        self.addCleanup(router.stop)
        self.assertEqual(await router.route(["c1"], "rpc", {"method": "x"}, local, lambda reply: reply), "applied here")
        self.assertEqual(router.counts["failed"], 1)  # forwarded first: the owner still looked alive
        self.assertEqual(adopted, ["c1"])


class _FailingStore:
    """A store whose reads fail while `down`."""

    def __init__(self, store) -> None:
        self._store = store
        self.down = True

    def get_call(self, call_id: str):
        return fail(StoreError("store down")) if self.down else self._store.get_call(call_id)


class AdopterTests(_PgCase):
    """The Adopter: claims, loads into the manager, re-points the answered calls at this node."""

    async def setUp(self) -> None:
        await super().setUp()
        self.rig = manager_rig(self, lambda clock: MockProvider(clock=clock), max_concurrent_calls=50)
        self.pool = await self.open_pool()
        self.sql("INSERT INTO nodes VALUES ('b', '', null, null, now(), now()),"
                 " ('dead', '', null, null, now(), now() - interval '1 minute')")

    def dead_call(self, answered: bool = True) -> str:
        """A live call of node `dead` (in the manager's store, as the shared store would have it)."""
        manager = build_manager(self.rig.provider, self.rig.store, self.rig.clock, max_concurrent_calls=50)
        call_id = self.successResultOf(Deferred.fromCoroutine(manager.initiate("+15550001234", "Hi", "conversation")))
        if answered:
            now = int(self.rig.clock.seconds() * 1000)
            event = CallEvent(type=EventType.ANSWERED, call_id=call_id, id=call_id + "-ans", timestamp=now)
            self.successResultOf(Deferred.fromCoroutine(manager.process_event(event)))
        manager.stop()
        self.calls((call_id, "dead", False, 0))
        return call_id

    def adopter(self, store=None, url: str | None = "https://b.example/voice/webhook") -> Adopter:
        adopter = Adopter(self.pool, store or self.rig.store, self.rig.manager, self.rig.provider, "b", 10, lambda: url)
        self.addCleanup(adopter.stop)
        return adopter

    async def test_sweep_adopts_and_repoints(self):
        """Started (after the node restored its own calls), the adopter takes the orphans at once."""
        answered, ringing = self.dead_call(), self.dead_call(answered=False)
        adopter = self.adopter()
        self.assertEqual(await adopter.sweep(), 0)  # not started: its own calls may not be restored yet
        self.assertEqual(await adopter.start(), 2)
        self.assertEqual({c.call_id for c in self.rig.manager.active_calls()}, {answered, ringing})
        self.assertEqual(dict(self.sql("SELECT call_id, owner_node FROM calls")), {answered: "b", ringing: "b"})
        repoints = [a for a in self.rig.provider.actions if a[0] == "repoint"]
        self.assertEqual(repoints, [("repoint", f"mock-{answered}", "https://b.example/voice/webhook")])
        self.assertEqual(adopter.adopted, 2)
        self.assertEqual(await adopter.sweep(), 0)

    async def test_adopt_call_for_a_request(self):
        """The router's entry: one call of a dead owner, adopted for a request that reached this node."""
        adopter = self.adopter()
        self.assertEqual(await adopter.start(), 0)
        call_id, other = self.dead_call(), self.dead_call()
        self.assertTrue(await adopter.adopt_call(call_id))
        self.assertIsNotNone(self.rig.manager.find(call_id))
        self.assertIsNone(self.rig.manager.find(other))
        self.assertTrue(await adopter.adopt_call(call_id))  # held already: nothing more
        self.assertEqual(len([a for a in self.rig.provider.actions if a[0] == "repoint"]), 1)
        await adopter.stop()
        self.assertFalse(await adopter.adopt_call(other))  # a stopping node adopts nothing

    async def test_adopt_call_while_a_sweep_claims_it(self):
        """
        A request for a dead node's call while this node's sweep is claiming that very call (its
        row locked, so the request's SKIP LOCKED claim finds nothing): it waits for the sweep and
        runs here, instead of failing (a streamed call's resume Redirect got a 500).
        """
        call_id = self.dead_call()
        claimed = threading.Event()

        class HeldSweep:
            """The pool, the first transaction (the sweep's claim) held open until another ran (2 s at most)."""

            def __init__(self, pool) -> None:
                self.pool, self.runs = pool, 0

            def run(self, fn):
                self.runs += 1
                if self.runs == 1:
                    return self.pool.run(lambda conn: (fn(conn), claimed.wait(2))[0])
                return self.pool.run(lambda conn: (fn(conn), claimed.set())[0])

        adopter = Adopter(HeldSweep(self.pool), self.rig.store, self.rig.manager, self.rig.provider, "b", 10, lambda: None)
        self.addCleanup(adopter.stop)
        sweeping = adopter.start()
        self.assertTrue(await adopter.adopt_call(call_id))
        self.assertEqual(await sweeping, 1)
        self.assertIsNotNone(self.rig.manager.find(call_id))

    async def test_a_call_adopted_elsewhere_is_released_here(self):
        """Taken for dead (cut off longer than the lease), this node finds its call run by another: it lets go."""
        adopter = self.adopter()
        await adopter.start()
        manager = self.rig.manager
        call_id = self.successResultOf(Deferred.fromCoroutine(manager.initiate("+15550001234", "Hi", "conversation")))
        self.calls((call_id, "b", False, 0))
        now = int(self.rig.clock.seconds() * 1000)
        answered = CallEvent(type=EventType.ANSWERED, call_id=call_id, id="ans", timestamp=now)
        self.successResultOf(Deferred.fromCoroutine(manager.process_event(answered)))
        self.rig.clock.advance(5)  # the greeting has been said
        waiting = Deferred.fromCoroutine(manager.continue_call(call_id, "Still there?"))
        self.rig.clock.advance(1)
        self.assertNoResult(waiting)  # asked; waiting for the person's answer
        self.sql("DELETE FROM nodes WHERE node_id = 'b'")
        node = await self.registry("b", lease=0.9, held=lambda: [c.call_id for c in manager.active_calls()], on_taken=manager.release)
        self.sql("INSERT INTO nodes VALUES ('c', '', null, null, now(), now())")
        self.sql("UPDATE calls SET owner_node = 'c' WHERE call_id = %s", (call_id,))  # c adopted it
        beats = node.snapshot
        await eventually(lambda: node.snapshot is not beats, 5, "b's next beat")
        self.assertIsNone(manager.find(call_id))
        self.assertEqual(str(self.failureResultOf(waiting, CallError).value), "Call moved to node c")
        self.assertFalse(self.stored(call_id).is_terminal)  # not ended: c runs it
        self.assertEqual([a for a in self.rig.provider.actions if a[0] == "hangup"], [])

    def stored(self, call_id):
        return self.successResultOf(self.rig.store.get_call(call_id))

    async def test_a_failed_load_gives_the_calls_back(self):
        """Calls claimed but not loaded (the store failed) lose their owner: the next sweep takes them."""
        call_id = self.dead_call()
        store = _FailingStore(self.rig.store)
        adopter = self.adopter(store)
        self.assertEqual(await adopter.start(), 0)
        self.assertEqual(self.sql("SELECT owner_node FROM calls"), [(None,)])
        store.down = False
        self.assertEqual(await adopter.sweep(), 1)
        self.assertIsNotNone(self.rig.manager.find(call_id))


class FencingTests(_PgCase):
    """A node whose last good heartbeat is older than the lease minus a margin does not act at the carrier."""

    async def test_fenced_once_the_last_good_beat_is_old(self):
        now = [100.0]
        provider = MockProvider(clock=Clock())
        pool = PgPool(reactor, self.url, max_size=1)
        self.addCleanup(pool.close)
        registry = NodeRegistry(reactor, pool, "a", "https://a.example/w", 8, monotonic=lambda: now[0])
        self.assertTrue(registry.fenced)  # not registered yet
        await registry.start()
        self.addCleanup(registry.stop)
        carrier = FencedCarrier(provider, lambda: registry.fenced, "a")
        call = CallRecord("c1", "mock", Direction.OUTBOUND, CallState.ACTIVE, "+15550000000", CALLEE, 0, provider_call_id="mock-c1")
        now[0] += 5.9  # a beat missed: still within lease - lease/4
        self.assertFalse(registry.fenced)
        now[0] += 0.2  # SIGSTOP, a VM pause, the database cut off...
        self.assertTrue(registry.fenced)
        failure = self.failureResultOf(carrier.hangup_call(call, "hangup-bot"), CallError)
        self.assertIn("node a has no fresh heartbeat", str(failure.value))
        self.failureResultOf(carrier.repoint_call(call, "https://a.example/w"), CallError)
        self.assertEqual(provider.actions, [])  # nothing reached the carrier
        self.assertEqual(carrier.name, provider.name)  # the rest passes through


class ClusterConfigTests(SynchronousTestCase):
    def test_public_url_is_required_in_a_cluster(self):
        """A node registers its own URL (its calls' webhooks are signed for it): a PostgreSQL store needs publicUrl."""
        e = self.assertRaises(ConfigError, parse_config, {"provider": "mock", "store": "postgresql://vc@db/calls"}, {"HOME": "/h"})
        self.assertIn("publicUrl is required when the store is PostgreSQL", str(e))
        parse_config({"provider": "mock", "store": "postgresql://vc@db/calls", "publicUrl": "https://a.example/w"}, {"HOME": "/h"})

    def test_telnyx_calls_get_the_entry_url(self):
        """In a cluster a Telnyx dial names the entry URL, so its webhooks reach a live node after the dialler died."""
        from treq.testing import StubTreq

        bodies: list[dict] = []

        class Api(Resource):
            isLeaf = True

            def render_POST(self, request):
                bodies.append(json.loads(request.content.read()))
                request.setHeader(b"content-type", b"application/json")
                return json.dumps({"data": {"call_control_id": "v3:abc"}}).encode()

        telnyx = {"provider": "telnyx", "fromNumber": "+15550001111", "publicUrl": "https://a.example/voice/webhook",
                  "telnyx": {"apiKey": "KEY", "connectionId": "conn", "publicKey": "A" * 43 + "="}}
        for store, expected in (("postgresql://vc@db/calls", "https://voice.example/voice/webhook"), ("/tmp/x", "https://a.example/voice/webhook")):
            cfg = parse_config({**telnyx, "store": store, "cluster": {"entryUrl": "https://voice.example/voice/webhook"}}, {"HOME": "/h"})
            provider = tap.build_provider(cfg, Clock(), StubTreq(Api()))
            provider.initiate_call(call_id="c1", from_number="+15550001111", to_number=CALLEE, webhook_url="https://a.example/voice/webhook")
            self.assertEqual(bodies.pop()["webhook_url"], expected)


class OperationsTests(SynchronousTestCase):
    """What an operator sees of the cluster: `voicecall.cluster` (status --cluster) and the metrics."""

    NODES = [
        NodeInfo("a", "https://a.example/voice/webhook", "host-a", 10, 1_700_000_000.0, 1.25, True, 2, ("c1", "c2")).to_json(),
        NodeInfo("b", "https://b.example/voice/webhook", "host-b", 11, 1_700_000_000.0, 42.0, False, 1, ("c3",)).to_json(),
        NodeInfo("gone", "", None, None, None, None, False, 1, ("c4",)).to_json(),
    ]

    def methods(self, nodes=None) -> RpcMethods:
        return RpcMethods(manager=None, clock=Clock(), cluster_nodes=nodes)

    def test_rpc_lists_the_nodes(self):
        async def nodes():
            return self.NODES

        result = self.successResultOf(Deferred.fromCoroutine(self.methods(nodes).table()["voicecall.cluster"]({})))
        self.assertEqual(result, {"nodes": self.NODES})
        self.assertEqual(json.loads(json.dumps(result, allow_nan=False)), result)  # plain JSON, even for a gone node
        self.assertEqual(result["nodes"][2]["heartbeatAgeSeconds"], None)

    def test_rpc_on_a_single_node_says_so(self):
        failure = self.failureResultOf(Deferred.fromCoroutine(self.methods().table()["voicecall.cluster"]({})), CallError)
        self.assertIn("not a cluster", str(failure.value))

    def test_metrics_per_node(self):
        metrics = Metrics()
        cluster = {"node": "a", "nodes": self.NODES, "adopted": 3, "failedBeats": 0}
        metrics.add_collector(VoicecallCollector("twilio", list, Counter(), Counter(), cluster=lambda: cluster))
        text = metrics.render().decode()
        for line in (
            'voicecall_cluster_node_info{node="a"} 1.0',
            'voicecall_cluster_node_up{node="a"} 1.0',
            'voicecall_cluster_node_up{node="b"} 0.0',
            'voicecall_cluster_node_up{node="gone"} 0.0',
            'voicecall_cluster_node_heartbeat_age_seconds{node="b"} 42.0',
            'voicecall_cluster_node_calls{node="a"} 2.0',
            "voicecall_cluster_adopted_calls_total 3.0",
            "voicecall_cluster_heartbeat_failures 0.0",
        ):
            self.assertIn(line, text.splitlines())
        self.assertNotIn('heartbeat_age_seconds{node="gone"}', text)


# -- end to end: two daemons on one PostgreSQL, one killed mid-call ---------------------------------

LEASE = 3  # the shortest lease the config takes: adoption within LEASE + LEASE/3 + a sweep


class _NodesCase(TestCase):
    """Spawned daemons (Twilio, fake) on one PostgreSQL store."""

    timeout = 120

    async def setUp(self) -> None:
        self.pg = postgres_server(self)
        self.store_url = self.pg.new_database(self)
        await self.set_up_twilio()

    async def set_up_twilio(self) -> None:
        self.http = http_client(self)
        self.metrics_ports: dict[str, int] = {}

        answered: set[tuple[str, int]] = set()

        def person(call):
            # Silent (a long Gather) until asked the question the adopter puts; answers it once.
            said = call.say_texts[-1] if call.say_texts else ""
            if said != "Still there?" or (call.sid, len(call.say_texts)) in answered:
                return None
            answered.add((call.sid, len(call.say_texts)))
            return "yes, still here"

        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.http, scenario=Scenario(utterances=person, silence=60))
        self.twilio_base = await serve(self, self.fake.resource())
        self.addCleanup(_hang_up_all, self.fake)

    async def node(self, node_id: str, lease: int = LEASE) -> Daemon:
        process, port = self.spawn_node(node_id, lease)
        match = await process.wait_for_output(READY, READY_TIMEOUT, f"node {node_id}'s ready line")
        return Daemon(workdir=process.workdir, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())

    def spawn_node(self, node_id: str, lease: int = LEASE):
        port = free_port()
        config = {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": self.twilio_base},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "maxConcurrentCalls": 5,
            "transcriptTimeoutMs": 30000,
            "cluster": {"nodeId": node_id, "leaseSeconds": lease},
            "metrics": {"enabled": True, "port": free_port()},
        }
        work = make_workdir(self, config)
        with open(work.config_path, encoding="utf-8") as f:
            written = json.load(f)
        with open(work.config_path, "w", encoding="utf-8") as f:
            json.dump({**written, "store": self.store_url}, f)  # one shared store
        argv = [a.replace("tcp:0:", f"tcp:{port}:") for a in daemon_argv(work)]
        process = spawn(self, argv, cwd=work.path)
        process.workdir = work
        self.metrics_ports[node_id] = config["metrics"]["port"]
        return process, port

    def owner(self, call_id: str) -> str | None:
        with psycopg.connect(self.store_url, autocommit=True) as conn:
            row = conn.execute("SELECT owner_node FROM calls WHERE call_id = %s", (call_id,)).fetchone()
        return row[0] if row else None



class FailoverTests(_NodesCase):
    """`kill -9` of the node running a call: a live node adopts it, Twilio is re-pointed, the call goes on."""

    async def test_kill9_mid_call(self):
        a, b = await self.node("a"), await self.node("b")
        placed = await rpc(a.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hello from A", "mode": "conversation"})
        call_id = placed["callId"]
        await eventually(lambda: _greeted(a.rpc_path, call_id), 15, "the greeting said on A")
        (fake_call,) = self.fake.calls.values()
        self.assertEqual(self.owner(call_id), "a")

        await a.kill9()
        killed_at = reactor.seconds()
        await eventually(lambda: self.owner(call_id) == "b", LEASE + 10, "b to adopt the call")
        await eventually(lambda: _runs(b.rpc_path, call_id), 10, "b to run the call")
        adopted_in = reactor.seconds() - killed_at
        self.assertLess(adopted_in, LEASE + LEASE / 3 + 3)

        # Twilio was re-pointed at B: a call update, then B's TwiML fetched.
        await eventually(lambda: any(w.url.startswith(b.webhook_url) for w in self.fake.webhooks if w.kind == "twiml"), 10, "Twilio to fetch B's TwiML")
        update = [r for r in self.fake.requests if r.path.endswith(f"/Calls/{fake_call.sid}.json") and r.get("Url")][-1]
        self.assertTrue(update.get("Url").startswith(b.webhook_url + f"?callId={call_id}"))

        # The call goes on at B with everything A acknowledged: its transcript, its turns.
        answer = await rpc(b.rpc_path, "voicecall.continue", {"callId": call_id, "message": "Still there?"})
        self.assertEqual(answer["transcript"], "yes, still here")
        record = await call_record(b.rpc_path, call_id)
        self.assertEqual(transcript(record)[:1], [("bot", "Hello from A")])
        self.assertEqual(transcript(record)[-2:], [("bot", "Still there?"), ("user", "yes, still here")])

        # What the operator sees.
        cluster = (await run_cli(self, b.workdir, "status", "--cluster")).json()
        nodes = {n["nodeId"]: n for n in cluster["nodes"]}
        self.assertEqual((nodes["a"]["alive"], nodes["a"]["calls"]), (False, 0))
        self.assertEqual((nodes["b"]["alive"], nodes["b"]["callIds"]), (True, [call_id]))
        scrape = await (await self.http.get(f"http://127.0.0.1:{self.metrics_ports['b']}/metrics")).text()
        self.assertIn('voicecall_cluster_node_up{node="a"} 0.0', scrape)
        self.assertIn("voicecall_cluster_adopted_calls_total 1.0", scrape)

        # Its end is reported to B (the update moved the status callback).
        fake_call.hangup_by_callee()
        ended = await eventually(lambda: _ended(b.rpc_path, call_id), 10, "the end, at B")
        self.assertEqual(ended["endReason"], "completed")

    async def test_clean_stop_hands_calls_over_at_once(self):
        """A node stopped cleanly deregisters: its live calls are adopted without waiting for the lease."""
        a, b = await self.node("a"), await self.node("b")
        placed = await rpc(a.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hello from A", "mode": "conversation"})
        call_id = placed["callId"]
        # (Stopped mid-greeting, A could not answer Twilio's next fetch, and Twilio would end the
        # call; in production the load balancer sends that fetch to a live node instead.)
        await eventually(lambda: _greeted(a.rpc_path, call_id), 15, "the greeting said on A")
        await a.stop()
        stopped_at = reactor.seconds()
        await eventually(lambda: self.owner(call_id) == "b", 10, "b to adopt the call")
        self.assertLess(reactor.seconds() - stopped_at, LEASE)
        await eventually(lambda: _runs(b.rpc_path, call_id), 10, "b to run the call")
        answer = await rpc(b.rpc_path, "voicecall.continue", {"callId": call_id, "message": "Still there?"})
        self.assertEqual(answer["transcript"], "yes, still here")


    async def test_sigstop_past_the_lease(self):
        """
        A node paused past its lease (SIGSTOP; a VM pause) is replaced: b adopts its call. When
        it runs again, what was queued meanwhile (here an RPC end) must not act at the carrier
        before it learns the call was taken: it is refused, then the call is released, and the
        call goes on at b.
        """
        a, b = await self.node("a"), await self.node("b")
        placed = await rpc(a.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hello from A", "mode": "conversation"})
        call_id = placed["callId"]
        await eventually(lambda: _greeted(a.rpc_path, call_id), 15, "the greeting said on A")
        (fake_call,) = self.fake.calls.values()

        a.process.send_signal(signal.SIGSTOP)
        self.addCleanup(a.process.send_signal, signal.SIGCONT)
        await eventually(lambda: self.owner(call_id) == "b", LEASE + 10, "b to adopt the call")
        await eventually(lambda: _runs(b.rpc_path, call_id), 10, "b to run the call")
        await eventually(lambda: any(w.url.startswith(b.webhook_url) for w in self.fake.webhooks if w.kind == "twiml"), 10, "Twilio at b")

        ending = Deferred.fromCoroutine(rpc(a.rpc_path, "voicecall.end", {"callId": call_id}))  # queued while a is paused
        a.process.send_signal(signal.SIGCONT)
        try:
            answer = await ending
        except Exception as e:  # refused: the JSON-RPC error
            answer = e
        await eventually(lambda: _not_running(a.rpc_path, call_id), 10, "a to release the call")
        self.assertEqual(self.owner(call_id), "b")
        if isinstance(answer, Exception):
            # Refused while a had no fresh heartbeat (a's beat had not run yet): nothing reached Twilio.
            self.assertIn("no fresh heartbeat", str(answer))
            self.assertFalse(fake_call.is_ended, f"a hung up a call b runs (end answered {answer!r})")
            reply = await rpc(b.rpc_path, "voicecall.continue", {"callId": call_id, "message": "Still there?"})
            self.assertEqual(reply["transcript"], "yes, still here")
        else:
            # a's beat ran first and released the call: the end went to its owner, b, which ended it.
            self.assertEqual(answer, {"success": True})
            ended = await call_record(b.rpc_path, call_id)
            self.assertEqual((ended["state"], ended["endReason"]), ("hangup-bot", "hangup-bot"))

    async def test_nodes_with_different_leases(self):
        """A node on a 3 s lease takes nothing from one on 12 s, which beats every 4 s; it does once that one is killed."""
        a, b = await self.node("a", lease=3), await self.node("b", lease=12)
        call_id = (await rpc(b.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hello from A", "mode": "conversation"}))["callId"]
        await eventually(lambda: _greeted(b.rpc_path, call_id), 15, "the greeting said on b")
        await deferLater(reactor, 12, lambda: None)  # three of b's beats, a dozen of a's sweeps
        self.assertEqual(self.owner(call_id), "b")
        self.assertTrue(await _runs(b.rpc_path, call_id))
        nodes = {n["nodeId"]: n["alive"] for n in (await rpc(a.rpc_path, "voicecall.cluster", {}))["nodes"]}
        self.assertEqual(nodes, {"a": True, "b": True})
        await b.kill9()
        await eventually(lambda: self.owner(call_id) == "a", 12 + 10, "a to adopt b's call, a lease of b's after it died")

    async def test_one_node_id_two_processes_on_one_host(self):
        """nodeId defaults to the host name: a second daemon on the host with a's id refuses to start, in one line."""
        a = await self.node("a")
        second, _ = self.spawn_node("a")
        await second.ended(READY_TIMEOUT)
        self.assertNotEqual(second.exit_code, 0)
        pid = a.process.transport.pid
        self.assertIn(
            f"voicecall failed to start: cluster node id 'a' is in use by another voicecall process on this host (pid {pid})",
            second.stderr,
        )
        self.assertNotIn("Traceback", second.stdout + second.stderr)
        self.assertTrue(await _not_running(a.rpc_path, "none"))  # a serves on
        with psycopg.connect(self.store_url, autocommit=True) as conn:
            self.assertEqual(conn.execute("SELECT pid FROM nodes").fetchall(), [(pid,)])


class OutageTests(_NodesCase):
    """
    PostgreSQL down for a while, every heartbeat failing at once: when it is back no node takes a
    call from another (each had a lease to beat again first); a node that really died still loses
    its calls.
    """

    timeout = 180

    async def setUp(self) -> None:
        self.server = private_postgres_server(self)
        await deferToThread(self.server.start)
        self.pg = self.server
        self.store_url = self.server.new_database(self)
        await self.set_up_twilio()

    async def outage(self, seconds: float) -> None:
        await deferToThread(self.server.stop)
        await deferLater(reactor, seconds, lambda: None)
        await deferToThread(self.server.start)

    async def test_an_outage_moves_no_call(self):
        a, b = await self.node("a"), await self.node("b")
        calls = {}
        for node in (a, b):
            placed = await rpc(node.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hello from A", "mode": "conversation"})
            calls[placed["callId"]] = node
            await eventually(lambda node=node, call_id=placed["callId"]: _greeted(node.rpc_path, call_id), 15, "the greeting")
        owners = {call_id: self.owner(call_id) for call_id in calls}
        self.assertEqual(sorted(owners.values()), ["a", "b"])

        for down in (LEASE * 0.7, LEASE * 2.5):  # shorter than a lease, then longer
            await self.outage(down)
            # Every node beats again, then sweeps for a few leases: nothing changes hands.
            await eventually(lambda: self.beating(a, b), 60, "both nodes to beat again")
            await deferLater(reactor, LEASE * 3, lambda: None)
            self.assertEqual({call_id: self.owner(call_id) for call_id in calls}, owners)
            for call_id, node in calls.items():
                self.assertTrue(await _runs(node.rpc_path, call_id), f"{call_id} left {owners[call_id]} after {down}s")
        for call_id, node in calls.items():  # both calls go on where they were
            answer = await rpc(node.rpc_path, "voicecall.continue", {"callId": call_id, "message": "Still there?"})
            self.assertEqual(answer["transcript"], "yes, still here")

        # A node that dies loses its call all the same, within a lease and a few seconds.
        await a.kill9()
        killed_at = reactor.seconds()
        (a_call,) = [call_id for call_id, owner in owners.items() if owner == "a"]
        await eventually(lambda: self.owner(a_call) == "b", LEASE + 10, "b to adopt a's call")
        self.assertLess(reactor.seconds() - killed_at, LEASE + LEASE / 3 + 3)

    def beating(self, *nodes) -> bool:
        """Whether every node beat within the last lease/2 (database clock)."""
        try:
            with psycopg.connect(self.store_url, autocommit=True, connect_timeout=2) as conn:
                rows = conn.execute(
                    "SELECT count(*) FROM nodes WHERE heartbeat_at > now() - make_interval(secs => %s)", (LEASE / 2,)
                ).fetchone()
        except psycopg.OperationalError:
            return False
        return rows[0] == len(nodes)


async def _not_running(rpc_path: str, call_id: str) -> bool:
    return not await _runs(rpc_path, call_id)


async def _runs(rpc_path: str, call_id: str) -> bool:
    """Whether the node on `rpc_path` runs `call_id` (one of its active calls)."""
    return call_id in [c["callId"] for c in (await rpc(rpc_path, "voicecall.status", {}))["calls"]]


class SingleNodeTests(TestCase):
    """With the SQLite store there is no cluster: no registry, nothing adopted, and status --cluster says so."""

    timeout = 60

    async def test_status_cluster_on_one_node(self):
        work = make_workdir(self, {})
        await spawn_daemon(self, work)
        result = await run_cli(self, work, "status", "--cluster")
        self.assertEqual(result.code, 1)
        self.assertIn("not a cluster: the store is not PostgreSQL", result.err)
        usage = await run_cli(self, work, "status", "--cluster", "--call-id", "x")
        self.assertEqual(usage.code, 2)
        self.assertIn("--cluster lists the nodes", usage.err)


class StreamedFailoverTests(TestCase):
    """`kill -9` of the node a streamed call's media flows to: the call gets a fresh stream to the adopter."""

    timeout = 120

    async def test_kill9_mid_streamed_call(self):
        store_url = postgres_server(self).new_database(self)
        port_a, port_b = free_port(), free_port()
        rig = StreamedCallRig(self)
        base = await rig.start(port_a)
        url_b = f"http://127.0.0.1:{port_b}/voice/webhook"
        nodes = {}
        for node_id, port in (("a", port_a), ("b", port_b)):
            config = {
                **base,
                "serve": {"port": port, "bind": "127.0.0.1"},
                "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
                # The shared name, which a load balancer sends to a live node: here, b.
                "cluster": {"nodeId": node_id, "leaseSeconds": LEASE, "entryUrl": url_b},
            }
            work = make_workdir(self, config)
            with open(work.config_path, encoding="utf-8") as f:
                written = json.load(f)
            with open(work.config_path, "w", encoding="utf-8") as f:
                json.dump({**written, "store": store_url}, f)
            argv = [arg.replace("tcp:0:", f"tcp:{port}:") for arg in daemon_argv(work)]
            process = spawn(self, argv, cwd=work.path)
            match = await process.wait_for_output(READY, READY_TIMEOUT, f"node {node_id}'s ready line")
            nodes[node_id] = Daemon(workdir=work, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())
        a, b = nodes["a"], nodes["b"]

        call_id = (await rpc(a.rpc_path, "voicecall.initiate", {"to": CALLEE, "message": "Hi", "mode": "conversation"}))["callId"]
        fake_call = await rig.fake_call()
        client = await rig.attach(fake_call)
        await eventually(lambda: _said(a.rpc_path, call_id, "bot", "Hi"), 10, "the greeting")
        pending = Deferred.fromCoroutine(rpc(a.rpc_path, "voicecall.continue", {"callId": call_id, "message": "How many people?"}))
        await eventually(lambda: _said(a.rpc_path, call_id, "bot", "How many people?"), 10, "the question")
        client.talk(tone(0.6))
        self.assertEqual((await pending)["transcript"], "A table for two")
        before = transcript(await call_record(a.rpc_path, call_id))

        await a.kill9()
        killed_at = reactor.seconds()
        await client.closed  # A's socket went with it; Twilio follows the stream's way back (the entry URL)
        client = await rig.attach(fake_call)  # a fresh stream, to b
        self.assertTrue(client.url.startswith(f"ws://127.0.0.1:{port_b}/"), client.url)
        await eventually(lambda: _runs(b.rpc_path, call_id), 15, "b to run the call")
        heard = len(client.audio_received)
        await rpc(b.rpc_path, "voicecall.speak", {"callId": call_id, "message": "Sorry, where were we?"})
        await eventually(lambda: len(client.audio_received) > heard, 10, "audio on the new stream")
        self.assertLess(reactor.seconds() - killed_at, LEASE + LEASE / 3 + 5)
        self.assertFalse(fake_call.is_ended, list(fake_call.errors))

        pending = Deferred.fromCoroutine(rpc(b.rpc_path, "voicecall.continue", {"callId": call_id, "message": "What time?"}))
        await eventually(lambda: _said(b.rpc_path, call_id, "bot", "What time?"), 10, "a question on b")
        client.talk(tone(0.6))
        self.assertEqual((await pending)["transcript"], "At eight")
        after = transcript(await call_record(b.rpc_path, call_id))
        self.assertEqual(after[: len(before)], before)
        self.assertEqual(after[len(before):], [("bot", "Sorry, where were we?"), ("bot", "What time?"), ("user", "At eight")])


async def _said(rpc_path: str, call_id: str, speaker: str, text: str) -> bool:
    return (speaker, text) in transcript(await call_record(rpc_path, call_id))


async def _greeted(rpc_path: str, call_id: str) -> bool:
    """Whether the call on `rpc_path` said its greeting and listens."""
    record = await call_record(rpc_path, call_id)
    return ("bot", "Hello from A") in transcript(record) and record["state"] in ("active", "listening")


async def _ended(rpc_path: str, call_id: str) -> dict | None:
    record = await call_record(rpc_path, call_id)
    return record if record["state"] == "completed" else None


async def _hang_up_all(fake) -> None:
    for call in list(fake.calls.values()):
        call.hangup_by_callee()
    await fake.settle()
