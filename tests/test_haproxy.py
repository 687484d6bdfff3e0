"""Several relays behind Debian's HAProxy with the shipped configuration (examples/haproxy.cfg,
docs/several-relays.md): one Codex session stays on one relay and one node, and moves to the other relay
when its relay stops.

Without /usr/sbin/haproxy this skips locally and fails under CI=true; ``./run.sh test`` installs it when
it can (as root, with apt-get).
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.calls import call, write_nodes
from tests.support.ci import unavailable
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.haproxy import HAPROXY, haproxy_config, start_haproxy
from tests.support.ports import accepts, free_port
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def haproxy_bin() -> Path:
    if not HAPROXY.exists():
        reason = f"{HAPROXY} not installed (./run.sh test installs Debian's haproxy when run as root)"
        unavailable("the HAProxy test", reason)
    return HAPROXY


@pytest.mark.slow
def test_a_session_stays_on_one_relay_and_one_node_and_moves_when_its_relay_stops(haproxy_bin, mariadb, tmp_path):
    with FakeUpstream("n1") as n1, FakeUpstream("n2") as n2:
        nodes = write_nodes(tmp_path / "nodes.toml", [("n1", n1.base_url, "k1", 1), ("n2", n2.base_url, "k2", 1)])
        relays = {name: RelayProcess(db_url=mariadb, options={
            "codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_source": name,
            "codex_spool": str(tmp_path / f"spool-{name}.db")}) for name in ("relay1", "relay2")}
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        proc = None
        try:
            for relay in relays.values():
                relay.start()
            config.write_text(haproxy_config(port, [r.port for r in relays.values()]))
            proc = subprocess.Popen([str(haproxy_bin), "-db", "-f", str(config)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            wait_for(lambda: accepts(port) or proc.poll() is not None, 10, "haproxy listening")
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            front = SimpleNamespace(port=port)
            session = {"session-id": "019a-codex-session"}
            for _ in range(20):
                assert call(front, "responses", stream=True, usage=(10, 0, 2, 0), headers=session)[0] == 200
            wait_for(lambda: len(rows(mariadb, "SELECT id FROM codex_invocations")) == 20, 10, "20 rows written")
            served = rows(mariadb, "SELECT DISTINCT source, node_id FROM codex_invocations")
            assert len(served) == 1, served
            first = served[0].source
            relays[first].stop()
            for _ in range(5):  # HAProxy retries a refused connection on the other relay
                assert call(front, "responses", stream=True, usage=(10, 0, 2, 0), headers=session)[0] == 200
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
            for relay in relays.values():
                relay.stop()
    got = rows(mariadb, "SELECT source, node_id, COUNT(*) AS n, COUNT(DISTINCT invoke_id) AS ids "
                        "FROM codex_invocations GROUP BY source, node_id ORDER BY source = :first DESC",
               first=first)
    assert [(r.source == first, r.n, r.ids) for r in got] == [(True, 20, 20), (False, 5, 5)]


@pytest.mark.slow
def test_a_rolling_restart_of_two_relays_behind_haproxy_costs_clients_nothing(haproxy_bin, mariadb, tmp_path):
    """docs/several-relays.md, rolling restart: SIGTERM one relay, start it again, then the other, under load."""
    behaviour = Behaviour(event_delay=0.01, deltas=10)  # each call streams for ~0.1 s: some are always in flight
    with FakeUpstream("n1", behaviour=behaviour) as n1, ExitStack() as stack:
        nodes = write_nodes(tmp_path / "nodes.toml", [("n1", n1.base_url, "k1", 1)])

        def relay(name: str, port: int) -> RelayProcess:
            # As docs/several-relays.md starts them: a port each, no journal option (each has its own), the
            # health check failed for 3 s after SIGTERM before the listener closes.
            return RelayProcess(db_url=mariadb, extra_args=["-p", str(port)], options={
                "codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_source": name,
                "codex_drain_delay": "3"})

        relays = [relay("relay1", free_port()).spawn(), relay("relay2", free_port()).spawn()]
        for r in relays:
            r.ready()
            stack.callback(lambda r=r: r.stop())
        port, _ = start_haproxy(stack, [r.port for r in relays], tmp_path)
        front = SimpleNamespace(port=port)
        answers: list[object] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    status, body = call(front, "responses", stream=True, usage=(10, 0, 2, 0))
                    answers.append(status if b"response.completed" in body else body[:200])
                except (OSError, http.client.HTTPException) as e:
                    answers.append(repr(e))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        try:
            for i, old in enumerate(list(relays)):
                wait_for(lambda i=i: len(answers) >= 20 * (i + 1), 30, "calls through both relays")
                old.proc.send_signal(signal.SIGTERM)
                assert old.proc.wait(60) == 0, old.output()
                new = relay(f"relay{i + 1}-restarted", old.port).start()
                stack.callback(new.stop)
                # HAProxy's check finds it back (rise 2, inter 1s) and sends it calls again.
                wait_for(lambda n=new: rows(mariadb, "SELECT 1 FROM codex_invocations WHERE source = :s LIMIT 1",
                                            s=n.options["codex_source"]), 30, "calls on the restarted relay")
        finally:
            stop.set()
            for c in clients:
                c.join(60)
    assert [a for a in answers if a != 200] == []
    recorded = rows(mariadb, "SELECT source, COUNT(*) AS n FROM codex_invocations GROUP BY source")
    assert sum(r.n for r in recorded) == len(answers), recorded  # every answered call, once
    assert {r.source for r in recorded} == {"relay1", "relay2", "relay1-restarted", "relay2-restarted"}
