"""The real Codex CLI and Claude Code CLI against every refusal of docs/refusals.md: each run ends within
seconds and shows the relay's reason (for Codex's 429s: its own text, or the refusal's x-request-id).

The CLIs come from npm (the one download), installed once into ``.cli-cache/`` (git-ignored) and reused;
they talk only to the relay on 127.0.0.1, whose nodes are local fakes. Without npm or the packages the
tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.relayproc import ROOT
from tests.conftest import IN_CI
from tests.refusals import KEYS, ROWS, Row, refusing_relay

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("cli_refusals")]

PACKAGES = ("@openai/codex@0.171.0", "@anthropic-ai/claude-code@2.1.197")
CACHE = ROOT / ".cli-cache"
RUN_TIMEOUT_S = 60  # a run that hangs (a client sleeping on a retry-after) fails the test, not the suite
# What each CLI prints besides the relay's message, where its source has its own words for the answer.
CODEX_OWN = {"budget_exceeded": "You've hit your usage limit. Try again at",
             "concurrency_limited": "request id: codex-relay-concurrency_limited-",
             "no_node_available": "request id: codex-relay-no_node_available-"}


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true requires the real CLIs: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def clis() -> dict[str, Path]:
    """The two CLIs, installed from npm into the project's cache folder once (later runs reuse it)."""
    bins = {"codex": CACHE / "node_modules/.bin/codex", "claude": CACHE / "node_modules/.bin/claude"}
    if not all(b.exists() for b in bins.values()):
        if shutil.which("npm") is None:
            _unavailable("npm is not installed")
        done = subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", *PACKAGES],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not all(b.exists() for b in bins.values()):
            _unavailable(f"npm install {' '.join(PACKAGES)} failed: {done.stderr[-2000:]}")
    return bins


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[str]:
    with refusing_relay(tmp_path_factory.mktemp("cli")) as (r, _):
        yield r.url


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[str, float]:
    start = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the CLI
        pytest.fail(f"{argv[0]} still ran after {RUN_TIMEOUT_S} s: {e.stdout!r} {e.stderr!r}")
    return done.stdout + done.stderr, time.monotonic() - start


def _home(tmp_path: Path) -> dict[str, str]:
    """A clean environment in a temporary HOME: no user config, no proxy, nothing but the relay."""
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "NO_PROXY": "127.0.0.1", "LANG": "C.UTF-8"}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_codex_cli_stops_with_the_reason(clis, relay, row: Row, tmp_path):
    env = _home(tmp_path)
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        f'model = "{row.model}"\nmodel_provider = "relay"\n[model_providers.relay]\nname = "relay"\n'
        f'base_url = "{relay}/v1"\nenv_key = "RELAY_KEY"\nwire_api = "responses"\n')
    env |= {"CODEX_HOME": str(codex_home), "RELAY_KEY": KEYS[row.key]}
    out, took = _run([str(clis["codex"]), "exec", "--skip-git-repo-check", "say hi"], env, tmp_path)
    print(f"codex, {row.name}: {took:.1f} s")
    assert took < 15, out
    assert row.reason in out or CODEX_OWN.get(row.code, "\0") in out.replace("\u2019", "'"), out


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_claude_code_stops_with_the_reason(clis, relay, row: Row, tmp_path):
    env = _home(tmp_path) | {"ANTHROPIC_BASE_URL": relay, "ANTHROPIC_API_KEY": KEYS[row.key],
                             "ANTHROPIC_MODEL": row.claude_model(), "ANTHROPIC_SMALL_FAST_MODEL": row.claude_model(),
                             "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    out, took = _run([str(clis["claude"]), "-p", "say hi"], env, tmp_path)
    print(f"claude, {row.name}: {took:.1f} s")
    assert took < 15, out
    assert row.reason in out, out
