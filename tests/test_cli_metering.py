"""The real clients through one relay, metered exactly and without reconnects (issue 28's "Done when"):

- the Codex CLI with its built-in OpenAI provider (``openai_base_url`` in ``config.toml``), which speaks
  Responses over WebSocket first, against a node that speaks it (``tests.support.wsupstream``): one row per
  ``response.create`` (its prewarm and its turn) with the node's usage, one upgrade, no "Reconnecting...";
- the Codex CLI with a custom provider (``[model_providers.…]``), which speaks HTTP SSE;
- Claude Code (``claude -p``) over HTTP.

Each client has its own client key and node; every call a node answered is one row with the usage that node
sent, and there is no other row. The CLIs come from ``tests.support.clis``; everything listens on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.clis import CLAUDE_QUIET, clean_home, codex_home, installed_clis, run_cli
from tests.support.fakeupstream import DEFAULT_USAGE, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for
from tests.support.wsupstream import WsUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("clis")]

KEYS = {"builtin": "ck-builtin-0123456789abcdef", "custom": "ck-custom-0123456789abcdef",
        "claude": "ck-claude-0123456789abcdef"}
MODEL, CLAUDE_MODEL = "gpt-5-codex", "claude-sonnet-4-5"
# What the WebSocket node answers Codex's creates with, in order (its prewarm, then its turn): unlike
# each other, so a row that took another's usage shows.
WS_USAGES = [(311, 256, 0, 0), (523, 300, 61, 17)]
# Text a CLI prints when it retries a call or leaves WebSockets for HTTP.
RETRIES = ("Reconnecting", "Falling back from WebSockets")


@dataclass
class Relay:
    url: str
    db_url: str
    ws: WsUpstream
    oa: FakeUpstream
    an: FakeUpstream

    def rows(self, key: str) -> list:
        eng = sa.create_engine(self.db_url)
        try:
            with eng.connect() as c:
                return list(c.execute(sa.text(
                    "SELECT status, node_id, model, input_tokens, cache_input_tokens, output_tokens, "
                    "reasoning_tokens, http_status, flags FROM codex_invocations WHERE client_key = :k ORDER BY id"),
                    {"k": key}).all())
        finally:
            eng.dispose()


@pytest.fixture(scope="session")
def clis() -> dict[str, Path]:
    return installed_clis()


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("metering")
    ws = WsUpstream(usages=list(WS_USAGES)).start()
    try:
        with FakeUpstream("oa") as oa, FakeUpstream("an") as an:
            nodes = tmp / "nodes.toml"
            nodes.write_text(
                f'[[nodes]]\nid = "ws"\nbase_url = "{ws.base_url}"\napi_key = "sk-node-ws-0123456789"\n'
                'formats = ["openai"]\n\n'
                f'[[nodes]]\nid = "oa"\nbase_url = "{oa.base_url}"\napi_key = "sk-node-oa-0123456789"\n'
                'formats = ["openai"]\nwebsocket = false\n\n'
                f'[[nodes]]\nid = "an"\nbase_url = "{an.base_url}"\napi_key = "sk-node-an-0123456789"\n'
                'formats = ["anthropic"]\n')
            keys = tmp / "keys.toml"
            keys.write_text(
                f'[[keys]]\nname = "builtin"\nkey = "{KEYS["builtin"]}"\nnodes = ["ws"]\n\n'
                f'[[keys]]\nname = "custom"\nkey = "{KEYS["custom"]}"\nnodes = ["oa"]\n\n'
                f'[[keys]]\nname = "claude"\nkey = "{KEYS["claude"]}"\nnodes = ["an"]\n')
            db_url = f"sqlite:///{tmp / 'codex.db'}"
            opts = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
            with RelayProcess(db_url=db_url, options=opts) as r:
                yield Relay(r.url, db_url, ws, oa, an)
            assert "Traceback" not in r.output(), r.output()
    finally:
        ws.stop()


def _metered(relay: Relay, key: str, served: int) -> list:
    """The key's rows once there is one for each of the ``served`` calls its node answered."""
    def rows() -> list | None:
        got = relay.rows(key)
        return got if len(got) >= served else None
    return wait_for(rows, 30, f"{served} rows of key {key}")


def test_codex_builtin_provider_over_websocket(clis, relay, tmp_path):
    home = codex_home(tmp_path, f'model = "{MODEL}"\nopenai_base_url = "{relay.url}/v1"\n')
    env = clean_home(tmp_path) | {"CODEX_HOME": str(home), "CODEX_API_KEY": KEYS["builtin"]}
    out, took = run_cli([str(clis["codex"]), "exec", "--skip-git-repo-check", "say hi"], env, tmp_path)
    print(f"codex, built-in provider: {took:.1f} s\n{out}")
    assert "hello" in out and not any(r in out for r in RETRIES), out
    ws = relay.ws
    # One socket, with the node's key; Codex's prewarm (generate: false) and its turn on it.
    # Two upgrades at the node: the relay's check that a node not seen taking one does (docs/how-it-works.md),
    # then the socket; both with the node's key. One socket for the client: no reconnect.
    assert len(ws.headers) == 2 and {h["authorization"] for h in ws.headers} == {"Bearer sk-node-ws-0123456789"}
    assert [c.get("generate", True) for c in ws.creates] == [False, True]
    assert ws.sent == WS_USAGES
    rows = _metered(relay, "builtin", len(ws.sent))
    assert [tuple(r[:8]) for r in rows] == [("success", "ws", MODEL, *u, 101) for u in ws.sent]
    assert all("websocket" in r.flags for r in rows)
    i, c, o, _r = WS_USAGES[-1]  # the CLI saw the node's usage for its turn (it counts input not cached + output)
    assert f"tokens used\n{i - c + o:,}" in out, out


def test_codex_custom_provider_over_http(clis, relay, tmp_path):
    home = codex_home(tmp_path, f'model = "{MODEL}"\nmodel_provider = "relay"\n[model_providers.relay]\n'
                      f'name = "relay"\nbase_url = "{relay.url}/v1"\nenv_key = "RELAY_KEY"\nwire_api = "responses"\n')
    env = clean_home(tmp_path) | {"CODEX_HOME": str(home), "RELAY_KEY": KEYS["custom"]}
    out, took = run_cli([str(clis["codex"]), "exec", "--skip-git-repo-check", "say hi"], env, tmp_path)
    print(f"codex, custom provider: {took:.1f} s\n{out}")
    assert not any(r in out for r in RETRIES), out
    seen = relay.oa.seen
    assert seen and all((r.method, r.path) == ("POST", "/v1/responses") for r in seen), seen
    assert all(r.headers["authorization"] == "Bearer sk-node-oa-0123456789" for r in seen)
    rows = _metered(relay, "custom", len(seen))
    assert [tuple(r[:8]) for r in rows] == [("success", "oa", MODEL, *DEFAULT_USAGE, 200)] * len(seen)


def test_claude_code_over_http(clis, relay, tmp_path):
    env = clean_home(tmp_path) | CLAUDE_QUIET | {
        "ANTHROPIC_BASE_URL": relay.url, "ANTHROPIC_API_KEY": KEYS["claude"], "ANTHROPIC_MODEL": CLAUDE_MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": CLAUDE_MODEL}
    out, took = run_cli([str(clis["claude"]), "-p", "say hi"], env, tmp_path)
    print(f"claude: {took:.1f} s\n{out}")
    seen = relay.an.seen
    assert seen and all((r.method, r.path.split("?")[0]) == ("POST", "/v1/messages") for r in seen), seen
    assert all(r.headers["x-api-key"] == "sk-node-an-0123456789" for r in seen)
    rows = _metered(relay, "claude", len(seen))
    i, c, o, _r = DEFAULT_USAGE  # Anthropic reports no reasoning tokens
    assert [tuple(r[:8]) for r in rows] == [("success", "an", CLAUDE_MODEL, i, c, o, 0, 200)] * len(seen)
