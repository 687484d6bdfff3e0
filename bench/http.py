"""Relay overhead: direct to the upstream vs bare mitmdump vs the relay (SQLite, MariaDB), side by side.

Every target runs in its own process next to one fake streaming upstream (also its own process),
and the load generator drives them in interleaved rounds (A B C D, B C D A, …) so drift on a shared
machine hits every target alike; ratios are taken per round, then their median.

Two bare baselines: ``mitmdump`` with its defaults buffers each response, ``mitmdump-stream``
(``stream_large_bodies=1``) streams it as the relay does, so relay/mitmdump-stream is the cost of
the addon alone and mitmdump-stream/mitmdump the cost of streaming in mitmproxy itself.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.ctools import start_listener
from bench.load import LoadResult, run_load
from bench.rounds import median, rotated
from bench.scratch import scratch_mysql, sqlite_url
from store.engine import make_engine
from store.schema import codex_invocations
from tests.support.relayproc import ROOT, RelayProcess

BASELINES = ("mitmdump", "mitmdump-stream")
CLIENT_KEY = "bench"  # what bench.load sends as its bearer token


@dataclass
class Target:
    name: str
    port: int
    relay: RelayProcess | None = None
    db_url: str | None = None  # where the relay records its calls
    source: str | None = None  # its codex_source tag: this phase's rows
    answered: int = 0  # HTTP 200 answers: each must become one recorded invocation
    runs: dict[int, list[LoadResult]] = field(default_factory=dict)  # clients -> one result per round

    def load(self, *, clients: int, seconds: float, max_requests: int | None = None) -> LoadResult:
        res = run_load(self.port, clients=clients, seconds=seconds, max_requests=max_requests)
        self.answered += res.requests
        return res

    def recorded(self) -> int | None:
        """Stop the relay (it flushes its writer) and count the rows it wrote; None for a non-relay."""
        if self.relay is None or self.db_url is None or self.source is None:
            return None
        self.relay.stop()
        return count_recorded(self.db_url, self.source)


def count_recorded(db_url: str, source: str) -> int:
    """Rows the relays tagged ``source`` (their ``codex_source``) wrote to ``db_url``."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)
                                .where(codex_invocations.c.source == source)).scalar_one()
    finally:
        engine.dispose()


def start_upstream(stack: ExitStack, *args: str) -> int:
    """The fake upstream in its own process, so it does not share a GIL with the load generator."""
    return start_listener(stack, [sys.executable, "-m", "tests.support.fakeupstream", *args], cwd=ROOT)


# Printing every flow costs mitmdump more than anything else here: off for all targets alike.
QUIET = ["--set", "flow_detail=0"]


def bare_mitmdump(reverse: str, *, stream: bool) -> RelayProcess:
    """mitmdump without the addon in reverse mode to ``reverse``; ``stream``: stream_large_bodies=1."""
    return RelayProcess(db_url=None, addon=False, reverse_target=reverse,
                        extra_args=QUIET + (["--set", "stream_large_bodies=1"] if stream else []))


def relay_options(tmp: Path, upstream_port: int, source: str) -> dict[str, str]:
    """The relay as deployed: one node (the upstream), client keys; pings off so only client traffic is
    measured; its rows tagged ``source``."""
    nodes = tmp / "nodes.toml"
    nodes.write_text(f'[[nodes]]\nid = "bench"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
                     'api_key = "k"\nweight = 1\n')
    return {"codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_source": source,
            "codex_client_keys": f"{CLIENT_KEY}={CLIENT_KEY}"}


def start_targets(stack: ExitStack, upstream_port: int, tmp: Path, mysql_db: str | None, phase: str,
                  compare: Sequence[Path] = ()) -> list[Target]:
    """Every thing under test, started and registered for stopping, in the order of the tables."""
    reverse = f"http://127.0.0.1:{upstream_port}"
    bare = [(name, bare_mitmdump(reverse, stream=stream)) for name, stream in (("mitmdump", False),
                                                                                ("mitmdump-stream", True))]
    relay_opts = relay_options(tmp, upstream_port, phase)
    dbs: list[tuple[str, str, dict[str, str], Path]] = [("relay-sqlite", sqlite_url(tmp, f"{phase}.db"), {}, ROOT)]
    if mysql_db:
        dbs.append(("relay-mariadb", mysql_db, {"codex_spool": str(tmp / f"{phase}-mariadb.spool")}, ROOT))
    # --compare: the relay of another checkout too, on SQLite, beside this one.
    dbs += [(f"relay-sqlite@{root.name}", sqlite_url(tmp, f"{phase}-{root.name}.db"), {}, root) for root in compare]
    relays = [(name, url, RelayProcess(db_url=url, reverse_target=reverse, options=relay_opts | opts,
                                       extra_args=QUIET, root=root)) for name, url, opts, root in dbs]
    # They boot side by side (start-up is mostly imports); none outlives the stack if another fails.
    for _, proc in bare:
        stack.callback(proc.spawn().kill)
    for _, _, proc in relays:
        stack.callback(proc.spawn().kill)
    out = [Target("direct", upstream_port)]
    out += [Target(name, stack.enter_context(proc).port) for name, proc in bare]
    out += [Target(name, stack.enter_context(proc).port, proc, url, phase) for name, url, proc in relays]
    return out


def _ratio(a: LoadResult, b: LoadResult) -> float | None:
    return a.rps / b.rps if b.rps else None


def throughput(targets: list[Target], *, clients: list[int], rounds: int, seconds: float,
               log: Callable[[str], None]) -> list[dict]:
    for t in targets:  # warm-up: connections, imports, the relay's first DB writes
        t.load(clients=4, seconds=min(1.0, seconds))
    for c in clients:
        for r in range(rounds):
            for t in rotated(targets, r):
                res = t.load(clients=c, seconds=seconds)
                t.runs.setdefault(c, []).append(res)
            log(f"  clients={c:<3} round {r + 1}/{rounds}: " + "  ".join(
                f"{t.name} {t.runs[c][-1].rps:,.0f}" for t in targets) + " req/s")
    by_name = {t.name: t for t in targets}
    rows = []
    for c in clients:
        for t in targets:
            pooled = LoadResult.merge(t.runs[c]).summary()
            row = {"target": t.name, "clients": c, "rps": median([x.rps for x in t.runs[c]]),
                   "rps_rounds": [round(x.rps, 1) for x in t.runs[c]], "errors": pooled["errors"],
                   "latency_median_ms": pooled["latency_median_ms"], "latency_p99_ms": pooled["latency_p99_ms"]}
            for base in BASELINES:  # per-round ratios: both numbers of a pair saw the same machine
                row[f"vs_{base}"] = median([_ratio(x, y) for x, y in zip(t.runs[c], by_name[base].runs[c],
                                                                            strict=True)])
            rows.append(row)
    return rows


def ttfb(targets: list[Target], *, rounds: int, per_round: int, log: Callable[[str], None]) -> list[dict]:
    for t in targets:
        t.load(clients=1, seconds=5, max_requests=2)
    samples: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in rotated(targets, r):
            samples[t.name].append(t.load(clients=1, seconds=120, max_requests=per_round))
        log(f"  TTFB round {r + 1}/{rounds}: " + "  ".join(
            f"{t.name} {statistics.median(samples[t.name][-1].ttfbs_ms or [0]):.1f}" for t in targets) + " ms")
    pooled = {name: LoadResult.merge(res).summary() for name, res in samples.items()}
    direct = pooled["direct"]["ttfb_median_ms"]
    return [{"target": name, "samples": len(LoadResult.merge(samples[name]).ttfbs_ms), "errors": s["errors"],
             "ttfb_median_ms": s["ttfb_median_ms"], "ttfb_p99_ms": s["ttfb_p99_ms"],
             "latency_median_ms": s["latency_median_ms"],
             "added_vs_direct_ms": round(s["ttfb_median_ms"] - direct, 3)
             if s["ttfb_median_ms"] is not None and direct is not None else None}
            for name, s in pooled.items()]


def _recorded(targets: list[Target]) -> dict[str, dict]:
    return {t.name: {"answered": t.answered, "recorded": t.recorded()} for t in targets if t.relay is not None}


def bench_http(*, seconds: float, clients: list[int], rounds: int, mysql_server: str | None,
               ttfb_delay: float, ttfb_event_delay: float, ttfb_rounds: int, ttfb_per_round: int,
               compare: Sequence[Path] = (), log: Callable[[str], None] = print) -> dict:
    """Throughput and latency at each concurrency, then TTFB of a stream whose first event comes after
    ``ttfb_delay`` s (and each next one ``ttfb_event_delay`` s later); relays on SQLite and, with a
    ``mysql_server`` URL, on a scratch MariaDB database."""
    out: dict = {"config": {"seconds": seconds, "clients": clients, "rounds": rounds,
                            "ttfb_first_event_delay_ms": ttfb_delay * 1000,
                            "ttfb_event_delay_ms": ttfb_event_delay * 1000, "ttfb_rounds": ttfb_rounds,
                            "ttfb_requests_per_round": ttfb_per_round}}
    with ExitStack() as outer:
        tmp = Path(outer.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-")))
        mysql_db = outer.enter_context(scratch_mysql(mysql_server)) if mysql_server else None
        with ExitStack() as stack:
            targets = start_targets(stack, start_upstream(stack), tmp, mysql_db, "bench-throughput", compare)
            log(f"throughput: {', '.join(t.name for t in targets)}; {rounds} rounds of {seconds:g} s")
            out["throughput"] = throughput(targets, clients=clients, rounds=rounds, seconds=seconds, log=log)
            out["recorded"] = _recorded(targets)
        with ExitStack() as stack:
            port = start_upstream(stack, "--first-byte-delay", str(ttfb_delay), "--event-delay", str(ttfb_event_delay))
            targets = start_targets(stack, port, tmp, mysql_db, "bench-ttfb", compare)
            log(f"TTFB: first event after {ttfb_delay * 1000:g} ms, then one every {ttfb_event_delay * 1000:g} ms")
            out["ttfb"] = ttfb(targets, rounds=ttfb_rounds, per_round=ttfb_per_round, log=log)
            for name, rec in _recorded(targets).items():
                out["recorded"][f"{name} (ttfb)"] = rec
    return out
