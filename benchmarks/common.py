"""
Helpers shared by the benchmarks: CPU pinning, percentiles, tables, JSON results, and a few
/proc readers (RSS, CPU time) for child processes. Standard library only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

#: The checkout the benchmarks belong to; results go to its var/bench/ (gitignored).
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: $VOICECALL_BENCH_RESULTS overrides it (the smoke test writes to a temporary directory).
RESULTS_DIR = os.environ.get("VOICECALL_BENCH_RESULTS") or os.path.join(PROJECT_ROOT, "var", "bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pin(cpu: int | None) -> bool:
    """Pin this process (and the threads it starts later) to C{cpu}; False if that CPU is absent."""
    if cpu is None:
        return False
    if cpu not in os.sched_getaffinity(0) and cpu >= (os.cpu_count() or 1):
        return False
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return False
    return True


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def percentile(values: Sequence[float], p: float) -> float:
    """The C{p}th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """Print an aligned table (numbers right-aligned) and return its text."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    out = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _is_number(text: str) -> bool:
    t = text.replace(",", "").replace("x", "").replace("%", "")
    try:
        float(t)
        return True
    except ValueError:
        return text == "-"


def write_json(name: str, data: dict[str, Any]) -> str:
    """Write C{data} (plus host facts) to var/bench/<name>.json; return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        **data,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"results: {os.path.relpath(path, os.getcwd()) if path.startswith(os.getcwd()) else path}", flush=True)
    return path


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_env() -> dict[str, str]:
    """Our environment for a child, with the checkout importable and no voicecall overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("VOICECALL_CONFIG", "VOICECALL_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def spawn(argv: list[str], ready: str = "READY ", timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """
    Start a child (stdout piped, stderr inherited) and wait for its C{ready} line, which carries
    a JSON object after the prefix; return the process and that object. The child is killed if it
    does not get ready in C{timeout} seconds.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, env=child_env(), cwd=PROJECT_ROOT)
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith(ready):
                    return proc, json.loads(text[len(ready):])
        raise RuntimeError(f"child {' '.join(argv[-4:])} not ready: {buf[-2000:].decode('utf-8', 'replace')}")
    except BaseException:
        stop(proc)
        raise
    finally:
        sel.close()


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    """Ask a child to stop (SIGTERM), reap it, and return the rest of its stdout."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return (out or b"").decode("utf-8", "replace")


def last_json(text: str, prefix: str) -> dict | None:
    """The JSON object of the last line of C{text} that starts with C{prefix}."""
    found = None
    for line in text.splitlines():
        if line.startswith(prefix):
            found = json.loads(line[len(prefix):])
    return found


# --- a daemon in a child process -----------------------------------------------------------------


def daemon_argv(config: dict, directory: str, cpu: int | None = None) -> list[str]:
    """The command that runs the real C{makeService} with C{config} (store in C{directory})."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump({**config, "store": directory}, f)
    argv = [sys.executable, "-m", "benchmarks.common", "--daemon", path, "--rpc", f"unix:{directory}/rpc.sock"]
    return argv + ([] if cpu is None else ["--cpu", str(cpu)])


def _serve_daemon(argv: list[str]) -> int:
    """Child side of L{daemon_argv}: start the daemon, print READY, run until SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--daemon", required=True)
    parser.add_argument("--rpc", required=True)
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    pin(args.cpu)
    from twisted.internet import reactor

    from voicecall import tap

    with open(args.daemon) as f:
        config = json.load(f)
    options = tap.Options()
    webhook = [] if config.get("serve", {}).get("port") else ["--webhook", "tcp:0:interface=127.0.0.1"]
    options.parseOptions(["--config", args.daemon, "--rpc", args.rpc] + webhook)
    service = tap.makeService(options, reactor)
    started = time.perf_counter()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def ready(_):
        info = {"webhook": service.webhook_url, "rpc": args.rpc.split(":", 2)[1], "pid": os.getpid(),
                "start_seconds": time.perf_counter() - started}
        print("READY " + json.dumps(info), flush=True)

    def failed(f):
        print(f"daemon failed: {f.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    service.ready.addCallbacks(ready, failed)
    reactor.run()
    return 0


class RpcLine:
    """A blocking JSON-RPC client for the control socket (one request at a time)."""

    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.ids = 0

    def call(self, method: str, params: dict | None = None) -> Any:
        self.ids += 1
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params or {}}).encode() + b"\n")
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("the daemon closed the RPC socket")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            message = json.loads(line)
            if message.get("id") != self.ids:
                continue  # a notification
            if "error" in message:
                raise RuntimeError(message["error"].get("message"))
            return message["result"]

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    sys.exit(_serve_daemon(sys.argv[1:]))
