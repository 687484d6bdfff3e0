"""Teams end to end: two real relays on one MariaDB share a key's exact daily_requests budget."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.engine import make_engine
from store.records import utcnow
from store.sources import SourceConfig, crs
from store.sources.poll import Poller
from store.sources.reconcile import reconcile
from tests.support.ci import unavailable
from tests.support.fakeupstream import FakeUpstream
from tests.support.relayproc import ROOT, RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

KEY = "ck-alice-0123456789"


def call(relay: RelayProcess) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("POST", "/v1/responses", json.dumps({"model": "gpt-5", "input": "hi"}),
                     {"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def rows_of_alice(eng: sa.Engine) -> int:
    with eng.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM codex_invocations WHERE client_key = 'alice'")).scalar()


def test_two_relays_on_one_database_admit_exactly_the_daily_requests(mariadb, tmp_path):
    node = FakeUpstream("alpha").start()
    try:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "alpha"\nbase_url = "{node.base_url}"\napi_key = "node-key-1"\n')
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "alice"\nkey = "{KEY}"\nnodes = ["alpha"]\ndaily_requests = 5\n')
        options = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
        # Each relay its own spool: a spool belongs to one process.
        with (RelayProcess(db_url=mariadb, options=options | {"codex_spool": str(tmp_path / "spool-1.db")}) as one,
              RelayProcess(db_url=mariadb, options=options | {"codex_spool": str(tmp_path / "spool-2.db")}) as two):
            answers = [call((one, two)[i % 2]) for i in range(8)]
            eng = make_engine(mariadb)
            try:
                wait_for(lambda: rows_of_alice(eng) == 5, what="5 rows written")
                # A capture is stored to the second and counts the relay's calls before it: ask in a later second.
                with eng.connect() as conn:
                    last = conn.execute(sa.text("SELECT max(occurred_at) FROM codex_invocations")).scalar()
                wait_for(lambda: utcnow() >= last.replace(microsecond=0) + dt.timedelta(seconds=1),
                         what="the second after the last call")
                # A crs stats source of the other relay's usage endpoint: it reconciles with no difference.
                source = SourceConfig(name="two", url=f"{two.url}/apiStats/api/user-model-stats", nodes=("alpha",),
                                      midnight_margin=0, **crs.configure({"api_key": KEY}, "two"))
                assert Poller(eng, [source]).poll(source).ok
                with eng.connect() as conn:
                    rec = reconcile(conn, source, utcnow().date(), tolerance=0)
                assert rec.ok and {r.metric: r.provider for r in rec.rows if r.model is None}["requests"] == 5
            finally:
                eng.dispose()
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * 5 + [429] * 3
        assert {body["error"]["code"] for status, body in answers if status == 429} == {"budget_exceeded"}
        assert len(node.seen) == 5  # refused calls reach no node
        eng = sa.create_engine(mariadb)
        try:
            with eng.connect() as conn:
                assert conn.execute(sa.text("SELECT client_key, count(*) FROM codex_invocations "
                                            "GROUP BY client_key")).all() == [("alice", 5)]
                assert conn.execute(sa.text("SELECT admitted, requests, refused_budget FROM client_key_usage "
                                            "WHERE client_key = 'alice'")).one() == (5, 5, 3)
        finally:
            eng.dispose()
    finally:
        node.stop()


def test_a_real_relay_shows_the_keys_limits_to_the_openai_sdk_and_at_v1_key(tmp_path):
    import openai

    with FakeUpstream("alpha") as node:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "alpha"\nbase_url = "{node.base_url}"\napi_key = "node-key-1"\n')
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "alice"\nkey = "{KEY}"\ndaily_requests = 2\nrpm = 10\n')
        options = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
        with RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", options=options) as relay:
            client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=KEY, max_retries=0, timeout=30)
            streamed = client.responses.with_raw_response.create(model="gpt-5", input="hi", stream=True)
            list(streamed.parse())  # the stream to its end
            whole = client.responses.with_raw_response.create(model="gpt-5", input="hi")
            assert whole.parse().model == "gpt-5"
            with pytest.raises(openai.RateLimitError) as refused:
                client.responses.create(model="gpt-5", input="hi")
            assert refused.value.code == "budget_exceeded"
            # GET /v1/key with the same key, from OpenAI's base URL, as a status line asks; the day's use once the
            # writer has stored the two calls (the refused one is no invocation).
            info = wait_for(lambda: (got := client.get("/key", cast_to=object))["usage"]["requests"] == 2 and got,
                            what="the two calls in GET /v1/key")
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{relay.url}/v1", api_key="ck-wrong", max_retries=0).get("/key", cast_to=object)
            line = status_line(relay, tmp_path)
    heads = [{k: r.headers[f"x-ratelimit-{k}-requests"] for k in ("limit", "remaining", "reset")}
             for r in (streamed, whole, refused.value.response)]
    # 2 daily requests bind before 10 per minute: 1 left, then none (reset: the next UTC midnight).
    assert [(h["limit"], h["remaining"]) for h in heads] == [("2", "1"), ("2", "0"), ("2", "0")]
    assert all(re.fullmatch(r"(\d+h)?(\d+m)?\d+s", h["reset"]) for h in heads)
    assert info["name"] == "alice"
    assert {name: (lim["limit"], lim["used"], lim["remaining"]) for name, lim in info["limits"].items()} == {
        "daily_requests": (2, 2, 0), "rpm": (10, 2, 8)}
    assert info["limits"]["daily_requests"]["resets_at"] == (
        dt.datetime.combine(utcnow().date() + dt.timedelta(days=1), dt.time()).isoformat() + "Z")
    assert len(node.seen) == 2 and not any(r.path.endswith("/key") for r in node.seen)  # never sent to a node
    # The status line of docs/teams.md, as Claude Code runs it (its session JSON on stdin).
    wait = r"\((\d+h)?(\d+m)?\d+s\)"
    assert re.fullmatch(rf"alice · daily_requests 2/2 {wait} · rpm \d+/10 {wait} · today \$0", line), line


def status_line(relay: RelayProcess, tmp_path: Path) -> str:
    """The output of docs/teams.md's status-line script for ``KEY`` on ``relay``."""
    if not (shutil.which("curl") and shutil.which("jq")):
        unavailable("curl and jq", "the status-line script needs curl and jq")
    doc = (ROOT / "docs" / "teams.md").read_text()
    script = tmp_path / "relay-status"
    script.write_text(re.search(r"```sh\n(#!/bin/sh\n.*?)```", doc, re.S).group(1))
    script.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "ANTHROPIC_BASE_URL": relay.url, "ANTHROPIC_API_KEY": KEY}
    done = subprocess.run([str(script)], input='{"model": {"display_name": "Opus"}}', env=env, capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout.strip()
