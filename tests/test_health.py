"""Failure streaks, the failed flag, and health pings (driven directly, no timers)."""

from __future__ import annotations

from addon.health import Health, Pinger, ping
from addon.routing import Node, NodePool
from bench.fakeupstream import FakeUpstream
from store.records import NodeConfig, NodeStateUpdate


def node(node_id: str, base_url: str = "http://127.0.0.1:9/v1") -> Node:
    return Node(NodeConfig(id=node_id, base_url=base_url, api_key=f"key-{node_id}"))


def test_threshold_failures_in_a_row_mark_failed_once():
    sent: list[NodeStateUpdate] = []
    h = Health(sent.append, threshold=3)
    n = node("a")
    h.failure(n, "HTTP 500")
    h.failure(n, "HTTP 500")
    h.success(n)
    h.failure(n, "HTTP 502")
    h.failure(n, "HTTP 502")
    assert not n.failed and sent == []
    h.failure(n, "HTTP 503")
    assert n.failed and n.fail_streak == 3
    assert sent == [NodeStateUpdate("a", failed=True, last_error="HTTP 503")]
    h.failure(n, "HTTP 503")
    assert len(sent) == 1


def test_threshold_zero_never_marks_failed():
    h = Health(lambda u: None, threshold=0)
    n = node("a")
    for _ in range(10):
        h.failure(n, "x")
    assert not n.failed


def test_ping_measures_and_reports_errors():
    with FakeUpstream("p") as up:
        ms, err = ping(node("a", up.base_url), "/models", timeout=5)
        assert err is None and ms >= 0
        assert up.seen[-1].path == "/v1/models"
        assert up.seen[-1].headers["authorization"] == "Bearer key-a"
        up.behaviour.status = 503
        _, err = ping(node("a", up.base_url), "/responses", timeout=5)
        assert err == "HTTP 503"
    _, err = ping(node("gone", up.base_url), "/models", timeout=5)
    assert err is not None and "refused" in err.lower()


def test_ping_round_restores_answering_failed_nodes_only():
    sent: list[NodeStateUpdate] = []
    with FakeUpstream("p") as up:
        good, dead = node("good", up.base_url), node("dead")
        good.failed = True
        good.fail_streak = 3
        dead.failed = True
        pool = NodePool([good, dead])
        Pinger(lambda: pool, sent.append, interval=0).ping_once()
    assert not good.failed and good.fail_streak == 0
    assert dead.failed
    by_id = {u.node_id: u for u in sent}
    assert by_id["good"].pinged and by_id["good"].failed is False and by_id["good"].last_ping_err is None
    assert by_id["dead"].pinged and by_id["dead"].failed is None and by_id["dead"].last_ping_err
