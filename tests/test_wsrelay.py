"""Responses over WebSocket in process: the relay's upgrade handling and socket hooks (addon.wsrelay)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
from mitmproxy import http
from mitmproxy.connection import Server
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from addon.wsrelay import NO_WEBSOCKET_S
from store.keys import KeySpec
from store.records import NodeConfig, NodeStateUpdate
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.flows import request_flow
from tests.support.waiting import wait_for
from tests.support.wsenv import Env, completed, node, upgrade_call
from tests.support.wsupstream import WsUpstream


def test_each_response_create_is_one_invocation_and_the_upgrade_none():
    env = Env(node())
    with taddons.context(env.relay):
        flow = env.open()
        assert env.records() == []  # the 101 is no call
        for n, base in enumerate((100.0, 200.0)):
            env.client(flow, {"type": "response.create", "model": "gpt-5", "input": "hi"}, base)
            env.server(flow, {"type": "response.created", "response": {"model": "gpt-5-2025"}}, base + 0.25)
            env.server(flow, {"type": "response.output_text.delta", "delta": "x"}, base + 0.5)
            env.server(flow, completed("gpt-5-2025", 100 + n, 20, 30, 5), base + 2.0)
        first, second = env.records()
        assert first.usage.input_tokens == 100
        assert (second.usage.input_tokens, second.usage.cached_tokens, second.usage.output_tokens,
                second.usage.reasoning_tokens) == (101, 20, 30, 5)
        assert first.invoke_id != second.invoke_id
        for r in (first, second):
            assert (r.status, r.node_id, r.model, r.requested_model, r.api_format) == (
                "success", "a", "gpt-5-2025", "gpt-5", "responses")
            assert (r.ttfb_ms, r.stream_ms, r.duration_ms) == (250, 1750, 2000)
            assert "websocket" in r.flags and r.stream and r.http_status == 101
        # Nothing but the newest message is kept on the flow: nobody shows flows here.
        assert len(flow.websocket.messages) == 1


def test_an_error_event_fails_the_turn_and_a_close_mid_turn_truncates_it():
    env = Env(node())
    with taddons.context(env.relay):
        flow = env.open()
        env.client(flow, {"type": "response.create", "model": "gpt-5"}, 1.0)
        env.server(flow, {"type": "error", "status": 500, "error": {"type": "server_error", "message": "overloaded"}},
                   2.0)
        env.client(flow, {"type": "response.create", "model": "gpt-5"}, 3.0)
        env.server(flow, {"type": "response.created", "response": {"model": "gpt-5"}}, 3.5)
        flow.websocket.closed_by_client = False
        flow.websocket.close_code = 1006
        env.sockets.websocket_end(flow)
        failed, cut = env.records()
        assert (failed.status, failed.node_failure) == ("failed", True)
        assert failed.error_message == "server_error: overloaded"
        assert (cut.status, cut.node_failure) == ("truncated", True)
        assert "closed by the node" in (cut.error_message or "")


def test_key_limits_apply_per_turn_and_a_refused_turn_never_reaches_the_node():
    spec = KeySpec(name="alice", key_digest=hashlib.sha256(b"k").digest(), models=("gpt-5*",), rpm=2)
    env = Env(node(), keys=[spec])
    with taddons.context(env.relay, env.limits):
        flow = env.open(key="alice")
        refused = env.client(flow, {"type": "response.create", "model": "o3"}, 1.0)
        assert refused.dropped
        event = json.loads(env.injected[-1])
        assert event["type"] == "error" and event["status"] == 400
        assert event["error"]["code"] == "model_not_allowed" and "o3" in event["error"]["message"]
        for at in (2.0, 3.0):
            ok = env.client(flow, {"type": "response.create", "model": "gpt-5"}, at)
            assert not ok.dropped
            env.server(flow, completed("gpt-5", 10, 0, 1, 0), at + 0.5)
        third = env.client(flow, {"type": "response.create", "model": "gpt-5"}, 4.0)
        assert third.dropped and json.loads(env.injected[-1])["error"]["code"] == "rate_limited"
        assert len(env.records()) == 2 and env.limits.in_flight("alice") == 0  # type: ignore[union-attr]


def test_the_nodes_models_are_checked_and_mapped_per_turn():
    env = Env(node(models=("gpt-5*",), model_map={"codex": "gpt-5-codex"}))
    with taddons.context(env.relay):
        flow = env.open()
        refused = env.client(flow, {"type": "response.create", "model": "o3"}, 1.0)
        assert refused.dropped and json.loads(env.injected[-1])["error"]["code"] == "model_not_found"
        mapped = env.client(flow, {"type": "response.create", "model": "codex", "input": "x"}, 2.0)
        assert not mapped.dropped and json.loads(mapped.content)["model"] == "gpt-5-codex"
        bad = env.client(flow, {"type": "response.create", "model": "\x07"}, 3.0)
        assert bad.dropped and json.loads(env.injected[-1])["error"]["code"] == "invalid_request_body"
        steer = env.client(flow, {"type": "response.steer", "input": "more"}, 4.0)  # no turn of its own
        assert not steer.dropped


@pytest.mark.parametrize(("status", "node_failure"), [(404, False), (502, True)])
def test_a_node_refusing_the_upgrade_gets_the_client_a_426(status, node_failure):
    env = Env(node("a"), node("b"))
    with taddons.context(env.relay):
        flow = tflow.tflow(req=tflow.treq(method=b"GET", path=b"/v1/responses"), resp=tflow.tresp(status_code=status))
        env.sockets.upgraded(flow, upgrade_call(env.pool.get("a")))
        assert flow.response is not None and flow.response.status_code == 426
        assert json.loads(flow.response.content or b"")["error"]["code"] == "websocket_unavailable"
        assert env.records() == []
        failed = [u for u in env.submitted if isinstance(u, NodeStateUpdate) and u.failed_attempt]
        assert bool(failed) is node_failure
        assert ("a" in env.sockets.barred()) is not node_failure  # a 404: no upgrade to it for a while
        env.now += NO_WEBSOCKET_S
        assert "a" not in env.sockets.barred()


def test_an_upgrade_no_node_takes_is_answered_426_at_once():
    env = Env(node("a", websocket=False))
    with taddons.context(env.relay):
        flow = request_flow(headers={"upgrade": "websocket", "connection": "Upgrade"})
        flow.request.method = "GET"
        flow.response = None
        asyncio.run(env.relay.request(flow))
        assert flow.response is not None
        asyncio.run(env.relay.response(flow))
        assert flow.response.status_code == 426
        assert "none of the nodes this client may use takes WebSockets" in (flow.response.text or "")
        assert env.records() == []
        # An HTTP call still goes to that node.
        call = request_flow()
        call.request.method = "POST"
        call.request.content = b'{"model": "gpt-5", "input": "hi"}'
        call.response = None
        # mitmproxy has a connection of this client's to the node open: no connect probe
        connected = ServerConnectionHookData(Server(address=("a.example", 80)), call.client_conn)
        env.relay.failover.server_connected(connected)
        asyncio.run(env.relay.request(call))
        assert call.response is None and call.request.host == "a.example"


def upgrade_flow(session: str) -> http.HTTPFlow:
    flow = request_flow(headers={"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
                                 "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "session-id": session,
                                 "authorization": "Bearer client-key"})
    flow.request.method = "GET"
    flow.response = None
    return flow


@pytest.mark.parametrize("retries", [1, 0])
def test_a_node_refusing_the_upgrade_is_failed_over_before_anything_is_sent(retries):
    refuser, ws = FakeUpstream("a", behaviour=Behaviour(status=404)).start(), WsUpstream().start()
    try:
        env = Env(NodeConfig(id="a", base_url=refuser.base_url, api_key="key-a"),
                  NodeConfig(id="b", base_url=ws.base_url, api_key="key-b"))
        env.pool.sticky.put("s1", "a")  # the upgrade goes to the refusing node first
        with taddons.context(env.relay) as tctx:
            tctx.options.codex_retries = retries
            flow = upgrade_flow("s1")
            asyncio.run(env.relay.request(flow))
            assert "a" in env.sockets.barred() and len(refuser.seen) == 1  # asked once, then no upgrade to it
            if not retries:  # no other node may be tried: 426 at once, the node that takes it never asked
                assert flow.response is not None and flow.response.status_code == 426
                assert "node a does not take WebSockets (HTTP 404" in flow.response.text
                assert ws.headers == [] and env.in_flight() == 0
                return
            assert flow.response is None  # nothing sent for the client yet: mitmproxy sends it to b
            assert (flow.request.port, flow.request.headers["authorization"]) == (ws.port, "Bearer key-b")
            wait_for(lambda: ws.headers, what="node b's record of the upgrade it was asked")
            assert len(ws.headers) == 1 and ws.headers[0]["authorization"] == "Bearer key-b"
            # b answered 101 (addon.wsrelay remembers it): the next upgrade goes there unasked.
            again = upgrade_flow("s2")
            asyncio.run(env.relay.request(again))
            assert again.response is None and again.request.port == ws.port and len(ws.headers) == 1
            assert len(refuser.seen) == 1
    finally:
        refuser.stop()
        ws.stop()


def test_a_turn_whose_node_goes_quiet_for_the_idle_timeout_is_cut_by_the_relays_idle_watch():
    env = Env(node())
    closed: list[http.HTTPFlow] = []
    env.sockets.close = closed.append  # type: ignore[method-assign]
    with taddons.context(env.relay) as tctx:
        tctx.options.codex_idle_timeout = "10"
        now = time.time()
        quiet, busy = env.open(), env.open()

        async def turns_and_tick() -> bool:
            # The node answered the quiet socket's turn once, 25 s ago; the busy one's a second ago.
            for flow, base in ((quiet, now - 30), (busy, now - 2)):
                pending = env.sockets.websocket_message(
                    _append(flow, {"type": "response.create", "model": "gpt-5"}, base, from_client=True))
                assert pending is not None
                await pending
                _append(flow, {"type": "response.created", "response": {"model": "gpt-5"}}, base + 1)
                assert env.sockets.websocket_message(flow) is None
            watch = env.relay.idle
            assert watch.armed  # a turn started: the relay's one idle watch runs for it
            watch.check()  # what the armed watch runs
            armed = watch.armed
            watch.stop()
            return armed

        assert asyncio.run(turns_and_tick())  # the busy socket's turn still runs: watched on
        (cut,) = env.records()
        assert (cut.status, cut.node_failure, cut.error_message) == (
            "truncated", True, "no message from the node for 10 s")
        event = json.loads(env.injected[-1])
        assert (event["type"], event["status"], event["error"]["code"]) == ("error", 504, "upstream_timeout")
        assert closed == [quiet]
        # What the node sends later on the cut socket is no turn's; the busy socket's turn ends as usual.
        _append(quiet, completed("gpt-5", 1, 0, 1, 0), now)
        assert env.sockets.websocket_message(quiet) is None
        env.server(busy, completed("gpt-5", 10, 0, 2, 0), now)
        assert [r.status for r in env.records()] == ["truncated", "success"]


def _append(flow: http.HTTPFlow, obj: dict, at: float, *, from_client: bool = False) -> http.HTTPFlow:
    flow.websocket.messages.append(WebSocketMessage(Opcode.TEXT, from_client, json.dumps(obj).encode(), timestamp=at))
    return flow
