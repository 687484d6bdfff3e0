"""Retention inside the relay: a thread that prunes invocation rows older than N days once a day.

The same ``store.prune.prune_older_than`` as ``./run.sh prune``: bounded batches, rollups untouched.
A failing prune is logged and tried again at the next interval; nothing stops the thread but ``stop``.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from store.engine import error_line
from store.periodic import Periodic
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
        # A batch is short: stop waits for at most one transaction.
        self._rounds = Periodic("codex-pruner", interval, self.prune_once, self._failed, at_start=True,
                                join_timeout=None)

    def start(self) -> None:
        self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()

    def prune_once(self) -> None:
        try:
            self.last = prune_older_than(self.engine, self.days, progress=self._stopping)
        except _Stopped:
            return
        if self.last.deleted:
            log.info("pruned %d invocation row(s) before %s UTC", self.last.deleted, self.last.cutoff)

    def _failed(self, e: Exception) -> None:  # an unreachable database: the next round tries again
        log.warning("prune of invocations older than %d days failed: %s", self.days, error_line(e)[:300])

    def _stopping(self, deleted: int, total: int) -> None:
        if self._rounds.stopping.is_set():  # end between batches: what was deleted stays deleted
            raise _Stopped


class _Stopped(Exception):
    pass
