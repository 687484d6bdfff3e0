"""Every call a key makes is metered and counted, or refused before any node: the endpoint table (plain
functions) and the matrix of endpoints × streaming × key states through a real relay, on SQLite and MariaDB —
its WebSocket column (Responses over WebSocket, one turn per key state) on the same relays.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from addon.guard.endpoints import (
    DEFAULT_KEY_ENDPOINTS,
    ENDPOINTS,
    USAGE_SHAPE,
    api_path,
    detect_format,
    endpoint_allowed,
    filter_model_list,
)
from store.config import NODE_FORMATS
from tests.support.calls import write_nodes
from tests.support.databases import rows
from tests.support.fakeupstream import MODELS, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.wsupstream import Splitter, WsUpstream


@pytest.mark.parametrize(("path", "endpoint"), [
    ("/v1/responses", "responses"), ("/openai/v1/responses?api-version=2025-04-01", "responses"),
    ("/responses/", "responses"), ("/v1/responses/compact", "compact"), ("/v1/chat/completions", "chat"),
    ("/api/openai/v1/chat/completions?x=/messages", "chat"), ("/v1/completions", "completions"),
    ("/v1/messages", "messages"), ("/anthropic/v1/messages?beta=true", "messages"),
    ("/v1/messages/count_tokens", "count_tokens"), ("/v1/embeddings", "embeddings"),
    ("/v1/images/generations", "images"), ("/v1/responses/resp_123", None), ("/v1/models", None),
    ("/v1/files", None), ("/", None), ("", None),
])
def test_detect_format_names_the_endpoint(path, endpoint):
    assert detect_format(path) == endpoint


def test_every_endpoint_has_a_usage_shape_and_a_family():
    assert set(USAGE_SHAPE) == ENDPOINTS
    assert NODE_FORMATS["openai"] | NODE_FORMATS["anthropic"] == ENDPOINTS
    assert not NODE_FORMATS["openai"] & NODE_FORMATS["anthropic"]
    assert all(NODE_FORMATS[name] <= ENDPOINTS for name in NODE_FORMATS)


@pytest.mark.parametrize(("path", "globs", "allowed"), [
    ("/v1/responses", None, True), ("/v1/messages/count_tokens", None, True), ("/v1/models", None, True),
    ("/v1/models/gpt-5", None, True), ("/openai/v1/chat/completions", None, True), ("/v1/files", None, False),
    ("/v1/batches/b1", None, False), ("/v1/files", ("files*",), True), ("/v1/responses", ("files*",), False),
    ("/v1/files/f1/content", ("files*",), True),
])
def test_a_keys_endpoints_are_globs_over_the_path_after_its_version(path, globs, allowed):
    assert endpoint_allowed(path, globs) is allowed
    assert api_path("/openai/v1/chat/completions?x=1") == "chat/completions" and api_path("/x") == "x"
    assert "responses" in DEFAULT_KEY_ENDPOINTS


def test_a_model_list_keeps_only_what_is_allowed():
    body = json.dumps({"object": "list", "data": [{"id": "gpt-5"}, {"id": "o3"}, {"nope": 1}]}).encode()
    assert json.loads(filter_model_list(body, lambda m: m.startswith("gpt")) or b"") == {
        "object": "list", "data": [{"id": "gpt-5"}]}
    anthropic = json.dumps({"data": [{"id": "a"}, {"id": "b"}], "first_id": "a", "last_id": "b"}).encode()
    assert json.loads(filter_model_list(anthropic, lambda m: m == "b") or b"") == {
        "data": [{"id": "b"}], "first_id": "b", "last_id": "b"}
    assert filter_model_list(b"[1]", lambda m: True) is None and filter_model_list(b"x", lambda m: True) is None


# -- the matrix, end to end ---------------------------------------------------------------------------------
USAGE = (100, 20, 30, 5)  # what the fake node reports: input, cached, output, reasoning
# endpoint → (path, model, what the row holds: input, cached, output, reasoning; None: no usage, no cost)
CALLS = {
    "responses": ("/v1/responses", "gpt-5-codex", (100, 20, 30, 5)),
    "compact": ("/v1/responses/compact", "gpt-5-codex", (100, 20, 30, 5)),
    "chat": ("/v1/chat/completions", "gpt-5-codex", (100, 20, 30, 5)),
    "messages": ("/v1/messages", "claude-sonnet-4-5", (100, 20, 30, 0)),
    "count_tokens": ("/v1/messages/count_tokens", "claude-sonnet-4-5", None),  # never billed
    "embeddings": ("/v1/embeddings", "text-embedding-3-small", (100, 0, 0, 0)),
    "unknown": ("/v1/files", None, None),
}
STREAMED = {"responses", "chat", "messages"}
KEYS = {"ok": "ck-ok-00000000000000000000", "spent": "ck-spent-000000000000000000",
        "other": "ck-other-000000000000000000"}
KEYS_TOML = (f'[[keys]]\nname = "ok"\nkey = "{KEYS["ok"]}"\nendpoints = ["*"]\n\n'
             f'[[keys]]\nname = "spent"\nkey = "{KEYS["spent"]}"\ndaily_requests = 0\n\n'
             f'[[keys]]\nname = "other"\nkey = "{KEYS["other"]}"\nmodels = ["other-*"]\n')
# What each key state gets, per endpoint: "row" (metered and recorded) or the refusal's (status, code).
REFUSED = {
    "spent": {"count_tokens": "row", "unknown": (400, "endpoint_not_allowed"),
              "*": (429, "budget_exceeded")},
    "other": {"unknown": (400, "endpoint_not_allowed"), "*": (400, "model_not_allowed")},
}


def call(port: int, endpoint: str, stream: bool, key: str | None) -> tuple[int, str, bytes]:
    """The status, the refusal's code (its x-request-id names it; Anthropic's error shape has no code) and
    the body."""
    path, model, _ = CALLS[endpoint]
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key" if endpoint in ("messages", "count_tokens") else "authorization"] = (
            key if endpoint in ("messages", "count_tokens") else f"Bearer {key}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if endpoint == "unknown":
            conn.request("GET", path, headers=headers)
        else:
            body = {"model": model, "input": "hi", "stream": stream, "metadata": {"fake_usage": list(USAGE)}}
            if endpoint == "chat":
                body["stream_options"] = {"include_usage": True}
            conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        request_id = resp.getheader("x-request-id") or ""
        code = request_id.removeprefix("codex-relay-").rpartition("-")[0] if request_id.startswith("codex-") else ""
        return resp.status, code, resp.read()
    finally:
        conn.close()


def socket_turn(port: int, key: str | None) -> dict:
    """One ``response.create`` on a fresh Responses WebSocket through the relay: the turn's last event
    (``response.completed`` or the relay's ``error``)."""
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    with ws_connect(f"ws://127.0.0.1:{port}/v1/responses", additional_headers=headers, open_timeout=30) as ws:
        model = CALLS["responses"][1]
        ws.send(json.dumps({"type": "response.create", "model": model, "input": "hi",
                            "metadata": {"fake_usage": list(USAGE)}}))
        while True:
            event = json.loads(ws.recv(timeout=30))
            if event["type"] in ("response.completed", "error"):
                return event


def list_models(port: int, key: str) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/v1/models", headers={"authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        assert resp.status == 200
        return [m["id"] for m in json.loads(resp.read())["data"]]
    finally:
        conn.close()


def cells() -> list[tuple[str, bool, str]]:
    return [(endpoint, stream, state) for endpoint in CALLS for stream in ((False, True) if endpoint in STREAMED
                                                                            else (False,))
            for state in ("none", "ok", "spent", "other")]


@pytest.mark.e2e
@pytest.mark.slow
def test_every_call_is_metered_or_refused_before_any_node(db_url: str, tmp_path: Path):
    expected_rows = []
    ws = WsUpstream().start()
    with FakeUpstream("n") as node:
        # One node that speaks both: its WebSocket upgrades go to ``ws``, the rest to ``node``.
        both = Splitter(node.port, ws.port).start()
        nodes = write_nodes(tmp_path / "nodes.toml", [("n", both.base_url, "sk-node", 1)])
        (tmp_path / "keys.toml").write_text(KEYS_TOML)
        # One relay at a time (SQLite): first without client keys, then with them.
        for source, extra in (("open", {}), ("keys", {"codex_client_keys": f"@{tmp_path / 'keys.toml'}"})):
            with RelayProcess(db_url=db_url, options={"codex_nodes": str(nodes), "codex_ping_interval": "0",
                                                      "codex_source": source, **extra}) as relay:
                for endpoint, stream, state in cells():
                    if (state == "none") != (source == "open"):
                        continue
                    seen = len(node.seen)
                    status, code, body = call(relay.port, endpoint, stream, KEYS.get(state))
                    outcome = REFUSED.get(state, {}).get(endpoint, REFUSED.get(state, {}).get("*", "row"))
                    cell = (endpoint, stream, state)
                    if outcome == "row":
                        assert status == 200, (cell, status, body[:300])
                        assert len(node.seen) == seen + 1, cell
                        expected_rows.append((source, endpoint, stream))
                    else:
                        assert (status, code) == outcome, (cell, status, code, body[:300])
                        assert len(node.seen) == seen, f"{cell}: the refused call reached the node"
                # The WebSocket column: a turn on a socket of each key state.
                for state in ("none",) if source == "open" else ("ok", "spent", "other"):
                    creates = len(ws.creates)
                    event = socket_turn(relay.port, KEYS.get(state))
                    outcome = REFUSED.get(state, {}).get("*", "row")
                    if outcome == "row":
                        assert event["type"] == "response.completed", (state, event)
                        assert len(ws.creates) == creates + 1, state
                        expected_rows.append((source, "websocket", True))
                    else:
                        assert event["type"] == "error", (state, event)
                        assert (event["status"], event["error"]["code"]) == outcome, (state, event)
                        assert len(ws.creates) == creates, f"websocket {state}: the refused turn reached the node"
                # GET /v1/models answers a key with models only those it may use (a call like any other).
                if source == "keys":
                    assert list_models(relay.port, KEYS["ok"]) == list(MODELS)
                    assert list_models(relay.port, KEYS["other"]) == []
        both.stop()
    ws.stop()
    # 4 sockets, and each relay asked the node once before its first (addon.wsrelay's takes_upgrade).
    assert len(ws.headers) == 6 and {h["authorization"] for h in ws.headers} == {"Bearer sk-node"}
    got = rows(db_url, "SELECT source, api_format, endpoint, model, stream, status, input_tokens, "
                       "cache_input_tokens, output_tokens, reasoning_tokens, cost FROM codex_invocations")
    found = Counter((r.source, r.endpoint, r.api_format, r.model, bool(r.stream), r.status,
                     (r.input_tokens, r.cache_input_tokens, r.output_tokens, r.reasoning_tokens)) for r in got)
    wanted: Counter = Counter()
    for source, endpoint, stream in expected_rows:
        path, model, usage = CALLS["responses" if endpoint == "websocket" else endpoint]
        if endpoint == "websocket":
            endpoint = "responses"
        wanted[(source, path, None if endpoint == "unknown" else endpoint, model, stream, "success",
                usage or (0, 0, 0, 0))] += 1
    wanted[("keys", "/v1/models", None, None, False, "success", (0, 0, 0, 0))] += 2
    assert found == wanted
    # Token counting and unknown paths are never billed; priced models are.
    assert all(r.cost is None for r in got if r.api_format in (None, "count_tokens"))
    assert all(r.cost is not None for r in got if r.model in ("gpt-5-codex", "claude-sonnet-4-5")
               and r.api_format != "count_tokens")
