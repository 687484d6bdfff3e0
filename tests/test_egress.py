"""Egress: destinations joined from parsed parts, the node's key only on a request bound for that node."""

from __future__ import annotations

import pytest

from addon.egress import EGRESS_KEY, attach, clear_as_is, egress_problem
from addon.nodes.nodeurl import EgressRefused, node_path, node_url, origin_of
from store.records import NodeConfig
from tests.support.flows import request_flow

KEY = "sk-node-0123456789abcdef"


def node(base_url: str) -> NodeConfig:
    return NodeConfig(id="n", base_url=base_url, api_key=KEY)


@pytest.mark.parametrize("base, path, want", [
    ("https://h/openai/v1", "/v1/responses", "https://h:443/openai/v1/responses"),
    ("https://h/openai/v1/", "/v1/responses?x=1", "https://h:443/openai/v1/responses?x=1"),
    ("https://api.anthropic.com/v1", "/v1/messages", "https://api.anthropic.com:443/v1/messages"),
    ("https://h/v1", "/responses", "https://h:443/v1/responses"),
    ("http://127.0.0.1:9000", "/v1/chat/completions", "http://127.0.0.1:9000/chat/completions"),
    ("https://h/v1", "/v1x/models", "https://h:443/v1/v1x/models"),
    ("http://[::1]:8000/v1", "/v1/models", "http://[::1]:8000/v1/models"),
])
def test_node_url(base, path, want):
    assert node_url(base, path) == want


@pytest.mark.parametrize("target", [
    "@127.0.0.1:9/v1/responses",  # the HTTP/2 :path that used to become userinfo@host
    "//evil.example/v1/responses", "*", "", "/v1/r\udcc3\udca9sponses", "/admin#/../v1/responses",
    "/v1/../admin", "/v1/%2e%2e/x", "/v1%2fresponses", "/v1\\responses",
])
def test_non_canonical_targets_are_refused_and_carry_no_key(target):
    f = request_flow(headers={"authorization": "Bearer client"})
    with pytest.raises(EgressRefused):
        attach(f, node("http://127.0.0.1:9000"), target)
    assert "authorization" not in f.request.headers and EGRESS_KEY not in f.metadata
    assert egress_problem(f) is not None


@pytest.mark.parametrize(("sent", "want"), [
    ({"authorization": "Bearer client", "content-type": "x"}, {"authorization": f"Bearer {KEY}", "content-type": "x"}),
    ({"x-api-key": "client"}, {"authorization": f"Bearer {KEY}"}),  # the node's header, not the client's
    ({}, {"authorization": f"Bearer {KEY}"}),
    ({"proxy-authorization": "Basic Y2xpZW50"}, {"authorization": f"Bearer {KEY}"}),
])
def test_key_replaces_the_clients_credentials(sent, want):
    f = request_flow(headers=sent)
    attach(f, node("https://relay.example/openai/v1"), "/v1/responses?stream=1")
    assert dict(f.request.headers) == want
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "relay.example", 443)
    assert f.request.path == "/openai/v1/responses?stream=1"
    assert egress_problem(f) is None


@pytest.mark.parametrize(("config", "sent", "want"), [
    # An Anthropic node (by its formats, or by Anthropic's host) takes its key in x-api-key, even from a
    # client that sent its client key as Bearer (ANTHROPIC_AUTH_TOKEN).
    ({"formats": ("anthropic",)}, {"authorization": "Bearer client"}, {"x-api-key": KEY}),
    ({"base_url": "https://api.anthropic.com/v1"}, {"authorization": "Bearer client"}, {"x-api-key": KEY}),
    ({"formats": ("openai", "messages")}, {"x-api-key": "client"}, {"authorization": f"Bearer {KEY}"}),
    # The node's option wins; a header of that name from the client is dropped too.
    ({"formats": ("anthropic",), "auth_header": "authorization"}, {"x-api-key": "c"},
     {"authorization": f"Bearer {KEY}"}),
    ({"auth_header": "api-key"}, {"authorization": "Bearer c", "api-key": "c"}, {"api-key": KEY}),
])
def test_the_key_goes_in_the_nodes_own_header(config, sent, want):
    f = request_flow(headers=sent)
    attach(f, NodeConfig(**{"id": "n", "base_url": "https://relay.example/v1", "api_key": KEY, **config}),
           "/v1/messages")
    assert dict(f.request.headers) == want


@pytest.mark.parametrize("base", ["https://relay.example/openai/v1", "http://127.0.0.1:9000/v1", "http://[::1]:8000/v1"])
@pytest.mark.parametrize("http2", [False, True])
def test_the_rewrite_is_what_mitmproxys_own_setters_make(base, http2):
    """attach rewrites the Host header and the HTTP/2 authority in one pass: as the setters would, one by one."""
    fields = [(b"Host", b"127.0.0.1:8000"), (b"content-type", b"x"), (b"HOST", b"dup"), (b"Authorization", b"Bearer c")]
    ours, theirs = request_flow(), request_flow()
    for f in (ours, theirs):
        f.request.headers.fields = tuple(fields)
        if http2:
            f.request.http_version, f.request.authority = "HTTP/2.0", "127.0.0.1:8000"
    attach(ours, node(base), "/v1/responses")
    origin, r = origin_of(base), theirs.request
    del r.headers["authorization"]
    r.scheme, r.host, r.port, r.path = origin.scheme, origin.host, origin.port, node_path(base, "/v1/responses")
    r.headers["authorization"] = f"Bearer {KEY}"
    assert ours.request.data == r.data
    assert dict(ours.request.headers)["Host"] == r.headers["Host"] != "127.0.0.1:8000"


def test_every_attempt_maps_the_clients_original_target():
    f = request_flow()
    attach(f, node("http://127.0.0.1:1/openai/v1"), "/v1/responses")
    attach(f, node("http://127.0.0.1:2/v1"), "/v1/responses")  # the failover to another node
    assert (f.request.port, f.request.path) == (2, "/v1/responses")


def test_a_destination_changed_after_clearing_or_never_cleared_is_a_problem():
    f = request_flow()
    assert egress_problem(f) == "no addon cleared the request for sending"
    attach(f, node("http://127.0.0.1:1/v1"), "/v1/responses")
    f.request.host = "evil.example"
    assert "changed" in egress_problem(f)
    clear_as_is(f)
    assert egress_problem(f) is None


def test_origin_fills_default_ports():
    assert origin_of("https://h/v1").as_tuple() == ("https", "h", 443)
    assert origin_of("http://H:8080").as_tuple() == ("http", "h", 8080)
    with pytest.raises(EgressRefused):
        origin_of("ftp://h/")
    assert node_path("https://h/openai/v1", "/v1") == "/openai/v1"
