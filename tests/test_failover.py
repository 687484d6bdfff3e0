"""Failover end to end: fake upstreams that fail in each way, real mitmdump.

The database plays no part in routing, so these run on SQLite only (the store's node state is tested on
both databases in test_store.py)."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.support.calls import FAST, HEAVY, call, write_nodes
from tests.support.databases import nodes_row, rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.ports import free_port
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

@pytest.mark.parametrize("failure", ["refused", "500", "429"])
def test_retry_lands_on_healthy_node_and_failing_node_is_counted(sqlite_url, tmp_path, failure):
    with FakeUpstream("good") as good, FakeUpstream("bad") as bad:
        bad_url = f"http://127.0.0.1:{free_port()}/v1" if failure == "refused" else bad.base_url
        bad.behaviour.status = int(failure) if failure != "refused" else 200
        # The failing node has nearly all the weight, so the first attempt goes there.
        nodes = write_nodes(tmp_path / "n.toml", [("bad", bad_url, "kb", HEAVY), ("good", good.base_url, "kg", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            for k in range(6):
                status, body = call(relay, "responses", stream=True, usage=(10 + k, 0, 5, 0))
                assert status == 200, body
                assert b"response.completed" in body
    got = rows(sqlite_url, "SELECT node_id, attempts, status, input_tokens FROM codex_invocations ORDER BY id")
    assert [(r.node_id, r.status, r.input_tokens) for r in got] == [("good", "success", 10 + k) for k in range(6)]
    # Three failures in a row mark the node failed; after that it is no longer tried.
    assert [r.attempts for r in got] == [2, 2, 2, 1, 1, 1]
    n = nodes_row(sqlite_url)
    assert bool(n["bad"].failed) and n["bad"].fail_count == 3 and n["bad"].fail_streak == 3
    assert n["bad"].last_error
    assert (n["good"].requests, n["good"].fail_count, n["good"].fail_streak, bool(n["good"].failed)) == (6, 0, 0, False)


def test_in_200_error_event_is_a_node_failure_not_retried(sqlite_url, tmp_path):
    with FakeUpstream("e", behaviour=Behaviour(error_event=True)) as up, FakeUpstream("ok") as ok:
        nodes = write_nodes(tmp_path / "n.toml", [("e", up.base_url, "k", HEAVY), ("ok", ok.base_url, "k2", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            status, body = call(relay, "responses", stream=True, usage=(1, 0, 1, 0))
    assert status == 200 and b"overloaded" in body
    (r,) = rows(sqlite_url, "SELECT node_id, status, attempts, error_message FROM codex_invocations")
    assert (r.node_id, r.status, r.attempts) == ("e", "failed", 1) and "overloaded" in r.error_message
    n = nodes_row(sqlite_url)["e"]
    assert (n.requests, n.fail_count, n.fail_streak) == (1, 1, 1)


def test_slow_first_byte_does_not_hold_the_client(sqlite_url, tmp_path):
    with FakeUpstream("slow", behaviour=Behaviour(first_byte_delay=20)) as up:
        nodes = write_nodes(tmp_path / "n.toml", [("slow", up.base_url, "k", 1)])
        opts = {"codex_nodes": str(nodes), "codex_first_byte_timeout": "1", **FAST}
        with RelayProcess(db_url=sqlite_url, options=opts) as relay:
            started = time.monotonic()
            status, body = call(relay, "responses", stream=True, usage=(1, 0, 1, 0))
            waited = time.monotonic() - started
    assert status >= 500 and waited < 15
    # The relay's own answer, in the OpenAI shape an SDK reads (not mitmproxy's HTML 502).
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    (r,) = rows(sqlite_url, "SELECT node_id, status, error_message FROM codex_invocations")
    assert r.node_id == "slow" and r.status == "failed" and "within 1 s" in r.error_message
    assert nodes_row(sqlite_url)["slow"].fail_count == 1


def test_ping_recovery_and_failed_state_survives_restart(sqlite_url, tmp_path):
    with FakeUpstream("flaky", behaviour=Behaviour(status=500)) as flaky, FakeUpstream("ok") as ok:
        nodes = write_nodes(tmp_path / "n.toml", [("flaky", flaky.base_url, "k", HEAVY), ("ok", ok.base_url, "k", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            for _ in range(3):
                assert call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200
        assert bool(nodes_row(sqlite_url)["flaky"].failed)

        # Restarted without pings: still failed, so no traffic reaches it.
        before = len(flaky.seen)
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            for _ in range(5):
                assert call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200
        assert len(flaky.seen) == before

        # With pings: the node answers /models again, so its cooldown ends and the next call is its
        # trial; only that call's success brings it back into rotation (a ping alone never does).
        flaky.behaviour.status = 200
        opts = {"codex_nodes": str(nodes), "codex_ping_interval": "0.2"}
        with RelayProcess(db_url=sqlite_url, options=opts) as relay:
            wait_for(lambda: flaky.requests_to("/models"), what="a health ping")
            wait_for(lambda: nodes_row(sqlite_url)["flaky"].last_ping_ms is not None, what="the ping stored")
            assert nodes_row(sqlite_url)["flaky"].failed
            assert call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200
            wait_for(lambda: not nodes_row(sqlite_url)["flaky"].failed, what="the node restored in the DB")
        assert flaky.requests_to("/chat/completions")[-1:] and len(flaky.requests_to("/chat/completions")) > 3
    n = nodes_row(sqlite_url)["flaky"]
    assert n.last_ping_ms is not None and n.last_ping_err is None and n.fail_streak == 0


def test_sticky_sessions_hold_and_spread_by_weight(sqlite_url, tmp_path):
    with FakeUpstream("a") as a, FakeUpstream("b") as b:
        nodes = write_nodes(tmp_path / "n.toml", [("a", a.base_url, "ka", 1), ("b", b.base_url, "kb", 3)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            for _ in range(20):
                assert call(relay, "responses", stream=True, usage=(1, 0, 1, 0),
                            headers={"session_id": "conv-1"})[0] == 200
            for s in range(120):
                assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0),
                            headers={"session_id": f"s-{s}"})[0] == 200
    got = rows(sqlite_url, "SELECT node_id FROM codex_invocations ORDER BY id")
    first20 = {r.node_id for r in got[:20]}
    assert len(first20) == 1
    spread = Counter(r.node_id for r in got[20:])
    assert 0.55 < spread["b"] / 120 < 0.92, spread


def test_a_node_that_answers_429_with_retry_after_is_left_alone_that_long(sqlite_url, tmp_path):
    with FakeUpstream("good") as good, FakeUpstream("busy", behaviour=Behaviour(status=429, retry_after="30")) as busy:
        nodes = write_nodes(tmp_path / "n.toml", [("busy", busy.base_url, "kb", HEAVY),
                                                  ("good", good.base_url, "kg", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), **FAST}) as relay:
            assert [call(relay, "responses", stream=False, usage=(1, 0, 1, 0))[0] for _ in range(8)] == [200] * 8
    # The first call found out (and was served by the other node); the other seven left it alone.
    assert len(busy.requests_to("/responses")) == 1
    assert [r.attempts for r in rows(sqlite_url, "SELECT attempts FROM codex_invocations ORDER BY id")] == [2] + [1] * 7


def test_all_nodes_down_refuses_without_trying_them(sqlite_url, tmp_path):
    nodes = write_nodes(tmp_path / "n.toml", [("x", f"http://127.0.0.1:{free_port()}/v1", "k", 1),
                                              ("y", f"http://127.0.0.1:{free_port()}/v1", "k", 1)])
    with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), "codex_fail_threshold": "1",
                                                  **FAST}) as relay:
        answers = [call(relay, "responses", stream=True, usage=(1, 0, 1, 0)) for _ in range(4)]
    # The first call finds both nodes down (each breaker opens at its failure); the retries of a client are
    # then the relay's refusal, not attempts of a node, and no answer shows a node's address.
    assert answers[0][0] == 502 and [s for s, _ in answers[1:]] == [429] * 3
    assert all(b"127.0.0.1" not in body for _, body in answers)
    assert {json.loads(body)["error"]["code"] for _, body in answers[1:]} == {"no_node_available"}
    got = rows(sqlite_url, "SELECT status, node_id, error_message FROM codex_invocations ORDER BY id")
    assert len(got) == 4 and {r.status for r in got} == {"failed"}
    assert got[0].node_id in ("x", "y") and "127.0.0.1" in got[0].error_message  # the address stays in the row
    assert [r.node_id for r in got[1:]] == [None] * 3
    assert all(bool(n.failed) for n in nodes_row(sqlite_url).values())
    assert sum(n.requests for n in nodes_row(sqlite_url).values()) == 2  # one attempt each, then none


def test_single_failed_node_is_refused_until_its_trial(sqlite_url, tmp_path):
    with FakeUpstream("only", behaviour=Behaviour(status=500)) as up:
        nodes = write_nodes(tmp_path / "n.toml", [("only", up.base_url, "k", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), "codex_cooldown": "1",
                                                      **FAST}) as relay:
            # Three failures open its breaker; until its cooldown ends a call is refused (no attempt of the
            # node) and told when to come back; then one trial, and the first that succeeds closes it.
            assert [call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] for _ in range(3)] == [500] * 3
            status, body = call(relay, "chat", stream=False, usage=(1, 0, 1, 0))
            assert status == 429 and json.loads(body)["error"]["code"] == "no_node_available"
            up.behaviour.status = 200
            wait_for(lambda: call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200, what="the trial")
            assert call(relay, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200
    got = rows(sqlite_url, "SELECT node_id, status FROM codex_invocations ORDER BY id")
    tried = [(r.node_id, r.status) for r in got if r.node_id is not None]
    assert tried == [("only", "failed")] * 3 + [("only", "success")] * 2
    n = nodes_row(sqlite_url)["only"]
    assert not n.failed and n.fail_streak == 0 and n.fail_count == 3


