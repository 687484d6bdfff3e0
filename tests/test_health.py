"""Circuit breakers and health pings: the rules on a fake clock (no timers, no sleeps), and the runtime
keeping them across a restart and clearing them on the admin page's enable."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.metering.outcome import rest_asked
from addon.nodes.breaker import BreakerPolicy
from addon.nodes.health import Health, Pinger, ping
from addon.nodes.routing import Node, NodePool
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store.records import NodeConfig, NodeStateUpdate
from tests.support.calls import write_nodes
from tests.support.databases import at_head, rows
from tests.support.fakeupstream import FakeUpstream
from tests.support.waiting import wait_for


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def node(node_id: str, base_url: str = "http://127.0.0.1:9/v1", weight: int = 1) -> Node:
    return Node(NodeConfig(id=node_id, base_url=base_url, api_key=f"key-{node_id}", weight=weight))


def health(sent: list[NodeStateUpdate], clock: Clock, **policy) -> Health:
    return Health(sent.append, BreakerPolicy(**policy), clock)


def test_threshold_failures_in_a_row_open_the_breaker_once():
    sent: list[NodeStateUpdate] = []
    clock = Clock()
    h = health(sent, clock, threshold=3, cooldown=30)
    n = node("a")
    h.failure(n, "HTTP 500")
    h.failure(n, "HTTP 500")
    h.success(n)
    h.failure(n, "HTTP 502")
    h.failure(n, "HTTP 502")
    assert not n.failed and sent == []
    h.failure(n, "HTTP 503")
    assert n.failed and n.breaker.streak == 3 and n.breaker.until == clock.now + 30
    assert sent == [NodeStateUpdate("a", failed=True, last_error="HTTP 503")]
    # A call sent before it opened fails late: counted, but neither persisted again nor a longer cooldown.
    clock.now += 5
    h.failure(n, "HTTP 503")
    assert len(sent) == 1 and n.breaker.until == clock.now - 5 + 30


def test_a_node_that_asks_for_a_pause_is_left_alone_that_long_then_gets_one_trial():
    sent: list[NodeStateUpdate] = []
    clock = Clock()
    h = health(sent, clock, threshold=3, cooldown=10, cooldown_max=600)
    asked, other = node("asked"), node("other", weight=1)
    pool = NodePool([asked, other], clock=clock)
    h.failure(asked, "HTTP 429", rest=30)  # one failure: below the threshold, but the node said 30 s
    assert asked.failed and sent == [NodeStateUpdate("asked", failed=True, last_error="HTTP 429")]
    h.ping_answered(asked)  # answering /models is no reason to call it sooner
    for _ in range(29):
        clock.now += 1
        assert pool.choose(holder=object()) is other
    clock.now += 1
    trial = object()
    assert pool.choose(holder=trial) is asked and pool.choose(holder=object()) is other  # one trial only
    h.success(asked)
    assert not asked.failed
    # A longer cooldown of its own stands; a pause longer than the longest cooldown is cut to it.
    for _ in range(3):
        h.failure(asked, "HTTP 500")
    h.failure(asked, "HTTP 429", rest=5)  # a call sent before it opened
    assert asked.breaker.until == clock.now + 10
    h.success(asked)
    h.failure(asked, "HTTP 429", rest=86_400)
    assert asked.breaker.until == clock.now + 600


@pytest.mark.parametrize(("status", "value", "seconds"), [
    (429, "30", 30.0), (503, "2.5", 2.5), (429, "Mon, 07 Dec 2026 12:00:45 GMT", 45.0),
    (429, "Mon, 07 Dec 2026 11:59:00 GMT", 0.0), (429, "soon", 0.0), (429, "-3", 0.0), (429, "inf", 0.0),
    (429, None, 0.0), (500, "30", 0.0), (401, "30", 0.0),
])
def test_the_pause_a_node_asks_for_is_its_429_or_503_retry_after(status, value, seconds):
    assert rest_asked(status, value, now=dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)) == seconds


def test_threshold_zero_never_opens():
    h = Health(lambda u: None, BreakerPolicy(threshold=0))
    n = node("a")
    for _ in range(10):
        h.failure(n, "x")
        h.failure(n, "HTTP 429", rest=30)
    assert not n.failed


def test_failed_trials_double_the_cooldown_up_to_the_cap_and_a_success_closes():
    sent: list[NodeStateUpdate] = []
    clock = Clock()
    h = health(sent, clock, threshold=1, cooldown=30, cooldown_max=100)
    n = node("a")
    pool = NodePool([n], clock=clock)
    h.failure(n, "down")
    cooldowns = []
    for _ in range(4):
        cooldowns.append(n.breaker.until - clock.now)
        clock.now = n.breaker.until
        call = object()
        assert pool.choose(holder=call) is n and n.breaker.trial is call
        h.failure(n, "still down")
    assert cooldowns == [30, 60, 100, 100]
    assert sent == [NodeStateUpdate("a", failed=True, last_error="down")]  # reopening changes nothing stored
    clock.now = n.breaker.until
    assert pool.choose(holder=object()) is n
    h.success(n)
    assert n.eligible and n.breaker.streak == 0 and n.breaker.trial is None
    assert sent[-1] == NodeStateUpdate("a", failed=False)
    # Closed again: the next opening starts from the first cooldown.
    h.failure(n, "down")
    assert n.breaker.until - clock.now == 30


def test_a_trial_that_ends_neither_way_frees_the_slot_for_the_next_call():
    clock = Clock()
    h = health([], clock, threshold=1, cooldown=10)
    n = node("a")
    pool = NodePool([n, node("b", weight=1_000_000)], clock=clock)
    h.failure(n, "down")
    clock.now += 10
    aborted, other = object(), object()
    assert pool.choose(holder=aborted) is n
    assert pool.choose(holder=other).id == "b"
    h.release(n, other)  # a call that never held the trial frees nothing
    assert pool.choose(holder=object()).id == "b"
    h.release(n, aborted)
    assert n.failed and pool.choose(holder=other) is n


def test_restored_failed_node_gets_its_trial_after_the_first_cooldown_without_pings():
    clock = Clock()
    h = health([], clock, cooldown=30)
    down = Node(NodeConfig(id="down", base_url="http://d/v1"), breaker=h.restored(True))
    up = Node(NodeConfig(id="up", base_url="http://u/v1"), breaker=h.restored(False))
    pool = NodePool([down, up], clock=clock)
    assert down.failed and not up.failed
    clock.now += 29.9
    assert {pool.choose(holder=object()).id for _ in range(50)} == {"up"}
    clock.now += 0.1
    assert pool.choose(holder=object()) is down


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


def test_a_ping_answer_ends_one_cooldown_but_never_restores_the_node():
    """GET /models answers while the node's calls fail: one early trial, then the cooldowns grow."""
    sent: list[NodeStateUpdate] = []
    clock = Clock()
    h = health(sent, clock, threshold=1, cooldown=30, cooldown_max=600)
    with FakeUpstream("p") as up:
        flaky, dead = node("flaky", up.base_url), node("dead")
        h.failure(flaky, "HTTP 500")
        h.failure(dead, "refused")
        pool = NodePool([flaky, dead, node("ok", weight=1_000_000)], clock=clock)
        pinger = Pinger(lambda: pool, h, interval=0)
        pinger.ping_once()
        assert flaky.failed and not flaky.eligible and dead.breaker.until == clock.now + 30
        trial = object()
        assert pool.choose(holder=trial) is flaky  # the ping brought its trial forward
        assert {pool.choose(holder=object()).id for _ in range(50)} == {"ok"}  # one trial only
        h.failure(flaky, "HTTP 500")
        pinger.ping_once()
        assert flaky.breaker.until == clock.now + 60  # this ping is no evidence for it any more
        assert {pool.choose(holder=object()).id for _ in range(50)} == {"ok"}
    assert not any(u.failed is False for u in sent)
    by_id = {u.node_id: u for u in sent if u.pinged}
    assert by_id["flaky"].last_ping_err is None and by_id["flaky"].last_ping_ms is not None
    assert by_id["dead"].last_ping_err


# -- the runtime: restarts, admin enable, options ----------------------------------------------------
def db_node(db_url: str, node_id: str) -> sa.Row:
    return next(r for r in rows(db_url, "SELECT * FROM nodes") if r.id == node_id)


def test_relay_keeps_the_breaker_across_a_restart_and_enable_resets_it(db_url, tmp_path):
    nodes_file = write_nodes(tmp_path / "nodes.toml", [("a", "http://127.0.0.1:9/v1", "ka", 1),
                                                      ("b", "http://127.0.0.1:9/b/v1", "kb", 1)])
    opts = {"codex_db": at_head(db_url), "codex_spool": str(tmp_path / "spool.db"), "codex_nodes": str(nodes_file),
            "codex_ping_interval": "0", "codex_cooldown": "45"}
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    with taddons.context(options) as tctx:
        tctx.configure(options, **opts)
        for _ in range(3):
            runtime.health.failure(runtime.pool.get("a"), "HTTP 500")
        options.done()  # flushes the writer
    assert db_node(db_url, "a").failed

    runtime = Runtime()

    options = RuntimeOptions(runtime)
    with taddons.context(options) as tctx:
        started = time.monotonic()
        tctx.configure(options, **opts)
        a = runtime.pool.get("a")
        try:
            # Failed at the stop: open with the first cooldown, so with pings off its trial still comes.
            assert a.failed and a.breaker.openings == 1
            assert started + 45 <= a.breaker.until <= time.monotonic() + 45
            with pytest.raises(exceptions.OptionsError, match="codex_cooldown_max"):
                tctx.configure(options, codex_cooldown_max="44")
            assert runtime.fleet.set_node_disabled("a", False)
            assert a.eligible and a.breaker.streak == 0 and a.breaker.trial is None
            wait_for(lambda: not db_node(db_url, "a").failed, what="failed cleared in the database")
            assert db_node(db_url, "a").fail_streak == 0
        finally:
            options.done()
