"""Client auth: the client keys' option parsing, who gets in, and what a rejected client sees."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from addon.auth import ClientAuth
from addon.errors import CLIENT_KEY_NAME
from addon.guard.target import is_admin_path
from addon.serviceoptions import ClientKeyOptions
from addon.services.clientkeys import parse_client_keys
from addon.services.runtime import Runtime
from tests.support.flows import request_flow

ALICE = "ck-alice-0123456789abcdef"
BOB = "ck-bob-fedcba9876543210"
BARE = "ck-bare-00112233445566778899"


def bare_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def keyed_auth() -> tuple[ClientKeyOptions, ClientAuth]:
    """Client auth and the addon that configures its keys (``codex_client_keys``)."""
    runtime = Runtime()
    return ClientKeyOptions(runtime), ClientAuth(keys=runtime.keys)


@pytest.fixture
def auth():
    options, addon = keyed_auth()
    with taddons.context(options, addon) as tctx:
        tctx.configure(options, codex_client_keys=f"alice={ALICE}, bob = {BOB},{BARE}")
        yield addon


# -- option ------------------------------------------------------------------------------------------
def test_parse_names_bare_keys_and_keys_containing_equals():
    assert parse_client_keys(f"alice={ALICE},{BARE}, carol=abc==") == [
        ("alice", ALICE), (bare_name(BARE), BARE), ("carol", "abc==")]


def test_parse_file_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n\nalice = {ALICE}\n  # bob left\n{BARE}\n")
    assert parse_client_keys(f"@{path}") == [("alice", ALICE), (bare_name(BARE), BARE)]


@pytest.mark.parametrize(("spec", "message"), [
    (" , ,", "no keys given"),
    (f"alice={ALICE},alice={BOB}", "used twice"),
    (f"alice={ALICE},bob={ALICE}", "same key is listed twice"),
    ("alice=", "entry 1: empty key"),
    (f"={ALICE}", "empty name"),
    ("alice=two words", "whitespace"),
    (f"{'n' * 65}={ALICE}", "1 to 64"),
])
def test_parse_errors_say_what_and_where_without_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_client_keys(spec)
    assert ALICE not in str(e.value)


def test_configure_errors_are_option_errors(tmp_path):
    options, _ = keyed_auth()
    with taddons.context(options) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"codex_client_keys: cannot read .*missing"):
            tctx.configure(options, codex_client_keys=f"@{tmp_path / 'missing'}")
        empty = tmp_path / "empty"
        empty.write_text("# nothing yet\n")
        with pytest.raises(exceptions.OptionsError, match="codex_client_keys: no keys given"):
            tctx.configure(options, codex_client_keys=f"@{empty}")


# -- requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "name"), [
    ({"authorization": f"Bearer {ALICE}"}, "alice"),
    ({"authorization": f"bearer  {BOB} "}, "bob"),
    ({"x-api-key": BARE}, bare_name(BARE)),  # Anthropic clients
    ({"authorization": "Bearer wrong", "x-api-key": ALICE}, "alice"),
])
def test_known_key_passes_with_its_name(auth, headers, name):
    f = request_flow(headers=headers)
    auth.requestheaders(f)
    assert f.response is None
    assert f.metadata[CLIENT_KEY_NAME] == name


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "no API key provided"),
    ({"authorization": "Bearer ck-alice-0123456789abcdeX"}, "incorrect API key"),
    ({"authorization": ALICE}, "incorrect API key"),  # not a bearer token
    ({"x-api-key": ""}, "incorrect API key"),
])
def test_unknown_key_gets_openai_shaped_401(auth, headers, says):
    f = request_flow(headers=headers)
    auth.requestheaders(f)
    assert f.response is not None and f.response.status_code == 401
    assert f.response.headers["content-type"] == "application/json"
    err = json.loads(f.response.content)["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert says in err["message"]
    assert CLIENT_KEY_NAME not in f.metadata


def test_admin_paths_and_replays_are_not_checked(auth):
    admin = request_flow("/admin/api/nodes?x=1")
    admin.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")  # the relay's own port
    auth.requestheaders(admin)
    assert admin.response is None
    # As a forward proxy, /admin is some site's path, which the admin page does not answer.
    elsewhere = request_flow("/admin/api/nodes")
    elsewhere.client_conn.proxy_mode = ProxyMode.parse("regular")
    auth.requestheaders(elsewhere)
    assert elsewhere.response.status_code == 401
    # The relay's retries are replays whose Authorization already is a node's key.
    replay = request_flow(headers={"authorization": "Bearer node-key"})
    replay.is_replay = "request"
    auth.requestheaders(replay)
    assert replay.response is None


def test_path_tricks_do_not_count_as_admin():
    assert is_admin_path("/admin") and is_admin_path("/admin/") and is_admin_path("/admin/nodes/a?edit=1")
    for path in ("/admin/../v1/responses", "/admin/./x", "/admin/%2e%2e/v1/responses", "/administrator",
                 "/v1/admin", "/admin\\..\\v1"):
        assert not is_admin_path(path), path


def test_without_keys_everyone_passes():
    options, addon = keyed_auth()
    with taddons.context(options, addon) as tctx:
        tctx.configure(options, codex_client_keys=f"alice={ALICE}")
        tctx.configure(options, codex_client_keys="")
        f = request_flow()
        addon.requestheaders(f)
    assert f.response is None and CLIENT_KEY_NAME not in f.metadata


def test_answered_or_dead_flows_are_left_alone(auth):
    answered = request_flow()
    answered.response = tflow.tresp()
    auth.requestheaders(answered)
    assert answered.response.status_code == 200
    gone = request_flow()
    gone.live = False
    auth.requestheaders(gone)
    assert gone.response is None


# -- forward proxy ----------------------------------------------------------------------------------
def connect(headers: dict[str, str]) -> tflow.HTTPFlow:
    f = request_flow("", headers)
    f.request.method = "CONNECT"
    f.request.host, f.request.port = "127.0.0.1", 9
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    return f


def test_connect_needs_a_client_key_in_proxy_authorization(auth):
    for headers in ({}, {"proxy-authorization": "Basic " + base64.b64encode(b"u:wrong").decode()},
                    {"authorization": f"Bearer {ALICE}x"}):
        f = connect(headers)
        auth.http_connect(f)
        assert f.response.status_code == 407 and "proxy-authenticate" in f.response.headers
        assert json.loads(f.response.content)["error"]["code"] == "proxy_auth_required"
    basic = connect({"proxy-authorization": "Basic " + base64.b64encode(f"anyone:{ALICE}".encode()).decode()})
    auth.http_connect(basic)
    assert basic.response is None
    # Requests inside that tunnel are alice's, also without their own key.
    inner = request_flow(headers={})
    inner.client_conn = basic.client_conn
    auth.requestheaders(inner)
    assert inner.response is None and inner.metadata[CLIENT_KEY_NAME] == "alice"
    bearer = connect({"proxy-authorization": f"Bearer {BOB}"})
    auth.http_connect(bearer)
    assert bearer.response is None


def test_proxy_authorization_names_plain_http_requests(auth):
    f = request_flow(headers={"proxy-authorization": f"Bearer {BOB}"})
    auth.requestheaders(f)
    assert f.response is None and f.metadata[CLIENT_KEY_NAME] == "bob"
