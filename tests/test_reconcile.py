"""Reconciliation: relay rows (written by the store's own insert path) against provider snapshots."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from store.cli.reconcile import main
from store.prices import load_prices
from store.records import InvocationRecord, Usage
from store.sources import SourceConfig, source_from_mapping
from store.sources.poll import Poller
from store.sources.reconcile import ALL_MODELS, NO_MODEL, ReconRow, Totals, compare, reconcile
from store.sources.snapshots import ingest
from store.write.batch import apply_batch
from tests.support.databases import fresh_engine
from tests.support.fakestats import FakeStats, crs_item, crs_response

# The provider keeps UTC+8 days: its 2026-11-23 is 2026-11-22 16:00 to 2026-11-23 16:00 UTC.
SOURCE = SourceConfig(name="crs", url="http://127.0.0.1:9/stats", nodes=("alpha", "beta"),
                      utc_offset=dt.timedelta(hours=8))
DAY = dt.date(2026, 11, 23)
CAPTURED = dt.datetime(2026, 11, 23, 15, 0, 0)  # UTC: 23:00 provider time
CODEX, MINI = "gpt-5-codex", "gpt-5-mini"
PRICES = load_prices()  # the shipped table, as the relay uses it by default


def call(node: str, model: str | None, at: dt.datetime, inp: int, cached: int, out: int,
         status: str = "success") -> InvocationRecord:
    usage = Usage(input_tokens=inp, cached_tokens=cached, output_tokens=out)
    cost = PRICES.cost(model, usage)
    return InvocationRecord(invoke_id=uuid.uuid4().hex, occurred_at=at, source="relay", endpoint="/v1/responses",
                            status=status, node_id=node, api_format="responses", model=model, stream=True,
                            http_status=200 if status == "success" else 502, usage=usage,
                            cost=cost.total if cost else None)


RELAY_CALLS = [
    call("alpha", CODEX, dt.datetime(2026, 11, 22, 16, 0, 0), 12_000, 8_000, 900),
    call("beta", CODEX, dt.datetime(2026, 11, 23, 9, 30, 0), 30_000, 24_000, 2_500),
    call("alpha", MINI, dt.datetime(2026, 11, 23, 11, 0, 0), 4_000, 0, 300),
    # Counted in tokens, not as a request: the provider bills successful calls.
    call("beta", CODEX, dt.datetime(2026, 11, 23, 12, 0, 0), 0, 0, 0, status="failed"),
    # Not this source's: another node, the provider's previous day, after its snapshot.
    call("gamma", CODEX, dt.datetime(2026, 11, 23, 10, 0, 0), 5_000, 0, 100),
    call("alpha", CODEX, dt.datetime(2026, 11, 22, 15, 59, 59), 7_000, 0, 100),
    call("alpha", CODEX, dt.datetime(2026, 11, 23, 15, 0, 1), 7_000, 0, 100),
]
# What the relay measured in the window, per model.
CODEX_COST = RELAY_CALLS[0].cost + RELAY_CALLS[1].cost
MINI_COST = RELAY_CALLS[2].cost


def provider_items(codex_requests: int = 2, codex_output: int = 3_400, codex_cost: float = CODEX_COST) -> list[dict]:
    # CRS counts input without cache reads: 4,000 + 6,000 uncached, 8,000 + 24,000 read from cache.
    return [crs_item(CODEX, codex_requests, 10_000, codex_output, cache_read=32_000, cost=codex_cost),
            crs_item(MINI, 1, 4_000, 300, cost=MINI_COST)]


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            apply_batch(conn, RELAY_CALLS)
        yield engine


def snapshot(engine, items: list[dict], at: dt.datetime = CAPTURED) -> None:
    ingest(engine, SOURCE.capture(json.dumps(crs_response(*items)), at))


def sources_file(tmp_path, nodes: str = '["alpha", "beta"]') -> str:
    p = tmp_path / "sources.toml"
    p.write_text(f'[[sources]]\nname = "crs"\nurl = "http://127.0.0.1:9/stats"\n'
                 f'api_id = "3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d"\nnodes = {nodes}\n')
    return str(p)


def run(engine, tmp_path, *args: str) -> int:
    return main(["--db", engine.url.render_as_string(hide_password=False), "--sources", sources_file(tmp_path),
                 "--date", "2026-11-23", *args])


def test_relay_and_provider_agree(engine, tmp_path, capsys):
    # An earlier capture of the day says less: only the latest counts.
    snapshot(engine, provider_items(codex_requests=1, codex_output=900, codex_cost=0.01),
             at=CAPTURED - dt.timedelta(hours=3))
    snapshot(engine, provider_items())
    with engine.connect() as conn:
        rec = reconcile(conn, SOURCE, DAY, tolerance=0.0)
    assert rec.ok and rec.captured_at == CAPTURED
    assert rec.window == (dt.datetime(2026, 11, 22, 16), CAPTURED)
    by = {(r.model, r.metric): r for r in rec.rows}
    assert [m for m, metric in by if metric == "requests"] == [CODEX, MINI, ALL_MODELS]
    assert all(r.diff == 0 and r.rel == 0 and r.within for r in rec.rows)
    assert (by[CODEX, "requests"].relay, by[CODEX, "input_tokens"].relay, by[CODEX, "cached_tokens"].relay,
            by[CODEX, "output_tokens"].relay, by[CODEX, "total_tokens"].relay) == (2, 42_000, 32_000, 3_400, 45_400)
    assert by[ALL_MODELS, "requests"].provider == 3 and by[ALL_MODELS, "total_tokens"].provider == 49_700
    assert by[ALL_MODELS, "cost"].relay == pytest.approx(CODEX_COST + MINI_COST)

    assert run(engine, tmp_path, "--tolerance", "0") == 0
    out = capsys.readouterr().out
    assert "provider: latest snapshot, captured 2026-11-23 15:00:00 UTC" in out
    assert "relay:    calls via alpha, beta, 2026-11-22 16:00:00 to 2026-11-23 15:00:00 UTC" in out
    assert out.rstrip().endswith("OK: every value within 0.00%")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "metric", "provider", "relay", "diff", "rel"]
    row = next(line for line in lines if line.startswith(CODEX))
    assert row.split() == [CODEX, "requests", "2", "2", "+0", "+0.00%"]
    # Aligned: every value column ends where its header does.
    assert len({line.index("  requests") for line in lines if "  requests" in line}) == 1


def test_relay_and_provider_differ(engine, tmp_path, capsys):
    # The provider counts one more codex request, 100 more output tokens and 10% more cost.
    snapshot(engine, provider_items(codex_requests=3, codex_output=3_500, codex_cost=CODEX_COST * 1.1))
    assert run(engine, tmp_path) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: 6 value(s) differ by more than 2.00% (marked !)" in out
    assert [line.split() for line in out.splitlines() if line.startswith(CODEX)] == \
        [[CODEX, "requests", "3", "2", "-1", "-33.33%", "!"]]

    with engine.connect() as conn:
        rec = reconcile(conn, SOURCE, DAY, tolerance=0.02)
    by = {(r.model, r.metric): r for r in rec.exceeded}
    assert set(by) == {(CODEX, "requests"), (CODEX, "output_tokens"), (CODEX, "cost"),
                       (ALL_MODELS, "requests"), (ALL_MODELS, "output_tokens"), (ALL_MODELS, "cost")}
    assert (by[CODEX, "requests"].diff, by[CODEX, "requests"].rel) == (-1, pytest.approx(-1 / 3))
    assert (by[CODEX, "output_tokens"].diff, by[CODEX, "output_tokens"].rel) == (-100, pytest.approx(-100 / 3_500))
    assert by[CODEX, "cost"].diff == pytest.approx(-CODEX_COST * 0.1)
    assert by[CODEX, "cost"].rel == pytest.approx(-0.1 / 1.1)
    assert (by[ALL_MODELS, "requests"].provider, by[ALL_MODELS, "requests"].diff) == (4, -1)
    # The 100 output tokens are 2.86% of the output but 0.22% of the total tokens: within 2%.
    assert {(r.model, r.metric) for r in rec.rows if r.within and r.diff} == \
        {(CODEX, "total_tokens"), (ALL_MODELS, "total_tokens")}

    # A looser tolerance accepts the same numbers.
    assert run(engine, tmp_path, "--tolerance", "0.5") == 0
    capsys.readouterr()


def test_json_output(engine, tmp_path, capsys):
    snapshot(engine, provider_items(codex_requests=3))
    assert run(engine, tmp_path, "--json") == 1
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["source"], doc["stats_date"], doc["ok"], doc["captured_at"]) == \
        ("crs", "2026-11-23", False, "2026-11-23T15:00:00")
    assert doc["window"] == {"start": "2026-11-22T16:00:00", "end": "2026-11-23T15:00:00"}
    first = doc["rows"][0]
    assert first == {"model": CODEX, "metric": "requests", "provider": 3, "relay": 2, "diff": -1,
                     "rel": pytest.approx(-1 / 3), "within": False}


def test_no_snapshot_cannot_compare(engine, tmp_path, capsys):
    assert run(engine, tmp_path) == 2
    assert "no provider snapshot of 2026-11-23: nothing to compare" in capsys.readouterr().out


def test_command_errors(engine, tmp_path, capsys):
    url = engine.url.render_as_string(hide_password=False)
    assert main(["--db", url, "--sources", sources_file(tmp_path, nodes="[]"), "--date", "2026-11-23"]) == 2
    assert "source 'crs' names no nodes" in capsys.readouterr().err
    assert main(["--db", url, "--sources", sources_file(tmp_path), "--date", "23.11.2026"]) == 2
    assert "--date must be YYYY-MM-DD, today or yesterday" in capsys.readouterr().err
    assert main(["--db", url, "--sources", sources_file(tmp_path), "--date", "today", "--source", "x"]) == 2
    assert "no source named x" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--db", url, "--sources", sources_file(tmp_path), "--date", "today", "--tolerance", "-1"])


def test_models_match_by_the_names_crs_files_them_under(db_url):
    """Calls through the relay, counted the same by a CRS-faithful fake under its normalised names,
    polled and reconciled: every model lines up."""
    bedrock, local = "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "llama3.1:latest"
    clock = type("Clock", (), {"now": dt.datetime(2026, 11, 23, 4, 0)})()  # 12:00 at CRS
    calls = [("alpha", CODEX, 12_000, 8_000, 0, 900), ("beta", bedrock, 3_000, 1_000, 500, 200),
             ("alpha", local, 400, 0, 0, 50), ("beta", local, 600, 0, 0, 70)]
    with fresh_engine(db_url) as engine, FakeStats(clock=lambda: clock.now) as crs:
        key = crs.add_key()
        source = source_from_mapping({"name": "crs", "url": crs.url, "api_id": key.id, "nodes": ["alpha", "beta"]},
                                     "test")
        records = []
        for i, (node, model, inp, cached, written, out) in enumerate(calls):
            usage = Usage(input_tokens=inp, cached_tokens=cached, cache_write_tokens=written, output_tokens=out)
            cost = PRICES.cost(model, usage)
            records.append(InvocationRecord(
                invoke_id=f"c{i}", occurred_at=clock.now - dt.timedelta(minutes=10 - i), source="relay",
                endpoint="/v1/responses", status="success", node_id=node, model=model, usage=usage,
                cost=cost.total if cost else None))
            # CRS's inputTokens exclude cache reads and writes.
            crs.record(key, model, input_tokens=inp - cached - written, output_tokens=out, cache_read=cached,
                       cache_create=written, real_cost=cost.total if cost else 0.0)
        with engine.begin() as conn:
            apply_batch(conn, records)
        (polled,) = Poller(engine, [source], clock=lambda: clock.now).poll_once()
        assert polled.ok, polled.error
        with engine.connect() as conn:
            rec = reconcile(conn, source, DAY, tolerance=0.0)
    assert rec.ok, [r for r in rec.exceeded]
    by = {(r.model, r.metric): r for r in rec.rows}
    assert sorted({m for m, _ in by if m}) == ["claude-sonnet-4-5-20250929", CODEX, "llama3.1"]
    assert (by["llama3.1", "requests"].relay, by["claude-sonnet-4-5-20250929", "input_tokens"].provider) == (2, 3_000)


def test_compare_is_pure():
    provider = {"a": Totals(requests=10, cost=1.0), ALL_MODELS: Totals(requests=10, cost=1.0)}
    relay = {"a": Totals(requests=10, cost=1.0 + 1e-12), NO_MODEL: Totals(requests=1),
             ALL_MODELS: Totals(requests=11, cost=1.0)}
    rows = {(r.model, r.metric): r for r in compare(provider, relay, tolerance=0.05)}
    assert rows["a", "cost"] == ReconRow("a", "cost", 1.0, 1.0 + 1e-12, 0.0, 0.0, True)  # float noise is no diff
    # The provider saw nothing of a model the relay served: no ratio, never within tolerance.
    assert rows[NO_MODEL, "requests"] == ReconRow(NO_MODEL, "requests", 0, 1, 1, None, False)
    assert rows[ALL_MODELS, "requests"] == ReconRow(ALL_MODELS, "requests", 10, 11, 1, 0.1, False)
    assert [k for k in rows if k[1] == "requests"] == [(NO_MODEL, "requests"), ("a", "requests"),
                                                      (ALL_MODELS, "requests")]
