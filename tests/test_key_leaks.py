"""End to end: node keys reach their nodes and nowhere else; client keys keep strangers out.

Real mitmdump with the addons, fake upstreams on 127.0.0.1. The key-leak test runs mitmdump as
verbosely as it goes (headers and bodies of every flow printed, debug log) and saves flows with
``-w``, then looks for the keys in everything it produced.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from pathlib import Path

import pytest
from mitmproxy import io

from tests.support.calls import PATHS, write_nodes
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

# Distinctive keys: "LEAKCANARY" appears in no masked form, so finding it anywhere is a leak.
KEY_A = "sk-nodeA-LEAKCANARY-a1b2c3d4e5f6a7b8"
KEY_B = "sk-nodeB-LEAKCANARY-0f9e8d7c6b5a4f3e"
ALICE = "ck-alice-CLIENTCANARY-5a6b7c8d"
BOB = "ck-bob-CLIENTCANARY-9e8f7a6b"


def post(relay: RelayProcess, fmt: str, *, stream: bool, headers: dict[str, str],
         path: str | None = None) -> tuple[int, bytes]:
    body = {"model": "gpt-5-codex", "stream": stream, "input": "hi", "metadata": {"fake_usage": [10, 2, 5, 1]}}
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("POST", path or PATHS[fmt], json.dumps(body), {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def sent_keys(up: FakeUpstream) -> set[str]:
    """Every credential the upstream received."""
    return {r.headers[h] for r in up.seen for h in ("authorization", "x-api-key") if h in r.headers}


def test_node_keys_reach_nodes_but_not_logs_or_saved_flows(tmp_path):
    flows_file = tmp_path / "flows.mitm"
    with FakeUpstream("a") as a, FakeUpstream("b") as b:
        # Node a gets nearly every first attempt, so its failures are retried on b.
        nodes = write_nodes(tmp_path / "nodes.toml", [("a", a.base_url, KEY_A, 1000), ("b", b.base_url, KEY_B, 1)])
        nodes.write_text(nodes.read_text() + 'auth_header = "x-api-key"\n')  # b's key goes in x-api-key
        opts = {"codex_nodes": str(nodes), "codex_fail_threshold": "100", "codex_ping_interval": "0.2"}
        verbose = ["-w", str(flows_file), "--set", "flow_detail=3", "--set", "termlog_verbosity=debug"]
        with RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", options=opts, extra_args=verbose) as relay:
            bearer = {"authorization": "Bearer client-key"}
            for fmt in ("responses", "chat"):
                for stream in (True, False):
                    assert post(relay, fmt, stream=stream, headers=bearer)[0] == 200
            assert post(relay, "messages", stream=True, headers={"x-api-key": "client-key"})[0] == 200
            a.behaviour.status = 500  # from now on a fails and the relay retries on b
            assert post(relay, "responses", stream=True, headers=bearer)[0] == 200
            assert post(relay, "messages", stream=False, headers={"x-api-key": "client-key"})[0] == 200
            # Health pings carry the keys too (outside mitmproxy's flows).
            wait_for(lambda: a.requests_to("/models") and b.requests_to("/models"), what="health pings")
        assert relay.proc.returncode == 0, relay.output()

    # Each node got its own key and only that, in its own header whichever the client used (calls and pings).
    assert sent_keys(a) == {f"Bearer {KEY_A}"}
    assert sent_keys(b) == {KEY_B}
    assert b.requests_to("/responses") and b.requests_to("/messages")  # the retries happened

    output = relay.output()
    assert "Authorization" in output or "authorization" in output  # headers were printed: a real check
    raw = flows_file.read_bytes()
    for secret in (KEY_A, KEY_B, "LEAKCANARY"):
        assert secret not in output, f"{secret} in the relay's output"
        assert secret.encode() not in raw, f"{secret} in the -w file"

    with flows_file.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    # Every call, plus the retry attempts the relay replayed on b.
    assert len(flows) >= 8 and any(fl.is_replay for fl in flows)
    masked = set()
    for fl in flows:
        for h in ("authorization", "x-api-key"):
            masked.update(fl.request.headers.get_all(h))
    # What is left tells keys apart without being one: type prefix and last 4 characters.
    assert {"Bearer sk-…a7b8", "sk-…4f3e"} <= masked


def test_client_keys_gate_the_relay_and_name_the_caller(sqlite_url, tmp_path):
    keys = tmp_path / "client-keys"
    keys.write_text(f"# who may use the relay\nalice = {ALICE}\n\nbob={BOB}\n")
    with FakeUpstream("n") as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("n", up.base_url, KEY_A, 1)])
        opts = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
        with RelayProcess(db_url=sqlite_url, options=opts) as relay:
            rejected = [
                post(relay, "responses", stream=True, headers={}),
                post(relay, "responses", stream=True, headers={"authorization": f"Bearer {ALICE}x"}),
            ]
            for status, body in rejected:
                assert status == 401, body
                err = json.loads(body)["error"]
                assert err["code"] == "invalid_api_key" and {"message", "type", "param"} <= set(err)
            # A node key is no client key; an Anthropic client gets Anthropic's error shape.
            status, body = post(relay, "messages", stream=False, headers={"x-api-key": KEY_A})
            assert status == 401 and json.loads(body)["type"] == "error"
            assert json.loads(body)["error"]["type"] == "authentication_error"
            # A path that only looks like the admin page's is no request target the relay accepts.
            status, body = post(relay, "responses", stream=False, headers={}, path="/admin/../v1/responses")
            assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request_target"
            assert up.seen == []  # nothing reached the node

            assert post(relay, "responses", stream=True, headers={"authorization": f"Bearer {ALICE}"})[0] == 200
            assert post(relay, "messages", stream=False, headers={"x-api-key": BOB})[0] == 200
        assert relay.proc.returncode == 0, relay.output()

    # The node saw its own key, never a client's.
    assert sent_keys(up) == {f"Bearer {KEY_A}"}  # an OpenAI-style node: Bearer, even for an x-api-key client
    assert ALICE not in relay.output() and BOB not in relay.output()
    # Rejected calls are no invocations and count against no node.
    got = rows(sqlite_url, "SELECT client_key, status, api_format FROM codex_invocations ORDER BY id")
    assert [tuple(r) for r in got] == [("alice", "success", "responses"), ("bob", "success", "messages")]
    node = rows(sqlite_url, "SELECT requests, fail_count FROM nodes")[0]
    assert (node.requests, node.fail_count) == (2, 0)


def test_bad_client_keys_option_stops_the_relay(tmp_path):
    relay = RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}",
                         options={"codex_client_keys": f"@{Path(tmp_path) / 'nope'}"})
    with contextlib.suppress(RuntimeError):  # it may exit before it listens
        relay.start()
    assert relay.stop() != 0
    assert "codex_client_keys: cannot read" in relay.output()


def test_stream_in_flight_at_shutdown_leaks_no_key(tmp_path):
    flows_file = tmp_path / "flows.mitm"
    hold, first_event = threading.Event(), threading.Event()
    with FakeUpstream("slow", behaviour=Behaviour(hold=hold)) as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("slow", up.base_url, KEY_A, 1)])
        # No drain (tests/test_drain.py has it): the shutdown itself, with the stream still open, is under test.
        relay = RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}",
                             options={"codex_nodes": str(nodes), "codex_ping_interval": "0",
                                      "codex_drain_timeout": "0"},
                             extra_args=["-w", str(flows_file)]).start()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
            conn.request("POST", PATHS["responses"], json.dumps({"model": "m", "stream": True}),
                         {"authorization": "Bearer client-key"})
            resp = conn.getresponse()
            resp.read1(65536)
            first_event.set()
            with contextlib.suppress(OSError, http.client.HTTPException):
                resp.read()  # cut off by the shutdown

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            assert first_event.wait(30), "the stream did not start"
            relay.stop()  # the stream is still open: -w writes the in-flight flow at shutdown
        finally:
            hold.set()
            relay.kill()
        thread.join(30)
    assert "LEAKCANARY" not in relay.output()
    assert b"LEAKCANARY" not in flows_file.read_bytes()
