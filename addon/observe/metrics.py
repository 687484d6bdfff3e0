"""Prometheus metrics of the relay, kept in memory and served at ``/metrics`` by the admin addon.

Counters and histograms change in ``observe``, called for every record the runtime hands to its
writer (so they count what the database rows count: a node's requests and failures include the
attempts retried elsewhere), and a client key's refusals from its ``KeyCount`` records; gauges (breaker
state, calls in flight, the writer's queue, journal and lost records, the keys' limits and their use) are
read when scraped. A scrape never touches the database. The ``model`` label is folded
(``addon.observe.modelfold``) so that its values stay few.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from addon.nodes.routing import NodePool
from addon.observe.modelfold import ModelFold
from store.histogram import bucket_index
from store.records import InvocationRecord, Item, KeyCount, NodeStateUpdate
from store.rollups import COUNTERS, DISTRIBUTIONS, RETRIED, status_class
from store.write.writer import WriterStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
DIRECT = "direct"  # the node label of calls that went to no node (monitor mode, refused calls)
REFUSALS = "codex_client_refusals"
_REFUSED = "refused_"  # the counter prefix of a refusal's KeyCount

# The help of each counter family ``observe`` keeps (store.rollups says which counters feed it), exposed
# with the ``_total`` suffix, and of each histogram.
_HELP = {
    "codex_node_requests": "Calls and retried attempts per node.",
    "codex_node_failures": "Failures counted against a node, by kind: failed, truncated (a call's status) or "
                           "retried (an attempt the client never saw).",
    "codex_node_tokens": "Tokens per node by kind (input includes cached, output includes reasoning).",
    "codex_client_requests": "Calls per client key name.",
    "codex_client_tokens": "Tokens per client key name by kind.",
    "codex_node_cost_usd": "Cost in USD of the calls per node and model (unpriced calls add 0).",
    "codex_client_cost_usd": "Cost in USD of the calls per client key name and model.",
    "codex_node_calls": "Client calls per node, model and HTTP status class of the answer (code).",
    "codex_client_calls": "Client calls per client key name, model and HTTP status class of the answer (code).",
    REFUSALS: "Calls refused by a client key's limits, per key and reason (model, nodes, rate, concurrency, "
              "budget, endpoint, expired).",
}
_HISTOGRAM_HELP = {
    "codex_node_ttfb_seconds": "Time to the node's response headers.",
    "codex_node_duration_seconds": "Whole call duration as the client saw it.",
}


@dataclass(frozen=True, slots=True)
class _Feed:
    """One counter of ``store.rollups.COUNTERS`` as ``observe`` adds it: its value for a call, its families."""

    value: Callable[[InvocationRecord], Any]
    node: str  # the per-node family
    client: str | None  # the per-client family, if any
    kind: str | None
    by_status: bool
    by_model: bool
    by_code: bool
    attempt: int

    def labels(self) -> tuple[str, ...]:
        """The label names after ``node`` or ``client``."""
        return (*(("kind",) if self.kind is not None or self.by_status else ()),
                *(("model",) if self.by_model else ()), *(("code",) if self.by_code else ()))


_FEEDS = tuple(_Feed(c.value, f"codex_node_{m.family}", f"codex_client_{m.family}" if m.per_client else None,
                     m.kind, m.by_status, m.by_model, m.by_code, c.attempt)
               for c in COUNTERS if (m := c.metric) is not None)
# name -> label names of every counter family
_LABELS = {name: (label, *f.labels())
           for f in _FEEDS for name, label in ((f.node, "node"), (f.client, "client")) if name is not None}
_LABELS[REFUSALS] = ("client", "reason")


class Metrics:
    """The relay's metrics registry. ``pool`` and ``writer`` are read at scrape time."""

    def __init__(self, pool: Callable[[], NodePool], writer: Callable[[], WriterStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._in_flight: Callable[[], int] = lambda: 0
        self._budgets: Callable[[], Iterable[Budget]] = lambda: ()
        self._counts = _Counts()
        # The counter keys a call adds to, per (node, client key, status, model label, code): built once per
        # such series, where building each label tuple per counter per call was half of ``observe``. As
        # bounded as the counters themselves.
        self._series: dict[tuple[str, str | None, str, str, str], _Series] = {}
        self._models = ModelFold(lambda: (g for node in pool() for g in node.config.models))
        self.registry.register(self._counts)
        self.registry.register(_StateCollector(pool, writer, lambda: self._in_flight(), lambda: self._budgets()))

    def count_in_flight(self, getter: Callable[[], int]) -> None:
        """Where the calls in flight are counted (the relay's)."""
        self._in_flight = getter

    def count_budgets(self, getter: Callable[[], Iterable[Budget]]) -> None:
        """Where the client keys' limits and their use are read (``addon.limits.Limits.budgets``)."""
        self._budgets = getter

    def observe(self, item: Item) -> None:
        """Count one record on its way to the writer, as ``store.rollups`` declares. Cheap: it runs on the
        event loop."""
        with self._counts.lock:
            add = self._counts.add
            if isinstance(item, NodeStateUpdate):
                if item.failed_attempt:
                    for f in _FEEDS:
                        if f.attempt:
                            kind = RETRIED if f.by_status else f.kind
                            add(f.node, (item.node_id,) if kind is None else (item.node_id, kind), f.attempt)
                return
            if isinstance(item, KeyCount):  # a client key's admission or refusal: no node's
                if item.counter.startswith(_REFUSED):
                    add(REFUSALS, (item.client_key, item.counter.removeprefix(_REFUSED)))
                return
            node = item.node_id or DIRECT
            where = (node, item.client_key, item.status, self._models.label(item.model), status_class(item))
            series = self._series.get(where)
            if series is None:
                series = self._series[where] = _series_of(self._counts.cell, *where)
            for value, at_node, at_client in series:
                n = value(item)
                if n:
                    at_node[0] += n
                    if at_client is not None:
                        at_client[0] += n
            for d in DISTRIBUTIONS:
                ms = d.value(item)
                if ms is not None:
                    self._counts.seen(d.metric, d.metric_bounds, node, ms)

    def scrape(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


# Per feed: its value for a call, its per-node counter and its per-client one (None: none), as ``_Counts`` cells.
_Series = tuple[tuple[Callable[[InvocationRecord], Any], list[float], list[float] | None], ...]


def _series_of(cell: Callable[[str, tuple[str, ...]], list[float]], node: str, client: str | None, status: str,
               model: str, code: str) -> _Series:
    """The counters each feed adds a call of this node, client key, status, model label and code to."""
    out = []
    for f in _FEEDS:
        kind = status if f.by_status else f.kind
        labels = (*(() if kind is None else (kind,)), *((model,) if f.by_model else ()),
                  *((code,) if f.by_code else ()))
        out.append((f.value, cell(f.node, (node, *labels)),
                    cell(f.client, (client, *labels)) if f.client is not None and client else None))
    return tuple(out)


class _Counts(Collector):
    """The counters and histograms of ``observe`` as plain numbers: one lock per record, where
    prometheus_client's metric objects took a label lookup and a lock per counter touched (~8 µs a call)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (name, labels) -> [value]: a cell that ``Metrics.observe`` keeps and adds to without a lookup
        self._counters: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        # (name, node) -> [count per bucket (the last: over every bound)..., sum]
        self._histograms: dict[tuple[str, str], list[float]] = {}

    def cell(self, name: str, labels: tuple[str, ...]) -> list[float]:
        """The counter ``name`` with these label values, created at 0."""
        key = (name, labels)
        found = self._counters.get(key)
        if found is None:
            found = self._counters[key] = [0]
        return found

    def add(self, name: str, labels: tuple[str, ...], n: float = 1) -> None:
        self.cell(name, labels)[0] += n

    def seen(self, name: str, bounds: tuple[int, ...], node: str, ms: int) -> None:
        h = self._histograms.get((name, node))
        if h is None:
            h = self._histograms[(name, node)] = [0] * (len(bounds) + 2)
        h[bucket_index(bounds, ms)] += 1  # Prometheus buckets are "le", as the hourly rollup's
        h[-1] += ms / 1000

    def collect(self) -> Iterable[CounterMetricFamily | HistogramMetricFamily]:
        with self.lock:
            # a cell still 0 was never added to (only a call's non-zero values are): not a series yet
            counters = {k: v[0] for k, v in self._counters.items() if v[0]}
            histograms = {k: list(v) for k, v in self._histograms.items()}
        for name, labels in _LABELS.items():
            family = CounterMetricFamily(name, _HELP[name], labels=list(labels))
            for (n, values), v in counters.items():
                if n == name:
                    family.add_metric(list(values), v)
            yield family
        for d in DISTRIBUTIONS:
            name, bounds = d.metric, d.metric_bounds
            histogram = HistogramMetricFamily(name, _HISTOGRAM_HELP[name], labels=["node"])
            for (n, node), h in histograms.items():
                if n == name:
                    cumulative: float = 0
                    buckets: list[tuple[str, float]] = []
                    for bound, count in zip([*(repr(b / 1000) for b in bounds), "+Inf"], h[:-1], strict=True):
                        cumulative += count
                        buckets.append((bound, cumulative))
                    histogram.add_metric([node], buckets, h[-1])
            yield histogram


@dataclass(frozen=True, slots=True)
class Budget:
    """One limit of a client key: its value and, if known, its use."""

    client: str
    limit: str  # the KeySpec field (rpm, concurrency, daily_requests, daily_tokens, monthly_cost) or a budget's name
    value: float
    used: float | None


class _StateCollector(Collector):
    """Gauges read from the live state at each scrape."""

    def __init__(self, pool: Callable[[], NodePool], writer: Callable[[], WriterStats | None],
                 in_flight: Callable[[], int], budgets: Callable[[], Iterable[Budget]]) -> None:
        self._pool, self._writer, self._in_flight, self._budgets = pool, writer, in_flight, budgets

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
        limit = GaugeMetricFamily("codex_key_limit", "A client key's configured limit, per key and limit (rpm, "
                                  "concurrency, daily_requests, daily_tokens, monthly_cost in USD).",
                                  labels=["client", "limit"])
        used = GaugeMetricFamily("codex_key_used", "A client key's use of its limit: rpm and concurrency in this "
                                 "relay now; the budgets fleet-wide as this relay last read them (at the key's "
                                 "last call here, in the current day or month).", labels=["client", "limit"])
        for b in self._budgets():
            limit.add_metric([b.client, b.limit], b.value)
            if b.used is not None:
                used.add_metric([b.client, b.limit], b.used)
        yield limit
        yield used
        stats = self._writer()
        if stats is None:
            return
        yield GaugeMetricFamily("codex_writer_queue", "Records not yet written or journaled by the writer.",
                                value=stats.queued)
        yield GaugeMetricFamily("codex_writer_journal", "Records in the journal (spool) while the database "
                                "is unreachable.", value=stats.spooled)
        yield GaugeMetricFamily("codex_writer_db_ok", "1 while the writer reaches the database.",
                                value=1 if stats.db_ok else 0)
        yield GaugeMetricFamily("codex_writer_stalled", "1 while the writer process sends nothing (stopped, "
                                "hung): its records go to the relay's journal.", value=1 if stats.stalled else 0)
        yield CounterMetricFamily("codex_writer_stalls", "Times a stalled writer process was replaced.",
                                  value=stats.stalls)
        yield CounterMetricFamily("codex_writer_lost_records", "Records neither written nor journaled.",
                                  value=stats.lost)
        yield CounterMetricFamily("codex_writer_written_records", "Records written to the database.",
                                  value=stats.written)
