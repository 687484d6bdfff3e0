"""The writer process: records reach the database through a child, which may die, be signalled or lose
its parent without a record lost or written twice."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.engine import make_engine
from store.records import NodeStateUpdate, Usage
from store.write import process as writerproc
from store.write.journal import Spool
from store.write.process import WriterProcess, WriterStartError, _Forked, relay_journal_path, start_writer
from store.write.writer import Writer
from tests.support.databases import at_head, counts, engine_with_node, record
from tests.support.waiting import wait_for

pytestmark = pytest.mark.fault


@pytest.fixture
def engine(db_url):
    eng = engine_with_node(at_head(db_url))
    yield eng
    eng.dispose()


def _lock_database(sqlite_url: str) -> sqlite3.Connection:
    """Another connection holding the database exclusively: a write waits (SQLite's busy timeout) until
    it rolls back."""
    blocker = sqlite3.connect(sa.engine.make_url(sqlite_url).database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    return blocker


def test_records_reach_the_database_through_the_child_and_close_writes_the_rest(engine, db_url, tmp_path):
    writer = WriterProcess(db_url, str(tmp_path / "spool.db"), batch_size=200, linger=0.05)
    writer.start()
    # The child holds the journal for this process, its relay: a relay that dies is seen as gone (store.write.journal).
    assert (tmp_path / "spool.db.lock").read_text() == f"{os.getpid()}\n"
    for _ in range(700):
        writer.submit(record(usage=Usage(3, 1, 0, 2, 0)))
    assert writer.flush(60)
    for _ in range(300):  # queued when close is called: written before the child ends
        writer.submit(record(usage=Usage(3, 1, 0, 2, 0)))
    writer.close()
    assert counts(engine) == (1000, 1000, 1000)
    stats = writer.stats()
    assert (stats.written, stats.queued, stats.lost, stats.db_ok) == (1000, 0, 0, True)
    assert writer._child is None  # the child ended with close


def test_records_are_batched_once_the_child_writes_each_batch_as_shipped(sqlite_url, tmp_path):
    """The relay's sender makes the batches; the child neither splits nor merges them, even when they wait
    for the database together: one transaction each."""
    engine = engine_with_node(sqlite_url)
    writer = WriterProcess(sqlite_url, str(tmp_path / "spool.db"), linger=0.5)  # ample: 5 submits take µs
    writer.start()
    blocker = _lock_database(sqlite_url)  # the child's first write waits: the other batches arrive meanwhile
    for n in (5, 10, 15):  # three batches of five, each shipped after the sender's linger
        for _ in range(5):
            writer.submit(record())
        wait_for(lambda n=n: writer._sent == n, what=f"{n} records shipped")
    wait_for(lambda: writer._child_stats.queued == 15, what="the three batches with the child")
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.flush(60)
    writer.close()
    assert counts(engine) == (15, 15, 15)
    assert (writer.stats().written, writer.stats().batches) == (15, 3)


def test_a_killed_child_is_replaced_and_its_unwritten_records_are_written_once(sqlite_url, tmp_path, caplog):
    engine = engine_with_node(sqlite_url)
    writer = WriterProcess(sqlite_url, str(tmp_path / "spool.db"), linger=0.0)
    writer.start()
    for _ in range(50):
        writer.submit(record())
    assert writer.flush(60)
    first = writer._child.proc
    blocker = _lock_database(sqlite_url)  # the child's next write waits, unsettled
    for _ in range(50):
        writer.submit(record())
    wait_for(lambda: writer._sent == 100, what="the next 50 records shipped to the child")
    assert writer.stats().queued == 50
    with caplog.at_level(logging.ERROR, logger="codex.writer"):
        first.send_signal(signal.SIGKILL)
        wait_for(lambda: writer._child is not None and writer._child.proc is not first, what="a new child")
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.flush(60)
    writer.close()
    assert counts(engine) == (100, 100, 100)
    assert "exited with code -9; a new one takes the 50 record(s) not yet written" in caplog.text
    assert (writer.stats().written, writer.stats().lost) == (100, 0)


def test_the_child_outlives_sigterm_and_sigint_and_ends_with_its_parents_pipe(engine, db_url, tmp_path):
    """A Ctrl-C or a service stop reaches the whole process group: the child must still take the records
    the relay hands over while it shuts down, and end only when the relay is gone."""
    # Not the stall watch's subject: a loaded machine may keep the ending child silent past its 3 s.
    writer = WriterProcess(db_url, str(tmp_path / "spool.db"), linger=0.0, stall_after=60)
    writer.start()
    try:
        child = writer._child.proc
        child.send_signal(signal.SIGTERM)
        child.send_signal(signal.SIGINT)
        for _ in range(10):
            writer.submit(record())
        assert writer.flush(60)
        assert child.poll() is None
        child.stdin.close()  # what the relay's death looks like from the child
        assert child.wait(30) == 0
        assert counts(engine) == (10, 10, 10)
    finally:
        writer.close()  # this side saw its child end: it has started another


def test_a_child_whose_relay_is_gone_ends_within_its_grace_even_on_a_hung_database(sqlite_url, tmp_path):
    """Nobody stops a child whose relay died: it finishes what it was sent, within a bound, so the journal's
    lock is free for the relay's next start (which waits for such a child: store.write.journal)."""
    engine = engine_with_node(sqlite_url)
    writer = WriterProcess(sqlite_url, str(tmp_path / "spool.db"), linger=0.0, orphan_grace=1.0)
    writer.start()
    child = writer._child.proc
    blocker = _lock_database(sqlite_url)  # the child's write waits up to its 30 s busy timeout
    for _ in range(5):
        writer.submit(record())
    wait_for(lambda: writer._sent == 5, what="5 records shipped to the child")
    child.stdin.close()  # what the relay's death looks like from the child
    assert child.wait(20) == 1  # ended by its grace, not by the database
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.flush(60)  # this side is alive here: its next child writes what the first could not
    writer.close()
    assert counts(engine) == (5, 5, 5)


def test_a_journal_in_use_is_a_start_error(engine, db_url, tmp_path):
    held = Spool(tmp_path / "spool.db")
    try:
        with pytest.raises(WriterStartError, match="in use") as error:
            WriterProcess(db_url, str(tmp_path / "spool.db")).start()
        assert error.value.kind == "spool"
    finally:
        held.close()


def test_the_childs_log_reaches_this_process_and_an_earlier_journal_is_written(engine, db_url, tmp_path, caplog):
    path = tmp_path / "spool.db"
    earlier = Spool(path)
    left = [record() for _ in range(5)]
    earlier.append(left)
    earlier.close()
    with caplog.at_level(logging.INFO, logger="codex.writer"):
        writer = WriterProcess(db_url, str(path))
        writer.start()
        assert writer.flush(60)
        writer.close()
    assert counts(engine) == (5, 5, 5)
    assert f"spool {path} holds 5 record(s) from an earlier run" in caplog.text
    assert [r.name for r in caplog.records if "spool drained" in r.message] == ["codex.writer"]


def test_a_database_in_memory_is_written_in_this_process(tmp_path):
    url = "sqlite://"
    eng = engine_with_node(url)
    writer = start_writer(eng, url, None, linger=0.0)
    try:
        assert isinstance(writer, Writer)  # no other process can open this process's memory
        writer.submit(record())
        assert writer.flush(30)
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM codex_invocations")).scalar() == 1
    finally:
        writer.close()


def test_records_cross_to_the_child_with_every_field():
    """Records are pickled by their fields in the constructor's order (store.records): none may be dropped
    or shifted into another's place."""
    full = record(usage=Usage(10, 4, 2, 7, 3), node_failure=True, error="upstream 500", api_format="responses",
                  model="gpt-5", requested_model="gpt-5-codex", stream=True, http_status=500, cost=0.5,
                  cost_input=0.1, cost_cached=0.2, cost_output=0.15, cost_cache_write=0.05, ttfb_ms=1,
                  stream_ms=2, duration_ms=3, request_bytes=4, response_bytes=5, attempts=2, client_key="team",
                  payload="{}", raw_response='{"usage": {}}', flags=["usage_clamped"])
    for item in (full, NodeStateUpdate("a", failed=True, failed_attempt=True, last_error="x", pinged=True,
                                       last_ping_ms=5, last_ping_err="y")):
        copy = pickle.loads(pickle.dumps(item, pickle.HIGHEST_PROTOCOL))
        assert copy == item and type(copy) is type(item)


def test_the_child_is_forked_without_the_proxys_descriptors(sqlite_url, tmp_path, monkeypatch):
    """Forked (no new interpreter to import everything again), and holding none of this process's files:
    a listening socket kept by the child would keep the relay's port taken after the relay is gone."""
    engine_with_node(sqlite_url).dispose()  # nothing here holds the database open
    # Threads other tests of this worker left may be running: the choice itself is tested below.
    monkeypatch.setattr(writerproc, "_may_fork", lambda files: True)
    listening = socket.create_server(("127.0.0.1", 0))
    writer = WriterProcess(sqlite_url, str(tmp_path / "spool.db"), linger=0.0)
    try:
        writer.start()
        child = writer._child.proc
        assert isinstance(child, _Forked)
        assert Path(f"/proc/{child.pid}/comm").read_text() == "codex-writer\n"  # not a second "mitmdump" in ps
        held = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert f"socket:[{os.fstat(listening.fileno()).st_ino}]" not in held
        writer.submit(record())
        assert writer.flush(30)
    finally:
        writer.close()
        listening.close()
    assert counts(make_engine(sqlite_url)) == (1, 1, 1)


def test_a_database_file_open_here_gets_a_new_interpreter(sqlite_url, tmp_path):
    """SQLite keeps per-process state for each open file: a child forked while this process has the database
    open could not lock it, so it starts as a new interpreter instead."""
    engine = engine_with_node(sqlite_url)
    with engine.connect():
        writer = WriterProcess(sqlite_url, str(tmp_path / "spool.db"), linger=0.0)
        writer.start()
    try:
        assert isinstance(writer._child.proc, subprocess.Popen)
        writer.submit(record())
        assert writer.flush(30)
    finally:
        writer.close()
    assert counts(engine) == (1, 1, 1)


def test_forking_is_refused_beside_another_thread_or_an_open_database_file(sqlite_url):
    engine = engine_with_node(sqlite_url)
    files = [sa.engine.make_url(sqlite_url).database]
    with engine.connect():
        assert writerproc._holds(files)
    engine.dispose()
    assert not writerproc._holds(files)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not writerproc._alone()
    finally:
        stop.set()
        other.join()


def _big(n: int) -> list:
    """``n`` records of ~1 KB each: a few hundred fill a pipe."""
    return [record(payload=os.urandom(500).hex()) for _ in range(n)]  # distinct: pickle shares equal objects


def test_records_a_busy_child_cannot_take_wait_in_the_relays_journal_not_in_memory(sqlite_url, tmp_path):
    engine = engine_with_node(sqlite_url)
    spool = str(tmp_path / "spool.db")
    writer = WriterProcess(sqlite_url, spool, batch_size=50, linger=0.0, max_in_flight=64 * 1024)
    writer.start()
    blocker = _lock_database(sqlite_url)  # the child is alive and reports, but writes nothing
    try:
        for item in _big(2000):
            writer.submit(item)
        # In memory: at most what the cap allows (~60 records of ~1 KB); the rest is on disk.
        wait_for(lambda: writer.stats().queued <= 120, what="the records beyond the cap journaled")
        stats = writer.stats()
        assert stats.queued + stats.spooled == 2000
        assert Path(relay_journal_path(spool)).exists()
        assert not stats.stalled and stats.stalls == 0  # busy, not stalled: its heartbeat still comes
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(120)
    writer.close()
    assert counts(engine) == (2000, 2000, 2000)
    assert (writer.stats().lost, writer.stats().stalls) == (0, 0)
    assert not Path(relay_journal_path(spool)).exists()  # an empty journal is removed


def test_a_stopped_child_is_counted_replaced_and_its_records_written_once(db_url, engine, tmp_path):
    writer = WriterProcess(db_url, str(tmp_path / "spool.db"), batch_size=50, linger=0.0, stall_after=1.0)
    writer.start()
    first = writer._child.proc
    try:
        for _ in range(10):
            writer.submit(record())
        assert writer.flush(60)
        first.send_signal(signal.SIGSTOP)
        for item in _big(300):  # more than its pipe holds
            writer.submit(item)
        wait_for(lambda: writer.stats().stalls == 1, what="the stall counted")
        assert "stalled" in writer.stats().last_error and not writer.stats().db_ok
        assert writer.flush(60)  # by a new child
        assert first.wait(10) == -signal.SIGKILL
        assert writer._child.proc is not first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGCONT)
        writer.close()
    assert counts(engine) == (310, 310, 310)
    stats = writer.stats()
    assert (stats.lost, stats.stalls, stats.stalled) == (0, 1, False)


def test_close_with_a_stopped_child_ends_within_the_stall_bound_and_keeps_its_records(db_url, engine, tmp_path):
    """A SIGTERM with a stopped writer process: the relay ends, its pipe full, within the stall bound, and
    what the child did not settle is written by the next start."""
    spool = str(tmp_path / "spool.db")
    writer = WriterProcess(db_url, spool, batch_size=50, linger=0.0, stall_after=1.0)
    writer.start()
    first = writer._child.proc
    try:
        writer.submit(record())
        assert writer.flush(60)
        first.send_signal(signal.SIGSTOP)
        for item in _big(300):
            writer.submit(item)
        closer = threading.Thread(target=writer.close, args=(30.0,))
        began = time.monotonic()
        closer.start()
        closer.join(15)
        took = time.monotonic() - began
        assert not closer.is_alive(), "close hung on a stopped writer process"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGCONT)
    assert took < 1.0 + 3.0  # its stall bound, and some time to journal the records
    assert writer.stats().lost == 0
    again = WriterProcess(db_url, spool, linger=0.0)
    again.start()
    assert again.flush(60)
    again.close()
    assert counts(engine) == (301, 301, 301)
