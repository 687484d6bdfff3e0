"""Long streams (issue 16): the relay against streaming mitmdump on the workloads of real Codex traffic.

Upstream and load generator are the C tools of ``bench/tools`` (see bench.ctools). Each target is one
proxy process on its own port in front of the same fake upstream: ``mitmdump --set stream_large_bodies=1``
(the honest baseline: the relay must stream) and the relay on SQLite (plus ``--compare`` checkouts').
Rounds are interleaved, their order rotating; a ratio is taken per round, then the median. Per loadgen run:
CPU = utime + stime of the proxy process from /proc before and after; memory = peak VmRSS (sampled every
20 ms) minus VmRSS before. Memory is measured on fresh processes, one set per round, since a Python process
keeps the heap an earlier run grew.

The fleet row: two relays behind HAProxy (examples/haproxy.cfg), writing to one database (a scratch
MariaDB database when the server is there, else one SQLite file), against one of them alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.ctools import Load, loadgen, loadgen_result, loadgen_start, start_fakeup
from bench.http import QUIET, bare_mitmdump, count_recorded, relay_options
from bench.rounds import median, rotated
from bench.scratch import migrated_engine, scratch_mysql, sqlite_url
from tests.support.haproxy import HAPROXY, start_haproxy
from tests.support.ports import free_port
from tests.support.procstat import PeakRss, cpu_seconds, machine_cpu_seconds, rss_kb
from tests.support.relayproc import ROOT, RelayProcess

BASELINE = "mitmdump-stream"


@dataclass(frozen=True)
class StreamSizes:
    rounds: int  # workloads 1, 2, 4 and the fleet
    memory_rounds: int  # each on freshly started targets
    short_rounds: int  # 5: its per-round ratios spread ±8 % on a shared 2-core machine, and a round is short
    codex: Load  # 1: CPU per event
    ceiling: tuple[Load, ...]  # 2: events/s, one row per load
    memory: Load  # 3: streams held open together
    json: Load  # 4: big non-streamed JSON calls, alone
    stall: Load  # 4: ordinary streams while ``json`` calls run beside them
    short: Load  # 5: calls/s
    fleet: Load  # 6: events/s


FULL = StreamSizes(
    rounds=5, memory_rounds=3, short_rounds=15,
    codex=Load(conns=50, calls=2, n=300, ms=5, ramp_ms=1000),
    ceiling=(Load(conns=1, calls=1, n=20_000, ms=0), Load(conns=8, calls=1, n=20_000, ms=0)),
    memory=Load(conns=200, calls=1, n=600, ms=5, ramp_ms=1000),
    json=Load(conns=1, calls=5, json_bytes=10_000_000),
    stall=Load(conns=20, calls=1, n=400, ms=5, ramp_ms=100),
    short=Load(conns=8, calls=250, n=5, ms=0),
    fleet=Load(conns=200, calls=1, n=500, ms=1, ramp_ms=500))
QUICK = StreamSizes(
    rounds=1, memory_rounds=1, short_rounds=1,
    codex=Load(conns=4, calls=1, n=20, ms=5),
    ceiling=(Load(conns=1, calls=1, n=300, ms=0), Load(conns=2, calls=1, n=300, ms=0)),
    memory=Load(conns=8, calls=1, n=20, ms=5),
    json=Load(conns=1, calls=1, json_bytes=200_000),
    stall=Load(conns=4, calls=1, n=20, ms=5),
    short=Load(conns=2, calls=10, n=5, ms=0),
    fleet=Load(conns=8, calls=1, n=50, ms=1))
STALL_LIMIT_MS = 5.0  # issue 16.3: no other call may wait longer than this on a big JSON body


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    load: Load
    figure: Callable[[dict], float | None]  # of one loadgen run (plus its CPU and memory)
    goal: float  # for the relay's ratio to the baseline, or its added ms
    at_most: bool  # goal is an upper bound
    beside: Load | None = None  # run on the same target meanwhile, in the background
    added: bool = False  # the goal is on the figure minus the baseline's (ms), not on their ratio
    rounds: int | None = None  # its own number of rounds, else the sizes' ``rounds``

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.goal if self.at_most else value >= self.goal


def _per(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def workloads(s: StreamSizes) -> list[Workload]:
    """The issue's table, in its order (the fleet row is apart: it has targets of its own)."""
    out = [Workload("codex", f"CPU per event, {s.codex.conns} streams of {s.codex.n} deltas at {s.codex.ms} ms",
                    "µs CPU/event", s.codex, lambda r: _per(r["cpu_s"] * 1e6, r["events"]), 1.10, True)]
    out += [Workload(f"ceiling-{load.conns}", f"event ceiling, {load.n:,} events per stream, {load.conns} client(s)",
                     "events/s", load, lambda r: r["events_per_s"], 0.92, False) for load in s.ceiling]
    out += [Workload("json", f"{s.json.json_bytes / 1e6:g} MB non-streamed JSON, call duration", "ms", s.json,
                     lambda r: r["dur_p50"], 1.2, True),
            Workload("stall", f"stall: {s.stall.conns} streams beside {s.json.json_bytes / 1e6:g} MB JSON calls, "
                     "worst event gap", "ms gap max", s.stall, lambda r: r["gap_max"], STALL_LIMIT_MS, True,
                     beside=Load(conns=1, calls=s.json.calls * 2, json_bytes=s.json.json_bytes), added=True),
            Workload("short", f"short streamed calls ({s.short.n} events), {s.short.conns} clients", "calls/s",
                     s.short, lambda r: _per(r["calls_ok"], r["wall_s"]), 0.92, False, rounds=s.short_rounds)]
    return out


# Before measuring: connections, imports, the relay's first DB writes.
WARM_UP = Workload("warm-up", "warm-up", "", Load(conns=2, calls=2, n=20, ms=0), lambda r: None, 0, True)


def memory_workload(s: StreamSizes) -> Workload:
    return Workload("memory", f"memory per stream, {s.memory.conns} streams held open", "KiB/stream", s.memory,
                    lambda r: (r["rss_peak_kb"] - r["rss_before_kb"]) / s.memory.conns, 1.5, True)


def fleet_workload(s: StreamSizes) -> Workload:
    return Workload("fleet", f"two relays behind HAProxy vs one, {s.fleet.conns} streams", "events/s", s.fleet,
                    lambda r: r["events_per_s"], 1.6, False)


@dataclass
class Target:
    name: str
    make: Callable[[], list[RelayProcess]]  # its proxy processes, not started (fresh ones on restart)
    source: str | None = None  # relays: their codex_source, to count their rows
    db_url: str | None = None
    procs: list[RelayProcess] = field(default_factory=list)
    port: int = 0  # where loadgen connects: the proxy's, or a load balancer's in front
    lb_pid: int | None = None  # HAProxy: its CPU is reported apart
    answered: int = 0  # HTTP 200 answers: each must become one recorded invocation
    runs: dict[str, list[dict]] = field(default_factory=dict)  # workload key -> one run per round

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.procs if p.proc is not None]

    def spawn(self) -> None:
        self.procs = self.make()
        for p in self.procs:
            p.spawn()

    def ready(self) -> None:
        for p in self.procs:
            p.ready()
        self.port = self.port or self.procs[0].port

    def stop(self) -> None:
        """SIGTERM: a relay flushes its records before it exits."""
        for p in self.procs:
            try:
                p.stop()
            finally:
                p.kill()

    def measure(self, w: Workload) -> dict:
        """One loadgen run of ``w`` with the proxy's CPU time and memory around it."""
        for p in self.procs:  # one that exited (a bad option, say) would only show as errors
            if p.proc is None or p.proc.poll() is not None:
                raise RuntimeError(f"{self.name} is not running:\n{p.output()[-2000:]}")
        pids = self.pids
        cpu0, rss0 = cpu_seconds(pids), rss_kb(pids)
        lb0 = cpu_seconds([self.lb_pid]) if self.lb_pid else 0.0
        machine0 = machine_cpu_seconds()
        with PeakRss(pids) as peak:
            side = loadgen_start(self.port, w.beside) if w.beside else None
            run = loadgen(self.port, w.load)
            if side is not None:
                run["beside"] = loadgen_result(side)
                self.answered += run["beside"]["calls_ok"]
        run["machine_cpu_s"] = round(machine_cpu_seconds() - machine0, 3)
        run["cpu_s"] = round(cpu_seconds(pids) - cpu0, 3)
        run["rss_before_kb"], run["rss_peak_kb"] = rss0, peak.peak
        if self.lb_pid:
            run["lb_cpu_s"] = round(cpu_seconds([self.lb_pid]) - lb0, 3)
        self.answered += run["calls_ok"]
        run["figure"] = w.figure(run)
        self.runs.setdefault(w.key, []).append(run)
        return run


def _start(stack: ExitStack, targets: Sequence[Target]) -> None:
    """Side by side: start-up is mostly imports. None outlives the stack."""
    stack.callback(_stop, targets)
    for t in targets:
        t.spawn()
    for t in targets:
        t.ready()


def _stop(targets: Sequence[Target]) -> None:
    """Side by side too: each relay's flush on SIGTERM takes a while."""
    threads = [threading.Thread(target=t.stop) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _restart(targets: Sequence[Target]) -> None:
    _stop(targets)
    for t in targets:
        t.port = 0
        t.spawn()
    for t in targets:
        t.ready()


def run_rounds(targets: Sequence[Target], w: Workload, rounds: int, log: Callable[[str], None],
               between: Callable[[], None] | None = None) -> None:
    """``rounds`` rounds of ``w`` on every target, the order rotating; ``between`` runs before each round
    after the first (fresh processes)."""
    for r in range(rounds):
        if r and between is not None:
            between()
        for t in rotated(targets, r):
            t.measure(w)
        log(f"  {w.key} round {r + 1}/{rounds}: " + "  ".join(
            f"{t.name} {_fmt(t.runs[w.key][-1]['figure'])}" for t in targets) + f" {w.unit}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def rows(targets: Sequence[Target], w: Workload, base: Target, judged: bool = True) -> list[dict]:
    """One row per target: median figure; against ``base``, the median of per-round ratios (the stall row:
    of per-round added ms); ``judged``: the goal judged for every target but the base."""
    out = []
    for t in targets:
        runs, base_runs = t.runs[w.key], base.runs[w.key]
        pairs = list(zip((x["figure"] for x in runs), (y["figure"] for y in base_runs), strict=True))
        row = {"workload": w.key, "title": w.title, "target": t.name, "unit": w.unit,
               "figure": median([x["figure"] for x in runs]), "figure_rounds": [x["figure"] for x in runs],
               "errors": sum(x["errors"] for x in runs), "vs": base.name, "ratio": None, "added_ms": None,
               "goal": None, "met": None}
        if t is not base:
            if w.added:
                row["added_ms"] = median([a - b if a is not None and b is not None else None for a, b in pairs])
            else:
                row["ratio"] = median([_per(a, b) if a is not None and b is not None else None
                                        for a, b in pairs])
            if judged:
                row["goal"] = f"{'≤' if w.at_most else '≥'} {w.goal:g}{' ms added' if w.added else '×'}"
                row["met"] = w.met(row["added_ms"] if w.added else row["ratio"])
        out.append(row)
    return out


def _relay(url: str, reverse: str, opts: dict[str, str], root: Path = ROOT) -> RelayProcess:
    return RelayProcess(db_url=url, reverse_target=reverse, options=opts, extra_args=QUIET, root=root)


def _relay_maker(url: str, reverse: str, opts: dict[str, str], root: Path) -> Callable[[], list[RelayProcess]]:
    """A Target's ``make`` for one relay: fresh processes on each call, with these arguments."""
    return lambda: [_relay(url, reverse, opts, root)]


@dataclass
class Fleet:
    """Workload 6's targets: one relay alone, and it with a second behind HAProxy, on one database; and two
    more relays listening on one port (bench.oneport), the bound of two relays with no balancer process."""
    db: str
    url: str
    one: Target
    two: Target
    one_port: Target


def _fleet(stack: ExitStack, tmp: Path, upstream: int, mysql_server: str | None) -> Fleet | str:
    """The fleet's targets, not started; or why there is none."""
    if not HAPROXY.exists():
        return f"{HAPROXY} not installed (./run.sh test installs Debian's haproxy when run as root)"
    db = "mariadb" if mysql_server else "sqlite"
    url = stack.enter_context(scratch_mysql(mysql_server)) if mysql_server else sqlite_url(tmp, "fleet.db")
    migrated_engine(url).dispose()  # the schema made once: two relays booting side by side would race at it
    opts = relay_options(tmp, upstream, "bench-fleet")
    reverse = f"http://127.0.0.1:{upstream}"

    def relay(i: int) -> RelayProcess:  # each its own spool, as deployed (a spool is one relay's)
        return _relay(url, reverse, opts | {"codex_spool": str(tmp / f"fleet-{i}.spool")})

    def on_shared_port(i: int, port: int) -> RelayProcess:
        r = relay(i)
        r.extra_args += ["-p", str(port)]  # after the command's own "-p 0": the last one counts
        r.argv = [sys.executable, "-m", "bench.oneport", *r.command()[1:]]
        return r

    two = Target(f"relay-{db} ×2 (haproxy)", lambda: [relay(1), relay(2)], "bench-fleet", url)
    shared = free_port()
    one_port = Target(f"relay-{db} ×2 (one port)", lambda: [on_shared_port(3, shared), on_shared_port(4, shared)],
                      "bench-fleet", url)
    return Fleet(db, url, Target(f"relay-{db} ×1", lambda: two.procs[:1], "bench-fleet", url), two, one_port)


def _run_fleet(stack: ExitStack, s: StreamSizes, base: Target, fleet: Fleet, tmp: Path,
               log: Callable[[str], None]) -> dict:
    """Workload 6 on started relays: one alone, two behind HAProxy, two on one port; ``base`` beside them."""
    w, one, two = fleet_workload(s), fleet.one, fleet.two
    one.procs, one.port = two.procs[:1], two.procs[0].port
    two.port, two.lb_pid = start_haproxy(stack, [p.port for p in two.procs], tmp)
    targets = [base, one, two, fleet.one_port]
    log(f"fleet: {', '.join(t.name for t in targets)}; {s.rounds} rounds of {s.fleet.conns} streams")
    for t in targets:
        t.measure(WARM_UP)
    run_rounds(targets, w, s.rounds, log)
    lb = [(x["lb_cpu_s"], x["events"], x["wall_s"]) for x in two.runs[w.key]]

    def cores(cpu_key: str) -> dict[str, float | None]:
        """Per target, the median of a run's ``cpu_key`` seconds per second of wall time."""
        return {t.name: median([_per(x[cpu_key], x["wall_s"]) for x in t.runs[w.key]]) for t in targets}

    # Cores the proxies used: on a small machine, what the load balancer and the load tools leave them;
    # the machine's busy cores show what that was.
    return {"db": fleet.db, "rows": rows([base, one], w, base, judged=False) + rows([two], w, one)
            + rows([fleet.one_port], w, one, judged=False),
            "runs": _runs(targets, [w]), "proxy_cores": cores("cpu_s"), "machine_cores": cores("machine_cpu_s"),
            "machine_core_count": os.cpu_count(),
            "haproxy": {"cpu_us_per_event": median([_per(c * 1e6, e) for c, e, _ in lb]),
                        "cpu_share_of_a_core": median([_per(c, t) for c, _, t in lb])}}


def _runs(targets: Sequence[Target], ws: Sequence[Workload]) -> dict:
    return {w.key: {t.name: t.runs[w.key] for t in targets} for w in ws}


def bench_streams(s: StreamSizes, *, mysql_server: str | None, compare: Sequence[Path] = (),
                  log: Callable[[str], None] = print) -> dict:
    """Every workload of the issue's table on streaming mitmdump and the relay; ``compare``: other
    checkouts' relays in the same rounds."""
    out: dict = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-")))
        upstream = start_fakeup(stack)
        reverse = f"http://127.0.0.1:{upstream}"
        relays = [("relay-sqlite", ROOT), *((f"relay-sqlite@{root.name}", root) for root in compare)]
        base = Target(BASELINE, lambda: [bare_mitmdump(reverse, stream=True)])
        targets = [base]
        for i, (name, root) in enumerate(relays):
            source, url = f"bench-streams-{i}", sqlite_url(tmp, f"streams-{i}.db")  # a source has ≤ 32 chars
            opts = relay_options(tmp, upstream, source)
            targets.append(Target(name, _relay_maker(url, reverse, opts, root), source, url))
        fleet = _fleet(stack, tmp, upstream, mysql_server)
        fleet_relays = [fleet.two, fleet.one_port] if isinstance(fleet, Fleet) else []
        # The fleet's relays boot with the others (they idle until their row): one wait for all start-ups.
        _start(stack, targets + fleet_relays)
        log(f"streams: {', '.join(t.name for t in targets)}; {s.rounds} rounds, memory {s.memory_rounds}, "
            f"short calls {s.short_rounds}")

        def fresh() -> None:
            _restart(targets)
            for t in targets:
                t.measure(WARM_UP)

        for t in targets:
            t.measure(WARM_UP)
        mem = memory_workload(s)
        run_rounds(targets, mem, s.memory_rounds, log, between=fresh)
        ws = workloads(s)
        for w in ws:
            run_rounds(targets, w, w.rounds or s.rounds, log)
        ws.insert(len(s.ceiling) + 1, mem)  # the order: memory after the ceiling
        out["rows"] = [row for w in ws for row in rows(targets, w, base)]
        out["runs"] = _runs(targets, ws)
        if isinstance(fleet, Fleet):
            out["fleet"] = _run_fleet(stack, s, base, fleet, tmp, log)
        else:
            log(f"fleet skipped: {fleet}")
            out["fleet"] = {"skipped": fleet}
        _stop([t for t in targets if t.source] + fleet_relays)  # every record flushed before the count
        out["recorded"] = {t.name: {"answered": t.answered, "recorded": count_recorded(t.db_url, t.source)}
                           for t in targets if t.db_url and t.source}
        if isinstance(fleet, Fleet):
            out["fleet"]["recorded"] = {"answered": sum(t.answered for t in [fleet.one, *fleet_relays]),
                                        "recorded": count_recorded(fleet.url, "bench-fleet")}
    return out
