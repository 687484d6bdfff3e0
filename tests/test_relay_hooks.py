"""The relay's hook sequence in process: requestheaders → request → responseheaders → response / error, driven
through mitmproxy's addon manager (``tests.relayharness``), with the test playing the node, or a fake upstream
on 127.0.0.1 where the relay replays a call on another node itself."""

from __future__ import annotations

import socket

from bench.fakeupstream import responses_events
from store.records import Usage
from tests.relayharness import RelayHarness, in_loop, node

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
