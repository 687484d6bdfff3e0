"""The real Codex CLI and Claude Code CLI against every refusal of docs/refusals.md: each run ends within
seconds and shows the relay's reason (for Codex's 429s: its own text, or the refusal's x-request-id).

The CLIs come from ``tests.support.clis`` (npm, installed once into ``.cli-cache/``); they talk only to the relay
on 127.0.0.1, whose nodes are local fakes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clis import CLAUDE_QUIET, clean_home, codex_home, installed_clis, run_cli
from tests.support.refusals import KEYS, ROWS, Row, refusing_relay

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("clis")]

# What each CLI prints besides the relay's message, where its source has its own words for the answer.
CODEX_OWN = {"budget_exceeded": "You've hit your usage limit. Try again at",
             "concurrency_limited": "request id: codex-relay-concurrency_limited-",
             "no_node_available": "request id: codex-relay-no_node_available-"}


@pytest.fixture(scope="session")
def clis() -> dict[str, Path]:
    return installed_clis()


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[str]:
    with refusing_relay(tmp_path_factory.mktemp("cli")) as (r, _):
        yield r.url


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_codex_cli_stops_with_the_reason(clis, relay, row: Row, tmp_path):
    home = codex_home(tmp_path, f'model = "{row.model}"\nmodel_provider = "relay"\n[model_providers.relay]\n'
                      f'name = "relay"\nbase_url = "{relay}/v1"\nenv_key = "RELAY_KEY"\nwire_api = "responses"\n')
    env = clean_home(tmp_path) | {"CODEX_HOME": str(home), "RELAY_KEY": KEYS[row.key]}
    out, took = run_cli([str(clis["codex"]), "exec", "--skip-git-repo-check", "say hi"], env, tmp_path)
    print(f"codex, {row.name}: {took:.1f} s")
    assert took < 15, out
    assert row.reason in out or CODEX_OWN.get(row.code, "\0") in out.replace("\u2019", "'"), out


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_claude_code_stops_with_the_reason(clis, relay, row: Row, tmp_path):
    env = clean_home(tmp_path) | CLAUDE_QUIET | {
        "ANTHROPIC_BASE_URL": relay, "ANTHROPIC_API_KEY": KEYS[row.key], "ANTHROPIC_MODEL": row.claude_model(),
        "ANTHROPIC_SMALL_FAST_MODEL": row.claude_model()}
    out, took = run_cli([str(clis["claude"]), "-p", "say hi"], env, tmp_path)
    print(f"claude, {row.name}: {took:.1f} s")
    assert took < 15, out
    assert row.reason in out, out
