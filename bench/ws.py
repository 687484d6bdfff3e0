"""Responses over WebSocket (issue 28.1): the relay against bare ``mitmdump`` relaying the same sockets.

A fake node and the load generator are ``bench.wsload`` processes (Python: the C tools speak no WebSocket);
only the proxy processes' CPU (utime + stime from /proc, a relay with its writer child) and resident memory are
measured. Both proxies run ``--set flow_detail=0``; the relay on SQLite with client keys, every turn a row.
Rounds are interleaved, the targets' order rotating; a ratio is taken per round (per window for ``small``),
then the median.

- small: many small messages per socket (a ~300 B create, 7 events back per turn); CPU per message (both
  directions). Goal ≤ 1.10× mitmdump. Both proxies are loaded at once, each by its own client with the same
  sockets and messages, and both are read in the same instants: every ``window_s`` seconds each proxy's CPU
  (/proc) and its client's message count; a window's ratio is the relay's CPU per message ÷ mitmdump's in those
  seconds. A burst of other work on a shared machine then lands on both alike; the figure is the median of the
  windows' ratios over all rounds, with their spread.
- open: memory per open socket: ``open_sockets`` sockets, one turn each, held open and idle; RSS then minus
  RSS before, per socket (fresh processes). Goal ≤ 1.2×.
- long: one long socket with large inputs: RSS at turn ``long_from`` and at its last turn (fresh processes,
  the socket open and idle at each), growth per turn between them; the relay's must be flat (≤ 2 % of the
  input per turn), where mitmdump keeps every message of a socket for its life. CPU per turn shown beside.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.ctools import start_listener
from bench.http import CLIENT_KEY, QUIET, count_recorded, relay_options
from bench.report import table
from bench.rounds import median, rotated
from bench.scratch import sqlite_url
from tests.support.procstat import cpu_seconds, rss_kb
from tests.support.relayproc import ROOT, RelayProcess

BASELINE = "mitmdump"
LOAD_TIMEOUT_S = 600


@dataclass(frozen=True)
class WsSizes:
    rounds: int
    small: tuple[int, int, int]  # sockets per proxy, windows per round, input bytes
    window_s: float  # one window of the small workload: both proxies' CPU and messages over it
    open_sockets: int
    long: tuple[int, int]  # turns, input bytes (one socket)
    long_from: int  # the turn growth is measured from


FULL = WsSizes(rounds=3, small=(20, 30, 300), window_s=2.0, open_sockets=200, long=(200, 200_000), long_from=50)
QUICK = WsSizes(rounds=1, small=(2, 2, 300), window_s=0.3, open_sockets=4, long=(8, 20_000), long_from=2)
GOALS = {"small": 1.10, "open": 1.2}
FLAT_SHARE = 0.02  # the long socket's growth per turn, at most this share of a turn's input


class Load:
    """One ``bench.wsload load`` process; ``until_checkpoint()`` reads up to its next pause."""

    def __init__(self, port: int, sockets: int, turns: int, input_bytes: int, checkpoints: Sequence[int] = (),
                 hold: bool = False, live: bool = False) -> None:
        argv = [sys.executable, "-m", "bench.wsload", "load", str(port), str(sockets), str(turns), str(input_bytes),
                "--key", CLIENT_KEY, "--checkpoints", ",".join(map(str, checkpoints))] + (["--hold"] if hold else [])
        argv += ["--live"] if live else []
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _line(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"bench.wsload load exited {self.proc.returncode} early")
        return json.loads(line)

    def until_checkpoint(self) -> int:
        return self._line()["at"]

    def go(self, word: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def messages(self) -> int:
        """A ``--live`` load's messages so far."""
        self.go("count")
        return self._line()["messages"]

    def result(self) -> dict:
        out = self._line()
        self.proc.wait(LOAD_TIMEOUT_S)
        return out


@dataclass
class Target:
    name: str
    make: Callable[[], RelayProcess]
    proc: RelayProcess | None = None
    turns: int = 0  # turns answered by this target's relays: each must be a row
    runs: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None and self.proc.proc is not None
        return [self.proc.proc.pid]

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    def run(self, key: str, load: Load, at: Callable[[int], None] | None = None) -> dict:
        """Drive ``load`` to its end with this target's CPU around it; ``at(k)`` at each checkpoint."""
        cpu0 = cpu_seconds(self.pids)
        while True:
            assert load.proc.stdout is not None
            line = load._line()
            if "at" not in line:
                break
            if at is not None:
                at(line["at"])
            load.go()
        load.proc.wait(LOAD_TIMEOUT_S)
        line["cpu_s"] = round(cpu_seconds(self.pids) - cpu0, 3)
        self.turns += line["turns"]
        self.runs.setdefault(key, []).append(line)
        return line


def _start(targets: Sequence[Target]) -> None:
    for t in targets:
        t.proc = t.make().spawn()
    for t in targets:
        assert t.proc is not None
        t.proc.ready()


def _stop(targets: Sequence[Target]) -> None:
    def stop(p: RelayProcess) -> None:
        try:
            p.stop()
        finally:
            p.kill()
    threads = [threading.Thread(target=stop, args=(t.proc,)) for t in targets if t.proc is not None]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _warm(t: Target) -> None:
    t.run("warm-up", Load(t.port, 2, 3, 300))


def _open(t: Target, s: WsSizes) -> None:
    before = rss_kb(t.pids)
    held: dict[int, int] = {}
    run = t.run("open", Load(t.port, s.open_sockets, 1, 300, hold=True),
                lambda k: held.__setitem__(k, rss_kb(t.pids)))
    run["rss_before_kb"], run["rss_held_kb"] = before, held[1]
    run["figure"] = (held[1] - before) / s.open_sockets


def _small(targets: Sequence[Target], s: WsSizes, r: int) -> None:
    """Both proxies under the same load in the same seconds, read window by window (the module's ``small``)."""
    sockets, windows, size = s.small
    loads = [(t, Load(t.port, sockets, 0, size, live=True)) for t in targets]
    per: list[list[float | None]] = [[] for _ in targets]  # µs CPU per message, window by window

    def sample(k: int) -> list[tuple[float, int]]:
        # every proxy's CPU, then every client's count, in an order turning per window: neither goes first always
        order = rotated(loads, k)
        cpu = {t.name: cpu_seconds(t.pids) for t, _ in order}
        msgs = {t.name: load.messages() for t, load in order}
        return [(cpu[t.name], msgs[t.name]) for t, _ in loads]

    try:
        sample(0)  # both clients answer: they run; the first window (sockets opening) is not measured
        time.sleep(s.window_s)
        prev = sample(1)
        for k in range(windows):
            time.sleep(s.window_s)
            now = sample(k)
            for i, ((c0, m0), (c1, m1)) in enumerate(zip(prev, now, strict=True)):
                per[i].append((c1 - c0) * 1e6 / (m1 - m0) if m1 > m0 else None)
            prev = now
    finally:
        for _, load in loads:
            load.go("stop")
    for (t, load), figures in zip(loads, per, strict=True):
        run = load.result()
        t.turns += run["turns"]
        run["round"], run["window_s"], run["windows"] = r, s.window_s, figures
        run["figure"] = median(figures)
        t.runs.setdefault("small", []).append(run)


def _long(t: Target, s: WsSizes) -> None:
    turns, size = s.long
    rss: dict[int, int] = {}
    run = t.run("long", Load(t.port, 1, turns, size, checkpoints=[s.long_from], hold=True),
                lambda k: rss.__setitem__(k, rss_kb(t.pids)))
    run["rss_kb_at"] = rss
    run["figure"] = (rss[turns] - rss[s.long_from]) / (turns - s.long_from)  # KiB per turn
    run["cpu_ms_per_turn"] = run["cpu_s"] * 1e3 / run["turns"] if run["turns"] else None


WORKLOADS = {  # key: title, unit
    "small": "CPU per message, both at once, {0[0]} sockets each, {0[1]} windows of {4:g} s a round "
             "(~{0[2]} B creates, 7 events each)",
    "open": "memory per open socket, {1} sockets held open",
    "long": "long socket: memory growth per turn, turns {3}–{2[0]} of {2[1]:,} B inputs",
}
UNITS = {"small": "µs CPU/message", "open": "KiB/socket", "long": "KiB/turn"}


def bench_ws(s: WsSizes, *, log: Callable[[str], None] = print) -> dict:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-ws-")))
        up = start_listener(stack, [sys.executable, "-m", "bench.wsload", "serve"], cwd=ROOT)
        reverse = f"http://127.0.0.1:{up}"
        source = "bench-ws"
        # A database per phase: the writer child's SQLite page cache grows with the file (up to its cap), which
        # in a database shared by all rounds showed as a later round's long socket growing more per turn.
        urls: list[str] = []
        opts = relay_options(tmp, up, source)
        targets = [
            Target(BASELINE, lambda: RelayProcess(db_url=None, addon=False, reverse_target=reverse,
                                                  extra_args=QUIET)),
            Target("relay-sqlite", lambda: RelayProcess(db_url=urls[-1], reverse_target=reverse, options=opts,
                                                        extra_args=QUIET))]
        stack.callback(_stop, targets)
        log(f"ws: {', '.join(t.name for t in targets)}; {s.rounds} rounds")
        for r in range(s.rounds):
            order = rotated(targets, r)
            for phase in (_open, _long):  # each on fresh processes: memory is the subject
                _stop(targets)
                urls.append(sqlite_url(tmp, f"ws-{r}-{phase.__name__.strip('_')}.db"))
                _start(targets)
                for t in order:
                    _warm(t)
                    phase(t, s)
                if phase is _open:  # warm processes, their open sockets closed
                    _small(order, s, r)
            log(f"  ws round {r + 1}/{s.rounds}: " + "; ".join(
                f"{k} " + " ".join(f"{t.name} {t.runs[k][-1]['figure']:,.1f}" for t in targets) for k in UNITS))
        _stop(targets)
        base, relay = targets
        rows = []
        for key in UNITS:
            title = WORKLOADS[key].format(s.small, s.open_sockets, s.long, s.long_from, s.window_s)
            for t in targets:
                figs = [x["figure"] for x in t.runs[key]]
                if key == "small":  # a ratio per window: both proxies measured over the same seconds
                    ratios = _ratios([w for x in t.runs[key] for w in x["windows"]],
                                     [w for x in base.runs[key] for w in x["windows"]])
                else:
                    ratios = _ratios(figs, [x["figure"] for x in base.runs[key]])
                row = {"workload": key, "title": title, "target": t.name, "unit": UNITS[key],
                       "figure": median(figs), "figure_rounds": figs, "vs": BASELINE,
                       "ratio": median(ratios) if t is not base else None,
                       "errors": sum(x["errors"] for x in t.runs[key]), "goal": None, "met": None}
                if key == "small" and t is not base:
                    row["ratio_spread"] = spread(ratios)
                    row["ratio_rounds"] = [median(_ratios(x["windows"], b["windows"]))
                                           for x, b in zip(t.runs[key], base.runs[key], strict=True)]
                if key == "long":
                    row["cpu_ms_per_turn"] = median([x["cpu_ms_per_turn"] for x in t.runs[key]])
                if t is not base:
                    if key in GOALS:
                        row["goal"], row["met"] = f"≤ {GOALS[key]:.2f}×", (
                            row["ratio"] is not None and row["ratio"] <= GOALS[key])
                    else:
                        bound = FLAT_SHARE * s.long[1] / 1024
                        row["goal"] = f"≤ {bound:,.1f} KiB/turn"
                        row["met"] = row["figure"] is not None and row["figure"] <= bound
                rows.append(row)
        recorded = {"answered": relay.turns, "recorded": sum(count_recorded(u, source) for u in urls)}
        return {"rows": rows, "runs": {t.name: t.runs for t in targets}, "recorded": recorded}


def _ratios(figures: Sequence[float | None], base: Sequence[float | None]) -> list[float | None]:
    return [a / b if a is not None and b else None for a, b in zip(figures, base, strict=True)]


def spread(values: Sequence[float | None]) -> dict[str, float | int] | None:
    """How far the values lie apart: their count, least, 10th/25th/75th/90th percentile and largest."""
    kept = sorted(v for v in values if v is not None)
    if not kept:
        return None
    q = statistics.quantiles(kept, n=20, method="inclusive") if len(kept) > 1 else [kept[0]] * 19
    return {"n": len(kept), "min": round(kept[0], 3), "p10": round(q[1], 3), "p25": round(q[4], 3),
            "p75": round(q[14], 3), "p90": round(q[17], 3), "max": round(kept[-1], 3)}


def ws_tables(r: dict) -> str:
    rows = [[x["title"] if x["target"] == BASELINE else "", x["target"], x["figure"], x["unit"],
             "" if x["ratio"] is None else f"{x['ratio']:.3f}×",
             x.get("cpu_ms_per_turn"), x["errors"], x["goal"] or "", x["met"]] for x in r["rows"]]
    rec = r["recorded"]
    out = table(f"Responses over WebSocket vs mitmdump (bench.wsload; median of rounds; vs: median of per-round "
                f"ratios, of per-window ratios for CPU per message); relay rows {rec['recorded']:,} of "
                f"{rec['answered']:,} turns",
                ["workload", "target", "figure", "unit", "vs mitmdump", "CPU ms/turn", "errors", "goal", "met"],
                rows)
    for x in r["rows"]:
        if (sp := x.get("ratio_spread")) is not None:
            out += (f"CPU per message, {x['target']} ÷ {x['vs']} over {sp['n']} windows: median {x['ratio']:.3f}×, "
                    f"10–90 % {sp['p10']:.3f}–{sp['p90']:.3f}, quartiles {sp['p25']:.3f}–{sp['p75']:.3f}, "
                    f"range {sp['min']:.3f}–{sp['max']:.3f}; per round "
                    + ", ".join(f"{v:.3f}" if v is not None else "-" for v in x["ratio_rounds"]) + "\n")
    return out
