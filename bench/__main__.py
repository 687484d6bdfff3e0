"""``python -m bench`` (``./run.sh bench``): the relay's overhead against bare mitmdump, the writer alone,
the stats queries at a million invocations, long streams against streaming mitmdump (the C load tools of
``bench/tools``, built on first use) and Responses over WebSocket against mitmdump (``bench.ws``); aligned
tables on stdout, everything in a JSON file.

MariaDB runs use a scratch database ``codex_bench_<hex>`` on the server of ``--mysql-url``, dropped
afterwards: the database named in the URL is never touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import streams, ws
from bench.ctools import ToolError
from bench.http import bench_http
from bench.queries import bench_queries
from bench.report import fmt, table
from bench.scratch import DEFAULT_MYSQL_URL, migrated_engine, mysql_unavailable, scratch_mysql, sqlite_url
from bench.writer import bench_writer

PARTS = ("http", "writer", "queries", "streams", "ws")
WRITER_TARGET_PER_S = 5_000
QUERY_TARGET_MS = 200.0


@dataclass(frozen=True)
class Sizes:
    http_seconds: float  # one run of one target at one concurrency
    http_clients: tuple[int, ...]
    http_rounds: int
    ttfb_rounds: int
    ttfb_per_round: int
    writer_burst: int
    writer_rate: float
    writer_seconds: float
    query_rows: int
    query_repeat: int
    streams: streams.StreamSizes
    ws: ws.WsSizes


FULL = Sizes(http_seconds=3.0, http_clients=(1, 8, 32), http_rounds=5, ttfb_rounds=4, ttfb_per_round=10,
             writer_burst=50_000, writer_rate=WRITER_TARGET_PER_S, writer_seconds=10.0,
             query_rows=1_000_000, query_repeat=3, streams=streams.FULL, ws=ws.FULL)
# Every code path, tiny sizes: the smoke test and a quick look after a change.
QUICK = Sizes(http_seconds=0.3, http_clients=(1, 4), http_rounds=1, ttfb_rounds=1, ttfb_per_round=2,
              writer_burst=300, writer_rate=1_000, writer_seconds=0.3, query_rows=2_000, query_repeat=1,
              streams=streams.QUICK, ws=ws.QUICK)

# First event after 50 ms, then one every 10 ms: a buffering proxy shows the whole stream as its TTFB.
TTFB_DELAY_S = 0.05
TTFB_EVENT_DELAY_S = 0.01


def log(msg: str) -> None:
    print(msg, flush=True)


# Other checkouts of the relay (--compare) measured beside this one, e.g. the commit before a change.
COMPARE: list[Path] = []


def run_http(sizes: Sizes, mysql_server: str | None) -> dict:
    return bench_http(seconds=sizes.http_seconds, clients=list(sizes.http_clients), rounds=sizes.http_rounds,
                      mysql_server=mysql_server, ttfb_delay=TTFB_DELAY_S, ttfb_event_delay=TTFB_EVENT_DELAY_S,
                      ttfb_rounds=sizes.ttfb_rounds, ttfb_per_round=sizes.ttfb_per_round, compare=COMPARE, log=log)


def _backends(stack: ExitStack, mysql_server: str | None) -> dict[str, str]:
    """backend name -> URL of an empty scratch database, dropped when ``stack`` closes."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-")))
    urls = {"sqlite": sqlite_url(tmp, "bench.db")}
    if mysql_server:
        urls["mariadb"] = stack.enter_context(scratch_mysql(mysql_server))
    return urls


def run_writer(sizes: Sizes, mysql_server: str | None) -> dict:
    out = {}
    for name in ("sqlite", "mariadb") if mysql_server else ("sqlite",):
        with ExitStack() as stack:  # a fresh database per backend
            url = _backends(stack, mysql_server)[name]
            log(f"writer → {name}: burst of {sizes.writer_burst:,}, then {sizes.writer_rate:,.0f}/s "
                f"for {sizes.writer_seconds:g} s")
            out[name] = bench_writer(url, burst=sizes.writer_burst, rate=sizes.writer_rate,
                                     seconds=sizes.writer_seconds)
    return out


def run_queries(sizes: Sizes, mysql_server: str | None) -> dict:
    with ExitStack() as stack:
        engines = {name: migrated_engine(url) for name, url in _backends(stack, mysql_server).items()}
        try:
            log(f"queries: generating {sizes.query_rows:,} invocations into {', '.join(engines)}")
            return bench_queries(engines, n=sizes.query_rows, repeat=sizes.query_repeat, log=log)
        finally:
            for engine in engines.values():
                engine.dispose()


def run_streams(sizes: Sizes, mysql_server: str | None) -> dict:
    return streams.bench_streams(sizes.streams, mysql_server=mysql_server, compare=COMPARE, log=log)


def run_ws(sizes: Sizes, mysql_server: str | None) -> dict:
    return ws.bench_ws(sizes.ws, log=log)


RUNNERS: dict[str, Callable[[Sizes, str | None], dict]] = {
    "http": run_http, "writer": run_writer, "queries": run_queries, "streams": run_streams, "ws": run_ws}


# -- tables ----------------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def http_tables(r: dict) -> str:
    rows = [(t["clients"], t["target"], t["rps"], _x(t["vs_mitmdump"]), _x(t["vs_mitmdump-stream"]),
             t["latency_median_ms"], t["latency_p99_ms"], t["errors"]) for t in r["throughput"]]
    out = table("HTTP throughput (median of rounds; ratios: median of per-round ratios)",
                ["clients", "target", "req/s", "vs mitmdump", "vs mitmdump-stream", "median ms", "p99 ms",
                 "errors"], rows)
    c = r["config"]
    out += table(f"TTFB, 1 client: first event after {c['ttfb_first_event_delay_ms']:g} ms, then one every "
                 f"{c['ttfb_event_delay_ms']:g} ms",
                 ["target", "TTFB median ms", "TTFB p99 ms", "added vs direct ms", "full response ms", "samples"],
                 [(t["target"], t["ttfb_median_ms"], t["ttfb_p99_ms"], t["added_vs_direct_ms"],
                   t["latency_median_ms"], t["samples"]) for t in r["ttfb"]])
    out += table("Relay bookkeeping: every answered call recorded?", ["relay", "answered", "recorded", "ok"],
                 [(k, v["answered"], v["recorded"], v["answered"] == v["recorded"]) for k, v in r["recorded"].items()])
    return out


def _every_second(samples: Sequence[Sequence[float]]) -> str:
    picked, next_t = [], 0.0
    for t, q in samples:
        if t >= next_t:
            picked.append(f"{int(q)}")
            next_t = t + 1.0
    return " ".join(picked)


def writer_tables(r: dict) -> str:
    rows = []
    for name, w in r.items():
        b, p = w["burst"], w["paced"]
        rows.append((name, b["records"], b["per_s"], b["max_queued"], p["offered_per_s"], p["achieved_per_s"],
                     p["max_queued"], p["queue_growth_per_s"], p["queue_growing"],
                     b["per_s"] >= WRITER_TARGET_PER_S and not p["queue_growing"]))
    out = table(f"Writer alone (store.write.writer.Writer; target ≥ {WRITER_TARGET_PER_S:,}/s, queue not growing)",
                ["backend", "burst", "burst /s", "burst max queue", "paced offered /s", "paced achieved /s",
                 "paced max queue", "queue trend /s", "growing", "target met"], rows)
    out += table("Writer check", ["backend", "submitted", "stored", "node requests", "batches", "mean batch"],
                 [(n, w["check"]["submitted"], w["check"]["stored"], w["check"]["node_requests"],
                   w["check"]["batches"], w["check"]["mean_batch"]) for n, w in r.items()])
    out += "\nQueue depth, one sample a second (every 100 ms in the JSON):\n"
    for name, w in r.items():
        out += f"  {name:8} burst: {_every_second(w['burst']['queue'])}\n"
        out += f"  {name:8} paced: {_every_second(w['paced']['queue'])}\n"
    return out


def query_tables(r: dict) -> str:
    rows = [(name, q["query"], q["window"], q["rows"], q["median_ms"], q["max_ms"], q["median_ms"] < QUERY_TARGET_MS)
            for name, qs in r["results"].items() for q in qs]
    out = table(f"store.stats queries over {r['invocations']:,} invocations ({r['span_days']} days; "
                f"target < {QUERY_TARGET_MS:g} ms)",
                ["backend", "query", "window", "groups", "median ms", "max ms", "target met"], rows)
    out += table("Bulk load (store.write.batch.apply_batch, one transaction per 10,000 invocations)",
                 ["backend", "seconds", "invocations/s", "daily rollup rows"],
                 [(k, v, round(r["invocations"] / v) if v else None, r["rollup_rows"].get(k))
                  for k, v in r["load_seconds"].items()])
    out += "\nPlans (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on MariaDB):\n"
    for name, qs in r["results"].items():
        for q in qs:
            out += f"  {name:8} {q['query']:10} {q['window']:7} " + " | ".join(q["plan"]) + "\n"
    return out


def _vs(row: dict) -> str:
    if row["added_ms"] is not None:
        return f"{row['added_ms']:+.1f} ms"
    return "-" if row["ratio"] is None else f"{row['ratio']:.2f}× {row['vs']}"


def _per_target(cores: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {fmt(c, 2)}" for name, c in cores.items()) + "\n"


def streams_tables(r: dict) -> str:
    fleet = r["fleet"]
    rows = r["rows"] + fleet.get("rows", [])
    out = table("Long streams (fakeup + loadgen; median of rounds; vs: median of per-round ratios, or added ms)",
                ["workload", "target", "figure", "unit", "vs", "goal", "met", "errors"],
                [(x["title"], x["target"], x["figure"], x["unit"], _vs(x), x["goal"] or "", x["met"], x["errors"])
                 for x in rows])
    if "skipped" in fleet:
        out += f"two relays behind HAProxy: skipped ({fleet['skipped']})\n"
    else:
        h = fleet["haproxy"]
        out += (f"two relays on one {fleet['db']} database; HAProxy in front: {fmt(h['cpu_us_per_event'], 2)} µs "
                f"CPU per event, {fmt(h['cpu_share_of_a_core'], 2)} of a core\n")
        out += "cores the proxies used: " + _per_target(fleet.get("proxy_cores", {}))
        if "machine_cores" in fleet:  # results files before 2026-12-06 lack it
            out += (f"cores busy on the machine ({fleet['machine_core_count']} in all; the rest of each is the load "
                    "tools, HAProxy and the kernel): " + _per_target(fleet["machine_cores"]))
    runs = {**r["runs"], **fleet.get("runs", {})}
    detail = [(key, name, x["calls_ok"], x["errors"], x["events"], x["events_per_s"], x["lat_p99"], x["gap_p99"],
               x["gap_max"], round(x["cpu_s"] * 1000), x["rss_peak_kb"] - x["rss_before_kb"])
              for key, by_target in runs.items() for name, rs in by_target.items() for x in rs]
    out += table("Long streams, every run", ["workload", "target", "calls", "errors", "events", "events/s",
                                            "lat p99 ms", "gap p99 ms", "gap max ms", "CPU ms", "RSS growth KiB"],
                 detail)
    recorded = {**r["recorded"], **({"fleet": fleet["recorded"]} if "recorded" in fleet else {})}
    out += table("Relay bookkeeping: every answered call recorded?", ["relay", "answered", "recorded", "ok"],
                 [(k, v["answered"], v["recorded"], v["answered"] == v["recorded"]) for k, v in recorded.items()])
    return out


TABLES: dict[str, Callable[[dict], str]] = {"http": http_tables, "writer": writer_tables, "queries": query_tables,
                                            "streams": streams_tables, "ws": ws.ws_tables}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every part in about a minute")
    parser.add_argument("--only", choices=PARTS, help="run one part")
    parser.add_argument("--mysql-url", default=DEFAULT_MYSQL_URL,
                        help="MariaDB/MySQL server for the MariaDB runs (default %(default)s); a scratch database "
                             "codex_bench_<hex> is created there and dropped, the URL's own database is never "
                             "used. Empty: SQLite only")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/<UTC timestamp>.json)")
    parser.add_argument("--show", type=Path, metavar="JSON", help="print the tables of an earlier results file")
    parser.add_argument("--compare", type=Path, action="append", default=[], metavar="CHECKOUT",
                        help="http, streams: also measure the relay of another checkout (its addon/codex.py, on "
                             "SQLite) in the same interleaved rounds, e.g. a `git worktree` of the previous commit; "
                             "repeatable")
    args = parser.parse_args(argv)
    for checkout in args.compare:
        if not (checkout / "addon" / "codex.py").is_file():
            parser.error(f"--compare {checkout}: no addon/codex.py there")
    COMPARE[:] = [c.resolve() for c in args.compare]
    if args.show:
        earlier = json.loads(args.show.read_text())
        print(f"{args.show}: started {earlier['started']}, {earlier['machine']['cpus']} CPUs")
        for part in PARTS:
            if part in earlier:
                print(TABLES[part](earlier[part]))
        return 0
    started = dt.datetime.now(dt.UTC)
    out_path = args.out or Path("bench/results") / f"{started:%Y%m%dT%H%M%SZ}.json"
    sizes = QUICK if args.quick else FULL
    results: dict = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "sizes": asdict(sizes),
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()}}
    mysql_server = args.mysql_url or None
    if mysql_server:
        reason = mysql_unavailable(mysql_server)
        if reason:
            log(f"MariaDB runs skipped: {reason}")
            results["mariadb_skipped"] = reason
            mysql_server = None
    for part in (args.only,) if args.only else PARTS:
        t0 = time.perf_counter()
        try:
            results[part] = RUNNERS[part](sizes, mysql_server)
        except ToolError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
        results.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        print(TABLES[part](results[part]), flush=True)
    results["wall_seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {out_path} ({results['wall_seconds']:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
