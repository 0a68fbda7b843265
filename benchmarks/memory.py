"""
Benchmark: resident memory (VmRSS) of the daemon, idle, per active call and per open stream.

The daemon is a child process running the real C{tap.makeService} (pinned to CPU 0); everything
else (RPC client, fake Twilio, fake OpenAI TTS and realtime STT, the Twilio media-stream clients)
runs in this process, so the child's RSS is the daemon's alone.

  1. Mock provider: RSS once started and idle; then C{--calls} (1,000) calls placed with
     C{voicecall.initiate} and left active: RSS delta / calls.
  2. Twilio with streaming: C{--streams} (200) conversation calls placed on the fake Twilio, which
     answers them and fetches the C{<Connect><Stream>} TwiML; RSS is read with every call
     waiting for its stream, then again once a L{TwilioMediaClient} per call (valid token and
     signature; 50 frames/s of silence in, the greeting played out, STT connected) has been
     streaming for a few seconds: RSS delta / streams.

Target (DESIGN.md): under 64 KiB per open stream.

Run:  .venv/bin/python -m benchmarks.memory [--quick] [--calls 1000] [--streams 200]
      (results: var/bench/memory.json)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from benchmarks.common import RpcLine, daemon_argv, pin, rss_kib, spawn, stop, table, write_json

SID = "AC" + "0" * 32
TOKEN = "bench-twilio-auth-token"
TARGET_STREAM_KIB = 64.0


def note(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS after C{seconds} of quiet (the lowest of a few samples)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)
        samples.append(rss_kib(pid))
    return min(samples)


async def settle_rss_async(reactor, pid: int, seconds: float = 1.0) -> int:
    from twisted.internet.task import deferLater

    samples = []
    for _ in range(max(1, int(seconds / 0.2))):
        await deferLater(reactor, 0.2, lambda: None)
        samples.append(rss_kib(pid))
    return min(samples)


def bench_calls(n: int, cpu: int) -> dict:
    directory = tempfile.mkdtemp(prefix="vc-bench-mem-")
    config = {"provider": "mock", "maxConcurrentCalls": n + 20, "maxDurationSeconds": 3600,
              "outbound": {"defaultMode": "conversation"}}
    proc, info = spawn(daemon_argv(config, directory, cpu))
    try:
        pid = info["pid"]
        idle = settle_rss(pid, 1.5)
        rpc = RpcLine(info["rpc"])
        for _ in range(10):  # warm the code paths, so the delta is the calls' own
            rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello there"})
        warm = settle_rss(pid, 1.0)
        for _ in range(n):
            rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hello there"})
        loaded = settle_rss(pid, 1.5)
        active = len(rpc.call("voicecall.status", {}).get("calls", []))
        rpc.close()
    finally:
        stop(proc)
        shutil.rmtree(directory, ignore_errors=True)
    return {"idle_kib": idle, "warm_kib": warm, "loaded_kib": loaded, "calls": n, "active_reported": active,
            "per_call_kib": (loaded - warm) / n}


def bench_streams(n: int, cpu: int, hold: float) -> dict:
    """Run the fakes and clients on this process's reactor; the daemon in a child."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    out: dict = {}

    def run(reactor):
        d = Deferred.fromCoroutine(_streams(reactor, n, cpu, hold, out))
        d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr, flush=True) or f)
        return d

    import socket

    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    out["ports"] = ports
    try:
        react(run)
    except SystemExit as e:
        if e.code:
            raise RuntimeError("the stream memory phase failed") from None
    proc = out.pop("proc", None)
    if proc is not None:
        stop(proc)
    shutil.rmtree(out.pop("directory", ""), ignore_errors=True)
    if "per_stream_kib" not in out:
        raise RuntimeError(f"the stream memory phase ended early: {out}")
    return out


async def _streams(reactor, n: int, cpu: int, hold: float, out: dict) -> None:
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.task import deferLater
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.server import Site
    from treq.client import HTTPClient

    from voicecall.client import connect
    from voicecall.testing.openai_realtime import FakeRealtimeServer
    from voicecall.testing.speech import FakeOpenAISpeech
    from voicecall.testing.twilio import FakeTwilio, Scenario, sign_request
    from voicecall.testing.twilio_media import MediaTicker, TwilioMediaClient

    twilio_port, speech_port, port = out.pop("ports")

    async def listen(resource, number) -> str:
        site = Site(resource)
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(site)
        return f"http://127.0.0.1:{port.getHost().port}"

    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 16
    fake = FakeTwilio(reactor, SID, TOKEN, http=HTTPClient(Agent(reactor, pool=pool)), scenario=Scenario(utterances=[]))
    twilio_base = await listen(fake.resource(), twilio_port)
    speech = FakeOpenAISpeech(reactor, "sk-tts", chunk_bytes=960)
    speech_base = await listen(speech.resource(), speech_port)
    stt = FakeRealtimeServer(reactor, "sk-stt", script=[])
    stt.listen()
    directory = tempfile.mkdtemp(prefix="vc-bench-mem-streams-")
    config = {
        "provider": "twilio",
        "fromNumber": "+15550000000",
        "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": twilio_base},
        "serve": {"port": port, "bind": "127.0.0.1"},
        "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
        "streaming": {"enabled": True, "openaiApiKey": "sk-stt", "sttBaseUrl": stt.url,
                      "maxConnections": n + 20, "maxPendingConnections": n + 20, "maxPendingConnectionsPerIp": n + 20},
        "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts", "baseUrl": speech_base + "/v1"}},
        "maxConcurrentCalls": n + 10,
        "maxDurationSeconds": 3600,
        "transcriptTimeoutMs": 600000,
    }
    # Started with the reactor blocked for a moment: the daemon calls none of the fakes while starting.
    proc, info = spawn(daemon_argv(config, directory, cpu))
    out["proc"] = proc
    pid = info["pid"]
    clients: list = []
    out["phase"] = "started"
    try:
        idle = await settle_rss_async(reactor, pid, 1.0)
        rpc = await connect(reactor, info["rpc"])
        note("daemon up, placing calls")
        out["phase"] = "placing"
        sem = DeferredSemaphore(8)
        # A few calls at a time: the fake Twilio posts every webhook from 127.0.0.1, and the
        # daemon allows 8 requests in flight per address.
        for start in range(0, n, 2):
            batch = min(2, n - start)
            await gatherResults([rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Good evening",
                                                                 "mode": "conversation"}) for _ in range(batch)])
            placed = list(fake.calls.values())[start:start + batch]
            await gatherResults([c.next_stream() for c in placed])
        calls = [c for c in fake.calls.values() if c.active_stream is not None]
        streams = [c.active_stream for c in calls]
        note(f"{len(calls)} calls waiting for their streams")
        for c in [c for c in fake.calls.values() if c.active_stream is None][:2]:
            note(f"no stream: {c.status} errors={list(c.errors)} callbacks={[(h.params.get('CallStatus'), h.status) for h in c.callbacks]} docs={[(d.status, d.body[:300]) for d in c.documents]}")
        waiting = await settle_rss_async(reactor, pid, 1.0)
        ticker = MediaTicker(reactor, phases=10)
        for call, stream in zip(calls, streams, strict=True):
            client = TwilioMediaClient(reactor, stream.url, call_sid=call.sid, token=stream.parameters.get("token"),
                                       headers={"X-Twilio-Signature": sign_request(TOKEN, stream.url)}, ticker=ticker,
                                       max_records=100, max_audio_bytes=1024)
            clients.append(client)
        note("connecting the media clients")
        await gatherResults([sem.run(c.connect) for c in clients])
        note("streams open")
        await deferLater(reactor, hold, lambda: None)
        open_now = sum(1 for c in clients if c.is_open)
        streaming = await settle_rss_async(reactor, pid, 1.0)
        received = sum(len(c.media_times) for c in clients)
        rpc.transport.loseConnection()
        out.update({"idle_kib": idle, "calls_waiting_kib": waiting, "streaming_kib": streaming, "streams": n,
                    "open": open_now, "clients_with_audio": sum(1 for c in clients if c.media_times),
                    "frames_received": received, "per_stream_kib": (streaming - waiting) / max(1, len(calls)),
                    "per_call_and_stream_kib": (streaming - idle) / max(1, len(calls)), "streams_started": len(calls)})
    finally:
        for c in clients:
            if c.is_open:
                c.close()
        stt.stop()
        for call in list(fake.calls.values()):
            call.hangup_by_callee()
        await pool.closeCachedConnections()
        out["directory"] = directory  # removed once the daemon has stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--calls", type=int, default=1000, help="active mock calls (1000)")
    parser.add_argument("--streams", type=int, default=200, help="open Twilio media streams (200)")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds of streaming before the reading (4)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=1, help="this process's CPU (1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.streams, args.hold = 100, 20, 1.5
    previous = os.sched_getaffinity(0)
    pin(args.cpu)
    try:
        print(f"memory: VmRSS of a makeService child on CPU {args.server_cpu}; {args.calls} mock calls, "
              f"{args.streams} Twilio media streams", flush=True)
        calls = bench_calls(args.calls, args.server_cpu)
        streams = bench_streams(args.streams, args.server_cpu, args.hold)
    finally:
        os.sched_setaffinity(0, previous)
    ok = streams["per_stream_kib"] < TARGET_STREAM_KIB
    table(
        ("measure", "KiB", "detail"),
        [
            ("idle daemon (mock)", calls["idle_kib"], "started, no call yet"),
            ("after 10 warm-up calls", calls["warm_kib"], ""),
            (f"with {calls['calls']:,} active calls", calls["loaded_kib"], f"{calls['active_reported']:,} reported active"),
            ("per active call", calls["per_call_kib"], "mock provider"),
            ("idle daemon (twilio+streaming)", streams["idle_kib"], ""),
            (f"{streams['streams']} calls awaiting streams", streams["calls_waiting_kib"], "answered, TwiML fetched"),
            (f"{streams['streams']} streams open", streams["streaming_kib"],
             f"{streams['open']} open, {streams['clients_with_audio']} got audio"),
            ("per open stream", streams["per_stream_kib"], f"target < {TARGET_STREAM_KIB:g} KiB: {'ok' if ok else 'ABOVE TARGET'}"),
            ("per call + stream", streams["per_call_and_stream_kib"], "from the idle daemon"),
        ],
    )
    write_json("memory", {"args": vars(args), "calls": calls, "streams": streams,
                          "target_stream_kib": TARGET_STREAM_KIB, "met": {"stream": ok}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
