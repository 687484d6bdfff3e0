"""Retention inside the relay: a thread that prunes invocation rows older than N days once a day.

The same ``store.prune.prune_older_than`` as ``./run.sh prune``: bounded batches, rollups untouched.
A failing prune is logged and tried again at the next interval; nothing stops the thread but ``stop``.
"""

from __future__ import annotations

import logging
import threading

import sqlalchemy as sa

from store.engine import error_line
from store.prune import PruneResult, prune_older_than

log = logging.getLogger("codex.retention")

DAY = 86400.0


class Pruner:
    """Prunes at start, then every ``interval`` seconds, until ``stop``."""

    def __init__(self, engine: sa.Engine, days: int, interval: float = DAY) -> None:
        self.engine = engine
        self.days = days
        self.interval = interval
        self.last: PruneResult | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codex-pruner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()  # a batch is short: at most one transaction to wait for

    def prune_once(self) -> None:
        try:
            self.last = prune_older_than(self.engine, self.days, progress=self._stopping)
        except _Stopped:
            return
        except Exception as e:  # an unreachable database: the next round tries again
            log.warning("prune of invocations older than %d days failed: %s", self.days, error_line(e)[:300])
            return
        if self.last.deleted:
            log.info("pruned %d invocation row(s) before %s UTC", self.last.deleted, self.last.cutoff)

    def _stopping(self, deleted: int, total: int) -> None:
        if self._stop.is_set():  # end between batches: what was deleted stays deleted
            raise _Stopped

    def _run(self) -> None:
        while not self._stop.is_set():
            self.prune_once()
            self._stop.wait(self.interval)


class _Stopped(Exception):
    pass
