"""Fleet: model-aware routing (formats, model globs, model maps) and node state shared by relays on one
database. In process: plain functions, the pool, the relay's request hook, and two Runtimes on one database."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addon.nodes.modelroute import rewrite_model, serves
from addon.nodes.routing import Node, NodePool
from addon.relay import Relay
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store.config import ConfigError, node_from_mapping
from store.engine import make_engine
from store.nodes import config_of, load_nodes, read_version, set_disabled, upsert_nodes
from store.records import NodeConfig
from tests.support.databases import at_head, rows
from tests.support.waiting import wait_for

OPENAI = NodeConfig(id="oa", name="oa", base_url="http://127.0.0.1:1/v1", formats=("openai",), models=("gpt-5*",),
                    model_map={"gpt-5-codex": "gpt-5.1-codex", "o3": "gpt-5"})
ANTHROPIC = NodeConfig(id="an", name="an", base_url="http://127.0.0.1:2/v1", formats=("anthropic",),
                       models=("claude-*",))


@pytest.mark.parametrize(("api_format", "model", "oa", "an"), [
    ("responses", "gpt-5.1-codex", True, False),
    ("chat", "gpt-5-mini", True, False),
    ("responses", "o3", True, False),  # not matched by a glob, but mapped
    ("messages", "claude-sonnet-4-5", False, True),
    ("messages", "gpt-5", False, False),  # right model, wrong format
    ("responses", "llama-3", False, False),
    ("responses", None, True, False),  # no model in the body: the format decides
    (None, "anything", True, True),  # not an API call: no limit
])
def test_a_node_serves_its_formats_and_models(api_format, model, oa, an):
    assert (serves(OPENAI, api_format, model), serves(ANTHROPIC, api_format, model)) == (oa, an)
    assert serves(NodeConfig(id="any", base_url="http://x/v1"), api_format, model)


def test_the_choice_sticks_to_nodes_that_serve_the_call():
    pool = NodePool([Node(OPENAI), Node(ANTHROPIC)], rng=random.Random(3))
    assert {pool.choose(api_format="messages", model="claude-opus-4").id for _ in range(200)} == {"an"}
    assert {pool.choose(api_format="responses", model="gpt-5-codex").id for _ in range(200)} == {"oa"}
    # A session stuck on the OpenAI node does not take its Anthropic call there.
    assert pool.choose(session_key="s", api_format="responses", model="gpt-5").id == "oa"
    assert pool.choose(session_key="s", api_format="messages", model="claude-x").id == "an"
    # Failover and retries exclude the tried node: no other node serves the call, so none.
    assert pool.choose(exclude=["an"], api_format="messages", model="claude-x") is None
    assert not pool.serves_any("responses", "llama-3") and pool.serves_any("messages", "claude-x")
    pool.get("an").disabled = True  # configured but out of rotation: no choice, yet it serves
    assert pool.choose(api_format="messages", model="claude-x") is None and pool.serves_any("messages", "claude-x")


def test_rewrite_changes_only_the_top_level_model():
    body = (b'{ "input": [{"model": "gpt-5-codex", "text": "caf\xc3\xa9 \\"model\\""}],\n'
            b'  "model" :  "gpt-5-codex" , "stream": true}')
    out = rewrite_model(body, "gpt-5.1-codex")
    assert out == body.replace(b'"model" :  "gpt-5-codex"', b'"model" :  "gpt-5.1-codex"')
    assert json.loads(out)["input"][0]["model"] == "gpt-5-codex"
    assert rewrite_model(b'["model"]', "x") is None and rewrite_model(b'{"a": 1}', "x") is None
    assert rewrite_model(b'\xff{', "x") is None and rewrite_model(b'{"a": ', "x") is None


def test_node_fields_are_validated():
    node = node_from_mapping({"id": "n", "base_url": "http://h/v1", "formats": ["anthropic"], "models": ["claude-*"],
                              "model_map": {"a": "b"}}, "n")
    assert (node.formats, node.models, node.model_map) == (("anthropic",), ("claude-*",), {"a": "b"})
    for bad in ({"formats": ["gemini"]}, {"formats": "openai"}, {"models": [1]}, {"model_map": {"a": 1}}):
        with pytest.raises(ConfigError, match="formats|models|model_map"):
            node_from_mapping({"id": "n", "base_url": "http://h/v1", **bad}, "n")


def test_served_fields_are_stored_and_every_node_change_moves_the_version(db_url):
    engine = make_engine(at_head(db_url))
    with engine.begin() as conn:
        start = read_version(conn)
        upsert_nodes(conn, [OPENAI, ANTHROPIC])
        assert read_version(conn) == start + 1
        assert [config_of(r) for r in load_nodes(conn)] == [ANTHROPIC, OPENAI]
        assert set_disabled(conn, "oa", True) and read_version(conn) == start + 2
        assert not set_disabled(conn, "nope", True) and read_version(conn) == start + 2
    engine.dispose()


def nodes_file(tmp_path: Path, *nodes: tuple[str, str, str]) -> str:
    path = tmp_path / "nodes.toml"
    path.write_text("".join(f'[[nodes]]\nid = "{i}"\nbase_url = "{url}"\napi_key = "k-{i}"\n{extra}\n\n'
                            for i, url, extra in nodes))
    return str(path)


def test_relay_routes_by_model_rewrites_mapped_calls_and_refuses_unserved_models(db_url, tmp_path):
    """Requests through the relay's hooks: the mapped body goes to the OpenAI node, the Anthropic call to
    its node, a model nobody serves gets a recorded 400 model_not_found in the API's shape."""
    from tests.support.fakeupstream import FakeUpstream

    with FakeUpstream("oa") as oa, FakeUpstream("an") as an:
        runtime = Runtime()
        options = RuntimeOptions(runtime)
        relay = Relay(runtime)
        path = nodes_file(tmp_path,
                          ("oa", oa.base_url, 'formats = ["openai"]\nmodel_map = {"gpt-5-codex" = "gpt-5.1"}'),
                          ("an", an.base_url, 'formats = ["anthropic"]\nmodels = ["claude-*"]'))
        with taddons.context(options, relay) as tctx:
            tctx.configure(options, codex_db=at_head(db_url), codex_nodes=path, codex_ping_interval="0",
                           codex_node_sync="0", codex_writer_process=False)  # routing here; the writer: test_writerproc

            def send(target: str, body: bytes) -> http.HTTPFlow:
                f = tflow.tflow()
                f.request.path, f.request.method = target, "POST"
                f.request.headers["content-type"] = "application/json"
                f.request.content = body
                f.request.timestamp_start = f.request.timestamp_end = time.time()  # tflow's are from 2000
                asyncio.run(relay.request(f))
                return f

            try:
                mapped = send("/v1/responses", b'{"model": "gpt-5-codex",  "input": "hi"}')
                assert (mapped.request.port, mapped.request.content) == (
                    oa.port, b'{"model": "gpt-5.1",  "input": "hi"}')
                assert mapped.request.headers["content-length"] == str(len(mapped.request.content))
                claude = send("/v1/messages", b'{"model": "claude-sonnet-4-5", "max_tokens": 5}')
                assert (claude.request.port, claude.request.content) == (
                    an.port, b'{"model": "claude-sonnet-4-5", "max_tokens": 5}')
                unserved = send("/v1/messages", b'{"model": "gpt-5", "max_tokens": 5}')
                assert unserved.response.status_code == 400
                assert json.loads(unserved.response.content)["error"]["type"] == "invalid_request_error"
                asyncio.run(relay.response(unserved))
                mapped.response = http.Response.make(200, json.dumps({"model": "gpt-5.1-2026", "usage": {
                    "input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}), {"content-type": "application/json"})
                asyncio.run(relay.response(mapped))
            finally:
                options.done()
    # The Anthropic call had no answer yet: recorded aborted at shutdown, left out here.
    got = rows(db_url, "SELECT requested_model, model, status, http_status, node_id FROM codex_invocations "
                       "WHERE status <> 'aborted' ORDER BY http_status")
    assert [tuple(r) for r in got] == [("gpt-5-codex", "gpt-5.1-2026", "success", 200, "oa"),
                                       ("gpt-5", "gpt-5", "failed", 400, None)]


@pytest.fixture
def two_relays(db_url, tmp_path):
    """Two Runtimes on one database with the same nodes file, each checking node state every 0.2 s."""
    path = nodes_file(tmp_path, ("a", "http://127.0.0.1:1/v1", ""), ("b", "http://127.0.0.1:2/v1", ""))
    relays = []
    at_head(db_url)
    for name in ("one", "two"):
        options = RuntimeOptions(Runtime())
        with taddons.context(options) as tctx:
            tctx.configure(options, codex_db=db_url, codex_nodes=path, codex_ping_interval="0",
                           codex_node_sync="0.2", codex_spool=str(tmp_path / f"spool-{name}.db"),
                           codex_writer_process=False)  # node sync is tested here; the writer in test_writerproc
        relays.append(options)
    yield [options.runtime for options in relays]
    for options in relays:
        options.done()


def test_node_changes_on_one_relay_reach_the_other_in_place(two_relays):
    one, two = two_relays
    node_b = two.pool.get("b")
    assert one.fleet.set_node_disabled("b", True)
    wait_for(lambda: node_b.disabled, 5, "relay two sees b disabled")
    assert one.fleet.set_node_disabled("b", False)
    wait_for(lambda: not node_b.disabled, 5, "relay two sees b enabled")
    one.fleet.update_node(NodeConfig(id="b", base_url="http://127.0.0.1:3/v1", weight=7, models=("gpt-5*",)))
    wait_for(lambda: node_b.config.weight == 7, 5, "relay two sees b's new weight")
    assert two.pool.get("b") is node_b and node_b.config.models == ("gpt-5*",)  # same object: calls report to it
    one.fleet.update_node(NodeConfig(id="c", base_url="http://127.0.0.1:4/v1"))
    wait_for(lambda: two.pool.get("c") is not None, 5, "relay two routes the node added on relay one")


def test_a_breaker_opened_on_one_relay_opens_on_the_other(two_relays, db_url):
    one, two = two_relays
    for _ in range(one.health.policy.threshold):
        one.health.failure(one.pool.get("a"), "HTTP 502")
    assert one.pool.get("a").failed and not two.pool.get("a").failed
    wait_for(lambda: two.pool.get("a").failed, 5, "relay two sees a failed")
    assert {two.pool.choose().id for _ in range(50)} == {"b"}
    one.health.success(one.pool.get("a"))
    wait_for(lambda: not two.pool.get("a").failed, 5, "relay two sees a recovered")
    # Stats stay the writer's: no reload wrote them.
    assert [tuple(r) for r in rows(db_url, "SELECT id, requests, fail_count FROM nodes ORDER BY id")] == \
        [("a", 0, 0), ("b", 0, 0)]


@pytest.mark.e2e
def test_openai_and_anthropic_nodes_side_by_side(db_url, tmp_path):
    """A real relay: Codex's mapped call streams from the OpenAI node with the node's model name, a Claude
    call from the Anthropic node, and a model neither serves gets a 400 without reaching either."""
    from tests.support.calls import call
    from tests.support.fakeupstream import FakeUpstream
    from tests.support.relayproc import RelayProcess

    with FakeUpstream("oa") as oa, FakeUpstream("an") as an:
        path = nodes_file(tmp_path, ("oa", oa.base_url, 'formats = ["openai"]\nmodels = ["gpt-5*"]\n'
                                                        'model_map = {"gpt-5-codex" = "gpt-5.1-codex"}'),
                          ("an", an.base_url, 'formats = ["anthropic"]\nmodels = ["claude-*"]'))
        with RelayProcess(db_url=db_url, options={"codex_nodes": path, "codex_ping_interval": "0"}) as relay:
            assert call(relay, "responses", stream=True, usage=(10, 0, 5, 0))[0] == 200
            assert call(relay, "messages", stream=True, usage=(20, 0, 6, 0), model="claude-sonnet-4-5")[0] == 200
            status, body = call(relay, "messages", stream=False, usage=(1, 0, 1, 0), model="gpt-5")
            assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
        assert [json.loads(r.body)["model"] for r in oa.requests_to("/responses")] == ["gpt-5.1-codex"]
        assert [json.loads(r.body)["model"] for r in an.requests_to("/messages")] == ["claude-sonnet-4-5"]
    got = rows(db_url, "SELECT node_id, requested_model, model, http_status, output_tokens FROM codex_invocations "
                       "ORDER BY http_status, node_id")
    assert [tuple(r) for r in got] == [("an", "claude-sonnet-4-5", "claude-sonnet-4-5", 200, 6),
                                       ("oa", "gpt-5-codex", "gpt-5.1-codex", 200, 5),
                                       (None, "gpt-5", "gpt-5", 400, 0)]
