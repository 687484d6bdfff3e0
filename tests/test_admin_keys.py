"""Client keys managed through the admin API, in process (a real Runtime and Admin on SQLite and MariaDB): what
each call answers, that the relay applies it at once, that another relay on the database reloads it, and that
the file's keys follow the file's rule across a restart."""

from __future__ import annotations

import contextlib
import json
import logging
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon.admin import Admin
from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from tests.support.admin import TOKEN, alpha_and_beta, ask
from tests.support.databases import at_head

BOB_KEY = "ck-bob-0123456789abcdef"


def relay(tctx_stack, db_url: str, tmp_path, name: str, keys_file) -> SimpleNamespace:
    """A configured Runtime with its Admin (nodes alpha and beta, bob's key from the file), keys checked only when
    asked (``codex_key_sync`` 0: the test says when another relay looks)."""
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    admin = Admin(runtime)
    tctx = tctx_stack.enter_context(taddons.context(options, admin))
    tctx.configure(options, codex_db=db_url, codex_spool=str(tmp_path / f"{name}.spool"),
                   codex_nodes=str(alpha_and_beta(tmp_path)), codex_ping_interval="0", codex_writer_process=False,
                   codex_client_keys=f"@{keys_file}", codex_key_sync="0")
    tctx.configure(admin, codex_admin_token=TOKEN)
    tctx_stack.callback(options.done)
    return SimpleNamespace(runtime=runtime, admin=admin, tctx=tctx, options=options)


@pytest.fixture
def relays(db_url, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[[keys]]\nname = "bob"\nkey = "{BOB_KEY}"\nmodels = ["gpt-5*"]\n')
    url = at_head(db_url)
    with contextlib.ExitStack() as stack:
        a, b = (relay(stack, url, tmp_path, name, keys_file) for name in "ab")
        yield SimpleNamespace(a=a, b=b, keys_file=keys_file)


def api(r: SimpleNamespace, method: str, path: str, body: object = None) -> tuple[int, dict]:
    resp = ask(r.admin, method, path, body, headers={"authorization": f"Bearer {TOKEN}"})
    assert isinstance(resp, http.Response) and resp.headers["content-type"] == "application/json", resp
    return resp.status_code, json.loads(resp.get_text())


def test_add_change_rotate_revoke_apply_here_at_once_and_there_on_reload(relays, caplog):
    a, b = relays.a, relays.b
    caplog.set_level(logging.INFO)
    status, made = api(a, "POST", "/admin/api/keys", {"name": "dana", "models": ["gpt-5*"], "daily_requests": 500})
    assert status == 201
    secret = made["secret"]
    assert made["key"]["name"] == "dana" and made["key"]["daily_requests"] == 500 and made["key"]["source"] == "admin"
    assert a.runtime.keys.find([secret]) == "dana"  # the relay that answered: at once
    assert b.runtime.keys.find([secret]) is None
    assert b.runtime.keys.reload() and b.runtime.keys.find([secret]) == "dana"  # the other: at its next check

    status, changed = api(a, "PATCH", "/admin/api/keys/dana", {"rpm": 30, "daily_requests": None})
    assert status == 200 and "secret" not in changed
    assert (changed["key"]["rpm"], changed["key"]["daily_requests"], changed["key"]["models"]) == (30, None, ["gpt-5*"])
    b.runtime.keys.reload()
    assert (b.runtime.keys.spec("dana").rpm, b.runtime.keys.spec("dana").daily_requests) == (30, None)

    status, rotated = api(a, "POST", "/admin/api/keys/dana/rotate", {})
    assert status == 200 and rotated["secret"] != secret
    b.runtime.keys.reload()
    for r in (a, b):
        assert r.runtime.keys.find([secret]) is None and r.runtime.keys.find([rotated["secret"]]) == "dana"

    status, revoked = api(a, "POST", "/admin/api/keys/dana/revoke", {})
    assert status == 200 and revoked["key"]["revoked"] is True
    b.runtime.keys.reload()
    for r in (a, b):
        assert r.runtime.keys.find([rotated["secret"]]) is None
        assert r.runtime.keys.enabled
    # Only the answers carried the secrets: never the log, never a read.
    status, listed = api(b, "GET", "/admin/api/keys")
    assert status == 200 and [(k["name"], k["revoked"]) for k in listed["stored"]] == [("bob", False), ("dana", True)]
    for s in (secret, rotated["secret"]):
        assert s not in caplog.text and s not in json.dumps(listed)


def test_one_key_and_the_refusals(relays):
    a = relays.a
    status, one = api(a, "GET", "/admin/api/keys/bob")
    assert status == 200 and one["key"]["models"] == ["gpt-5*"] and one["key"]["source"] == "file"
    assert api(a, "GET", "/admin/api/keys/nobody")[0] == 404
    assert api(a, "POST", "/admin/api/keys", {"name": "bob"}) == (409, {"error": "a key named 'bob' exists"})
    assert api(a, "POST", "/admin/api/keys", {"name": "erin", "rpm": -1})[0] == 400
    assert api(a, "POST", "/admin/api/keys", {"name": "erin", "nodes": ["nowhere"]})[1]["error"].startswith(
        "unknown node id(s) nowhere")
    assert api(a, "POST", "/admin/api/keys", {"name": "erin", "key": "mine"})[1]["error"].startswith(
        "unknown field(s) key")
    assert api(a, "PATCH", "/admin/api/keys/bob", {"name": "robert"})[0] == 400  # a key keeps its name
    assert api(a, "PATCH", "/admin/api/keys/nobody", {"rpm": 1})[0] == 404
    assert api(a, "POST", "/admin/api/keys/bob/rotate", {})[0] == 409  # the file's secret: change it there
    assert api(a, "PATCH", "/admin/api/keys", {})[0] == 405
    resp = ask(a.admin, "POST", "/admin/api/keys", {"name": "erin"})  # no token
    assert resp is not None and resp.status_code == 401
    assert a.runtime.keys.spec("erin") is None


def test_a_restart_keeps_a_revocation_and_the_page_s_limits_the_file_does_not_set(relays):
    a = relays.a
    status, refused = api(a, "PATCH", "/admin/api/keys/bob", {"rpm": 7, "models": ["o3"]})
    assert status == 409 and "models set by the codex_client_keys file" in refused["error"]  # the file's limit
    assert api(a, "GET", "/admin/api/keys/bob")[1]["key"]["rpm"] is None  # nothing of a refused change
    status, changed = api(a, "PATCH", "/admin/api/keys/bob", {"rpm": 7, "models": ["gpt-5*"]})  # the file's value: fine
    assert status == 200 and changed["key"]["file_fields"] == ["models"]
    assert api(a, "POST", "/admin/api/keys/bob/revoke", {})[0] == 200
    assert a.runtime.keys.find([BOB_KEY]) is None
    a.tctx.configure(a.options, codex_client_keys=f"@{relays.keys_file} ")  # a restart reads the file again
    status, one = api(a, "GET", "/admin/api/keys/bob")
    assert (one["key"]["rpm"], one["key"]["models"], one["key"]["revoked"]) == (7, ["gpt-5*"], True)
    assert a.runtime.keys.find([BOB_KEY]) is None


def test_budgets_expiry_and_warning_through_the_api_apply_on_the_other_relay(relays):
    a, b = relays.a, relays.b
    budgets = [{"window": "5h", "requests": 200}, {"window": "weekly", "cost": 20, "models": ["claude-opus-*"]}]
    status, made = api(a, "POST", "/admin/api/keys", {"name": "erin", "budgets": budgets,
                                                      "expires_at": "2027-01-31T00:00:00Z", "warn_at": 0.8})
    assert status == 201
    assert (made["key"]["budgets"], made["key"]["expires_at"], made["key"]["warn_at"]) == (
        [{"window": "5h", "requests": 200}, {"window": "weekly", "cost": 20.0, "models": ["claude-opus-*"]}],
        "2027-01-31T00:00:00Z", 0.8)
    b.runtime.keys.reload()
    erin = b.runtime.keys.spec("erin")
    assert [x.name for x in erin.budgets] == ["5h_requests", "weekly_cost[claude-opus-*]"]
    assert api(b, "GET", "/admin/api/keys/erin")[1]["key"]["budgets"] == made["key"]["budgets"]
    status, changed = api(a, "PATCH", "/admin/api/keys/erin", {"budgets": [], "expires_at": None})
    assert status == 200 and (changed["key"]["budgets"], changed["key"]["expires_at"]) == ([], None)
    assert changed["key"]["warn_at"] == 0.8  # not given: kept
    status, error = api(a, "PATCH", "/admin/api/keys/erin", {"budgets": [{"window": "hourly", "requests": 1}]})
    assert status == 400 and "window must be one of 5h, daily, weekly, monthly, total" in error["error"]
