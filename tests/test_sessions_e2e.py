"""Sessions stick through a real relay, and the nodes' prompt caches show it (issue 28 item 4).

One relay over three fake nodes that each cache prompts per conversation (tests.support.fakeupstream.PromptCache).
Twenty conversations at once: ten of clients that name their session (Codex: ``session-id`` and
``prompt_cache_key``; Claude Code: ``metadata.user_id``; OpenCode: ``x-session-affinity``), ten of a
client that names none, which the relay routes as it routes every call with ``codex_sticky_ttl = 0``
(no session kept: tests/test_sessions.py checks that equivalence in process).
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from store.engine import make_engine
from store.stats import Filters, per_session
from tests.support.calls import write_nodes
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream, PromptCache
from tests.support.relayproc import RelayProcess
from tests.support.sessionsim import Session, sessions
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

TURNS = 24


def converse(port: int, session: Session) -> None:
    """One conversation, turn after turn on one connection, as a coding client holds it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for turn in range(TURNS):
            headers, body = session.call(turn)
            conn.request("POST", session.path, json.dumps(body),
                          {"content-type": "application/json", "authorization": "Bearer client-key", **headers})
            resp = conn.getresponse()
            assert resp.status == 200, (session, turn, resp.read()[:300])
            resp.read()
    finally:
        conn.close()


def test_each_clients_session_stays_on_one_node_and_its_prompt_cache_hits(sqlite_url, tmp_path):
    named = sessions(("codex", "claude", "opencode"), 10)
    anonymous = sessions(("anonymous",), 10)
    ups = [FakeUpstream(n, behaviour=Behaviour(prompt_cache=PromptCache()), record=False) for n in "abc"]
    for up in ups:
        up.start()
    try:
        nodes = write_nodes(tmp_path / "nodes.toml", [(u.name, u.base_url, f"key-{u.name}", 1) for u in ups])
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), "codex_ping_interval": "0"}) as relay:
            with ThreadPoolExecutor(len(named) + len(anonymous)) as pool:
                for done in [pool.submit(converse, relay.port, s) for s in named + anonymous]:
                    done.result()
            calls = TURNS * (len(named) + len(anonymous))
            wait_for(lambda: rows(sqlite_url, "SELECT count(*) AS n FROM codex_invocations")[0].n == calls,
                     what="every call recorded")
    finally:
        for up in ups:
            up.stop()

    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            stuck = {s.session_key: s for s in per_session(conn, Filters(), 100)}
    finally:
        engine.dispose()
    # Each named session is one row per key the relay read: Claude Code's is its session part alone.
    assert set(stuck) == {s.sid for s in named}
    assert all(s.requests == TURNS and s.nodes == 1 for s in stuck.values()), stuck
    assert len({s.node_id for s in stuck.values()}) > 1  # the sessions spread over the nodes
    with_affinity = sum(s.cached_tokens for s in stuck.values()) / sum(s.input_tokens for s in stuck.values())
    (spread,) = rows(sqlite_url, "SELECT sum(cache_input_tokens) AS c, sum(input_tokens) AS i, "
                                 "count(DISTINCT node_id) AS nodes FROM codex_invocations WHERE session_key IS NULL")
    without = spread.c / spread.i
    assert spread.nodes == 3
    assert with_affinity >= 0.90, with_affinity
    assert without < with_affinity - 0.10, (with_affinity, without)
    print(f"\nprompt-cache hit rate through the relay, 10 sessions over 3 nodes: {with_affinity:.1%} with "
          f"affinity, {without:.1%} without")
