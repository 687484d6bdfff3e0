"""Sessions stick for every coding client (addon.nodes.sessions), and a node's prompt cache shows it.

Plain functions, then the routing driven in process (no proxy): the relay's own session reading and
node choice, over three nodes that each cache prompts per conversation (tests.support.fakeupstream.PromptCache).
The same over a real relay is in tests/test_sessions_e2e.py.
"""

from __future__ import annotations

import json
import random

import pytest
from mitmproxy.test import taddons

from addon.guard.callbody import read_call_body
from addon.nodes.routing import Node, NodePool, StickyMap
from addon.nodes.sessions import SESSION_KEY_MAX, body_session, claude_session, session_key
from store.records import NodeConfig
from tests.support.fakeupstream import PromptCache
from tests.support.sessionsim import CLIENTS, sessions
from tests.support.wsenv import Env, completed, node

LIMIT = 1 << 20
SID = "0b7e2c1a-6f4d-4e59-9a51-4f3f2d6c9e10"


@pytest.mark.parametrize(("user_id", "expected"), [
    (f"user_{'ab' * 32}_account_4f1c0c4e-1e7a-4b8e-9c7d-2d1b3a4c5d6e_session_{SID}", SID),
    (f"user_{'ab' * 32}_account__session_{SID}", SID),  # no account (an API key login)
    (json.dumps({"device_id": "ab" * 32, "account_uuid": "", "session_id": SID}), SID),  # as JSON text
    (f"user_{'ab' * 32}_account_x_session_", None),  # an empty session part
    ("customer-42", None),  # another client's end-user id names a person, not a conversation
    ("{not json", None), ('{"session_id": 5}', None), ("[1]", None), ("", None), (None, None), (7, None),
])
def test_claude_codes_session_is_the_session_part_of_metadata_user_id(user_id, expected):
    assert claude_session(user_id) == expected


def test_the_body_names_its_session_by_prompt_cache_key_then_claude_codes_metadata():
    user_id = f"user_x_account_y_session_{SID}"
    assert body_session("pck", {"user_id": user_id}) == "pck"
    assert body_session(None, {"user_id": user_id}) == SID
    assert body_session("", {"user_id": user_id}) == SID
    assert body_session(None, "not an object") is None and body_session(None, None) is None
    body = json.dumps({"model": "claude-sonnet-4-5", "messages": [], "metadata": {"user_id": user_id}}).encode()
    assert read_call_body(body, None, limit=LIMIT).session_key == SID


@pytest.mark.parametrize(("headers", "body_key", "expected"), [
    ({"session_id": ["s"], "conversation_id": ["c"], "session-id": ["h"], "x-session-affinity": ["o"]}, "b", "s"),
    ({"session-id": ["h"], "x-session-affinity": ["o"]}, "b", "h"),  # Codex's before OpenCode's
    ({"x-session-affinity": ["o"]}, "b", "o"),  # OpenCode's header before any body key
    ({"x-session-affinity": [" "]}, "b", "b"),  # a blank header names no session
    ({"x-session-affinity": ["o", "p"]}, None, "o, p"),  # repeated: joined, as mitmproxy reads it
    ({}, "b", "b"),
    ({}, None, None),
])
def test_session_precedence(headers, body_key, expected):
    assert session_key(headers, body_key) == expected


def test_a_long_session_key_is_cut_to_the_column_size():
    assert session_key({"x-session-affinity": ["x" * 500]}, None) == "x" * SESSION_KEY_MAX
    assert session_key({}, "y" * 500) == "y" * SESSION_KEY_MAX


def test_every_turn_of_a_websocket_is_recorded_with_the_sockets_session():
    env = Env(node())
    with taddons.context(env.relay):
        flow = env.open()
        env.sockets._open[flow.id].state.session_key = SID  # what Relay.request read from the upgrade
        for base in (100.0, 200.0):
            env.client(flow, {"type": "response.create", "model": "gpt-5", "input": "hi"}, base)
            env.server(flow, completed("gpt-5", 100, 20, 30, 5), base + 1)
        assert [r.session_key for r in env.records()] == [SID, SID]


# -- the routing in process ----------------------------------------------------------------------------
def _relay_key(headers: dict[str, str], body: dict) -> str | None:
    """The session the relay reads from one call: its headers (by lower-case name) and its body."""
    info = read_call_body(json.dumps(body).encode(), None, limit=LIMIT)
    return session_key({k.lower(): [v] for k, v in headers.items()}, info.session_key)


def _run(ttl: float, clients: tuple[str, ...], turns: int = 24, seed: int = 3) -> tuple[float, dict[str, set[str]]]:
    """10 sessions over 3 equal nodes, their turns interleaved as concurrent sessions' are: the hit rate
    (cached ÷ input tokens over every call) and each session's nodes."""
    pool = NodePool([Node(NodeConfig(id=n, base_url=f"http://{n}.test/v1")) for n in "abc"],
                    rng=random.Random(seed), sticky=StickyMap.for_ttl(ttl))
    caches = {n: PromptCache() for n in "abc"}
    ss = sessions(clients, 10)
    used: dict[str, set[str]] = {s.sid: set() for s in ss}
    inp = cached = 0
    for turn in range(turns):
        for s in ss:
            headers, body = s.call(turn)
            node = pool.choose(session_key=_relay_key(headers, body))
            assert node is not None
            used[s.sid].add(node.id)
            i, c, _, _ = caches[node.id].usage(body)
            inp, cached = inp + i, cached + c
    return cached / inp, used


def test_every_clients_session_stays_on_one_node_and_its_cache_hits():
    rate, used = _run(3600, ("codex", "claude", "opencode"))
    assert all(len(nodes) == 1 for nodes in used.values()), used
    assert len(set().union(*used.values())) == 3  # the sessions spread over the nodes
    assert rate >= 0.90, rate
    without, moved = _run(0, ("codex", "claude", "opencode"))  # codex_sticky_ttl = 0
    assert all(len(nodes) > 1 for nodes in moved.values())
    assert without < rate - 0.10, (rate, without)
    print(f"\nprompt-cache hit rate, 10 sessions over 3 nodes: {rate:.1%} with affinity, {without:.1%} without")


def test_a_client_naming_no_session_spreads_whatever_the_ttl():
    rate, used = _run(3600, ("anonymous",))
    assert all(len(nodes) > 1 for nodes in used.values())
    assert rate == pytest.approx(_run(0, ("anonymous",))[0])  # the same draws: the same nodes
    assert set(CLIENTS) >= {"anonymous"}
