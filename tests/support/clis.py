"""The real Codex CLI and Claude Code, for the tests that drive them against a relay on 127.0.0.1.

They come from npm (the one download), installed once into ``.cli-cache/`` (git-ignored) at pinned versions
and reused by every later run; without npm or the packages the tests skip locally and fail under CI=true.
Each run is bounded by ``RUN_TIMEOUT_S`` and has a clean temporary HOME: no user config, no proxy.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.ci import unavailable
from tests.support.relayproc import ROOT

PACKAGES = ("@openai/codex@0.171.0", "@anthropic-ai/claude-code@2.1.197")
CACHE = ROOT / ".cli-cache"
RUN_TIMEOUT_S = 60  # a run that hangs (a client sleeping on a retry-after) fails the test, not the suite
# Environment Claude Code needs to talk to nothing but its base URL.
CLAUDE_QUIET = {"DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


@functools.cache
def _install() -> dict[str, Path] | str:
    bins = {"codex": CACHE / "node_modules/.bin/codex", "claude": CACHE / "node_modules/.bin/claude"}
    if shutil.which("npm") is None and not all(b.exists() for b in bins.values()):
        return "npm is not installed"
    CACHE.mkdir(exist_ok=True)
    # One install at a time: test workers start together on a fresh clone, and a CLI run while another
    # worker's npm rewrites its binary fails with ETXTBSY. The check is made again under the lock.
    with (CACHE / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(b.exists() for b in bins.values()):
            done = subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", *PACKAGES],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0 or not all(b.exists() for b in bins.values()):
                return f"npm install {' '.join(PACKAGES)} failed: {done.stderr[-2000:]}"
    return bins


def installed_clis() -> dict[str, Path]:
    """The two CLIs' executables, installed from npm into the project's cache folder once (a test module's
    ``clis`` fixture calls this; the run skips, or fails under CI, without them)."""
    bins = _install()
    if isinstance(bins, str):
        unavailable("the real CLIs", bins)
    return bins


def run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[str, float]:
    """Run a CLI to its end (stdout + stderr, seconds taken); one that outlives ``RUN_TIMEOUT_S`` fails the test."""
    start = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the CLI
        pytest.fail(f"{argv[0]} still ran after {RUN_TIMEOUT_S} s: {e.stdout!r} {e.stderr!r}")
    return done.stdout + done.stderr, time.monotonic() - start


def clean_home(tmp_path: Path) -> dict[str, str]:
    """A clean environment in a temporary HOME: no user config, no proxy, nothing but the relay."""
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "NO_PROXY": "127.0.0.1", "LANG": "C.UTF-8"}


def codex_home(tmp_path: Path, config: str) -> Path:
    """A ``CODEX_HOME`` whose ``config.toml`` is ``config``."""
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(config)
    return home
