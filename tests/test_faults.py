"""Lose nothing: DB outages, crashes, many restarts and two relays on one MariaDB (``-m fault``)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import relayproc
from tests.support.calls import write_nodes
from tests.support.databases import at_head, rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.e2e]


def drive(port: int, total: int, clients: int = 4, usage: tuple[int, int, int, int] = (10, 2, 5, 1)) -> list[int]:
    """``total`` streamed Responses calls over ``clients`` keep-alive connections; their statuses."""
    statuses: list[int] = []
    lock = threading.Lock()
    body = json.dumps({"model": "gpt-5-codex", "stream": True, "metadata": {"fake_usage": list(usage)}})
    counter = iter(range(total))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                conn.request("POST", "/v1/responses", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    statuses.append(resp.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def spooled(path) -> int:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return db.execute("SELECT count(*) FROM spool").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def durable(db_url: str, *journals: Path) -> set[str]:
    """The invoke ids of the calls stored in the database or waiting in ``journals``."""
    ids = {r.invoke_id for r in rows(db_url, "SELECT invoke_id FROM codex_invocations")}
    for path in journals:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            continue
        try:
            ids.update(json.loads(item)["invocation"]["invoke_id"] for (item,) in db.execute("SELECT item FROM spool"))
        except sqlite3.OperationalError:  # not made yet
            pass
        finally:
            db.close()
    return ids


def totals(db_url: str) -> tuple[int, int, int, int, int]:
    """(invocation rows, distinct invoke ids, sum of node requests, sum of input tokens on rows, on nodes)."""
    inv = rows(db_url, "SELECT COUNT(*) AS n, COUNT(DISTINCT invoke_id) AS d, "
                       "COALESCE(SUM(input_tokens), 0) AS i FROM codex_invocations")[0]
    node = rows(db_url, "SELECT COALESCE(SUM(requests), 0) AS r, COALESCE(SUM(total_input), 0) AS i FROM nodes")[0]
    return int(inv.n), int(inv.d), int(node.r), int(inv.i), int(node.i)


@pytest.fixture
def upstreams(tmp_path):
    a, b = FakeUpstream("a").start(), FakeUpstream("b").start()
    nodes = write_nodes(tmp_path / "nodes.toml", [("a", a.base_url, "key-a", 1), ("b", b.base_url, "key-b", 1)])
    yield nodes
    a.stop()
    b.stop()


@pytest.fixture
def mysql_behind_proxy(mariadb):
    """A MariaDB database reached through a TCP proxy the test can cut: an outage on demand."""
    url = sa.engine.make_url(mariadb)
    with TcpProxy(url.host or "127.0.0.1", url.port or 3306) as proxy:
        yield mariadb, url.set(port=proxy.port).render_as_string(hide_password=False), proxy


def test_db_outage_keeps_relaying_and_writes_everything_once(mysql_behind_proxy, upstreams, tmp_path):
    direct, via_proxy, proxy = mysql_behind_proxy
    spool = tmp_path / "spool.db"
    options = {"codex_nodes": str(upstreams), "codex_spool": str(spool), "codex_ping_interval": "0"}
    with RelayProcess(db_url=via_proxy, options=options) as relay:
        assert drive(relay.port, 20) == [200] * 20
        wait_for(lambda: totals(direct)[0] == 20, what="the first rows")
        proxy.cut()
        assert drive(relay.port, 60) == [200] * 60  # relaying goes on without the database
        wait_for(lambda: spooled(spool) == 60, what="60 records in the spool")
        assert totals(direct)[0] == 20
        proxy.restore()
        wait_for(lambda: totals(direct)[0] == 80, what="the spool to drain")
    assert relay.proc.returncode == 0
    n, distinct, requests, inv_input, node_input = totals(direct)
    assert (n, distinct, requests) == (80, 80, 80)
    assert inv_input == node_input == 80 * 10
    out = relay.output()
    assert "database unreachable" in out and "record(s) waiting" in out and "database is back" in out
    assert not spool.exists()


def test_sigkill_while_spooling_loses_nothing_acknowledged(mysql_behind_proxy, upstreams, tmp_path):
    direct, via_proxy, proxy = mysql_behind_proxy
    spool = tmp_path / "spool.db"
    options = {"codex_nodes": str(upstreams), "codex_spool": str(spool), "codex_ping_interval": "0"}
    relay = RelayProcess(db_url=via_proxy, options=options).start()
    try:
        proxy.cut()
        assert drive(relay.port, 40) == [200] * 40
        wait_for(lambda: spooled(spool) == 40, what="40 records in the spool")
    finally:
        relay.kill()  # a crash: no flush, no goodbye
    proxy.restore()
    assert totals(direct)[0] == 0
    with RelayProcess(db_url=via_proxy, options=options) as relay:
        wait_for(lambda: totals(direct)[0] == 40, what="the journal of the crashed run")
        assert drive(relay.port, 5) == [200] * 5
    n, distinct, requests, inv_input, node_input = totals(direct)
    assert (n, distinct, requests) == (45, 45, 45)
    assert inv_input == node_input


def test_sigterm_flushes_every_record(db_url, upstreams):
    relay = RelayProcess(db_url=db_url, options={"codex_nodes": str(upstreams)}).start()
    try:
        assert drive(relay.port, 200, clients=8) == [200] * 200
    finally:
        assert relay.stop() == 0  # straight after the last response: whatever is queued must be written
    assert totals(db_url)[:3] == (200, 200, 200)


@pytest.mark.slow
def test_fifty_restarts_keep_node_counters_equal_to_rows(db_url, upstreams, tmp_path):
    """The seed's bug at scale: every start upserts the nodes; no start may reset or skip a count.

    Each relay is forked from the session's warm interpreter (tests.support.warm: its own process running
    mitmdump's main, without re-importing mitmproxy) and boots while the one before it serves and stops, so every
    start's upsert also races the previous relay's last writes; each has its own spool file. The schema is there
    before the first start (at_head): creating it is the subject of other tests, and takes the first start
    seconds on MariaDB.
    """
    at_head(db_url)
    assert relayproc.default_zygote is not None, "the relays fork warm (conftest's warm_relays)"
    with contextlib.ExitStack() as stack:  # whatever fails, no relay outlives the test

        def relay(i: int) -> RelayProcess:
            options = {"codex_nodes": str(upstreams), "codex_ping_interval": "0",
                       "codex_spool": str(tmp_path / f"spool-{i}.db")}
            booted = RelayProcess(db_url=db_url, options=options).spawn()
            stack.callback(booted.kill)
            return booted

        booting = relay(0)
        for i in range(50):
            with booting as r:
                if i < 49:
                    booting = relay(i + 1)
                assert drive(r.port, 3, clients=1, usage=(i + 1, 0, 1, 0)) == [200] * 3
            assert r.proc.returncode == 0, r.output()
    n, distinct, requests, inv_input, node_input = totals(db_url)
    assert (n, distinct, requests) == (150, 150, 150)
    assert inv_input == node_input == 3 * sum(range(1, 51))
    assert not any(tmp_path.glob("spool-*.db")), "a relay left records in its spool"


@pytest.mark.slow
def test_two_relays_on_one_mariadb_count_exactly(mariadb, upstreams, tmp_path):
    url = mariadb
    relays = [RelayProcess(db_url=url, options={"codex_nodes": str(upstreams), "codex_ping_interval": "0",
                                                "codex_spool": str(tmp_path / f"spool-{i}.db")})
              for i in range(2)]
    for r in relays:
        r.start()
    try:
        results: list[list[int]] = [[], []]

        def run(i: int) -> None:
            results[i] = drive(relays[i].port, 2000, clients=8, usage=(7, 3, 2, 1))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        codes = [r.stop() for r in relays]
    assert codes == [0, 0]
    assert results == [[200] * 2000, [200] * 2000]
    n, distinct, requests, inv_input, node_input = totals(url)
    assert (n, distinct, requests) == (4000, 4000, 4000)
    assert inv_input == node_input == 4000 * 7
    node = rows(url, "SELECT SUM(total_cached) AS c, SUM(total_output) AS o, SUM(total_reasoning) AS r "
                     "FROM nodes")[0]
    assert (node.c, node.o, node.r) == (4000 * 3, 4000 * 2, 4000 * 1)
    daily = rows(url, "SELECT SUM(requests) AS n, SUM(input_tokens) AS i FROM codex_daily_stats")[0]
    assert (daily.n, daily.i) == (4000, 4000 * 7)


def test_spool_file_of_another_relay_is_refused(db_url, upstreams, tmp_path):
    spool = tmp_path / f"spool-{uuid.uuid4().hex}.db"
    options = {"codex_nodes": str(upstreams), "codex_spool": str(spool), "codex_ping_interval": "0"}
    with RelayProcess(db_url=db_url, options=options) as first:
        second = RelayProcess(db_url=db_url, options=options).start()
        try:
            assert second.proc.wait(60) != 0  # mitmproxy's start-up check exits on the logged error
        finally:
            second.kill()
        # At once, naming the relay that holds it: that one is alive, so this is no writer to wait for.
        assert "codex_spool: spool" in second.output()
        assert f"in use by relay pid {first.proc.pid}: give each instance its own codex_spool" in second.output()


def test_truncated_stream_and_client_abort_are_recorded_as_such(db_url, tmp_path):
    hold = threading.Event()
    with FakeUpstream("t", behaviour=Behaviour(close_mid_stream=True)) as cut, \
            FakeUpstream("h", behaviour=Behaviour(hold=hold)) as held:
        options = {"codex_ping_interval": "0", "codex_fail_threshold": "100"}
        nodes = write_nodes(tmp_path / "cut.toml", [("cut", cut.base_url, "k", 1)])
        with RelayProcess(db_url=db_url, options={**options, "codex_nodes": str(nodes)}) as relay:
            # The upstream drops the connection after its first event: the client gets that event, the
            # row says truncated, and it counts against the node.
            status, body = drive_one(relay.port)
            assert status == 200 and b"response.created" in body and b"response.completed" not in body
            wait_for(lambda: rows(db_url, "SELECT id FROM codex_invocations"), what="the truncated row")

        nodes = write_nodes(tmp_path / "held.toml", [("held", held.base_url, "k", 1)])
        with RelayProcess(db_url=db_url, options={**options, "codex_nodes": str(nodes)}) as relay:
            # The client reads the first event and hangs up while the upstream is still streaming.
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
            body = json.dumps({"model": "m", "stream": True, "metadata": {"fake_usage": [1, 0, 1, 0]}}).encode()
            sock.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            got = b""
            while b"response.created" not in got:
                chunk = sock.recv(65536)
                assert chunk
                got += chunk
            sock.close()
            wait_for(lambda: len(rows(db_url, "SELECT id FROM codex_invocations")) == 2, what="the aborted row")
            hold.set()
    got = rows(db_url, "SELECT node_id, status, error_message FROM codex_invocations ORDER BY id")
    assert [(r.node_id, r.status) for r in got] == [("cut", "truncated"), ("held", "aborted")]
    node = {r.id: r for r in rows(db_url, "SELECT id, requests, fail_count FROM nodes")}
    assert (node["cut"].requests, node["cut"].fail_count) == (1, 1)
    assert (node["held"].requests, node["held"].fail_count) == (1, 0)  # a client abort is not the node's fault


def drive_one(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/responses", json.dumps({"model": "m", "stream": True,
                                                          "metadata": {"fake_usage": [1, 0, 1, 0]}}),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        try:
            return resp.status, resp.read()
        except http.client.IncompleteRead as e:
            return resp.status, e.partial
    finally:
        conn.close()


# The window docs/guarantees.md states: records of calls answered this long before a SIGKILL of the relay may be
# lost (it batches them for up to half a second, then hands the batch to its writer process).
SIGKILL_WINDOW_S = 0.6


def writer_pid(relay: RelayProcess) -> int:
    """The relay's writer process (its child named codex-writer)."""
    def find() -> int | None:
        for pid in Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "codex-writer":
                    return int(pid)
        return None
    return wait_for(find, timeout=30, what="the writer process")


def tagged_rows(db_url: str) -> list[int]:
    """The input tokens of every stored call: each test call carries its own (its tag)."""
    return [int(r.input_tokens) for r in rows(db_url, "SELECT input_tokens FROM codex_invocations")]


def call(conn: http.client.HTTPConnection, tag: int) -> bool:
    """One streamed call tagged ``tag`` (its input tokens); whether it was answered in full."""
    body = json.dumps({"model": "gpt-5-codex", "stream": True, "metadata": {"fake_usage": [tag, 0, 1, 0]}})
    conn.request("POST", "/v1/responses", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status == 200


def settle_journals(db_url: str, options: dict[str, str], spool: Path) -> None:
    """Start a relay on the same journals, let it write what an earlier run left, and stop it (SIGTERM)."""
    with RelayProcess(db_url=db_url, options=options):
        wait_for(lambda: spooled(f"{spool}.relay") == 0 and spooled(spool) == 0, what="both journals written")


def test_sigkill_loses_only_the_calls_of_its_last_moments(db_url, upstreams, tmp_path):
    """Calls answered up to the kill of the relay (not of its writer process, which then writes what it had):
    only those of the last SIGKILL_WINDOW_S may lack a row."""
    spool = tmp_path / "spool.db"
    options = {"codex_nodes": str(upstreams), "codex_spool": str(spool), "codex_ping_interval": "0"}
    relay = RelayProcess(db_url=db_url, options=options).start()
    answered: dict[int, float] = {}
    stop = threading.Event()

    def client(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
        tag = first
        with contextlib.suppress(OSError, http.client.HTTPException):
            while not stop.is_set():
                if call(conn, tag):
                    answered[tag] = time.monotonic()
                tag += 4
        conn.close()

    clients = [threading.Thread(target=client, args=(1000 + i,)) for i in range(4)]
    try:
        for t in clients:
            t.start()
        # Long enough that the calls of the last window are a part of them only.
        wait_for(lambda: len(answered) >= 150 and time.monotonic() - min(answered.values()) > 2.0,
                 what="150 answered calls over 2 s")
        killed_at = time.monotonic()
        os.kill(relay.proc.pid, signal.SIGKILL)  # the relay alone: its writer process gets EOF
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        relay.kill()
    settle_journals(db_url, options, spool)
    stored = tagged_rows(db_url)
    assert len(stored) == len(set(stored))  # none twice
    lost = {tag: killed_at - at for tag, at in answered.items() if tag not in set(stored)}
    assert all(age <= SIGKILL_WINDOW_S for age in lost.values()), f"lost, seconds before the kill: {lost}"
    assert len(stored) >= len(answered) - len(lost)


@contextlib.contextmanager
def relay_with_a_stopped_writer(db_url: str, upstreams, tmp_path) -> Iterator[tuple[RelayProcess, dict, object]]:
    """A relay whose writer process is SIGSTOPped: (relay, its options, its journal); both ended afterwards."""
    spool = tmp_path / "spool.db"
    options = {"codex_nodes": str(upstreams), "codex_spool": str(spool), "codex_ping_interval": "0"}
    relay = RelayProcess(db_url=db_url, options=options).start()
    stopped = writer_pid(relay)
    try:
        os.kill(stopped, signal.SIGSTOP)
        yield relay, options, spool
    finally:
        relay.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)


def test_a_stopped_writer_process_loses_nothing_and_sigterm_ends_within_its_bound(db_url, upstreams, tmp_path):
    with relay_with_a_stopped_writer(db_url, upstreams, tmp_path) as (relay, options, spool):
        assert drive(relay.port, 20) == [200] * 20
        began = time.monotonic()
        assert relay.stop(timeout=60) == 0
        took = time.monotonic() - began
    assert took < 3.0 + 3.0, f"SIGTERM took {took:.1f} s with a stopped writer process"  # its stall bound
    assert "stalled" in relay.output()
    settle_journals(db_url, options, spool)
    assert totals(db_url)[:3] == (20, 20, 20)


def test_a_writer_process_stopped_under_traffic_is_replaced_and_sigkill_then_loses_nothing(db_url, upstreams,
                                                                                          tmp_path):
    """The issue's case: 300 calls with the writer process stopped, then SIGKILL (170 of 300 were lost)."""
    with relay_with_a_stopped_writer(db_url, upstreams, tmp_path) as (relay, options, spool):
        assert drive(relay.port, 300) == [200] * 300
        # Noticed: from then on its records are in the relay's journal or written by a new writer process,
        # never held for the stopped one. (A drive longer than the stall bound would otherwise have its last
        # calls still in the relay's queue at the kill: the SIGKILL window, not what is tested here.)
        wait_for(lambda: "stalled" in relay.output(), what="the stall noticed")
        wait_for(lambda: len(durable(db_url, Path(f"{spool}.relay"), spool)) == 300, what="every call on disk")
        os.kill(relay.proc.pid, signal.SIGKILL)
    settle_journals(db_url, options, spool)
    assert totals(db_url)[:3] == (300, 300, 300)
