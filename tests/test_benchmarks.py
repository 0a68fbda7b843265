"""
A smoke test of the benchmark runner: `python -m benchmarks --quick store` in a child process
(a few seconds) prints its table and writes its JSON. No figure is asserted: performance is
measured by `make bench`, not by the test suite.
"""
from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import PROJECT_ROOT, child_env, workdir
from tests.pgserver import find_postgres_bin


class BenchmarkRunnerTests(TestCase):
    timeout = 90

    async def test_quick_store(self):
        """The runner runs the named benchmark, which prints its table and writes its JSON."""
        results = workdir(self)
        env = child_env({"VOICECALL_BENCH_RESULTS": results})
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "benchmarks", "--quick", "store"], env=env, path=PROJECT_ROOT, reactor=reactor
        )
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, text + err.decode("utf-8", "replace"))
        self.assertIn("initiate p50 (ms)", text)
        self.assertIn("open + restore (s)", text)
        with open(os.path.join(results, "store.json")) as f:
            data = json.load(f)
        self.assertEqual(data["benchmark"], "store")
        self.assertEqual(data["restore"]["restored"], data["populate"]["calls"])

    async def test_absent_benchmark_skipped(self):
        """--list names every benchmark and says which are absent, without running any."""
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "benchmarks", "--list"], env=child_env(), path=PROJECT_ROOT, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        names = [line.split()[0] for line in out.decode().splitlines()]
        self.assertEqual(names[:3], ["webhooks", "store", "memory"])


class ClusterBenchmarkTests(TestCase):
    """The cluster benchmarks run at a tiny size (each starts its own PostgreSQL, as the tests do)."""

    timeout = 240

    def setUp(self):
        if find_postgres_bin() is None:
            raise SkipTest("PostgreSQL not found: the cluster benchmarks need one")

    async def quick(self, name: str) -> tuple[str, dict]:
        results = workdir(self)
        env = child_env({"VOICECALL_BENCH_RESULTS": results})
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "benchmarks", "--quick", name], env=env, path=PROJECT_ROOT, reactor=reactor
        )
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, text + err.decode("utf-8", "replace"))
        with open(os.path.join(results, f"{name}.json")) as f:
            data = json.load(f)
        self.assertEqual(data["benchmark"], name)
        return text, data

    async def test_quick_failover(self):
        """kill -9 of a node with 4 calls (2 streamed): the figures are printed and written, per call."""
        text, data = await self.quick("failover")
        self.assertIn("seconds from kill -9 of node a", text)
        self.assertIn("nothing acknowledged lost:", text)
        self.assertEqual((data["calls"], data["streamed"], data["lease_seconds"]), (4, 2, 3))
        self.assertGreater(data["transcript_entries_before"], 0)
        self.assertLessEqual(len(data["adopted"]), 4)

    async def test_quick_cluster_streams(self):
        """5 streamed calls on 1 node, then 5 on each of 2: every stream up, its frames timed, the verdict printed."""
        text, data = await self.quick("cluster_streams")
        self.assertIn("held within the targets: 1 node", text)
        for key, streams in (("1 node", 5), ("2 nodes", 10)):
            (run,) = data[key]
            self.assertEqual((run["streams"], run["streams_up"]), (streams, streams))
            self.assertGreater(run["frames_timed"], 0)
