"""The store on SQLite and MariaDB: non-destructive node upsert, atomic increments, exactly-once batches."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from store.engine import make_engine, upgrade_to_head
from store.nodes import config_of, load_nodes, set_disabled, upsert_nodes
from store.records import NodeConfig, NodeStateUpdate, Usage
from store.schema import codex_invocations, nodes
from store.write.batch import apply_batch
from tests.support.databases import fresh_engine, modes, record


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as eng:
        yield eng


def node_row(engine, node_id: str = "a") -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(sa.select(nodes).where(nodes.c.id == node_id)).one()


def write(engine, items) -> None:
    with engine.begin() as conn:
        apply_batch(conn, items)


def test_upsert_twice_keeps_stats_and_updates_config(engine):
    """The seed's verification: a restart's config upsert must not reset the node's stats."""
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://one.example/v1", "k1", "One", 2)])
    write(engine, [record(usage=Usage(100, 40, 0, 10, 3), response_bytes=500, ttfb_ms=30, stream_ms=70),
                   record(status="failed", node_failure=True, error="upstream 500")])
    with engine.begin() as conn:
        conn.execute(sa.update(nodes).where(nodes.c.id == "a").values(failed=True))
        upsert_nodes(conn, [NodeConfig("a", "https://two.example/v1", "k2", "Two", 5)])
        upsert_nodes(conn, [NodeConfig("a", "https://two.example/v1", "k2", "Two", 5)])
    row = node_row(engine)
    assert (row.base_url, row.api_key, row.name, row.weight) == ("https://two.example/v1", "k2", "Two", 5)
    assert (row.requests, row.fail_count, row.fail_streak) == (2, 1, 1)
    assert (row.total_input, row.total_cached, row.total_output, row.total_reasoning) == (100, 40, 10, 3)
    assert (row.total_bytes, row.first_byte_ms, row.stream_dur_ms) == (500, 30, 70)
    assert row.failed and row.last_error == "upstream 500"
    assert row.created_at is not None


def test_fail_streak_follows_the_order_of_records(engine):
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a.example/v1")])
    fail = dict(status="failed", node_failure=True, error="boom")
    write(engine, [record(**fail), record(**fail)])
    assert node_row(engine).fail_streak == 2
    write(engine, [record(**fail), record(), record(**fail)])  # a success in between resets the streak
    row = node_row(engine)
    assert (row.requests, row.fail_count, row.fail_streak) == (5, 4, 1)
    # A client abort is not the node's fault: no streak change, still a request.
    write(engine, [record(status="aborted")])
    assert (node_row(engine).requests, node_row(engine).fail_streak) == (6, 1)
    write(engine, [record()])
    assert node_row(engine).fail_streak == 0


def test_node_state_updates(engine):
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a.example/v1")])
    write(engine, [NodeStateUpdate("a", failed_attempt=True, last_error="connect refused"),
                   NodeStateUpdate("a", failed=True, last_error="3 failures in a row"),
                   NodeStateUpdate("a", pinged=True, last_ping_ms=None, last_ping_err="refused")])
    row = node_row(engine)
    assert (row.requests, row.fail_count, row.fail_streak, row.failed) == (1, 1, 1, True)
    assert (row.last_error, row.last_ping_err) == ("3 failures in a row", "refused")
    write(engine, [NodeStateUpdate("a", failed=False, pinged=True, last_ping_ms=12, last_ping_err=None)])
    row = node_row(engine)
    assert (row.failed, row.fail_streak, row.last_ping_ms, row.last_ping_err) == (False, 0, 12, None)
    assert row.requests == 1  # a ping is not a request


def test_invocation_rows_and_exactly_once(engine):
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a.example/v1")])
    r = record(usage=Usage(1000, 200, 50, 300, 120), model="gpt-5-codex", stream=True, http_status=200,
               ttfb_ms=41, stream_ms=900, duration_ms=950, request_bytes=321, response_bytes=4567, attempts=2,
               client_key="alice", cost=0.0123)
    write(engine, [r])
    write(engine, [r, r])  # a replayed journal: already stored, nothing counted twice
    with engine.connect() as conn:
        rows = conn.execute(sa.select(codex_invocations)).all()
    assert len(rows) == 1
    row = rows[0]
    assert row.occurred_at == r.occurred_at  # microseconds kept on both dialects
    assert (row.source, row.model, row.node_id, row.status, row.http_status) == (
        "relay", "gpt-5-codex", "a", "success", 200)
    assert (row.input_tokens, row.cache_input_tokens, row.cache_write_tokens, row.output_tokens,
            row.reasoning_tokens, row.total_tokens) == (1000, 200, 50, 300, 120, 1300)
    assert (row.ttfb_ms, row.stream_ms, row.duration_ms, row.request_bytes, row.response_bytes) == (
        41, 900, 950, 321, 4567)
    assert (row.attempts, row.client_key, row.stream, row.cost_estimated) == (2, "alice", True, True)
    assert row.cost == pytest.approx(0.0123)
    assert node_row(engine).requests == 1


def test_monitor_mode_rows_have_no_node(engine):
    write(engine, [record(node_id=None, usage=Usage(5, 0, 0, 1, 0))])
    with engine.connect() as conn:
        assert conn.execute(sa.select(codex_invocations.c.node_id, codex_invocations.c.total_tokens)).one() == (
            None, 6)


def test_increments_from_8_threads_are_exact(engine):
    """No read-modify-write: concurrent writers (threads here, relays in production) never lose a count."""
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a.example/v1"), NodeConfig("b", "https://b.example/v1")])
    threads, batches, per_batch = 8, 10, 20
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(batches):
                items = [record("a" if i % 2 else "b", usage=Usage(t + 1, 1, 0, 2, 0), response_bytes=10)
                         for i in range(per_batch)]
                for attempt in range(20):  # deadlock/lock-timeout victims retry, as the writer does
                    try:
                        write(engine, items)
                        break
                    except sa.exc.OperationalError:
                        if attempt == 19:
                            raise
        except BaseException as e:  # surfaced below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    total = threads * batches * per_batch
    a, b = node_row(engine, "a"), node_row(engine, "b")
    assert a.requests + b.requests == total
    assert a.requests == b.requests == total // 2
    expected_input = sum((t + 1) * batches * per_batch for t in range(threads))
    assert a.total_input + b.total_input == expected_input
    assert a.total_bytes + b.total_bytes == total * 10
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)).scalar() == total


def test_disable_and_load(engine):
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("b", "https://b.example/v1", weight=0), NodeConfig("a", "https://a/v1")])
        assert set_disabled(conn, "a", True)
        assert not set_disabled(conn, "nope", True)
        upsert_nodes(conn, [NodeConfig("a", "https://a2/v1")])  # a config upsert keeps the admin's choice
        rows = load_nodes(conn)
    assert [(r.id, r.disabled, r.weight) for r in rows] == [("a", True, 1), ("b", False, 0)]


def test_make_engine_rejects_bad_urls(tmp_path):
    with pytest.raises(ValueError, match="unsupported database"):
        make_engine("postgresql://x@127.0.0.1/db")
    with pytest.raises(ValueError, match="not a database URL"):
        make_engine("::nonsense::")
    eng = make_engine(f"sqlite:///{tmp_path}/deep/er/codex.db")  # the folder is created
    upgrade_to_head(eng)
    assert (tmp_path / "deep/er/codex.db").exists()
    eng.dispose()


def test_the_sqlite_database_and_its_wal_files_are_private_to_their_owner(tmp_path, umask_022):
    eng = make_engine(f"sqlite:///{tmp_path}/codex.db")  # it holds the nodes' API keys
    upgrade_to_head(eng)
    with eng.begin() as conn:
        upsert_nodes(conn, [NodeConfig(id="a", base_url="http://a/v1", api_key="sk-secret-0123456789")])
        found = modes(tmp_path, "codex.db")
    eng.dispose()
    assert {"codex.db", "codex.db-wal", "codex.db-shm"} <= found.keys() and set(found.values()) == {0o600}, found


def test_daily_rollup_equals_the_rows_it_adds_up(engine):
    """The stats views read codex_daily_stats: it must agree with codex_invocations, group by group."""
    day2 = dt.datetime(2026, 11, 25, 23, 59, 59)
    items = [record(usage=Usage(10, 4, 0, 3, 1), model="m1", stream=True, stream_ms=30, ttfb_ms=5,
                    response_bytes=100, cost=0.5),
             record(usage=Usage(20, 0, 0, 0, 0), model="m1", status="failed", node_failure=True, ttfb_ms=7),
             record("b", usage=Usage(1, 0, 0, 1, 0), model=None),
             record(None, model="m2", status="aborted")]
    items[2].occurred_at = day2
    write(engine, items[:2])
    write(engine, items[2:] + items[:1])  # the repeated record adds nothing
    inv = codex_invocations.c
    with engine.connect() as conn:
        raw = conn.execute(sa.select(sa.func.coalesce(inv.node_id, ""), sa.func.coalesce(inv.model, ""),
                                     sa.func.count(), sa.func.sum(inv.input_tokens), sa.func.sum(inv.output_tokens),
                                     sa.func.count(inv.ttfb_ms))
                           .group_by(inv.node_id, inv.model)).all()
        daily = conn.execute(sa.text("SELECT node_id, model, sum(requests), sum(input_tokens), "
                                     "sum(output_tokens), sum(ttfb_n) FROM codex_daily_stats "
                                     "GROUP BY node_id, model")).all()
        days = conn.execute(sa.text("SELECT day, requests, successes, ttfb_sum, stream_ms, stream_tokens, cost, "
                                    "failures, aborted, priced "
                                    "FROM codex_daily_stats WHERE node_id = 'a' AND model = 'm1'")).one()
        aborted = conn.execute(sa.text("SELECT requests, failures, aborted, priced, cost FROM codex_daily_stats "
                                       "WHERE node_id = '' AND model = 'm2'")).one()
    assert sorted(tuple(int(v) for v in r[2:]) + tuple(r[:2]) for r in raw) == sorted(
        tuple(int(v) for v in r[2:]) + tuple(r[:2]) for r in daily)
    assert str(days.day) == "2026-11-24"
    assert (days.requests, days.successes, days.ttfb_sum, days.stream_ms, days.stream_tokens) == (2, 1, 12, 30, 3)
    assert days.cost == pytest.approx(0.5)
    assert (days.failures, days.aborted, days.priced) == (1, 0, 1)  # the failure was the node's; one call priced
    assert tuple(aborted) == (1, 0, 1, 0, 0)


def test_stored_size_is_bounded_and_trimmed_rows_are_flagged(engine):
    """A poisoned answer cannot make a row too large for the database; the row says what was cut."""
    big = record(raw_response="r" * 300_000, error="e" * 5000, flags=["usage_clamped", "no_usage", "usage_clamped"])
    plain = record(raw_response='{"input_tokens": 1}', error="upstream 500")
    write(engine, [big, plain])
    c = codex_invocations.c
    with engine.connect() as conn:
        got = {r.invoke_id: r for r in conn.execute(sa.select(c.invoke_id, c.raw_response, c.error_message,
                                                                c.flags))}
    row = got[big.invoke_id]
    assert (len(row.raw_response), len(row.error_message)) == (64 * 1024, 2000)
    assert row.raw_response == "r" * 64 * 1024
    assert row.flags == "error_trimmed,no_usage,raw_trimmed,usage_clamped"
    row = got[plain.invoke_id]
    assert (row.raw_response, row.error_message, row.flags) == ('{"input_tokens": 1}', "upstream 500", None)
    assert big.flags == ["usage_clamped", "no_usage", "usage_clamped"]  # the record itself is left alone


def test_usage_probe_is_node_config_and_the_cost_split_keeps_cache_writes(engine):
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a/v1", usage_probe=False), NodeConfig("b", "https://b/v1")])
    write(engine, [record(usage=Usage(100, 20, 30, 10), response_bytes=7)])
    with engine.begin() as conn:
        assert [config_of(r).usage_probe for r in load_nodes(conn)] == [False, True]
        upsert_nodes(conn, [NodeConfig("a", "https://a/v1")])  # the file turned it back on: stats stay
        assert [config_of(r).usage_probe for r in load_nodes(conn)] == [True, True]
    assert node_row(engine).requests == 1
    priced = record(cost=0.5, cost_input=0.3, cost_cached=0.05, cost_output=0.15, cost_cache_write=0.2)
    write(engine, [priced, record()])
    with engine.connect() as conn:
        got = conn.execute(sa.select(codex_invocations.c.cost_input, codex_invocations.c.cost_cache_write)
                           .where(codex_invocations.c.response_bytes == 0)
                           .order_by(codex_invocations.c.cost_input.is_(None))).all()
    assert [tuple(r) for r in got] == [(pytest.approx(0.3), pytest.approx(0.2)), (None, None)]


def test_a_mysql_url_without_its_driver_names_the_one_to_use():
    with pytest.raises(ValueError, match=r"driver of mysql:// is not installed: use mysql\+pymysql://root:\*\*\*@h/db"):
        make_engine("mysql://root:secret@h/db")
