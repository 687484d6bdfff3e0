"""The rollups declared once (``store.rollups``): every declared counter reaches each target it names — the day
and hour rollups, the client key's day, the node's lifetime row and the Prometheus text — with the same
figure, and every counter column of those tables is declared, so a counter is added by one line (and its
columns). SQLite and MariaDB."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addon.nodes.routing import NodePool
from addon.observe.metrics import DIRECT, Metrics
from store import rollups
from store.key_usage import KEY_COUNTERS
from store.nodes import upsert_nodes
from store.records import InvocationRecord, NodeConfig, NodeStateUpdate, Usage
from store.rollups import COUNTERS, DAY, HOUR, KEY, Counter
from store.schema import DAILY_COUNTERS, client_key_usage, codex_daily_stats, codex_hourly_stats, nodes
from store.write.batch import apply_batch
from tests.support.databases import fresh_engine

T0 = dt.datetime(2026, 11, 20, 23, 30)


def call(i: int, status: str, node: str | None, client: str | None, usage: Usage | None = None,
         **kw) -> InvocationRecord:
    return InvocationRecord(invoke_id=f"r{i}", occurred_at=T0 + dt.timedelta(minutes=20 * i), source="relay",
                            endpoint="/v1/responses", status=status, node_id=node, model="gpt-5-codex",
                            client_key=client, usage=usage or Usage(), **kw)


# Every outcome, with and without a node, a client key, a price, a first byte, a stream; over two days.
CALLS = [
    call(0, "success", "alpha", "ci", Usage(100, 40, 0, 10, 3), stream=True, cost=0.5, ttfb_ms=120, stream_ms=800,
         duration_ms=950, response_bytes=2000),
    call(1, "failed", "alpha", "ci", http_status=502, node_failure=True, ttfb_ms=3000, duration_ms=3100,
         response_bytes=180),
    call(2, "truncated", "beta", "dev", Usage(50, 0, 0, 5, 0), stream=True, node_failure=True, cost=0.1, ttfb_ms=90,
         stream_ms=400, duration_ms=500, response_bytes=300),
    call(3, "aborted", "beta", None, Usage(20, 10, 0, 0, 0), stream=True, duration_ms=70_000, stream_ms=69_000),
    call(4, "failed", None, "ci", http_status=400, duration_ms=4, response_bytes=90),
    call(5, "success", "beta", "dev", Usage(1000, 900, 0, 50, 20), cost=0.02, ttfb_ms=700, stream_ms=0,
         duration_ms=2500, response_bytes=5000),
]
ATTEMPTS = [NodeStateUpdate("beta", failed_attempt=True, last_error="HTTP 502"),
            NodeStateUpdate("alpha", failed_attempt=True, last_error="HTTP 503")]


def expected(c: Counter) -> dict[str, float]:
    """What each target of ``c`` must hold after ``CALLS`` and ``ATTEMPTS``, by the counter's own rule."""
    def total(calls: list[InvocationRecord]) -> float:
        return sum(c.value(r) for r in calls)

    out: dict[str, float] = {}
    for target, name in ((DAY, "day"), (HOUR, "hour")):
        if target in c.to:
            out[name] = total(CALLS)
    if KEY in c.to:
        out["key"] = total([r for r in CALLS if r.client_key])
    attempts = c.attempt * len(ATTEMPTS)
    if c.node:
        out["node"] = total([r for r in CALLS if r.node_id]) + attempts
    if c.metric:
        out["metric per node"] = total(CALLS) + attempts
        if c.metric.per_client:
            out["metric per client"] = total([r for r in CALLS if r.client_key])
    return out


@pytest.fixture
def stored(db_url):
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            upsert_nodes(conn, [NodeConfig("alpha", "https://a.example"), NodeConfig("beta", "https://b.example")])
        items = [*CALLS[:3], ATTEMPTS[0], *CALLS[3:], ATTEMPTS[1]]
        for start in (0, 4):  # two batches: the rows grow by increments
            with engine.begin() as conn:
                apply_batch(conn, items[start:start + 4])
        yield engine


def scraped() -> dict[tuple[str, tuple], float]:
    metrics = Metrics(lambda: NodePool([]), lambda: None)
    for item in [*CALLS, *ATTEMPTS]:
        metrics.observe(item)
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_total(samples: dict, name: str, kind: str | None) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and (kind is None or dict(labels).get("kind") == kind))


def test_every_declared_counter_reaches_each_of_its_targets(stored):
    samples = scraped()
    want, got = {}, {}
    with stored.connect() as conn:
        for c in COUNTERS:
            for target, figure in expected(c).items():
                want[c.name, target] = pytest.approx(figure)
                assert figure, f"{c.name}: the calls give {target} nothing to count: the check could not fail"
            sums = {"day": (codex_daily_stats, c.name), "hour": (codex_hourly_stats, c.name),
                    "key": (client_key_usage, c.name), "node": (nodes, c.node)}
            for target, (table, column) in sums.items():
                if (c.name, target) in want:
                    got[c.name, target] = float(conn.execute(sa.select(sa.func.sum(table.c[column]))).scalar() or 0)
            if c.metric is not None:
                kind = None if c.metric.by_status else c.metric.kind
                got[c.name, "metric per node"] = metric_total(samples, f"codex_node_{c.metric.family}_total", kind)
                if c.metric.per_client:
                    got[c.name, "metric per client"] = metric_total(samples, f"codex_client_{c.metric.family}_total",
                                                                    kind)
    assert got == want


def test_every_counter_column_is_declared():
    """A counter column added to a rollup table without its line in the table would stay 0 for ever."""
    def counters(table: sa.Table) -> set[str]:
        return {c.name for c in table.columns if not c.primary_key}

    assert counters(codex_daily_stats) == set(DAILY_COUNTERS) == set(rollups.DAY_COLUMNS)
    assert counters(codex_hourly_stats) == set(rollups.HOUR_COLUMNS)
    # The key's other counters are its admissions and refusals (KeyCount records).
    assert counters(client_key_usage) == {*rollups.KEY_COLUMNS, *KEY_COUNTERS}
    assert {c.name for c in nodes.columns if isinstance(c.type, sa.BigInteger)} == set(rollups.NODE_COLUMNS)
    assert all(c.to or c.node or c.metric for c in COUNTERS)
    assert len({c.name for c in COUNTERS}) == len(COUNTERS)


def test_one_outcome_rule_for_every_rollup():
    """A call's end counts the same in the day rollup, the node's row, its breaker streak and Prometheus."""
    assert [rollups.outcome(r) for r in CALLS] == ["success", "failure", "failure", "aborted", "refused", "success"]
    samples = scraped()
    assert metric_total(samples, "codex_node_failures_total", "failed") == 1
    assert metric_total(samples, "codex_node_failures_total", "truncated") == 1
    assert metric_total(samples, "codex_node_failures_total", "retried") == 2
    assert samples[("codex_node_requests_total", (("node", DIRECT),))] == 1  # the call no node served
