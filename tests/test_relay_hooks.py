"""The relay's hook sequence in process: requestheaders → request → responseheaders → response / error, driven
through mitmproxy's addon manager (``tests.support.relayharness``), with the test playing the node, or a fake upstream
on 127.0.0.1 where the relay replays a call on another node itself."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter

import pytest
from mitmproxy.proxy.layers.http import HttpResponseHeadersHook

from addon.nodes.breaker import BreakerPolicy
from addon.refusal import REFUSED_KEY
from store.keys import KeySpec
from store.records import NodeStateUpdate, Usage
from tests.support.fakeupstream import FakeUpstream, responses_events, responses_json
from tests.support.relayharness import RelayHarness, in_loop, node

# The weight that makes a node the first choice: a lighter node (weight 1) goes first once in 10^9.
HEAVY = 1_000_000_000
CALL = {"model": "gpt-5-codex", "stream": True, "input": "hi"}
STREAM = responses_events("gpt-5-codex", (10, 4, 5, 1), 3)
SSE = {"content-type": "text/event-stream"}


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1].split("/", 1)[0])


@in_loop
async def test_a_streamed_call_goes_to_its_node_with_its_key_and_is_recorded_with_what_it_metered(listening):
    a = node("a", listening())
    async with RelayHarness(a) as h:
        flow = await h.send(body=CALL, headers={"session_id": "conv-1"})
        assert flow.response is None  # on its way to the node
        assert (flow.request.scheme, flow.request.host, flow.request.port) == ("http", "127.0.0.1",
                                                                               port_of(a.base_url))
        assert flow.request.path == "/v1/responses"
        # The node's key, and no credential of the client's.
        assert flow.request.headers.get_all("authorization") == ["Bearer key-a"]
        got = await h.answer(flow, 200, STREAM, headers=SSE)
        assert got == b"".join(STREAM)  # the client gets the node's bytes as they came
    (r,) = h.records()
    assert (r.node_id, r.status, r.http_status, r.attempts, r.api_format, r.stream) == (
        "a", "success", 200, 1, "responses", True)
    assert r.usage == Usage(input_tokens=10, cached_tokens=4, output_tokens=5, reasoning_tokens=1)
    assert (r.model, r.requested_model, r.session_key, r.endpoint) == (
        "gpt-5-codex", "gpt-5-codex", "conv-1", "/v1/responses")
    assert r.ttfb_ms is not None and r.response_bytes == len(b"".join(STREAM)) and not r.node_failure
    assert flow.comment.startswith("call: a gpt-5-codex success in 10 (cached 4) out 5")


def error_json(status: int) -> bytes:
    return json.dumps({"error": {"message": f"HTTP {status} from the node", "type": "server_error"}}).encode()


@pytest.mark.parametrize("failure", ["refused", "500", "429"])
@in_loop
async def test_retry_lands_on_a_healthy_node_and_the_failing_node_is_counted(listening, failure):
    with FakeUpstream("good") as good:
        bad = node("bad", closed_port_url() if failure == "refused" else listening(), HEAVY)
        async with RelayHarness(bad, node("good", good.base_url)) as h:
            for k in range(6):
                usage = (10 + k, 0, 5, 0)
                flow = await h.send(body={**CALL, "metadata": {"fake_usage": list(usage)}})
                if flow.request.port == port_of(bad.base_url):  # the failing node's answer: kept from the client
                    await h.answer(flow, int(failure), [error_json(int(failure))], length=True)
                    assert flow.response is not None
                    got = flow.response.raw_content or b""  # the good node's, replayed there by the relay
                else:  # the good node, straight away: the test plays it
                    assert flow.request.port == good.port
                    assert flow.request.headers.get_all("authorization") == ["Bearer key-good"]
                    got = await h.answer(flow, 200, responses_events("gpt-5-codex", usage, 1), headers=SSE)
                assert flow.response.status_code == 200 and b"response.completed" in got
    records = h.records()
    assert [(r.node_id, r.status, r.usage.input_tokens) for r in records] == [("good", "success", 10 + k)
                                                                             for k in range(6)]
    # Three failures in a row mark the node failed; after that it is no longer tried.
    assert [r.attempts for r in records] == [2, 2, 2, 1, 1, 1]
    failed = h.failed_attempts()
    assert [u.node_id for u in failed] == ["bad"] * 3 and all(u.last_error for u in failed)
    opened = [u for u in h.runtime.submitted if isinstance(u, NodeStateUpdate) and u.failed is not None]
    assert [(u.node_id, u.failed) for u in opened] == [("bad", True)]
    assert h.node("bad").failed and h.node("bad").breaker.streak == 3
    assert not h.node("good").failed and h.node("good").breaker.streak == 0
    # The calls replayed on the good node (after a failure status) reached it with its own key only.
    assert len(good.seen) == (0 if failure == "refused" else 3)
    assert {r.headers.get("authorization") for r in good.seen} <= {"Bearer key-good"}


@in_loop
async def test_an_error_event_inside_a_200_stream_is_a_node_failure_and_not_retried(listening):
    created, *_ = responses_events("gpt-5-codex", (1, 0, 1, 0), 1)
    error = (b'event: error\ndata: {"type":"error","error":{"type":"server_error","code":"server_is_overloaded",'
             b'"message":"Our servers are currently overloaded."}}\n\n')
    async with RelayHarness(node("e", listening(), HEAVY), node("ok", listening())) as h:
        flow = await h.send(body=CALL)
        assert flow.request.port == port_of(h.node("e").config.base_url)
        got = await h.answer(flow, 200, [created, error], headers=SSE)
    assert flow.response.status_code == 200 and b"overloaded" in got
    (r,) = h.records()
    assert (r.node_id, r.status, r.attempts, r.node_failure) == ("e", "failed", 1, True)
    assert "overloaded" in r.error_message
    assert h.node("e").breaker.streak == 1 and h.failed_attempts() == []


@in_loop
async def test_all_nodes_down_refuses_without_trying_them():
    x, y = node("x", closed_port_url()), node("y", closed_port_url())
    async with RelayHarness(x, y, policy=BreakerPolicy(threshold=1)) as h:
        answers = [(await h.send(body=CALL)).response for _ in range(4)]
    # The first call finds both nodes down (each breaker opens at its failure); the retries of a client are
    # then the relay's refusal, not attempts of a node, and no answer shows a node's address.
    assert [a.status_code for a in answers] == [502, 429, 429, 429]
    assert json.loads(answers[0].content)["error"]["code"] == "upstream_unreachable"
    assert all(b"127.0.0.1" not in (a.content or b"") for a in answers)
    assert {json.loads(a.content)["error"]["code"] for a in answers[1:]} == {"no_node_available"}
    records = h.records()
    assert len(records) == 4 and {r.status for r in records} == {"failed"}
    assert records[0].node_id in ("x", "y") and "127.0.0.1" in records[0].error_message  # the address stays
    assert [r.node_id for r in records[1:]] == [None] * 3
    assert h.node("x").failed and h.node("y").failed
    # One attempt of each node, then none: the call's own and the one before it failed over.
    assert len(h.failed_attempts()) == 1 and h.failed_attempts()[0].node_id != records[0].node_id


@in_loop
async def test_a_single_failed_node_is_refused_until_its_trial(listening):
    now = [1000.0]
    only = node("only", listening())
    async with RelayHarness(only, policy=BreakerPolicy(cooldown=1.0), clock=lambda: now[0]) as h:

        async def call(status: int) -> int:
            flow = await h.send(body={**CALL, "stream": False})
            if flow.response is None:  # it reached the node: the test answers for it
                body = error_json(status) if status >= 400 else json.dumps(responses_json("gpt-5-codex", (1, 0, 1, 0)))
                await h.answer(flow, status, [body if isinstance(body, bytes) else body.encode()],
                               headers={"content-type": "application/json"}, length=True)
            assert flow.response is not None
            return flow.response.status_code

        # Three failures open its breaker; until its cooldown ends a call is refused (no attempt of the
        # node) and told when to come back; then one trial, and the first that succeeds closes it.
        assert [await call(500) for _ in range(3)] == [500] * 3
        assert await call(200) == 429
        now[0] += 1.0
        assert [await call(200) for _ in range(2)] == [200, 200]
    tried = [(r.node_id, r.status) for r in h.records() if r.node_id is not None]
    assert tried == [("only", "failed")] * 3 + [("only", "success")] * 2
    assert not h.node("only").failed and h.node("only").breaker.streak == 0
    assert sum(r.node_failure for r in h.records()) == 3


@in_loop
async def test_a_node_that_answers_429_with_retry_after_is_left_alone_that_long(listening):
    with FakeUpstream("good") as good:
        busy = node("busy", listening(), HEAVY)
        async with RelayHarness(busy, node("good", good.base_url)) as h:
            reached_busy = 0
            for _ in range(8):
                flow = await h.send(body={**CALL, "stream": False})
                if flow.request.port == port_of(busy.base_url):
                    reached_busy += 1
                    await h.answer(flow, 429, [error_json(429)], headers={"retry-after": "30"}, length=True)
                else:
                    await h.answer(flow, 200, [json.dumps(responses_json("gpt-5-codex", (1, 0, 1, 0))).encode()],
                                   headers={"content-type": "application/json"}, length=True)
                assert flow.response.status_code == 200
    # The first call found out (and was served by the other node); the other seven left it alone.
    assert reached_busy == 1 and len(good.seen) == 1
    assert [r.attempts for r in h.records()] == [2] + [1] * 7


@in_loop
async def test_sticky_sessions_hold_and_spread_by_weight(listening):
    async with RelayHarness(node("a", listening(), 1), node("b", listening(), 3)) as h:
        ports = {port_of(h.node(n).config.base_url): n for n in ("a", "b")}
        chosen = []
        for s in ["conv-1"] * 20 + [f"s-{s}" for s in range(120)]:
            flow = await h.send(body=CALL, headers={"session_id": s})
            chosen.append(ports[flow.request.port])
            await h.answer(flow, 200, STREAM, headers=SSE)
    assert [r.node_id for r in h.records()] == chosen
    assert len(set(chosen[:20])) == 1
    spread = Counter(chosen[20:])
    assert 0.55 < spread["b"] / 120 < 0.92, spread


@pytest.mark.parametrize("node_speaks", ["HTTP/1.1", "HTTP/2"])
@in_loop
async def test_a_node_without_response_headers_in_time_fails_the_call(listening, node_speaks):
    async with RelayHarness(node("slow", listening()), codex_first_byte_timeout="0.05") as h:
        flow = await h.send(body=CALL)
        handler = await h.connected(flow, alpn=b"h2" if node_speaks == "HTTP/2" else None)
        if node_speaks == "HTTP/1.1":
            # The relay answers for the node: a JSON 504 the client's SDK reads, with every hook as usual.
            answer = await handler.answered
            assert answer.status_code == 504 and json.loads(answer.content)["error"]["code"] == "upstream_timeout"
            await h.answer(flow, answer.status_code, [answer.content], headers=dict(answer.headers), length=True)
        else:  # mitmproxy cannot be answered for over HTTP/2: the node's connection is closed
            await asyncio.wait_for(handler.closed.wait(), 10)
            await h.fail(flow, "Server disconnected.")
    (r,) = h.records()
    assert (r.node_id, r.status, r.node_failure) == ("slow", "failed", True)
    assert r.error_message == "no response headers within 0.05 s"
    assert h.node("slow").breaker.streak == 1


@in_loop
async def test_a_stream_whose_node_goes_quiet_is_cut_and_recorded_truncated(listening):
    first, *rest = STREAM
    async with RelayHarness(node("stall", listening()), codex_idle_timeout="0.2") as h:
        flow = await h.send(body=CALL)
        handler = await h.connected(flow)
        h.headers(flow, 200, SSE, None)
        await h.hook(HttpResponseHeadersHook(flow))
        assert flow.response.stream(first) == first
        await asyncio.wait_for(handler.closed.wait(), 10)  # the idle watch closed the node's connection
        await h.fail(flow, "Server disconnected.")
    (r,) = h.records()
    assert (r.status, r.node_failure, r.error_message) == ("truncated", True, "no bytes from the node for 0.2 s")
    assert r.response_bytes == len(first)
    assert h.node("stall").breaker.streak == 1


@in_loop
async def test_a_client_that_goes_away_mid_stream_is_no_failure_of_the_node(listening):
    first, *rest = STREAM
    async with RelayHarness(node("a", listening())) as h:
        flow = await h.send(body=CALL)
        h.headers(flow, 200, SSE, None)
        await h.hook(HttpResponseHeadersHook(flow))
        flow.response.stream(first)
        await h.fail(flow, "Client disconnected.")
    (r,) = h.records()
    assert (r.node_id, r.status, r.node_failure, r.error_message) == ("a", "aborted", False, "Client disconnected.")
    assert h.node("a").breaker.streak == 0 and h.failed_attempts() == []


@in_loop
async def test_a_keys_limits_refuse_before_any_node_and_a_finished_call_frees_its_slot(listening):
    keys = [KeySpec("team", "sk-team-key", rpm=2, concurrency=1), KeySpec("small", "sk-small", models=("gpt-5",))]
    async with RelayHarness(node("a", listening()), keys=keys) as h:
        first = await h.send(body=CALL, client_key="team")
        assert first.response is None  # admitted: on its way to the node
        second = await h.send(body=CALL, client_key="team")  # the first still holds the one slot
        await h.answer(first, 200, STREAM, headers=SSE)
        third = await h.send(body=CALL, client_key="team")  # the first's slot is free again
        await h.answer(third, 200, STREAM, headers=SSE)
        fourth = await h.send(body=CALL, client_key="team")  # a third admission in the minute
        model = await h.send(body=CALL, client_key="small")
    for refused, status, code in ((second, 429, "concurrency_limited"), (fourth, 429, "rate_limited"),
                                  (model, 400, "model_not_allowed")):
        assert refused.response.status_code == status and json.loads(refused.response.content)["error"]["code"] == code
        assert REFUSED_KEY in refused.metadata and refused.request.host == "relay.test"  # it reached no node
    assert [r.client_key for r in h.records()] == ["team", "team"]  # a refusal is no invocation
    assert [(c.client_key, c.counter) for c in h.key_counts()] == [
        ("team", "refused_concurrency"), ("team", "refused_rate"), ("small", "refused_model")]


@in_loop
async def test_a_model_no_node_serves_is_refused_and_recorded_without_a_node(listening):
    async with RelayHarness(node("a", listening(), models=("gpt-5",))) as h:
        flow = await h.send(body=CALL)
    assert flow.response.status_code == 400
    assert json.loads(flow.response.content)["error"]["code"] == "model_not_found"
    (r,) = h.records()
    assert (r.node_id, r.status, r.node_failure) == (None, "failed", False)
    assert r.error_message == "no configured node serves model 'gpt-5-codex' (responses)"


@in_loop
async def test_calls_in_flight_at_shutdown_are_recorded_aborted(listening):
    async with RelayHarness(node("a", listening())) as h:
        waiting = await h.send(body=CALL)
        streaming = await h.send(body=CALL)
        h.headers(streaming, 200, SSE, None)
        await h.hook(HttpResponseHeadersHook(streaming))
        streaming.response.stream(STREAM[0])
        for callback in h.runtime.shutdown:  # the runtime's done, before the writer's last flush
            callback()
        assert not h.relay.idle.armed
    assert {r.status for r in h.records()} == {"aborted"} and len(h.records()) == 2
    assert {r.error_message for r in h.records()} == {"the relay shut down during the call"}
    assert waiting.comment.startswith("call: a") and streaming.marked


@in_loop
async def test_an_error_event_in_a_200_and_a_failure_status_are_failed_calls_of_the_node(listening):
    created, *_ = responses_events("gpt-5-codex", (1, 0, 1, 0), 1)
    error = b'event: error\ndata: {"type":"error","error":{"message":"Our servers are currently overloaded."}}\n\n'
    async with RelayHarness(node("bad", listening()), policy=BreakerPolicy(threshold=100), codex_retries=0) as h:
        streamed = await h.send(body=CALL)
        assert b"overloaded" in await h.answer(streamed, 200, [created, error], headers=SSE)
        whole = await h.send("/v1/chat/completions", {"model": "gpt-5-codex", "messages": []})
        await h.answer(whole, 500, [error_json(500)], headers={"content-type": "application/json"}, length=True)
        assert whole.response.status_code == 500  # no other node may be tried: the client gets the node's answer
    records = h.records()
    assert [(r.status, r.http_status, r.node_failure) for r in records] == [("failed", 200, True),
                                                                            ("failed", 500, True)]
    assert "overloaded" in records[0].error_message
    assert h.node("bad").breaker.streak == 2 and h.failed_attempts() == []


@in_loop
async def test_no_node_available_gives_a_final_openai_style_429():
    async with RelayHarness(node("off", "http://127.0.0.1:9/v1", 0)) as h:
        flow = await h.send(body=CALL)
    assert flow.response.status_code == 429  # final: every node has weight 0, waiting cannot help (docs/refusals.md)
    assert "retry-after" not in flow.response.headers
    assert json.loads(flow.response.content)["error"]["code"] == "no_node_available"
    assert [(r.status, r.http_status, r.node_id) for r in h.records()] == [("failed", 429, None)]
