"""The hourly rollup: its sums match the daily rollup's, and the percentiles read from its fixed buckets
agree with the raw rows' within one bucket and within 10% (SQLite and MariaDB); revision 19 moves the
hours kept in the old buckets to the new ones."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from store.cli.stats import main as stats_main
from store.engine import downgrade_to, make_engine, upgrade_to_head
from store.histogram import (
    DURATION_BUCKETS_MS,
    DURATION_METRIC_BUCKETS_MS,
    TTFB_BUCKETS_MS,
    TTFB_METRIC_BUCKETS_MS,
    bucket_index,
    percentile,
)
from store.records import InvocationRecord, Usage
from store.schema import (
    DAILY_COUNTERS,
    DURATION_COLUMNS,
    TTFB_COLUMNS,
    codex_daily_stats,
    codex_hourly_stats,
    codex_invocations,
)
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
    bounds = (100, 115, 132)
    assert percentile(bounds, [0, 0, 0, 0], 0.5) is None
    assert percentile(bounds, [4, 0, 0, 0], 0.5) == 50  # the first bucket starts at 0
    assert percentile(bounds, [5, 5, 0, 0], 0.5) == 100
    assert percentile(bounds, [5, 5, 0, 0], 0.75) == 108  # halfway through the second bucket's calls
    assert percentile(bounds, [5, 5, 0, 0], 0.55) == 105  # 101.5, kept within 10% of 115
    assert percentile(bounds, [5, 5, 0, 0], 1.0) == 110  # 115, kept within 10% of 100 (the next value 101)
    assert percentile(bounds, [0, 0, 1, 9], 0.99) == 132  # the open bucket reads as the last bound


@pytest.mark.parametrize("bounds", [TTFB_BUCKETS_MS, DURATION_BUCKETS_MS], ids=["ttfb", "duration"])
def test_a_reading_is_within_ten_percent_of_any_value_of_its_bucket(bounds):
    """The bound behind every figure: whichever of a bucket's values the exact percentile is (its lowest or
    highest), and wherever in the bucket's calls its rank falls, the reading is within 10% of it."""
    assert all(b * 20 <= a * 23 for a, b in zip(bounds, bounds[1:], strict=False))  # at most 15% wider
    for i in range(1, len(bounds)):
        counts = [0] * (len(bounds) + 1)
        counts[i - 1], counts[i] = 10, 10  # the exact p50 ... p100 are values of bucket i
        for q in (0.51, 0.55, 0.75, 0.95, 1.0):
            read = percentile(bounds, counts, q)
            for exact_ms in (bounds[i - 1] + 1, bounds[i]):
                assert abs(read - exact_ms) < 0.10 * exact_ms, (bounds[i], q, exact_ms)


def scenario(rnd: random.Random, n: int, ttfb: Callable[[], float], duration: Callable[[], float],
             hour: int, node: str) -> list[InvocationRecord]:
    """``n`` calls spread over one hour, on one node."""
    start = T0 + dt.timedelta(hours=hour)
    return [InvocationRecord(
        invoke_id=f"{node}-{hour}-{i}", occurred_at=start + dt.timedelta(seconds=3600 * i // n), source="relay",
        endpoint="/v1/responses", status="success", node_id=node, model="gpt-5-codex",
        ttfb_ms=round(ttfb()), duration_ms=round(duration())) for i in range(n)]


def test_hourly_percentiles_are_within_ten_percent_on_ordinary_traffic(db_url):
    """Issue 29 (104 ms read as 200 ms; p99 and call durations up to ~30% off): on several kinds of traffic,
    each hour's TTFB and duration p50, p95 and p99 and each node's TTFB p50 and p95, read from the rows the
    writer keeps, are within 10% of the exact percentiles of the calls (nearest rank)."""
    rnd = random.Random(29)

    def lognormal(median_ms: float, sigma: float) -> Callable[[], float]:
        return lambda: rnd.lognormvariate(math.log(median_ms), sigma)

    def bimodal(chat: Callable[[], float], reasoning: Callable[[], float]) -> Callable[[], float]:
        return lambda: chat() if rnd.random() < 0.7 else reasoning()

    kinds = {  # hour: (node, TTFB, duration)
        0: ("fast", lognormal(300, 0.5), lognormal(4_000, 0.7)),
        1: ("codex", lognormal(800, 0.7), lognormal(12_000, 0.6)),
        2: ("slow", lognormal(3_000, 0.6), lambda: math.exp(rnd.uniform(math.log(1_000), math.log(600_000)))),
        3: ("mixed", bimodal(lognormal(400, 0.4), lognormal(2_500, 0.5)),
            bimodal(lognormal(2_000, 0.4), lognormal(90_000, 0.5))),
        4: ("agent", lognormal(1_200, 0.8), lognormal(60_000, 1.0)),  # p99 about 10 min
    }
    records = [r for hour, (node, ttfb, duration) in kinds.items()
               for r in scenario(rnd, 1000, ttfb, duration, hour, node)]
    with fresh_engine(db_url) as engine, engine.begin() as conn:
        for start in range(0, len(records), 500):  # as the writer's batches
            apply_batch(conn, records[start:start + 500])
        hours = per_hour(conn, Filters())
        nodes = {s.node_id: s for s in per_node(conn, Filters())}
    for h, (hour, (node, _, _)) in zip(hours, kinds.items(), strict=True):
        mine = records[hour * 1000:(hour + 1) * 1000]
        ttfb, durations = [r.ttfb_ms for r in mine], [r.duration_ms for r in mine]
        for read, values, q in ((h.ttfb_p50_ms, ttfb, 0.5), (h.ttfb_p95_ms, ttfb, 0.95), (h.ttfb_p99_ms, ttfb, 0.99),
                                (h.duration_p50_ms, durations, 0.5), (h.duration_p95_ms, durations, 0.95),
                                (h.duration_p99_ms, durations, 0.99),
                                (nodes[node].ttfb_p50_ms, ttfb, 0.5), (nodes[node].ttfb_p95_ms, ttfb, 0.95)):
            assert read == pytest.approx(exact(values, q), rel=0.10), (node, q, exact(values, q))


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


def test_revision_19_moves_the_old_buckets_to_the_new(db_url):
    """Downgraded to revision 16, an hour's counts are its calls' in the old buckets; upgraded again, an hour
    whose calls are all still stored gets exactly what the writer files, and an hour whose calls were partly
    pruned keeps its sums and its calls, spread over the new buckets: its percentiles read within the old
    bucket of the exact ones, as before (give or take the new bucket across its bound)."""
    rnd = random.Random(19)
    records = [r for hour in range(3) for r in scenario(
        rnd, 300, lambda: rnd.lognormvariate(math.log(900), 0.8), lambda: rnd.lognormvariate(math.log(40_000), 1.2),
        hour, "alpha")]
    records += [InvocationRecord(invoke_id=f"edge{i}", occurred_at=T0 + dt.timedelta(hours=2, minutes=59),
                                 source="relay", endpoint="/v1/responses", status="success", node_id="alpha",
                                 model="gpt-5-codex", ttfb_ms=ms, duration_ms=ms * 12)
                for i, ms in enumerate((0, 50, 51, 60_000, 60_001, 70_000))]
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            apply_batch(conn, records)
        written = hourly_table(engine)
        downgrade_to(engine, "0016")
        old = sa.Table("codex_hourly_stats", sa.MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(old).order_by(old.c.hour)).all()
        for row, hour in zip(rows, range(3), strict=True):
            mine = [r for r in records if r.occurred_at.hour == T0.hour + hour]
            for prefix, bounds, value in (("ttfb", TTFB_METRIC_BUCKETS_MS, "ttfb_ms"),
                                          ("dur", DURATION_METRIC_BUCKETS_MS, "duration_ms")):
                counts = [0] * (len(bounds) + 1)
                for r in mine:
                    counts[bucket_index(bounds, getattr(r, value))] += 1
                names = [*(f"{prefix}_le_{b}" for b in bounds), f"{prefix}_le_inf"]
                assert [row._mapping[n] for n in names] == counts, (hour, prefix)
        pruned = T0 + dt.timedelta(hours=2, minutes=30)  # half of the last hour's calls are pruned
        with engine.begin() as conn:
            conn.execute(codex_invocations.delete().where(codex_invocations.c.occurred_at < pruned,
                                                          codex_invocations.c.occurred_at >= pruned.replace(minute=0)))
        upgrade_to_head(engine)
        moved = hourly_table(engine)
        with engine.connect() as conn:
            [*_, last] = per_hour(conn, Filters())
    assert moved[:2] == written[:2]  # every call still stored: as the writer files them
    names = [c.name for c in codex_hourly_stats.columns]
    sums, ttfb, dur = (slice(0, names.index(TTFB_COLUMNS[0])),
                       slice(names.index(TTFB_COLUMNS[0]), names.index(DURATION_COLUMNS[0])),
                       slice(names.index(DURATION_COLUMNS[0]), None))
    assert moved[2][sums] == written[2][sums]
    assert sum(moved[2][ttfb]) == sum(written[2][ttfb]) == 306 and sum(moved[2][dur]) == 306
    assert moved[2] != written[2]  # spread, not recounted
    mine = [r for r in records if r.occurred_at.hour == T0.hour + 2]
    for prefix, bounds, raw in (("ttfb", TTFB_METRIC_BUCKETS_MS, [r.ttfb_ms for r in mine]),
                                ("duration", DURATION_METRIC_BUCKETS_MS, [r.duration_ms for r in mine])):
        for q in (0.5, 0.95, 0.99):
            i = bucket_index(bounds, exact(raw, q))
            lower, upper = (bounds[i - 1] if i else 0), (bounds[i] if i < len(bounds) else bounds[-1])
            assert lower / 1.15 <= getattr(last, f"{prefix}_p{round(q * 100)}_ms") <= upper * 1.15, (prefix, q)


def test_revision_19_refuses_to_drop_a_column_it_does_not_know(sqlite_url):
    """The rebuild copies the columns it names: a column another revision added to the hourly rollup stops the
    upgrade, named, rather than vanish with its counts."""
    engine = make_engine(sqlite_url)
    upgrade_to_head(engine)
    downgrade_to(engine, "0016")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE codex_hourly_stats ADD COLUMN ws_cpu_ms BIGINT NOT NULL DEFAULT 0"))
    with pytest.raises(RuntimeError, match="ws_cpu_ms"):
        upgrade_to_head(engine)
    engine.dispose()
