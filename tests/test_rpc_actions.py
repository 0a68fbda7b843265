"""
Issue 17's telephony actions through the real RPC socket of an in-process daemon (mock provider,
events posted to its webhook as a developer would): initiate's per-call choices, continue's
`input`, `voicecall.dtmf`, `voicecall.transfer` and `voicecall.end` with a goodbye, and the
parameter checks that refuse bad input before anything changes.
"""
from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import call_record, event, eventually, start_daemon, transcript, webhook_client, workdir
from voicecall.client import RemoteError, connect
from voicecall.cluster.router import owner_command_timeouts
from voicecall.control.protocol import CALL_ERROR, INVALID_PARAMS
from voicecall.control.rpc import RpcMethods

TO = "+15550001234"
AGENT = "+15550009999"


class ActionTestsBase(TestCase):
    timeout = 30

    async def setUp(self):
        directory = workdir(self)
        self.socket = f"{directory}/rpc.sock"
        self.service, self.rpc = await start_daemon(
            self,
            {
                "provider": "mock",
                "fromNumber": "+15550000000",
                "allowedFromNumbers": ["+15550000001"],
                "maxDurationSeconds": 600,
                "transfer": {"allowTo": [AGENT]},
                "serve": {"bind": "127.0.0.1"},
            },
            directory,
        )
        self.web = webhook_client(self)
        self.events: list[dict] = []
        watcher = await connect(reactor, self.socket, on_notification=lambda method, entry: self.events.append(entry))
        self.addCleanup(watcher.transport.loseConnection)
        await watcher.call("voicecall.subscribe", {})

    @property
    def actions(self) -> list:
        return self.service._provider.actions

    async def post(self, body: dict) -> None:
        answer = await self.web.post(self.service.webhook_url, body)
        self.assertEqual(answer.code, 200, answer.body)

    async def answered_call(self, **params) -> str:
        call_id = (await self.rpc.call("voicecall.initiate", {"to": TO, "message": "Hello", "mode": "conversation", **params}))["callId"]
        await self.post(event("call.answered", call_id))
        await eventually(lambda: ("spoken", f"mock-{call_id}", "Hello") in self.actions, 5, "the greeting played")

        # Events are sent once durable: the greeting is stored, so no write of it outlives the test.
        await eventually(
            lambda: any(e.get("type") == "call.transcript" and e.get("callId") == call_id and e.get("text") == "Hello" for e in self.events),
            5,
            "the greeting stored",
        )
        return call_id

    def listens(self) -> int:
        return sum(1 for a in self.actions if a[0].startswith("listen"))

    async def refused(self, method: str, params: dict) -> RemoteError:
        try:
            result = await self.rpc.call(method, params)
        except RemoteError as e:
            return e
        self.fail(f"{method} {params} was accepted: {result}")


class InitiateChoicesTests(ActionTestsBase):
    async def test_choices_reach_the_call(self):
        """from, voice, greeting, objective, maxDurationSeconds, answeringMachine and record are the call's own."""
        result = await self.rpc.call(
            "voicecall.initiate",
            {
                "to": TO,
                "message": "Your order is ready",
                "from": "+15550000001",
                "voice": "alloy",
                "greeting": "Hi, this is the shop.",
                "objective": "Tell them the order is ready",
                "maxDurationSeconds": 120,
                "answeringMachine": "leave-message",
                "record": True,
            },
        )
        self.assertEqual(set(result), {"callId", "initiated"})
        call = await call_record(self.socket, result["callId"])
        self.assertEqual(call["from"], "+15550000001")
        metadata = call["metadata"]
        self.assertEqual(
            {k: metadata.get(k) for k in ("voice", "greeting", "objective", "maxDurationSeconds", "answeringMachine", "record")},
            {
                "voice": "alloy",
                "greeting": "Hi, this is the shop.",
                "objective": "Tell them the order is ready",
                "maxDurationSeconds": 120,
                "answeringMachine": "leave-message",
                "record": True,
            },
        )

    async def test_type_errors_change_nothing(self):
        """Wrongly typed choices are refused (-32602, a clear text) and place no call."""
        for params, text in (
            ({"record": "yes"}, "Invalid params: record must be true or false"),
            ({"record": 1}, "Invalid params: record must be true or false"),
            ({"maxDurationSeconds": "60"}, "Invalid params: maxDurationSeconds must be an integer"),
            ({"maxDurationSeconds": 60.5}, "Invalid params: maxDurationSeconds must be an integer"),
            ({"maxDurationSeconds": True}, "Invalid params: maxDurationSeconds must be an integer"),
            ({"from": 15550000001}, "Invalid params: from must be a string"),
            ({"voice": ["alloy"]}, "Invalid params: voice must be a string"),
            ({"greeting": {}}, "Invalid params: greeting must be a string"),
            ({"objective": 3}, "Invalid params: objective must be a string"),
            ({"answeringMachine": False}, "Invalid params: answeringMachine must be a string"),
        ):
            error = await self.refused("voicecall.initiate", {"to": TO, "message": "Hi", **params})
            self.assertEqual((error.code, str(error)), (INVALID_PARAMS, text), params)
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])
        self.assertEqual(self.actions, [])

    async def test_value_errors_are_the_managers(self):
        """Values the config does not allow get the manager's text and place no call."""
        for params, text in (
            ({"from": "+15557777777"}, "from number not allowed: +15557777777 (use fromNumber or one of allowedFromNumbers)"),
            ({"maxDurationSeconds": 601}, "maxDurationSeconds must be an integer from 1 to 600"),
            ({"maxDurationSeconds": 0}, "maxDurationSeconds must be an integer from 1 to 600"),
            ({"answeringMachine": "voicemail"}, 'answeringMachine must be one of "ignore", "leave-message", "hang-up"'),
        ):
            error = await self.refused("voicecall.initiate", {"to": TO, "message": "Hi", **params})
            self.assertEqual((error.code, str(error)), (CALL_ERROR, text), params)
        self.assertEqual((await self.rpc.call("voicecall.status", {}))["calls"], [])

    async def test_spec_texts_unchanged(self):
        """SPEC §18.2's errors for the existing params stay as they were."""
        error = await self.refused("voicecall.initiate", {"to": TO, "record": True})
        self.assertEqual(str(error), "message required")
        error = await self.refused("voicecall.initiate", {"message": "Hi", "record": True})
        self.assertEqual(str(error), "to required")


class ContinueInputTests(ActionTestsBase):
    async def test_keys_answer(self):
        """With input "speech dtmf", keys pressed answer the turn: {success, transcript, input: "dtmf"}."""
        call_id = await self.answered_call()
        listened = self.listens()
        turn = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Press 1 to confirm", "input": "speech dtmf"})
        await eventually(lambda: self.listens() > listened, 5, "the turn listening")
        await self.post(event("call.dtmf", call_id, digits="1"))
        self.assertEqual(await turn, {"success": True, "transcript": "1", "input": "dtmf"})

    async def test_words_answer_as_before(self):
        """Without input, the answer is the SPEC shape {success, transcript} (no input key)."""
        call_id = await self.answered_call()
        listened = self.listens()
        turn = self.rpc.call("voicecall.continue", {"callId": call_id, "message": "Which day?"})
        await eventually(lambda: self.listens() > listened, 5, "the turn listening")
        await self.post({"event": {"type": "call.speech", "callId": call_id, "transcript": "Tuesday", "isFinal": True}})
        self.assertEqual(await turn, {"success": True, "transcript": "Tuesday"})

    async def test_bad_input_refused(self):
        """An unknown or mistyped input is refused before anything is said."""
        call_id = await self.answered_call()
        before = list(self.actions)
        error = await self.refused("voicecall.continue", {"callId": call_id, "message": "Hi", "input": "keys"})
        self.assertEqual((error.code, str(error)), (CALL_ERROR, 'input must be "speech", "dtmf" or "speech dtmf"'))
        error = await self.refused("voicecall.continue", {"callId": call_id, "message": "Hi", "input": ["dtmf"]})
        self.assertEqual((error.code, str(error)), (INVALID_PARAMS, "Invalid params: input must be a string"))
        self.assertEqual(self.actions, before)


class DtmfTests(ActionTestsBase):
    async def test_sends_keys(self):
        """voicecall.dtmf plays the keys on the call and answers {success: true}; the call goes on."""
        call_id = await self.answered_call()
        self.assertEqual(await self.rpc.call("voicecall.dtmf", {"callId": call_id, "digits": "1w2#"}), {"success": True})
        self.assertIn(("dtmf", f"mock-{call_id}", "1w2#"), self.actions)
        self.assertIsNone((await call_record(self.socket, call_id)).get("endedAt"))

    async def test_refusals(self):
        """Missing params, bad digits and unknown calls are refused with a clear text; nothing is sent."""
        call_id = await self.answered_call()
        for params, text in (
            ({"callId": call_id}, "callId and digits required"),
            ({"digits": "1"}, "callId and digits required"),
            ({"callId": call_id, "digits": "  "}, "callId and digits required"),
            ({"callId": call_id, "digits": "12a"}, "digits may only contain 0-9, *, # and w (a half-second pause)"),
            ({"callId": "nope", "digits": "1"}, "Call not found"),
        ):
            error = await self.refused("voicecall.dtmf", params)
            self.assertEqual(str(error), text, params)
        self.assertFalse([a for a in self.actions if a[0] == "dtmf"])


class TransferTests(ActionTestsBase):
    async def test_transfer_after_message(self):
        """voicecall.transfer says the message, connects the caller, and the record ends transferred."""
        call_id = await self.answered_call()
        result = await self.rpc.call("voicecall.transfer", {"callId": call_id, "to": AGENT, "message": "Connecting you now"})
        self.assertEqual(result, {"success": True})
        spoken = self.actions.index(("spoken", f"mock-{call_id}", "Connecting you now"))
        self.assertGreater(self.actions.index(("transfer", f"mock-{call_id}", AGENT)), spoken)
        call = await call_record(self.socket, call_id)
        self.assertEqual((call["state"], call["endReason"], call["transferTarget"]), ("transferred", "transferred", AGENT))

    async def test_refusals(self):
        """Missing params and targets not in transfer.allowTo are refused; the call stays as it was."""
        call_id = await self.answered_call()
        for params, text in (
            ({"callId": call_id}, "callId and to required"),
            ({"to": AGENT}, "callId and to required"),
            ({"callId": call_id, "to": "+15556666666"}, "Transfer target not allowed: +15556666666 (transfer.allowTo lists the numbers a call may be transferred to)"),
        ):
            error = await self.refused("voicecall.transfer", params)
            self.assertEqual(str(error), text, params)
        error = await self.refused("voicecall.transfer", {"callId": call_id, "to": AGENT, "message": 5})
        self.assertEqual((error.code, str(error)), (INVALID_PARAMS, "Invalid params: message must be a string"))
        self.assertFalse([a for a in self.actions if a[0] == "transfer"])
        self.assertIsNone((await call_record(self.socket, call_id)).get("endedAt"))


class EndTests(ActionTestsBase):
    async def test_goodbye_then_hang_up(self):
        """voicecall.end with a message plays it, then hangs up."""
        call_id = await self.answered_call()
        self.assertEqual(await self.rpc.call("voicecall.end", {"callId": call_id, "message": "Goodbye"}), {"success": True})
        spoken = self.actions.index(("spoken", f"mock-{call_id}", "Goodbye"))
        self.assertGreater(self.actions.index(("hangup", f"mock-{call_id}", "hangup-bot")), spoken)
        self.assertEqual((await call_record(self.socket, call_id))["endReason"], "hangup-bot")

    async def test_without_message(self):
        """voicecall.end without a message hangs up at once, as SPEC §18.2 says."""
        call_id = await self.answered_call()
        self.assertEqual(await self.rpc.call("voicecall.end", {"callId": call_id}), {"success": True})
        self.assertFalse([a for a in self.actions if a[0] == "speak" and a[2] != "Hello"])
        self.assertIn(("hangup", f"mock-{call_id}", "hangup-bot"), self.actions)
        error = await self.refused("voicecall.end", {})
        self.assertEqual(str(error), "callId required")


class OwnerCommandsTests(SynchronousTestCase):
    def test_every_call_command_has_a_forward_limit(self):
        """Each RPC command run on a call's owner has a forward time limit; those that play a message wait for the longest one."""
        methods = RpcMethods(manager=None, clock=None)
        limits = owner_command_timeouts(rpc=30.0, turn=900.0, playback=600.0)
        for method in limits:
            self.assertTrue(callable(methods._here(method)), method)
        self.assertEqual(set(limits), {"voicecall.continue", "voicecall.speak", "voicecall.end", "voicecall.transfer", "voicecall.dtmf"})
        self.assertEqual(limits["voicecall.continue"], 900.0)
        for method in ("voicecall.speak", "voicecall.end", "voicecall.transfer"):
            self.assertEqual(limits[method], 630.0)


class MenuTests(ActionTestsBase):
    async def test_listen_to_a_menu_and_press_keys(self):
        """README's phone menu: a call started with no message says nothing; what the menu says is transcribed; keys answer it."""
        call_id = (await self.rpc.call("voicecall.start", {"to": TO, "mode": "conversation"}))["callId"]
        await self.post(event("call.answered", call_id))
        await self.post({"event": {"type": "call.speech", "callId": call_id, "transcript": "Press 1 for sales", "isFinal": True}})

        async def heard():
            return ("user", "Press 1 for sales") in transcript(await call_record(self.socket, call_id))

        await eventually(heard, 5, "the menu's words in the transcript")
        self.assertEqual(await self.rpc.call("voicecall.dtmf", {"callId": call_id, "digits": "1"}), {"success": True})
        self.assertEqual([a for a in self.actions if a[0] in ("speak", "dtmf")], [("dtmf", f"mock-{call_id}", "1")])


class ClusterTests(TestCase):
    """Two daemons on one PostgreSQL: dtmf, transfer and a goodbye asked of the node that does not own the call run on its owner."""

    timeout = 90

    async def test_forwarded_to_the_owner(self):
        from tests.pgserver import postgres_server
        from tests.test_cluster_route import start_node

        url = postgres_server(self).new_database(self)
        web = webhook_client(self)
        config = {"maxConcurrentCalls": 4, "transfer": {"allowTo": [AGENT]}}
        service_a, rpc_a, _ = await start_node(self, url, "node-a", **config)
        _, rpc_b, hook_b = await start_node(self, url, "node-b", **config)
        actions = service_a._provider.actions

        async def answered() -> str:
            call_id = (await rpc_a.call("voicecall.initiate", {"to": TO, "message": "Hi"}))["callId"]
            self.assertEqual((await web.post(hook_b, event("call.answered", call_id))).code, 200)
            await eventually(lambda: ("spoken", f"mock-{call_id}", "Hi") in actions, 10, "the greeting, on A")
            return call_id

        first = await answered()
        self.assertEqual(await rpc_b.call("voicecall.dtmf", {"callId": first, "digits": "9#"}), {"success": True})
        self.assertIn(("dtmf", f"mock-{first}", "9#"), actions)
        self.assertEqual(await rpc_b.call("voicecall.end", {"callId": first, "message": "Goodbye"}), {"success": True})
        self.assertLess(actions.index(("spoken", f"mock-{first}", "Goodbye")), actions.index(("hangup", f"mock-{first}", "hangup-bot")))

        second = await answered()
        with self.assertRaises(RemoteError) as refused:
            await rpc_b.call("voicecall.transfer", {"callId": second, "to": "+15556666666"})
        self.assertTrue(str(refused.exception).startswith("Transfer target not allowed: +15556666666"), str(refused.exception))
        self.assertEqual(await rpc_b.call("voicecall.transfer", {"callId": second, "to": AGENT, "message": "One moment"}), {"success": True})
        self.assertIn(("transfer", f"mock-{second}", AGENT), actions)
        record = await call_record(rpc_path(rpc_a), second)
        self.assertEqual((record["state"], record["transferTarget"]), ("transferred", AGENT))


def rpc_path(client) -> str:
    name = client.transport.getPeer().name
    return name.decode() if isinstance(name, bytes) else name
