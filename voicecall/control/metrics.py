# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, served on their own loopback-by-default listener (`metrics.bind`,
`metrics.port`) when `metrics.enabled` is set.

Components do not import prometheus: counts they already keep (active calls, webhook outcomes,
media-stream counts) are read at scrape time by `VoicecallCollector`, and the two latency
histograms are fed through plain callables that tap.py wires (`Metrics.observe_*`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

_LATENCY_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class VoicecallCollector:
    """Reads the live counts of the daemon's components at scrape time."""

    def __init__(
        self,
        provider: str,
        active_calls: Callable[[], Iterable[Any]],
        webhook_counts: Counter,
        ended_counts: Counter,
        media: Callable[[], dict] | None = None,
        cluster: Callable[[], dict] | None = None,
    ) -> None:
        self._provider = provider
        self._active_calls = active_calls
        self._webhook_counts = webhook_counts
        self._ended_counts = ended_counts
        self._media = media
        self._cluster = cluster

    def collect(self):
        calls = GaugeMetricFamily("voicecall_calls_active", "Active calls by state.", labels=["provider", "state"])
        by_state = Counter(call.state.value for call in self._active_calls())
        for state, n in sorted(by_state.items()):
            calls.add_metric([self._provider, state], n)
        yield calls
        ended = CounterMetricFamily("voicecall_calls_ended", "Calls ended, by end reason.", labels=["provider", "reason"])
        for reason, n in sorted(self._ended_counts.items()):
            ended.add_metric([self._provider, reason], n)
        yield ended
        hooks = CounterMetricFamily(
            "voicecall_webhook_requests", "Webhook requests by result (ok, replay, or the status of a refusal: 400, 401, 404, 405, 408, 409, 413, 429, 500).", labels=["result"]
        )
        for result, n in sorted(self._webhook_counts.items()):
            hooks.add_metric([result], n)
        yield hooks
        if self._media is not None:
            media = self._media()
            yield GaugeMetricFamily("voicecall_media_streams_open", "Open media streams (pending + active).", value=media.get("open", 0))
            refused = CounterMetricFamily("voicecall_media_streams_refused", "Media streams refused, by reason.", labels=["reason"])
            for reason, n in sorted(media.get("refused", {}).items()):
                refused.add_metric([reason], n)
            yield refused
        if self._cluster is not None:
            yield from _cluster_metrics(self._cluster())


def _cluster_metrics(cluster: dict):
    """
    A cluster node's view (`cluster`: {"node", "nodes": [node JSON as `status --cluster`],
    "adopted", "failedBeats"}), as of its last heartbeat: this node's `node` label, and one
    series per node of the cluster, so any node's scrape shows the whole cluster.
    """
    me = cluster["node"]
    info = GaugeMetricFamily("voicecall_cluster_node_info", "This node of the cluster (its id in the node label).", labels=["node"])
    info.add_metric([me], 1)
    yield info
    up = GaugeMetricFamily("voicecall_cluster_node_up", "1 while a node's heartbeat is within the lease, else 0.", labels=["node"])
    age = GaugeMetricFamily("voicecall_cluster_node_heartbeat_age_seconds", "Seconds since a node's last heartbeat (database clock).", labels=["node"])
    calls = GaugeMetricFamily("voicecall_cluster_node_calls", "Live calls a node owns in the store.", labels=["node"])
    for node in cluster["nodes"]:
        up.add_metric([node["nodeId"]], 1 if node["alive"] else 0)
        if node["heartbeatAgeSeconds"] is not None:
            age.add_metric([node["nodeId"]], node["heartbeatAgeSeconds"])
        calls.add_metric([node["nodeId"]], node["calls"])
    yield up
    yield age
    yield calls
    yield CounterMetricFamily("voicecall_cluster_adopted_calls", "Calls this node adopted from dead nodes.", value=cluster["adopted"], labels=None)
    yield GaugeMetricFamily("voicecall_cluster_heartbeat_failures", "This node's heartbeats that failed in a row (0: the last one succeeded).", value=cluster["failedBeats"])


class Metrics:
    """The daemon's registry: the collector plus the latency histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._tts_first_audio = Histogram(
            "voicecall_tts_first_audio_seconds",
            "Time from a playback request to the first audio frame sent.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._turn_latency = Histogram(
            "voicecall_turn_latency_seconds",
            "Time from a continue's start to the caller's final transcript.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def add_collector(self, collector: VoicecallCollector) -> None:
        self.registry.register(collector)

    def observe_tts_first_audio(self, seconds: float) -> None:
        self._tts_first_audio.observe(seconds)

    def observe_turn_latency(self, seconds: float) -> None:
        self._turn_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """`GET /metrics` in the Prometheus text format; everything else 404."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        if request.path not in (b"/metrics", b"/"):
            request.setResponseCode(404)
            return b"Not Found"
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return self._metrics.render()


class MetricsSite(Site):
    """The metrics listener's factory; it logs neither each scrape's connection (`noisy`) nor its request."""

    noisy = False

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(MetricsResource(metrics))

    def log(self, request) -> None:
        """No access-log line per scrape: Prometheus scrapes every few seconds, into the journal."""
