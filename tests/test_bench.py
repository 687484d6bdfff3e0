"""Smoke test of the benchmarks: every part runs at tiny sizes and yields a complete result.

Timings are not asserted (a shared 2-core machine makes them noise); the structure and the
bookkeeping checks the benchmarks make (every call recorded, every record stored) are.
"""

from __future__ import annotations

import json
import os
import uuid
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

import bench.scratch
from bench import ctools, streams
from bench.__main__ import main
from bench.http import BASELINES
from bench.queries import QUERIES
from bench.writer import slope
from tests.support.ci import IN_CI
from tests.support.databases import MYSQL_SERVER_URL, require_mysql
from tests.support.haproxy import HAPROXY

pytestmark = pytest.mark.e2e  # starts real mitmdump processes


def _bench_databases() -> set[str]:
    engine = sa.create_engine(MYSQL_SERVER_URL)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("SHOW DATABASES LIKE 'codex_bench\\_%'")).scalars())
    finally:
        engine.dispose()


def _check_http(r: dict, relays: list[str]) -> None:
    targets = ["direct", *BASELINES, *relays]
    rows = r["throughput"]
    assert [(t["clients"], t["target"]) for t in rows] == [(c, t) for c in (1, 4) for t in targets]
    for t in rows:
        assert t["rps"] > 0 and t["errors"] == 0
        assert t["latency_median_ms"] is not None and t["latency_p99_ms"] is not None
        assert all(t[f"vs_{b}"] is not None for b in BASELINES)
    assert [t["target"] for t in r["ttfb"]] == targets
    assert all(t["ttfb_median_ms"] is not None and t["samples"] > 0 for t in r["ttfb"])
    assert set(r["recorded"]) == {*relays, *(f"{name} (ttfb)" for name in relays)}
    for rec in r["recorded"].values():
        assert rec["answered"] > 0 and rec["recorded"] == rec["answered"]


def _check_writer(r: dict, backends: list[str]) -> None:
    assert list(r) == backends
    for w in r.values():
        assert w["burst"]["per_s"] > 0 and w["burst"]["queue"]
        assert w["paced"]["achieved_per_s"] > 0 and w["paced"]["queue"]
        assert isinstance(w["paced"]["queue_growing"], bool)
        check = w["check"]
        assert check["stored"] == check["submitted"] == check["node_requests"] > 0
        assert check["rejected"] == 0 and check["spooled"] == 0


def _check_queries(r: dict, backends: list[str]) -> None:
    assert list(r["results"]) == list(r["load_seconds"]) == backends
    for results in r["results"].values():
        expected = [(name, window) for window in ("all", "7 days") for name in QUERIES]
        assert [(q["query"], q["window"]) for q in results] == expected
        for q in results:
            assert q["rows"] > 0 and q["runs"] >= 1 and q["median_ms"] >= 0
            assert q["plan"], f"no plan captured for {q['query']}"


def _check_streams(r: dict, relays: list[str], fleet_db: str) -> None:
    sizes = streams.QUICK
    keys = ["codex", *(f"ceiling-{load.conns}" for load in sizes.ceiling), "memory", "json", "stall", "short"]
    targets = [streams.BASELINE, *relays]
    assert [(x["workload"], x["target"]) for x in r["rows"]] == [(k, t) for k in keys for t in targets]
    for x in r["rows"]:
        assert x["errors"] == 0 and x["figure"] is not None and len(x["figure_rounds"]) >= 1
        if x["target"] == streams.BASELINE:
            assert x["goal"] is None and x["met"] is None
        else:  # judged against the baseline: a ratio, or added ms for the stall
            compared = x["added_ms"] if x["workload"] == "stall" else x["ratio"]
            assert x["goal"] and (x["met"] is None) == (compared is None)
    loads = {w.key: w.load for w in [*streams.workloads(sizes), streams.memory_workload(sizes)]}
    for key, by_target in r["runs"].items():
        assert list(by_target) == targets
        for run in (x for runs in by_target.values() for x in runs):
            assert run["calls_ok"] == loads[key].conns * loads[key].calls and run["errors"] == 0
            assert run["cpu_s"] >= 0 and run["rss_peak_kb"] >= run["rss_before_kb"] > 0
            assert key != "stall" or run["beside"]["calls_ok"] > 0  # the big JSON calls ran beside the streams
    fleet = r["fleet"]
    if HAPROXY.exists() or IN_CI:  # run.sh installs it under CI: there the row must run
        one, two = f"relay-{fleet_db} ×1", f"relay-{fleet_db} ×2 (haproxy)"
        one_port = f"relay-{fleet_db} ×2 (one port)"
        assert fleet["db"] == fleet_db
        assert [(x["target"], x["vs"]) for x in fleet["rows"]] == [
            (streams.BASELINE, streams.BASELINE), (one, streams.BASELINE), (two, one), (one_port, one)]
        assert [x["goal"] for x in fleet["rows"]] == [None, None, "≥ 1.6×", None]  # the balancer-less row informs
        assert all(x["errors"] == 0 for x in fleet["rows"])
        assert set(fleet["haproxy"]) == {"cpu_us_per_event", "cpu_share_of_a_core"}
        assert set(fleet["proxy_cores"]) == {"mitmdump-stream", one, two, one_port}
        assert all(fleet["proxy_cores"].values())
        # What the whole machine was busy with, beside what the proxies used, for every target.
        assert set(fleet["machine_cores"]) == set(fleet["proxy_cores"])
        assert all(fleet["machine_cores"][k] > 0 for k in fleet["proxy_cores"])
        assert fleet["machine_core_count"] == os.cpu_count()
        recorded = {**r["recorded"], "fleet": fleet["recorded"]}
    else:
        assert str(HAPROXY) in fleet["skipped"]
        recorded = r["recorded"]
    assert set(recorded) == {*relays, *(("fleet",) if "skipped" not in fleet else ())}
    for rec in recorded.values():
        assert rec["answered"] > 0 and rec["recorded"] == rec["answered"]


def _check_ws(r: dict) -> None:
    """Every WebSocket workload measured on both proxies without errors; every turn the relay answered a row."""
    assert [(x["workload"], x["target"]) for x in r["rows"]] == [
        (w, t) for w in ("small", "open", "long") for t in ("mitmdump", "relay-sqlite")]
    assert all(x["errors"] == 0 and x["figure"] is not None for x in r["rows"])
    relay = [x for x in r["rows"] if x["target"] == "relay-sqlite"]
    assert all(x["goal"] for x in relay)
    # A ratio where the goal is one; a long socket's goal is its own growth per turn (mitmdump's may be 0).
    assert all(x["ratio"] is not None for x in relay if x["workload"] != "long")
    assert r["recorded"]["answered"] > 0 and r["recorded"]["recorded"] == r["recorded"]["answered"]


def _run(tmp_path, mysql_url: str) -> dict:
    out = tmp_path / "results.json"
    assert main(["--quick", "--mysql-url", mysql_url, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.mysql
def test_quick_run_on_sqlite_and_mariadb_uses_scratch_databases(tmp_path, monkeypatch) -> None:
    """One run covers both backends (SQLite always runs beside MariaDB): a second, SQLite-only run would
    start the same processes again to check a subset of the same tables."""
    require_mysql()
    made: list[str] = []  # this run's scratch databases (another run on the same server makes its own)

    def uuid4() -> uuid.UUID:
        u = uuid.uuid4()
        made.append(f"codex_bench_{u.hex[:12]}")
        return u

    monkeypatch.setattr(bench.scratch, "uuid", SimpleNamespace(uuid4=uuid4))
    r = _run(tmp_path, MYSQL_SERVER_URL)
    assert r["quick"] and r["machine"]["cpus"] >= 1
    assert "mariadb_skipped" not in r
    _check_http(r["http"], ["relay-sqlite", "relay-mariadb"])
    _check_writer(r["writer"], ["sqlite", "mariadb"])
    _check_queries(r["queries"], ["sqlite", "mariadb"])
    _check_streams(r["streams"], ["relay-sqlite"], "mariadb")
    _check_ws(r["ws"])
    assert made and _bench_databases().isdisjoint(made)  # every scratch database was dropped


def test_show_prints_every_parts_tables(tmp_path, capsys) -> None:
    """--show reads an earlier results file; here a streams-only one whose fleet row was skipped."""
    run = {"rows": [], "runs": {}, "recorded": {}, "fleet": {"skipped": "no haproxy"}}
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"started": "2026-11-26T00:00:00+00:00", "machine": {"cpus": 2}, "streams": run}))
    assert main(["--show", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Long streams" in printed and "skipped (no haproxy)" in printed


def test_load_tools_build_once_per_source_version(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ctools, "TOOLS", tmp_path)
    monkeypatch.setattr(ctools, "BUILD", tmp_path / ".build")
    (tmp_path / "t.c").write_text("int main(void) { return 0; }\n")
    first = ctools.binary("t")
    assert ctools.binary("t") == first  # cached
    (tmp_path / "t.c").write_text("int main(void) { return 1; }\n")
    assert ctools.binary("t") != first  # an edit rebuilds


def test_no_compiler_is_one_clear_error_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ctools, "BUILD", tmp_path / ".build")  # nothing built yet
    monkeypatch.setattr(ctools.shutil, "which", lambda name: None)
    assert main(["--quick", "--only", "streams", "--mysql-url", "", "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: no C compiler") and "\n" not in err


def test_queue_slope() -> None:
    assert slope([(0.0, 0), (1.0, 100), (2.0, 200)]) == pytest.approx(100.0)
    assert slope([(0.0, 50), (1.0, 50)]) == 0.0
    assert slope([(0.0, 7)]) == 0.0
