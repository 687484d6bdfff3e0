"""Routing: weighted choice, weight 0, failed nodes, stickiness, URL joining and key rewriting."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from addon.routing import Node, NodePool, StickyMap, join_url, set_upstream_key
from store.config import validate_base_url
from store.records import NodeConfig


def pool(weights: dict[str, int], seed: int = 7, **kw) -> NodePool:
    nodes = [Node(NodeConfig(id=k, base_url=f"http://{k}.test/v1", weight=w)) for k, w in weights.items()]
    return NodePool(nodes, rng=random.Random(seed), **kw)


def test_weight_distribution_within_tolerance():
    p = pool({"a": 1, "b": 3, "c": 6})
    draws = 30_000
    counts = Counter(p.choose().id for _ in range(draws))
    for node_id, weight in (("a", 1), ("b", 3), ("c", 6)):
        share = counts[node_id] / draws
        assert abs(share - weight / 10) < 0.015, (node_id, share)


def test_weight_zero_and_failed_nodes_never_chosen():
    p = pool({"zero": 0, "ok": 1, "down": 5})
    p.get("down").failed = True
    assert {p.choose().id for _ in range(2000)} == {"ok"}
    p.get("ok").failed = True
    assert p.choose() is None


def test_exclude_skips_nodes_already_tried():
    p = pool({"a": 1, "b": 1})
    assert {p.choose(exclude={"a"}).id for _ in range(200)} == {"b"}
    assert p.choose(exclude={"a", "b"}) is None


def test_sticky_session_keeps_its_node_while_healthy():
    p = pool({"a": 1, "b": 1, "c": 1})
    first = p.choose(session_key="conv-1").id
    assert all(p.choose(session_key="conv-1").id == first for _ in range(50))
    p.get(first).failed = True
    moved = p.choose(session_key="conv-1").id
    assert moved != first
    assert all(p.choose(session_key="conv-1").id == moved for _ in range(20))


def test_sticky_sessions_spread_by_weight():
    p = pool({"a": 1, "b": 3})
    counts = Counter(p.choose(session_key=f"s{i}").id for i in range(8000))
    assert abs(counts["b"] / 8000 - 0.75) < 0.03


def test_sticky_map_is_bounded_and_expires():
    now = [0.0]
    m = StickyMap(max_entries=3, ttl=10, clock=lambda: now[0])
    for i in range(5):
        m.put(f"k{i}", "n")
    assert len(m) == 3 and m.get("k0") is None and m.get("k4") == "n"
    now[0] = 11
    assert m.get("k4") is None


@pytest.mark.parametrize("base, path, want", [
    ("https://h/openai/v1", "/v1/responses", "https://h/openai/v1/responses"),
    ("https://h/openai/v1/", "/v1/responses?x=1", "https://h/openai/v1/responses?x=1"),
    ("https://api.anthropic.com/v1", "/v1/messages", "https://api.anthropic.com/v1/messages"),
    ("https://h/v1", "/responses", "https://h/v1/responses"),
    ("http://127.0.0.1:9000", "/v1/chat/completions", "http://127.0.0.1:9000/chat/completions"),
    ("https://h/v1", "/v1x/models", "https://h/v1/v1x/models"),
])
def test_join_url(base, path, want):
    assert join_url(base, path) == want


def test_key_rewrite_replaces_bearer_and_x_api_key():
    h = {"authorization": "Bearer client", "content-type": "x"}
    set_upstream_key(h, "sk-node")
    assert h == {"authorization": "Bearer sk-node", "content-type": "x"}
    h = {"x-api-key": "client"}
    set_upstream_key(h, "sk-node")
    assert h == {"x-api-key": "sk-node"}
    h = {}
    set_upstream_key(h, "sk-node")
    assert h == {"authorization": "Bearer sk-node"}


@pytest.mark.parametrize("url, ok", [
    ("https://relay.example/v1", True), ("http://127.0.0.1:8080", True),
    ("ftp://x/v1", False), ("https:///v1", False), ("relay.example/v1", False), ("http://h:99999/", False),
])
def test_validate_base_url(url, ok):
    assert (validate_base_url(url) is None) == ok
