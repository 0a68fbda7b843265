"""
A slow-body webhook flood (SPEC §8.1 steps 5-7 [H], §20 item 16): the daemon (in process, Twilio,
the fake Twilio on loopback) takes hundreds of signed POSTs from many loopback addresses whose
headers arrive whole and whose bodies arrive a byte at a time or never. The caps must hold (at
most 8 in flight per address, the rest 429 before their bodies; the held ones 408 once the read
budget has passed however much they dribble), the daemon's sockets stay bounded, and a
legitimate status callback from another address is answered at once and changes the call.
Unsigned POSTs are 401 on their headers alone and take no in-flight slots.

Observables: the clients' own answers, the daemon's open webhook connections (the reactor's
readers accepted by the webhook port), its per-address in-flight counts, its open descriptors
(/proc/self/fd, clients included: the daemon is in process) and the /metrics endpoint.
"""
from __future__ import annotations

import os
import secrets
from urllib.parse import urlencode

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.web.limits import MAX_IN_FLIGHT_PER_IP

from tests.harness import eventually, free_port, http_client, raise_fd_limit, serve, start_daemon

SID = "AC" + "5" * 32
TOKEN = "slow-body-token"
#: The read budget for these tests (the daemon's is 5 s): long enough that the whole flood is sent
#: and refused before the first held request times out, short enough to keep the file quick.
READ_BUDGET = 4.0
FLOOD_IPS = [f"127.0.1.{n}" for n in range(1, 21)]
PER_IP = 40
#: Connections opened per address per round; each round waits for its 429s before the next.
PER_ROUND = 2
LEGIT_IP = "127.0.0.200"
DECLARED = 1000


def open_fds() -> int:
    """Descriptors open in this process (daemon and clients alike)."""
    return len(os.listdir("/proc/self/fd"))


class SlowPost(Protocol):
    """One POST whose headers are sent whole and whose body only drips (or never comes)."""

    def __init__(self, head: bytes, body: bytes = b"") -> None:
        self.head = head
        self.body = body
        self.buffer = b""
        self.sent_at: float | None = None
        self.answered_at: float | None = None
        self.status: int | None = None
        self.dripped = 0
        self.outcome: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.sent_at = reactor.seconds()
        self.transport.write(self.head + self.body)

    def drip(self) -> None:
        if self.transport is not None and self.status is None and self.transport.connected:
            self.transport.write(b"x")
            self.dripped += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.status is None and b"\r\n" in self.buffer:
            self.status = int(self.buffer.split(b" ", 2)[1])
            self.answered_at = reactor.seconds()

    def connectionLost(self, reason) -> None:
        if not self.outcome.called:
            self.outcome.callback(self.status if self.status is not None else "lost")


class WebhookFloodTests(TestCase):
    timeout = 40

    async def start(self) -> None:
        raise_fd_limit(self)
        self.http = http_client(self)
        # The call rings only when the test says so (by its own signed callback).
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.http, scenario=Scenario(ring_after=600))
        twilio_base = await serve(self, self.fake.resource())
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/voice/webhook"
        self.service, self.rpc = await start_daemon(
            self,
            {
                "provider": "twilio",
                "fromNumber": "+15550000000",
                "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
                "serve": {"port": self.port, "bind": "127.0.0.1"},
                "publicUrl": self.url,
                "metrics": {"enabled": True, "port": self.metrics_port},
            },
        )
        self.site = self.service._webhook._factory
        self.site.read_timeout = READ_BUDGET
        self.limiter = self.site._screen._limiter
        # These tests count slots per address; slow bodies yielding their slots to newcomers
        # (tests/test_webhook_screening.py) would blur the counts, so none is old enough here.
        self.limiter.evict_after = 3600.0
        self.clients: list[SlowPost] = []
        self.addCleanup(self.close_all)

    async def close_all(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()
        await eventually(lambda: self.server_connections() == 0, 5, "the daemon's webhook sockets closed")

    def server_connections(self) -> int:
        """Connections the webhook port accepted that are still open."""
        port = self.service._webhook.port
        return sum(1 for r in reactor.getReaders() if isinstance(r, tcp.Server) and r.server is port)

    def in_flight(self, ip: str) -> int:
        return self.limiter._counts.get(ip, 0)

    def head(self, signed: bool = True, length: int = DECLARED, extra: bytes = b"") -> bytes:
        head = (
            b"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n" % (self.port, length)
        )
        if signed:
            head += b"X-Twilio-Signature: %s\r\n" % sign_request(TOKEN, self.url).encode()
        return head + extra + b"\r\n"

    def post(self, ip: str, head: bytes, body: bytes = b"") -> SlowPost:
        client = SlowPost(head, body)
        self.clients.append(client)
        reactor.connectTCP("127.0.0.1", self.port, ClientFactory.forProtocol(lambda: client), timeout=10, bindAddress=(ip, 0))
        return client

    async def metric(self, result: str) -> float:
        text = await (await self.http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text()
        prefix = f'voicecall_webhook_requests_total{{result="{result}"}} '
        return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)

    async def live_call(self):
        """A placed call the fake carrier holds in `initiated` (its callback answered)."""
        call_id = (await self.rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello"}))["callId"]
        fake_call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 5, "the fake call")
        await self.fake.settle()
        self.assertEqual([hook.status for hook in self.fake.webhooks], [200])
        return call_id, fake_call

    def legit_ringing(self, fake_call) -> SlowPost:
        """The carrier's signed `ringing` status callback for the call, sent whole from LEGIT_IP."""
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
            b"Content-Length: %d\r\nX-Twilio-Signature: %s\r\nI-Twilio-Idempotency-Token: %s\r\nConnection: close\r\n\r\n"
            % (path, self.port, len(body), sign_request(TOKEN, url, params).encode(), secrets.token_hex(16).encode())
        )
        return self.post(LEGIT_IP, head, body)

    async def test_slow_body_flood(self):
        """800 slow bodies from 20 addresses: 8 held per address, the rest 429 at once, the held 408 at the budget; a real callback is served meanwhile."""
        await self.start()
        call_id, fake_call = await self.live_call()
        baseline_fds = open_fds()
        peak = {"server": 0, "fds": 0, "in_flight": 0, "per_ip": 0}

        def sample() -> None:
            counts = dict(self.limiter._counts)
            peak["server"] = max(peak["server"], self.server_connections())
            peak["fds"] = max(peak["fds"], open_fds() - baseline_fds)
            peak["in_flight"] = max(peak["in_flight"], sum(counts.get(ip, 0) for ip in FLOOD_IPS))
            peak["per_ip"] = max(peak["per_ip"], max(counts.values(), default=0))

        sampler = LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        dribblers: list[SlowPost] = []
        dripping = LoopingCall(lambda: [client.drip() for client in dribblers])
        dripping.start(0.05)
        self.addCleanup(lambda: dripping.running and dripping.stop())

        by_ip: dict[str, list[SlowPost]] = {ip: [] for ip in FLOOD_IPS}
        head = self.head()
        legit = None
        for round_ in range(PER_IP // PER_ROUND):
            for index, ip in enumerate(FLOOD_IPS):
                for _ in range(PER_ROUND):
                    client = self.post(ip, head)
                    by_ip[ip].append(client)
                    if index % 2:
                        dribblers.append(client)
            held = min(MAX_IN_FLIGHT_PER_IP, (round_ + 1) * PER_ROUND)
            await eventually(
                lambda held=held: all(
                    self.in_flight(ip) == held and sum(c.status is None for c in clients) == held
                    for ip, clients in by_ip.items()
                ),
                5,
                f"{held} held and the rest refused per address after round {round_}",
            )
            if legit is None and held == MAX_IN_FLIGHT_PER_IP:
                # Mid-flood, with 160 bodies held open, the carrier's real callback arrives.
                legit = self.legit_ringing(fake_call)
                self.assertEqual(await legit.outcome, 200)
                self.assertIn(b"<Response", legit.buffer)
                self.assertTrue(all(c.status is None for clients in by_ip.values() for c in clients[:held]))
        flood_sent = reactor.seconds()
        status = (await self.rpc.call("voicecall.status", {"callId": call_id}))["call"]
        self.assertEqual(status["state"], "ringing")

        outcomes = [await c.outcome for clients in by_ip.values() for c in clients]
        sampler.stop()
        dripping.stop()
        flood = [c for clients in by_ip.values() for c in clients]
        first_408 = min(c.answered_at for c in flood if c.status == 408)
        self.assertLess(flood_sent, first_408, "the flood was not sent within the read budget")
        for ip, clients in by_ip.items():
            statuses = sorted(c.status for c in clients)
            self.assertEqual(statuses, [408] * MAX_IN_FLIGHT_PER_IP + [429] * (PER_IP - MAX_IN_FLIGHT_PER_IP), ip)
        self.assertEqual(len(outcomes), len(FLOOD_IPS) * PER_IP)
        # The 429s came on the headers, before any held request's budget ran out; the 408s came at
        # the budget, not extended by a body that kept dribbling in.
        self.assertLess(max(c.answered_at for c in flood if c.status == 429), first_408)
        self.assertLess(legit.answered_at, first_408)
        for client in flood:
            if client.status == 408:
                self.assertGreaterEqual(client.answered_at - client.sent_at, READ_BUDGET - 0.05)
                self.assertIn(b"Request body not received within %gs" % READ_BUDGET, client.buffer)
        self.assertGreater(min(c.dripped for c in dribblers if c.status == 408), 10)
        self.assertTrue(all(c.dripped < DECLARED for c in dribblers))

        # Bounded: never more than 8 in flight per address, and the daemon's sockets track the
        # held requests (160) plus one round in transit, not the 800 sent.
        held_total = MAX_IN_FLIGHT_PER_IP * len(FLOOD_IPS)
        in_transit = PER_ROUND * len(FLOOD_IPS)
        self.assertEqual(peak["per_ip"], MAX_IN_FLIGHT_PER_IP, peak)
        self.assertEqual(peak["in_flight"], held_total, peak)
        self.assertLessEqual(peak["server"], held_total + in_transit + 4, peak)
        self.assertLessEqual(peak["fds"], 2 * (held_total + in_transit) + 16, peak)
        await eventually(lambda: self.server_connections() == 0 and len(self.limiter) == 0, 5, "every slot released")
        self.assertLessEqual(open_fds() - baseline_fds, 4)
        self.assertEqual(await self.metric("429"), len(FLOOD_IPS) * (PER_IP - MAX_IN_FLIGHT_PER_IP))
        self.assertEqual(await self.metric("408"), held_total)
        self.assertEqual(await self.metric("ok"), 2)

    async def test_unsigned_flood(self):
        """500 unsigned POSTs are 401 on their headers alone, take no slots, and leave no socket open."""
        await self.start()
        ips = [f"127.0.2.{n}" for n in range(1, 11)]
        seen = {"in_flight": 0, "server": 0}

        def sample() -> None:
            seen["in_flight"] = max(seen["in_flight"], sum(self.in_flight(ip) for ip in ips))
            seen["server"] = max(seen["server"], self.server_connections())

        sampler = LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        # Declared within the 64 KB cap, Expect: 100-continue: the body is neither needed nor invited.
        head = self.head(signed=False, length=60_000, extra=b"Expect: 100-continue\r\n")
        flood = []
        for round_ in range(50):
            flood += [self.post(ip, head) for ip in ips]
            await eventually(lambda flood=flood: all(c.outcome.called for c in flood), 5, f"401s for round {round_}")
        sampler.stop()
        self.assertEqual({c.status for c in flood}, {401})
        self.assertTrue(all(c.buffer.startswith(b"HTTP/1.1 401 Unauthorized\r\n") for c in flood))
        self.assertEqual(seen["in_flight"], 0)
        self.assertLessEqual(seen["server"], len(ips) + 4)
        self.assertEqual(await self.metric("401"), len(flood))

        # The same addresses still have all their slots for signed requests.
        signed = [self.post(ips[0], self.head()) for _ in range(MAX_IN_FLIGHT_PER_IP)]
        await eventually(lambda: self.in_flight(ips[0]) == MAX_IN_FLIGHT_PER_IP, 5, "8 signed requests held")
        self.assertTrue(all(c.status is None for c in signed))
        ninth = self.post(ips[0], self.head())
        self.assertEqual(await ninth.outcome, 429)
        for client in signed:
            client.transport.loseConnection()
        await eventually(lambda: len(self.limiter) == 0 and self.server_connections() == 0, 5, "slots released on disconnect")
