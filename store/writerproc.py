"""The writer in a child process: the proxy's process only queues records and ships them in batches.

Writing a record costs the writer ~25 µs of Python on SQLite and ~70 µs through pymysql (which escapes
every value in Python); in a thread of the proxy's process all of it held the GIL that the proxy's event
loop needs. The child (forked at the relay's start; ``python -m store.writerproc`` where forking is not
safe) runs the same ``Writer`` with the spool, so outages, refused records and the journal behave as in
a thread. This side keeps every batch it shipped until the child reports it settled (written, journaled,
set aside or counted lost); a child that dies is replaced and handed what was not settled. Invocations
stay exactly once then (``invoke_id``); a node state update whose transaction committed just before its
child died is applied again.

Frames are pickles behind a 4-byte length, over the child's stdin and stdout (the child is this module,
so unpickling is no risk): ``config`` then ``("batch", items)``… and ``("stop",)`` (or EOF) down;
``("ready",)`` or ``("error", kind, text)``, then ``("progress", settled, stats)`` and
``("log", level, name, text)`` up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import sqlalchemy as sa

from store.engine import error_line, in_memory, make_engine
from store.records import Item
from store.spool import ORPHAN_GRACE_S, Spool, SpoolInUse
from store.writer import STOP, Writer, WriterStats, take_batch

log = logging.getLogger("codex.writer")

_HEADER = struct.Struct("!I")
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports ``store`` from
_COUNTERS = ("written", "duplicates", "rejected", "lost", "batches")
_NO_STATS = WriterStats(queued=0, spooled=0, spool_oldest_s=None, written=0, duplicates=0, rejected=0, lost=0,
                        batches=0, db_ok=True, last_error=None)


class WriterStartError(RuntimeError):
    """The child could not start: ``kind`` is "spool" (journal in use or unreadable) or "db"."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


def send(out: BinaryIO, message: object) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)))
    out.write(data)
    out.flush()


def receive(inp: BinaryIO) -> object | None:
    """The next frame; None at the end of the stream (the other side is gone)."""
    head = inp.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = inp.read(size)
    return pickle.loads(data) if len(data) == size else None


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
    proc: subprocess.Popen | _Forked
    listener: threading.Thread | None = None


def start_writer(engine: sa.Engine, url: str, spool_path: str | None, *, linger: float,
                 process: bool = True) -> Writer | WriterProcess:
    """A started writer for ``url`` (``engine`` is on it) journaling to ``spool_path``: in a child process if
    ``process``, unless the database lives in this process's memory. Raises ``WriterStartError``."""
    if process and not in_memory(url):
        engine.dispose()  # its pooled connections: a SQLite file open here keeps the child from forking
        process = WriterProcess(url, spool_path, linger=linger)
        process.start()
        return process
    try:
        spool = Spool(spool_path)
    except (SpoolInUse, OSError) as e:
        raise WriterStartError("spool", str(e)) from None
    writer = Writer(engine, spool, linger=linger)
    writer.start()
    return writer


class WriterProcess:
    """``Writer``'s interface (start, submit, flush, close, stats); the writing happens in a child process."""

    def __init__(self, url: str, spool_path: str | None, *, batch_size: int = 500, linger: float = 0.5,
                 max_backoff: float = 10.0, orphan_grace: float = ORPHAN_GRACE_S) -> None:
        self.url, self.spool_path = url, spool_path
        self.batch_size, self.linger, self.max_backoff = batch_size, linger, max_backoff
        self.orphan_grace = orphan_grace  # how long a child whose relay died may take to finish
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # submit is one C call on the event loop
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._ship, name="codex-writer", daemon=True)
        self._send_lock = threading.Lock()  # one child's stream at a time: a replacement resends first
        self._state = threading.Condition()  # guards what follows
        self._submitted = 0
        self._settled = 0  # of the submitted records, how many a child settled (always the oldest)
        self._sent = 0  # records shipped to children, counting each once
        self._shipped: deque[tuple[int, list[Item]]] = deque()  # (position of its first record, batch), unsettled
        self._base = 0  # records settled before the current child started
        self._child: _Child | None = None
        self._child_stats = _NO_STATS
        self._counted = dict.fromkeys(_COUNTERS, 0)  # what ended children counted, and what this side lost
        self._trouble: str | None = None  # why no child runs now
        self._closing = False

    # -- called from any thread --------------------------------------------------------------------
    def start(self) -> None:
        """Start the child (raises ``WriterStartError`` when it cannot open its journal or database)."""
        self._spawn()
        self._sender.start()

    def submit(self, item: Item) -> None:
        """Queue one record; never blocks on the child or the database."""
        with self._state:
            self._submitted += 1
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted record is settled by a child, and its journal is empty while the
        database answers; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._submitted == self._settled and not (
                self._child_stats.spooled and self._child_stats.db_ok), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Ship what is queued and let the child write it (what the database cannot take stays in its journal)."""
        self._queue.put(STOP)
        self._stopping.set()
        if self._sender.is_alive():
            self._sender.join(timeout)
        with self._send_lock:
            self._closing = True
            child = self._child
            if child is not None:
                _tell(child, ("stop",))
        if child is not None:
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the writer process did not finish within %.0f s: stopped", timeout)
                child.proc.kill()
            if child.listener is not None:
                child.listener.join(timeout)
        with self._state:
            unsettled = self._submitted - self._settled
            if unsettled:
                self._lose(unsettled, "the writer process ended before it settled them")
                self._settled = self._submitted

    def stats(self) -> WriterStats:
        with self._state:
            s = self._child_stats
            counts = {name: self._counted[name] + getattr(s, name) for name in _COUNTERS}
            return WriterStats(queued=self._submitted - self._settled, spooled=s.spooled,
                               spool_oldest_s=s.spool_oldest_s, **counts,
                               db_ok=s.db_ok and self._trouble is None,
                               last_error=self._trouble or s.last_error)

    # -- the sender thread ---------------------------------------------------------------------------
    def _ship(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = take_batch(self._queue, 1.0, self.linger, self.batch_size, self._stopping)
            if not batch:
                continue
            frame = ("batch", batch)
            with self._send_lock:
                with self._state:
                    self._shipped.append((self._sent, batch))
                    self._sent += len(batch)
                if self._child is not None:  # none: the next child gets it with the rest
                    _tell(self._child, frame)

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
            send(proc.stdin, {"url": self.url, "spool": self.spool_path, "batch_size": self.batch_size,
                              "max_backoff": self.max_backoff, "orphan_grace": self.orphan_grace,
                              "log_level": log.getEffectiveLevel()})
            while True:
                message = receive(proc.stdout)
                if message is None:
                    raise WriterStartError("process", f"the writer process exited with code {proc.wait()}")
                if message[0] == "log":
                    _relog(message)
                    continue
                if message[0] == "error":
                    raise WriterStartError(message[1], message[2])
                break
        except (WriterStartError, OSError):
            _end(proc)
            raise
        with self._send_lock:
            if self._closing:  # close() gave up on children meanwhile: it counts what is unsettled
                _end(proc)
                return
            with self._state:
                self._base = self._settled
                self._child_stats = _NO_STATS
                self._trouble = None
                resend = [batch[self._settled - first:] if first < self._settled else batch
                          for first, batch in self._shipped]
            for batch in resend:
                _tell(child, ("batch", batch))
            self._child = child
        child.listener = threading.Thread(target=self._listen, args=(child,), name="codex-writer-child",
                                          daemon=True)
        child.listener.start()

    def _listen(self, child: _Child) -> None:
        """Read one child's frames until it ends; then start another, unless closing."""
        while (message := receive(child.proc.stdout)) is not None:
            if message[0] == "progress":
                self._progress(message[1], message[2])
            elif message[0] == "log":
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
            self._trouble = f"the writer process exited with code {code}"
        log.error("%s; a new one takes the %d record(s) not yet written", self._trouble,
                  self._submitted - self._settled)
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
                self._shipped.popleft()
            self._child_stats = stats
            self._state.notify_all()

    def _lose(self, n: int, reason: str) -> None:
        self._counted["lost"] += n
        self._trouble = reason
        log.error("%d record(s) lost, neither written nor journaled: %s", n, reason)


def _tell(child: _Child, message: object) -> None:
    """Send to a child; one that is gone is found by its listener (EOF), which replaces it."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: its pipe is already closed
        send(child.proc.stdin, message)


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


def _exec() -> subprocess.Popen:
    """The writer process as a new interpreter (``python -m store.writerproc``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, env.get("PYTHONPATH"))))
    return subprocess.Popen([sys.executable, "-m", "store.writerproc"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)


def _end(proc: subprocess.Popen | _Forked) -> None:
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            stream.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _relog(message: tuple) -> None:
    _, level, name, text = message
    logging.getLogger(name).log(level, "%s", text)


# -- the child -----------------------------------------------------------------------------------------
class _Upstream(logging.Handler):
    """The child's log records, sent to the parent's logging (the relay's log, mitmweb's event log)."""

    def __init__(self, out: BinaryIO, lock: threading.Lock) -> None:
        super().__init__()
        self._out, self._frames = out, lock  # not ``self.lock``: that is the Handler's own

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._frames:
                send(self._out, ("log", record.levelno, record.name, self.format(record)))
        except Exception:
            self.handleError(record)


def main() -> None:
    # A Ctrl-C or a service manager's SIGTERM reaches the whole process group: the child stays until its
    # parent says stop or is gone (EOF), so the records the parent hands over at its shutdown are written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp, out = open(0, "rb", closefd=False), os.fdopen(os.dup(1), "wb")  # noqa: SIM115 - the process's own
    os.dup2(2, 1)  # a stray print goes to stderr, never into the frames
    lock = threading.Lock()
    config = receive(inp)
    if config is None:
        return
    root = logging.getLogger()
    root.handlers[:] = [_Upstream(out, lock)]  # a forked child has the proxy's handlers: its log is the parent's
    root.setLevel(config["log_level"])

    def tell(message: object) -> None:
        with lock:
            send(out, message)

    try:
        spool = Spool(config["spool"], relay_pid=os.getppid())  # the lock names the relay, not this process
    except (SpoolInUse, OSError) as e:
        return tell(("error", "spool", str(e)))
    try:
        writer = Writer(make_engine(config["url"]), spool, batch_size=config["batch_size"], linger=0.0,
                        max_backoff=config["max_backoff"])
    except Exception as e:
        spool.close()
        return tell(("error", "db", error_line(e)))
    writer.start()
    tell(("ready",))
    submitted = [0]

    def report() -> None:
        last = None
        while True:
            ended = writer.ended  # read first: a report made after the end is the final one
            now = (submitted[0] - writer.pending, writer.stats())  # that order: never more than settled
            if now != last:
                tell(("progress", *now))
                last = now
            if ended:
                return
            writer.wait_progress(0.5)

    reporter = threading.Thread(target=report, name="codex-writer-report", daemon=True)
    reporter.start()
    while (message := receive(inp)) is not None and message[0] == "batch":
        items: Sequence[Item] = message[1]
        for item in items:
            writer.submit(item)
        submitted[0] += len(items)
    if message is None:  # EOF without "stop": the relay is gone, and nobody will stop this process
        # What it was sent is written or journaled as usual, but within a bound: a database that hangs
        # must not keep the journal locked against the relay's next start (store.spool waits for this).
        orphaned = threading.Timer(config["orphan_grace"], os._exit, (1,))
        orphaned.daemon = True
        orphaned.start()
    writer.finish()
    reporter.join(5)  # its last report is the final state, read before the journal closes
    writer.close()


if __name__ == "__main__":
    main()
