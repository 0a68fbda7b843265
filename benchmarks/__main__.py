"""
Run the benchmarks in sequence, each in its own process (each prints its table and writes
var/bench/<name>.json); `make bench` runs them all.

Run:  .venv/bin/python -m benchmarks [--quick] [--list] [NAME ...]
      e.g. `python -m benchmarks webhooks store`, or `python -m benchmarks --quick`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from benchmarks.common import PROJECT_ROOT, RESULTS_DIR, child_env, table

#: In order. Arguments for a short smoke run of each (--quick where the benchmark has it).
BENCHMARKS: dict[str, list[str]] = {
    "webhooks": ["--quick"],
    "store": ["--quick"],
    "memory": ["--quick"],
    "media_streams": ["--quick"],
    "tts_first_frame": ["--quick"],
    "audio_convert": ["--seconds", "5", "--repeat", "1"],
    "cluster": ["--quick"],
    "cluster_streams": ["--quick"],
    "failover": ["--quick"],
}


def available(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def accepts_quick(name: str) -> bool:
    """Whether a benchmark's argument parser knows --quick (benchmarks written by others may not)."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], capture_output=True, text=True,
                          env=child_env(), cwd=PROJECT_ROOT, timeout=60)
    return "--quick" in done.stdout


def run_one(name: str, quick: bool) -> tuple[int, float]:
    args: list[str] = []
    if quick:
        args = BENCHMARKS[name]
        if args == ["--quick"] and not accepts_quick(name):
            args = []
    result = os.path.join(RESULTS_DIR, f"{name}.json")
    before = os.path.getmtime(result) if os.path.exists(result) else None
    argv = [sys.executable, "-m", f"benchmarks.{name}", *args]
    print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), cwd=PROJECT_ROOT)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    code = proc.wait()
    seconds = time.perf_counter() - started
    after = os.path.getmtime(result) if os.path.exists(result) else None
    if after is None or after == before:
        # The benchmark writes no JSON of its own: keep its output.
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(result, "w") as f:
            json.dump({"benchmark": name, "argv": argv[1:], "exit_code": code, "seconds": seconds,
                       "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": "".join(lines)}, f, indent=2)
            f.write("\n")
    return code, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="a short smoke run of each")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name}{'' if available(name) else ' (absent)'}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    summary = []
    failed = 0
    for name in names:
        if not available(name):
            print(f"\n=== {name}: skipped (benchmarks/{name}.py is absent)", flush=True)
            summary.append((name, "absent", "-"))
            continue
        code, seconds = run_one(name, args.quick)
        failed += code != 0
        summary.append((name, "ok" if code == 0 else f"exit {code}", f"{seconds:.1f}"))
    print()
    table(("benchmark", "result", "seconds"), summary, title="benchmarks run:")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
