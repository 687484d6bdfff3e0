"""Alerts: state changes reach a local webhook receiver (in process), a flapping node's last message its state,
in JSON or Slack form naming the relay, retried when the receiver fails, and without keys; two relays on one
database send one alert per event, and a restart repeats none; the nodes file's [[webhooks]] are checked."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.nodes.breaker import BreakerPolicy
from addon.nodes.routing import Node, NodePool
from addon.observe.alerts import Alerts, Webhook, webhooks_from_file
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store.config import ConfigError
from store.nodes import upsert_nodes
from store.records import NodeConfig, NodeStateUpdate
from store.write.batch import apply_batch
from store.write.writer import WriterStats
from tests.support.databases import fresh_engine
from tests.support.waiting import wait_for

KEY = "sk-alpha-0123456789abcdef"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records the bodies it gets; the first ``fail`` answers are 500."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                if receiver.fail:
                    receiver.fail -= 1
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self) -> list[tuple[str, str]]:
        return [(b["event"], b["subject"]) for b in list(self.bodies)]

    def relays(self) -> list[str]:
        return [b["relay"] for b in list(self.bodies)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def writer_stats(db_ok: bool = True, lost: int = 0, spooled: int = 0, stalls: int = 0) -> WriterStats:
    return WriterStats(queued=0, spooled=spooled, spool_oldest_s=None, written=0, duplicates=0, rejected=0,
                       lost=lost, batches=0, db_ok=db_ok, last_error=None, stalls=stalls)


def fail(node: Node) -> None:
    node.breaker.failure(0.0, BreakerPolicy(threshold=1))


def test_state_changes_are_told_and_a_flapping_node_ends_on_its_state(receiver):
    now = [0.0]
    pool = NodePool([Node(NodeConfig("alpha", "http://127.0.0.1:9/v1", KEY)),
                     Node(NodeConfig("beta", "http://127.0.0.1:9/v1", KEY))])
    stats = [writer_stats()]
    alerts = Alerts([Webhook(receiver.url)], lambda: pool, lambda: stats[0], dedup=300, interval=3600,
                    clock=lambda: now[0])
    alerts.start()
    try:
        alerts.check()  # all fine: nothing
        fail(pool.get("alpha"))
        alerts.check()
        wait_for(lambda: receiver.events() == [("node_failed", "alpha")], timeout=10, what="node_failed")
        pool.get("alpha").breaker.close()
        alerts.check()
        fail(pool.get("alpha"))  # failing again within 5 minutes of its recovery: told, or "back" would stand
        fail(pool.get("beta"))
        alerts.check()
        stats[0] = writer_stats(db_ok=False, spooled=3)
        alerts.check()
        stats[0] = writer_stats(db_ok=True, lost=2)
        alerts.check()
        stats[0] = writer_stats(db_ok=True, lost=2, stalls=1)  # a stalled writer process was replaced
        alerts.check()
        alerts.check()  # counted once
        for _ in range(2):  # alpha flaps: its second recovery is held back, its failure then changes nothing
            pool.get("alpha").breaker.close()
            alerts.check()
            fail(pool.get("alpha"))
            alerts.check()
        pool.get("alpha").breaker.close()
        alerts.check()
        expected = [("node_failed", "alpha"), ("node_recovered", "alpha"), ("node_failed", "alpha"),
                    ("node_failed", "beta"), ("all_nodes_down", "relay"), ("writer_journaling", "relay"),
                    ("writer_recovered", "relay"), ("records_lost", "relay"), ("writer_stalled", "relay")]
        wait_for(lambda: receiver.events() == expected, timeout=10, what="every event once")
        now[0] = 301.0  # the hold is over: alpha's state now (back) is told with no change of it
        alerts.check()
        fail(pool.get("alpha"))  # and its next failure, with every node down again
        alerts.check()
        again = [("node_recovered", "alpha"), ("node_failed", "alpha"), ("all_nodes_down", "relay")]
        wait_for(lambda: receiver.events() == expected + again, timeout=10, what="the events again")
    finally:
        alerts.stop()
    assert all(KEY not in json.dumps(b) for b in receiver.bodies)
    assert "2 record(s) lost" in receiver.bodies[7]["message"]


def test_slack_format_only_chosen_events_and_retries(receiver):
    receiver.fail = 1  # the first post fails: retried
    pool = NodePool([Node(NodeConfig("alpha", "http://127.0.0.1:9/v1", KEY))])
    hooks = [Webhook(receiver.url, "slack", frozenset({"all_nodes_down"}))]
    alerts = Alerts(hooks, lambda: pool, lambda: None, interval=3600, retry_pause=0.01)
    alerts.start()
    try:
        fail(pool.get("alpha"))
        alerts.check()
        wait_for(lambda: receiver.bodies, timeout=10, what="the retried post")
    finally:
        alerts.stop()
    assert receiver.bodies == [{"text": "codex-relay all_nodes_down: all 1 routable nodes are failed"}]


def test_webhooks_from_the_nodes_file(tmp_path):
    path = tmp_path / "nodes.toml"
    path.write_text('[[webhooks]]\nurl = "https://hooks.slack.example/T0/B0/secret"\nformat = "slack"\n'
                    'events = ["node_failed", "records_lost"]\n\n[[webhooks]]\nurl = "http://127.0.0.1:9/a"\n')
    slack, plain = webhooks_from_file(str(path))
    assert (slack.format, slack.events) == ("slack", frozenset({"node_failed", "records_lost"}))
    assert plain.format == "json" and "all_nodes_down" in plain.events
    for bad, message in (('url = "ftp://x/y"', "url must be"), ('url = "http://h/"\nformat = "xml"', "format"),
                         ('url = "http://h/"\nevents = ["nope"]', "events"), ('url = "http://h/"\nto = 1', "unknown")):
        path.write_text(f"[[webhooks]]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            webhooks_from_file(str(path))


def test_runtime_alerts_from_the_nodes_file(tmp_path, receiver):
    path = tmp_path / "nodes.toml"
    path.write_text(f'[[nodes]]\nid = "alpha"\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "{KEY}"\n\n'
                    f'[[webhooks]]\nurl = "{receiver.url}"\nevents = ["node_failed", "node_recovered"]\n')
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    runtime.alerts.interval = 0.05
    with taddons.context(options) as tctx:
        tctx.configure(options, codex_db=f"sqlite:///{tmp_path / 'codex.db'}", codex_ping_interval="0",
                       codex_nodes=str(path), codex_fail_threshold=1,
                       codex_writer_process=False)  # alerts are tested here; the writer in test_writerproc
        try:
            runtime.health.failure(runtime.pool.get("alpha"), "HTTP 502")
            wait_for(lambda: receiver.events() == [("node_failed", "alpha")], timeout=10, what="the alert")
            # Named by host and port (no codex_source here: the relay addon declares it) ...
            assert receiver.relays() == [f"{socket.gethostname()}:8080"]
            tctx.options.add_option("codex_source", str, "relay", "the relay addon's option")
            tctx.configure(options, codex_source="relay-a")  # ... or by codex_source; the alerts start again
            runtime.health.success(runtime.pool.get("alpha"))
            wait_for(lambda: receiver.events() == [("node_failed", "alpha"), ("node_recovered", "alpha")],
                     timeout=10, what="the recovery, and no failure told again")
            assert receiver.relays()[1] == "relay-a"
            with pytest.raises(exceptions.OptionsError, match="codex_alert_dedup"):
                tctx.configure(options, codex_alert_dedup="soon")
        finally:
            options.done()


def test_a_full_queue_drops_and_logs_instead_of_blocking(caplog):
    alerts = Alerts([Webhook("http://127.0.0.1:9/hook")], NodePool, lambda: None, max_queued=1)  # never started
    for node_id in ("alpha", "beta", "gamma"):
        alerts.notify("node_failed", node_id, f"node {node_id} failed")
    assert [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()] == [
        "alert queue full: node_failed for beta not sent to http://127.0.0.1:9",
        "alert queue full: node_failed for gamma not sent to http://127.0.0.1:9"]


def test_two_relays_on_one_database_send_one_alert_per_event_and_a_restart_repeats_none(db_url, receiver):
    configs = [NodeConfig("alpha", "http://127.0.0.1:9/v1", KEY), NodeConfig("beta", "http://127.0.0.1:9/v1", KEY)]
    with fresh_engine(db_url) as engine:
        with engine.begin() as conn:
            upsert_nodes(conn, configs)

        def breaker(node_id: str, failed: bool) -> None:  # what a relay's writer records when a breaker moves
            with engine.begin() as conn:
                apply_batch(conn, [NodeStateUpdate(node_id, failed=failed)])

        def relay(name: str) -> Alerts:  # each relay routes its own pool of the same nodes
            pool = NodePool([Node(c) for c in configs])
            alerts = Alerts([Webhook(receiver.url)], lambda: pool, lambda: None, engine=engine, relay=name,
                            interval=3600)
            alerts.start()
            return alerts

        relays = [relay("r1"), relay("r2")]
        marks = 0

        def round_at_once(*alerters: Alerts) -> list[tuple[str, str]]:
            """One check of every relay at the same moment; then what reached the receiver since the last round
            (each relay's mark comes after whatever it queued before it)."""
            nonlocal marks
            start = len(receiver.bodies)
            barrier = threading.Barrier(len(alerters))
            threads = [threading.Thread(target=lambda a=a: (barrier.wait(), a.check())) for a in alerters]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for a in alerters:
                a.notify("records_lost", f"mark-{marks}", "mark")  # a relay's own event: never claimed
                marks += 1
            wait_for(lambda: sum(b["subject"].startswith("mark-") for b in receiver.bodies[start:]) == len(alerters),
                     timeout=10, what="every relay's mark")
            return [e for e in receiver.events()[start:] if not e[1].startswith("mark-")]

        try:
            assert round_at_once(*relays) == []
            breaker("alpha", True)
            assert round_at_once(*relays) == [("node_failed", "alpha")]
            assert round_at_once(*relays) == []
            relays[0].notify("key_budget_reached", "alice", "client key alice reached its daily_requests limit")
            relays[1].notify("key_budget_reached", "alice", "client key alice reached its daily_requests limit")
            breaker("beta", True)
            assert sorted(round_at_once(*relays)) == [("all_nodes_down", "relay"), ("key_budget_reached", "alice"),
                                                      ("node_failed", "beta")]
            relays[0].stop()  # r1 restarts: what the fleet told is in the database, so it tells nothing again
            relays[0] = relay("r1")
            assert round_at_once(*relays) == []
            breaker("alpha", False)
            assert round_at_once(*relays) == [("node_recovered", "alpha")]
        finally:
            for a in relays:
                a.stop()
    assert set(receiver.relays()) <= {"r1", "r2"}


def test_a_database_that_does_not_answer_leaves_this_relays_own_view(tmp_path, receiver):
    pool = NodePool([Node(NodeConfig("alpha", "http://127.0.0.1:9/v1", KEY))])
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'codex.db'}")  # no such folder: never opens
    alerts = Alerts([Webhook(receiver.url)], lambda: pool, lambda: None, engine=engine, relay="r1", interval=3600)
    alerts.start()
    try:
        fail(pool.get("alpha"))
        alerts.check()
        wait_for(lambda: receiver.events() == [("node_failed", "alpha"), ("all_nodes_down", "relay")], timeout=10,
                 what="the alerts of this relay's view")
    finally:
        alerts.stop()
        engine.dispose()
    assert receiver.relays() == ["r1", "r1"]
