"""
examples/nginx/voicecall.conf, run for real: nginx (a child of the test, its own prefix, pid and
logs in a temporary directory, `daemon off;`, plain HTTP on a loopback port) in front of two
daemons on the Twilio provider, and the fake Twilio on the far side reaching them through it.

The test runs the example file itself, rendered by `render()`: it substitutes only the literals
the file's header lists (names, node addresses, file paths, `listen 443 ssl` and the `ssl_*`
lines, `user`), and fails if one of them is no longer in the file, so the example cannot drift
away from what is tested. Names: voice.example.com -> voice.test, node-a.voice.example.com ->
node-a.voice.test, and so on. Every carrier URL is `https://<name>/...` as in production; the
fake Twilio's HTTP client and the media client connect to nginx's plain port instead of
resolving the name (nginx there plays the TLS terminator's part).

Skipped, loudly, when no nginx is installed (tools/system_deps.sh installs it).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import IAgentEndpointFactory
from treq.client import HTTPClient
from twilio.request_validator import RequestValidator
from zope.interface import implementer

from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
from voicecall.testing.twilio_media import TwilioMediaClient
from tests.harness import (
    READY,
    READY_TIMEOUT,
    Daemon,
    daemon_argv,
    eventually,
    free_port,
    http_client,
    make_workdir,
    rpc,
    serve,
    spawn,
    speech_fakes,
    workdir,
)
from tests.pgserver import postgres_server

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "nginx", "voicecall.conf")
SID = "AC" + "1" * 32
FROM = "+15550000000"
TOKEN = "lb-auth-token"
SHARED = "voice.test"
NODES = ("a", "b")
MAX_BODY = 64 * 1024


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def node_name(node: str) -> str:
    return f"node-{node}.{SHARED}"


def render(template: str, *, port: int, nodes: dict[str, int], prefix: str, as_root: bool) -> str:
    """
    The example with test values: each literal of the file's header list replaced (every one must
    still be in the file), `ssl_*` lines dropped, and `user` set for a root master or dropped.
    """
    user = pwd.getpwnam("nobody")
    group = grp.getgrgid(user.pw_gid).gr_name
    literals = {
        "voice.example.com": SHARED,  # node-a.voice.example.com becomes node-a.voice.test too
        "10.0.0.11:3334": f"127.0.0.1:{nodes['a']}",
        "10.0.0.12:3334": f"127.0.0.1:{nodes['b']}",
        "/var/log/nginx/": prefix + "/logs/",
        "/var/lib/nginx/": prefix + "/temp/",
        "/run/": prefix + "/",
        "listen 443 ssl": f"listen 127.0.0.1:{port}",
        "user www-data;": f"user nobody {group};" if as_root else "",
    }
    for literal, value in literals.items():
        if literal not in template:
            raise AssertionError(f"{EXAMPLE} no longer contains {literal!r}: update its header and this test")
        template = template.replace(literal, value)
    rendered = "\n".join(line for line in template.splitlines() if not re.match(r"\s*ssl_", line)) + "\n"
    for leftover in ("example.com", "10.0.0.", "/var/", "ssl"):
        assert leftover not in re.sub(r"#.*", "", rendered), f"{leftover!r} left in the rendered config"
    return rendered


@implementer(IAgentEndpointFactory)
class ThroughProxy:
    """Every URL's connection goes to the proxy's plain port; the URL still gives Host and path."""

    def __init__(self, port: int) -> None:
        self.port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


class LoadBalancerTests(TestCase):
    timeout = 90

    async def start(self) -> None:
        nginx = find_nginx()
        if nginx is None:
            print("\n*** nginx not found: tests.test_loadbalancer skipped; install nginx (tools/system_deps.sh) ***", file=sys.stderr)
            raise SkipTest("nginx not found (tools/system_deps.sh installs it): the load-balancer example is untested")
        self.port = free_port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.carrier_http = HTTPClient(Agent.usingEndpointFactory(reactor, ThroughProxy(self.port), pool=pool))
        self.fake = FakeTwilio(reactor, SID, TOKEN, http=self.carrier_http, scenario=Scenario(utterances=[]))
        twilio_base = await serve(self, self.fake.resource())
        _, speech_base, self.stt = await speech_fakes(self)
        self.daemons: dict[str, Daemon] = {}
        self.metrics: dict[str, int] = {}
        self.listeners: dict[str, int] = {}
        for node in NODES:
            self.listeners[node] = free_port()
            self.metrics[node] = free_port()
            self.daemons[node] = await self.spawn_node(node, self.listeners[node], twilio_base, speech_base)
        self.http = http_client(self)
        self.nginx_dir = workdir(self)
        await self.start_nginx(nginx, self.listeners)
        self.addCleanup(self.hang_up)

    def node_config(self, node: str, twilio_base: str, speech_base: str) -> dict:
        """Node `node`'s config: its own name as publicUrl, nginx (loopback) as its trusted proxy."""
        return {
            "provider": "twilio",
            "fromNumber": FROM,
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
            "publicUrl": f"https://{node_name(node)}/voice/webhook",
            "webhookSecurity": {"trustedProxyIPs": ["127.0.0.1"]},
            "streaming": {"enabled": True, "openaiApiKey": "sk-stt", "sttBaseUrl": self.stt.url},
            "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
            "metrics": {"enabled": True, "port": self.metrics[node]},
        }

    async def spawn_node(self, node: str, listener: int, twilio_base: str, speech_base: str) -> Daemon:
        config = self.node_config(node, twilio_base, speech_base)
        work = make_workdir(self, config)
        if "store" in config:  # one shared store: make_workdir gives each node a directory of its own
            with open(work.config_path, encoding="utf-8") as f:
                written = json.load(f)
            with open(work.config_path, "w", encoding="utf-8") as f:
                json.dump({**written, "store": config["store"]}, f)
        argv = [a.replace("tcp:0:", f"tcp:{listener}:") for a in daemon_argv(work)]
        process = spawn(self, argv, cwd=work.path)
        match = await process.wait_for_output(READY, READY_TIMEOUT, f"node {node}'s ready line")
        return Daemon(workdir=work, process=process, webhook_url=match.group(1).decode(), rpc_path=match.group(2).decode())

    async def start_nginx(self, nginx: str, listeners: dict[str, int]) -> None:
        as_root = os.geteuid() == 0
        for sub in ("logs", "temp"):
            os.mkdir(os.path.join(self.nginx_dir, sub))
        if as_root:  # the workers run as nobody and must reach their temporary directories
            os.chmod(self.nginx_dir, 0o755)
        with open(EXAMPLE, encoding="utf-8") as f:
            config = render(f.read(), port=self.port, nodes=listeners, prefix=self.nginx_dir, as_root=as_root)
        path = os.path.join(self.nginx_dir, "voicecall.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        self.nginx = spawn(self, [nginx, "-p", self.nginx_dir + "/", "-c", path, "-g", "daemon off;"], cwd=self.nginx_dir)
        self.addCleanup(self.stop_nginx)

        async def answering():
            if not self.nginx.running:
                raise AssertionError(f"nginx exited\n{self.nginx.describe()}\n{self.error_log()}")
            try:
                return await self.request("GET", SHARED, "/")
            except Exception:
                return None

        await eventually(answering, 15, "nginx to answer")

    async def stop_nginx(self) -> None:
        """SIGTERM: the master stops its workers (a SIGKILLed master would leave them behind)."""
        self.nginx.send_signal("TERM")
        await self.nginx.ended()

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.nginx_dir, "logs", "voicecall-error.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    async def hang_up(self) -> None:
        for call in list(self.fake.calls.values()):
            call.hangup_by_callee()
        await self.fake.settle()

    async def request(self, method: str, host: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """One request to nginx naming `host`; returns (code, headers as a lower-case dict, body)."""
        all_headers = {b"Host": [host.encode()]}
        for name, value in (headers or {}).items():
            all_headers[name.encode()] = [value.encode()]
        response = await self.http.request(method, f"http://127.0.0.1:{self.port}{path}", headers=all_headers, data=body)
        content = await response.content()
        found = {k.decode().lower(): v[0].decode("latin-1") for k, v in response.headers.getAllRawHeaders()}
        return response.code, found, content

    async def signed_post(self, host: str, query: str = "", signed_query: str | None = None) -> tuple[int, dict, bytes]:
        """
        A status callback for an unknown call to `host`'s webhook path plus `query`, signed by the
        twilio SDK for `https://<host><path><signed_query>` (`query` unless told).
        """
        params = {"CallSid": "CA" + os.urandom(16).hex(), "CallStatus": "completed", "AccountSid": SID}
        path = "/voice/webhook"
        signed = f"https://{host}{path}{query if signed_query is None else signed_query}"
        signature = RequestValidator(TOKEN).compute_signature(signed, params)
        body = "&".join(f"{k}={v}" for k, v in params.items()).encode()
        return await self.request(
            "POST", host, path + query, body, {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        )

    async def hits(self, node: str) -> int:
        """How many webhook requests `node` has answered (any result), from its metrics."""
        response = await self.http.get(f"http://127.0.0.1:{self.metrics[node]}/metrics")
        text = (await response.content()).decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("voicecall_webhook_requests_total{")))

    # -- the tests ----------------------------------------------------------------------------

    async def test_each_node_name_reaches_its_node_with_streams(self):
        """A call placed on each node runs through nginx on that node's name only; its media stream upgrades and carries frames both ways."""
        await self.start()
        streams = {}
        for node in NODES:
            before = {n: await self.hits(n) for n in NODES}
            answer = await rpc(self.daemons[node].rpc_path, "voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "conversation"})
            call = await eventually(lambda: next((c for c in self.fake.calls.values() if c.sid not in {s[0] for s in streams.values()}), None), 10, "the fake call")
            stream = await call.next_stream()
            self.assertIsNotNone(stream, f"node {node}'s call ended before its stream TwiML: {self.fake.webhooks}")
            self.assertEqual(stream.url, f"wss://{node_name(node)}/voice/stream")
            streams[node] = (call.sid, stream, answer["callId"])
            other = next(n for n in NODES if n != node)
            self.assertGreater(await self.hits(node), before[node])
            self.assertEqual(await self.hits(other), before[other], f"node {other} saw node {node}'s callbacks")
        self.assertTrue(self.fake.webhooks)
        self.assertEqual({hook.status for hook in self.fake.webhooks if hook.status is not None}, {200})

        sid, stream, call_id = streams["a"]
        client = TwilioMediaClient(
            reactor,
            stream.url,
            call_sid=sid,
            account_sid=SID,
            token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
            via=TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        await client.connect()
        self.addCleanup(client.abort)
        await eventually(lambda: len(client.audio_received) > 800, 15, "the greeting's audio through nginx")
        await eventually(lambda: self.stt.appended_audio(), 15, "the caller's frames through nginx to STT")
        status = await rpc(self.daemons["a"].rpc_path, "voicecall.status", {"callId": call_id})
        self.assertNotIn(status["call"]["state"], ("failed", "error", "completed", "hangup-bot"))

    async def test_path_and_query_reach_the_node_as_signed(self):
        """A query with escapes, `+` and a doubled slash is passed on byte for byte: the node's signature check accepts it."""
        await self.start()
        for query in ("", "?callId=x&flow=a%2Fb%20c&t=+%2B&u=%7E~&v=", "?r=//x/../y&empty"):
            code, _, body = await self.signed_post(node_name("a"), query)
            self.assertNotEqual(code, 401, (query, body))
            self.assertLess(code, 500, (query, body))
        code, _, _ = await self.signed_post(node_name("a"), "?flow=tampered", signed_query="?flow=asked")
        self.assertEqual(code, 401)  # the node does check the URL
        self.assertEqual((await self.hits("a"), await self.hits("b")), (4, 0))

    async def test_shared_name_reaches_every_node(self):
        """The shared name spreads requests over the live nodes."""
        await self.start()
        for _ in range(6):
            code, _, _ = await self.signed_post(SHARED)
            self.assertLess(code, 500)
        self.assertEqual([await self.hits(n) > 0 for n in NODES], [True, True])

    async def test_node_name_fails_over(self):
        """With node A stopped, A's name reaches node B (at once: the refused connection is retried on the backup)."""
        await self.start()
        code, _, _ = await self.signed_post(node_name("a"))
        self.assertEqual((await self.hits("a"), await self.hits("b")), (1, 0))
        await self.daemons["a"].stop()
        for expected in (1, 2, 3):
            code, _, body = await self.signed_post(node_name("a"))
            self.assertLess(code, 500, body)
            self.assertEqual(await self.hits("b"), expected)
        code, _, _ = await self.signed_post(SHARED)
        self.assertLess(code, 500)
        self.assertEqual(await self.hits("b"), 4)

    async def test_limits_and_odd_requests(self):
        """An oversized body is refused by nginx; odd methods, names and paths reveal no version, address or port."""
        await self.start()
        name = node_name("a")
        signature = {"X-Twilio-Signature": "x", "Content-Type": "application/x-www-form-urlencoded"}
        code, _, _ = await self.request("POST", name, "/voice/webhook", b"a=" + b"b" * MAX_BODY, signature)
        self.assertEqual(code, 413)
        self.assertEqual(await self.hits("a") + await self.hits("b"), 0, "the oversized body reached a node")
        code, _, _ = await self.request("POST", name, "/voice/webhook", b"a=" + b"b" * (MAX_BODY - 2), signature)
        self.assertEqual(code, 401)  # the largest body nginx lets through reaches the node, which refuses a bad signature
        answers = [
            await self.request("HEAD", name, "/voice/webhook"),
            await self.request("OPTIONS", name, "/voice/webhook"),
            await self.request("TRACE", name, "/voice/webhook"),
            await self.request("PROPFIND", SHARED, "/voice/webhook"),
            await self.request("GET", name, "/voice/nothing-here"),
            await self.request("GET", SHARED, "/voice/stream"),
        ]
        before = await self.hits("a") + await self.hits("b")
        answers += [await self.request("GET", SHARED, "/metrics"), await self.request("HEAD", name, "/")]
        self.assertEqual(await self.hits("a") + await self.hits("b"), before, "a path outside /voice/ reached a node")
        codes = [code for code, _, _ in answers]
        self.assertEqual(codes[:2], [405, 405])
        self.assertEqual(answers[0][2], b"")
        self.assertEqual(answers[1][1].get("allow"), "POST")
        self.assertEqual(codes[2:], [405, 405, 404, 426, 404, 404])
        hidden = [str(port) for port in (*self.listeners.values(), *self.metrics.values())]
        for code, headers, body in answers:
            text = (" ".join(f"{k}: {v}" for k, v in headers.items()) + " " + body.decode("latin-1")).lower()
            self.assertNotRegex(text, r"nginx/\d|twisted|python|127\.0\.0\.1|" + "|".join(hidden), (code, text))
            self.assertEqual(headers.get("server", "nginx"), "nginx")
        # A name nginx does not serve is closed without an answer.
        with self.assertRaises(ResponseNeverReceived):
            await self.request("GET", "unknown.example.org", "/voice/webhook")


class LoadBalancerClusterTests(LoadBalancerTests):
    """
    The same through nginx, with the two nodes one cluster on one PostgreSQL (tests/pgserver.py),
    and what only a cluster does: the shared name is signed for (entryUrl) and takes inbound calls,
    and a crashed node's name reaches a live node that accepts its calls' callbacks.
    """

    async def start(self) -> None:
        self.store_url = postgres_server(self).new_database(self)
        await super().start()

    def node_config(self, node: str, twilio_base: str, speech_base: str) -> dict:
        return {
            **super().node_config(node, twilio_base, speech_base),
            "store": self.store_url,
            "cluster": {"nodeId": f"node-{node}", "entryUrl": f"https://{SHARED}/voice/webhook", "leaseSeconds": 3},
            "inboundPolicy": "open",
            "inboundGreeting": "Hello, caller",
            "maxConcurrentCalls": 4,
        }

    async def test_inbound_calls_on_the_shared_name(self):
        """Inbound calls to the entry URL are answered by the nodes in turn; each call's stream is on its owner's own name."""
        await self.start()
        for caller in ("+15550002001", "+15550002002"):
            call = self.fake.place_inbound_call(FROM, caller, f"https://{SHARED}/voice/webhook")
            stream = await call.next_stream()
            self.assertIsNotNone(stream, list(self.fake.webhooks))
            self.assertIn(stream.url, [f"wss://{node_name(n)}/voice/stream" for n in NODES])
            client = TwilioMediaClient(
                reactor,
                stream.url,
                call_sid=call.sid,
                account_sid=SID,
                token=stream.parameters.get("token"),
                headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
                via=TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
            )
            await client.connect()
            self.addCleanup(client.abort)
            await eventually(lambda client=client: len(client.audio_received) > 800, 15, "the greeting through nginx")
        self.assertEqual({hook.status for hook in self.fake.webhooks if hook.status is not None}, {200})
        self.assertEqual([await self.hits(n) > 0 for n in NODES], [True, True])

    async def test_crashed_node_name_reaches_a_live_node(self):
        """After kill -9 of node A, a callback signed for A's name reaches B through nginx and B accepts it."""
        await self.start()
        await self.daemons["a"].kill9()
        before = await self.hits("b")
        for host in (node_name("a"), SHARED, node_name("b")):
            code, _, body = await self.signed_post(host)
            self.assertNotIn(code, (401, 502, 503, 504), (host, body))
        self.assertEqual(await self.hits("b"), before + 3)

    async def test_node_killed_mid_stream(self):
        """
        kill -9 of the node streaming a call: the call streams again from node B, reached through
        nginx on B's own name (B adopts the call once A's lease has run out and points it at itself).
        """
        await self.start()
        await rpc(self.daemons["a"].rpc_path, "voicecall.initiate", {"to": "+15550001234", "message": "Hello", "mode": "conversation"})
        call = await eventually(lambda: next(iter(self.fake.calls.values()), None), 10, "the fake call")
        first = await self.attach(call)
        await eventually(lambda: len(first.audio_received) > 800, 15, "the greeting from node A")
        await self.daemons["a"].kill9()
        await first.closed
        heard = len(self.stt.appended_audio())
        second = await self.attach(call)
        self.assertEqual(second.url, f"wss://{node_name('b')}/voice/stream")
        await eventually(lambda: len(self.stt.appended_audio()) > heard, 15, "the caller's frames through nginx to node B")
        self.assertFalse(call.is_ended)

    async def attach(self, call) -> TwilioMediaClient:
        """Open the call's current or next stream through nginx; when it closes, Twilio goes on after `</Connect>`."""
        stream = await call.next_stream()
        self.assertIsNotNone(stream, list(self.fake.webhooks)[-3:])
        client = TwilioMediaClient(
            reactor,
            stream.url,
            call_sid=call.sid,
            account_sid=SID,
            token=stream.parameters.get("token"),
            headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)},
            via=TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        client.closed.addBoth(lambda result: (call.end_stream() if call.active_stream is stream else None, result)[1])
        await client.connect()
        self.addCleanup(client.abort)
        return client
