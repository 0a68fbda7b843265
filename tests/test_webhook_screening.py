"""
The webhook surface as an unauthenticated client sees it (issue 12 items 1, 2 and 9), on a real
listening daemon (in process: Twilio through the fake Twilio, media streaming on, all on loopback):

- every method on every path gets a deliberate answer (HEAD: GET's status without a body; other
  methods 405 with Allow; unknown paths 404), and none of them writes call state into the log;
- no object reachable from the daemon's service has a repr showing call state;
- refused requests write at most one short line each, and a flood of them a bounded log;
- behind a trusted proxy, slow bodies cannot starve a correctly signed Twilio webhook;
- a Twilio signature is checked over the configured public URL only (with or without the
  scheme's default port), never over a port named by the request's Host header.

Signatures for Twilio come from the official SDK's RequestValidator.
"""
from __future__ import annotations

import gc
import os
import secrets
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from voicecall.testing.twilio import FakeTwilio, Scenario
from voicecall.web import limits

from tests.harness import eventually, free_port, http_client, raise_fd_limit, serve, speech_fakes, start_daemon, workdir

SID = "AC" + "7" * 32
TOKEN = "screening-token"
#: Distinctive call state: none of it may ever reach the log or a repr.
SECRET_NUMBER = "+15557654321"
SECRET_MESSAGE = "Quetzalcoatl-marmalade-4417"
METHODS = [b"HEAD", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"POST", b"BREW", b"M-SEARCH"]


class RawClient(Protocol):
    """One raw HTTP exchange: sends `data` (and then whatever `send` is given), records the answer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buffer = b""
        self.sent_at: float | None = None
        self.answered_at: float | None = None
        self.status: int | None = None
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.sent_at = reactor.seconds()
        self.transport.write(self.data)

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.transport.connected and self.status is None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.status is None and b"\r\n" in self.buffer:
            self.status = int(self.buffer.split(b" ", 2)[1])
            self.answered_at = reactor.seconds()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(self)

    @property
    def headers(self) -> dict[bytes, bytes]:
        head = self.buffer.split(b"\r\n\r\n", 1)[0]
        out = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            out[name.strip().lower()] = value.strip()
        return out

    @property
    def body(self) -> bytes:
        return self.buffer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.buffer else b""


class LogCapture:
    """Every log event published while installed, as the text a file observer would write."""

    def __init__(self, testcase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def mark(self) -> int:
        return len(self.events)

    def text(self, since: int = 0) -> str:
        lines = []
        for event in self.events[since:]:
            line = formatEvent(event) or ""
            failure = event.get("log_failure")
            if failure is not None:
                line += "\n" + failure.getTraceback()
            lines.append(line)
        return "\n".join(lines)


class ScreeningTests(TestCase):
    timeout = 60

    async def start(self, *, streaming: bool = True, proxy: bool = False, public_url: str | None = None) -> None:
        raise_fd_limit(self)
        self.log = LogCapture(self)
        self.http = http_client(self)
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.http, scenario=Scenario(utterances=[]) if streaming else Scenario(ring_after=600))
        twilio_base = await serve(self, self.fake.resource())
        self.port = free_port()
        self.url = public_url or f"http://127.0.0.1:{self.port}/voice/webhook"
        config = {
            "provider": "twilio",
            "fromNumber": "+15550000000",
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
            "serve": {"port": self.port, "bind": "127.0.0.1"},
            "publicUrl": self.url,
        }
        if streaming:
            self.speech, speech_base, self.stt = await speech_fakes(self)
            config["streaming"] = {"enabled": True, "providers": {"openai": {"apiKey": "sk-stt"}}, "sttBaseUrl": self.stt.url}
            config["tts"] = {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}}
        if proxy:
            config["webhookSecurity"] = {"trustedProxyIPs": ["127.0.0.1"]}
        directory = workdir(self)
        # The config holds the auth token: readable by its owner only, as the daemon asks.
        os.close(os.open(os.path.join(directory, "voicecall.json"), os.O_CREAT | os.O_WRONLY, 0o600))
        self.service, self.rpc = await start_daemon(self, config, directory)
        self.clients: list[RawClient] = []
        self.addCleanup(self.close_all)

    async def close_all(self) -> None:
        for client in self.clients:
            if client.transport is not None and client.transport.connected:
                client.transport.abortConnection()
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    def connect(self, data: bytes, ip: str = "127.0.0.1") -> RawClient:
        client = RawClient(data)
        self.clients.append(client)
        factory = ClientFactory.forProtocol(lambda: client)
        factory.noisy = False
        reactor.connectTCP("127.0.0.1", self.port, factory, timeout=10, bindAddress=(ip, 0))
        return client

    async def exchange(self, method: bytes, path: bytes, extra: bytes = b"", body: bytes = b"") -> RawClient:
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (method, path, self.port)
        if body or method in (b"POST", b"PUT", b"PATCH"):
            head += b"Content-Length: %d\r\n" % len(body)
        client = self.connect(head + extra + b"\r\n" + body)
        return await client.done

    async def live_call(self):
        """A conversation call with a distinctive number and greeting, and its live stream token."""
        call_id = (
            await self.rpc.call(
                "voicecall.initiate", {"to": SECRET_NUMBER, "message": SECRET_MESSAGE, "mode": "conversation"}
            )
        )["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        stream = await fake_call.next_stream()
        token = stream.parameters.get("token")
        self.assertTrue(token)
        return call_id, fake_call, token

    def sign(self, url: str, params: dict) -> str:
        return RequestValidator(TOKEN).compute_signature(url, params)

    def assert_clean(self, text: str, secrets_: tuple[str, ...]) -> None:
        for secret in secrets_:
            self.assertNotIn(secret, text)

    # -- item 1: deliberate answers, and nothing of the call in the log ------------------------

    async def test_every_method_and_path_answers_without_logging_state(self):
        """HEAD/GET/PUT/DELETE/OPTIONS/PATCH/odd methods on the webhook, stream and random paths: deliberate answers, a clean and small log."""
        await self.start()
        call_id, fake_call, token = await self.live_call()
        secrets_ = (SECRET_NUMBER, SECRET_NUMBER[1:], SECRET_MESSAGE, token)
        mark = self.log.mark()
        answers = {}
        paths = [b"/voice/webhook", b"/voice/webhook/", b"/voice/stream", b"/nope/" + secrets.token_hex(4).encode(), b"/", b"/voice/hold-music"]
        for path in paths:
            for method in METHODS:
                answers[path, method] = await self.exchange(method, path)
        text = self.log.text(mark)
        self.assert_clean(text, secrets_)
        # At most one short line per request, however the request ends.
        self.assertLess(len(text.encode()), 300 * len(answers), text[:2000])

        for path in paths:
            get = answers[path, b"GET"]
            head = answers[path, b"HEAD"]
            self.assertEqual(head.status, get.status, path)
            self.assertEqual(head.body, b"", path)
        for path in (b"/voice/webhook", b"/voice/webhook/"):
            for method in METHODS:
                answer = answers[path, method]
                if method == b"POST":
                    self.assertEqual(answer.status, 401)
                else:
                    self.assertEqual(answer.status, 405, method)
                    self.assertEqual(answer.headers.get(b"allow"), b"POST", method)
        for method in METHODS:
            self.assertEqual(answers[paths[3], method].status, 404, method)
            self.assertEqual(answers[b"/", method].status, 404, method)
            stream = answers[b"/voice/stream", method]
            if method in (b"GET", b"HEAD"):
                self.assertEqual(stream.status, 426, method)
            else:
                self.assertEqual(stream.status, 405, method)
                self.assertEqual(stream.headers.get(b"allow"), b"GET", method)
            if method not in (b"GET", b"HEAD", b"POST"):
                self.assertEqual(answers[b"/voice/hold-music", method].status, 405, method)
        self.assertEqual(answers[b"/voice/hold-music", b"GET"].status, 200)

        # The call is untouched and its token still starts its stream.
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(status["to"], SECRET_NUMBER)

    async def test_no_reachable_repr_shows_call_state(self):
        """Walk every object reachable from the daemon's service: no repr holds the number, the greeting or the stream token."""
        await self.start()
        call_id, fake_call, token = await self.live_call()
        await eventually(lambda: self.service._webhook is not None, 5, "the webhook")
        secrets_ = (SECRET_NUMBER, SECRET_MESSAGE, token)
        seen: set[int] = set()
        frontier = [self.service]
        checked = 0
        offenders = []
        containers = (dict, list, tuple, set, frozenset)
        for _depth in range(12):
            following = []
            for obj in frontier:
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                module = type(obj).__module__ or ""
                ours = module.startswith("voicecall") and not module.startswith("voicecall.testing")
                if ours:
                    checked += 1
                    text = repr(obj)
                    if any(secret in text for secret in secrets_):
                        offenders.append((type(obj).__qualname__, text[:300]))
                if ours or isinstance(obj, containers) or hasattr(obj, "__dict__") and module.startswith("voicecall"):
                    following.extend(
                        r for r in gc.get_referents(obj)
                        if isinstance(r, containers) or (type(r).__module__ or "").startswith("voicecall")
                    )
            frontier = following
        self.assertGreater(checked, 20)
        self.assertEqual(sorted({name for name, _ in offenders}), [], offenders[:3])

    async def test_refused_requests_write_a_bounded_log(self):
        """1000 refused requests (unsigned, badly signed, oversized, wrong path) write one short line each at most, rate-limited."""
        await self.start(streaming=False)
        call_id, fake_call = await self.call_without_stream()
        mark = self.log.mark()
        long_path = b"/voice/webhook?x=" + b"A" * 3000 + b"%0a%1b[31m" + SECRET_NUMBER.encode()
        kinds = [
            (b"POST", long_path, b"X-Twilio-Signature: " + b"B" * 4000 + b"\r\n", b"CallSid=" + fake_call.sid.encode()),
            (b"POST", long_path, b"", b"x=1"),
            (b"POST", b"/voice/webhook", b"X-Twilio-Signature: bad\r\nX-Evil: \x1b[2J" + b"C" * 2000 + b"\r\n", b"x=" + SECRET_NUMBER.encode()),
        ]
        outcomes = []
        for round_ in range(50):
            batch = []
            for i in range(20):
                method, path, extra, body = kinds[(round_ * 20 + i) % len(kinds)]
                batch.append(self.exchange(method, path, extra, body))
            for d in batch:
                outcomes.append((await d).status)
        self.assertEqual(len(outcomes), 1000)
        self.assertEqual(set(outcomes), {401})
        text = self.log.text(mark)
        self.assert_clean(text, (SECRET_NUMBER, "A" * 300, "B" * 300, "C" * 300))
        self.assertNotIn("\x1b", text)
        lines = [line for line in text.split("\n") if line]
        self.assertTrue(all(len(line) < 500 for line in lines), max(map(len, lines)))
        # Rate limited: a few dozen lines, and a summary of what was left out.
        self.assertLess(len(text.encode()), 20_000)
        self.assertIn("suppressed", text)

    async def call_without_stream(self):
        call_id = (await self.rpc.call("voicecall.initiate", {"to": SECRET_NUMBER, "message": SECRET_MESSAGE}))["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        await self.fake.settle()
        return call_id, fake_call

    # -- item 2: behind a trusted proxy, slow bodies cannot starve a signed webhook ------------

    def ringing(self, fake_call, forwarded_for: str | None, split: bool = False) -> RawClient:
        params = {
            "AccountSid": SID,
            "ApiVersion": "2010-04-01",
            "CallSid": fake_call.sid,
            "CallStatus": "ringing",
            "Direction": "outbound-api",
            "From": fake_call.from_,
            "To": fake_call.to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": "1",
        }
        url = fake_call.status_callback
        body = urlencode(params).encode()
        path = url.split(f":{self.port}", 1)[1].encode()
        head = (
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\nX-Twilio-Signature: %s\r\nI-Twilio-Idempotency-Token: %s\r\nConnection: close\r\n"
            % (path, self.port, len(body), self.sign(url, params).encode(), secrets.token_hex(16).encode())
        )
        if forwarded_for:
            head += b"X-Forwarded-For: %s\r\n" % forwarded_for.encode()
        head += b"\r\n"
        if not split:
            return self.connect(head + body)
        client = self.connect(head)
        reactor.callLater(0.02, client.send, body)
        return client

    def slow_bodies(self, count: int, forwarded_for: str | None) -> list[RawClient]:
        head = (
            b"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1000\r\nX-Twilio-Signature: %s\r\n" % (self.port, self.sign(self.url, {}).encode())
        )
        if forwarded_for:
            head += b"X-Forwarded-For: %s\r\n" % forwarded_for.encode()
        clients = [self.connect(head + b"\r\n") for _ in range(count)]
        drip = LoopingCall(lambda: [c.send(b"x") for c in clients])
        drip.start(0.05)
        self.addCleanup(lambda: drip.running and drip.stop())
        return clients

    async def test_slow_bodies_behind_proxy_do_not_starve_signed_webhook(self):
        """Behind a trusted proxy (every peer is 127.0.0.1), 50 slow signed-looking bodies: the carrier's signed callback is still answered at once."""
        await self.start(streaming=False, proxy=True)
        call_id, fake_call = await self.call_without_stream()
        for forwarded_for in (None, "198.51.100.9", "203.0.113.50, 198.51.100.9"):
            flood = self.slow_bodies(50, forwarded_for)
            # Marker: all 50 reached the daemon, which refused all but the in-flight cap's worth.
            await eventually(
                lambda flood=flood: sum(c.status is not None for c in flood) >= 50 - limits.MAX_IN_FLIGHT_PER_IP
                and len(self.slots_held_since()) == limits.MAX_IN_FLIGHT_PER_IP,
                10,
                "the flood to fill the in-flight cap",
            )
            self.assertTrue(any(c.status is None for c in flood))
            # The carrier comes through the same proxy, from its own address (or none).
            for carrier in (None, "54.172.60.1"):
                legit = self.ringing(fake_call, carrier)
                await legit.done
                self.assertEqual(legit.status, 200, legit.buffer[:200])
                waited = legit.answered_at - legit.sent_at
                self.assertLess(waited, 1.0)  # not a slot freed by a 5 s read budget
                self.log_figure(forwarded_for, carrier, waited)
            # A carrier whose body comes in a second segment, once the flood has been slow a while.
            await eventually(
                lambda: reactor.seconds() - min(self.slots_held_since()) >= limits.EVICT_PENDING_AFTER_SECONDS,
                5,
                "the oldest held slot to become evictable",
            )
            legit = self.ringing(fake_call, "54.172.60.1", split=True)
            await legit.done
            self.assertEqual(legit.status, 200, legit.buffer[:200])
            for client in flood:
                client.transport.abortConnection()
            await eventually(lambda flood=flood: all(c.done.called for c in flood), 5, "the flood closed")
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(status["state"], "ringing")

    def slots_held_since(self) -> list[float]:
        """When each request holding a slot of the webhook's in-flight limiter took it (on the reactor's clock)."""
        limiter = self.service._webhook._factory._screen._limiter
        return [since for _client, since, _on_evict in limiter._holders.values()]

    def log_figure(self, forwarded_for, carrier, waited) -> None:
        print(f"signed webhook behind the flood (flood XFF {forwarded_for!r}, carrier XFF {carrier!r}): {waited * 1000:.1f} ms")

    # -- item 9: the Twilio signature's port comes from the configured public URL only ---------

    async def test_twilio_port_only_from_public_url(self):
        """Signed over the public URL (with or without :443): 200. Signed over the same URL with the Host header's port: 401."""
        await self.start(streaming=False, public_url="https://voice.example.test/voice/webhook")
        call_id, fake_call = await self.call_without_stream()

        async def post(signed_url: str, host: str) -> int:
            params = {"AccountSid": SID, "CallSid": fake_call.sid, "CallStatus": "ringing", "Direction": "outbound-api",
                      "From": fake_call.from_, "To": fake_call.to, "Nonce": secrets.token_hex(8)}
            body = urlencode(params).encode()
            head = (
                b"POST /voice/webhook HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\nX-Twilio-Signature: %s\r\nConnection: close\r\n\r\n"
                % (host.encode(), len(body), self.sign(signed_url, params).encode())
            )
            return (await self.connect(head + body).done).status

        self.assertEqual(await post("https://voice.example.test/voice/webhook", "voice.example.test"), 200)
        self.assertEqual(await post("https://voice.example.test:443/voice/webhook", "voice.example.test"), 200)
        for port in ("8443", "4431", str(self.port)):
            self.assertEqual(await post(f"https://voice.example.test:{port}/voice/webhook", f"voice.example.test:{port}"), 401, port)
        self.assertEqual(await post("http://voice.example.test/voice/webhook", "voice.example.test"), 401)

    # -- found by attacking the running daemon ------------------------------------------------

    def signed_ringing_bytes(self, fake_call, query: str = "") -> bytes:
        """One signed status callback, as captured on the wire (replayable byte for byte)."""
        params = {"AccountSid": SID, "CallSid": fake_call.sid, "CallStatus": "ringing", "Direction": "outbound-api",
                  "From": fake_call.from_, "To": fake_call.to}
        body = urlencode(params).encode()
        return (
            b"POST /voice/webhook%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\nX-Twilio-Signature: %s\r\nConnection: close\r\n\r\n%s"
            % (query.encode(), self.port, len(body), self.sign(self.url + query, params).encode(), body)
        )

    async def test_replays_of_one_captured_request_write_a_bounded_log(self):
        """One captured signed request replayed 300 times: each answered 200 without effect, and the log stays a few lines."""
        await self.start(streaming=False)
        call_id, fake_call = await self.call_without_stream()
        captured = self.signed_ringing_bytes(fake_call)
        self.assertEqual((await self.connect(captured).done).status, 200)
        mark = self.log.mark()
        statuses = []
        for _round in range(15):
            batch = [self.connect(captured).done for _ in range(20)]
            for d in batch:
                statuses.append((await d).status)
        self.assertEqual(set(statuses), {200})
        text = self.log.text(mark)
        # Before: one "replayed webhook acknowledged" line per replay (~40 bytes of message each, unbounded).
        self.assertLess(len([line for line in text.split("\n") if "replay" in line]), 15, text[:3000])
        self.assertIn("suppressed", text)

    async def test_refusal_reason_never_logs_the_query(self):
        """A badly signed request's refusal reason names the URL it was checked over, without its query (call ids, turn tokens)."""
        await self.start(streaming=False)
        call_id, fake_call = await self.call_without_stream()
        mark = self.log.mark()
        query = "?callId=%s&turnToken=TT-%s" % (call_id, SECRET_MESSAGE)
        forged = self.signed_ringing_bytes(fake_call, query).replace(b"X-Twilio-Signature: ", b"X-Twilio-Signature: AAAA")
        self.assertEqual((await self.connect(forged).done).status, 401)
        text = self.log.text(mark)
        self.assertIn("Invalid signature", text)
        self.assert_clean(text, (call_id, SECRET_MESSAGE, "turnToken"))

    def buffered_bodies(self) -> tuple[int, int]:
        """(requests whose body is arriving, body bytes they hold in memory or on disk)."""
        requests = [o for o in gc.get_objects() if isinstance(o, limits.ScreenedRequest) and o._received and not o._body_done
                    and not getattr(o.content, "closed", False)]  # a finished request (an earlier test's) is not arriving  # fmt: skip
        return len(requests), sum(r.content.tell() for r in requests)

    async def test_bodies_no_answer_needs_are_not_buffered(self):
        """Slow bodies sent anywhere but a signed-looking webhook POST (unknown paths, other methods, hold music, the stream path, chunked) hold no body bytes: they need no slot, so they must cost nothing."""
        await self.start()
        targets = [b"POST /nope", b"PUT /voice/webhook", b"PATCH /voice/webhook/", b"POST /voice/hold-music",
                   b"POST /voice/stream", b"POST https://evil.example/voice/webhook"]
        clients = []
        for i, target in enumerate(targets * 3):
            ip = "127.0.0.%d" % (2 + i)
            head = b"%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % target
            clients.append(self.connect(head + b"Content-Length: 65000\r\n\r\n" + b"a" * 60000, ip))
            clients.append(self.connect(head + b"Transfer-Encoding: chunked\r\n\r\nea60\r\n" + b"a" * 60000, ip))
        arriving = await eventually(lambda: (lambda n_b: n_b if n_b[0] == len(clients) else None)(self.buffered_bodies()), 10, "every body arriving")
        # Before: 60000 bytes each (1 MB here; 20,000 connections would hold 1.2 GB), chunked ones in temporary files.
        self.assertEqual(arriving, (len(clients), 0))
        self.assertTrue(all(c.status is None for c in clients))
        for client in clients[:2]:
            client.send(b"a" * 5000 if client is clients[0] else b"\r\n0\r\n\r\n")
        answered = [await c.done for c in clients[:2]]
        self.assertEqual([c.status for c in answered], [404, 404])

    def daemon_channels(self) -> list:
        """The daemon's HTTP channels on real sockets (other tests' in-memory ones may still be about)."""
        return [
            o for o in gc.get_objects()
            if isinstance(o, limits.ScreenedChannel) and isinstance(o.transport, tcp.Server) and o.transport.server is self.service._webhook.port
        ]

    def queued_for_peers(self) -> int:
        """Bytes the daemon holds for its HTTP peers: answers not yet sent, requests read but not parsed."""
        total = 0
        for channel in self.daemon_channels():
            transport = channel.transport
            if not transport.connected:
                continue
            total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            total += len(channel._buffer) + sum(map(len, channel._dataBuffer))
        return total

    async def test_pipelining_client_that_never_reads_is_bounded(self):
        """A client pipelines 4 MB of tiny requests and never reads an answer: the daemon stops reading it instead of queueing answers without end."""
        await self.start(streaming=False)
        request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        client = self.connect(b"")
        await eventually(lambda: client.transport is not None and client.transport.connected or None, 5, "connected")
        client.transport.pauseProducing()  # never read an answer
        client.transport.write(request * (4_000_000 // len(request)))

        def stopped_reading():
            return [c for c in self.daemon_channels() if c.paused]

        # Before: Twisted kept reading while the answers piled up (several MB per connection).
        await eventually(stopped_reading, 10, "the daemon to stop reading the client that does not read")
        self.assertLess(self.queued_for_peers(), 1_000_000)
        client.transport.abortConnection()
