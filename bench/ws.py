"""Responses over WebSocket (issue 28.1): the relay against bare ``mitmdump`` relaying the same sockets.

A fake node and the load generator are ``bench.wsload`` processes (Python: the C tools speak no WebSocket);
only the proxy processes' CPU (utime + stime from /proc, a relay with its writer child) and resident memory are
measured. Both proxies run ``--set flow_detail=0``; the relay on SQLite with client keys, every turn a row.
Rounds are interleaved, the targets' order rotating; a ratio is taken per round, then the median.

- small: many small messages per socket: sockets of ``small`` turns each (a ~300 B create, 7 events back);
  CPU per message (both directions). Goal ≤ 1.10× mitmdump.
- open: memory per open socket: ``open_sockets`` sockets, one turn each, held open and idle; RSS then minus
  RSS before, per socket (fresh processes). Goal ≤ 1.2×.
- long: one long socket with large inputs: RSS at turn ``long_from`` and at its last turn (fresh processes,
  the socket open and idle at each), growth per turn between them; the relay's must be flat (≤ 2 % of the
  input per turn), where mitmdump keeps every message of a socket for its life. CPU per turn shown beside.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
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
    small: tuple[int, int, int]  # sockets, turns each, input bytes
    open_sockets: int
    long: tuple[int, int]  # turns, input bytes (one socket)
    long_from: int  # the turn growth is measured from


FULL = WsSizes(rounds=3, small=(20, 100, 300), open_sockets=200, long=(200, 200_000), long_from=50)
QUICK = WsSizes(rounds=1, small=(2, 5, 300), open_sockets=4, long=(8, 20_000), long_from=2)
GOALS = {"small": 1.10, "open": 1.2}
FLAT_SHARE = 0.02  # the long socket's growth per turn, at most this share of a turn's input


class Load:
    """One ``bench.wsload load`` process; ``until_checkpoint()`` reads up to its next pause."""

    def __init__(self, port: int, sockets: int, turns: int, input_bytes: int, checkpoints: Sequence[int] = (),
                 hold: bool = False) -> None:
        argv = [sys.executable, "-m", "bench.wsload", "load", str(port), str(sockets), str(turns), str(input_bytes),
                "--key", CLIENT_KEY, "--checkpoints", ",".join(map(str, checkpoints))] + (["--hold"] if hold else [])
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

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        out = self._line()
        self.proc.wait(LOAD_TIMEOUT_S)
        return out


@dataclass
class Target:
    name: str
    make: Callable[[], RelayProcess]
    source: str | None = None
    db_url: str | None = None
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


def _small_and_open(t: Target, s: WsSizes) -> None:
    before = rss_kb(t.pids)
    held: dict[int, int] = {}
    run = t.run("open", Load(t.port, s.open_sockets, 1, 300, hold=True),
                lambda k: held.__setitem__(k, rss_kb(t.pids)))
    run["rss_before_kb"], run["rss_held_kb"] = before, held[1]
    run["figure"] = (held[1] - before) / s.open_sockets
    sockets, turns, size = s.small
    run = t.run("small", Load(t.port, sockets, turns, size))
    run["figure"] = run["cpu_s"] * 1e6 / run["messages"] if run["messages"] else None


def _long(t: Target, s: WsSizes) -> None:
    turns, size = s.long
    rss: dict[int, int] = {}
    run = t.run("long", Load(t.port, 1, turns, size, checkpoints=[s.long_from], hold=True),
                lambda k: rss.__setitem__(k, rss_kb(t.pids)))
    run["rss_kb_at"] = rss
    run["figure"] = (rss[turns] - rss[s.long_from]) / (turns - s.long_from)  # KiB per turn
    run["cpu_ms_per_turn"] = run["cpu_s"] * 1e3 / run["turns"] if run["turns"] else None


WORKLOADS = {  # key: title, unit
    "small": "CPU per message, {0[0]} sockets × {0[1]} turns (~{0[2]} B creates, 7 events each)",
    "open": "memory per open socket, {1} sockets held open",
    "long": "long socket: memory growth per turn, turns {3}–{2[0]} of {2[1]:,} B inputs",
}
UNITS = {"small": "µs CPU/message", "open": "KiB/socket", "long": "KiB/turn"}


def bench_ws(s: WsSizes, *, log: Callable[[str], None] = print) -> dict:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-ws-")))
        up = start_listener(stack, [sys.executable, "-m", "bench.wsload", "serve"], cwd=ROOT)
        reverse = f"http://127.0.0.1:{up}"
        url, source = sqlite_url(tmp, "ws.db"), "bench-ws"
        opts = relay_options(tmp, up, source)
        targets = [
            Target(BASELINE, lambda: RelayProcess(db_url=None, addon=False, reverse_target=reverse,
                                                  extra_args=QUIET)),
            Target("relay-sqlite", lambda: RelayProcess(db_url=url, reverse_target=reverse, options=opts,
                                                        extra_args=QUIET), source, url)]
        stack.callback(_stop, targets)
        log(f"ws: {', '.join(t.name for t in targets)}; {s.rounds} rounds")
        for r in range(s.rounds):
            order = rotated(targets, r)
            for phase in (_small_and_open, _long):  # each on fresh processes: memory is the subject
                _stop(targets)
                _start(targets)
                for t in order:
                    _warm(t)
                    phase(t, s)
            log(f"  ws round {r + 1}/{s.rounds}: " + "; ".join(
                f"{k} " + " ".join(f"{t.name} {t.runs[k][-1]['figure']:,.1f}" for t in targets) for k in UNITS))
        _stop(targets)
        base, relay = targets
        rows = []
        for key in UNITS:
            title = WORKLOADS[key].format(s.small, s.open_sockets, s.long, s.long_from)
            for t in targets:
                figs = [x["figure"] for x in t.runs[key]]
                ratios = [a / b if b else None for a, b in zip(figs, (x["figure"] for x in base.runs[key]),
                                                                 strict=True)]
                row = {"workload": key, "title": title, "target": t.name, "unit": UNITS[key],
                       "figure": median(figs), "figure_rounds": figs, "vs": BASELINE,
                       "ratio": median(ratios) if t is not base else None,
                       "errors": sum(x["errors"] for x in t.runs[key]), "goal": None, "met": None}
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
        recorded = {"answered": relay.turns, "recorded": count_recorded(url, source)}
        return {"rows": rows, "runs": {t.name: t.runs for t in targets}, "recorded": recorded}


def ws_tables(r: dict) -> str:
    rows = [[x["title"] if x["target"] == BASELINE else "", x["target"], x["figure"], x["unit"],
             "" if x["ratio"] is None else f"{x['ratio']:.3f}×",
             x.get("cpu_ms_per_turn"), x["errors"], x["goal"] or "", x["met"]] for x in r["rows"]]
    rec = r["recorded"]
    return table(f"Responses over WebSocket vs mitmdump (bench.wsload; median of rounds; vs: median of per-round "
                 f"ratios); relay rows {rec['recorded']:,} of {rec['answered']:,} turns",
                 ["workload", "target", "figure", "unit", "vs mitmdump", "CPU ms/turn", "errors", "goal", "met"],
                 rows)
