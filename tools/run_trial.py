"""Run the trial suite and close with the plain line `N passed, N failed`.

trial's own closing line (`PASSED (successes=N)` / `FAILED (failures=..., errors=...)`) is not the
plain summary CI reads, and trial exits 0 when no test ran at all. This wrapper streams trial's
output unchanged, then prints the plain line, and exits non-zero on any failure or when no test ran.

Usage: python tools/run_trial.py [trial arguments...]   (default: tests)
"""
import re
import subprocess
import sys

SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)\s*$")


def main(argv):
    args = argv or ["tests"]
    cmd = [sys.executable, "-m", "twisted.trial", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    verdict, counts = None, {}
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = SUMMARY.match(line)
        if m:
            verdict = m.group(1)
            counts = {k.strip(): int(v) for k, v in (p.split("=") for p in m.group(2).split(","))}
    rc = proc.wait()
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses"))
    skipped = counts.get("skips", 0)
    if verdict is None:
        failed = max(failed, 1)
    print()
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    if rc != 0 or failed or verdict != "PASSED":
        return 1
    if passed == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
