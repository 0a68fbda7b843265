"""
Benchmark: signed Twilio status callbacks through the whole webhook pipeline of a real daemon.

The server is a child process pinned to CPU 0: the real C{tap.makeService} composition on the
twilio provider, its REST API pointed at the fake Twilio (voicecall.testing.twilio, served in the
same child and used only to place the calls), with C{--calls} outbound calls placed over the RPC
socket before the load starts. The load generator is this process, pinned to CPU 1: asyncio with
raw keep-alive sockets spread over eight loopback source addresses (the daemon allows 8 requests
in flight per address), every request pre-built and signed (X-Twilio-Signature, HMAC-SHA1 as
Twilio computes it; checked once against the twilio SDK's RequestValidator). Every request is
unique (its SequenceNumber), so each one goes through signature check, replay check, parse,
CallManager.process_event and a durable store commit: per call a C{ringing} then an
C{in-progress} callback change its state, later ones are recorded without a state change.

Phases, for the daemon and then for a bare twisted.web resource that only answers 200 (the
ceiling of the stack, same requests, same generator):
  - closed loop with C{--connections} connections: sustained requests/s, p50/p99 latency;
  - open loop at C{--rate} (500) requests/s: p50/p99/max latency from each request's send;
  - (daemon only) replays: already-delivered requests sent again, acknowledged without effect.
The generator's own CPU use is reported so that a saturated generator would be visible.

Targets (DESIGN.md): at least 3,000 callbacks/s sustained, p99 under 5 ms at 500/s.

Run:  .venv/bin/python -m benchmarks.webhooks [--quick] [--seconds 8] [--connections 16]
      [--rate 500] [--calls 2000] [--profile]   (results: var/bench/webhooks.json)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from collections import Counter
from urllib.parse import urlencode

from benchmarks.common import (
    cpu_seconds,
    percentile,
    pin,
    spawn,
    stop,
    last_json,
    table,
    write_json,
)

SID = "AC" + "0" * 32
TOKEN = "bench-twilio-auth-token"
FROM = "+15550000000"
TO = "+15550001234"
SOURCE_IPS = [f"127.0.0.{i}" for i in range(2, 10)]
TARGET_RPS = 3000.0
TARGET_P99_MS = 5.0


# --- the server child ------------------------------------------------------------------------------


def serve(mode: str, calls: int, cpu: int | None, profile: str | None) -> int:
    """Run the daemon (or the bare resource) until SIGTERM; print READY first and STATS last."""
    pin(cpu)
    import shutil
    import tempfile

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    state: dict = {}

    class Ok(Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"text/xml")
            return b"<Response></Response>"

    async def start_bare():
        site = Site(Ok())
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        return {"port": port.getHost().port, "url": f"http://127.0.0.1:{port.getHost().port}/voice/webhook", "calls": []}

    async def start_daemon():
        from voicecall import tap
        from voicecall.client import connect
        from voicecall.testing.twilio import FakeTwilio

        directory = tempfile.mkdtemp(prefix="vc-bench-webhooks-")
        state["dir"] = directory
        fake = FakeTwilio(reactor, SID, TOKEN)  # no HTTP client: calls stay queued, we drive them
        fake_site = Site(fake.resource())
        fake_site.noisy = False
        fake_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(fake_site)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = {
            "provider": "twilio",
            "fromNumber": FROM,
            "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": f"http://127.0.0.1:{fake_port.getHost().port}"},
            "serve": {"port": port, "bind": "127.0.0.1"},
            "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
            "maxConcurrentCalls": calls + 10,
            "maxDurationSeconds": 3600,
            "outbound": {"defaultMode": "conversation"},
            "store": directory,
        }
        path = os.path.join(directory, "voicecall.json")
        with open(path, "w") as f:
            json.dump(config, f)
        options = tap.Options()
        options.parseOptions(["--config", path, "--rpc", f"unix:{directory}/rpc.sock"])
        service = tap.makeService(options, reactor)
        service.startService()
        state["service"] = service
        await service.ready
        client = await connect(reactor, f"{directory}/rpc.sock")
        sem = DeferredSemaphore(32)
        await gatherResults(
            [sem.run(client.call, "voicecall.start", {"to": TO, "mode": "conversation"}) for _ in range(calls)]
        )
        client.transport.loseConnection()
        placed = [(c.sid, c.status_callback) for c in fake.calls.values()]
        return {"port": port, "url": service.webhook_url, "calls": placed}

    def ready(info):
        if "profiler" in state:
            state["profiler"].enable()  # the steady state only, not start-up and call placing
        print("READY " + json.dumps(info), flush=True)

    def failed(f):
        print(f"server failed: {f.getTraceback()}", file=sys.stderr, flush=True)
        reactor.stop()

    async def shutdown():
        service = state.get("service")
        if service is None:
            return
        if "profiler" in state:
            state["profiler"].disable()
        webhook = service._webhook._factory.resource._webhook
        states = Counter(c.state.value for c in service.manager.active_calls())
        await service.stopService()
        import sqlite3

        conn = sqlite3.connect(os.path.join(state["dir"], "voicecall.sqlite3"))
        try:
            keys = conn.execute("SELECT COUNT(*) FROM event_keys").fetchone()[0]
            changes = conn.execute("SELECT COUNT(*) FROM events WHERE type = 'call.state'").fetchone()[0]
        finally:
            conn.close()
        state["stats"] = {
            "outcomes": dict(webhook.counts),
            "active_states": dict(states),
            "stored_event_keys": keys,
            "stored_state_changes": changes,
        }

    def before_shutdown():
        return Deferred.fromCoroutine(shutdown())

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    d = Deferred.fromCoroutine(start_daemon() if mode == "daemon" else start_bare())
    d.addCallbacks(ready, failed)
    if profile:
        import cProfile

        profiler = state["profiler"] = cProfile.Profile()
        reactor.run()
        profiler.dump_stats(profile)
    else:
        reactor.run()
    if "dir" in state:
        shutil.rmtree(state["dir"], ignore_errors=True)
    print("STATS " + json.dumps(state.get("stats", {})), flush=True)
    return 0


# --- requests --------------------------------------------------------------------------------------


def sign(url: str, params: dict[str, str]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 over the URL and the sorted name+value pairs."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


def check_signers() -> str:
    """Check once that our signer, voicecall's test signer and the twilio SDK agree."""
    from voicecall.testing.twilio import sign_request

    url = "http://127.0.0.1:3334/voice/webhook?callId=x&type=status"
    params = {"CallSid": "CA" + "1" * 32, "CallStatus": "ringing", "SequenceNumber": "7", "To": TO}
    ours = sign(url, params)
    if sign_request(TOKEN, url, params) != ours:
        raise AssertionError("benchmark signer and voicecall.testing.twilio.sign_request disagree")
    try:
        from twilio.request_validator import RequestValidator
    except ImportError:
        return "voicecall signer (twilio SDK not installed)"
    if RequestValidator(TOKEN).compute_signature(url, params) != ours:
        raise AssertionError("benchmark signer and twilio's RequestValidator disagree")
    return "twilio SDK RequestValidator == voicecall.testing.twilio.sign_request"


def build_requests(url_host: str, calls: list, count: int, start_seq: int = 0) -> list[bytes]:
    """
    C{count} signed status callbacks, round-robin over C{calls} ((CallSid, StatusCallback URL)):
    the first round says ringing, every later one in-progress; each has its own SequenceNumber.
    """
    out = []
    n = len(calls)
    for i in range(start_seq, start_seq + count):
        sid, url = calls[i % n]
        params = {
            "AccountSid": SID,
            "ApiVersion": "2010-04-01",
            "CallSid": sid,
            "CallStatus": "ringing" if i < n else "in-progress",
            "Called": TO,
            "Caller": FROM,
            "Direction": "outbound-api",
            "From": FROM,
            "To": TO,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(i),
            "Timestamp": "Tue, 01 Jul 2025 12:00:00 +0000",
        }
        body = urlencode(params).encode()
        target = url.split("://", 1)[1]
        path = target[target.index("/"):]
        out.append(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"X-Twilio-Signature: %s\r\nUser-Agent: TwilioProxy/1.1\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), url_host.encode(), sign(url, params).encode(), len(body), body)
        )
    return out


# --- the load generator ----------------------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time; C{done(status, latency_s)}."""

    def __init__(self, done) -> None:
        self.done = done
        self.buf = bytearray()
        self.sent = 0.0
        self.transport = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = True

    def send(self, request: bytes) -> None:
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                total = end + 4 + int(head[i + 15 : j if j >= 0 else len(head)])
            elif buf.startswith(b"0\r\n\r\n", end + 4):
                total = end + 9
            else:
                j = buf.find(b"\r\n0\r\n\r\n", end + 4)
                if j < 0:
                    return
                total = j + 7
            if len(buf) < total:
                return
            status = int(buf[9:12])
            del buf[:total]
            self.done(self, status, time.perf_counter() - self.sent)


async def open_conns(port: int, n: int, done) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns = []
    for i in range(n):
        _, proto = await loop.create_connection(
            lambda: Conn(done), "127.0.0.1", port, local_addr=(SOURCE_IPS[i % len(SOURCE_IPS)], 0)
        )
        conns.append(proto)
    return conns


def close_conns(conns: list[Conn]) -> None:
    for c in conns:
        if c.transport is not None:
            c.transport.close()


async def closed_loop(port: int, requests: list[bytes], connections: int, seconds: float, warmup: float, server_pid: int) -> dict:
    """Each connection sends its next request as soon as the previous answer is complete."""
    loop = asyncio.get_running_loop()
    it = iter(requests)
    lat: list[float] = []
    statuses: Counter = Counter()
    state = {"measuring": False, "stopping": False, "inflight": 0}
    finished = loop.create_future()

    def send_next(conn: Conn) -> None:
        if state["stopping"]:
            return
        request = next(it, None)
        if request is None:
            state["stopping"] = True
            return
        state["inflight"] += 1
        conn.send(request)

    def done(conn: Conn, status: int, latency: float) -> None:
        state["inflight"] -= 1
        if state["measuring"]:
            lat.append(latency)
            statuses[status] += 1
        send_next(conn)
        if state["stopping"] and state["inflight"] == 0 and not finished.done():
            finished.set_result(None)

    conns = await open_conns(port, connections, done)
    for c in conns:
        send_next(c)
    await asyncio.sleep(warmup)
    state["measuring"] = True
    t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    deadline = t0 + seconds
    while time.perf_counter() < deadline and not state["stopping"]:
        await asyncio.sleep(0.05)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    gen_cpu, server_cpu = time.process_time() - c0, cpu_seconds(server_pid) - s0
    exhausted = state["stopping"]
    state["stopping"] = True
    if state["inflight"]:
        await asyncio.wait_for(finished, 10)
    close_conns(conns)
    return {**summary(lat, statuses, elapsed, gen_cpu, server_cpu), "ran_out_of_requests": exhausted}


async def open_loop(port: int, requests: list[bytes], rate: float, connections: int, server_pid: int) -> dict:
    """Requests sent on a fixed schedule of C{rate}/s whatever the answers do (queued if no idle connection)."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    statuses: Counter = Counter()
    idle: list[Conn] = []
    queue: list[tuple[float, bytes]] = []
    state = {"outstanding": 0}
    finished = loop.create_future()

    def done(conn: Conn, status: int, latency: float) -> None:
        # From the intended send time when the request had to queue, else from the actual send.
        lat.append(latency if conn.intended is None else time.perf_counter() - conn.intended)
        statuses[status] += 1
        state["outstanding"] -= 1
        if queue:
            intended, request = queue.pop(0)
            conn.intended = intended
            conn.send(request)
        else:
            idle.append(conn)
        if state["outstanding"] == 0 and state.get("all_sent") and not finished.done():
            finished.set_result(None)

    conns = await open_conns(port, connections, done)
    idle.extend(conns)
    t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    interval = 1.0 / rate
    for i, request in enumerate(requests):
        intended = t0 + i * interval
        wait = intended - time.perf_counter()
        if wait > 0.0005:
            await asyncio.sleep(wait)
        state["outstanding"] += 1
        if idle:
            conn = idle.pop()
            conn.intended = None
            conn.send(request)
        else:
            queue.append((intended, request))
    state["all_sent"] = True
    if state["outstanding"]:
        await asyncio.wait_for(finished, 30)
    elapsed = time.perf_counter() - t0
    gen_cpu, server_cpu = time.process_time() - c0, cpu_seconds(server_pid) - s0
    close_conns(conns)
    return summary(lat, statuses, elapsed, gen_cpu, server_cpu)


def summary(lat: list, statuses, elapsed: float, gen_cpu: float, server_cpu: float) -> dict:
    """One load phase's figures: its latencies (seconds) as rate and percentiles."""
    return {
        "requests": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "statuses": {str(k): v for k, v in statuses.items()},
        "generator_cpu": gen_cpu / elapsed,
        "server_cpu": server_cpu / elapsed,
    }


def start_server(mode: str, args) -> tuple:
    argv = [sys.executable, "-m", "benchmarks.webhooks", "--serve", mode, "--calls", str(args.calls), "--cpu", str(args.server_cpu)]
    if args.profile and mode == "daemon":
        argv += ["--profile-to", args.profile_path]
    return spawn(argv, timeout=120)


def run_target(mode: str, args) -> dict:
    proc, info = start_server(mode, args)
    try:
        calls = info["calls"] or [("CA" + f"{i:032x}", info["url"] + f"?callId=bare-{i}&type=status") for i in range(args.calls)]
        host = f"127.0.0.1:{info['port']}"
        rate_budget = int(args.max_rps * (args.seconds + args.warmup))
        n_open = int(args.rate * args.open_seconds)
        closed_reqs = build_requests(host, calls, rate_budget)
        open_reqs = build_requests(host, calls, n_open, start_seq=rate_budget)
        result: dict = {}
        result["closed"] = asyncio.run(closed_loop(info["port"], closed_reqs, args.connections, args.seconds, args.warmup, proc.pid))
        time.sleep(0.3)
        result["open"] = asyncio.run(open_loop(info["port"], open_reqs, args.rate, args.connections, proc.pid))
        if mode == "daemon":
            sent = result["closed"]["requests"]
            replays = closed_reqs[: min(sent, int(args.rate * args.open_seconds))]
            result["replay"] = asyncio.run(closed_loop(info["port"], replays, args.connections, args.seconds, 0.0, proc.pid))
    finally:
        out = stop(proc, timeout=60)
    result["server"] = last_json(out, "STATS ") or {}
    return result


def profile_report(path: str, top: int = 25) -> str:
    import io
    import pstats

    s = io.StringIO()
    stats = pstats.Stats(path, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seconds", type=float, default=8.0, help="closed-loop measuring time (8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="closed-loop warm-up (1)")
    parser.add_argument("--open-seconds", type=float, default=6.0, help="open-loop duration (6)")
    parser.add_argument("--connections", type=int, default=16, help="closed-loop connections (16)")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s (500)")
    parser.add_argument("--calls", type=int, default=2000, help="active calls in the daemon (2000)")
    parser.add_argument("--max-rps", type=float, default=9000.0, help="requests pre-built per closed-loop second (9000)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=1, help="the generator's CPU (1)")
    parser.add_argument("--profile", action="store_true", help="run the daemon under cProfile and print the top functions")
    parser.add_argument("--serve", choices=["daemon", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.calls, args.server_cpu, args.profile_to)
    if args.quick:
        args.seconds, args.warmup, args.open_seconds, args.calls = 1.5, 0.3, 1.5, 200
    args.profile_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vc-bench-webhooks-{os.getpid()}.prof")

    previous = os.sched_getaffinity(0)
    pin(args.cpu)
    try:
        signers = check_signers()
        print(
            f"webhooks: signed Twilio status callbacks, server pinned to CPU {args.server_cpu}, generator to CPU {args.cpu}; "
            f"{args.calls} active calls; closed loop {args.connections} connections {args.seconds:g} s; "
            f"open loop {args.rate:g}/s {args.open_seconds:g} s; signatures: {signers}",
            flush=True,
        )
        daemon = run_target("daemon", args)
        bare = run_target("bare", args)
    finally:
        os.sched_setaffinity(0, previous)

    rows = []
    for name, res in (("voicecall daemon", daemon), ("bare twisted.web 200", bare)):
        for phase in ("closed", "open", "replay"):
            if phase not in res:
                continue
            r = res[phase]
            label = {"closed": f"closed x{args.connections}", "open": f"open {args.rate:g}/s", "replay": f"replays x{args.connections}"}[phase]
            ok = r["statuses"].get("200", 0)
            rows.append((name, label, r["requests"], ok, r["rps"], r["p50_ms"], r["p99_ms"], r["max_ms"],
                         f"{r['server_cpu'] * 100:.0f}%", f"{r['generator_cpu'] * 100:.0f}%"))
    table(("server", "phase", "requests", "200s", "req/s", "p50_ms", "p99_ms", "max_ms", "server_cpu", "gen_cpu"), rows)
    ratio = daemon["closed"]["rps"] / bare["closed"]["rps"]
    stats = daemon.get("server", {})
    rps, p99 = daemon["closed"]["rps"], daemon["open"]["p99_ms"]
    print(f"daemon/bare throughput ratio: {ratio:.2f}")
    print(f"daemon outcomes: {stats.get('outcomes')}; stored event keys {stats.get('stored_event_keys')}, "
          f"state changes {stats.get('stored_state_changes')}; active calls by state {stats.get('active_states')}")
    print(f"target >= {TARGET_RPS:,.0f}/s: {rps:,.0f}/s {'ok' if rps >= TARGET_RPS else 'BELOW TARGET'}; "
          f"target p99 < {TARGET_P99_MS:g} ms at {args.rate:g}/s: {p99:.2f} ms {'ok' if p99 < TARGET_P99_MS else 'ABOVE TARGET'}")
    gen = max(r["generator_cpu"] for res in (daemon, bare) for r in (res["closed"],))
    if gen > 0.85:
        print(f"warning: the generator used {gen * 100:.0f}% of its CPU; the figures may be generator-bound")
    profile = None
    if args.profile and os.path.exists(args.profile_path):
        profile = profile_report(args.profile_path)
        os.unlink(args.profile_path)
        print(profile)
    write_json("webhooks", {
        "args": {k: v for k, v in vars(args).items() if k not in ("serve", "profile_to", "profile_path")},
        "daemon": daemon,
        "bare": bare,
        "ratio": ratio,
        "targets": {"rps": TARGET_RPS, "p99_ms_at_rate": TARGET_P99_MS},
        "met": {"rps": rps >= TARGET_RPS, "p99": p99 < TARGET_P99_MS},
        **({"profile": profile} if profile else {}),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
