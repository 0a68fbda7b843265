"""
Benchmark: the cost of one store write, SQLite vs PostgreSQL, as the daemon pays it.

Each write is what a webhook that moves a call costs the store: the call's row upserted, one
transcript entry, one processed event key and one event-log entry, its Deferred fired on the
reactor thread after COMMIT (SQLite: WAL + synchronous=FULL on its writer thread; PostgreSQL: fsync
and synchronous_commit on, through PgPool's threads). Both stores group-commit: writes issued
while a transaction commits share the next one. Measured: latency p50/p99 one write at a time
(one transaction each), and writes per second with `--inflight` outstanding.

The PostgreSQL server is a local one started like the tests' (tests/pgserver.py: loopback, fsync
on), unless `--url` names one. Both stores write to the same disk.

Run:  .venv/bin/python -m benchmarks.store_backends [--writes 2000] [--inflight 32] [--url URL]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, task

from benchmarks.common import percentile, table
from voicecall.domain.model import CallRecord, TranscriptEntry
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import ThreadedWriter


def record(i: int) -> CallRecord:
    return CallRecord(
        call_id=f"call-{i % 50}", provider="mock", direction="outbound", state="listening",
        from_number="+15550001111", to_number="+15550002222", started_at=i,
        provider_call_id=f"mock-{i % 50}", metadata={"mode": "conversation", "turnCount": i},
    )


def one_write(store, i: int):
    return store.write(
        record(i),
        transcript=[TranscriptEntry(timestamp=i, speaker="user", text=f"words {i}")],
        event_keys=[f"k{i}"],
        events=[{"callId": f"call-{i % 50}", "at": i, "type": "call.speech"}],
    )


async def measure(reactor, store, writes: int, inflight: int) -> dict:
    for i in range(50):  # the calls exist: the measured writes update them
        await one_write(store, i)
    latencies = []
    for i in range(writes):
        started = time.perf_counter()
        await one_write(store, 1000 + i)
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    pending: set = set()
    for i in range(writes):
        d = one_write(store, 100_000 + i)
        pending.add(d)
        d.addBoth(lambda r, d=d: pending.discard(d) or r)
        if len(pending) >= inflight:
            await defer.DeferredList(list(pending), fireOnOneCallback=True)
    await defer.gatherResults(list(pending))
    rate = writes / (time.perf_counter() - started)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "per_s": rate}


async def main(reactor, args) -> None:
    results = {}
    directory = tempfile.mkdtemp(prefix="vc-bench-sqlite-")
    writer = ThreadedWriter(reactor)
    await writer.start()
    store = CallStore(directory, writer)
    await store.open()
    results["SQLite"] = await measure(reactor, store, args.writes, args.inflight)
    await store.close()
    await writer.stop()
    shutil.rmtree(directory, ignore_errors=True)

    from voicecall.domain.pgstore import PgCallStore
    from voicecall.infra.pg import PgPool

    url = args.url
    if url is None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.pgserver import postgres_server

        url = postgres_server().new_database()
    store = PgCallStore(PgPool(reactor, url, max_size=8), node_id="bench")
    await store.open()
    results["PostgreSQL"] = await measure(reactor, store, args.writes, args.inflight)
    await store.close()

    table(
        ["store", "write p50 ms", "write p99 ms", f"writes/s ({args.inflight} in flight)"],
        [[name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['per_s']:.0f}"] for name, r in results.items()],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--url", default=None, help="a PostgreSQL URL (default: start a local server)")
    task.react(main, [parser.parse_args()])
