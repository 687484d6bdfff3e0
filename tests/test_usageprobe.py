"""The usage probe (issue 17, item 1): a streamed chat call without include_usage is sent asking for it,
and the usage chunk this adds never reaches the client; the row gets the usage."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers, Request, Response
from mitmproxy.test import tutils

from addon.bodies import CONTENT_HEADERS, chunks, prepare_body, start_meter, strips_usage
from addon.egress import header_values
from addon.metering.call import Call
from addon.metering.meter import StreamMeter
from addon.metering.usage import RequestInfo
from addon.metering.usageprobe import MAX_HELD_BYTES, UsageChunkFilter, add_include_usage
from addon.nodes.routing import Node
from store.config import ConfigError, node_from_mapping
from store.records import NodeConfig, Usage
from tests.support.calls import write_nodes
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream, chat_events
from tests.support.relayproc import RelayProcess

USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
         "prompt_tokens_details": {"cached_tokens": 100}, "completion_tokens_details": {"reasoning_tokens": 7}}


def chunk(obj: dict | str, eol: bytes = b"\n") -> bytes:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return b"data: " + text.encode() + eol + eol


def chat_stream(deltas: list[str], eol: bytes = b"\n") -> tuple[bytes, bytes]:
    """(what the upstream sends when asked for usage, what a client that did not ask gets)."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-5-mini"}
    body = b"".join(chunk(dict(base, choices=[{"index": 0, "delta": {"content": d}}], usage=None), eol)
                    for d in deltas)
    body += chunk(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], usage=None), eol)
    done = chunk("[DONE]", eol)
    return body + chunk(dict(base, choices=[], usage=USAGE), eol) + done, body + done


def run(stream: bytes, cuts: list[int]) -> tuple[bytes, StreamMeter, UsageChunkFilter]:
    meter = StreamMeter("chat", "text/event-stream", None)
    f = UsageChunkFilter(meter)
    out: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            sent = f(stream[a:b])
            assert isinstance(sent, list) and b"" not in sent  # b"" would end an HTTP/1.1 body early
            out += sent
    out += f(b"")
    return b"".join(out), meter, f


# -- the request ------------------------------------------------------------------------------------
def test_the_probe_adds_include_usage_and_keeps_every_other_byte():
    body = b'{ "model": "gpt-5-mini",\n  "stream": true, "messages": [{"role": "user", "content": "h\\u00e9"}] }'
    sent = add_include_usage(body)
    assert json.loads(sent) == dict(json.loads(body), stream_options={"include_usage": True})
    assert sent.endswith(body[1:])  # inserted first: the client's bytes follow untouched
    kept = b'{"stream": true, "stream_options": {"chunk": 1}, "model": "m"}'
    assert add_include_usage(kept) == (
        b'{"stream": true, "stream_options": {"chunk":1,"include_usage":true}, "model": "m"}')
    for off in (b'{"stream": true, "stream_options": {"include_usage": false}}',
                b'{"stream": true, "stream_options": {"include_usage": null}}',
                b'{"stream": true, "stream_options": {"include_usage": 0}}'):
        assert json.loads(add_include_usage(off))["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("body", [b'{"stream": true, "stream_options": {"include_usage": true}}',
                                  # Asked for usage all the same: the client gets its usage chunk (issue 25).
                                  b'{"stream": true, "stream_options": {"include_usage": 1}}',
                                  b'{"stream": true, "stream_options": {"include_usage": "yes"}}',
                                  b'{"stream": false}', b'{"model": "m"}', b"not json", b"[1]",
                                  b'{"stream": true, "stream_options": "x"}'])
def test_the_probe_leaves_bodies_that_need_nothing(body: bytes):
    assert add_include_usage(body) is None


def _call(body: bytes, *, api_format: str = "chat", stream: bool = True) -> tuple[Call, Request]:
    """A call as the relay starts it, and its request."""
    request = tutils.treq(content=body, path="/v1/chat/completions")
    return Call.start("/v1/chat/completions", api_format, RequestInfo("gpt-5-codex", stream, None), session_key=None,
                      request_bytes=len(body)), request


def _sent(*, probe: bool) -> tuple[Call, Request]:
    """A streamed chat call without usage, sent to a node that takes the probe (or turns it off)."""
    call, request = _call(b'{"model": "gpt-5-codex", "stream": true, "messages": []}')
    prepare_body(request, call, Node(NodeConfig("a", "https://a.example/v1", usage_probe=probe)))
    assert call.probed is probe
    return call, request


def test_each_node_gets_the_clients_body_with_its_model_and_its_probe_setting():
    body = b'{"model": "gpt-5-codex", "stream": true, "messages": []}'
    state, req = _call(body)
    mapped = Node(NodeConfig("a", "https://a.example/v1", model_map={"gpt-5-codex": "gpt-5.1"}))
    prepare_body(req, state, mapped)
    assert state.probed and json.loads(req.content) == {"model": "gpt-5.1", "stream": True, "messages": [],
                                                        "stream_options": {"include_usage": True}}
    # A retry on a node that rejects stream_options: the client's body again, no probe.
    prepare_body(req, state, Node(NodeConfig("b", "https://b.example/v1", usage_probe=False)))
    assert not state.probed and req.content == body
    # Not a streamed chat call: nothing changes.
    other, other_req = _call(b'{"model": "gpt-5-codex", "stream": true}', api_format="responses")
    prepare_body(other_req, other, Node(NodeConfig("c", "https://c.example/v1")))
    assert not other.probed and other_req.content == b'{"model": "gpt-5-codex", "stream": true}'


def test_only_an_identity_encoded_successful_stream_is_filtered():
    def strips(sent: tuple[Call, Request], r: Response) -> bool:
        return strips_usage(*sent, r, header_values(r.headers, CONTENT_HEADERS))

    probed = _sent(probe=True)
    sse = (("content-type", "text/event-stream"),)
    assert strips(probed, resp(sse))
    assert not strips(probed, resp((*sse, ("content-encoding", "gzip"))))
    assert not strips(probed, resp(sse, 400))
    assert not strips(probed, resp((("content-type", "application/json"),)))
    assert not strips(_sent(probe=False), resp(sse))


@pytest.mark.parametrize(("version", "framing"), [("HTTP/1.1", "chunked"), ("HTTP/2.0", None), ("HTTP/1.0", "as sent")])
def test_an_answer_with_a_length_is_not_left_announcing_the_removed_chunk(version, framing):
    upstream, expected = chat_stream(["a", "b"])
    state, request = _sent(probe=True)
    request.http_version = version
    r = resp((("content-type", "text/event-stream"), ("content-length", str(len(upstream)))))
    feed = start_meter(state, request, r)
    sent = b"".join([*chunks(feed(upstream)), *chunks(feed(b""))])
    if framing == "as sent":  # an HTTP/1.0 client can be told neither a new length nor chunks: it gets it all
        assert sent == upstream and r.headers["content-length"] == str(len(upstream))
        return
    assert sent == expected and "content-length" not in r.headers
    assert r.headers.get("transfer-encoding") == framing  # HTTP/2 frames its end itself


def resp(headers: tuple[tuple[str, str], ...], status: int = 200) -> Response:
    return tutils.tresp(status_code=status, headers=Headers([(k.encode(), v.encode()) for k, v in headers]))


# -- the answer -------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(deltas=st.lists(st.text(max_size=40), max_size=6), eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       data=st.data())
def test_the_client_gets_the_upstream_stream_minus_the_usage_chunk_however_it_is_split(deltas, eol, data):
    upstream, expected = chat_stream(deltas, eol)
    cuts = data.draw(st.lists(st.integers(1, len(upstream) - 1), max_size=12))
    client, meter, f = run(upstream, cuts)
    assert client == expected and f.removed
    result = meter.result()  # the meter saw everything: the usage is read
    assert result.usage == Usage(input_tokens=120, cached_tokens=100, output_tokens=30, reasoning_tokens=7)
    assert meter.bytes == len(upstream)


def test_a_stream_without_the_usage_chunk_passes_unchanged_byte_by_byte():
    _, stream = chat_stream(["a", "b"])
    client, meter, f = run(stream, list(range(1, len(stream))))
    assert client == stream and not f.removed and meter.result().usage is None


def test_only_the_event_in_progress_is_held_and_a_long_one_is_not():
    first = chunk({"choices": [{"delta": {"content": "x"}}]})
    f = UsageChunkFilter(lambda _: None)
    assert f(first[:10]) == []  # part of an event: held until it ends
    assert f(first[10:]) == [first]
    long_event = b"data: " + b"y" * (MAX_HELD_BYTES + 10)
    assert f(long_event[:MAX_HELD_BYTES]) == []
    out = f(long_event[MAX_HELD_BYTES:])  # too long to be the usage chunk: sent on (but for a blank line's start)
    assert len(b"".join(out)) >= len(long_event) - 3
    rest = b"".join(f(b"\n\n" + chunk("[DONE]")) + f(b""))
    assert b"".join(out) + rest == long_event + b"\n\n" + chunk("[DONE]")
    # Once the usage chunk is gone, chunks pass as they are.
    g = UsageChunkFilter(lambda _: None)
    g(chunk({"choices": [], "usage": USAGE}))
    assert g(b"data: partial") == [b"data: partial"]


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.e2e
# An answer sent with a content-length: the length counted the chunk taken out, and the client waited for
# the rest (up to 600 s) — issue 25.
@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
def test_a_real_relay_meters_a_chat_stream_whose_client_did_not_ask_for_usage(sqlite_url, tmp_path, content_length):
    usage = (120, 100, 30, 7)
    with FakeUpstream("chat", behaviour=Behaviour(content_length=content_length)) as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("chat", up.base_url, "k", 1)])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes)}) as relay:
            body = {"model": "gpt-5-mini", "stream": True, "messages": [], "metadata": {"fake_usage": list(usage)}}
            conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
            got = conn.getresponse().read()
            conn.close()
    # The stream the client asked for, byte for byte; the upstream was asked for usage.
    assert got == b"".join(chat_events("gpt-5-mini", usage, Behaviour().deltas, include_usage=False))
    sent = json.loads(up.requests_to("/chat/completions")[0].body)
    assert sent == dict(body, stream_options={"include_usage": True})
    row = rows(sqlite_url, "SELECT input_tokens, cache_input_tokens, output_tokens, reasoning_tokens, status, flags "
                       "FROM codex_invocations")
    assert [tuple(r) for r in row] == [(120, 100, 30, 7, "success", None)]


def test_the_nodes_file_turns_the_probe_off_per_node():
    base = {"id": "n", "base_url": "http://h/v1"}
    assert node_from_mapping(base, "n").usage_probe is True
    assert node_from_mapping(dict(base, usage_probe=False), "n").usage_probe is False
    with pytest.raises(ConfigError, match="usage_probe"):
        node_from_mapping(dict(base, usage_probe="no"), "n")
