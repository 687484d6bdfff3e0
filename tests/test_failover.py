"""Failover end to end: fake upstreams that fail in each way, real mitmdump.

The database plays no part in routing, so these run on SQLite only (the store's node state is tested on
both databases in test_store.py)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.calls import FAST, HEAVY, call, write_nodes
from tests.support.databases import nodes_row, rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


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
