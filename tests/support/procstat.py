"""CPU time and resident memory of a process under test, from Linux's /proc.

A process counts with its live descendants, so a proxy that hands work to a child process (a writer
process, say) is charged for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes and their descendants (children already reaped: cutime + cstime)."""
    ticks = 0
    for root in pids:
        for p in _tree(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            # after "pid (comm)": state is field 3, utime 14, stime 15, cutime 16, cstime 17
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / _TICK


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy, all cores together (user, nice, system, irq, softirq from
    /proc/stat; idle, I/O wait and time the hypervisor took are not counted)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # "cpu  user nice system idle iowait irq softirq steal ..."
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / _TICK


def rss_kb(pids: Iterable[int]) -> int:
    """VmRSS of these processes and their descendants, in KiB."""
    total = 0
    for root in pids:
        for p in _tree(root):
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


class PeakRss:
    """Samples ``rss_kb(pids)`` every ``interval`` s in a thread while in the ``with`` block; ``peak`` is the
    largest sample, ``before`` the first (taken on entry)."""

    def __init__(self, pids: Iterable[int], interval: float = 0.02) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_kb(self.pids))

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_kb(self.pids)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kb(self.pids))

    @property
    def growth_mib(self) -> float:
        """How much resident memory grew, at its peak, while the block ran."""
        return (self.peak - self.before) / 1024
