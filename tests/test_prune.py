"""Retention (``store.prune``, ``./run.sh prune``) on SQLite and MariaDB: old invocation rows go in
bounded batches, the young ones and every rollup and node counter stay exactly as they were."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Iterator

import pytest
import sqlalchemy as sa

from store.invocations import apply_batch
from store.nodes import upsert_nodes
from store.prune import cutoff_for, prune_older_than
from store.prune_cli import main
from store.records import InvocationRecord, NodeConfig, Usage, utcnow
from store.schema import codex_daily_stats, codex_invocations, nodes
from tests.support.databases import fresh_engine

_inv = codex_invocations.c
MODELS = ("gpt-5-codex", "gpt-5", "claude-sonnet-4-5", None)
NODES = tuple(NodeConfig(id=f"node-{k}", base_url=f"https://relay-{k}.example/v1", api_key=f"sk-{k}")
              for k in ("alpha", "beta", "gamma", "delta"))


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            upsert_nodes(conn, NODES)
        yield engine


def write(engine: sa.Engine, items: Iterable[InvocationRecord], chunk: int = 20_000) -> None:
    """Through the writer's own apply_batch, so the daily rollup and node counters are filled too."""
    it = iter(items)
    while batch := list(itertools.islice(it, chunk)):
        with engine.begin() as conn:
            apply_batch(conn, batch)


def spread(n: int, end: dt.datetime, days: int) -> Iterator[InvocationRecord]:
    """``n`` calls evenly over the ``days`` before ``end``, varied enough that every rollup counter
    and key (day, source, node or none, model or none) gets values; cheap to make, unlike bench.data's."""
    start, step = end - dt.timedelta(days=days), dt.timedelta(days=days) / n
    for i in range(n):
        ok = i % 25 != 0
        usage = Usage(input_tokens=1000 + i % 997, cached_tokens=i % 500, output_tokens=100 + i % 89,
                      reasoning_tokens=i % 40) if ok else Usage()
        yield InvocationRecord(
            invoke_id=f"r{i}", occurred_at=start + step * i, source="relay" if i % 10 else "xy",
            endpoint="/v1/responses", status="success" if ok else "failed",
            node_id=NODES[i % 4].id if i % 50 else None, model=MODELS[i % 4], stream=True, usage=usage,
            cost=(i % 1000) * 1e-5 if ok else None, ttfb_ms=100 + i % 300 if i % 7 else None,
            stream_ms=2000 + i % 1000 if ok else None, response_bytes=500 + i % 3000, node_failure=not ok)


def snapshot(engine: sa.Engine) -> tuple[list, list]:
    """Every rollup row and every node counter, in a fixed order."""
    with engine.connect() as conn:
        daily = conn.execute(sa.select(codex_daily_stats).order_by(*codex_daily_stats.primary_key)).all()
        counters = conn.execute(sa.select(nodes.c.id, nodes.c.requests, nodes.c.fail_count, nodes.c.total_bytes,
                                          nodes.c.total_input, nodes.c.total_cached, nodes.c.total_output,
                                          nodes.c.total_reasoning, nodes.c.stream_dur_ms, nodes.c.first_byte_ms)
                                .order_by(nodes.c.id)).all()
    return daily, counters


def ids(engine: sa.Engine, where: sa.ColumnElement[bool]) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(_inv.id).where(where)).scalars())


def test_cutoff_is_a_utc_midnight_whole_days_back():
    now = dt.datetime(2026, 11, 25, 13, 7, 5, 123)
    assert cutoff_for(30, now) == dt.datetime(2026, 10, 26)
    assert cutoff_for(1, dt.datetime(2026, 11, 25)) == dt.datetime(2026, 11, 24)
    with pytest.raises(ValueError):
        cutoff_for(0, now)


@pytest.mark.slow
def test_200k_rows_pruned_in_bounded_batches_rollup_unchanged(engine):
    now = utcnow()
    write(engine, spread(200_000, now, days=60))
    cutoff = cutoff_for(30, now)
    old, young = ids(engine, _inv.occurred_at < cutoff), ids(engine, _inv.occurred_at >= cutoff)
    assert len(old) > 90_000 and len(young) > 90_000
    before = snapshot(engine)
    daily_before, _ = before
    assert sum(r.requests for r in daily_before) == 200_000
    assert min(r.day for r in daily_before) < (cutoff - dt.timedelta(days=29)).date()

    # What each transaction deleted, seen on the wire: DELETE row counts summed until each commit.
    per_transaction: list[int] = []
    pending = [0]

    def on_execute(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            pending[0] += cursor.rowcount

    def on_commit(conn) -> None:
        if pending[0]:
            per_transaction.append(pending[0])
            pending[0] = 0

    seen: list[tuple[int, int]] = []
    sa.event.listen(engine, "after_cursor_execute", on_execute)
    sa.event.listen(engine, "commit", on_commit)
    try:
        result = prune_older_than(engine, 30, batch=5_000, progress=lambda done, total: seen.append((done, total)),
                                  now=now)
    finally:
        sa.event.remove(engine, "after_cursor_execute", on_execute)
        sa.event.remove(engine, "commit", on_commit)

    assert result.deleted == result.estimated == len(old)
    assert ids(engine, _inv.occurred_at < cutoff) == set()
    assert ids(engine, sa.true()) == young
    assert snapshot(engine) == before
    # Bounded: no transaction deleted more than a batch, and progress came after each one.
    assert max(per_transaction) <= 5_000 and sum(per_transaction) == len(old)
    assert len(per_transaction) == result.batches == len(seen) >= len(old) // 5_000
    steps = [b - a for (a, _), (b, _) in itertools.pairwise([(0, 0), *seen])]
    assert steps == per_transaction
    assert seen[-1] == (len(old), len(old))
    # Nothing left to do: a second run deletes nothing.
    assert prune_older_than(engine, 30, now=now).deleted == 0


def call(n: int, at: dt.datetime) -> InvocationRecord:
    return InvocationRecord(invoke_id=f"call-{n}", occurred_at=at, source="relay", endpoint="/v1/responses",
                            status="success", node_id=NODES[0].id, model="gpt-5-codex", ttfb_ms=100, response_bytes=10)


def test_the_cutoff_day_is_kept_whole(engine):
    now = dt.datetime(2026, 11, 25, 9, 30)
    write(engine, [call(1, dt.datetime(2026, 11, 23, 23, 59, 59, 999999)), call(2, dt.datetime(2026, 11, 24)),
                   call(3, dt.datetime(2026, 11, 24, 23, 0)), call(4, now)])
    assert prune_older_than(engine, 1, batch=1, now=now).deleted == 1
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(_inv.invoke_id)).scalars()) == ["call-2", "call-3", "call-4"]


def test_command_dry_run_then_prune(engine, capsys):
    url = engine.url.render_as_string(hide_password=False)
    now = utcnow()
    # Far from the cutoff either side, so a midnight passing during the test changes nothing.
    write(engine, [call(n, now - dt.timedelta(days=days)) for n, days in enumerate((50, 45, 40, 10, 0))])
    before = snapshot(engine)

    assert main(["--keep-days", "30", "--dry-run", "--db", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would delete 3 invocation rows before ") and "(dry run)" in out
    assert len(ids(engine, sa.true())) == 5

    assert main(["--keep-days", "30", "--batch", "2", "--db", url]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("deleted 3 invocation rows before ") and "in 2 batches" in captured.out
    assert "prune: 3 / ~3 rows deleted (100%)" in captured.err.splitlines()
    assert len(ids(engine, sa.true())) == 2
    assert snapshot(engine) == before


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["--keep-days", "0"], 2, "prune: --keep-days must be at least 1, got 0 (see --help)"),
    (["--keep-days", "a week"], 2, "prune: argument --keep-days: invalid int value: 'a week' (see --help)"),
    (["--keep-days", "7", "--batch", "0"], 2, "prune: --batch must be at least 1, got 0 (see --help)"),
    (["--keep-days", "7", "--db", "sqlite:///{tmp}/missing.db"], 1,
     "prune: no database file {tmp}/missing.db (start the relay once, or pass --db / $CODEX_DB)"),
    (["--keep-days", "7", "--db", "mysql+pymysql://root@127.0.0.1:1/x"], 1,
     "prune: cannot open database mysql+pymysql://root@127.0.0.1:1/x: OperationalError: "),
])
def test_command_errors_are_one_line(argv, status, message, tmp_path, capsys):
    def fill(s: str) -> str:
        return s.replace("{tmp}", str(tmp_path))

    try:
        code = main([fill(a) for a in argv])
    except SystemExit as e:  # argparse's way out
        code = e.code
    assert code == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(fill(message))
