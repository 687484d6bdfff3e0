"""Routing: weighted choice, weight 0, open breakers and their trials, stickiness, URL joining and key rewriting."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from addon.nodes.breaker import Breaker
from addon.nodes.routing import Node, NodePool, StickyMap
from store.config import validate_base_url
from store.records import NodeConfig

HEAVY = 1_000_000


def pool(weights: dict[str, int], seed: int = 7, **kw) -> NodePool:
    nodes = [Node(NodeConfig(id=k, base_url=f"http://{k}.test/v1", weight=w)) for k, w in weights.items()]
    return NodePool(nodes, rng=random.Random(seed), **kw)


def trip(p: NodePool, node_id: str, until: float) -> Node:
    """Open a node's breaker with its cooldown ending at ``until``."""
    node = p.get(node_id)
    node.breaker = Breaker(streak=3, openings=1, until=until)
    return node


def test_weight_distribution_within_tolerance():
    p = pool({"a": 1, "b": 3, "c": 6})
    draws = 30_000
    counts = Counter(p.choose().id for _ in range(draws))
    for node_id, weight in (("a", 1), ("b", 3), ("c", 6)):
        share = counts[node_id] / draws
        assert abs(share - weight / 10) < 0.015, (node_id, share)


def test_weight_zero_disabled_and_cooling_nodes_not_chosen():
    p = pool({"zero": 0, "ok": 1, "down": 5, "off": 5}, clock=lambda: 0.0)
    trip(p, "down", until=10)
    p.get("off").disabled = True
    assert {p.choose(holder=object()).id for _ in range(2000)} == {"ok"}
    assert p.get("down").breaker.trial is None


def test_disabled_and_weight_zero_nodes_are_never_chosen_even_as_trials():
    p = pool({"zero": 0, "off": 1}, clock=lambda: 100.0)
    p.get("off").disabled = True
    trip(p, "zero", until=0)
    trip(p, "off", until=0)
    assert p.choose(holder=object()) is None and p.choose() is None


def test_cooled_down_node_gets_exactly_one_trial():
    now = [0.0]
    p = pool({"ok": HEAVY, "down": 1}, clock=lambda: now[0])
    down = trip(p, "down", until=10)
    now[0] = 9.9
    assert {p.choose(holder=object()).id for _ in range(200)} == {"ok"}
    now[0] = 10
    first, second = object(), object()
    # The trial goes out at once, whatever the weights; the calls after it stay in rotation.
    assert p.choose(holder=first) is down and down.breaker.trial is first
    assert {p.choose(holder=second).id for _ in range(200)} == {"ok"}
    down.breaker.release(second)  # not its trial: nothing changes
    assert p.choose(holder=object()).id == "ok"
    down.breaker.release(first)  # the trial ended neither way: the next call is the trial
    assert p.choose(holder=second) is down


def test_calls_that_report_nothing_take_no_trial():
    p = pool({"ok": HEAVY, "down": 1}, clock=lambda: 50.0)
    down = trip(p, "down", until=10)
    assert {p.choose().id for _ in range(200)} == {"ok"} and down.breaker.trial is None


def test_every_node_open_and_none_due_a_call_gets_no_node_and_the_wait():
    """A refusal while every breaker is open is no attempt of a node: no early trial; the wait is the first due."""
    now = [0.0]
    p = pool({"a": 1, "b": 1, "off": 1, "zero": 0}, clock=lambda: now[0])
    p.get("off").disabled = True
    trip(p, "a", until=50)
    trip(p, "b", until=20)
    trip(p, "zero", until=1)  # weight 0 and disabled nodes are never due
    assert p.choose(holder=object()) is None and p.get("b").breaker.trial is None
    assert p.cooldown_left() == 20 and p.cooldown_left(exclude={"b"}) == 50
    assert p.choose().id == "b"  # a call that reports nothing still gets a node, without a trial
    now[0] = 20
    h1 = object()
    assert p.choose(holder=h1).id == "b" and p.get("b").breaker.trial is h1
    assert p.choose(holder=object()) is None and p.cooldown_left() == 0  # b's trial is out; a is due in 30 s
    p.get("a").disabled = p.get("b").disabled = True
    assert p.cooldown_left() is None  # no node may take calls at all


def test_exclude_skips_nodes_already_tried():
    p = pool({"a": 1, "b": 1})
    assert {p.choose(exclude={"a"}).id for _ in range(200)} == {"b"}
    assert p.choose(exclude={"a", "b"}) is None


def test_sticky_session_keeps_its_node_while_healthy():
    p = pool({"a": 1, "b": 1, "c": 1})
    first = p.choose(session_key="conv-1").id
    assert all(p.choose(session_key="conv-1").id == first for _ in range(50))
    trip(p, first, until=float("inf"))
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


@pytest.mark.parametrize("url, ok", [
    ("https://relay.example/v1", True), ("http://127.0.0.1:8080", True),
    ("ftp://x/v1", False), ("https:///v1", False), ("relay.example/v1", False), ("http://h:99999/", False),
    ("http://user:key@h/v1", False), ("https://h/v1?x=1", False), ("https://h/v1#frag", False),
])
def test_validate_base_url(url, ok):
    assert (validate_base_url(url) is None) == ok


def test_the_pool_keeps_the_sticky_map_it_is_given_even_an_empty_one():
    # An empty map is falsy: `sticky or StickyMap()` replaced every configured one (codex_sticky_ttl ignored).
    assert NodePool(sticky=StickyMap(ttl=5)).sticky.ttl == 5
    p = pool({"a": 1, "b": 1, "c": 1}, sticky=StickyMap.for_ttl(0))
    assert len({p.choose(session_key="conv-1").id for _ in range(60)}) == 3 and len(p.sticky) == 0
