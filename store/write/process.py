"""The writer in a child process: the proxy's process only queues records and ships them in batches.

Writing a record costs the writer ~25 µs of Python on SQLite and ~70 µs through pymysql (which escapes
every value in Python); in a thread of the proxy's process all of it held the GIL that the proxy's event
loop needs. The child (forked at the relay's start; ``python -m store.write.process`` where forking is not
safe) runs the same ``Writer`` with the spool, so outages, refused records and the journal behave as in
a thread. This side keeps every batch it shipped until the child reports it settled (written, journaled,
set aside or counted lost); a child that dies is replaced and handed what was not settled. Invocations
stay exactly once then (``invoke_id``); a node state update whose transaction committed just before its
child died is applied again. What this side holds is bounded (``WriterProcess``): beyond it, and while no
child takes records, they go to the relay's own journal on disk; its writes to the pipe never block, and a
child that stays silent (it reports at least twice a second) is stalled, taken off and replaced.

Records are batched once, by this side's sender: the child writes each ``Batch`` as it came. The messages
are the dataclasses below, pickled behind a 4-byte length over the child's stdin and stdout (the child is
this module, so unpickling is no risk): ``Settings``, then ``Batch``… and ``Stop`` (or EOF) down;
``Ready`` or ``StartFailed``, then ``Progress`` (also as a heartbeat) and ``LogLine`` up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import sqlalchemy as sa

from store.engine import error_line, in_memory, make_engine
from store.records import Item
from store.write.journal import ORPHAN_GRACE_S, Spool, SpoolInUse
from store.write.writer import STOP, RecordWriter, Writer, WriterStats, take_batch

log = logging.getLogger("codex.writer")

_HEADER = struct.Struct("!I")
# A child that sends nothing for this long (it reports at least every _HEARTBEAT_S) is stalled.
STALL_AFTER_S = 3.0
_HEARTBEAT_S = 0.5
# Bytes of records shipped to the child and not yet settled by it; more go to the relay's journal.
MAX_IN_FLIGHT = 32 << 20
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports ``store`` from
_COUNTERS = ("written", "duplicates", "rejected", "lost", "batches")
_NO_STATS = WriterStats(queued=0, spooled=0, spool_oldest_s=None, written=0, duplicates=0, rejected=0, lost=0,
                        batches=0, db_ok=True, last_error=None)


class WriterStartError(RuntimeError):
    """The child could not start: ``kind`` is "spool" (journal in use or unreadable) or "db"."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


# -- the messages ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Down, first: how the child writes."""

    url: str
    spool: str | None  # its journal
    batch_size: int  # records per batch replayed from its journal
    max_backoff: float
    orphan_grace: float  # how long it may take to finish once the relay is gone
    heartbeat: float  # it reports at least this often
    log_level: int


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Down: records to write as one batch (one transaction, unless the database refuses one of them)."""

    items: list[Item]


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """Down: write what was sent, then end."""


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """Up, first: the journal and the database are open."""


@dataclasses.dataclass(frozen=True, slots=True)
class StartFailed:
    """Up, first: the child cannot write; ``kind`` as ``WriterStartError``'s."""

    kind: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """Up: of the records sent, the first ``settled`` are settled (oldest first); its counts and health."""

    settled: int
    stats: WriterStats


@dataclasses.dataclass(frozen=True, slots=True)
class LogLine:
    """Up: a line of the child's log, for the relay's."""

    level: int
    name: str
    text: str


Down = Settings | Batch | Stop
Up = Ready | StartFailed | Progress | LogLine
_DOWN = (Settings, Batch, Stop)
_UP = (Ready, StartFailed, Progress, LogLine)


def send(out: BinaryIO, message: Down | Up) -> None:
    out.write(_frame(message))
    out.flush()


def _read(inp: BinaryIO) -> object | None:
    head = inp.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = inp.read(size)
    return pickle.loads(data) if len(data) == size else None


def receive_up(inp: BinaryIO) -> Up | None:
    """The child's next message; None at the end of the stream (it is gone) or for anything else."""
    message = _read(inp)
    return message if isinstance(message, _UP) else None


def receive_down(inp: BinaryIO) -> Down | None:
    """The relay's next message; None at the end of the stream (it is gone) or for anything else."""
    message = _read(inp)
    return message if isinstance(message, _DOWN) else None


class _Proc(Protocol):
    """What ``WriterProcess`` uses of a child: ``subprocess.Popen`` with both pipes, or ``_Forked``."""

    pid: int
    stdin: BinaryIO
    stdout: BinaryIO

    def wait(self, timeout: float | None = None) -> int:
        ...

    def kill(self) -> None:
        ...


class _Forked:
    """What ``WriterProcess`` uses of ``subprocess.Popen``, for a child forked without exec."""

    def __init__(self, pid: int, stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None
        self._exited = os.pidfd_open(pid)  # readable once the child has exited
        weakref.finalize(self, os.close, self._exited)  # not at the reaping: another wait may be selecting on it
        self._reap = threading.Lock()  # the listener and close() may both wait

    def poll(self) -> int | None:
        return self.wait(0) if select.select([self._exited], [], [], 0)[0] else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not select.select([self._exited], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(f"writer process {self.pid}", timeout or 0)
        with self._reap:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclasses.dataclass
class _Child:
    proc: _Proc
    listener: threading.Thread | None = None
    out: bytearray = dataclasses.field(default_factory=bytearray)  # frames its pipe has not taken yet
    heard: float = dataclasses.field(default_factory=time.monotonic)  # when it last sent a frame
    stalled: bool = False  # given up on: its records were taken back into the relay's journal


def start_writer(engine: sa.Engine, url: str, spool_path: str | None, *, linger: float,
                 process: bool = True) -> RecordWriter:
    """A started writer for ``url`` (``engine`` is on it) journaling to ``spool_path``: in a child process if
    ``process``, unless the database lives in this process's memory. Raises ``WriterStartError``."""
    if process and not in_memory(url):
        engine.dispose()  # its pooled connections: a SQLite file open here keeps the child from forking
        child = WriterProcess(url, spool_path, linger=linger)
        child.start()
        return child
    try:
        spool = Spool(spool_path)
    except (SpoolInUse, OSError) as e:
        raise WriterStartError("spool", str(e)) from None
    writer = Writer(engine, spool, linger=linger)
    writer.start()
    return writer


def relay_journal_path(spool_path: str | None) -> str | None:
    """The relay's own journal, beside its writer process's: records the child did not take."""
    return spool_path + ".relay" if spool_path else None


class WriterProcess:
    """The ``RecordWriter`` whose writing happens in a child process (``start`` it first).

    The hand-off is bounded: at most ``max_in_flight`` bytes of records are shipped and not yet settled
    by the child; what does not fit, and everything while no child takes records (one being replaced, or
    stalled), goes to the relay's own journal (``relay_journal_path``, on disk) and is shipped from there,
    oldest first, when the child has room. Writes to the child's pipe never block: a child that sent
    nothing (not even its heartbeat) for ``stall_after`` seconds is stalled; its unsettled records are
    taken back into the relay's journal, it is killed and replaced.
    """

    def __init__(self, url: str, spool_path: str | None, *, batch_size: int = 500, linger: float = 0.5,
                 max_backoff: float = 10.0, orphan_grace: float = ORPHAN_GRACE_S,
                 stall_after: float = STALL_AFTER_S, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.url, self.spool_path = url, spool_path
        self.batch_size, self.linger, self.max_backoff = batch_size, linger, max_backoff
        self.orphan_grace = orphan_grace  # how long a child whose relay died may take to finish
        self.stall_after, self.max_in_flight = stall_after, max_in_flight
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # submit is one C call on the event loop
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._ship, name="codex-writer", daemon=True)
        # The current child, its pipe and the relay's journal. Held only for non-blocking work.
        self._send_lock = threading.Lock()
        self._journal = Spool(None)  # the relay's own (opened in start)
        self._state = threading.Condition()  # guards what follows
        self._submitted = 0
        self._taken = 0  # of the submitted records, how many the sender took (shipped or journaled)
        self._settled = 0  # of the shipped records, how many a child settled (always the oldest)
        self._sent = 0  # records shipped to children, counting each once
        # Unsettled: (position of its first record, batch, bytes of its frame, ids in the relay's journal or None)
        self._shipped: deque[tuple[int, list[Item], int, tuple[int, int] | None]] = deque()
        self._in_flight = 0  # bytes of the frames in _shipped
        # The relay's journal: records shipped from it stay there until settled; the last id shipped, and
        # the id ranges settled and not yet removed.
        self._shipped_to = 0
        self._settled_ids: list[tuple[int, int]] = []
        self._base = 0  # records settled before the current child started
        self._child: _Child | None = None
        self._child_stats = _NO_STATS
        self._counted = dict.fromkeys(_COUNTERS, 0)  # what ended children counted, and what this side lost
        self._stalls = 0
        self._trouble: str | None = None  # why no child runs now
        self._closing = False
        self._closed = False  # the relay's journal too
        self._last_spill_log = -math.inf

    # -- called from any thread --------------------------------------------------------------------
    def start(self) -> None:
        """Start the child (raises ``WriterStartError`` when it cannot open a journal or the database)."""
        self._spawn()  # first: forked while this process has no journal open
        try:
            journal = Spool(relay_journal_path(self.spool_path))
        except (SpoolInUse, OSError) as e:
            self.close()
            raise WriterStartError("spool", str(e)) from None
        self._journal.close()  # the placeholder in memory
        self._journal = journal
        if self._journal.count:
            log.info("the relay's journal %s holds %d record(s) from an earlier run: writing them first",
                     self._journal.path, self._journal.count)
        self._sender.start()

    def submit(self, item: Item) -> None:
        """Queue one record; never blocks on the child or the database."""
        with self._state:
            self._submitted += 1
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted record is settled by a child, both journals are empty while the
        database answers; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._submitted == self._taken and self._sent == self._settled
                                        and not self._journal.count
                                        and not (self._child_stats.spooled and self._child_stats.db_ok), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Ship what is queued and let the child write it (what the database cannot take stays in its journal).
        A child that stalls or is not done within ``timeout`` is stopped: what it did not settle stays in the
        relay's journal, for the next start."""
        self._queue.put(STOP)
        self._stopping.set()
        if self._sender.is_alive():
            self._sender.join(timeout)  # it never waits for the child: this is short
        deadline = time.monotonic() + timeout
        with self._send_lock:
            self._closing = True
            child = self._child
            if child is not None:
                self._post(child, Stop())
        while child is not None:
            self._feed(child, 0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(0.1)
                break
            if self._silent(child) or time.monotonic() > deadline:
                log.error("the writer process (pid %d) %s: stopped; the records it did not settle stay in the "
                          "relay's journal", child.proc.pid, "stalled" if self._silent(child) else
                          f"did not finish within {timeout:g} s")
                with self._send_lock:
                    self._take_back(child)
                child.proc.wait()
                break
        if child is not None and child.listener is not None:
            child.listener.join(timeout)
        with self._send_lock:
            if child is not None and not child.stalled:  # ended before it settled them: a crash
                self._take_back(child)
            self._forget_settled()
            if self._journal.count and self._journal.path:
                log.warning("%d record(s) left in the relay's journal %s: they are written at the next start",
                            self._journal.count, self._journal.path)
            elif self._journal.count:
                self._lose(self._journal.count, "the writer process did not take them and the journal is in memory")
            self._journal.close()
            self._closed = True

    def stats(self) -> WriterStats:
        with self._send_lock:
            ages = [age for age in [self._journal.oldest_age()] if age is not None] \
                if self._journal.count and not self._closed else []
        with self._state:
            s = self._child_stats
            counts = {name: self._counted[name] + getattr(s, name) for name in _COUNTERS}
            stalled = self._child is not None and self._silent(self._child)
            if s.spool_oldest_s is not None:
                ages.append(s.spool_oldest_s)
            return WriterStats(queued=self._submitted - self._taken + self._sent - self._settled,
                               spooled=s.spooled + self._journal.count,
                               spool_oldest_s=max(ages) if ages else None, **counts,
                               db_ok=s.db_ok and self._trouble is None and not stalled,
                               last_error=self._trouble or s.last_error, stalled=stalled, stalls=self._stalls)

    # -- the sender thread ---------------------------------------------------------------------------
    def _ship(self) -> None:
        stopping = False
        while not stopping:
            # Woken at least every half second: the pipe, the journal and the child's silence are looked at.
            batch, stopping = take_batch(self._queue, 0.5, self.linger, self.batch_size, self._stopping)
            with self._send_lock:
                if batch:
                    with self._state:
                        self._taken += len(batch)
                    self._hand(batch)
                child = self._child
                if child is None or child.stalled:
                    continue
                if self._silent(child):
                    self._stalled(child)
                    continue
                self._drain(child)
            self._feed(child, 0.5)

    def _feed(self, child: _Child, within: float) -> None:
        """Write the child's frames as fast as its pipe takes them, for at most ``within`` seconds; the lock
        is not held while waiting for the pipe."""
        deadline = time.monotonic() + within
        while True:
            with self._send_lock:
                self._pump(child)
                if not child.out or child.stalled:
                    return
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not select.select([], [child.proc.stdin], [], left)[1]:
                    return
            except (OSError, ValueError):  # its pipe is closed: its listener replaces it
                return

    def _hand(self, batch: list[Item]) -> None:
        """To the child if it takes records and has room (nothing journaled before them), else to the journal."""
        child = self._child
        frame = _frame(Batch(batch))
        full = self._in_flight and self._in_flight + len(frame) > self.max_in_flight  # one batch always fits
        if child is None or child.stalled or self._journal.count or full:
            self._spill(batch, "no writer process runs" if child is None else "the writer process is stalled"
                        if child.stalled else "the writer process is behind")
            return
        self._to_child(child, batch, frame)

    def _to_child(self, child: _Child, batch: list[Item], frame: bytes, ids: tuple[int, int] | None = None) -> None:
        with self._state:
            self._shipped.append((self._sent, batch, len(frame), ids))
            self._sent += len(batch)
            self._in_flight += len(frame)
        child.out += frame

    def _drain(self, child: _Child) -> None:
        """Ship the relay's journal, oldest first, while the child has room. Its records stay in the journal
        until the child settles them: a SIGKILL meanwhile loses none of them."""
        try:
            self._forget_settled()
            while self._journal.count and self._in_flight < self.max_in_flight // 2:
                ids, items = self._journal.peek(self.batch_size, after=self._shipped_to)
                if not ids:
                    break
                self._to_child(child, items, _frame(Batch(items)), (ids[0], ids[-1]))
                self._shipped_to = ids[-1]
        except Exception:  # unreadable: its records stay there for the next try
            log.exception("reading the relay's journal %s failed", self._journal.path or "(memory)")

    def _forget_settled(self) -> None:
        """Remove from the relay's journal what the child settled."""
        with self._state:
            settled, self._settled_ids = self._settled_ids, []
        for first, last in settled:
            self._journal.remove((first, last))
        if settled and not self._journal.count:
            log.info("the relay's journal is drained")
            with self._state:
                self._state.notify_all()

    def _spill(self, batch: Sequence[Item], why: str) -> None:
        """Journal ``batch`` in this process (on disk): never held in memory for a child that does not take it."""
        try:
            dropped = self._journal.append(batch)
        except Exception as e:  # disk full, I/O error
            self._lose(len(batch), f"{why} and the relay's journal failed: {error_line(e)[:300]}")
            return
        if dropped:
            self._lose(dropped, f"{why} and the relay's journal is full ({self._journal.max_items} records)")
        now = time.monotonic()
        if now - self._last_spill_log >= 10.0:
            self._last_spill_log = now
            log.warning("%s: %d record(s) wait in the relay's journal %s", why, self._journal.count,
                        self._journal.path or "(memory)")

    def _pump(self, child: _Child) -> None:
        """Write what the child's pipe takes now, never waiting for it."""
        try:
            while child.out:
                with memoryview(child.out) as view:
                    n = os.write(child.proc.stdin.fileno(), view[:1 << 20])
                del child.out[:n]
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):  # gone (ValueError: its pipe is closed): its listener replaces it
            child.out.clear()

    def _post(self, child: _Child, message: Down) -> None:
        child.out += _frame(message)
        self._pump(child)

    def _silent(self, child: _Child) -> bool:
        return time.monotonic() - child.heard > self.stall_after

    def _stalled(self, child: _Child) -> None:
        self._take_back(child)  # first: what the log line says is then true
        with self._state:
            self._stalls += 1
            self._trouble = (f"the writer process (pid {child.proc.pid}) sent nothing for {self.stall_after:g} s: "
                             "stalled; its records went to the relay's journal and it is replaced")
        log.error("%s", self._trouble)

    def _take_back(self, child: _Child) -> None:
        """Give up on ``child``: what it did not settle goes to the relay's journal, and it is killed."""
        with self._state:
            # Those shipped from the journal are still there (shipped again from the start of it).
            items = [item for first, batch, _, ids in self._shipped if ids is None
                     for item in (batch[self._settled - first:] if first < self._settled else batch)]
            self._shipped.clear()
            self._in_flight = 0
            self._settled = self._sent
            self._shipped_to = 0
            self._state.notify_all()
        child.stalled = True  # its late reports must not count: its records are in the journal now
        child.out.clear()
        if items:
            self._spill(items, "the writer process did not settle them")
        with contextlib.suppress(OSError):
            child.proc.kill()

    # -- children ------------------------------------------------------------------------------------
    def _sqlite_files(self) -> list[str]:
        """The files of the SQLite databases the child opens: its journal's, and the database's if SQLite."""
        url = sa.engine.make_url(self.url)
        bases = [self.spool_path] + ([url.database] if url.get_backend_name() == "sqlite" else [])
        return [base + suffix for base in bases if base for suffix in ("", "-wal", "-shm")]

    def _spawn(self) -> None:
        proc = _fork() if _may_fork(self._sqlite_files()) else _exec()
        child = _Child(proc)
        try:
            send(proc.stdin, Settings(url=self.url, spool=self.spool_path, batch_size=self.batch_size,
                                      max_backoff=self.max_backoff, orphan_grace=self.orphan_grace,
                                      heartbeat=min(_HEARTBEAT_S, self.stall_after / 4),
                                      log_level=log.getEffectiveLevel()))
            while not isinstance(message := receive_up(proc.stdout), Ready):
                match message:
                    case None:
                        raise WriterStartError("process", f"the writer process exited with code {proc.wait()}")
                    case StartFailed(kind, text):
                        raise WriterStartError(kind, text)
                    case LogLine():
                        _relog(message)
        except (WriterStartError, OSError):
            _end(proc)
            raise
        os.set_blocking(proc.stdin.fileno(), False)  # from here on only _pump writes to it
        child.heard = time.monotonic()
        with self._send_lock:
            if self._closing:  # close() gave up on children meanwhile: it counts what is unsettled
                _end(proc)
                return
            with self._state:
                self._base = self._settled
                self._child_stats = _NO_STATS
                self._trouble = None
                resend = [batch[self._settled - first:] if first < self._settled else batch
                          for first, batch, _, _ in self._shipped]
            for batch in resend:
                child.out += _frame(Batch(batch))
            self._pump(child)
            self._child = child
        child.listener = threading.Thread(target=self._listen, args=(child,), name="codex-writer-child",
                                          daemon=True)
        child.listener.start()

    def _listen(self, child: _Child) -> None:
        """Read one child's frames until it ends; then start another, unless closing."""
        while (message := receive_up(child.proc.stdout)) is not None:
            child.heard = time.monotonic()
            if isinstance(message, Progress) and not child.stalled:
                self._progress(message.settled, message.stats)
                if self._journal.count:  # room again: ship what waits, without waiting for the sender
                    with self._send_lock:
                        if self._child is child and not child.stalled:
                            self._drain(child)
                            self._pump(child)
                        else:
                            self._forget_settled()
            elif isinstance(message, LogLine):
                _relog(message)
        code = child.proc.wait()
        with self._send_lock, self._state:
            self._child = None
            for name in _COUNTERS:
                self._counted[name] += getattr(self._child_stats, name)
            self._child_stats = dataclasses.replace(_NO_STATS, spooled=self._child_stats.spooled)
            if self._closing:
                self._state.notify_all()
                return
            if not child.stalled:
                self._trouble = f"the writer process exited with code {code}"
                log.error("%s; a new one takes the %d record(s) not yet written", self._trouble,
                          self._sent - self._settled)
        self._restart()

    def _restart(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._spawn()
                return
            except (WriterStartError, OSError) as e:
                with self._state:
                    self._trouble = f"the writer process cannot start: {e}"
                log.error("%s (again in %.0f s)", self._trouble, backoff)
            self._stopping.wait(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    def _progress(self, settled: int, stats: WriterStats) -> None:
        with self._state:
            self._settled = self._base + settled
            while self._shipped and self._shipped[0][0] + len(self._shipped[0][1]) <= self._settled:
                _, _, size, ids = self._shipped.popleft()
                self._in_flight -= size
                if ids is not None:
                    self._settled_ids.append(ids)
            self._child_stats = stats
            self._state.notify_all()

    def _lose(self, n: int, reason: str) -> None:
        with self._state:
            self._counted["lost"] += n
            self._trouble = reason
        log.error("%d record(s) lost, neither written nor journaled: %s", n, reason)


def _frame(message: Down | Up) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _may_fork(sqlite_files: Sequence[str]) -> bool:
    """Whether a child may be forked from here without exec. Only when no other thread runs, so none can
    hold a lock (an SQLite mutex, a logging handler's) that the child would then wait on forever (at a
    relay's start the only other thread is asyncio's executor worker, idle on its queue); and only when
    this process has none of the SQLite files the child opens: SQLite keeps per-process state for each
    open file, and a child that inherits it cannot lock the file ("locking protocol"). Linux only (pidfd,
    /proc); elsewhere the child is a new interpreter."""
    return hasattr(os, "pidfd_open") and _alone() and not _holds(sqlite_files)


def _alone() -> bool:
    return all(t is threading.current_thread() or t.name.startswith("asyncio_") for t in threading.enumerate())


def _holds(files: Sequence[str]) -> bool:
    """Whether this process has any of ``files`` open (when it cannot tell: yes)."""
    wanted = {os.path.realpath(f) for f in files}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile: the listing's own descriptor, say
            if os.readlink(f"/proc/self/fd/{fd}") in wanted:
                return True
    return False


def _fork() -> _Forked:
    """The writer process as a fork of this one: it has every module already (a new interpreter spends
    ~0.4 CPU-s importing SQLAlchemy and the store, at every relay start)."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    with warnings.catch_warnings():  # Python warns of fork in a threaded process: _may_fork checked it
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: it must never return into the proxy's stack
        code = 1
        try:
            # Nothing inherited is ever collected here: a finalizer would close a descriptor number this
            # process has reused. The proxy's descriptors (sockets, files, its loop's signal pipe) are
            # closed: the child must not keep the proxy's port bound after the proxy is gone.
            gc.freeze()
            _name_process(b"codex-writer")
            signal.set_wakeup_fd(-1)
            os.dup2(down_r, 0)
            os.dup2(up_w, 1)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            main()
            code = 0
        except BaseException:
            traceback.print_exc()  # as an interpreter would before it exits, to the relay's stderr
        finally:
            os._exit(code)
    os.close(down_r)
    os.close(up_w)
    return _Forked(pid, os.fdopen(down_w, "wb"), os.fdopen(up_r, "rb"))


def _name_process(name: bytes) -> None:
    """The name ``ps -e``, ``top`` and ``pgrep`` show for this process; a fork's command line stays the relay's."""
    import ctypes  # only a forked child needs it

    with contextlib.suppress(Exception):  # a cosmetic: no libc prctl, no name
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def _exec() -> _Proc:
    """The writer process as a new interpreter (``python -m store.write.process``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, env.get("PYTHONPATH"))))
    # Both pipes exist (PIPE): what Popen types as optional is there.
    return cast(_Proc, subprocess.Popen([sys.executable, "-m", "store.write.process"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env))


def _end(proc: _Proc) -> None:
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            stream.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _relog(line: LogLine) -> None:
    logging.getLogger(line.name).log(line.level, "%s", line.text)


# -- the child -----------------------------------------------------------------------------------------
class _Upstream(logging.Handler):
    """The child's log records, sent to the parent's logging (the relay's log, mitmweb's event log)."""

    def __init__(self, out: BinaryIO, lock: threading.Lock) -> None:
        super().__init__()
        self._out, self._frames = out, lock  # not ``self.lock``: that is the Handler's own

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._frames:
                send(self._out, LogLine(record.levelno, record.name, self.format(record)))
        except Exception:
            self.handleError(record)


class _AsShipped(Writer):
    """The child's writer: each ``Batch`` is written as the relay's sender made it, neither split nor merged
    (a record the database refuses is still found by halving). Fed by ``submit_batch`` alone."""

    def submit_batch(self, items: list[Item]) -> None:
        self._expect(len(items))
        self._queue.put(items)

    def _take(self, timeout: float) -> tuple[list[Item], bool]:
        try:
            batch = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        return ([], True) if batch is STOP else (batch, False)


def main() -> None:
    # A Ctrl-C or a service manager's SIGTERM reaches the whole process group: the child stays until its
    # parent says stop or is gone (EOF), so the records the parent hands over at its shutdown are written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp, out = open(0, "rb", closefd=False), os.fdopen(os.dup(1), "wb")  # noqa: SIM115 - the process's own
    os.dup2(2, 1)  # a stray print goes to stderr, never into the frames
    lock = threading.Lock()
    settings = receive_down(inp)
    if not isinstance(settings, Settings):
        return
    root = logging.getLogger()
    root.handlers[:] = [_Upstream(out, lock)]  # a forked child has the proxy's handlers: its log is the parent's
    root.setLevel(settings.log_level)

    def tell(message: Up) -> None:
        with lock:
            send(out, message)

    try:
        spool = Spool(settings.spool, relay_pid=os.getppid())  # the lock names the relay, not this process
    except (SpoolInUse, OSError) as e:
        return tell(StartFailed("spool", str(e)))
    try:
        writer = _AsShipped(make_engine(settings.url), spool, batch_size=settings.batch_size,
                            max_backoff=settings.max_backoff)
    except Exception as e:
        spool.close()
        return tell(StartFailed("db", error_line(e)))
    writer.start()
    tell(Ready())
    submitted = [0]

    def report() -> None:
        # Also when nothing changed: the parent takes a child that stays silent for a stalled one.
        while True:
            ended = writer.ended  # read first: a report made after the end is the final one
            with contextlib.suppress(OSError):  # the relay is gone: nobody reads reports any more
                tell(Progress(submitted[0] - writer.pending, writer.stats()))  # that order: never more than settled
            if ended:
                return
            writer.wait_progress(settings.heartbeat)

    reporter = threading.Thread(target=report, name="codex-writer-report", daemon=True)
    reporter.start()
    while isinstance(message := receive_down(inp), Batch):
        writer.submit_batch(message.items)
        submitted[0] += len(message.items)
    if message is None:  # EOF without Stop: the relay is gone, and nobody will stop this process
        # What it was sent is written or journaled as usual, but within a bound: a database that hangs
        # must not keep the journal locked against the relay's next start (store.write.journal waits for this).
        orphaned = threading.Timer(settings.orphan_grace, os._exit, (1,))
        orphaned.daemon = True
        orphaned.start()
    writer.finish()
    reporter.join(5)  # its last report is the final state, read before the journal closes
    writer.close()

if __name__ == "__main__":
    # Run as ``store.write.process``, not ``__main__``: the messages are unpickled as that module's classes.
    from store.write import process

    process.main()
