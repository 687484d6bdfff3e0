"""Stats queries at scale: ``store.stats`` aggregates over a million invocations, with their plans.

The data goes in through the writer's own ``apply_batch`` (the invocation rows by executemany, the
daily rollup and the node counters), so every table the stats read is filled as in production. The
queries are the product's own (``store.stats.per_node`` …), never SQL written here; the statements
they send are captured to show how the database runs them (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
MySQL).
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from bench.data import NODES, records
from store import stats
from store.nodes import upsert_nodes
from store.records import utcnow
from store.schema import codex_daily_stats, codex_invocations
from store.write.batch import apply_batch

QUERIES: dict[str, Callable[[sa.Connection, stats.Filters], list]] = {
    "per_node": stats.per_node, "per_day": stats.per_day, "per_model": stats.per_model,
    "per_source": stats.per_source,
}
SPAN_DAYS = 90
CHUNK = 10_000
# A query that already took this long (warm-up included) is timed once more, not ``repeat`` times:
# whole-range MariaDB queries take many seconds at a million rows.
BUDGET_S = 3.0


def generate(engines: dict[str, sa.Engine], n: int, *, end: dt.datetime,
             log: Callable[[str], None] = print) -> dict[str, float]:
    """Write ``n`` invocations over the ``SPAN_DAYS`` days before ``end`` into every engine, one
    ``apply_batch`` transaction per chunk; returns seconds spent writing, per engine."""
    spent = dict.fromkeys(engines, 0.0)
    for engine in engines.values():
        with engine.begin() as conn:
            upsert_nodes(conn, NODES)
    source = records(n, start=end - dt.timedelta(days=SPAN_DAYS), span=dt.timedelta(days=SPAN_DAYS))
    done, next_report, t0 = 0, 0.1, time.perf_counter()
    while chunk := list(itertools.islice(source, CHUNK)):
        for name, engine in engines.items():
            t = time.perf_counter()
            with engine.begin() as conn:
                apply_batch(conn, chunk)
            spent[name] += time.perf_counter() - t
        done += len(chunk)
        if done >= next_report * n or done == n:
            per = ", ".join(f"{k} {done / v:,.0f}/s" for k, v in spent.items() if v)
            log(f"  generated {done:,}/{n:,} ({done / n:.0%}, {time.perf_counter() - t0:.0f} s; write {per})")
            next_report += 0.1
    for engine in engines.values():  # fresh statistics, as a long-running database would have
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("ANALYZE")
            else:
                conn.exec_driver_sql("ANALYZE TABLE codex_invocations, codex_daily_stats")
    return {k: round(v, 2) for k, v in spent.items()}


@contextmanager
def captured(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    """The (statement, parameters) pairs sent to the driver inside the block (parameters as the driver got
    them: a sequence or a mapping, which ``explain`` passes back to it)."""
    seen: list[tuple[str, Any]] = []

    def hook(conn, cursor, statement, parameters, context, executemany) -> None:  # before_cursor_execute signature
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", hook)


def explain(conn: sa.Connection, statement: str, parameters: Any) -> list[str]:
    """How the database runs ``statement``: one line per plan step."""
    if conn.dialect.name == "sqlite":
        return [r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
    steps = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).mappings()
    return [f"{r['table']}: type={r['type']} key={r['key']} rows={r['rows']} {r['Extra'] or ''}".rstrip()
            for r in steps]


def windows(end: dt.datetime) -> dict[str, stats.Filters]:
    today = end.date()
    return {"all": stats.Filters(), "7 days": stats.Filters(since=today - dt.timedelta(days=6), until=today)}


def time_queries(engine: sa.Engine, *, end: dt.datetime, repeat: int) -> list[dict]:
    """Each query in each window: one warm-up run (its statements are explained), then up to ``repeat``
    timed runs (at least one; no more once ``BUDGET_S`` is spent)."""
    out = []
    with engine.connect() as conn:
        for window, f in windows(end).items():
            for name, query in QUERIES.items():
                started = time.perf_counter()
                with captured(engine) as seen:
                    rows = query(conn, f)
                plans = [explain(conn, s, p) for s, p in seen if s.lstrip().upper().startswith("SELECT")]
                times: list[float] = []
                while len(times) < repeat and (not times or time.perf_counter() - started < BUDGET_S):
                    t = time.perf_counter()
                    query(conn, f)
                    times.append((time.perf_counter() - t) * 1000)
                out.append({"query": name, "window": window, "rows": len(rows), "runs": len(times),
                            "median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
                            "plan": [line for plan in plans for line in plan]})
                conn.rollback()  # MySQL REPEATABLE READ snapshots must not span the runs
    return out


def bench_queries(engines: dict[str, sa.Engine], *, n: int, repeat: int,
                  log: Callable[[str], None] = print) -> dict:
    """Fill every engine (a fresh schema each) with ``n`` invocations, then time the stats queries on each."""
    end = utcnow()
    load_s = generate(engines, n, end=end, log=log)
    out: dict = {"invocations": n, "span_days": SPAN_DAYS, "load_seconds": load_s, "rollup_rows": {},
                 "results": {}}
    for name, engine in engines.items():
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)).scalar_one()
            rollup = conn.execute(sa.select(sa.func.count()).select_from(codex_daily_stats)).scalar_one()
        if stored != n:
            raise RuntimeError(f"{name}: {stored} invocations stored, {n} written")
        out["rollup_rows"][name] = rollup
        out["results"][name] = time_queries(engine, end=end, repeat=repeat)
    return out
