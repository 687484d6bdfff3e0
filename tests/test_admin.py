"""The admin addon: access rules, endpoints, node management and the relay honouring them.

In process (a real Runtime and Admin under mitmproxy's test context) on SQLite and MariaDB, plus one
end-to-end run through mitmdump: admin requests never reach a node and are never metered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from http.client import HTTPConnection
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from mitmproxy import exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from addon.admin import Admin, is_loopback, session_cookie
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store import stats
from store.engine import make_engine, upgrade_to_head
from store.records import InvocationRecord, Usage
from store.schema import client_keys, codex_invocations, nodes, relays
from store.write.batch import apply_batch
from tests.support.admin import ALPHA_KEY, BETA_KEY, REVERSE, TOKEN, alpha_and_beta, ask
from tests.support.calls import call, write_nodes
from tests.support.databases import at_head
from tests.support.fakestats import FakeStats, crs_item, crs_response
from tests.support.fakeupstream import FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for


@pytest.fixture
def env(db_url, tmp_path):
    """A configured Runtime (nodes alpha and beta, never called) with its Admin, and calls of alpha stored."""
    nodes_file = alpha_and_beta(tmp_path)
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    admin = Admin(runtime)
    with taddons.context(options, admin) as tctx:
        # The writer in a thread: these tests are about the admin page; the writer process has its own
        # (test_writerproc) and runs in every real relay of the suite.
        tctx.configure(options, codex_db=at_head(db_url), codex_spool=str(tmp_path / "spool.db"),
                       codex_nodes=str(nodes_file), codex_ping_interval="0", codex_writer_process=False)
        with runtime.engine.begin() as conn:
            apply_batch(conn, [
                InvocationRecord(invoke_id=f"c{i}", occurred_at=dt.datetime(2026, 11, 20 + i, 12), source="relay",
                                 endpoint="/v1/responses", status="success" if i else "failed", node_id="alpha",
                                 model="gpt-5-codex", stream=True, http_status=200 if i else 500, node_failure=not i,
                                 usage=Usage(input_tokens=100 * (i + 1), output_tokens=10), ttfb_ms=100,
                                 stream_ms=50, response_bytes=1000)
                for i in range(3)])
        try:
            yield SimpleNamespace(runtime=runtime, admin=admin, tctx=tctx)
        finally:
            options.done()


def data(resp: http.Response) -> dict:
    assert resp.headers["content-type"] == "application/json", resp.text
    return json.loads(resp.get_text())


def node_row(runtime: Runtime, node_id: str) -> sa.Row:
    with runtime.engine.connect() as conn:
        return conn.execute(sa.select(nodes).where(nodes.c.id == node_id)).one()


# -- access ----------------------------------------------------------------------------------------
def test_without_token_only_loopback_clients(env):
    assert ask(env.admin, "GET", "/admin").status_code == 200
    for peer in (("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0), ("127.0.0.2", 1)):
        assert ask(env.admin, "GET", "/admin/api/nodes", peer=peer).status_code == 200, peer
    for peer in (("192.0.2.7", 5555), ("10.0.0.1", 1), ("2001:db8::1", 1, 0, 0)):
        resp = ask(env.admin, "GET", "/admin/api/nodes", peer=peer)
        assert resp.status_code == 403 and "codex_admin_token" in data(resp)["error"]
    assert not is_loopback(None) and not is_loopback(("not-an-ip", 1))


def test_token_bearer_cookie_and_login_form(env):
    env.tctx.configure(env.admin, codex_admin_token=TOKEN)
    remote = ("192.0.2.7", 5555)  # a token opens the page to other machines
    page = ask(env.admin, "GET", "/admin", peer=remote)
    assert page.status_code == 401 and b'action="/admin/login"' in page.content and b"codex-relay" in page.content
    api = ask(env.admin, "GET", "/admin/api/nodes", peer=remote)
    assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer"
    assert ask(env.admin, "GET", "/admin/api/nodes", headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = ask(env.admin, "GET", "/admin/api/nodes", headers={"authorization": f"Bearer {TOKEN}"}, peer=remote)
    assert ok.status_code == 200 and [n["node_id"] for n in data(ok)["nodes"]] == ["alpha", "beta"]
    # The login page needs its stylesheet before anyone is logged in.
    assert ask(env.admin, "GET", "/admin/static/admin.css", peer=remote).status_code == 200

    form = {"content-type": "application/x-www-form-urlencoded"}
    wrong = ask(env.admin, "POST", "/admin/login", b"token=nope", headers=form, peer=remote)
    assert wrong.status_code == 401 and b"Wrong token" in wrong.content and "set-cookie" not in wrong.headers
    login = ask(env.admin, "POST", "/admin/login", f"token={TOKEN}".encode(), headers=form, peer=remote)
    assert login.status_code == 303 and login.headers["location"] == "/admin"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    value = cookie.split(";")[0]
    assert ask(env.admin, "GET", "/admin", headers={"cookie": value}, peer=remote).status_code == 200
    stale = f"codex_admin={session_cookie('another-token-000000')}"
    assert ask(env.admin, "GET", "/admin/api/relays", headers={"cookie": stale}, peer=remote).status_code == 401
    logout = ask(env.admin, "POST", "/admin/logout", headers={"cookie": value}, peer=remote)
    assert logout.status_code == 303 and "Max-Age=0" in logout.headers["set-cookie"]


def test_token_is_validated(env):
    with pytest.raises(exceptions.OptionsError, match="at least 16 printable characters"):
        env.tctx.configure(env.admin, codex_admin_token="short")
    with pytest.raises(exceptions.OptionsError):
        env.tctx.configure(env.admin, codex_admin_token="has a space in the middle")


def test_changes_need_json_and_a_loopback_origin(env):
    body = {"id": "alpha", "models": ["gpt-5*"]}  # a field the nodes file leaves to the page
    text = ask(env.admin, "POST", "/admin/api/nodes", json.dumps(body).encode(), headers={"content-type": "text/plain"})
    assert text.status_code == 415  # what a cross-site form or no-cors fetch could send
    bad = ask(env.admin, "POST", "/admin/api/nodes", b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not JSON" in data(bad)["error"]
    evil = ask(env.admin, "POST", "/admin/api/nodes", body, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403
    assert node_row(env.runtime, "alpha").models is None
    ok = ask(env.admin, "POST", "/admin/api/nodes", body, headers={"origin": "http://127.0.0.1:8000"})
    assert ok.status_code == 200 and json.loads(node_row(env.runtime, "alpha").models) == ["gpt-5*"]
    # A key no header can carry (a lone surrogate from JSON) is a 400 naming the field, not a 500.
    surrogate = b'{"id": "alpha", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-\\ud800"}'
    refused = ask(env.admin, "POST", "/admin/api/nodes", surrogate, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "api_key must be printable ASCII" in data(refused)["error"]


def test_only_admin_paths_in_reverse_mode_are_answered(env):
    assert ask(env.admin, "GET", "/v1/models") is None
    assert ask(env.admin, "GET", "/administrator") is None
    assert ask(env.admin, "GET", "/admin", mode="regular") is None  # a forward proxy's /admin is the site's
    answered = tflow.tflow(resp=True)
    answered.client_conn.proxy_mode = ProxyMode.parse(REVERSE)
    answered.request.path = "/admin"
    asyncio.run(env.admin.request(answered))
    assert answered.response.status_code == 200 and b"codex-relay admin" not in answered.response.content


# -- reading -----------------------------------------------------------------------------------------
def test_nodes_endpoint_numbers_and_masked_keys(env):
    alpha, beta = data(ask(env.admin, "GET", "/admin/api/nodes"))["nodes"]
    assert (alpha["node_id"], alpha["status"], alpha["weight"], alpha["routed"], alpha["requests"],
            alpha["failures"], alpha["input_tokens"], alpha["lifetime_attempts"]) == \
        ("alpha", "active", 2, True, 3, 1, 600, 3)
    assert alpha["health_rate"] == pytest.approx(2 / 3) and alpha["api_key_hint"] == "sk-…cdef"
    # The same meanings as the CLI: the failure was the node's, so its fail_count has it too.
    assert (alpha["aborted"], alpha["refused"], alpha["lifetime_failed_attempts"]) == (0, 0, 1)
    assert (beta["requests"], beta["health_rate"], beta["api_key_hint"]) == (0, None, "sk-…3210")

    (one,) = data(ask(env.admin, "GET", "/admin/api/nodes?node=alpha&since=2026-11-21&until=2026-11-21"))["nodes"]
    assert (one["requests"], one["input_tokens"]) == (1, 200)
    assert ask(env.admin, "GET", "/admin/api/nodes?since=21.11.2026").status_code == 400
    assert ask(env.admin, "GET", "/admin/api/nodes?since=2026-11-22&until=2026-11-21").status_code == 400


def test_a_node_removed_from_the_file_shows_as_not_routed(env, tmp_path):
    alpha, beta = data(ask(env.admin, "GET", "/admin/api/nodes"))["nodes"]
    assert [(n["status"], n["state"], n["routed"]) for n in (alpha, beta)] == [("active", "active", True)] * 2
    smaller = write_nodes(tmp_path / "alpha-only.toml", [("alpha", "http://127.0.0.1:9/v1", ALPHA_KEY, 2)])
    env.tctx.configure(env.runtime, codex_nodes=str(smaller))
    assert env.runtime.pool.get("beta") is None  # its row and stats stay; it gets no calls
    alpha, beta = data(ask(env.admin, "GET", "/admin/api/nodes"))["nodes"]
    assert (alpha["state"], alpha["routed"]) == ("active", True)
    assert (beta["node_id"], beta["status"], beta["state"], beta["routed"]) == ("beta", "active", "not routed", False)
    # Disabled or not, it is not routed; saving it on the page routes it again.
    ask(env.admin, "POST", "/admin/api/nodes/beta/disable", {})
    (beta,) = data(ask(env.admin, "GET", "/admin/api/nodes?node=beta"))["nodes"]
    assert (beta["status"], beta["state"]) == ("disabled", "not routed")
    ask(env.admin, "POST", "/admin/api/nodes/beta/enable", {})
    saved = data(ask(env.admin, "POST", "/admin/api/nodes", {"id": "beta", "base_url": "http://127.0.0.1:9/beta/v1"}))
    assert (saved["node"]["state"], saved["node"]["routed"]) == ("active", True)


def test_no_response_ever_holds_a_full_key(env):
    ask(env.admin, "POST", "/admin/api/nodes/beta/disable", {})
    bodies = [ask(env.admin, "POST", "/admin/api/nodes", {"id": "gamma", "base_url": "http://127.0.0.1:9/v1",
                                                           "api_key": "sk-new-key-77778888"}).content]
    paths = ["/admin", "/admin/static/admin.js", "/admin/api/nodes", "/admin/api/days", "/admin/api/models",
             "/admin/api/sources", "/admin/api/recent", "/admin/api/relays", "/admin/api/overview",
             "/admin/api/reconcile"]
    bodies += [ask(env.admin, "GET", p).content for p in paths]
    bodies.append(ask(env.admin, "POST", "/admin/api/nodes/beta/enable", {}).content)
    bodies.append(ask(env.admin, "PATCH", "/admin/api/nodes/gamma", {"weight": 3}).content)
    for body in bodies:
        for key in (ALPHA_KEY, BETA_KEY, "sk-new-key-77778888"):
            assert key.encode() not in body


def test_days_recent_relays_and_reconcile_endpoints(env):
    days = data(ask(env.admin, "GET", "/admin/api/days?since=2026-11-21"))["days"]
    assert [(d["day"], d["source"], d["requests"], d["total_tokens"]) for d in days] == \
        [("2026-11-21", "relay", 1, 210), ("2026-11-22", "relay", 1, 310)]
    recent = data(ask(env.admin, "GET", "/admin/api/recent?limit=2"))["invocations"]
    assert [c["invoke_id"] for c in recent] == ["c2", "c1"]
    assert ask(env.admin, "GET", "/admin/api/recent?limit=0").status_code == 400
    (model,) = data(ask(env.admin, "GET", "/admin/api/models"))["models"]
    assert (model["model"], model["requests"]) == ("gpt-5-codex", 3)
    assert (model["cost"], model["unpriced"]) == (None, 3)  # no price: unknown, not 0
    env.runtime.heartbeat.beat()  # as its thread does every few seconds
    fleet = data(ask(env.admin, "GET", "/admin/api/relays"))
    (me,) = fleet["relays"]
    assert (me["relay"], me["state"], me["writer"], me["spooled"], me["lost"], me["stalls"]) == \
        (fleet["answered_by"], "running", "ok", 0, 0, 0)
    assert me["version"] and me["seen_s_ago"] < 60
    assert data(ask(env.admin, "GET", "/admin/api/reconcile")) == {"configured": False, "results": [], "polls": []}
    assert ask(env.admin, "GET", "/admin/api/nope").status_code == 404
    assert ask(env.admin, "DELETE", "/admin/api/nodes").status_code == 405
    assert ask(env.admin, "PUT", "/admin/api/nodes/alpha").status_code == 405


def test_reconcile_panel_compares_the_polled_sources(env, tmp_path):
    today = dt.datetime.now(dt.UTC).date()
    with env.runtime.engine.begin() as conn:  # today's one call through alpha, as the provider counts it
        apply_batch(conn, [InvocationRecord(
            invoke_id="today", occurred_at=dt.datetime.combine(today, dt.time()), source="relay",
            endpoint="/v1/responses", status="success", node_id="alpha", model="gpt-5-codex",
            usage=Usage(input_tokens=500, output_tokens=20))])
    with FakeStats() as provider:
        provider.queue(200, crs_response(crs_item("gpt-5-codex", 1, 500, 20)))
        sources = tmp_path / "sources.toml"
        sources.write_text(f'[[sources]]\nname = "crs"\nurl = "{provider.url}"\ninterval = 3600\nnodes = ["alpha"]\n'
                           'api_id = "3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d"\nmidnight_margin = 0\n'
                           'timezone = "+00:00"\n')
        env.tctx.configure(env.runtime, codex_stats_sources=str(sources))
        wait_for(lambda: env.runtime.providers.last_polls(), what="the first poll")
    got = data(ask(env.admin, "GET", f"/admin/api/reconcile?date={today}"))
    assert got["configured"] is True and got["polls"][0].startswith("crs: captured at ")
    (result,) = got["results"]
    assert (result["source"], result["stats_date"], result["ok"]) == ("crs", today.isoformat(), True)
    assert ask(env.admin, "GET", "/admin/api/reconcile?date=yesterday").status_code == 400


def test_slow_queries_leave_the_event_loop_free(env, monkeypatch):
    started, release = threading.Event(), threading.Event()
    freed: list[bool] = []
    real = stats.per_node

    def slow_per_node(conn, f):
        started.set()
        freed.append(release.wait(10))  # only the event loop sets it: True means the loop kept running
        return real(conn, f)

    monkeypatch.setattr(stats, "per_node", slow_per_node)

    async def scenario() -> http.Response:
        f = tflow.tflow()
        f.client_conn.peername = ("127.0.0.1", 1)
        f.client_conn.proxy_mode = ProxyMode.parse(REVERSE)
        f.request = http.Request.make("GET", "http://127.0.0.1:9/admin/api/nodes")
        task = asyncio.create_task(env.admin.request(f))
        assert await asyncio.to_thread(started.wait, 10)
        release.set()
        await task
        return f.response

    resp = asyncio.run(scenario())
    assert freed == [True] and resp.status_code == 200


# -- node management -------------------------------------------------------------------------------
GAMMA_KEY = "sk-gamma-0123456789"


@pytest.fixture
def gamma(env):
    """A node added on the page (weight 2, name Gamma) with two calls recorded."""
    resp = ask(env.admin, "POST", "/admin/api/nodes", {"id": "gamma", "name": "Gamma", "base_url": "http://127.0.0.1:9/g",
                                                       "api_key": GAMMA_KEY, "weight": 2})
    assert resp.status_code == 200
    with env.runtime.engine.begin() as conn:
        apply_batch(conn, [InvocationRecord(invoke_id=f"g{i}", occurred_at=dt.datetime(2026, 11, 21, 12),
                                            source="relay", endpoint="/v1/responses", status="success",
                                            node_id="gamma", usage=Usage(input_tokens=10, output_tokens=1))
                           for i in range(2)])
    return "gamma"


def test_edit_weight_keeps_key_and_stats(env, gamma):
    before = node_row(env.runtime, gamma)
    resp = ask(env.admin, "POST", "/admin/api/nodes",
               {"id": gamma, "name": "Gamma!", "base_url": "http://127.0.0.1:9/g", "weight": 7})
    assert resp.status_code == 200 and data(resp)["node"]["weight"] == 7
    after = node_row(env.runtime, gamma)
    assert (after.weight, after.name, after.api_key) == (7, "Gamma!", GAMMA_KEY)  # no key sent: key kept
    for col in ("requests", "fail_count", "total_input", "total_output", "total_bytes", "first_byte_ms", "created_at"):
        assert getattr(after, col) == getattr(before, col), col
    assert after.requests == 2
    live = env.runtime.pool.get(gamma).config
    assert (live.weight, live.api_key) == (7, GAMMA_KEY)

    ask(env.admin, "POST", "/admin/api/nodes", {"id": gamma, "base_url": "http://127.0.0.1:9/v2",
                                                "api_key": "sk-rotated-000011112222"})
    assert (node_row(env.runtime, gamma).api_key, env.runtime.pool.get(gamma).config.base_url) == \
        ("sk-rotated-000011112222", "http://127.0.0.1:9/v2")


def test_a_partial_save_changes_only_the_fields_it_gives(env, gamma):
    # What an operator saw: saving one field reset the weight 2 to 1 and lost the name.
    for body in ({"usage_probe": False}, {"models": ["gpt-5*"]}):
        assert ask(env.admin, "POST", "/admin/api/nodes", {"id": gamma, **body}).status_code == 200
    resp = ask(env.admin, "PATCH", f"/admin/api/nodes/{gamma}", {"model_map": {"a": "b"}})
    assert resp.status_code == 200
    row = node_row(env.runtime, gamma)
    assert (row.weight, row.name, row.base_url, row.api_key, row.usage_probe, row.models, row.model_map) == \
        (2, "Gamma", "http://127.0.0.1:9/g", GAMMA_KEY, False, '["gpt-5*"]', '{"a": "b"}')
    live = env.runtime.pool.get(gamma).config
    assert (live.weight, live.name, live.usage_probe, live.models) == (2, "Gamma", False, ("gpt-5*",))
    assert ask(env.admin, "PATCH", "/admin/api/nodes/nope", {"weight": 1}).status_code == 404  # PATCH: no new node


def test_the_files_fields_are_the_files(env):
    # alpha's file sets name, base_url, api_key and weight: the page may not change them, only the rest.
    (alpha,) = data(ask(env.admin, "GET", "/admin/api/nodes?node=alpha"))["nodes"]
    assert alpha["file_fields"] == ["name", "base_url", "api_key", "weight"]
    for body in ({"weight": 4}, {"name": "Alpha!"}, {"api_key": "sk-another-000011112222"}):
        resp = ask(env.admin, "POST", "/admin/api/nodes", {"id": "alpha", **body})
        assert resp.status_code == 409 and "set by the nodes file (codex_nodes)" in data(resp)["error"], body
    # The file's own values may be sent along (the page's form sends what it shows).
    resp = ask(env.admin, "POST", "/admin/api/nodes", {"id": "alpha", "weight": 2, "formats": ["openai"]})
    assert resp.status_code == 200 and data(resp)["node"]["formats"] == ["openai"]
    assert (node_row(env.runtime, "alpha").weight, node_row(env.runtime, "alpha").name) == (2, "alpha node")


def test_stored_key_never_follows_a_node_to_another_origin(env, gamma):
    moved = {"id": gamma, "base_url": "http://127.0.0.1:19/g"}  # another port, no key
    resp = ask(env.admin, "POST", "/admin/api/nodes", moved)
    assert resp.status_code == 400 and "api_key" in data(resp)["error"]
    assert node_row(env.runtime, gamma).base_url == "http://127.0.0.1:9/g"
    assert env.runtime.pool.get(gamma).config.base_url == "http://127.0.0.1:9/g"
    resp = ask(env.admin, "POST", "/admin/api/nodes", {**moved, "api_key": "sk-for-the-new-host-0001"})
    assert resp.status_code == 200 and node_row(env.runtime, gamma).api_key == "sk-for-the-new-host-0001"


def test_delete_a_node(env, gamma):
    with env.runtime.engine.begin() as conn:  # a key that may use only gamma holds it
        when = dt.datetime(2026, 1, 1)
        conn.execute(sa.insert(client_keys).values(name="k", key_sha256="0" * 64, source="admin", nodes='["gamma"]',
                                                   created_at=when, updated_at=when))
    resp = ask(env.admin, "DELETE", f"/admin/api/nodes/{gamma}")
    assert resp.status_code == 409 and "nodes limit of key(s) k" in data(resp)["error"]
    with env.runtime.engine.begin() as conn:
        conn.execute(sa.delete(client_keys))
    resp = ask(env.admin, "DELETE", f"/admin/api/nodes/{gamma}")
    assert resp.status_code == 200 and data(resp) == {"deleted": gamma}
    assert env.runtime.pool.get(gamma) is None
    # Its calls keep their stats, under its id, without a node row.
    (gone,) = data(ask(env.admin, "GET", f"/admin/api/nodes?node={gamma}"))["nodes"]
    assert (gone["requests"], gone["status"], gone["lifetime_attempts"]) == (2, None, 0)
    assert ask(env.admin, "DELETE", f"/admin/api/nodes/{gamma}").status_code == 404
    # A node the nodes file names would be back at the next start: the file first.
    resp = ask(env.admin, "DELETE", "/admin/api/nodes/alpha")
    assert resp.status_code == 409 and "remove it there first" in data(resp)["error"]
    assert env.runtime.pool.get("alpha") is not None


def test_unknown_host_names_are_refused(env):
    for host in ("evil.example:8000", "rebind.attacker.test"):
        resp = ask(env.admin, "GET", "/admin/api/nodes", host=host)
        assert resp.status_code == 403 and "codex_admin_hosts" in data(resp)["error"]
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "192.0.2.9"):
        assert ask(env.admin, "GET", "/admin/api/nodes", host=host).status_code == 200, host
    env.tctx.configure(env.admin, codex_admin_hosts="relay.example.com, other.test")
    assert ask(env.admin, "GET", "/admin/api/nodes", host="relay.example.com:8000").status_code == 200


def test_add_node_routes_it(env):
    resp = ask(env.admin, "POST", "/admin/api/nodes",
               {"id": "gamma", "name": "Gamma", "base_url": "https://g.example/v1", "api_key": "sk-g-1234567890",
                "weight": 3})
    assert resp.status_code == 200 and data(resp)["node"]["routed"] is True
    assert node_row(env.runtime, "gamma").weight == 3 and env.runtime.pool.get("gamma").eligible


@pytest.mark.parametrize(("body", "message"), [
    ({"id": "alpha", "base_url": "http://127.0.0.1:9/v1", "weight": -1}, "weight must be an integer >= 0"),
    ({"id": "alpha", "base_url": "ftp://x/v1", "weight": 1}, "base_url must start with http"),
    ({"id": "bad id", "base_url": "http://x/v1"}, "id must be"),
    ({"id": "alpha", "base_url": "http://x/v1", "requests": 0}, "unknown keys ['requests']"),
    (["not", "an", "object"], "send a JSON object"),
])
def test_bad_node_is_refused(env, body, message):
    resp = ask(env.admin, "POST", "/admin/api/nodes", body)
    assert resp.status_code == 400 and message in data(resp)["error"]
    assert node_row(env.runtime, "alpha").weight == 2


def test_database_error_is_a_503_without_the_statement(env, monkeypatch):
    def down(config):
        raise sa.exc.OperationalError("UPDATE nodes SET api_key=%s", {"api_key": config.api_key},
                                      Exception("(2006, 'MySQL server has gone away')"))

    monkeypatch.setattr(env.runtime.fleet, "update_node", down)
    resp = ask(env.admin, "POST", "/admin/api/nodes", {"id": "delta", "base_url": "http://127.0.0.1:9/v1",
                                                       "api_key": "sk-fresh-key-99990000"})
    assert resp.status_code == 503 and "gone away" in data(resp)["error"]
    assert b"sk-fresh-key-99990000" not in resp.content and b"UPDATE" not in resp.content


def test_disable_and_enable(env):
    resp = ask(env.admin, "POST", "/admin/api/nodes/alpha/disable", {})
    assert resp.status_code == 200 and data(resp)["node"]["status"] == "disabled"
    assert node_row(env.runtime, "alpha").disabled
    assert {env.runtime.pool.choose().id for _ in range(50)} == {"beta"}
    assert env.runtime.pool.choose(session_key="s1").id == "beta"

    # An edit leaves a disabled node disabled.
    assert ask(env.admin, "POST", "/admin/api/nodes", {"id": "alpha", "models": ["gpt-5*"]}).status_code == 200
    assert not env.runtime.pool.get("alpha").eligible and node_row(env.runtime, "alpha").disabled

    assert data(ask(env.admin, "POST", "/admin/api/nodes/alpha/enable", {}))["node"]["status"] == "active"
    assert not node_row(env.runtime, "alpha").disabled and env.runtime.pool.get("alpha").eligible
    assert node_row(env.runtime, "alpha").requests == 3
    assert ask(env.admin, "POST", "/admin/api/nodes/nope/disable", {}).status_code == 404


# -- end to end ------------------------------------------------------------------------------------
def get(port: int, path: str) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post(port: int, path: str, body: object) -> int:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.e2e
def test_admin_is_never_forwarded_nor_metered_and_disabled_survives_restart(db_url, tmp_path):
    with FakeUpstream("a") as a, FakeUpstream("b") as b:
        nodes_file = write_nodes(tmp_path / "nodes.toml",
                                 [("a", a.base_url, "key-a", 1), ("b", b.base_url, "key-b", 1)])
        options = {"codex_nodes": str(nodes_file), "codex_ping_interval": "0"}
        with RelayProcess(db_url=db_url, options=options) as relay:
            for path in ("/admin", "/admin/static/admin.js", "/admin/api/nodes", "/admin/api/recent", "/admin/nope",
                         "/metrics"):
                status, _ = get(relay.port, path)
                assert status in (200, 404), path
            assert post(relay.port, "/admin/api/nodes/a/disable", {}) == 200
            for _ in range(6):
                assert call(relay, "responses", stream=True, usage=(1, 0, 1, 0))[0] == 200
            # The relay's calls reach the Prometheus counters (issue 15.1).
            assert b'codex_node_requests_total{node="b"} 6.0' in get(relay.port, "/metrics")[1]
        assert a.seen == [] and len(b.seen) == 6  # no admin request went upstream; disabled a got no call
        # Its heartbeat row says it stopped cleanly (SIGTERM), so the relays panel shows it as stopped, not gone.
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                (stopped_at,) = conn.execute(sa.select(relays.c.stopped_at)).scalars()
        finally:
            engine.dispose()
        assert stopped_at is not None

        with RelayProcess(db_url=db_url, options=options) as relay:
            for _ in range(4):
                assert call(relay, "responses", stream=True, usage=(1, 0, 1, 0))[0] == 200
            assert a.seen == []  # still disabled after a restart with the same nodes file
            assert post(relay.port, "/admin/api/nodes/a/enable", {}) == 200
            status, body = get(relay.port, "/admin/api/nodes")
            assert status == 200 and [n["status"] for n in json.loads(body)["nodes"]] == ["active", "active"]

    engine = make_engine(db_url)
    upgrade_to_head(engine)
    try:
        with engine.connect() as conn:
            endpoints = set(conn.execute(sa.select(codex_invocations.c.endpoint)).scalars())
            assert endpoints == {"/v1/responses"}  # admin requests were not metered
            assert conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)).scalar() == 10
    finally:
        engine.dispose()


@pytest.mark.e2e
def test_node_added_on_the_page_routes_after_a_restart_and_the_page_keeps_what_the_file_leaves_out(db_url, tmp_path):
    with FakeUpstream("a") as a, FakeUpstream("c") as c:
        nodes_file = tmp_path / "nodes.toml"  # a's weight is not the file's: the page's
        nodes_file.write_text(f'[[nodes]]\nid = "a"\nbase_url = "{a.base_url}"\napi_key = "key-a"\n')
        options = {"codex_nodes": str(nodes_file), "codex_ping_interval": "0"}
        with RelayProcess(db_url=db_url, options=options) as relay:
            assert post(relay.port, "/admin/api/nodes", {"id": "c", "base_url": c.base_url, "api_key": "key-c",
                                                         "weight": 1}) == 200
            assert post(relay.port, "/admin/api/nodes", {"id": "a", "weight": 2}) == 200
            assert post(relay.port, "/admin/api/nodes", {"id": "a", "api_key": "key-x"}) == 409  # the file's
            assert post(relay.port, "/admin/api/nodes/a/disable", {}) == 200
            assert post(relay.port, "/admin/api/nodes/a/enable", {}) == 200
        with RelayProcess(db_url=db_url, options=options) as relay:
            for _ in range(20):
                assert call(relay, "responses", stream=True, usage=(1, 0, 1, 0))[0] == 200
    # c (added on the page) still routes; a keeps the page's weight 2 after the restart; both got calls.
    assert len(c.seen) > 0 and len(a.seen) > 0 and len(a.seen) + len(c.seen) == 20
    assert all(r.headers["authorization"] == "Bearer key-c" for r in c.seen)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.text("SELECT id, origin, weight, requests FROM nodes"))}
    finally:
        engine.dispose()
    assert {k: (r.origin, r.weight) for k, r in rows.items()} == {"a": ("file", 2), "c": ("admin", 1)}
    assert rows["a"].requests + rows["c"].requests == 20
