"""Prometheus metrics of the relay, kept in memory and served at ``/metrics`` by the admin addon.

Counters and histograms change in ``observe``, called for every record the runtime hands to its
writer (so they count what the database rows count: a node's requests and failures include the
attempts retried elsewhere); gauges (breaker state, calls in flight, the writer's queue, journal and
lost records) are read when scraped. A scrape never touches the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from addon.routing import NodePool
from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS
from store.records import InvocationRecord, NodeStateUpdate
from store.writer import WriterStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
DIRECT = "direct"  # the node label of calls that went to no node (monitor mode, refused calls)
TOKEN_KINDS = ("input", "cached", "output", "reasoning")


def _seconds(bounds_ms: Iterable[int]) -> list[float]:
    return [b / 1000 for b in bounds_ms]


class Metrics:
    """The relay's metrics registry. ``pool`` and ``writer`` are read at scrape time."""

    def __init__(self, pool: Callable[[], NodePool], writer: Callable[[], WriterStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._in_flight: Callable[[], int] = lambda: 0
        r = self.registry
        self.requests = Counter("codex_node_requests", "Calls and retried attempts per node.", ["node"], registry=r)
        self.failures = Counter("codex_node_failures", "Failures counted against a node, by kind: failed, "
                                "truncated (a call's status) or retried (an attempt the client never saw).",
                                ["node", "kind"], registry=r)
        self.tokens = Counter("codex_node_tokens", "Tokens per node by kind (input includes cached, output "
                              "includes reasoning).", ["node", "kind"], registry=r)
        self.ttfb = Histogram("codex_node_ttfb_seconds", "Time to the node's response headers.", ["node"],
                              buckets=_seconds(TTFB_BUCKETS_MS), registry=r)
        self.duration = Histogram("codex_node_duration_seconds", "Whole call duration as the client saw it.",
                                  ["node"], buckets=_seconds(DURATION_BUCKETS_MS), registry=r)
        self.client_requests = Counter("codex_client_requests", "Calls per client key name.", ["client"],
                                       registry=r)
        self.client_tokens = Counter("codex_client_tokens", "Tokens per client key name by kind.",
                                     ["client", "kind"], registry=r)
        r.register(_StateCollector(pool, writer, lambda: self._in_flight()))
        # (metric, label values) -> its series: ``labels()`` validates and locks on every call, which was
        # most of the cost of ``observe``. Bounded like the series themselves (node ids, client key names).
        self._series: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def count_in_flight(self, getter: Callable[[], int]) -> None:
        """Where the calls in flight are counted (the relay's)."""
        self._in_flight = getter

    def observe(self, item: InvocationRecord | NodeStateUpdate) -> None:
        """Count one record on its way to the writer. Cheap: it runs on the event loop."""
        if isinstance(item, NodeStateUpdate):
            if item.failed_attempt:
                self._of(self.requests, item.node_id).inc()
                self._of(self.failures, item.node_id, "retried").inc()
            return
        node = item.node_id or DIRECT
        u = item.usage
        tokens = (u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens)
        self._of(self.requests, node).inc()
        if item.node_failure:
            self._of(self.failures, node, item.status).inc()
        for kind, n in zip(TOKEN_KINDS, tokens, strict=True):
            if n:
                self._of(self.tokens, node, kind).inc(n)
        if item.ttfb_ms is not None:
            self._of(self.ttfb, node).observe(item.ttfb_ms / 1000)
        if item.duration_ms is not None:
            self._of(self.duration, node).observe(item.duration_ms / 1000)
        if item.client_key:
            self._of(self.client_requests, item.client_key).inc()
            for kind, n in zip(TOKEN_KINDS, tokens, strict=True):
                if n:
                    self._of(self.client_tokens, item.client_key, kind).inc(n)

    def _of(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        series = self._series.get((metric, labels))
        if series is None:
            series = self._series[(metric, labels)] = metric.labels(*labels)
        return series

    def scrape(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the live state at each scrape."""

    def __init__(self, pool: Callable[[], NodePool], writer: Callable[[], WriterStats | None],
                 in_flight: Callable[[], int]) -> None:
        self._pool, self._writer, self._in_flight = pool, writer, in_flight

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        breaker = GaugeMetricFamily("codex_node_breaker_open", "1 while the node's circuit breaker keeps it out "
                                    "of rotation (failed), else 0.", labels=["node"])
        disabled = GaugeMetricFamily("codex_node_disabled", "1 while the node is disabled on the admin page.",
                                     labels=["node"])
        for node in self._pool():
            breaker.add_metric([node.id], 1 if node.failed else 0)
            disabled.add_metric([node.id], 1 if node.disabled else 0)
        yield breaker
        yield disabled
        yield GaugeMetricFamily("codex_calls_in_flight", "Client calls being relayed now.", value=self._in_flight())
        stats = self._writer()
        if stats is None:
            return
        yield GaugeMetricFamily("codex_writer_queue", "Records waiting for the writer thread.", value=stats.queued)
        yield GaugeMetricFamily("codex_writer_journal", "Records in the journal (spool) while the database "
                                "is unreachable.", value=stats.spooled)
        yield GaugeMetricFamily("codex_writer_db_ok", "1 while the writer reaches the database.",
                                value=1 if stats.db_ok else 0)
        yield CounterMetricFamily("codex_writer_lost_records", "Records neither written nor journaled.",
                                  value=stats.lost)
        yield CounterMetricFamily("codex_writer_written_records", "Records written to the database.",
                                  value=stats.written)
