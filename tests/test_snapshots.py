"""Snapshot and delta ingestion: idempotency (also of the NULL-model aggregate row, also under
concurrency), delta rules, late captures, and reading the latest capture back."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
import sqlalchemy as sa

from store.schema import stats_source_snapshots
from store.sources import Capture, ModelStats
from store.sources.snapshots import Delta, ingest, latest_capture
from tests.support.databases import fresh_engine
from tests.support.fakestats import delta_rows, snapshot_rows

T0 = dt.datetime(2026, 11, 23, 8, 0, 0)


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as engine:
        yield engine


def capture(at: dt.datetime, *models: ModelStats, source: str = "crs", period: str = "daily",
            stats_date: str = "2026-11-23") -> Capture:
    return Capture(source=source, period=period, stats_date=stats_date, captured_at=at, models=list(models),
                   raw_response='{"raw": true}')


def m(model: str, requests: int, tokens: int, cost: float = 0.0, rated: float | None = None) -> ModelStats:
    return ModelStats(model=model, requests=requests, input_tokens=tokens, all_tokens=tokens, cost_total=cost,
                      cost_rated=rated, raw=f'{{"model": "{model}"}}')


def aggregate_count(engine) -> int:
    s = stats_source_snapshots
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(s.c.model.is_(None))).scalar()


def test_same_capture_twice_writes_once(engine):
    c = capture(T0, m("gpt-5-codex", 2, 100, 0.5), m("gpt-5", 1, 10, 0.25))
    first = ingest(engine, c)
    assert first.stored and first.delta == Delta(3, 3, 0, 110, 0.75)
    again = ingest(engine, c)
    assert (again.stored, again.delta, again.note) == (False, None, "capture already stored")
    assert len(snapshot_rows(engine)) == 3 and len(delta_rows(engine)) == 1


def test_empty_capture_aggregate_does_not_duplicate(engine):
    # Only the NULL-model row: a unique index never sees NULLs collide, the store must.
    for _ in range(3):
        ingest(engine, capture(T0))
    assert aggregate_count(engine) == 1
    assert snapshot_rows(engine) == [("crs", "daily", "2026-11-23", 1795420800, None, 0, 0, 0, 0, 0, 0.0, None)]
    assert delta_rows(engine) == []  # zero from zero: nothing changed


@pytest.mark.parametrize("models", [[], [m("gpt-5-codex", 4, 40, 0.5)]], ids=["empty", "one-model"])
def test_concurrent_ingest_of_one_capture(engine, models):
    """Eight writers (e.g. relays sharing one database) store one capture exactly once."""
    c = capture(T0, *models)
    start = threading.Barrier(8)
    results, errors = [], []

    def run():
        start.wait()
        try:
            results.append(ingest(engine, c))
        except Exception as e:  # any failure is the test's failure
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(r.stored for r in results) == [False] * 7 + [True]
    assert aggregate_count(engine) == 1 and len(snapshot_rows(engine)) == 1 + len(models)
    assert delta_rows(engine) == ([("crs", "daily", "2026-11-23", 1795420800, 4, 4, 0, 40, 0.5, None)] if models
                                  else [])


def test_delta_rules(engine, caplog):
    t = [T0 + dt.timedelta(minutes=10 * i) for i in range(6)]
    assert ingest(engine, capture(t[0], m("a", 1, 10, 0.1))).delta == Delta(1, 1, 0, 10, 0.1)
    # Only tokens moved: a delta with zero requests.
    assert ingest(engine, capture(t[1], m("a", 1, 15, 0.1))).delta == Delta(0, 0, 0, 5, 0.0)
    # Cost float noise alone is no change.
    assert ingest(engine, capture(t[2], m("a", 1, 15, 0.1 + 1e-12))).note == "unchanged"
    assert [d[4:] for d in delta_rows(engine)] == [(1, 1, 0, 10, 0.1, None), (0, 0, 0, 5, 0.0, None)]


def test_a_dip_is_never_counted_twice(engine, caplog):
    """Deltas are taken against the day's maximum so far, floored at 0 (as codex-vibe-monitor does)."""
    t = [T0 + dt.timedelta(minutes=10 * i) for i in range(5)]
    ingest(engine, capture(t[0], m("a", 10, 1000, 1.0, rated=1.5)))
    # The provider's tally dips (a lagging replica, a correction): logged, nothing counted.
    with caplog.at_level(logging.WARNING, logger="codex.snapshots"):
        dip = ingest(engine, capture(t[1], m("a", 8, 800, 0.8, rated=1.2)))
    assert dip.delta is None and dip.note.startswith("below the day's maximum: requests 10 -> 8, tokens 1000 -> 800")
    assert [rec.levelname for rec in caplog.records if rec.name == "codex.snapshots"] == ["WARNING"]
    # It recovers to where it was: still nothing new.
    assert ingest(engine, capture(t[2], m("a", 10, 1000, 1.0, rated=1.5))).delta is None
    # Growth past the maximum counts from the maximum, each counter on its own.
    grew = ingest(engine, capture(t[3], m("a", 12, 990, 1.25, rated=1.875))).delta
    assert grew == Delta(2, 2, 0, 0, 0.25, 0.375)
    assert ingest(engine, capture(t[4], m("a", 12, 1100, 1.25, rated=1.875))).delta == Delta(0, 0, 0, 100, 0.0, 0.0)
    # The day's deltas add up to its highest totals, not more.
    rows = delta_rows(engine)
    assert (sum(d[4] for d in rows), sum(d[7] for d in rows)) == (12, 1100)
    assert (sum(d[8] for d in rows), sum(d[9] for d in rows)) == (pytest.approx(1.25), pytest.approx(1.875))


def test_late_capture_is_stored_without_delta(engine):
    ingest(engine, capture(T0, m("a", 1, 10)))
    ingest(engine, capture(T0 + dt.timedelta(minutes=20), m("a", 5, 50)))
    late = ingest(engine, capture(T0 + dt.timedelta(minutes=10), m("a", 3, 30)))
    assert (late.stored, late.delta, late.note) == (True, None, "older than a capture already stored")
    # The deltas of the date still add up to its latest totals.
    assert sum(d[4] for d in delta_rows(engine)) == 5 and sum(d[7] for d in delta_rows(engine)) == 50
    assert aggregate_count(engine) == 3


def test_dates_periods_and_sources_are_separate(engine):
    ingest(engine, capture(T0, m("a", 5, 50)))
    # A new day, a monthly tally and another source each start from zero.
    next_day = capture(T0 + dt.timedelta(days=1), m("a", 1, 10), stats_date="2026-11-24")
    assert ingest(engine, next_day).delta.total_count == 1
    assert ingest(engine, capture(T0, m("a", 9, 90), period="monthly", stats_date="2026-11")).delta.total_count == 9
    assert ingest(engine, capture(T0, m("a", 2, 20), source="other")).delta.total_count == 2
    assert len(delta_rows(engine)) == 4


def test_latest_capture(engine):
    with engine.connect() as conn:
        assert latest_capture(conn, "crs", "daily", "2026-11-23") is None
    ingest(engine, capture(T0, m("a", 1, 10, 0.5)))
    later = T0 + dt.timedelta(hours=1)
    ingest(engine, capture(later, m("a", 2, 20, 0.75), m("b", 1, 5, 0.25)))
    with engine.connect() as conn:
        got = latest_capture(conn, "crs", "daily", "2026-11-23")
    assert got.captured_at == later and got.captured_at_epoch == 1795424400
    assert sorted(got.rows, key=str) == [None, "a", "b"]
    total = got.rows[None]
    assert (total.requests, total.all_tokens, total.cost_total, total.cost_rated) == (3, 25, 1.0, None)
    assert (got.rows["b"].requests, got.rows["b"].input_tokens) == (1, 5)


def test_rated_cost_is_stored_and_read_back(engine):
    ingest(engine, capture(T0, m("a", 1, 10, 0.5, rated=0.75), m("b", 1, 10, 0.25, rated=0.0)))
    with engine.connect() as conn:
        got = latest_capture(conn, "crs", "daily", "2026-11-23")
    assert {k: v.cost_rated for k, v in got.rows.items()} == {None: 0.75, "a": 0.75, "b": 0.0}
    assert delta_rows(engine)[0][8:] == (0.75, 0.75)


def test_raw_responses_are_kept(engine):
    ingest(engine, capture(T0, m("a", 1, 10)))
    s = stats_source_snapshots
    with engine.connect() as conn:
        raws = dict(conn.execute(sa.select(s.c.model, s.c.raw_response)).all())
    assert raws == {None: '{"raw": true}', "a": '{"model": "a"}'}
