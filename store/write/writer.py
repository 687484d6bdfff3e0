"""The writer: records handed to a queue are written in batches by its thread (in the writer process,
``store.write.process``; in the relay's own process for a database in its memory or with
``codex_writer_process`` off). ``RecordWriter`` is what the relay may ask of either.

When the database is unreachable, batches go to the spool (store.write.journal) and are replayed, oldest
first, once a retry succeeds (backoff up to ``max_backoff`` seconds). A record the database refuses
for its own content (too large, data too long, a bad value) is found by halving its batch until it is
alone, kept in the spool's ``rejected`` table and logged: never retried forever, never allowed to block
the records around it. A record that can be neither written nor journaled is counted ``lost`` and
logged as an error, never hidden.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from store.engine import error_line
from store.records import Item
from store.write.batch import apply_batch
from store.write.journal import Spool

log = logging.getLogger("codex.writer")

STOP = object()  # put on a writer's queue: write what is before it, then end
_OUTAGE_LOG_EVERY_S = 10.0
# MySQL client errors "server has gone away" / "lost connection": the server went away, or it dropped
# this connection because of the statement (MariaDB answers a statement over max_allowed_packet so).
_DROPPED = frozenset({2006, 2013, 2055})
# MySQL server errors about the values of a statement that pymysql raises as OperationalError:
# packet too large, row size too large, incorrect value.
_REFUSED_VALUES = frozenset({1118, 1153, 1292})


@dataclass(slots=True)
class WriterStats:
    queued: int
    spooled: int
    spool_oldest_s: float | None
    written: int
    duplicates: int
    rejected: int
    lost: int  # neither written nor journaled (journal full or failing)
    batches: int
    db_ok: bool
    last_error: str | None
    stalled: bool = False  # the writer process sends nothing: its records go to the relay's journal
    stalls: int = 0  # times a stalled writer process was replaced


class RecordWriter(Protocol):
    """The writer's contract with the relay, kept by ``Writer`` (a thread) and ``store.write.process.WriterProcess``
    (a child process). Every record submitted is settled once: written (an invocation exactly once), kept in
    a journal for later, set aside as refused by the database, or counted ``lost`` and logged."""

    def submit(self, item: Item) -> None:
        """Queue one record. Called on the proxy's event loop: never blocks on the database or a child."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is settled and no journal waits on a database that
        answers; False when ``timeout`` passed first."""

    def close(self, timeout: float = 30.0) -> None:
        """Settle what is queued and stop, within about ``timeout``: what the database cannot take now stays
        journaled for the next start."""

    def stats(self) -> WriterStats:
        """Counts and health, for the admin page, the alerts and ``/metrics``: cheap, never the database."""


def is_outage(error: BaseException) -> bool:
    """Whether an error means "the database is not there" (retry later) rather than "bad data"."""
    if isinstance(error, sa.exc.DBAPIError):
        if _mysql_errno(error) in _REFUSED_VALUES:
            return False
        return error.connection_invalidated or isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError)
    return isinstance(error, sa.exc.TimeoutError | ConnectionError | TimeoutError)


def dropped_connection(error: BaseException) -> bool:
    """Whether the server dropped the connection under a statement (not a timeout): an outage, or
    MariaDB's answer to a statement too large. Only asking the server again tells which."""
    if not isinstance(error, sa.exc.DBAPIError) or isinstance(getattr(error.orig, "__context__", None), TimeoutError):
        return False  # a timeout: a frozen or overloaded server, an outage either way
    return error.connection_invalidated or _mysql_errno(error) in _DROPPED


def _mysql_errno(error: sa.exc.DBAPIError) -> int | None:
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class Writer:
    def __init__(self, engine: sa.Engine, spool: Spool | None = None, *, batch_size: int = 500,
                 linger: float = 0.05, max_backoff: float = 10.0) -> None:
        self.engine = engine
        self.spool = spool or Spool(None)
        self.batch_size = batch_size
        self.linger = linger
        self.max_backoff = max_backoff
        # A SimpleQueue: put is one C call (the hand-off runs on the proxy's event loop for every record).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()  # ends a linger early: close() must not wait it out
        self._thread = threading.Thread(target=self._run, name="codex-writer", daemon=True)
        self._idle = threading.Condition()
        self._pending = 0  # submitted, not yet written or spooled
        self._ended = False
        self._written = self._duplicates = self._rejected = self._lost = self._batches = 0
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
        self._expect(1)
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted record is written (or journaled, or counted lost); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending or (self.spool.count and self._db_ok):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is None else min(left, 0.5))
        return True

    def finish(self, timeout: float = 30.0) -> None:
        """Write what is queued and end the thread; the spool stays open (``stats`` still reads it)."""
        if self._thread.is_alive():
            self._queue.put(STOP)
            self._stopping.set()
            self._thread.join(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued; what the database cannot take now stays in the spool for next time."""
        self.finish(timeout)
        if self.spool.count and self.spool.path:
            log.warning("%d record(s) left in spool %s: they are written at the next start",
                        self.spool.count, self.spool.path)
        elif self.spool.count:
            self._lose(self.spool.count, "the database is unreachable and the journal is in memory")
        self.spool.close()
        self.engine.dispose()

    @property
    def pending(self) -> int:
        """Records submitted and not yet written, journaled, set aside or counted lost (oldest first)."""
        return self._pending

    @property
    def ended(self) -> bool:
        """Whether the thread has finished: nothing more will be written."""
        return self._ended

    def wait_progress(self, timeout: float) -> None:
        """Block until records were settled or the journal moved, or ``timeout`` passed; not once ended."""
        with self._idle:
            if not self._ended:
                self._idle.wait(timeout)

    def stats(self) -> WriterStats:
        return WriterStats(queued=self._pending, spooled=self.spool.count,
                           spool_oldest_s=self.spool.oldest_age() if self.spool.count else None,
                           written=self._written, duplicates=self._duplicates, rejected=self._rejected,
                           lost=self._lost, batches=self._batches, db_ok=self._db_ok,
                           last_error=self._last_error)

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take(timeout=self._wait_time())
            if self.spool.count and time.monotonic() >= self._retry_at:
                self._replay()
            if not batch:
                continue
            try:
                if self.spool.count:  # keep the order: new records go behind the journaled ones
                    self._to_spool(batch)
                else:
                    self._write(batch)
            except Exception as e:  # the thread must outlive any bug: a dead writer would lose everything after
                log.exception("writer error")
                self._lose(len(batch), f"writer error: {_error_text(e)}")
            finally:
                self._done(len(batch))
        # Last chance for the journal before the process ends.
        if self.spool.count:
            self._retry_at = 0.0
            self._replay()
        with self._idle:
            self._ended = True
            self._idle.notify_all()

    def _wait_time(self) -> float:
        if self.spool.count:
            return max(0.01, min(1.0, self._retry_at - time.monotonic()))
        return 1.0

    def _take(self, timeout: float) -> tuple[list[Item], bool]:
        """The next batch (empty after ``timeout``), and whether ``STOP`` was taken."""
        return take_batch(self._queue, timeout, self.linger, self.batch_size, self._stopping)

    def _expect(self, n: int) -> None:
        """``n`` more records were submitted: ``flush`` waits for them."""
        with self._idle:
            self._pending += n

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _write(self, batch: Sequence[Item]) -> None:
        left = self._settle(batch)
        if left:
            self._to_spool(left)

    def _settle(self, batch: Sequence[Item]) -> Sequence[Item]:
        """Write ``batch``, setting aside each record the database refuses for its content; returns the
        records not written because the database went away (a tail of ``batch``)."""
        try:
            self._apply(batch)
            return ()
        except Exception as e:
            if self._gone(e):
                self._outage(e)
                return batch
            if len(batch) == 1:
                self._reject(batch[0], e)
                return ()
            log.debug("a batch of %d was refused (%s): halving it", len(batch), _error_text(e))
        # Halves, in order: about two transactions per halving to find one offender among many.
        mid = len(batch) // 2
        left = self._settle(batch[:mid])
        if left:
            return [*left, *batch[mid:]]
        return self._settle(batch[mid:])

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

    def _gone(self, error: Exception) -> bool:
        """Whether ``error`` means the database is away (journal, retry later), not refusing this data."""
        if dropped_connection(error):
            return not self._reachable()
        return is_outage(error)

    def _reachable(self) -> bool:
        """Whether the database answers now (the pool's pre-ping replaces a dead connection)."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        return True

    def _reject(self, item: Item, error: Exception) -> None:
        reason = _error_text(error)
        if dropped_connection(error):
            reason += " (dropped on this record alone while the server answered: too large?)"
        try:
            self.spool.reject(item, reason)
        except Exception as e:  # disk full, I/O error
            self._lose(1, f"refused by the database ({reason}) and the journal failed: {_error_text(e)}")
            return
        self._rejected += 1
        log.error("record %s refused by the database, kept in the spool's rejected table: %s",
                  getattr(item, "invoke_id", item), reason)

    def _replay(self) -> None:
        try:
            while self.spool.count:
                ids, items = self.spool.peek(self.batch_size)
                left = self._settle(items)
                # Written or set aside: out of the journal; what the database did not take stays.
                self.spool.remove(ids[:len(ids) - len(left)])
                with self._idle:
                    self._idle.notify_all()
                if left:
                    return
        except Exception:  # a journal that cannot be read or trimmed keeps its records for the next try
            log.exception("replaying spool %s failed", self.spool.path or "(memory)")
            self._retry_at = time.monotonic() + self.max_backoff
            return
        log.info("spool drained")

    def _to_spool(self, batch: Sequence[Item]) -> None:
        try:
            dropped = self.spool.append(batch)
        except Exception as e:  # disk full, I/O error
            self._lose(len(batch), f"the journal failed: {_error_text(e)}")
            return
        if dropped:
            self._lose(dropped, f"the journal is full ({self.spool.max_items} records)")

    def _lose(self, n: int, reason: str) -> None:
        self._lost += n
        self._db_ok = False  # never "ok" while records are being lost
        self._last_error = reason
        log.error("%d record(s) lost, neither written nor journaled: %s", n, reason)

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


def take_batch(source: queue.SimpleQueue, timeout: float, linger: float, size: int,
               stopping: threading.Event) -> tuple[list, bool]:
    """Up to ``size`` items from ``source``: wait up to ``timeout`` for the first, then ``linger`` seconds
    for more (``stopping`` ends the linger early). Also whether the stop mark (``STOP``) was taken."""
    try:
        first = source.get(timeout=timeout)
    except queue.Empty:
        return [], False
    if first is STOP:
        return [], True
    batch = [first]
    deadline = time.monotonic() + linger
    while True:
        # Whatever is waiting is taken at once, even after the deadline.
        while len(batch) < size:
            try:
                item = source.get_nowait()
            except queue.Empty:
                break
            if item is STOP:
                return batch, True
            batch.append(item)
        left = deadline - time.monotonic()
        if len(batch) >= size or left <= 0:
            return batch, False
        # The rest of the linger is slept through, not woken by each record: a wake-up per record
        # made this thread take the GIL from the proxy's event loop once per call.
        stopping.wait(left)


def _error_text(error: BaseException) -> str:
    return error_line(error)[:300]
