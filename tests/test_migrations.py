"""Alembic owns the schema: head equals store.schema, and a legacy database upgrades with its data."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from store.engine import alembic_config, current_revision, downgrade_to, head_revision, make_engine, upgrade_to_head
from store.records import InvocationRecord
from store.schema import DAILY_COUNTERS, metadata
from store.write.batch import apply_batch
from tests.support.databases import at_head


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def to_revision(engine: sa.Engine, revision: str) -> None:
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def legacy_rows(engine: sa.Engine, n: int) -> None:
    """Rows as the legacy relay wrote them, revision 1 columns only: call i at 2026-01-01 plus i seconds.

    Made by the database from two copies of a table of 0 … 999 (INSERT ... SELECT, one statement): 100,000
    rows sent as parameters took 4 s on SQLite and 6 s on MariaDB."""
    assert n <= 1000 ** 2
    thousand = sa.Table("t_thousand", sa.MetaData(), sa.Column("k", sa.Integer), prefixes=["TEMPORARY"])
    low, high = thousand.alias("low"), thousand.alias("high")
    i = high.c.k * 1000 + low.c.k
    if engine.dialect.name == "sqlite":  # the text the legacy relay stored: 'YYYY-MM-DD HH:MM:SS'
        at = sa.func.datetime("2026-01-01 00:00:00", sa.cast(i, sa.String) + " seconds")
    else:
        at = sa.func.timestampadd(sa.text("SECOND"), i, "2026-01-01 00:00:00")
    columns = ["invoke_id", "occurred_at", "model", "input_tokens", "output_tokens", "cache_input_tokens",
               "reasoning_tokens", "total_tokens", "status"]
    rows = sa.select(sa.literal("legacy-") + sa.cast(i, sa.String), at, sa.literal("gpt-5"), i % 1000, sa.literal(7),
                     sa.literal(0), sa.literal(0), i % 1000 + 7, sa.literal("success"))
    every = low.join(high, sa.true())
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO nodes (id, name, base_url, api_key, weight, requests, total_input) "
                             "VALUES ('old', 'Old', 'https://old.example/v1', 'k', 1, 42, 4200)"))
        thousand.create(conn)
        conn.execute(thousand.insert(), [{"k": k} for k in range(1000)])
        conn.execute(sa.table("codex_invocations", *map(sa.column, columns)).insert()
                     .from_select(columns, rows.select_from(every).where(high.c.k <= n // 1000, i < n)))
        thousand.drop(conn)


def summary(engine: sa.Engine) -> tuple:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*), count(distinct invoke_id), sum(input_tokens), "
                                    "sum(total_tokens) FROM codex_invocations")).one()


def test_head_matches_the_schema_module(engine):
    upgrade_to_head(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision() == "0017"
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def schema_and_rows(url: str) -> dict:
    """Every table's columns (with defaults), indexes, unique keys, primary key and rows."""
    engine = make_engine(url)
    try:
        insp = sa.inspect(engine)
        with engine.connect() as conn:
            # A column's type as its DDL: type objects compare by identity.
            return {t: ([{**c, "type": str(c["type"])} for c in insp.get_columns(t)], insp.get_indexes(t),
                        insp.get_unique_constraints(t), insp.get_pk_constraint(t),
                        sorted(map(tuple, conn.execute(sa.text(f"SELECT * FROM {t}"))), key=repr))
                    for t in insp.get_table_names()}
    finally:
        engine.dispose()


def test_the_suites_schema_template_is_what_an_upgrade_makes(db_url, request, tmp_path):
    """conftest.at_head copies a template into a test's database instead of running every migration there
    (seconds of DDL per test on MariaDB): the copy must be exactly what upgrade_to_head makes."""
    upgraded = request.getfixturevalue("mariadb") if "mysql" in db_url else f"sqlite:///{tmp_path / 'up.db'}"
    engine = make_engine(upgraded)
    upgrade_to_head(engine)
    engine.dispose()
    copied = schema_and_rows(at_head(db_url))
    assert copied == schema_and_rows(upgraded)
    assert copied["alembic_version"][-1] == [(head_revision(),)] and copied["node_state"][-1] == [(1, 0)]


def test_upgrade_is_idempotent_and_full_downgrade_works(engine):
    upgrade_to_head(engine)
    upgrade_to_head(engine)
    downgrade_to(engine, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_to_head(engine)
    assert {"nodes", "codex_invocations", "stats_source_snapshots", "stats_source_deltas"} <= set(
        sa.inspect(engine).get_table_names())


def test_seed_indexes_and_unique_keys(engine):
    upgrade_to_head(engine)
    insp = sa.inspect(engine)
    indexes = {i["name"]: i["column_names"] for t in ("codex_invocations", "stats_source_snapshots",
                                                      "stats_source_deltas") for i in insp.get_indexes(t)}
    assert indexes["idx_codex_invocations_source_occurred_at"] == ["source", "occurred_at"]
    assert indexes["idx_stats_source_snapshots_date"] == ["source", "period", "stats_date", "captured_at_epoch"]
    assert indexes["idx_stats_source_deltas_epoch"] == ["source", "period", "captured_at_epoch"]
    uniques = {u["name"]: u["column_names"] for t in ("codex_invocations", "stats_source_snapshots",
                                                      "stats_source_deltas") for u in insp.get_unique_constraints(t)}
    assert uniques["uq_stats_source_snapshots_capture"] == ["source", "period", "stats_date", "model",
                                                            "captured_at_epoch"]
    assert uniques["uq_stats_source_deltas_capture"] == ["source", "period", "stats_date", "captured_at_epoch"]
    assert uniques["uq_codex_invocations_invoke_id_occurred_at"] == ["invoke_id", "occurred_at"]
    source = next(c for c in insp.get_columns("codex_invocations") if c["name"] == "source")
    assert source["nullable"] is False and "xy" in str(source["default"])


def check_legacy_upgrade(engine: sa.Engine, n: int) -> None:
    to_revision(engine, "0001")
    legacy_rows(engine, n)
    before = summary(engine)
    upgrade_to_head(engine)
    assert summary(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT source, count(*) FROM codex_invocations GROUP BY source")).all() == [
            ("xy", n)]
        # The daily rollup is filled from the rows already there.
        rolled = conn.execute(sa.text("SELECT count(*), sum(requests), sum(input_tokens), sum(total_tokens) "
                                      "FROM codex_daily_stats WHERE source = 'xy' AND node_id = ''")).one()
    assert (rolled[1], rolled[2], rolled[3]) == (n, before[2], before[3])
    assert rolled[0] == len({(dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i)).date() for i in range(n)})
    with engine.connect() as conn:
        node = conn.execute(sa.text("SELECT requests, total_input, total_cached, disabled FROM nodes")).one()
    assert tuple(node) == (42, 4200, 0, 0)
    # Down to the legacy schema and up again: still every row, still tagged.
    downgrade_to(engine, "0001")
    assert "source" not in {c["name"] for c in sa.inspect(engine).get_columns("codex_invocations")}
    assert summary(engine) == before
    upgrade_to_head(engine)
    assert summary(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM codex_invocations WHERE source = 'xy'")).scalar() == n


def rollup(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT node_id, model, {', '.join(DAILY_COUNTERS)} FROM codex_daily_stats "
                                    "ORDER BY node_id, model")).all()
    return [tuple(round(float(v), 9) if isinstance(v, float) else v for v in r) for r in rows]


def test_rollup_filled_by_the_migrations_equals_the_writers(engine):
    """Revisions 0004 and 0006 fill codex_daily_stats from the rows already there: the numbers the writer
    keeps, failures (the node's fault, as the relay decided it), aborts and priced calls included."""
    upgrade_to_head(engine)
    # (node, status, http status, the node's fault, cost, error): every way a call has ended.
    calls = [("a", "success", 200, False, 0.5, None), ("a", "success", 200, False, 0.0, None),
             ("a", "success", 200, False, None, None), ("a", "failed", 500, True, None, "HTTP 500"),
             ("a", "failed", 429, True, None, "HTTP 429"), ("a", "failed", 400, False, None, "HTTP 400"),
             ("a", "failed", None, True, None, "connect failed"), ("a", "failed", 200, True, None, "overloaded"),
             ("a", "truncated", 200, True, 0.25, "stream ended"), ("a", "aborted", 200, False, None, "Client gone"),
             (None, "failed", 503, False, None, "no upstream node available"),  # the relay's own 503
             (None, "failed", 502, True, None, "HTTP 502")]  # monitor mode: the upstream's fault
    with engine.begin() as conn:
        apply_batch(conn, [InvocationRecord(
            invoke_id=f"c{i}", occurred_at=dt.datetime(2026, 11, 24, 12, i), source="relay", endpoint="/v1/responses",
            status=status, node_id=node, model="m", http_status=http, node_failure=fault, cost=cost,
            error_message=error) for i, (node, status, http, fault, cost, error) in enumerate(calls)])
    written = rollup(engine)
    counts = [dict(zip(DAILY_COUNTERS, r[2:], strict=True)) for r in written]
    assert [(c["requests"], c["successes"], c["failures"], c["aborted"], c["priced"]) for c in counts] == \
        [(2, 0, 1, 0, 0), (10, 3, 5, 1, 3)]  # no node first ('')
    downgrade_to(engine, "0003")  # no rollup: 0004 and 0006 rebuild it from the rows
    upgrade_to_head(engine)
    assert rollup(engine) == written


def test_revision_1_database_upgrades_with_rows_tagged_xy(engine):
    check_legacy_upgrade(engine, 50)


@pytest.mark.slow
@pytest.mark.fault
def test_revision_1_database_with_100k_invocations(engine):
    check_legacy_upgrade(engine, 100_000)


def test_relays_starting_together_on_one_new_sqlite_file_both_upgrade_it(tmp_path):
    """Two relays started at once on an empty SQLite file: one created the schema, the other failed with
    "table alembic_version already exists" (a read-then-create that SQLite does not serialise)."""
    import threading

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engines = [make_engine(url) for _ in range(4)]
    start, errors = threading.Barrier(len(engines)), []

    def upgrade(engine) -> None:
        start.wait()
        try:
            upgrade_to_head(engine)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=upgrade, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engines[0].connect() as conn:
        assert current_revision(conn) == head_revision()
    for e in engines:
        e.dispose()
