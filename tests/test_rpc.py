"""
Tests for voicecall.control.rpc: the newline-delimited JSON-RPC 2.0 control protocol (DESIGN.md contract,
SPEC §18.2), driven over a StringTransport against a real CallManager (Clock, mock provider,
CallStore on a SynchronousWriter).
"""
from __future__ import annotations

import gc
import json
import uuid

from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.model import CallEvent, CallState
from voicecall.providers.mock import MockProvider
from voicecall.control.protocol import default_socket_path
from voicecall.control.rpc import MAX_IN_FLIGHT, MAX_LINE_BYTES, MAX_QUEUED_BYTES, STALL_TIMEOUT, RpcFactory, RpcLimits, RpcMethods

from tests.fixtures import manager_rig

WEBHOOK_URL = "http://127.0.0.1:3334/voice/webhook"
TO = "+15550001234"


class Connection:
    """One RPC connection over a StringTransport, with helpers to write lines and read replies."""

    def __init__(self, factory: RpcFactory) -> None:
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self._read = 0
        self._ids = iter(range(1, 1_000_000))
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def request(self, method: str, params=None, rid=None) -> int:
        """Send one request line; returns its id."""
        rid = next(self._ids) if rid is None else rid
        message = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode() + b"\n")
        return rid

    def messages(self) -> list[dict]:
        """The messages written since the last call."""
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return [json.loads(line) for line in new.split(b"\n") if line]

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class Hub:
    """A stand-in for CallManager.subscribe that lets a test emit notifications by hand."""

    def __init__(self) -> None:
        self.listeners: list = []

    def subscribe(self, listener):
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def emit(self, entry: dict) -> None:
        for listener in list(self.listeners):
            listener(entry)


class RpcTestsBase(SynchronousTestCase):
    default_to: str | None = None

    def setUp(self):
        rig = manager_rig(
            self,
            lambda clock: MockProvider(clock=clock),
            webhook_url=WEBHOOK_URL,
            max_concurrent_calls=3,
            transcript_timeout_ms=180_000,
            default_mode="conversation",
            inbound_policy="open",
        )
        self.clock, self.store, self.provider, self.manager = rig.clock, rig.store, rig.provider, rig.manager
        self.methods = RpcMethods(
            manager=self.manager,
            clock=self.clock,
            default_to=self.default_to,
            provider_name="mock",
            webhook_url=lambda: WEBHOOK_URL,
            started_at=self.clock.seconds(),
        )
        self.factory = RpcFactory(self.methods.table(), self.manager.subscribe, clock=self.clock)
        self.conn = self.connect()

    def connect(self, factory: RpcFactory | None = None) -> Connection:
        conn = Connection(factory or self.factory)
        self.addCleanup(conn.lose)
        return conn

    def call(self, method: str, params=None, conn: Connection | None = None) -> dict:
        """Send a request and return the one reply, which must carry its id."""
        conn = conn or self.conn
        rid = conn.request(method, params)
        replies = conn.messages()
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual(replies[0]["id"], rid)
        self.assertEqual(replies[0]["jsonrpc"], "2.0")
        return replies[0]

    def result(self, method: str, params=None, conn: Connection | None = None):
        reply = self.call(method, params, conn)
        self.assertNotIn("error", reply)
        return reply["result"]

    def error(self, method: str, params=None, conn: Connection | None = None) -> dict:
        reply = self.call(method, params, conn)
        self.assertNotIn("result", reply)
        return reply["error"]

    def assertCallError(self, method: str, params, message: str) -> None:
        """The request fails with a -32000 error object whose message is `message`."""
        error = self.error(method, params)
        self.assertEqual((error["code"], error["message"]), (-32000, message))

    def assertStillServing(self, conn: Connection | None = None) -> None:
        """The connection is open and still answers requests."""
        conn = conn or self.conn
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(self.result("voicecall.health", conn=conn)["ok"], True)

    def event(self, kind: str, call_id: str, **fields) -> None:
        fields.setdefault("id", str(uuid.uuid4()))
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        d = self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields))
        self.successResultOf(Deferred.fromCoroutine(d))

    def place(self, message: str | None = "Hello") -> str:
        if message is None:
            return self.result("voicecall.start", {"to": TO})["callId"]
        return self.result("voicecall.initiate", {"to": TO, "message": message})["callId"]

    def answered_call(self) -> str:
        """An outbound call that the carrier reports answered, with nothing left to say."""
        call_id = self.place(message=None)
        self.event("call.answered", call_id)
        return call_id

    def stored(self, call_id: str):
        return self.successResultOf(self.store.get_call(call_id))


class FramingTests(RpcTestsBase):
    """Malformed input gets JSON-RPC errors and the connection stays up."""

    def assertOnlyError(self, data: bytes, code: int, rid=None) -> dict:
        self.conn.send(data)
        replies = self.conn.messages()
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual(replies[0]["id"], rid)
        self.assertEqual(replies[0]["error"]["code"], code)
        self.assertStillServing()
        return replies[0]["error"]

    def test_malformed_json(self):
        """A line that is not JSON gets -32700 with a null id."""
        error = self.assertOnlyError(b"{not json\n", -32700)
        self.assertEqual(error["message"], "Parse error")

    def test_invalid_utf8(self):
        """A line that is not UTF-8 gets -32700."""
        self.assertOnlyError(b'{"jsonrpc": "2.0", "id": 1, "method": "\xff"}\n', -32700)

    def test_non_object(self):
        """A JSON value that is not an object gets -32600."""
        for line in (b"[1, 2]\n", b"42\n", b'"voicecall.health"\n', b"null\n"):
            self.assertOnlyError(line, -32600)

    def test_wrong_jsonrpc_version(self):
        """A request without `jsonrpc: "2.0"` gets -32600 carrying its id."""
        self.assertOnlyError(b'{"jsonrpc": "1.0", "id": 7, "method": "voicecall.health"}\n', -32600, 7)
        self.assertOnlyError(b'{"id": 8, "method": "voicecall.health"}\n', -32600, 8)

    def test_method_not_a_string(self):
        """A request whose method is not a string gets -32600."""
        self.assertOnlyError(b'{"jsonrpc": "2.0", "id": 9, "method": 12}\n', -32600, 9)

    def test_unknown_method(self):
        """An unknown method gets -32601 naming it."""
        error = self.assertOnlyError(b'{"jsonrpc": "2.0", "id": 3, "method": "voicecall.fly"}\n', -32601, 3)
        self.assertIn("voicecall.fly", error["message"])

    def test_params_not_an_object(self):
        """Params that are not an object get -32602."""
        for params in (b"[1]", b'"x"', b"3"):
            self.assertOnlyError(
                b'{"jsonrpc": "2.0", "id": 4, "method": "voicecall.status", "params": %s}\n' % params, -32602, 4
            )

    def test_non_string_param(self):
        """A param that must be a string but is not gets -32602, and nothing is dialled."""
        for method, params in (
            ("voicecall.initiate", {"message": 5, "to": TO}),
            ("voicecall.initiate", {"message": "Hi", "to": 15550001234}),
            ("voicecall.status", {"callId": ["x"]}),
            ("voicecall.end", {"callId": True}),
        ):
            error = self.error(method, params)
            self.assertEqual(error["code"], -32602, (method, params))
        self.assertEqual(self.provider.actions, [])
        self.assertStillServing()

    def test_request_split_across_reads(self):
        """A request that arrives in several pieces is answered once, when its newline arrives."""
        line = b'{"jsonrpc": "2.0", "id": 5, "method": "voicecall.health"}\n'
        self.conn.send(line[:10])
        self.conn.send(line[10:30])
        self.assertEqual(self.conn.messages(), [])
        self.conn.send(line[30:])
        self.assertEqual([m["id"] for m in self.conn.messages()], [5])

    def test_several_requests_in_one_read(self):
        """Several lines in one read are each answered; blank lines are skipped."""
        self.conn.send(
            b'{"jsonrpc": "2.0", "id": 1, "method": "voicecall.health"}\n\n  \n'
            b'{"jsonrpc": "2.0", "id": "two", "method": "voicecall.status"}\n'
        )
        self.assertEqual([m["id"] for m in self.conn.messages()], [1, "two"])

    def test_notification_gets_no_answer(self):
        """A request without an id is run but not answered."""
        self.conn.send(b'{"jsonrpc": "2.0", "method": "voicecall.health"}\n')
        self.assertEqual(self.conn.messages(), [])
        self.assertStillServing()

    def test_long_line_in_pieces_refused_once(self):
        """A line growing past 1 MiB gets one -32600; its rest is discarded and the next line served."""
        chunk = b"x" * 65536
        for _ in range(MAX_LINE_BYTES // len(chunk) + 2):
            self.conn.send(chunk)
        replies = self.conn.messages()
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual((replies[0]["id"], replies[0]["error"]["code"]), (None, -32600))
        self.conn.send(chunk * 20)
        self.conn.send(b"tail of the long line\n" + b'{"jsonrpc": "2.0", "id": 2, "method": "voicecall.health"}\n')
        replies = self.conn.messages()
        self.assertEqual([(m["id"], "result" in m) for m in replies], [(2, True)])
        self.assertFalse(self.conn.transport.disconnecting)

    def test_long_line_in_one_read_refused(self):
        """A complete request line over 1 MiB is refused (-32600), not run, even when it arrives in one read."""
        pad = "p" * (MAX_LINE_BYTES + 10)
        big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "voicecall.status", "params": {"pad": pad}})
        self.conn.send(big.encode() + b"\n" + b'{"jsonrpc": "2.0", "id": 2, "method": "voicecall.health"}\n')
        replies = self.conn.messages()
        self.assertEqual(
            [(m["id"], m.get("error", {}).get("code")) for m in replies],
            [(None, -32600), (2, None)],
        )


class MethodTests(RpcTestsBase):
    """The SPEC §18.2 methods: params, result payloads and error texts."""

    def test_initiate(self):
        """initiate answers `{callId, initiated: true}` once the call is durable with its message and mode."""
        result = self.result("voicecall.initiate", {"to": TO, "message": " Hello there ", "mode": "notify"})
        self.assertEqual(set(result), {"callId", "initiated"})
        self.assertIs(result["initiated"], True)
        record = self.stored(result["callId"])
        self.assertEqual((record.to_number, record.state), (TO, CallState.INITIATED))
        self.assertEqual(record.metadata, {"mode": "notify", "initialMessage": "Hello there"})
        self.assertEqual(self.provider.actions, [("initiate", f"mock-{result['callId']}", TO)])

    def test_initiate_unknown_mode_uses_default(self):
        """A mode other than notify/conversation falls back to the configured default."""
        call_id = self.result("voicecall.initiate", {"to": TO, "message": "Hi", "mode": "shout"})["callId"]
        self.assertEqual(self.stored(call_id).metadata["mode"], "conversation")

    def test_initiate_message_required(self):
        """initiate without a (non-blank) message fails with `message required` and dials nothing."""
        for params in ({"to": TO}, {"to": TO, "message": "   "}, {"to": TO, "message": None}):
            self.assertCallError("voicecall.initiate", params, "message required")
        self.assertEqual(self.provider.actions, [])

    def test_initiate_to_required(self):
        """initiate without `to` and without a configured toNumber fails with `to required`."""
        self.assertCallError("voicecall.initiate", {"message": "Hi"}, "to required")
        self.assertCallError("voicecall.initiate", {"message": "Hi", "to": "  "}, "to required")
        self.assertEqual(self.provider.actions, [])

    def test_initiate_manager_error(self):
        """A manager refusal reaches the caller as a -32000 error with the manager's text."""
        for _ in range(3):
            self.place()
        self.assertCallError("voicecall.initiate", {"to": TO, "message": "Hi"}, "Maximum concurrent calls (3) reached")

    def test_start_legacy(self):
        """The legacy start places a call from `to` alone, with no initial message."""
        result = self.result("voicecall.start", {"to": TO})
        self.assertEqual(result["initiated"], True)
        self.assertNotIn("initialMessage", self.stored(result["callId"]).metadata)

    def test_start_to_required(self):
        """The legacy start fails with `to required` without `to`."""
        self.assertCallError("voicecall.start", {"message": "Hi"}, "to required")

    def test_continue(self):
        """continue speaks, waits for the caller's words and answers `{success: true, transcript}`."""
        call_id = self.answered_call()
        rid = self.conn.request("voicecall.continue", {"callId": call_id, "message": "Which day?"})
        self.assertEqual(self.conn.messages(), [])
        self.event("call.speech", call_id, transcript="Tuesday", is_final=True)
        self.assertEqual(
            self.conn.messages(),
            [{"jsonrpc": "2.0", "id": rid, "result": {"success": True, "transcript": "Tuesday"}}],
        )

    def test_continue_requires_both(self):
        """continue without callId or message fails with `callId and message required`."""
        for params in ({}, {"callId": "x"}, {"message": "hi"}, {"callId": " ", "message": "hi"}):
            self.assertCallError("voicecall.continue", params, "callId and message required")

    def test_continue_unknown_call(self):
        """continue on an unknown call fails with the manager's `Call not found`."""
        self.assertCallError("voicecall.continue", {"callId": "nope", "message": "hi"}, "Call not found")

    def test_speak(self):
        """speak says the text on the call and answers `{success: true}`."""
        call_id = self.answered_call()
        self.assertEqual(self.result("voicecall.speak", {"callId": call_id, "message": "One moment"}), {"success": True})
        self.assertIn(("speak", f"mock-{call_id}", "One moment"), self.provider.actions)

    def test_speak_errors(self):
        """speak fails with `callId and message required`, or the manager's `Call not found`."""
        self.assertCallError("voicecall.speak", {"callId": "x"}, "callId and message required")
        self.assertCallError("voicecall.speak", {"callId": "nope", "message": "hi"}, "Call not found")

    def test_end(self):
        """end hangs up and answers `{success: true}`; the stored call is ended by the bot."""
        call_id = self.answered_call()
        self.assertEqual(self.result("voicecall.end", {"callId": call_id}), {"success": True})
        record = self.stored(call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.HANGUP_BOT, "hangup-bot"))

    def test_end_errors(self):
        """end fails with `callId required`, or the manager's `Call not found`."""
        self.assertCallError("voicecall.end", {}, "callId required")
        self.assertCallError("voicecall.end", {"callId": "nope"}, "Call not found")

    def test_status_found(self):
        """status answers `{found: true, call}` with the SPEC §3.1 record, without event ids."""
        call_id = self.answered_call()
        result = self.result("voicecall.status", {"callId": call_id})
        self.assertEqual(result["found"], True)
        call = result["call"]
        self.assertEqual((call["callId"], call["state"], call["to"]), (call_id, "answered", TO))
        self.assertEqual(call["providerCallId"], f"mock-{call_id}")
        self.assertNotIn("processedEventIds", call)

    def test_status_by_provider_id_and_legacy_sid(self):
        """status finds a call by the carrier's id, and accepts the legacy `sid` param."""
        call_id = self.answered_call()
        self.assertEqual(self.result("voicecall.status", {"callId": f"mock-{call_id}"})["call"]["callId"], call_id)
        self.assertEqual(self.result("voicecall.status", {"sid": call_id})["call"]["callId"], call_id)

    def test_status_ended_call(self):
        """status finds an ended call in the store."""
        call_id = self.answered_call()
        self.result("voicecall.end", {"callId": call_id})
        call = self.result("voicecall.status", {"callId": call_id})["call"]
        self.assertEqual((call["state"], call["endReason"]), ("hangup-bot", "hangup-bot"))

    def test_status_not_found(self):
        """status of an unknown call answers `{found: false}` (a result, not an error)."""
        self.assertEqual(self.result("voicecall.status", {"callId": "nope"}), {"found": False})

    def test_status_lists_active_calls(self):
        """status without callId lists the active calls only."""
        self.assertEqual(self.result("voicecall.status"), {"calls": []})
        live = self.answered_call()
        ended = self.answered_call()
        self.result("voicecall.end", {"callId": ended})
        calls = self.result("voicecall.status", {})["calls"]
        self.assertEqual([c["callId"] for c in calls], [live])
        self.assertNotIn("processedEventIds", calls[0])

    def test_health(self):
        """health reports the provider, active calls, webhook URL and uptime."""
        self.answered_call()
        self.clock.advance(12.5)
        self.assertEqual(
            self.result("voicecall.health"),
            {"ok": True, "provider": "mock", "activeCalls": 1, "webhookUrl": WEBHOOK_URL, "uptimeSeconds": 12.5},
        )

    def test_errors_keep_the_connection(self):
        """After every kind of error the same connection still answers requests."""
        self.conn.send(b"garbage\n[]\n")
        self.assertEqual([m["error"]["code"] for m in self.conn.messages()], [-32700, -32600])
        self.error("voicecall.fly")
        self.error("voicecall.end", {})
        self.error("voicecall.end", {"callId": "nope"})
        self.assertStillServing()

    def test_pending_continue_does_not_block_status(self):
        """A pending continue does not delay a status on the same connection; answers match by id."""
        call_id = self.answered_call()
        waiting = self.conn.request("voicecall.continue", {"callId": call_id, "message": "Which day?"})
        asked = self.conn.request("voicecall.status", {"callId": call_id})
        first = self.conn.messages()
        self.assertEqual([m["id"] for m in first], [asked])
        self.assertEqual(first[0]["result"]["call"]["state"], "listening")
        self.event("call.speech", call_id, transcript="Friday")
        self.assertEqual(self.conn.messages(), [{"jsonrpc": "2.0", "id": waiting, "result": {"success": True, "transcript": "Friday"}}])


class DefaultToTests(RpcTestsBase):
    """With a configured toNumber, initiate may omit `to`."""

    default_to = "+15550009999"

    def test_initiate_uses_configured_number(self):
        """initiate without `to` dials the configured toNumber."""
        call_id = self.result("voicecall.initiate", {"message": "Hi"})["callId"]
        self.assertEqual(self.stored(call_id).to_number, "+15550009999")

    def test_start_still_needs_to(self):
        """The legacy start still requires `to` itself."""
        self.assertCallError("voicecall.start", {"message": "Hi"}, "to required")


class SubscriptionTests(RpcTestsBase):
    """voicecall.subscribe streams call events as `voicecall.event` notifications."""

    def subscribed(self, conn: Connection) -> None:
        self.assertEqual(self.result("voicecall.subscribe", {}, conn=conn), {"subscribed": True})

    def test_call_events_are_notified(self):
        """A subscriber is notified of a call created and answered through another connection."""
        watcher = self.connect()
        self.subscribed(watcher)
        call_id = self.place(message=None)
        self.event("call.answered", call_id)
        notes = watcher.messages()
        for note in notes:
            self.assertEqual((note["jsonrpc"], note["method"]), ("2.0", "voicecall.event"))
            self.assertNotIn("id", note)
        params = [n["params"] for n in notes]
        self.assertEqual([p["callId"] for p in params], [call_id] * len(params))
        self.assertEqual(params[0]["type"], "call.created")
        self.assertIn({"type": "call.state", "state": "answered"}, [{"type": p["type"], "state": p.get("state")} for p in params])

    def test_not_subscribed_gets_nothing(self):
        """A connection that did not subscribe gets no notifications."""
        self.place()
        self.assertEqual([m for m in self.conn.messages() if "method" in m], [])

    def test_subscribe_twice_delivers_once(self):
        """Subscribing twice on one connection still delivers each event once."""
        watcher = self.connect()
        self.subscribed(watcher)
        self.subscribed(watcher)
        self.place(message=None)
        notes = watcher.messages()
        self.assertEqual([n["params"]["type"] for n in notes].count("call.created"), 1)

    def hub_connection(self) -> tuple[Hub, Connection]:
        hub = Hub()
        conn = self.connect(RpcFactory(self.methods.table(), hub.subscribe, clock=self.clock))
        self.subscribed(conn)
        return hub, conn

    def test_connection_lost_unsubscribes(self):
        """A subscriber that disconnects is unsubscribed."""
        hub, conn = self.hub_connection()
        self.assertEqual(len(hub.listeners), 1)
        conn.lose()
        self.assertEqual(hub.listeners, [])

    def big_event(self, n: int = 0) -> dict:
        return {"type": "call.transcript", "callId": "c", "n": n, "text": "x" * 30_000}

    def test_slow_subscriber_disconnected(self):
        """
        A subscriber whose transport paused us is dropped by the event that would queue more
        than MAX_QUEUED_BYTES for it, with one log line; nothing past the cap is written.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        hub, conn = self.hub_connection()
        conn.messages()
        conn.transport.producer.pauseProducing()
        written = len(conn.transport.value())
        n = 0
        while not conn.transport.disconnecting:
            hub.emit(self.big_event(n))
            n += 1
            self.assertLess(n, 1000, "never dropped")
        self.assertLessEqual(len(conn.transport.value()) - written, MAX_QUEUED_BYTES)
        self.assertGreater(len(conn.transport.value()) - written, MAX_QUEUED_BYTES - 31_000)
        self.assertEqual(len(conn.messages()), n - 1)
        hub.emit(self.big_event())
        self.assertEqual(conn.messages(), [])
        drops = [e for e in logged if "does not read" in e.get("log_format", "")]
        self.assertEqual(len(drops), 1)
        self.assertEqual(drops[0]["limit"], MAX_QUEUED_BYTES)

    def test_resumed_subscriber_starts_afresh(self):
        """Once the transport has written everything and resumes us, the count starts again."""
        hub, conn = self.hub_connection()
        producer = conn.transport.producer
        for _ in range(2):
            producer.pauseProducing()
            for n in range(100):  # 3 MB each time: 6 MB in all
                hub.emit(self.big_event(n))
            producer.resumeProducing()
        self.assertFalse(conn.transport.disconnecting)

    def test_reading_subscriber_never_dropped(self):
        """A subscriber that keeps reading is never dropped, however much it is sent."""
        hub, conn = self.hub_connection()
        for n in range(300):  # 9 MB
            hub.emit(self.big_event(n))
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(len(conn.messages()), 300)


class BackpressureTests(RpcTestsBase):
    """A peer that does not read its answers is not read from, and is dropped past the byte cap."""

    def test_backed_up_connection_not_read(self):
        """While the transport has paused us, the transport is not read; when it resumes us, it is again."""
        conn = self.conn
        conn.transport.producer.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")
        conn.transport.producer.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertStillServing()

    def test_requests_past_the_cap_drop_the_connection(self):
        """Answers to requests in flight that would queue more than MAX_QUEUED_BYTES for a peer that does not read drop it."""
        factory, waiting = self.slow_factory()
        conn = self.connect(factory)
        conn.send(b'{"jsonrpc":"2.0","id":1,"method":"slow"}\n' * 200)
        self.assertEqual(len(waiting), 200)
        conn.transport.producer.pauseProducing()
        written = len(conn.transport.value())
        for d in waiting:  # 8 MB of answers
            d.callback("y" * 40_000)
        self.assertTrue(conn.transport.disconnecting)
        self.assertLessEqual(len(conn.transport.value()) - written, MAX_QUEUED_BYTES)
        self.assertGreater(len(conn.transport.value()) - written, MAX_QUEUED_BYTES - 41_000)
        other = self.connect()
        self.assertStillServing(other)

    def slow_factory(self):
        """A factory whose one method waits until the test fires it."""
        waiting: list[Deferred] = []

        async def slow(params):
            d: Deferred = Deferred()
            waiting.append(d)
            return await d

        return RpcFactory({"slow": slow}, Hub().subscribe, clock=self.clock), waiting

    def test_requests_read_are_not_handled_while_backed_up(self):
        """
        Requests already read wait while the answers are backed up: a peer that stopped reading
        used to get an answer to every line of its last read (a thousand small ones from 64 KiB:
        1000 such peers grew the daemon by 205 MiB). They are answered once it reads again.
        """
        self.conn.transport.producer.pauseProducing()
        written = len(self.conn.transport.value())
        line = b'{"jsonrpc":"2.0","id":1,"method":"voicecall.health"}\n'
        self.conn.send(line * 1000)
        self.assertEqual(len(self.conn.transport.value()), written)
        self.conn.messages()
        self.conn.transport.producer.resumeProducing()
        self.assertEqual(len(self.conn.messages()), 1000)
        self.assertFalse(self.conn.transport.disconnecting)

    def test_a_peer_that_never_reads_is_disconnected(self):
        """A peer whose answers stay backed up for STALL_TIMEOUT seconds is closed, however little waits."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.conn.transport.producer.pauseProducing()
        self.conn.send(b'{"jsonrpc":"2.0","id":1,"method":"voicecall.health"}\n' * 10)
        self.clock.advance(STALL_TIMEOUT - 0.1)
        self.assertFalse(self.conn.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.conn.transport.disconnecting)
        self.assertEqual(len([e for e in logged if "does not read" in e.get("log_format", "")]), 1)
        # One that reads again in time is not.
        other = self.connect()
        other.transport.producer.pauseProducing()
        self.clock.advance(STALL_TIMEOUT - 1)
        other.transport.producer.resumeProducing()
        self.clock.advance(STALL_TIMEOUT)
        self.assertFalse(other.transport.disconnecting)
        self.assertStillServing(other)

    def test_connections_are_capped(self):
        """Past max_connections a new connection is closed when accepted (one log line); a closed one frees its place."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory = RpcFactory(self.methods.table(), self.manager.subscribe, clock=self.clock, limits=RpcLimits(max_connections=3))
        conns = [self.connect(factory) for _ in range(3)]
        self.assertIsNone(factory.buildProtocol(None))
        self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual(len([e for e in logged if "refusing RPC" in e.get("log_format", "")]), 1)
        conns[0].lose()
        self.assertStillServing(self.connect(factory))
        self.assertIsNone(factory.buildProtocol(None))

    def test_request_data_held_is_capped_across_connections(self):
        """
        Beyond FREE_BUFFER_BYTES each, what connections hold of unfinished lines comes out of one
        budget; the connection that would pass it is closed, the others go on. 64 connections each
        holding a 1 MiB line without its newline grew the daemon by 68 MiB.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory = RpcFactory(self.methods.table(), self.manager.subscribe, clock=self.clock, limits=RpcLimits(max_shared_buffer=200 * 1024))
        first, second, third = (self.connect(factory) for _ in range(3))
        partial = b'{"jsonrpc":"2.0","id":1,"method":"voicecall.health","params":{"x":"' + b"a" * 150 * 1024
        for conn in (first, second, third):
            conn.send(partial)
        self.assertFalse(first.transport.disconnecting or second.transport.disconnecting)
        self.assertTrue(third.transport.disconnecting)
        self.assertEqual(len([e for e in logged if "would pass" in e.get("log_format", "")]), 1)
        first.send(b'"}}\n')
        self.assertEqual(first.messages()[-1]["result"]["ok"], True)
        fourth = self.connect(factory)
        fourth.send(partial + b'"}}\n')
        self.assertEqual(fourth.messages()[-1]["result"]["ok"], True)
        second.lose()
        self.assertEqual(factory._budget.used, 0)

    def test_in_flight_cap_stops_reading(self):
        """At MAX_IN_FLIGHT requests being worked on, the rest wait unread; each one finished lets one more in."""
        factory, waiting = self.slow_factory()
        conn = self.connect(factory)
        line = b'{"jsonrpc":"2.0","id":7,"method":"slow"}\n'
        conn.send(line * (MAX_IN_FLIGHT + 3))
        self.assertEqual(len(waiting), MAX_IN_FLIGHT)
        self.assertEqual(conn.transport.producerState, "paused")
        waiting[0].callback("first")
        self.assertEqual(len(waiting), MAX_IN_FLIGHT + 1)
        self.assertEqual(conn.messages(), [{"jsonrpc": "2.0", "id": 7, "result": "first"}])
        for d in waiting[1:]:
            d.callback("done")
        self.assertEqual(len(waiting), MAX_IN_FLIGHT + 3)
        for d in waiting[MAX_IN_FLIGHT + 1:]:
            d.callback("done")
        self.assertEqual(len(conn.messages()), MAX_IN_FLIGHT + 2)
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertFalse(conn.transport.disconnecting)


class ConnectionLostTests(RpcTestsBase):
    """A closed connection cancels its pending requests cleanly."""

    def test_pending_continue_cancelled(self):
        """Losing a connection with a pending continue logs no error and frees the call for a new turn."""
        call_id = self.answered_call()
        self.conn.request("voicecall.continue", {"callId": call_id, "message": "Which day?"})
        self.conn.lose()
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.conn.messages(), [])
        other = self.connect()
        rid = other.request("voicecall.continue", {"callId": call_id, "message": "Which day, again?"})
        self.assertEqual(other.messages(), [])
        self.event("call.speech", call_id, transcript="Monday")
        self.assertEqual(other.messages(), [{"jsonrpc": "2.0", "id": rid, "result": {"success": True, "transcript": "Monday"}}])


class DefaultSocketPathTests(SynchronousTestCase):
    """default_socket_path: $VOICECALL_SOCKET, else <store>/voicecall.sock."""

    def test_env_wins(self):
        """$VOICECALL_SOCKET is used when set."""
        self.assertEqual(default_socket_path("/var/lib/vc", {"VOICECALL_SOCKET": "/run/vc.sock"}), "/run/vc.sock")

    def test_store_default(self):
        """Without the variable, the socket lives in the store directory."""
        self.assertEqual(default_socket_path("/var/lib/vc", {}), "/var/lib/vc/voicecall.sock")
