"""The writer thread: hooks hand records to a queue and return; this thread writes them in batches.

When the database is unreachable, batches go to the spool (store.spool) and are replayed, oldest
first, once a retry succeeds (backoff up to ``max_backoff`` seconds). A record the database refuses
for another reason (bad data) is kept in the spool's ``rejected`` table and logged, never retried
forever and never allowed to block the records behind it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from store.engine import error_line
from store.invocations import Item, apply_batch
from store.spool import Spool

log = logging.getLogger("codex.writer")

_STOP = object()
_OUTAGE_LOG_EVERY_S = 10.0


@dataclass(slots=True)
class WriterStats:
    queued: int
    spooled: int
    spool_oldest_s: float | None
    written: int
    duplicates: int
    rejected: int
    dropped: int
    batches: int
    db_ok: bool
    last_error: str | None


def is_outage(error: BaseException) -> bool:
    """Whether an error means "the database is not there" (retry later) rather than "bad data"."""
    if isinstance(error, sa.exc.DBAPIError):
        return error.connection_invalidated or isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError)
    return isinstance(error, sa.exc.TimeoutError | ConnectionError | TimeoutError)


class Writer:
    def __init__(self, engine: sa.Engine, spool: Spool | None = None, *, batch_size: int = 500,
                 linger: float = 0.05, max_backoff: float = 10.0) -> None:
        self.engine = engine
        self.spool = spool or Spool(None)
        self.batch_size = batch_size
        self.linger = linger
        self.max_backoff = max_backoff
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="codex-writer", daemon=True)
        self._idle = threading.Condition()
        self._pending = 0  # submitted, not yet written or spooled
        self._written = self._duplicates = self._rejected = self._dropped = self._batches = 0
        self._db_ok = True
        self._last_error: str | None = None
        self._backoff = 0.5
        self._retry_at = 0.0
        self._last_outage_log = 0.0

    # -- called from any thread --------------------------------------------------------------------
    def start(self) -> None:
        if self.spool.count:
            log.info("spool %s holds %d record(s) from an earlier run: writing them first",
                     self.spool.path, self.spool.count)
        self._thread.start()

    def submit(self, item: Item) -> None:
        """Queue one record; never blocks on the database."""
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted record is written (or spooled); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending or (self.spool.count and self._db_ok):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is None else min(left, 0.5))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued; what the database cannot take now stays in the spool for next time."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self.spool.count:
            log.warning("%d record(s) left in spool %s: they are written at the next start",
                        self.spool.count, self.spool.path or "(memory: lost)")
        self.spool.close()
        self.engine.dispose()

    def stats(self) -> WriterStats:
        return WriterStats(queued=self._queue.qsize(), spooled=self.spool.count,
                           spool_oldest_s=self.spool.oldest_age() if self.spool.count else None,
                           written=self._written, duplicates=self._duplicates, rejected=self._rejected,
                           dropped=self._dropped, batches=self._batches, db_ok=self._db_ok,
                           last_error=self._last_error)

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take(timeout=self._wait_time())
            try:
                if self.spool.count and time.monotonic() >= self._retry_at:
                    self._replay()
                if batch:
                    if self.spool.count:  # keep the order: new records go behind the journaled ones
                        self._to_spool(batch)
                    else:
                        self._write(batch)
            except Exception:  # the thread must outlive any bug: a dead writer would lose everything after
                log.exception("writer error; %d record(s) of this batch may be lost", len(batch))
                self._retry_at = time.monotonic() + self.max_backoff
            finally:
                if batch:
                    self._done(len(batch))
        # Last chance for the journal before the process ends.
        if self.spool.count:
            self._retry_at = 0.0
            self._replay()
        with self._idle:
            self._idle.notify_all()

    def _wait_time(self) -> float:
        if self.spool.count:
            return max(0.01, min(1.0, self._retry_at - time.monotonic()))
        return 1.0

    def _take(self, timeout: float) -> tuple[list[Item], bool]:
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.batch_size:
            try:
                # Returns at once while items are waiting, even after the deadline.
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _write(self, batch: Sequence[Item]) -> None:
        try:
            self._apply(batch)
        except Exception as e:
            if is_outage(e):
                self._outage(e)
                self._to_spool(batch)
            else:
                self._one_by_one(batch, e)

    def _apply(self, batch: Sequence[Item]) -> None:
        with self.engine.begin() as conn:
            result = apply_batch(conn, batch)
        self._written += result.inserted
        self._duplicates += result.duplicates
        self._batches += 1
        if not self._db_ok:
            log.info("database is back: writing resumed")
        self._db_ok = True
        self._backoff = 0.5

    def _one_by_one(self, batch: Sequence[Item], error: Exception) -> None:
        log.warning("a batch of %d was refused (%s): writing its records one by one", len(batch), _error_text(error))
        for item in batch:
            try:
                self._apply([item])
            except Exception as e:
                if is_outage(e):
                    self._outage(e)
                    self._to_spool([item])
                    continue
                self._rejected += 1
                self.spool.reject(item, _error_text(e))
                log.error("record %s refused by the database, kept in the spool's rejected table: %s",
                          getattr(item, "invoke_id", item), _error_text(e))

    def _replay(self) -> None:
        while self.spool.count:
            ids, items = self.spool.peek(self.batch_size)
            try:
                self._apply(items)
            except Exception as e:
                if is_outage(e):
                    self._outage(e)
                    return
                self._one_by_one(items, e)
            self.spool.remove(ids)
            with self._idle:
                self._idle.notify_all()
        log.info("spool drained")

    def _to_spool(self, batch: Sequence[Item]) -> None:
        dropped = self.spool.append(batch)
        if dropped:
            self._dropped += dropped
            log.error("spool full (%d records): %d record(s) dropped", self.spool.max_items, dropped)

    def _outage(self, error: Exception) -> None:
        now = time.monotonic()
        self._last_error = _error_text(error)
        if self._db_ok or now - self._last_outage_log >= _OUTAGE_LOG_EVERY_S:
            age = self.spool.oldest_age()
            log.warning("database unreachable (%s): spooling to %s; %d record(s) waiting, oldest %s",
                        self._last_error, self.spool.path or "memory", self.spool.count,
                        f"{age:.0f} s" if age is not None else "-")
            self._last_outage_log = now
        self._db_ok = False
        self._retry_at = now + self._backoff
        self._backoff = min(self.max_backoff, self._backoff * 2)



def _error_text(error: BaseException) -> str:
    return error_line(error)[:300]
