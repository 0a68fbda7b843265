"""
Tests for the cluster's routing (voicecall.cluster.router): the `cluster` config section, and
any node serving any request: webhooks and RPC for a call another live node owns are forwarded
to it through the store, and answered with the owner's answer.
"""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from voicecall.config import ConfigError, parse_config

ENV = {"HOME": "/h"}


class ClusterConfigTests(SynchronousTestCase):
    """The `cluster` section: nodeId, leaseSeconds, entryUrl."""

    def test_defaults(self):
        cluster = parse_config({}, ENV).cluster
        self.assertEqual((cluster.node_id, cluster.lease_seconds, cluster.entry_url), (None, 10, None))

    def test_values(self):
        cluster = parse_config({"cluster": {"nodeId": "node-a.1_x", "leaseSeconds": 4, "entryUrl": "https://voice.example.com"}}, ENV).cluster
        self.assertEqual((cluster.node_id, cluster.lease_seconds, cluster.entry_url), ("node-a.1_x", 4, "https://voice.example.com"))

    def test_bad_values(self):
        """A node id that cannot name a NOTIFY channel, a lease too short to heartbeat in, a relative URL."""
        for bad, where in (
            ({"nodeId": "a b"}, "cluster.nodeId"),
            ({"nodeId": "-a"}, "cluster.nodeId"),
            ({"nodeId": "a" * 49}, "cluster.nodeId"),
            ({"nodeId": "é"}, "cluster.nodeId"),
            ({"leaseSeconds": 2}, "cluster.leaseSeconds"),
            ({"entryUrl": "/voice"}, "cluster.entryUrl"),
            ({"nodeid": "a"}, "cluster.nodeid"),
        ):
            e = self.assertRaises(ConfigError, parse_config, {"cluster": bad}, ENV)
            self.assertEqual(len(e.problems), 1, e.problems)
            self.assertIn("$." + where + ":", e.problems[0].replace("plugins.entries.voice-call.config", "$"))
