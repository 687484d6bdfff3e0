"""The hourly rollup: its sums match the daily rollup's, and the percentiles read from its fixed buckets
agree with the raw rows' within one bucket, and within 10% on ordinary traffic (SQLite and MariaDB)."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest
import sqlalchemy as sa

from store.cli.stats import main as stats_main
from store.engine import downgrade_to, upgrade_to_head
from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS, bucket_index, percentile
from store.records import InvocationRecord, Usage
from store.schema import DAILY_COUNTERS, codex_daily_stats, codex_hourly_stats, codex_invocations
from store.stats import Filters, per_hour, per_node
from store.write.batch import apply_batch
from tests.support.databases import fresh_engine

T0 = dt.datetime(2026, 11, 20, 9)


@pytest.fixture
def engine(db_url):
    rnd = random.Random(15)
    records = [InvocationRecord(
        invoke_id=f"h{i}", occurred_at=T0 + dt.timedelta(minutes=rnd.randrange(180)), source="relay",
        endpoint="/v1/responses", status="success" if i % 7 else "failed", node_id=rnd.choice(["alpha", "beta"]),
        model="gpt-5-codex", usage=Usage(input_tokens=i, output_tokens=3), node_failure=not i % 7,
        # log-uniform: every bucket gets some, a few land beyond the last bound
        ttfb_ms=None if i % 11 == 0 else round(math.exp(rnd.uniform(2, 11.5))),
        duration_ms=round(math.exp(rnd.uniform(4, 13.5)))) for i in range(600)]
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            for start in range(0, len(records), 97):  # several batches: the rows grow by increments
                apply_batch(conn, records[start:start + 97])
        yield engine


def exact(values: list[int], q: float) -> int:
    """Nearest-rank percentile of the raw values."""
    values = sorted(values)
    return values[math.ceil(q * len(values)) - 1]


def same_bucket(bounds: tuple[int, ...], read: int, raw: int) -> bool:
    """``read`` (interpolated) lies in the bucket of ``raw`` (its lower bound included: rounding); past the last
    bound, it is the last bound."""
    i = bucket_index(bounds, raw)
    if i >= len(bounds):
        return read == bounds[-1]
    return (bounds[i - 1] if i else 0) <= read <= bounds[i]


def test_hourly_percentiles_agree_with_the_raw_rows(engine):
    inv = codex_invocations.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(inv.occurred_at, inv.node_id, inv.ttfb_ms, inv.duration_ms)).all()
        hours = per_hour(conn, Filters())
        nodes = {s.node_id: s for s in per_node(conn, Filters())}
    assert [h.hour for h in hours] == ["2026-11-20 09:00", "2026-11-20 10:00", "2026-11-20 11:00"]
    for h in hours:
        start = dt.datetime.fromisoformat(h.hour)
        mine = [r for r in rows if start <= r.occurred_at < start + dt.timedelta(hours=1)]
        assert h.requests == len(mine)
        ttfb = [r.ttfb_ms for r in mine if r.ttfb_ms is not None]
        durations = [r.duration_ms for r in mine]
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            assert same_bucket(TTFB_BUCKETS_MS, getattr(h, f"ttfb_{name}_ms"), exact(ttfb, q)), (h.hour, name)
            assert same_bucket(DURATION_BUCKETS_MS, getattr(h, f"duration_{name}_ms"), exact(durations, q))
    for node_id in ("alpha", "beta"):
        ttfb = [r.ttfb_ms for r in rows if r.node_id == node_id and r.ttfb_ms is not None]
        assert same_bucket(TTFB_BUCKETS_MS, nodes[node_id].ttfb_p50_ms, exact(ttfb, 0.5))
        assert same_bucket(TTFB_BUCKETS_MS, nodes[node_id].ttfb_p95_ms, exact(ttfb, 0.95))


def test_hourly_sums_equal_the_daily_rollup(engine):
    with engine.connect() as conn:
        daily = conn.execute(sa.select(*[sa.func.sum(codex_daily_stats.c[n]) for n in DAILY_COUNTERS])).one()
        hourly = conn.execute(sa.select(*[sa.func.sum(codex_hourly_stats.c[n]) for n in DAILY_COUNTERS])).one()
        n = conn.execute(sa.select(sa.func.sum(codex_hourly_stats.c.duration_n))).scalar()
    assert [float(v) for v in hourly] == [float(v) for v in daily]
    assert int(n) == 600


def test_percentile_interpolates_within_its_bucket():
    assert percentile((10, 20, 30), [0, 0, 0, 0], 0.5) is None
    assert percentile((10, 20, 30), [5, 5, 0, 0], 0.5) == 10
    assert percentile((10, 20, 30), [5, 5, 0, 0], 0.75) == 15  # halfway through the second bucket's calls
    assert percentile((10, 20, 30), [4, 0, 0, 0], 0.5) == 5  # the first bucket starts at 0
    assert percentile((10, 20, 30), [0, 0, 1, 9], 0.99) == 30  # the open bucket reads as the last bound


def test_hourly_percentiles_are_within_ten_percent_on_ordinary_traffic(db_url):
    """Log-normal latencies (a model's TTFB around 0.8 s, its calls around 12 s), as a busy hour has them: the
    TTFB p50 and p95 and the duration p50 read from the hourly rows are within 10% of the raw values' (issue 29:
    104 ms once read 200). The tails in the wider buckets are only within their bucket (docs/observability.md)."""
    rnd = random.Random(29)
    records = [InvocationRecord(
        invoke_id=f"o{i}", occurred_at=T0 + dt.timedelta(seconds=3 * i), source="relay", endpoint="/v1/responses",
        status="success", node_id="alpha", model="gpt-5-codex",
        ttfb_ms=round(rnd.lognormvariate(math.log(800), 0.5)),
        duration_ms=round(rnd.lognormvariate(math.log(12_000), 0.6))) for i in range(1000)]
    with fresh_engine(db_url) as engine, engine.begin() as conn:
        apply_batch(conn, records)
        [hour] = per_hour(conn, Filters())
    ttfb, durations = [r.ttfb_ms for r in records], [r.duration_ms for r in records]
    for read, values, q in ((hour.ttfb_p50_ms, ttfb, 0.5), (hour.ttfb_p95_ms, ttfb, 0.95),
                            (hour.duration_p50_ms, durations, 0.5)):
        assert read == pytest.approx(exact(values, q), rel=0.10), (q, exact(values, q))
    assert same_bucket(DURATION_BUCKETS_MS, hour.duration_p95_ms, exact(durations, 0.95))


def test_stats_hours_and_nodes_cli(engine, db_url, capsys):
    assert stats_main(["hours", "--db", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["hour", "(UTC)", "requests"] and "ttfb p50" in out[0] and len(out) == 4
    assert stats_main(["nodes", "--db", db_url]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "p50 ms" in header and "p95 ms" in header


def hourly_table(engine: sa.Engine) -> list[tuple]:
    t = codex_hourly_stats
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(*t.primary_key.columns)).all()
    return [tuple(round(float(v), 9) if isinstance(v, float) else v for v in r) for r in rows]


def test_migration_fills_the_hourly_rollup_as_the_writer_does(engine):
    """Revision 0010 rebuilds codex_hourly_stats from the rows (the 600 calls, bucket edges included),
    and the writer's later increments land on the rows it filled."""
    edges = [InvocationRecord(invoke_id=f"e{i}", occurred_at=T0 + dt.timedelta(minutes=1), source="relay",
                              endpoint="/v1/responses", status="success", node_id="alpha", model="gpt-5-codex",
                              ttfb_ms=ms, duration_ms=ms, cost=0.5) for i, ms in enumerate((0, 50, 51, 60000, 60001))]
    with engine.begin() as conn:
        apply_batch(conn, edges)
    written = hourly_table(engine)
    downgrade_to(engine, "0007")
    upgrade_to_head(engine)
    assert hourly_table(engine) == written
    later = InvocationRecord(invoke_id="later", occurred_at=T0 + dt.timedelta(minutes=2), source="relay",
                             endpoint="/v1/responses", status="success", node_id="alpha", model="gpt-5-codex",
                             ttfb_ms=70)
    with engine.begin() as conn:
        apply_batch(conn, [later])
    assert len(hourly_table(engine)) == len(written)  # the same row, one more call
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.sum(codex_hourly_stats.c.requests))).scalar() == 606
