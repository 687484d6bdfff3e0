"""Retention (``store.prune``, ``./run.sh prune``) on SQLite and MariaDB: old invocation rows go in
bounded batches, the young ones and every rollup and node counter stay exactly as they were."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable

import pytest
import sqlalchemy as sa

from store.cli.prune import main
from store.engine import make_engine
from store.nodes import upsert_nodes
from store.prune import cutoff_for, prune_older_than
from store.records import InvocationRecord, NodeConfig, utcnow
from store.schema import codex_daily_stats, codex_invocations, nodes
from store.write.batch import apply_batch
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


def spread(engine: sa.Engine, n: int, end: dt.datetime, days: int, per_instant: int = 80) -> None:
    """``n`` calls over the ``days`` before ``end``, ``per_instant`` at each of ``n / per_instant`` evenly spaced
    instants (a batch of 5,000 then ends among the rows of one instant, and the next resumes inside it), varied
    enough that every rollup counter and key (day, source, node or none, model or none) gets values; then their
    daily rollup and node counters, added up from the rows.

    All in SQL in one transaction: through the writer's apply_batch the 200,000 rows took 25 s on SQLite and
    55 s on MariaDB. The prune never reads the rollups; whatever they hold must stay as it was."""
    instants = sa.Table("t_instants", sa.MetaData(), sa.Column("i", sa.Integer), sa.Column("at", sa.DateTime),
                        prefixes=["TEMPORARY"])
    reps = sa.Table("t_reps", instants.metadata, sa.Column("j", sa.Integer), prefixes=["TEMPORARY"])
    start, step = end - dt.timedelta(days=days), dt.timedelta(days=days) / (n // per_instant)
    i = instants.c.i * per_instant + reps.c.j  # the call's number, 0 … n - 1

    def every(k: int, yes: object, no: object = None) -> sa.Case:
        """``no`` for every ``k``-th call, ``yes`` for the others."""
        return sa.case((i % k == 0, no), else_=yes)

    ok = i % 25 != 0
    calls = sa.select(
        sa.literal("r") + sa.cast(i, sa.String), instants.c.at, every(10, "relay", "xy"), sa.literal("/v1/responses"),
        sa.case((ok, "success"), else_="failed"), every(50, sa.case(*((i % 4 == k, NODES[k].id) for k in range(4)))),
        sa.case(*((i % 4 == k, MODELS[k]) for k in range(3)), else_=None), sa.true(),
        sa.case((ok, 1000 + i % 997), else_=0), sa.case((ok, i % 500), else_=0), sa.case((ok, 100 + i % 89), else_=0),
        sa.case((ok, i % 40), else_=0), sa.case((ok, 1100 + i % 997 + i % 89), else_=0),
        sa.case((ok, (i % 1000) * 1e-5), else_=None), every(7, 100 + i % 300), sa.case((ok, 2000 + i % 1000)),
        500 + i % 3000,
    ).select_from(instants.join(reps, sa.true())).where(i < n)
    columns = ["invoke_id", "occurred_at", "source", "endpoint", "status", "node_id", "model", "stream", "input_tokens",
               "cache_input_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "cost", "ttfb_ms",
               "stream_ms", "response_bytes"]

    def total(column: sa.ColumnElement) -> sa.ColumnElement:
        return sa.func.coalesce(sa.func.sum(column), 0)

    success = sa.case((_inv.status == "success", 1), else_=0)
    daily_keys = (sa.func.date(_inv.occurred_at), _inv.source, sa.func.coalesce(_inv.node_id, ""),
                  sa.func.coalesce(_inv.model, ""))
    daily = sa.select(
        *daily_keys, sa.func.count(), total(success), total(1 - success), total(_inv.input_tokens),
        total(_inv.cache_input_tokens), total(_inv.output_tokens), total(_inv.reasoning_tokens),
        total(_inv.total_tokens), total(_inv.cost), sa.func.count(_inv.cost), total(_inv.response_bytes),
        total(_inv.ttfb_ms), sa.func.count(_inv.ttfb_ms), total(_inv.stream_ms),
    ).group_by(*daily_keys)
    daily_columns = ["day", "source", "node_id", "model", "requests", "successes", "failures", "input_tokens",
                     "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "cost", "priced", "bytes",
                     "ttfb_sum", "ttfb_n", "stream_ms"]

    counters = {"requests": sa.func.count(), "fail_count": total(1 - success),
                "total_bytes": total(_inv.response_bytes), "total_input": total(_inv.input_tokens),
                "total_cached": total(_inv.cache_input_tokens), "total_output": total(_inv.output_tokens),
                "total_reasoning": total(_inv.reasoning_tokens), "stream_dur_ms": total(_inv.stream_ms),
                "first_byte_ms": total(_inv.ttfb_ms)}
    per_node = sa.select(_inv.node_id, *(v.label(k) for k, v in counters.items())).where(
        _inv.node_id.is_not(None)).group_by(_inv.node_id)

    # One statement inserts them all: on MariaDB longer than the store's read timeout of 4 s.
    patient = make_engine(engine.url.update_query_dict({"read_timeout": "600"}).render_as_string(False)) \
        if engine.dialect.name == "mysql" else engine
    with patient.begin() as conn:
        instants.metadata.create_all(conn)
        conn.execute(instants.insert(), [{"i": k, "at": start + step * k} for k in range(n // per_instant)])
        conn.execute(reps.insert(), [{"j": k} for k in range(per_instant)])
        conn.execute(codex_invocations.insert().from_select(columns, calls))
        conn.execute(codex_daily_stats.insert().from_select(daily_columns, daily))
        node_rows = [{**r._asdict(), "node": r.node_id} for r in conn.execute(per_node)]
        conn.execute(nodes.update().where(nodes.c.id == sa.bindparam("node"))
                     .values({k: sa.bindparam(k) for k in counters}), node_rows)
        instants.metadata.drop_all(conn)
    if patient is not engine:
        patient.dispose()


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
    spread(engine, 200_000, now, days=60)
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
