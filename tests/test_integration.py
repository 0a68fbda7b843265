"""
The integration tier: the real daemon (`twistd voicecall` on the mock provider) and the real CLI,
run as child processes and driven over HTTP webhooks, the JSON-RPC socket and the command line.
The helpers that start, drive and clean up the children are in tests/harness.py.
"""
from __future__ import annotations

import json
import os

from twisted.trial.unittest import TestCase

from tests.harness import (
    Daemon,
    WebhookClient,
    Workdir,
    call_record,
    daemon_argv,
    event,
    eventually,
    make_workdir,
    raw_rpc,
    rpc,
    run_cli,
    spawn,
    spawn_cli,
    speech,
    spawn_daemon,
    transcript,
    webhook_client,
)

TO = "+15550001234"
TERMINAL = {"completed", "hangup-user", "hangup-bot", "timeout", "error", "failed", "no-answer", "busy", "voicemail"}


class _DaemonTestCase(TestCase):
    """Shared set-up: a work directory, a running daemon and a webhook client."""

    timeout = 60

    async def started(self, **overrides) -> tuple[Workdir, Daemon, WebhookClient]:
        workdir = make_workdir(self, overrides)
        daemon = await spawn_daemon(self, workdir)
        return workdir, daemon, webhook_client(self)

    async def place(self, workdir: Workdir, message: str = "Hi", mode: str = "conversation") -> str:
        result = await run_cli(self, workdir, "call", "--to", TO, "--message", message, "--mode", mode)
        self.assertEqual(result.code, 0, result.err)
        return result.json()["callId"]

    async def until_call(self, daemon: Daemon, call_id: str, check, what: str, timeout: float = 10.0) -> dict:
        async def matching() -> dict | None:
            call = await call_record(daemon.rpc_path, call_id)
            return call if check(call) else None

        return await eventually(matching, timeout, what)

    async def answer_and_greet(self, daemon: Daemon, web: WebhookClient, call_id: str, greeting: str = "Hi") -> dict:
        """Deliver `call.answered` and wait until the greeting is spoken and the call listens."""
        answered = await web.post(daemon.webhook_url, event("call.answered", call_id))
        self.assertEqual(answered.code, 200, answered.body)
        return await self.until_call(
            daemon,
            call_id,
            lambda c: c["state"] == "listening" and transcript(c) == [("bot", greeting)],
            "greeting spoken",
        )


class ConversationTests(_DaemonTestCase):
    """Outbound calls driven end to end through the CLI and mock webhooks."""

    async def test_conversation_turn(self):
        """A conversation call greets on answer, `continue` blocks until the caller's final speech and prints it, and `end` leaves a stored hangup-bot record."""
        workdir, daemon, web = await self.started()
        call_id = await self.place(workdir, "Hi", "conversation")
        await self.answer_and_greet(daemon, web, call_id)

        turn = spawn_cli(self, workdir, "continue", "--call-id", call_id, "--message", "How are you?")
        await self.until_call(daemon, call_id, lambda c: ("bot", "How are you?") in transcript(c), "prompt spoken")
        # The daemon would answer a continue that does not wait as it speaks the prompt; a whole
        # CLI run started after that reaches its client later than that answer would.
        await run_cli(self, workdir, "status", "--call-id", call_id)
        self.assertTrue(turn.running and not turn.out, "continue returned before the caller spoke\n" + turn.describe())

        spoken = await web.post(daemon.webhook_url, speech(call_id, "Fine thanks"))
        self.assertEqual(spoken.code, 200)
        await turn.ended()
        self.assertEqual(turn.exit_code, 0, turn.describe())
        self.assertEqual(json.loads(turn.stdout), {"success": True, "transcript": "Fine thanks"})

        status = (await run_cli(self, workdir, "status", "--call-id", call_id)).json()
        self.assertEqual(status["callId"], call_id)
        self.assertEqual(
            transcript(status), [("bot", "Hi"), ("bot", "How are you?"), ("user", "Fine thanks")]
        )
        self.assertEqual(status["state"], "listening")
        self.assertEqual(status["metadata"]["turnCount"], 1)
        self.assertNotIn("initialMessage", status["metadata"])

        ended = await run_cli(self, workdir, "end", "--call-id", call_id)
        self.assertEqual((ended.code, ended.json()), (0, {"success": True}))

        after = await run_cli(self, workdir, "status", "--call-id", call_id)
        self.assertEqual(after.code, 0, after.err)
        record = after.json()
        self.assertEqual((record["state"], record["endReason"]), ("hangup-bot", "hangup-bot"))
        self.assertIsNotNone(record.get("endedAt"))
        self.assertEqual(len(record["transcript"]), 3)
        active = await rpc(daemon.rpc_path, "voicecall.status")
        self.assertNotIn(call_id, [c["callId"] for c in active["calls"]])

    async def test_notify_call_hangs_up_after_delay(self):
        """A notify call speaks its message on answer and the daemon hangs it up notifyHangupDelaySec later."""
        workdir, daemon, web = await self.started(outbound={"notifyHangupDelaySec": 1})
        call_id = await self.place(workdir, "Your table is ready", "notify")
        answered = await web.post(daemon.webhook_url, event("call.answered", call_id))
        self.assertEqual(answered.code, 200)

        call = await self.until_call(daemon, call_id, lambda c: c["state"] in TERMINAL, "hang-up", timeout=10)
        self.assertEqual((call["state"], call["endReason"]), ("hangup-bot", "hangup-bot"))
        self.assertEqual(transcript(call), [("bot", "Your table is ready")])
        self.assertEqual(call["metadata"]["mode"], "notify")
        self.assertNotIn("initialMessage", call["metadata"])
        self.assertGreaterEqual(call["endedAt"] - call["answeredAt"], 1000)


class WebhookTests(_DaemonTestCase):
    """The webhook HTTP surface of a running daemon."""

    async def test_replayed_webhook_applied_once(self):
        """The same call.speech body posted twice is answered 200 both times and recorded once."""
        workdir, daemon, web = await self.started()
        call_id = await self.place(workdir)
        await self.answer_and_greet(daemon, web, call_id)

        body = json.dumps(speech(call_id, "Yes please")).encode()
        first = await web.post(daemon.webhook_url, body)
        second = await web.post(daemon.webhook_url, body)
        self.assertEqual((first.code, second.code), (200, 200))
        self.assertEqual(second.body, first.body)

        call = await call_record(daemon.rpc_path, call_id)
        self.assertEqual(transcript(call), [("bot", "Hi"), ("user", "Yes please")])

    async def test_malformed_bodies(self):
        """Malformed webhook bodies and unusable events get 400 (the mock says what was wrong), never 500, and the daemon keeps serving."""
        workdir, daemon, web = await self.started()
        call_id = await self.place(workdir)
        cases = [
            (b"not json", 400),
            (b"", 400),
            (b'[{"type": "call.answered"}]', 400),
            (json.dumps({"events": "call.answered"}).encode(), 400),
            (json.dumps({"event": {"type": "call.answered"}}).encode(), 400),
            (json.dumps({"event": {"type": "call.answered", "callId": 42}}).encode(), 400),
            (json.dumps({"event": {"type": "call.teleported", "callId": call_id}}).encode(), 400),
        ]
        got = [((await web.post(daemon.webhook_url, body)).code) for body, _ in cases]
        self.assertEqual(got, [code for _, code in cases])

        call = await call_record(daemon.rpc_path, call_id)
        self.assertEqual((call["state"], call.get("answeredAt"), call["transcript"]), ("initiated", None, []))
        await self.answer_and_greet(daemon, web, call_id)

    async def test_routes(self):
        """GET on the webhook path is 405, an unknown path is 404, and /voice/hold-music serves TwiML."""
        workdir, daemon, web = await self.started()
        wrong_method = await web.get(daemon.webhook_url)
        self.assertEqual(wrong_method.code, 405)
        self.assertEqual(wrong_method.headers.get("allow"), "POST")
        self.assertEqual((await web.get(daemon.base_url + "/elsewhere")).code, 404)
        self.assertEqual((await web.post(daemon.base_url + "/elsewhere", {"event": {}})).code, 404)
        music = await web.get(daemon.base_url + "/voice/hold-music")
        self.assertEqual(music.code, 200)
        self.assertTrue(music.headers["content-type"].startswith("text/xml"), music.headers)
        self.assertIn(b"<Response>", music.body)


class RestartTests(_DaemonTestCase):
    """What survives the daemon's death, and what the CLI does without it."""

    async def test_kill9_mid_call_restores_call(self):
        """After kill -9 a new daemon restores the live call with its transcript and still ignores webhooks delivered before the kill."""
        workdir, daemon, web = await self.started()
        call_id = await self.place(workdir)
        await self.answer_and_greet(daemon, web, call_id)
        heard = json.dumps(speech(call_id, "I am still here")).encode()
        self.assertEqual((await web.post(daemon.webhook_url, heard)).code, 200)
        await daemon.kill9()
        self.assertEqual(daemon.process.exit_signal, 9, daemon.process.describe())

        reborn = await spawn_daemon(self, workdir)
        status = await run_cli(self, workdir, "status", "--call-id", call_id)
        self.assertEqual(status.code, 0, status.err)
        call = status.json()
        self.assertNotIn(call["state"], TERMINAL)
        self.assertIsNotNone(call.get("answeredAt"))
        self.assertEqual(transcript(call), [("bot", "Hi"), ("user", "I am still here")])

        listing = await run_cli(self, workdir, "status")
        self.assertEqual(listing.code, 0, listing.err)
        self.assertIn(call_id, [c["callId"] for c in listing.json()["calls"]])

        replay = await web.post(reborn.webhook_url, heard)
        self.assertEqual(replay.code, 200)
        again = await call_record(reborn.rpc_path, call_id)
        self.assertEqual(transcript(again), [("bot", "Hi"), ("user", "I am still here")])

        self.assertEqual(await rpc(reborn.rpc_path, "voicecall.end", {"callId": call_id}), {"success": True})

    async def test_cli_without_daemon(self):
        """With the daemon down, `call` fails with one line naming the socket and `status` reads the store."""
        workdir, daemon, web = await self.started()
        call_id = await self.place(workdir)
        stopped = await daemon.stop()
        self.assertIn((stopped.exit_code, stopped.exit_signal), [(0, None), (None, 15)], stopped.describe())

        failed = await run_cli(self, workdir, "call", "--to", TO, "--message", "Hi")
        self.assertEqual(failed.code, 1, failed.err)
        self.assertEqual(failed.out, "")
        lines = failed.err.strip().splitlines()
        self.assertEqual(len(lines), 1, failed.err)
        self.assertIn(workdir.rpc_path, lines[0])
        self.assertNotIn("Traceback", failed.err)

        status = await run_cli(self, workdir, "status", "--call-id", call_id)
        self.assertEqual(status.code, 0, status.err)
        record = status.json()
        self.assertEqual((record["callId"], record["to"], record["state"]), (call_id, TO, "initiated"))


class RpcSocketTests(_DaemonTestCase):
    """The raw JSON-RPC socket under malformed and overlapping requests."""

    async def test_errors_keep_connection(self):
        """Parse errors, unknown methods and non-object params get their JSON-RPC codes and the same connection keeps answering."""
        workdir, daemon, web = await self.started()
        conn = await raw_rpc(self, daemon.rpc_path)
        bad = [
            (b"{this is not json", None, -32700),
            ({"jsonrpc": "2.0", "id": 2, "method": "voicecall.nonesuch", "params": {}}, 2, -32601),
            ({"jsonrpc": "2.0", "id": 3, "method": "voicecall.status", "params": [1, 2]}, 3, -32602),
        ]
        for n, (line, rid, code) in enumerate(bad):
            conn.send(line)
            error = await conn.answer(lambda m: "error" in m)
            self.assertEqual((error.get("id"), error["error"]["code"]), (rid, code), error)
            ok_id = f"ok-{n}"
            conn.request(ok_id, "voicecall.status", {})
            answer = await conn.answer_to(ok_id)
            self.assertEqual(answer.get("result"), {"calls": []}, answer)

    async def test_waiting_continue_does_not_block_connection(self):
        """A voicecall.continue left waiting does not hold up a later request on the same connection."""
        workdir, daemon, web = await self.started()
        placed = await rpc(daemon.rpc_path, "voicecall.initiate", {"to": TO, "message": "Hi", "mode": "conversation"})
        call_id = placed["callId"]
        await self.answer_and_greet(daemon, web, call_id)

        conn = await raw_rpc(self, daemon.rpc_path)
        conn.request("turn", "voicecall.continue", {"callId": call_id, "message": "Still there?"})
        conn.request("look", "voicecall.status", {"callId": call_id})
        look = await conn.answer_to("look")
        self.assertTrue(look["result"]["found"], look)
        self.assertEqual([m.get("id") for m in conn.received], [])

        await self.until_call(daemon, call_id, lambda c: ("bot", "Still there?") in transcript(c), "prompt spoken")
        self.assertEqual((await web.post(daemon.webhook_url, speech(call_id, "Yes"))).code, 200)
        turn = await conn.answer_to("turn")
        self.assertEqual(turn.get("result"), {"success": True, "transcript": "Yes"}, turn)


class ConfigTests(TestCase):
    """Start-up with a bad config file."""

    timeout = 60

    async def test_bad_config_exits_before_binding(self):
        """A config with several problems makes twistd exit non-zero, listing every problem, with nothing bound or stored."""
        workdir = make_workdir(self, {"bogus": 1, "serve": {"port": "abc"}})
        child = spawn(self, daemon_argv(workdir), cwd=workdir.path)
        await child.ended(20)
        self.assertNotEqual(child.exit_code, 0, child.describe())
        output = child.stdout + child.stderr
        self.assertIn(f"{workdir.config_path}: bogus: unknown key", output)
        self.assertIn(f'{workdir.config_path}: serve.port: expected an integer > 0 (got "abc")', output)
        self.assertNotIn("voicecall ready", output)
        self.assertEqual(sorted(os.listdir(workdir.path)), ["voicecall.json"])


class TailTests(_DaemonTestCase):
    """`voicecall tail` against a running daemon."""

    async def test_tail_follows_live_events(self):
        """`tail --since 5` prints recent events and then a new call's call.created line as it happens."""
        workdir, daemon, web = await self.started()
        first = (await rpc(daemon.rpc_path, "voicecall.initiate", {"to": TO, "message": "Hi"}))["callId"]

        def created(call_id):
            def find(child):
                for line in child.stdout.splitlines():
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(entry, dict) and entry.get("type") == "call.created" and entry.get("callId") == call_id:
                        return entry
                return None

            return find

        tail = spawn_cli(self, workdir, "tail", "--since", "5")
        await tail.until(created(first), 10, "history line of the first call")
        second = await self.place(workdir, "Hello again")
        entry = await tail.until(created(second), 5, "live call.created line")
        self.assertEqual((entry["to"], entry["direction"]), (TO, "outbound"))
        self.assertTrue(tail.running, tail.describe())
        tail.send_signal("KILL")
        await tail.ended()
