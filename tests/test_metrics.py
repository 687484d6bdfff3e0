"""/metrics: the Prometheus text served by the admin addon, read with prometheus_client's own parser and
checked against the rows the writer stored from the same records (in process, SQLite and MariaDB)."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from mitmproxy.test import taddons
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addon.admin import Admin
from addon.nodes.routing import Node, NodePool
from addon.observe.metrics import Metrics
from addon.observe.modelfold import TOP_N
from addon.relay import Relay
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store.records import InvocationRecord, KeyCount, NodeConfig, NodeStateUpdate, Usage
from store.schema import codex_invocations, nodes
from store.write.writer import WriterStats
from tests.support.admin import TOKEN, alpha_and_beta, ask
from tests.support.databases import at_head
from tests.support.waiting import wait_for


@pytest.fixture
def env(db_url, tmp_path):
    nodes_file = alpha_and_beta(tmp_path)
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    admin = Admin(runtime)
    relay = Relay(runtime)  # counts the calls in flight
    with taddons.context(options, admin, relay) as tctx:
        # The writer's own tests: test_writerproc.
        tctx.configure(options, codex_db=at_head(db_url), codex_spool=str(tmp_path / "spool.db"),
                       codex_nodes=str(nodes_file), codex_ping_interval="0", codex_writer_process=False)
        try:
            yield SimpleNamespace(runtime=runtime, admin=admin, tctx=tctx)
        finally:
            options.done()


def record(i: int, node: str | None, status: str = "success", client: str | None = None) -> InvocationRecord:
    return InvocationRecord(
        invoke_id=f"m{i}", occurred_at=dt.datetime(2026, 11, 20, 12, i), source="relay", endpoint="/v1/responses",
        status=status, node_id=node, model="gpt-5-codex", stream=True, node_failure=status in ("failed", "truncated"),
        usage=Usage(input_tokens=100 * i, cached_tokens=10 * i, output_tokens=7 * i, reasoning_tokens=i),
        ttfb_ms=40 * i, duration_ms=900 * i, client_key=client)


def scrape(admin: Admin, **kw) -> dict[tuple[str, tuple], float]:
    resp = ask(admin, "GET", "/metrics", **kw)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.get_text()) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_agree_with_the_stored_rows(env):
    rt = env.runtime
    items = [record(1, "alpha", client="ci"), record(2, "alpha", "failed", client="ci"),
             NodeStateUpdate("beta", last_error="HTTP 502", failed_attempt=True),
             record(3, "beta", "truncated", client="dev"), record(4, "beta", client="ci"), record(5, None),
             record(6, "alpha", "aborted")]
    for item in items:
        rt.submit(item)
    for _ in range(3):  # beta's breaker opens
        rt.health.failure(rt.pool.get("beta"), "HTTP 502")
    wait_for(lambda: rt.db.writer_stats().written == 6, timeout=20, what="records written")
    m = scrape(env.admin)

    with rt.engine.connect() as conn:
        node_rows = {r.id: r for r in conn.execute(sa.select(nodes))}
        inv = codex_invocations.c
        per_client = dict(conn.execute(sa.select(inv.client_key, sa.func.count())
                                       .where(inv.client_key.is_not(None)).group_by(inv.client_key)).all())
        client_input = dict(conn.execute(sa.select(inv.client_key, sa.func.sum(inv.input_tokens))
                                         .where(inv.client_key.is_not(None)).group_by(inv.client_key)).all())
        client_cached = dict(conn.execute(sa.select(inv.client_key, sa.func.sum(inv.cache_input_tokens))
                                          .where(inv.client_key.is_not(None)).group_by(inv.client_key)).all())
        ttfb = conn.execute(sa.select(inv.node_id, sa.func.count(inv.ttfb_ms), sa.func.sum(inv.ttfb_ms))
                            .where(inv.node_id.is_not(None)).group_by(inv.node_id)).all()
    for node_id, row in node_rows.items():
        assert total(m, "codex_node_requests_total", node=node_id) == row.requests
        assert total(m, "codex_node_failures_total", node=node_id) == row.fail_count
        for kind, column in (("input", "total_input"), ("cached", "total_cached"), ("output", "total_output"),
                             ("reasoning", "total_reasoning")):
            assert total(m, "codex_node_tokens_total", node=node_id, kind=kind) == getattr(row, column), kind
    assert total(m, "codex_node_failures_total", node="beta", kind="retried") == 1
    for node_id, n, ms in ttfb:
        assert total(m, "codex_node_ttfb_seconds_count", node=node_id) == n
        assert total(m, "codex_node_ttfb_seconds_sum", node=node_id) == pytest.approx(float(ms) / 1000)
    # 40 ms falls in the first bucket (50 ms), 80 ms not.
    assert total(m, "codex_node_ttfb_seconds_bucket", node="alpha", le="0.05") == 1
    for client, n in per_client.items():
        assert total(m, "codex_client_requests_total", client=client) == n
        assert total(m, "codex_client_tokens_total", client=client, kind="input") == client_input[client]
        # The cache-hit rate per key (and per node) is the division Prometheus does (docs/observability.md).
        assert total(m, "codex_client_tokens_total", client=client, kind="cached") == client_cached[client]
    assert total(m, "codex_node_requests_total", node="direct") == 1  # the call that went to no node
    assert total(m, "codex_node_breaker_open", node="beta") == 1
    assert total(m, "codex_node_breaker_open", node="alpha") == 0
    assert total(m, "codex_calls_in_flight") == 0
    assert total(m, "codex_writer_queue") == 0 and total(m, "codex_writer_journal") == 0
    assert total(m, "codex_writer_lost_records_total") == 0 and total(m, "codex_writer_db_ok") == 1
    assert total(m, "codex_writer_written_records_total") == 6


def test_hours_api_serves_the_percentiles(env):
    env.runtime.submit(record(1, "alpha"))
    wait_for(lambda: env.runtime.db.writer_stats().written == 1, timeout=20, what="the record written")
    resp = ask(env.admin, "GET", "/admin/api/hours?since=2026-11-20&until=2026-11-20")
    assert resp.status_code == 200
    [hour] = json.loads(resp.get_text())["hours"]
    assert (hour["hour"], hour["requests"], hour["ttfb_p50_ms"]) == ("2026-11-20 12:00", 1, 25)  # 40 ms: 0-50 ms
    assert hour["duration_p99_ms"] == pytest.approx(900, rel=0.10)  # within 10% of the call's 900 ms


def test_metrics_follow_the_admin_access_rules(env):
    remote = ("192.0.2.7", 5555)
    assert ask(env.admin, "GET", "/metrics", peer=remote).status_code == 403
    env.tctx.configure(env.admin, codex_admin_token=TOKEN)
    denied = ask(env.admin, "GET", "/metrics", peer=remote)
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert "codex_node_requests" not in denied.get_text()
    scrape(env.admin, peer=remote, headers={"authorization": f"Bearer {TOKEN}"})
    assert ask(env.admin, "POST", "/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 405


def test_a_stalled_writer_process_is_a_gauge_and_a_counter():
    stats = WriterStats(queued=0, spooled=40, spool_oldest_s=3.0, written=0, duplicates=0, rejected=0, lost=0,
                        batches=0, db_ok=False, last_error="stalled", stalled=True, stalls=2)
    metrics = Metrics(lambda: NodePool([]), lambda: stats)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples}
    assert total(samples, "codex_writer_stalled") == 1 and total(samples, "codex_writer_stalls_total") == 2
    assert total(samples, "codex_writer_db_ok") == 0 and total(samples, "codex_writer_journal") == 40


def test_money_series_by_node_key_model_and_status_class():
    """Cost by node, key and model; calls by model and HTTP status class; refusals by key and reason; the model
    label folded to the nodes' globs, then the first TOP_N other names, then ``other``."""
    pool = NodePool([Node(NodeConfig("alpha", "http://127.0.0.1:9", models=("gpt-5*",))),
                     Node(NodeConfig("beta", "http://127.0.0.1:9", models=("claude-*",)))])
    metrics = Metrics(lambda: pool, lambda: None)

    def call(i: int, node: str | None, model: str | None, client: str | None, cost: float | None,
             http_status: int | None) -> InvocationRecord:
        return InvocationRecord(invoke_id=f"c{i}", occurred_at=dt.datetime(2026, 11, 20, 12), source="relay",
                                endpoint="/v1/responses", status="success" if http_status == 200 else "failed",
                                node_id=node, model=model, client_key=client, cost=cost, http_status=http_status)

    items = [call(1, "alpha", "gpt-5-codex", "ci", 0.25, 200), call(2, "alpha", "gpt-5", "ci", 0.5, 200),
             call(3, "beta", "claude-opus-4", "dev", 1.0, 200), call(4, "beta", "claude-opus-4", "dev", None, 529),
             call(5, None, "o3", "ci", None, 400), call(6, None, None, None, None, None),
             *(call(10 + i, "alpha", f"made-up-{i}", "ci", 0.01, 200) for i in range(TOP_N + 5)),
             KeyCount("ci", dt.date(2026, 11, 20), "refused_rate"), KeyCount("ci", dt.date(2026, 11, 20), "admitted"),
             KeyCount("dev", dt.date(2026, 11, 20), "refused_budget")]
    for item in items:
        metrics.observe(item)
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for family in text_string_to_metric_families(metrics.scrape().decode()) for s in family.samples}
    assert total(m, "codex_client_cost_usd_total", client="ci", model="gpt-5*") == 0.75
    assert total(m, "codex_node_cost_usd_total", node="beta", model="claude-*") == 1.0
    assert total(m, "codex_client_cost_usd_total") == pytest.approx(1.75 + 0.01 * (TOP_N + 5))
    assert total(m, "codex_node_calls_total", node="beta", model="claude-*", code="5xx") == 1
    assert total(m, "codex_node_calls_total", node="direct", model="o3", code="4xx") == 1
    assert total(m, "codex_node_calls_total", model="none", code="none") == 1
    assert total(m, "codex_node_calls_total") == len(items) - 3  # every call once, refusals are no calls
    models = {dict(labels)["model"] for (n, labels) in m if n == "codex_node_calls_total"}
    # o3 and the first TOP_N - 1 made-up names keep theirs: TOP_N names besides the globs, none and other
    assert len(models) == 2 + TOP_N + 2 and "other" in models
    assert total(m, "codex_node_calls_total", model="other") == 6
    assert {dict(labels)["reason"]: v for (n, labels), v in m.items() if n == "codex_client_refusals_total"} == {
        "rate": 1, "budget": 1}
    assert total(m, "codex_client_refusals_total", client="ci") == 1
    # A series appears with its first non-zero value: an unpriced call adds no cost series, a success no failures.
    assert all(v for (n, _), v in m.items() if n.endswith("_total"))
