"""
Benchmark: the durable store as the daemon uses it (SQLite WAL, synchronous=FULL, group commit).

  1. C{voicecall.initiate} over the real RPC socket of a daemon on the mock provider (a child
     process running C{tap.makeService}, pinned to CPU 0; this process, the client, on CPU 1):
     latency p50/p99 one call at a time, each answer given only after the call's durable commit,
     and the rate with C{--inflight} requests outstanding.
  2. Events recorded per second: C{CallManager.process_event} (state moves and final transcripts)
     through the manager and the real C{CallStore}/C{ThreadedWriter}, one event at a time and with
     64 in flight (group commit).
  3. Restore: C{--restore-calls} (100,000) active calls written with the store API (each with a
     transcript line and two processed event keys), then a cold C{CallStore.open} +
     C{CallManager.restore} in a fresh process, timed.

Target (DESIGN.md): restore of 100,000 stored calls under 2 s.

Run:  .venv/bin/python -m benchmarks.store [--quick] [--initiates 400] [--events 5000]
      [--restore-calls 100000]   (results: var/bench/store.json)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import RpcLine, child_env, daemon_argv, percentile, pin, spawn, stop, table, write_json

TARGET_RESTORE_S = 2.0


def bench_initiate(n: int, inflight: int, server_cpu: int) -> dict:
    """Sequential and pipelined voicecall.initiate over the RPC socket of a mock daemon."""
    directory = tempfile.mkdtemp(prefix="vc-bench-store-")
    config = {"provider": "mock", "maxConcurrentCalls": 2 * n + inflight + 10, "outbound": {"defaultMode": "conversation"}}
    proc, info = spawn(daemon_argv(config, directory, server_cpu))
    try:
        rpc = RpcLine(info["rpc"])
        for _ in range(10):  # warm-up
            rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello"})
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello"})
            lat.append(time.perf_counter() - t)
        # pipelined: `inflight` requests outstanding on one connection
        sock = rpc.sock
        request = lambda i: (json.dumps({"jsonrpc": "2.0", "id": 10_000 + i, "method": "voicecall.initiate",  # noqa: E731
                                         "params": {"to": "+15550001234", "message": "Hello"}}) + "\n").encode()
        t0 = time.perf_counter()
        sent = done = 0
        buf = b""
        while sent < min(inflight, n):
            sock.sendall(request(sent))
            sent += 1
        while done < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("daemon closed the RPC socket")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if b'"error"' in line:
                    raise RuntimeError(line.decode())
                done += 1
                if sent < n:
                    sock.sendall(request(sent))
                    sent += 1
        pipelined = n / (time.perf_counter() - t0)
        rpc.close()
    finally:
        stop(proc)
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "n": n,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat) * 1000,
        "sequential_per_s": n / sum(lat),
        "inflight": inflight,
        "pipelined_per_s": pipelined,
    }


# --- in-process phases (run in a child: each needs its own reactor) --------------------------------


def _manager(reactor, directory: str, max_calls: int):
    from voicecall.domain.manager import CallManager, ManagerSettings
    from voicecall.providers.mock import MockProvider
    from voicecall.domain.store import CallStore
    from voicecall.infra.dbwriter import ThreadedWriter

    writer = ThreadedWriter(reactor)
    store = CallStore(directory, writer)
    provider = MockProvider(clock=reactor)
    manager = CallManager(
        provider=provider, voice=provider, store=store, clock=reactor,
        settings=ManagerSettings(provider_name="mock", max_concurrent_calls=max_calls, max_duration_seconds=3600),
    )
    manager.set_webhook_url("http://127.0.0.1:1/voice/webhook")
    return writer, store, manager


async def _events(reactor, n: int) -> dict:
    from twisted.internet.defer import DeferredSemaphore, gatherResults

    from voicecall.domain.model import CallEvent

    directory = tempfile.mkdtemp(prefix="vc-bench-events-")
    writer, store, manager = _manager(reactor, directory, 1000)
    await writer.start()
    await store.open()
    try:
        ids = [await manager.initiate("+15550001234", None, "conversation") for _ in range(100)]
        counter = iter(range(10**9))

        def event(i: int) -> CallEvent:
            call = manager.find(ids[i % len(ids)])
            kind = ("call.speech", "call.active", "call.speaking")[i % 3]
            extra = {"transcript": f"caller words number {i}", "is_final": True} if kind == "call.speech" else {}
            k = next(counter)
            return CallEvent(type=kind, call_id=call.call_id, id=f"ev-{k}", timestamp=int(reactor.seconds() * 1000),
                             dedupe_key=f"ev-{k}", provider_call_id=call.provider_call_id, **extra)

        seq_n = max(50, n // 20)
        t = time.perf_counter()
        for i in range(seq_n):
            await manager.process_event(event(i))
        sequential = seq_n / (time.perf_counter() - t)
        sem = DeferredSemaphore(64)
        t = time.perf_counter()
        await gatherResults([sem.run(manager.process_event, event(i)) for i in range(n)])
        concurrent = n / (time.perf_counter() - t)
    finally:
        manager.stop()
        await store.close()
        await writer.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {"sequential_n": seq_n, "sequential_per_s": sequential, "concurrent_n": n, "concurrent_per_s": concurrent}


async def _populate(reactor, directory: str, n: int) -> dict:
    from twisted.internet.defer import gatherResults

    from voicecall.domain.model import CallRecord, TranscriptEntry
    from voicecall.domain.store import CallStore
    from voicecall.infra.dbwriter import ThreadedWriter

    writer = ThreadedWriter(reactor)
    store = CallStore(directory, writer)
    await writer.start()
    await store.open()
    now = int(reactor.seconds() * 1000)
    t = time.perf_counter()
    chunk = 5000
    for start in range(0, n, chunk):
        writes = []
        for i in range(start, min(n, start + chunk)):
            call = CallRecord(call_id=f"call-{i:08d}", provider="mock", direction="outbound", state="listening",
                              from_number="+15550000000", to_number="+15550001234", started_at=now,
                              provider_call_id=f"mock-call-{i:08d}", metadata={"mode": "conversation"})
            writes.append(store.write(call, transcript=[TranscriptEntry(now, "bot", "Hello, this is a test call")],
                                      event_keys=[f"k-{i}-a", f"k-{i}-b"],
                                      events=[{"type": "call.initiated", "callId": call.call_id, "at": now}]))
        await gatherResults(writes)
    seconds = time.perf_counter() - t
    await store.close()
    await writer.stop()
    return {"calls": n, "populate_seconds": seconds}


async def _restore(reactor, directory: str) -> dict:
    writer, store, manager = _manager(reactor, directory, 10)
    t = time.perf_counter()
    await writer.start()
    await store.open()
    t_open = time.perf_counter()
    outcome = await manager.restore()
    t_done = time.perf_counter()
    active = len(manager.active_calls())
    manager.stop()
    await store.close()
    await writer.stop()
    return {"open_seconds": t_open - t, "restore_seconds": t_done - t_open, "total_seconds": t_done - t,
            "restored": outcome.get("restored"), "active_after": active, "outcome": outcome}


def _child(phase: str, argv: list[str]) -> int:
    """Run one in-process phase under its own reactor and print its result as RESULT <json>."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    out = {}

    async def run(reactor):
        if phase == "events":
            out.update(await _events(reactor, int(argv[0])))
        elif phase == "populate":
            out.update(await _populate(reactor, argv[0], int(argv[1])))
        elif phase == "restore":
            out.update(await _restore(reactor, argv[0]))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_child(phase: str, *args: object, cpu: int | None = None, timeout: float = 300) -> dict:
    argv = [sys.executable, "-m", "benchmarks.store", "--phase", phase, *map(str, args)]
    if cpu is not None:
        argv[3:3] = ["--cpu", str(cpu)]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"store phase {phase} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--initiates", type=int, default=400, help="sequential initiates timed (400)")
    parser.add_argument("--inflight", type=int, default=16, help="pipelined initiates outstanding (16)")
    parser.add_argument("--events", type=int, default=5000, help="events recorded with 64 in flight (5000)")
    parser.add_argument("--restore-calls", type=int, default=100_000, help="stored active calls to restore (100000)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU first")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.phase:
        pin(args.cpu)
        return _child(args.phase, rest)
    if args.quick:
        args.initiates, args.events, args.restore_calls = 50, 500, 5000
    previous = os.sched_getaffinity(0)
    pin(1 if args.cpu is None else args.cpu)
    try:
        print(f"store: SQLite WAL synchronous=FULL on {tempfile.gettempdir()}; daemon/phases on CPU {args.server_cpu}", flush=True)
        initiate = bench_initiate(args.initiates, args.inflight, args.server_cpu)
        events = run_child("events", args.events, cpu=args.server_cpu)
        directory = tempfile.mkdtemp(prefix="vc-bench-restore-")
        try:
            populate = run_child("populate", directory, args.restore_calls, cpu=args.server_cpu, timeout=600)
            size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
            restore = run_child("restore", directory, cpu=args.server_cpu)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        os.sched_setaffinity(0, previous)

    ok = restore["total_seconds"] < TARGET_RESTORE_S
    table(
        ("measure", "value", "detail"),
        [
            ("initiate p50 (ms)", initiate["p50_ms"], f"{initiate['n']} sequential over RPC, durable commit included"),
            ("initiate p99 (ms)", initiate["p99_ms"], f"max {initiate['max_ms']:.2f} ms"),
            ("initiates/s sequential", initiate["sequential_per_s"], "one at a time"),
            ("initiates/s pipelined", initiate["pipelined_per_s"], f"{initiate['inflight']} outstanding on one connection"),
            ("events/s one at a time", events["sequential_per_s"], f"{events['sequential_n']} process_event, each awaited"),
            ("events/s 64 in flight", events["concurrent_per_s"], f"{events['concurrent_n']} process_event, group commit"),
            ("populate (s)", populate["populate_seconds"], f"{populate['calls']:,} calls via CallStore.write, {size / 1e6:.0f} MB"),
            ("store open (s)", restore["open_seconds"], "cold CallStore.open in a fresh process"),
            ("restore (s)", restore["restore_seconds"], f"CallManager.restore: {restore['restored']:,} restored"),
            ("open + restore (s)", restore["total_seconds"], f"target < {TARGET_RESTORE_S:g} s: {'ok' if ok else 'ABOVE TARGET'}"),
        ],
    )
    write_json("store", {"args": {k: v for k, v in vars(args).items() if k != "phase"}, "initiate": initiate,
                         "events": events, "populate": populate, "restore": restore,
                         "target_restore_seconds": TARGET_RESTORE_S, "met": {"restore": ok}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
