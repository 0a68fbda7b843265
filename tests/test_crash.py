"""
`kill -9` under load. A real `twistd voicecall` on the Twilio provider (REST: the fake Twilio in
this process) takes a burst of `voicecall.initiate` calls while signed status callbacks and Gather
speech results pour in; it is SIGKILLed mid-burst and restarted on the same store. Every call the
RPC acknowledged must be back with every transcript entry whose webhook got a 2xx (acknowledged
means committed, DESIGN.md), and the carrier re-sending every webhook must change nothing twice:
no duplicated transcript entry, no second state transition, no extra carrier API request.
"""
from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from voicecall.testing.twilio import FakeTwilio, sign_request

from tests import harness
from tests.harness import READY, READY_TIMEOUT, Daemon, call_record, daemon_argv, make_workdir, rpc, spawn, transcript, webhook_client

SID = "AC" + "3" * 32
TOKEN = "crash-token"
PUBLIC = "https://voice.example.com/voice/webhook"
TO = "+15550001234"
CALLS = 40
UTTERANCES = 4
#: SIGKILL once this many webhooks were acknowledged (of CALLS * (2 + UTTERANCES)).
KILL_AFTER = 90


async def start_daemon(testcase, workdir) -> tuple[Daemon, str]:
    """The daemon on a known loopback port (its webhook URL is the public one); returns it and its local base URL."""
    port = harness.free_port()
    argv = [a.replace("tcp:0:", f"tcp:{port}:") for a in daemon_argv(workdir)]
    process = spawn(testcase, argv, cwd=workdir.path)
    match = await process.wait_for_output(READY, READY_TIMEOUT, "voicecall ready line")
    daemon = Daemon(workdir=workdir, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())
    return daemon, f"http://127.0.0.1:{port}"


class Hook:
    """One signed Twilio webhook, re-sendable byte for byte (as Twilio retries)."""

    def __init__(self, call_id: str, url: str, params: dict[str, str], text: str | None = None) -> None:
        self.call_id = call_id
        self.url = url  # as Twilio was given it (PUBLIC origin)
        self.body = urlencode(params).encode()
        self.signature = sign_request(TOKEN, url, params)
        self.text = text
        self.status = params.get("CallStatus")
        self.acked = False

    async def send(self, web, base_url: str) -> int:
        parts = urlsplit(self.url)
        target = base_url + parts.path + ("?" + parts.query if parts.query else "")
        response = await web._http.post(
            target,
            data=self.body,
            headers={
                b"Content-Type": [b"application/x-www-form-urlencoded"],
                b"X-Twilio-Signature": [self.signature.encode()],
            },
        )
        await response.content()
        return response.code


class CrashTests(TestCase):
    timeout = 60

    async def test_kill9_under_load(self):
        """Acknowledged calls and transcript entries survive kill -9; retried webhooks apply once."""
        fake = FakeTwilio(reactor, SID, TOKEN)
        base = await harness.serve(self, fake.resource())
        workdir = make_workdir(
            self,
            {
                "provider": "twilio",
                "fromNumber": "+15550000000",
                "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": base},
                "publicUrl": PUBLIC,
                "maxConcurrentCalls": 200,
                "maxDurationSeconds": 3600,
            },
        )
        daemon, local = await start_daemon(self, workdir)
        web = webhook_client(self)
        gate = DeferredSemaphore(8)  # Twilio's many senders, within the per-IP in-flight cap
        acked_calls: list[str] = []
        hooks: list[Hook] = []
        killed: Deferred = Deferred()  # fires with why, and how many webhooks were acknowledged by then
        acked_hooks = [0]

        def kill(why: str) -> None:
            if not killed.called:
                daemon.process.send_signal("KILL")
                killed.callback((why, acked_hooks[0]))

        async def one_call(i: int) -> None:
            call_id = (await rpc(daemon.rpc_path, "voicecall.initiate", {"to": TO, "message": f"Notice {i}", "mode": "notify"}))["callId"]
            acked_calls.append(call_id)
            fake_call = next(c for c in fake.calls.values() if c.url and call_id in c.url)
            common = {"AccountSid": SID, "CallSid": fake_call.sid, "Direction": "outbound-api", "From": "+15550000000", "To": TO}
            plan = [
                Hook(call_id, fake_call.status_callback, {**common, "CallStatus": "ringing", "SequenceNumber": "0"}),
                Hook(call_id, fake_call.status_callback, {**common, "CallStatus": "in-progress", "SequenceNumber": "1"}),
            ] + [
                Hook(call_id, fake_call.url, {**common, "CallStatus": "in-progress", "SpeechResult": f"call {i} says {j}", "Confidence": "0.9"}, f"call {i} says {j}")
                for j in range(UTTERANCES)
            ]
            for hook in plan:
                hooks.append(hook)
                code = await gate.run(lambda h=hook: Deferred.fromCoroutine(h.send(web, local)))
                if 200 <= code < 300:
                    hook.acked = True
                    acked_hooks[0] += 1
                    if acked_hooks[0] >= KILL_AFTER:
                        kill("mid-burst")

        burst = [Deferred.fromCoroutine(one_call(i)) for i in range(CALLS)]
        done = DeferredList(burst, consumeErrors=True)
        done.addCallback(lambda _: kill("the burst finished"))
        why, acked_at_kill = await killed
        await daemon.process.ended()
        await done
        self.assertEqual(daemon.process.exit_signal, 9, daemon.process.describe())
        # The kill came mid-burst, after KILL_AFTER acknowledged webhooks of every kind, and
        # before the rest were sent or acknowledged: there is something to lose on both sides.
        self.assertEqual((why, acked_at_kill), ("mid-burst", KILL_AFTER), daemon.process.describe())
        acked = [h for h in hooks if h.acked]
        self.assertGreaterEqual(len(acked), KILL_AFTER)
        self.assertTrue(any(h.text for h in acked), "no acknowledged speech result")
        self.assertTrue(any(h.status == "in-progress" and not h.text for h in acked), "no acknowledged answer")
        self.assertLess(len(acked), CALLS * (2 + UTTERANCES), "killed too late to test anything")
        self.assertGreaterEqual(len(acked_calls), len({h.call_id for h in acked}))

        reborn, reborn_local = await start_daemon(self, workdir)
        checked = 0
        for call_id in acked_calls:
            call = await call_record(reborn.rpc_path, call_id)
            self.assertNotIn(call["state"], ("failed", "completed"), call)
            heard = [text for speaker, text in transcript(call) if speaker == "user"]
            for hook in hooks:
                if hook.call_id != call_id or not hook.acked:
                    continue
                if hook.text is not None:
                    self.assertIn(hook.text, heard)
                elif hook.status == "in-progress":
                    self.assertIsNotNone(call["answeredAt"], call)
                checked += 1
        self.assertEqual(checked, len(acked), "an acknowledged webhook's call is not among the acknowledged calls")

        # The carrier retries every webhook (acknowledged or not), twice.
        before = {c: await call_record(reborn.rpc_path, c) for c in acked_calls}
        api_requests = len(fake.requests)
        for round_ in range(2):
            for hook in hooks:
                code = await hook.send(web, reborn_local)
                self.assertEqual(code, 200)
            after = {c: await call_record(reborn.rpc_path, c) for c in acked_calls}
            for call_id, call in after.items():
                heard = [text for speaker, text in transcript(call) if speaker == "user"]
                self.assertEqual(len(heard), len(set(heard)), f"duplicated transcript entries: {heard}")
                sent = {h.text for h in hooks if h.call_id == call_id and h.text}
                self.assertEqual(set(heard), sent)
                if before[call_id]["answeredAt"] is not None:
                    self.assertEqual(call["answeredAt"], before[call_id]["answeredAt"])
                if sent:
                    self.assertEqual(call["state"], "listening", call)
                elif not any(h.call_id == call_id for h in hooks):
                    self.assertEqual(call, before[call_id], "a call no webhook was sent for changed")
            if round_ == 0:
                first = after
            else:
                self.assertEqual(after, first, "a second delivery changed a call")
        self.assertEqual(len(fake.requests), api_requests, "retried webhooks reached the carrier API")
        await reborn.stop()


class RetryOvertakesOriginalTests(TestCase):
    timeout = 30

    async def test_retry_waits_for_the_original_commit(self):
        """A Twilio retry that arrives while its original is still being committed is answered only after the commit."""
        fake = FakeTwilio(reactor, SID, TOKEN)
        base = await harness.serve(self, fake.resource())
        service, client = await harness.start_daemon(
            self,
            {
                "provider": "twilio",
                "fromNumber": "+15550000000",
                "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": base},
                "publicUrl": PUBLIC,
            },
        )
        call_id = (await client.call("voicecall.initiate", {"to": TO, "message": "Hi", "mode": "notify"}))["callId"]
        fake_call = next(iter(fake.calls.values()))
        params = {"AccountSid": SID, "CallSid": fake_call.sid, "Direction": "outbound-api", "CallStatus": "in-progress", "SpeechResult": "hello there"}
        hook = Hook(call_id, fake_call.url, params, "hello there")

        manager = service.manager
        store = manager._store
        held: list[Deferred] = []  # writes committed but not yet reported
        released = [False]

        class SlowStore:
            """The real store, whose commits are reported only once released."""

            def __getattr__(self, name):
                return getattr(store, name)

            def write(self, *args, **kwargs):
                reported: Deferred = Deferred()

                def committed(result):
                    if released[0]:
                        reported.callback(result)
                    else:
                        held.append((reported, result))

                store.write(*args, **kwargs).addCallbacks(committed, reported.errback)
                return reported

        def release() -> None:
            released[0] = True
            manager._store = store
            for reported, result in held:
                reported.callback(result)

        manager._store = SlowStore()
        self.addCleanup(setattr, manager, "_store", store)
        web = harness.http_client(self)
        host = service._webhook.port.getHost()
        base_url = f"http://127.0.0.1:{host.port}"

        class _Web:
            _http = web

        replays: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_format", "").startswith("replayed webhook acknowledged"):
                replays.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        original = Deferred.fromCoroutine(hook.send(_Web, base_url))
        await harness.eventually(lambda: held, 5, "the original's store write")
        retry = Deferred.fromCoroutine(hook.send(_Web, base_url))
        # Markers: the daemon has taken the retry for a replay (it answers one as soon as it may,
        # in that same step), and a later request's answer has come back after that.
        await harness.eventually(lambda: replays, 5, "the daemon to take the retry for a replay")
        after = await web.get(base_url + "/voice/webhook")
        await after.content()
        self.assertEqual(after.code, 405)
        self.assertFalse(retry.called, "the retry was acknowledged before the original was durable")
        self.assertFalse(original.called)
        release()
        self.assertEqual(await original, 200)
        self.assertEqual(await retry, 200)
        call = (await client.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual([t["text"] for t in call["transcript"] if t["speaker"] == "user"], ["hello there"])
