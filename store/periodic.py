"""One round of work every so many seconds on a background thread: the relay's health pings, node sync and
pruning each run this way."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """Calls ``work`` every ``interval`` seconds on a daemon thread named ``name`` until ``stop`` (the first round
    after one interval, or at once with ``at_start``). A round that raises goes to ``failed``; the next round runs
    anyway, so a bug or a database away for a while never ends the thread."""

    def __init__(self, name: str, interval: float, work: Callable[[], object], failed: Callable[[Exception], None],
                 *, at_start: bool = False, join_timeout: float | None = 30.0) -> None:
        self.name = name
        self.interval = interval
        self.work = work
        self.failed = failed
        self.at_start = at_start
        self.join_timeout = join_timeout  # None: wait for the round in progress, however long
        self.stopping = threading.Event()  # set by stop(): work may look at it between its steps
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout)
            self._thread = None

    def _run(self) -> None:
        if self.at_start:
            self._round()
        while not self.stopping.wait(self.interval):
            self._round()

    def _round(self) -> None:
        try:
            self.work()
        except Exception as e:
            self.failed(e)
