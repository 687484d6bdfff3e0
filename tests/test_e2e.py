"""End to end: real mitmdump + the addon + fake upstreams on 127.0.0.1.

Metering and stats across a restart run on SQLite and MariaDB; the rest, where the database plays no part,
on SQLite only."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time

import pytest

from tests.support.calls import PATHS, call, write_nodes
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess

pytestmark = pytest.mark.e2e

@pytest.fixture
def two_nodes(tmp_path):
    a, b = FakeUpstream("a").start(), FakeUpstream("b").start()
    nodes = write_nodes(tmp_path / "nodes.toml", [("a", a.base_url, "key-a", 1), ("b", b.base_url, "key-b", 1)])
    yield a, b, nodes
    a.stop()
    b.stop()


def expected_input(fmt: str, usage: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """What the store keeps (OpenAI convention); Anthropic reports no reasoning tokens."""
    i, c, o, r = usage
    return (i, c, o, 0 if fmt == "messages" else r)


def test_all_formats_metered_routed_and_stats_survive_restart(db_url, two_nodes):
    a, b, nodes = two_nodes
    calls = []
    with RelayProcess(db_url=db_url, options={"codex_nodes": str(nodes)}) as relay:
        for n, fmt in enumerate(PATHS):
            for stream in (True, False):
                usage = (100 + n * 10 + stream, 20 + n, 30 + n, 5 + n)
                status, body = call(relay, fmt, stream=stream, usage=usage)
                assert status == 200, body
                calls.append((fmt, stream, usage))
    assert relay.proc.returncode == 0, relay.output()
    assert "Streaming response from" not in relay.output()  # debug level: not a line per call (addon.observe.loglines)
    # One line per call, the relay's own: which node, what it metered; never mitmdump's "(content missing)".
    assert "(content missing)" not in relay.output()
    lines = [line for line in relay.lines if "<< 200 call: " in line]
    assert len(lines) == len(calls) and all(" success in " in line for line in lines), lines
    assert any("POST /v1/responses << 200 call: a gpt-5-codex success" in line or
               "POST /v1/responses << 200 call: b gpt-5-codex success" in line for line in lines), lines

    # The upstreams saw their own keys, never the client's.
    for up, key in ((a, "key-a"), (b, "key-b")):
        for r in up.seen:
            assert r.headers.get("authorization") == f"Bearer {key}"
    assert len(a.seen) + len(b.seen) == len(calls)

    got = rows(db_url, "SELECT api_format, stream, input_tokens, cache_input_tokens, output_tokens, "
                       "reasoning_tokens, total_tokens, node_id, source, status, http_status, model, ttfb_ms, "
                       "response_bytes FROM codex_invocations ORDER BY id")
    assert len(got) == len(calls)
    for row, (fmt, stream, usage) in zip(got, calls, strict=True):
        i, c, o, r = expected_input(fmt, usage)
        assert (row.api_format, bool(row.stream)) == (fmt, stream)
        assert (row.input_tokens, row.cache_input_tokens, row.output_tokens, row.reasoning_tokens) == (i, c, o, r)
        assert row.total_tokens == i + o
        assert row.source == "relay" and row.status == "success" and row.http_status == 200
        assert row.model == "gpt-5-codex" and row.ttfb_ms is not None and row.response_bytes > 0
    served = {"a": len(a.seen), "b": len(b.seen)}
    by_node = {r.node_id: r.n for r in rows(db_url, "SELECT node_id, COUNT(*) AS n FROM codex_invocations "
                                                    "GROUP BY node_id")}
    assert by_node == {k: v for k, v in served.items() if v}

    def node_totals():
        return {r.id: r for r in rows(db_url, "SELECT * FROM nodes")}

    before = node_totals()
    for node_id in ("a", "b"):
        inv = rows(db_url, "SELECT COUNT(*) AS n, COALESCE(SUM(input_tokens), 0) AS i, "
                           "COALESCE(SUM(output_tokens), 0) AS o, COALESCE(SUM(response_bytes), 0) AS nbytes "
                           "FROM codex_invocations WHERE node_id = :n", n=node_id)[0]
        node = before[node_id]
        assert (node.requests, node.total_input, node.total_output, node.total_bytes) == (
            inv.n, inv.i, inv.o, inv.nbytes)
        assert node.api_key == f"key-{node_id}"

    # The seed's bug: a restart with the same nodes file must keep every stat.
    with RelayProcess(db_url=db_url, options={"codex_nodes": str(nodes)}) as relay:
        status, _ = call(relay, "responses", stream=True, usage=(7, 0, 3, 0))
        assert status == 200
    after = node_totals()
    assert sum(n.requests for n in after.values()) == sum(n.requests for n in before.values()) + 1
    for node_id in ("a", "b"):
        assert after[node_id].requests >= before[node_id].requests
        assert after[node_id].total_input >= before[node_id].total_input


def test_stream_reaches_client_before_upstream_finishes(sqlite_url, tmp_path):
    hold = threading.Event()
    with FakeUpstream("slow", behaviour=Behaviour(hold=hold)) as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("slow", up.base_url, "k", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes)}) as relay:
            conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=15)
            body = {"model": "m", "stream": True, "metadata": {"fake_usage": [11, 1, 2, 0]}}
            conn.request("POST", "/v1/responses", json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            first = b""
            # The upstream holds the rest of its stream until we release it: the first event must arrive now.
            while b"\n\n" not in first:
                chunk = resp.read1(65536)
                assert chunk, "stream ended before the first event"
                first += chunk
            assert b"response.created" in first and b"response.completed" not in first
            hold.set()
            rest = resp.read()
            conn.close()
            assert b"response.completed" in rest
    got = rows(sqlite_url, "SELECT input_tokens, output_tokens, status, stream_ms FROM codex_invocations")
    assert [(r.input_tokens, r.output_tokens, r.status) for r in got] == [(11, 2, "success")]


def test_gzip_stream_metered_and_passed_through(sqlite_url, tmp_path):
    with FakeUpstream("gz") as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("gz", up.base_url, "k", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes)}) as relay:
            conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=15)
            body = {"model": "m", "stream": True, "metadata": {"fake_usage": [50, 10, 20, 5]}}
            conn.request("POST", "/v1/responses", json.dumps(body),
                         {"content-type": "application/json", "x-fake-encoding": "gzip"})
            resp = conn.getresponse()
            raw = resp.read()
            conn.close()
            assert resp.getheader("content-encoding") == "gzip"
            assert b"response.completed" in gzip.decompress(raw)
    got = rows(sqlite_url, "SELECT input_tokens, cache_input_tokens, output_tokens, reasoning_tokens "
                       "FROM codex_invocations")
    assert [tuple(r) for r in got] == [(50, 10, 20, 5)]


def test_monitor_mode_passes_through_and_meters(sqlite_url):
    with FakeUpstream("direct") as up, \
            RelayProcess(db_url=sqlite_url, reverse_target=f"http://127.0.0.1:{up.port}") as relay:
        status, _ = call(relay, "messages", stream=True, usage=(40, 30, 9, 0))
        assert status == 200
        # Unchanged: the client's own credentials reach the upstream.
        assert up.seen[0].headers["authorization"] == "Bearer client-key"
    got = rows(sqlite_url, "SELECT node_id, input_tokens, cache_input_tokens, output_tokens FROM codex_invocations")
    assert [tuple(r) for r in got] == [(None, 40, 30, 9)]


def test_relay_prices_calls_and_polls_provider_stats(sqlite_url, tmp_path):
    """Cost is estimated from the price table; the nodes file's [[sources]] are polled inside the relay."""
    from store.prices import load_prices
    from store.records import Usage
    from tests.support.fakestats import FakeStats, crs_item, crs_response

    with FakeUpstream("p") as up, FakeStats() as stats:
        stats.queue(200, crs_response(crs_item("gpt-5-codex", 3, 300, 30, cost=0.5)))
        nodes = write_nodes(tmp_path / "nodes.toml", [("p", up.base_url, "k", 1)])
        nodes.write_text(nodes.read_text() + f'[[sources]]\nname = "relay"\nurl = "{stats.url}"\nformat = "crs"\n'
                                              'api_id = "3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d"\nmidnight_margin = 0\n'
                                              'interval = 3600\nnodes = ["p"]\n')
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes)}) as relay:
            status, _ = call(relay, "responses", stream=True, usage=(1000, 400, 200, 50))
            assert status == 200
            status, _ = call(relay, "chat", stream=False, usage=(10, 0, 5, 0), model="unpriced-model")
            assert status == 200
            deadline = time.monotonic() + 30
            while not rows(sqlite_url, "SELECT id FROM stats_source_snapshots"):
                assert time.monotonic() < deadline, relay.output()
                time.sleep(0.05)
    got = rows(sqlite_url, "SELECT model, cost, cost_input, cost_cached, cost_output, cost_estimated "
                       "FROM codex_invocations ORDER BY id")
    split = load_prices().cost("gpt-5-codex", Usage(1000, 400, 0, 200, 50))
    assert got[0].model == "gpt-5-codex" and bool(got[0].cost_estimated)
    assert (got[0].cost, got[0].cost_input, got[0].cost_cached, got[0].cost_output) == pytest.approx(
        (split.total, split.input, split.cached, split.output))
    assert (got[1].cost, bool(got[1].cost_estimated)) == (None, False)
    snaps = rows(sqlite_url, "SELECT source, model, requests FROM stats_source_snapshots ORDER BY model")
    assert {(s.source, s.model, s.requests) for s in snaps} == {("relay", None, 3), ("relay", "gpt-5-codex", 3)}
