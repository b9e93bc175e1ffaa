"""Prometheus metrics, read from plain counters at scrape time.

Per-delivery counting must cost no more than an integer add: a prometheus-client
``Counter.inc`` takes a lock, and fan-out to 10,000 subscribers would take it 10,000
times per event. So the hot path bumps attributes of ``Stats``, and a custom collector
turns them into counter and gauge families when Prometheus asks. Each app gets its own
``CollectorRegistry``, so tests and several apps in one process never collide.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "sse_broker"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass(slots=True)
class Stats:
    """Running totals since start; only ever incremented."""

    published: int = 0
    delivered: int = 0
    dropped: int = 0
    replayed: int = 0
    disconnects: Counter[str] = dataclasses.field(default_factory=Counter)
    # Shared-log backends (Redis): reconnections after losing it, and times events this
    # node had not delivered were found gone, by cause ("reset" or "trimmed").
    backend_reconnects: int = 0
    stream_gaps: Counter[str] = dataclasses.field(default_factory=Counter)


GAP_CAUSES = ("reset", "trimmed")


@dataclasses.dataclass(frozen=True, slots=True)
class Gauges:
    """Current values, read at scrape time."""

    connections: Callable[[], int]
    history: Callable[[], int]
    backend_up: Callable[[], bool] = lambda: True
    stream_lag: Callable[[], float] = lambda: 0.0


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, gauges: Gauges) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        gauges = self._gauges
        yield GaugeMetricFamily(
            f"{PREFIX}_connections", "Open event streams.", value=gauges.connections()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_history_events", "Events retained for replay.", value=gauges.history()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_backend_up",
            "1 while the event backend can publish and replay, else 0.",
            value=1 if gauges.backend_up() else 0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_stream_lag_seconds",
            "How far this node's fan-out is behind the shared log's head (0 when caught up).",
            value=gauges.stream_lag(),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_backend_reconnects",
            "Reconnections to the shared log after losing it.",
            value=stats.backend_reconnects,
        )
        gaps = CounterMetricFamily(
            f"{PREFIX}_stream_gaps",
            "Times events this node had not delivered were gone from the shared log "
            "(reset: Redis restarted empty; trimmed: retention passed this node by); "
            "connected streams were sent broker.missed.",
            labels=["cause"],
        )
        for cause in GAP_CAUSES:
            gaps.add_metric([cause], stats.stream_gaps[cause])
        yield gaps
        for name, help_text, value in (
            ("events_published", "Events accepted from publishers.", stats.published),
            ("events_delivered", "Events written to subscriber connections.", stats.delivered),
            ("events_dropped", "Events dropped by full subscriber queues.", stats.dropped),
            ("events_replayed", "Events sent from history on resume.", stats.replayed),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        disconnects = CounterMetricFamily(
            f"{PREFIX}_disconnects", "Event streams ended, by reason.", labels=["reason"]
        )
        for reason in ("client", "overflow", "shutdown", "error", "expired"):
            disconnects.add_metric([reason], stats.disconnects[reason])
        yield disconnects


class Metrics:
    def __init__(self, stats: Stats, gauges: Gauges) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(stats, gauges))
        self.publish_duration = Histogram(
            f"{PREFIX}_publish_duration_seconds",
            "Time to log and fan out one publish request (or one read of an NDJSON stream).",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
