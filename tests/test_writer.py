"""The writer thread and its spool: batching, flush on close, DB outages, crash replay, bad records."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import subprocess

import pytest
import sqlalchemy as sa

from store.engine import make_engine
from store.records import NodeStateUpdate, Usage
from store.schema import codex_invocations, nodes
from store.write.journal import Spool, SpoolInUse, decode, default_spool_path, encode
from store.write.writer import Writer
from tests.support.databases import at_head, counts, engine_with_node, modes, record
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for


def writer_through(proxy: TcpProxy, url: str, tmp_path) -> Writer:
    """A started writer reaching ``url``'s server only through ``proxy`` (to cut or freeze it)."""
    via_proxy = sa.engine.make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
    writer = Writer(make_engine(via_proxy), Spool(tmp_path / "spool.db"), max_backoff=0.5)
    writer.start()
    return writer


@pytest.fixture
def engine(db_url):
    eng = engine_with_node(at_head(db_url))
    yield eng
    eng.dispose()


def test_records_are_written_in_batches_and_close_flushes(engine, db_url):
    writer = Writer(make_engine(db_url), batch_size=200)
    writer.start()
    for _ in range(1000):
        writer.submit(record(usage=Usage(3, 1, 0, 2, 0)))
    assert writer.flush(60)
    stats = writer.stats()
    assert (stats.written, stats.queued, stats.spooled) == (1000, 0, 0)
    assert 5 <= stats.batches < 1000  # batched, not one transaction per record
    for _ in range(100):
        writer.submit(record())
    writer.close()  # SIGTERM path: everything queued is written
    assert counts(engine) == (1100, 1100, 1100)


def test_a_record_the_database_refuses_is_kept_aside_and_the_rest_written(engine, db_url, tmp_path):
    spool = Spool(tmp_path / "spool.db")
    writer = Writer(make_engine(db_url), spool)
    writer.start()
    bad = record()
    bad.occurred_at = None  # NOT NULL: refused on every database
    for r in [record(), bad, record()]:
        writer.submit(r)
    assert writer.flush(60)
    assert writer.stats().rejected == 1
    assert spool.rejected_count() == 1
    assert counts(engine) == (2, 2, 2)
    writer.close()
    assert (tmp_path / "spool.db").exists()  # the rejected record is still there for an operator


def test_journal_from_a_crashed_run_is_written_once(engine, db_url, tmp_path):
    path = tmp_path / "spool.db"
    earlier = [record(usage=Usage(10, 0, 0, 1, 0)) for _ in range(30)]
    crashed = Spool(path)
    crashed.append(earlier)
    crashed._lock_file.close()  # what a SIGKILL leaves behind: the journal, no lock holder
    writer = Writer(make_engine(db_url), Spool(path))
    writer.start()
    for r in earlier[:10]:  # the same records once more (their batch had committed after all)
        writer.submit(r)
    assert writer.flush(60)
    writer.close()
    assert counts(engine) == (30, 30, 30)
    assert writer.stats().duplicates == 10
    assert not path.exists()  # drained journals are removed


def test_outage_spools_and_replays_exactly_once(mariadb, tmp_path):
    url = mariadb
    direct = engine_with_node(at_head(url))
    try:
        with TcpProxy("127.0.0.1", sa.engine.make_url(url).port or 3306) as proxy:
            writer = writer_through(proxy, url, tmp_path)
            for _ in range(50):
                writer.submit(record())
            assert writer.flush(60)
            proxy.cut()
            for _ in range(200):
                writer.submit(record())
            writer.submit(NodeStateUpdate("a", failed_attempt=True, last_error="while the DB was away"))
            wait_for(lambda: writer.stats().spooled == 201, what="records to reach the spool")
            assert not writer.stats().db_ok
            assert writer.stats().spool_oldest_s is not None
            assert counts(direct) == (50, 50, 50)  # nothing written while it was away, nothing lost either
            proxy.restore()
            assert writer.flush(60)
            writer.close()
        assert counts(direct) == (250, 250, 251)
        with direct.connect() as conn:
            assert conn.execute(sa.select(nodes.c.fail_count, nodes.c.last_error)).one() == (
                1, "while the DB was away")
        assert not (tmp_path / "spool.db").exists()
    finally:
        direct.dispose()


# Over MariaDB's max_allowed_packet (16 MiB here): the server drops the connection (2006).
OVERSIZED = "x" * 17_000_000


def rejected_errors(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT error FROM rejected")]
    finally:
        db.close()


def test_an_oversized_record_never_blocks_its_batch_nor_the_next_start(mariadb, tmp_path):
    direct = engine_with_node(at_head(mariadb))
    path = tmp_path / "spool.db"
    writer = Writer(make_engine(mariadb), Spool(path))
    big_raw = record(raw_response=OVERSIZED)  # trimmed at the store boundary: stored, flagged
    big_payload = record(payload=OVERSIZED)  # not trimmed: the database refuses it
    normal = [record() for _ in range(6)]
    for r in [*normal[:3], big_raw, big_payload, *normal[3:]]:
        writer.submit(r)  # before start: all in one batch
    writer.start()
    assert writer.flush(60)
    assert counts(direct) == (7, 7, 7)
    stats = writer.stats()
    assert (stats.written, stats.rejected, stats.spooled, stats.lost, stats.db_ok) == (7, 1, 0, 0, True)
    with direct.connect() as conn:
        c = codex_invocations.c
        assert conn.execute(sa.select(sa.func.length(c.raw_response), c.flags)
                            .where(c.invoke_id == big_raw.invoke_id)).one() == (65536, "raw_trimmed")
    writer.close()
    # The server drops the connection over the packet: "gone away" (2006) or, when it resets the socket
    # mid-send, "lost connection" (2013); either way the record alone is blamed, not an outage.
    assert len(errors := rejected_errors(path)) == 1 and ("2006" in errors[0] or "2013" in errors[0])
    assert "dropped on this record alone" in errors[0]
    # The next start on the same journal: the refused record stays aside, nothing is retried.
    again = Writer(make_engine(mariadb), Spool(path))
    again.start()
    assert again.flush(60)
    assert (again.stats().written, again.stats().spooled, again.stats().db_ok) == (0, 0, True)
    again.close()
    assert counts(direct) == (7, 7, 7)
    direct.dispose()


def test_an_oversized_record_journaled_by_an_earlier_run_is_set_aside(mariadb, tmp_path):
    direct = engine_with_node(at_head(mariadb))
    path = tmp_path / "spool.db"
    crashed = Spool(path)
    crashed.append([record(), record(payload=OVERSIZED), record(), NodeStateUpdate("a", failed_attempt=True)])
    crashed._lock_file.close()
    writer = Writer(make_engine(mariadb), Spool(path))
    writer.start()
    assert writer.flush(60)
    stats = writer.stats()
    writer.close()
    assert counts(direct) == (2, 2, 3)
    assert (stats.written, stats.rejected, stats.spooled, stats.db_ok) == (2, 1, 0, True)
    direct.dispose()


@pytest.mark.slow
def test_a_frozen_database_sends_records_to_the_journal_within_seconds(mariadb, tmp_path):
    direct = engine_with_node(at_head(mariadb))
    with TcpProxy("127.0.0.1", sa.engine.make_url(mariadb).port or 3306) as proxy:
        writer = writer_through(proxy, mariadb, tmp_path)
        for _ in range(10):
            writer.submit(record())
        assert writer.flush(60)  # a pooled connection through the proxy, idle when the server freezes
        proxy.freeze()
        for _ in range(20):
            writer.submit(record())
        # Two read timeouts (the pool's pre-ping, its reconnect's handshake): about 8 s.
        wait_for(lambda: writer.stats().spooled == 20, timeout=15, what="records in the journal")
        assert not writer.stats().db_ok
        proxy.restore()
        assert writer.flush(60)
        writer.close()
    assert counts(direct) == (30, 30, 30)  # written exactly once
    direct.dispose()


class FullDisk(Spool):
    def append(self, items):
        raise sqlite3.OperationalError("database or disk is full")


def test_records_neither_written_nor_journaled_are_counted_lost(tmp_path, caplog):
    # A directory as the database file: every connection fails, as on a full or broken disk.
    writer = Writer(make_engine(f"sqlite:///{tmp_path}"), FullDisk(None))
    writer.start()
    with caplog.at_level(logging.ERROR, logger="codex.writer"):
        for _ in range(5):
            writer.submit(record())
        assert writer.flush(60)
    stats = writer.stats()
    writer.close()
    assert (stats.lost, stats.spooled, stats.written, stats.db_ok) == (5, 0, 0, False)
    assert "lost" in caplog.text and "database or disk is full" in caplog.text


def test_a_full_journal_counts_what_it_cannot_take_as_lost(tmp_path, caplog):
    writer = Writer(make_engine(f"sqlite:///{tmp_path}"), Spool(None, max_items=3))
    writer.start()
    for _ in range(5):
        writer.submit(record())
    assert writer.flush(60)
    stats = writer.stats()
    assert (stats.lost, stats.spooled, stats.db_ok) == (2, 3, False)
    with caplog.at_level(logging.ERROR, logger="codex.writer"):
        writer.close()  # an in-memory journal ends with the process: its records are lost too, and said so
    assert "3 record(s) lost" in caplog.text


def test_one_spool_per_process(tmp_path):
    first = Spool(tmp_path / "s.db")
    with pytest.raises(SpoolInUse, match=f"in use by relay pid {os.getpid()}: give each instance its own codex_spool"):
        Spool(tmp_path / "s.db")
    first.close()
    Spool(tmp_path / "s.db").close()


def _held_for(path, relay_pid: int):
    """The journal's lock taken as another process would (its own open file), naming ``relay_pid``."""
    lock = open(str(path) + ".lock", "w")  # noqa: SIM115 - the test closes it
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{relay_pid}\n")
    lock.flush()
    return lock


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # ended and reaped: no process has this pid now
    return proc.pid


def test_a_spool_held_for_a_relay_that_is_gone_is_waited_for(tmp_path, caplog):
    """A relay killed outright leaves its writer process finishing (store.write.process): the next start waits."""
    lock = _held_for(tmp_path / "s.db", _gone_pid())

    class ReleaseWhenWaiting(logging.Handler):  # the old writer ends while the new relay waits
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it to finish" in record.getMessage():
                lock.close()

    handler = ReleaseWhenWaiting()
    logging.getLogger("codex.writer").addHandler(handler)
    try:
        spool = Spool(tmp_path / "s.db", orphan_wait=60)
    finally:
        logging.getLogger("codex.writer").removeHandler(handler)
    assert lock.closed
    assert (tmp_path / "s.db.lock").read_text() == f"{os.getpid()}\n"  # it names its relay now
    spool.close()


def test_a_spool_still_held_after_the_wait_is_an_error_naming_its_relay(tmp_path):
    pid = _gone_pid()
    lock = _held_for(tmp_path / "s.db", pid)
    try:
        with pytest.raises(SpoolInUse, match=f"still held 0.2 s after its relay \\(pid {pid}\\) ended"):
            Spool(tmp_path / "s.db", orphan_wait=0.2)
    finally:
        lock.close()


def test_spool_codec_round_trip():
    r = record(usage=Usage(1, 2, 3, 4, 5), model="m", client_key="k", attempts=3, flags=["no_usage"])
    assert decode(encode(r)) == r
    older = json.loads(encode(r))  # a journal entry written before records had flags
    del older["invocation"]["flags"]
    assert decode(json.dumps(older)).flags == []
    u = NodeStateUpdate("a", failed=True, pinged=True, last_ping_ms=5)
    assert decode(encode(u)) == u


def test_default_spool_paths():
    assert default_spool_path("sqlite:///data/codex.db") == "data/codex.db.spool"
    assert default_spool_path("sqlite:///data/codex.db", 8001) == "data/codex.db.8001.spool"
    assert default_spool_path("sqlite:///data/codex.db", 0) == "data/codex.db.spool"  # a port the system picks
    mysql = "mysql+pymysql://root@127.0.0.1/a"
    assert default_spool_path(mysql, 8001) != default_spool_path(mysql, 8002) != default_spool_path(mysql)
    assert default_spool_path("sqlite://") is None
    a = default_spool_path("mysql+pymysql://root:secret@127.0.0.1/a")
    assert a != default_spool_path("mysql+pymysql://root@127.0.0.1/b")
    assert "secret" not in a


@pytest.mark.usefixtures("umask_022")
def test_the_journal_and_its_wal_files_are_private_to_their_owner(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    spool.append([NodeStateUpdate("a", last_error="x")])
    found = modes(tmp_path, "spool.db")
    spool.close()
    assert {"spool.db", "spool.db-wal", "spool.db-shm"} <= found.keys(), found
    assert {found[n] for n in ("spool.db", "spool.db-wal", "spool.db-shm")} == {0o600}, found
