"""The admin page of a fleet: relays on one database, in process (real Runtimes and Admins on SQLite and MariaDB).

Whichever relay answers, the page's figures are the fleet's (the database's), the relays panel lists every relay
by its heartbeat, and a page edit holds when another relay (re)starts with the nodes and keys files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from mitmproxy import http
from mitmproxy.test import taddons

from addon.admin import Admin
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store import relays
from store.records import InvocationRecord, Usage, utcnow
from store.schema import nodes
from tests.support.admin import ALPHA_KEY, BETA_KEY, ask
from tests.support.databases import at_head
from tests.support.waiting import wait_for

BOB_KEY = "ck-bob-0123456789abcdef"


def files(tmp_path: Path) -> SimpleNamespace:
    """A nodes file whose alpha leaves its name and weight to the page (beta sets them), and bob's key with a
    models limit."""
    nodes_file = tmp_path / "nodes.toml"
    nodes_file.write_text(f'[[nodes]]\nid = "alpha"\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "{ALPHA_KEY}"\n\n'
                          f'[[nodes]]\nid = "beta"\nname = "Beta"\nbase_url = "http://127.0.0.1:9/beta/v1"\n'
                          f'api_key = "{BETA_KEY}"\nweight = 1\n')
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[[keys]]\nname = "bob"\nkey = "{BOB_KEY}"\nmodels = ["gpt-5*"]\n')
    return SimpleNamespace(nodes=nodes_file, keys=keys_file)


def start(stack: contextlib.ExitStack, url: str, tmp_path: Path, port: int, f: SimpleNamespace,
          spool: str = "") -> SimpleNamespace:
    """A relay listening (as far as its name goes) on ``port``: its heartbeat row is host:port."""
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    admin = Admin(runtime)
    tctx = stack.enter_context(taddons.context(options, admin))
    tctx.configure(options, listen_port=port, codex_db=url, codex_spool=str(tmp_path / f"{port}{spool}.spool"),
                   codex_nodes=str(f.nodes), codex_client_keys=f"@{f.keys}", codex_ping_interval="0",
                   codex_writer_process=False, codex_node_sync="0", codex_key_sync="0")
    stack.callback(options.done)
    return SimpleNamespace(runtime=runtime, admin=admin, tctx=tctx)


def api(r: SimpleNamespace, method: str, path: str, body: object = None) -> tuple[int, dict]:
    resp = ask(r.admin, method, path, body)
    assert isinstance(resp, http.Response) and resp.headers["content-type"] == "application/json", resp
    return resp.status_code, json.loads(resp.get_text())


@pytest.fixture
def fleet(db_url, tmp_path):
    f = files(tmp_path)
    url = at_head(db_url)
    with contextlib.ExitStack() as stack:
        yield SimpleNamespace(a=start(stack, url, tmp_path, 18001, f), b=start(stack, url, tmp_path, 18002, f),
                              restart_b=lambda: start(stack, url, tmp_path, 18002, f, spool="-again"))


def record(i: int, key: str, model: str, status: str = "success") -> InvocationRecord:
    return InvocationRecord(invoke_id=f"call-{i}", occurred_at=utcnow(), source="relay", endpoint="/v1/responses",
                            status=status, node_id="alpha", model=model, client_key=key, ttfb_ms=100 + i,
                            http_status=200 if status == "success" else 502, node_failure=status != "success",
                            usage=Usage(input_tokens=100, output_tokens=10), cost=0.0125)


def test_every_relay_s_page_shows_the_fleet(fleet):
    a, b = fleet.a, fleet.b
    # Three calls through a, one (failed) through b; each relay's writer writes its own.
    for i, (key, model) in enumerate([("bob", "gpt-5"), ("bob", "gpt-5-mini"), ("dana", "gpt-5")]):
        a.runtime.submit(record(i, key, model))
    b.runtime.submit(record(3, "bob", "gpt-5", status="failed"))
    for r, n in ((a, 3), (b, 1)):
        wait_for(lambda r=r, n=n: r.runtime.db.writer_stats().written == n, what="the writer")
        r.runtime.heartbeat.beat()  # as its thread does every few seconds

    paths = ("/admin/api/relays", "/admin/api/overview", "/admin/api/recent?key=bob&model=gpt-5", "/admin/api/nodes",
             "/admin/api/keys")
    answers = {name: {path: api(r, "GET", path)[1] for path in paths} for name, r in (("a", a), ("b", b))}
    # Every panel but the relays' (which says who answered) is the same whichever relay answers.
    for path in paths[1:]:
        assert answers["a"][path] == answers["b"][path], path
    # The relays panel: both relays, each with its own writer, from either relay; each says who answered.
    for name, answer in answers.items():
        panel = answer["/admin/api/relays"]
        assert [(r["relay"].rsplit(":", 1)[1], r["state"], r["written"], r["writer"]) for r in panel["relays"]] \
            == [("18001", "running", 3, "ok"), ("18002", "running", 1, "ok")]
        assert panel["answered_by"].endswith({"a": ":18001", "b": ":18002"}[name])
    # The cards: the fleet's day.
    overview = answers["a"]["/admin/api/overview"]["overview"]
    assert (overview["requests"], overview["total_tokens"], overview["failures"]) == (4, 440, 1)
    assert overview["cost"] == pytest.approx(0.05) and overview["error_rate"] == 0.25
    assert overview["day"] == dt.datetime.now(dt.UTC).date().isoformat() and overview["ttfb_p95_ms"] > 0
    # Recent calls of one key and model, whoever relayed them.
    recent = answers["b"]["/admin/api/recent?key=bob&model=gpt-5"]["invocations"]
    assert [(c["invoke_id"], c["client_key"], c["model"]) for c in recent] == \
        [("call-3", "bob", "gpt-5"), ("call-0", "bob", "gpt-5")]

    # A clean shutdown says so; a relay whose beats stopped without one is gone after a few missed beats.
    b.runtime.heartbeat.stop()
    with a.runtime.engine.begin() as conn:
        conn.execute(sa.update(relays.relays).where(relays.relays.c.relay == answers["a"]["/admin/api/relays"]
                                                    ["answered_by"]).values(seen_at=utcnow() - dt.timedelta(minutes=1)))
    states = [(r["relay"].rsplit(":", 1)[1], r["state"]) for r in api(a, "GET", "/admin/api/relays")[1]["relays"]]
    assert sorted(states) == [("18001", "gone"), ("18002", "stopped")]


def test_a_page_edit_holds_when_another_relay_restarts(fleet):
    a = fleet.a
    assert api(a, "POST", "/admin/api/nodes", {"id": "alpha", "name": "Alpha", "weight": 5})[0] == 200
    assert api(a, "POST", "/admin/api/nodes/beta/disable", {})[0] == 200
    assert api(a, "PATCH", "/admin/api/keys/bob", {"rpm": 7})[0] == 200
    # What the files set stays theirs: the page is told where to change it.
    status, refused = api(a, "POST", "/admin/api/nodes", {"id": "beta", "weight": 3})
    assert status == 409 and "weight set by the nodes file" in refused["error"]
    status, refused = api(a, "PATCH", "/admin/api/keys/bob", {"models": ["o3"]})
    assert status == 409 and "models set by the codex_client_keys file" in refused["error"]

    restarted = fleet.restart_b()  # relay b starting again with the same files
    with restarted.runtime.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(nodes))}
    assert (rows["alpha"].weight, rows["alpha"].name, rows["beta"].weight, rows["beta"].disabled) == \
        (5, "Alpha", 1, True)
    alpha = restarted.runtime.pool.get("alpha")
    assert (alpha.config.weight, alpha.config.name) == (5, "Alpha")  # it routes as stored, not as the file's default
    assert restarted.runtime.pool.get("beta").disabled
    assert (restarted.runtime.keys.spec("bob").rpm, restarted.runtime.keys.spec("bob").models) == (7, ("gpt-5*",))
