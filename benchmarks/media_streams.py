"""
Benchmark: many concurrent Twilio media streams against the real media-stream server.

The server process (pinned to CPU 0) runs voicecall's L{MediaStreamServer} on a twisted.web Site
on Twisted's default reactor, as the daemon does. Every accepted stream forwards its inbound
audio to a real L{RealtimeTranscriber} (C{--stt sink}, the default) whose WebSocket ends in a
discard-only sink served by the client process, or to a counter (C{--stt null}); and it plays one long TTS
utterance through L{Playback}: 8 kHz mu-law (ElevenLabs' C{ulaw_8000}) handed over by an
in-process synthesis that streams it at real time, half a second ahead, so the outbound audio
covers the whole run (a chunk per stream every 200 ms, the streams spread over ten 20 ms
slots: C{--feed-slots}). Every frame's first four bytes carry its index.

The client process (this one, pinned to CPU 1) is a light raw-socket WebSocket client on one
epoll loop: each stream sends C{connected}, C{start}, then a C{media} frame every 20 ms (streams
spread over ten 2 ms phases in turn, as calls start at different moments; C{--random-phase}: each
stream draws its phase at random; C{--client-phases 1}: all at once), and timestamps what it receives.
An arrival is stamped with the time epoll returned, not the time the loop got round to that
socket, so the client's own processing of other sockets is not counted; what remains (the loop's
busy time per wakeup, and its CPU) is reported to show the client is not the bottleneck.

Per stream, over the measurement window: pacing error = arrival - (first arrival + 20 ms x
frame-index difference), the ideal 20 ms grid from the window's first frame; jitter = deviation
of each inter-arrival gap from 20 ms x index gap; frames lost = gaps in the frame indices (and
streams that closed). Also server CPU %, the shared tick's lateness, and memory per stream (server
RSS after the streams are up minus RSS before, divided by the streams). Targets (DESIGN.md):
500 streams, p99 pacing error < 5 ms, no frame lost, < 64 KiB per stream.

Run:  .venv/bin/python benchmarks/media_streams.py [--streams 500] [--seconds 30] [--stt sink|null]
      [--feed-slots 10] [--client-phases 10] [--random-phase]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import select
import socket
import subprocess
import struct
import sys
import time
from array import array
from typing import Any

TARGET_STREAMS = 500
TARGET_P99_MS = 5.0
TARGET_KIB = 64.0
FRAME = 0.02
CLIENT_PHASES = 10  # default of --client-phases
RANDOM_SEED = 15  # --random-phase: the same draw every run
LEAD_FRAMES = 25  # the synthesis streams audio this far ahead of real time
OUT_JSON = os.path.join("var", "bench", "media_streams.json")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux
TIMESPEC = struct.Struct("qq")
NAN = float("nan")


def rss_bytes() -> int:
    """Resident set size of this process (bytes), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_busy(cpus) -> dict[int, float]:
    """Busy seconds so far of each CPU in `cpus` (everything but idle and iowait), from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                busy[int(name[3:])] = (sum(values) - values[3] - values[4]) / tick
    return busy


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


# -- server process -------------------------------------------------------------------------


def serve(args) -> int:
    """The media server under test; commands on stdin, one JSON line per answer on stdout."""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import gc

    from twisted.internet import reactor, stdio
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver
    from twisted.web.server import Site

    from voicecall.infra.audio import AudioChunk
    from voicecall.media.playback import PlaybackScheduler
    from voicecall.media.sockets import Admission
    from voicecall.media.stream import MediaStreamServer
    from voicecall.speech.stt import RealtimeTranscriber

    body = bytes(range(1, 157))

    class Feeder:
        """
        Streams every open synthesis's audio at real time, LEAD_FRAMES ahead, on one timer.

        Each synthesis gets a chunk every 200 ms, the syntheses split over C{--feed-slots}
        (10) slots 200/N ms apart, as the chunks of many real TTS responses arrive at their own
        moments. C{--feed-slots 1} feeds all of them in one callback every 200 ms: a single
        block of work (about 10 ms at 500 streams) that no reactor can interleave with the
        playback tick, and that no set of real responses produces (each is its own socket).
        """

        SLOTS = args.feed_slots

        def __init__(self) -> None:
            self.slots: list[dict[Any, list]] = [{} for _ in range(self.SLOTS)]
            self.count = 0
            self.turn = 0
            self.loop = LoopingCall(self.feed)

        def synthesize(self, on_chunk) -> Deferred:
            slot = self.slots[self.count % self.SLOTS]
            self.count += 1
            d = Deferred(lambda _: slot.pop(d, None))
            state = [reactor.seconds(), 0, on_chunk]
            slot[d] = state
            self.feed_one(state, state[0])
            return d

        def feed_one(self, state, now) -> None:
            target = int((now - state[0]) / FRAME) + LEAD_FRAMES
            start = state[1]
            if target > start:
                state[1] = target
                state[2](AudioChunk(b"".join(i.to_bytes(4, "big") + body for i in range(start, target)), "ulaw", 8000))

        def feed(self) -> None:
            now = reactor.seconds()
            self.turn = (self.turn + 1) % self.SLOTS
            for state in list(self.slots[self.turn].values()):
                self.feed_one(state, now)

    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])]
    )
    feeder = Feeder()
    feeder.loop.start(0.2 / Feeder.SLOTS, now=False)

    class Handler:
        def __init__(self) -> None:
            self.stt: dict[str, RealtimeTranscriber] = {}
            self.media = 0
            self.started = 0
            self.stopped = 0
            self.stt_connected = 0

        def accept_start(self, call_sid, token):
            return True

        def stream_started(self, session) -> None:
            self.started += 1
            if args.stt_url:
                stt = RealtimeTranscriber(reactor, "sk-bench", url=args.stt_url)
                self.stt[session.stream_sid] = stt
                stt.connect().addCallbacks(self._stt_up, lambda f: None)
            session.playback.play(feeder.synthesize).addErrback(lambda f: None)

        def _stt_up(self, _):
            self.stt_connected += 1

        def media_received(self, session, ulaw) -> None:
            self.media += 1
            stt = self.stt.get(session.stream_sid)
            if stt is not None:
                stt.send_audio(ulaw)

        def dtmf_received(self, session, digit) -> None:
            pass

        def stream_stopped(self, session) -> None:
            self.stopped += 1
            stt = self.stt.pop(session.stream_sid, None)
            if stt is not None:
                stt.close().addErrback(lambda f: None)

    gc_pauses = {"count": 0, "max": 0.0, "total": 0.0, "started": 0.0}

    def on_gc(phase, info) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            gc_pauses["started"] = time.perf_counter()
        else:
            pause = time.perf_counter() - gc_pauses["started"]
            gc_pauses["count"] += 1
            gc_pauses["total"] += pause
            gc_pauses["max"] = max(gc_pauses["max"], pause)

    gc.callbacks.append(on_gc)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    handler = Handler()
    kwargs = {}
    if args.phases is not None:
        kwargs["phases"] = args.phases
    scheduler = PlaybackScheduler(reactor, **kwargs)
    cap = args.streams + 64
    admission = Admission(max_connections=cap, max_pending=cap, max_pending_per_ip=cap, pre_start_timeout=60.0)
    server = MediaStreamServer(reactor, handler, admission=admission, playback=scheduler)
    site = Site(server.resource)
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")

    def snapshot() -> dict:
        t = os.times()
        return {
            "wall": time.monotonic(),
            "cpu": t.user + t.system,
            "rss": rss_bytes(),
            "ticks": scheduler.ticks,
            "missed_ticks": scheduler.missed_ticks,
            "media_in": handler.media,
            "stt_dropped": sum(s._dropped_frames for s in handler.stt.values()),
        }

    class Control(LineReceiver):
        delimiter = b"\n"
        begin: dict = {}

        def connectionMade(self) -> None:
            gc.collect()
            self.reply({"port": port.getHost().port, "rss": rss_bytes(), "reactor": type(reactor).__name__})

        def reply(self, obj) -> None:
            self.transport.write(json.dumps(obj).encode() + b"\n")

        def lineReceived(self, line: bytes) -> None:
            command = line.decode().strip()
            if command == "begin":
                scheduler.max_lateness = 0.0
                gc_pauses.update(count=0, max=0.0, total=0.0)
                self.begin = snapshot()
                self.reply({"ok": True, "sessions": server.active_count, "stt_connected": handler.stt_connected})
            elif command == "end":
                end = snapshot()
                b = self.begin
                wall = end["wall"] - b["wall"]
                self.reply({
                    "wall": wall,
                    "cpu_percent": 100.0 * (end["cpu"] - b["cpu"]) / wall,
                    "rss_begin": b["rss"],
                    "rss_end": end["rss"],
                    "ticks": end["ticks"] - b["ticks"],
                    "missed_ticks": end["missed_ticks"] - b["missed_ticks"],
                    "max_tick_lateness_ms": scheduler.max_lateness * 1000,
                    "media_in_per_s": (end["media_in"] - b["media_in"]) / wall,
                    "stt_dropped": end["stt_dropped"] - b["stt_dropped"],
                    "stt_connected": handler.stt_connected,
                    "sessions": server.active_count,
                    "started": handler.started,
                    "stopped": handler.stopped,
                    "counts": dict(server.counts),
                    "gc2_count": gc_pauses["count"],
                    "gc2_max_ms": gc_pauses["max"] * 1000,
                })
            elif command == "quit":
                # Close the STT sessions first, so that their sockets going away is expected.
                for stt in handler.stt.values():
                    stt.close().addErrback(lambda f: None)
                handler.stt.clear()
                server.shutdown()
                reactor.callLater(0.2, reactor.stop)

        def connectionLost(self, reason) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    profile_to = os.environ.get("VOICECALL_BENCH_PROFILE")
    if profile_to:  # where the server's time goes: python -m pstats <file>
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, profile_to)
    else:
        reactor.run()
    return 0


# -- client process -------------------------------------------------------------------------


class Stream:
    """One Twilio media stream, client side (raw socket, zero mask key)."""

    __slots__ = ("n", "sock", "fd", "state", "buf", "out", "frame", "sid", "pay_off",
                 "idx", "at", "closed", "first_media", "marks", "clears")

    def __init__(self, n: int, sock: socket.socket) -> None:
        self.n = n
        self.sock = sock
        self.fd = sock.fileno()
        self.state = "handshake"
        self.buf = b""
        self.out = b""
        self.sid = "MZ%032x" % n
        self.pay_off = len(('{"event":"media","streamSid":"%s","media":{"payload":"' % self.sid).encode())
        media = (
            '{"event":"media","sequenceNumber":"7","streamSid":"%s","media":{"track":"inbound",'
            '"chunk":"6","timestamp":"120","payload":"%s"}}' % (self.sid, base64.b64encode(bytes(range(40, 200))).decode())
        ).encode()
        self.frame = ws_frame(media)
        self.idx = array("l")
        self.at = array("d")
        self.closed = False
        self.first_media = None
        self.marks = 0
        self.clears = 0


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame with an all-zero mask key (the payload is then sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Client:
    """The client side: media streams, the STT sink, one epoll loop."""

    def __init__(self, args, port: int, sink: socket.socket | None) -> None:
        self.args = args
        self.port = port
        self.ep = select.epoll()
        self.streams: list[Stream] = []
        self.by_fd: dict[int, Any] = {}
        self.client_phases = args.client_phases
        self.phases: list[list[Stream]] = [[] for _ in range(self.client_phases)]
        self.random = random.Random(RANDOM_SEED) if args.random_phase else None
        self.sink = sink
        self.sink_conns: dict[int, list] = {}
        self.sink_bytes = 0
        self.busy = array("d")
        self.recording = False
        self.next_tick = time.monotonic()
        self.phase = 0
        self.sent_ticks = 0
        self.frames_sent = 0
        self.coalesced = 0
        # time.monotonic() - time.time(): fallback stamps in the kernel's (realtime) clock.
        self.clock_offset = time.monotonic() - time.time()
        if sink is not None:
            sink.setblocking(False)
            self.ep.register(sink.fileno(), select.EPOLLIN)

    # connections
    def open_stream(self) -> None:
        n = len(self.streams)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        s = Stream(n, sock)
        self.streams.append(s)
        self.by_fd[s.fd] = s
        self.ep.register(s.fd, select.EPOLLIN)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((
            f"GET /voice/stream HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())

    def started(self, s: Stream) -> None:
        start = {
            "event": "start", "sequenceNumber": "1", "streamSid": s.sid,
            "start": {"streamSid": s.sid, "accountSid": "AC" + "0" * 32, "callSid": "CA%032x" % s.n,
                      "tracks": ["inbound"], "customParameters": {"token": "t"},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
        }
        s.sock.send(ws_frame(b'{"event":"connected","protocol":"Call","version":"1.0.0"}') + ws_frame(json.dumps(start).encode()))
        s.state = "open"
        phase = self.random.randrange(self.client_phases) if self.random is not None else s.n % self.client_phases
        self.phases[phase].append(s)

    # the loop
    def run_until(self, deadline: float, done=None) -> None:
        ep, by_fd, step = self.ep, self.by_fd, FRAME / self.client_phases
        busy = self.busy
        while True:
            now = time.monotonic()
            if now >= deadline or (done is not None and done()):
                return
            timeout = min(self.next_tick, deadline) - now
            events = ep.poll(timeout if timeout > 0 else 0)
            t = time.monotonic()
            for fd, _ in events:
                obj = by_fd.get(fd)
                if obj is None:
                    if self.sink is not None and fd == self.sink.fileno():
                        self.accept_sink()
                    else:
                        self.read_sink(fd)
                else:
                    self.read(obj, t)
            if self.next_tick < t - FRAME:
                self.next_tick = t  # far behind: do not burst
            while t >= self.next_tick:  # every phase due (a long wakeup may pass several)
                for s in self.phases[self.phase]:
                    if s.state == "open" and not s.closed:
                        self.send(s, s.frame)
                        self.frames_sent += 1
                self.phase = (self.phase + 1) % self.client_phases
                self.next_tick += step
                self.sent_ticks += 1
            if self.recording:
                busy.append(time.monotonic() - t)

    def send(self, s: Stream, data: bytes) -> None:
        if s.out:
            data = s.out + data
            s.out = b""
        try:
            sent = s.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(s)
            return
        if sent < len(data):
            s.out = data[sent:]

    def close(self, s: Stream) -> None:
        if not s.closed:
            s.closed = True
            try:
                self.ep.unregister(s.fd)
            except (OSError, ValueError):
                pass

    def read(self, s: Stream, t: float) -> None:
        try:
            data, ancillary, _, _ = s.sock.recvmsg(262144, 64)
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", ()
        if not data:
            self.close(s)
            return
        stamp = t - self.clock_offset  # fallback: when epoll returned
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = TIMESPEC.unpack_from(value)
                stamp = sec + nsec * 1e-9
        buf = s.buf + data if s.buf else data
        pos = 0
        if s.state == "handshake":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                s.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.close(s)
                return
            pos = end + 4
            self.started(s)
        n = len(buf)
        idx, at, off, rec = s.idx, s.at, s.pay_off, self.recording
        # The kernel's stamp is that of the newest data read: exact for the last media frame
        # of this read; earlier ones (coalesced while the client lagged) get NaN.
        last_media = -1
        while n - pos >= 2:
            length = buf[pos + 1]
            if length < 126:
                hl = 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            start = pos + hl
            end = start + length
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 1:
                if buf[start + 10 : start + 15] == b"media":
                    p = start + off
                    i = int.from_bytes(base64.b64decode(buf[p : p + 8])[:4], "big")
                    if s.first_media is None:
                        s.first_media = t
                    if rec:
                        if last_media >= 0:
                            at[last_media] = NAN
                            self.coalesced += 1
                        last_media = len(at)
                        idx.append(i)
                        at.append(stamp)
                elif buf[start + 10 : start + 14] == b"mark":
                    s.marks += 1
                elif buf[start + 10 : start + 15] == b"clear":
                    s.clears += 1
            elif opcode == 8:
                self.close(s)
                return
            pos = end
        s.buf = buf[pos:] if pos < n else b""

    def accept_sink(self) -> None:
        while True:
            try:
                conn, _ = self.sink.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.sink_conns[conn.fileno()] = [conn, b"", False]
            self.ep.register(conn.fileno(), select.EPOLLIN)

    def read_sink(self, fd: int) -> None:
        entry = self.sink_conns.get(fd)
        if entry is None:
            return
        conn = entry[0]
        try:
            data = conn.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ep.unregister(fd)
            conn.close()
            del self.sink_conns[fd]
            return
        self.sink_bytes += len(data)
        if not entry[2]:
            head = entry[1] + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                entry[1] = head
                return
            key = b""
            for line in head[:end].split(b"\r\n"):
                if line.lower().startswith(b"sec-websocket-key:"):
                    key = line.split(b":", 1)[1].strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            entry[1], entry[2] = b"", True


def analyse(streams: list[Stream], window: float) -> dict:
    """Pacing error, jitter and losses over the recorded window (NaN stamps: not timed)."""
    errors: list[float] = []
    jitter: list[float] = []
    lost = behind = closed = 0
    for s in streams:
        if s.closed:
            closed += 1
        idx, at = s.idx, s.at
        if not idx:
            behind += int(window / FRAME)
            continue
        for k in range(1, len(idx)):
            if idx[k] > idx[k - 1] + 1:
                lost += idx[k] - idx[k - 1] - 1
        timed = [(i, t) for i, t in zip(idx, at, strict=True) if t == t]
        if not timed:
            continue
        i0, t0 = timed[0]
        prev_i, prev_t = i0, t0
        for i, t in timed[1:]:
            errors.append(abs((t - t0) - (i - i0) * FRAME))
            if i > prev_i:
                jitter.append(abs((t - prev_t) - (i - prev_i) * FRAME))
            prev_i, prev_t = i, t
        # Grid points the stream's arrivals span beyond its frames: ticks the server fell behind.
        behind += max(0, int(round((prev_t - t0) / FRAME)) - (prev_i - i0))
    errors.sort()
    jitter.sort()
    ms = lambda v: v * 1000.0  # noqa: E731
    return {
        "frames": sum(len(s.idx) for s in streams),
        "frames_timed": len(errors) + sum(1 for s in streams if s.idx),
        "error_p50_ms": ms(percentile(errors, 0.50)),
        "error_p99_ms": ms(percentile(errors, 0.99)),
        "error_max_ms": ms(errors[-1]) if errors else float("nan"),
        "jitter_p50_ms": ms(percentile(jitter, 0.50)),
        "jitter_p99_ms": ms(percentile(jitter, 0.99)),
        "jitter_max_ms": ms(jitter[-1]) if jitter else float("nan"),
        "frames_lost": lost,
        "frames_behind": behind,
        "streams_closed": closed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--streams", type=int, default=TARGET_STREAMS, help="concurrent streams (500)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (30)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the ramp before measuring (3)")
    parser.add_argument("--stt", choices=("sink", "null"), default="sink",
                        help="inbound audio to a real RealtimeTranscriber ending in a discard sink on the "
                             "client's CPU (sink), or to a counter (null)")
    parser.add_argument("--phases", type=int, default=None, help="PlaybackScheduler(phases=N) (its default)")
    parser.add_argument("--client-phases", type=int, default=CLIENT_PHASES,
                        help="spread the streams' inbound frames over N phases of 20/N ms (10; 1: every stream "
                             "sends at the same moment, so the server reads them in one burst)")
    parser.add_argument("--random-phase", action="store_true",
                        help="give each stream a random one of the client phases (seeded), as calls start at "
                             "random moments, instead of taking them in turn")
    parser.add_argument("--feed-slots", type=int, default=10,
                        help="split the synthetic TTS feed over N slots of 200/N ms (10; 1: all streams at once)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness increment for both processes (negative needs root; for a machine shared with other load)")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() in the server once started")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU for the server (0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for the clients (1)")
    parser.add_argument("--json", default=OUT_JSON, help=f"where to write the results ({OUT_JSON})")
    parser.add_argument("--role", choices=("client", "server"), default="client", help=argparse.SUPPRESS)
    parser.add_argument("--stt-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        return serve(args)
    return run_client(args)


def run_client(args) -> int:
    if args.nice:
        os.nice(args.nice)  # inherited by the server process
    cpus = os.sched_getaffinity(0)
    if args.client_cpu in cpus:
        os.sched_setaffinity(0, {args.client_cpu})
    sink = None
    command = [sys.executable, os.path.abspath(__file__), "--role", "server", "--streams", str(args.streams)]
    if args.server_cpu in cpus:
        command += ["--cpu", str(args.server_cpu)]
    if args.phases is not None:
        command += ["--phases", str(args.phases)]
    command += ["--feed-slots", str(args.feed_slots)]
    if args.gc_freeze:
        command += ["--gc-freeze"]
    if args.stt == "sink":
        sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sink.bind(("127.0.0.1", 0))
        sink.listen(1024)
        command += ["--stt-url", "ws://127.0.0.1:%d/v1/realtime" % sink.getsockname()[1]]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def ask(cmd: str | None) -> dict:
        if cmd is not None:
            server.stdin.write(cmd.encode() + b"\n")
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("the server process exited")
        return json.loads(line)

    try:
        hello = ask(None)
        client = Client(args, hello["port"], sink)
        ramp_start = time.monotonic()
        # Ramp: 25 new streams every 50 ms (under the listen backlog), the rest keep streaming.
        while len(client.streams) < args.streams:
            for _ in range(min(25, args.streams - len(client.streams))):
                client.open_stream()
            client.run_until(time.monotonic() + 0.05)
        client.run_until(time.monotonic() + 30, lambda: all(s.first_media is not None or s.closed for s in client.streams))
        ramp = time.monotonic() - ramp_start
        up = sum(1 for s in client.streams if s.first_media is not None and not s.closed)
        client.run_until(time.monotonic() + args.warmup)
        ask("begin")
        client.recording = True
        pinned = (args.server_cpu, args.client_cpu)
        cpu0, wall0, machine0 = time.process_time(), time.monotonic(), cpu_busy(pinned)
        sent0 = client.frames_sent
        client.run_until(wall0 + args.seconds)
        wall = time.monotonic() - wall0
        client_cpu = 100.0 * (time.process_time() - cpu0) / wall
        client_sent = (client.frames_sent - sent0) / wall
        machine = {c: 100.0 * (b - machine0.get(c, 0.0)) / wall for c, b in cpu_busy(pinned).items()}
        client.recording = False
        stats = ask("end")
        server.stdin.write(b"quit\n")
    finally:
        try:
            server.stdin.close()
        except OSError:
            pass
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    result = analyse(client.streams, args.seconds)
    busy = sorted(client.busy)
    per_stream = (stats["rss_begin"] - hello["rss"]) / max(1, up)
    result.update({
        "streams": args.streams,
        "streams_up": up,
        "seconds": args.seconds,
        "stt": args.stt,
        "phases": args.phases,
        "reactor": hello["reactor"],
        "feed_slots": args.feed_slots,
        "client_phases": args.client_phases,
        "random_phase": args.random_phase,
        "ramp_seconds": ramp,
        "server_cpu_percent": stats["cpu_percent"],
        "server_rss_base_mib": hello["rss"] / 2**20,
        "server_rss_mib": stats["rss_begin"] / 2**20,
        "server_rss_end_mib": stats["rss_end"] / 2**20,
        "memory_per_stream_kib": per_stream / 1024,
        "max_tick_lateness_ms": stats["max_tick_lateness_ms"],
        "server_gc2_collections": stats["gc2_count"],
        "server_gc2_max_ms": stats["gc2_max_ms"],
        "client_frames_sent_per_s": client_sent,
        "frames_coalesced_untimed": client.coalesced,
        "missed_ticks": stats["missed_ticks"],
        "inbound_frames_per_s": stats["media_in_per_s"],
        "stt_sessions": stats["stt_connected"] if args.stt == "sink" else 0,
        "stt_frames_dropped": stats["stt_dropped"],
        "stt_bytes_to_sink": client.sink_bytes,
        "client_cpu_percent": client_cpu,
        "client_busy_p99_ms": percentile(busy, 0.99) * 1000,
        "client_busy_max_ms": (busy[-1] if busy else float("nan")) * 1000,
        # Busy % of the two CPUs minus this benchmark's own processes: other load that skews it.
        "other_load_server_cpu_percent": machine.get(args.server_cpu, 0.0) - stats["cpu_percent"],
        "other_load_client_cpu_percent": machine.get(args.client_cpu, 0.0) - client_cpu,
        "marks": sum(s.marks for s in client.streams),
        "clears": sum(s.clears for s in client.streams),
    })
    ok = {
        "streams": up >= TARGET_STREAMS and up == args.streams,
        "p99": result["error_p99_ms"] < TARGET_P99_MS,
        "lost": result["frames_lost"] == 0 and result["frames_behind"] == 0 and result["streams_closed"] == 0,
        "memory": result["memory_per_stream_kib"] < TARGET_KIB,
    }
    result["targets_met"] = ok
    out = os.path.abspath(args.json)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)

    v = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print(f"media streams: {args.streams} streams x {args.seconds:g} s, server on CPU {args.server_cpu}, clients on CPU "
          f"{args.client_cpu}, STT {'RealtimeTranscriber -> discard sink' if args.stt == 'sink' else 'null sink'}, "
          f"playback phases {args.phases if args.phases is not None else 'default'}, reactor {hello['reactor']}, TTS feed in {args.feed_slots} slots, client phases {args.client_phases}{' (random)' if args.random_phase else ''}"
          + (f", nice {args.nice:+d}" if args.nice else ""))
    print(f"{'metric':<34} {'value':>12}  target")
    rows = [
        ("streams up", f"{up}", f">= {TARGET_STREAMS}: {v(ok['streams'])}"),
        ("pacing error p50 (ms)", f"{result['error_p50_ms']:.2f}", ""),
        ("pacing error p99 (ms)", f"{result['error_p99_ms']:.2f}", f"< {TARGET_P99_MS:g}: {v(ok['p99'])}"),
        ("pacing error max (ms)", f"{result['error_max_ms']:.2f}", ""),
        ("jitter p50 / p99 / max (ms)", f"{result['jitter_p50_ms']:.2f}/{result['jitter_p99_ms']:.2f}/{result['jitter_max_ms']:.1f}", ""),
        ("frames received / kernel-timed", f"{result['frames']}/{result['frames_timed']}", ""),
        ("frames lost / behind / closed", f"{result['frames_lost']}/{result['frames_behind']}/{result['streams_closed']}", f"0: {v(ok['lost'])}"),
        ("server CPU (% of one core)", f"{result['server_cpu_percent']:.1f}", ""),
        ("server CPU per stream (%)", f"{result['server_cpu_percent'] / max(1, up):.3f}", ""),
        ("memory per stream (KiB)", f"{result['memory_per_stream_kib']:.1f}", f"< {TARGET_KIB:g}: {v(ok['memory'])}"),
        ("server RSS base / up / end (MiB)", f"{result['server_rss_base_mib']:.0f}/{result['server_rss_mib']:.0f}/{result['server_rss_end_mib']:.0f}", ""),
        ("tick lateness max (ms)", f"{result['max_tick_lateness_ms']:.2f}", ""),
        ("missed ticks", f"{result['missed_ticks']}", ""),
        ("server full GCs / longest (ms)", f"{result['server_gc2_collections']}/{result['server_gc2_max_ms']:.1f}", ""),
        ("inbound frames/s sent / at server", f"{client_sent:.0f}/{result['inbound_frames_per_s']:.0f}", f"{50 * args.streams}"),
        ("STT sessions / frames dropped", f"{result['stt_sessions']}/{result['stt_frames_dropped']}", ""),
        ("client CPU (% of one core)", f"{client_cpu:.1f}", "well under 100"),
        ("client busy per wakeup p99/max (ms)", f"{result['client_busy_p99_ms']:.2f}/{result['client_busy_max_ms']:.1f}", ""),
        ("other load on server/client CPU (%)", f"{result['other_load_server_cpu_percent']:.0f}/{result['other_load_client_cpu_percent']:.0f}",
         "~0 for a clean run"),
    ]
    for name, value, target in rows:
        print(f"{name:<34} {value:>12}  {target}")
    print(f"results written to {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
