"""A non-editable install works on its own: what the code reads at run time ships with it.

The project is installed with pip into a temporary target (no editable link to this repository) and
used from a directory outside the repository with only that target on PYTHONPATH (the dependencies
still come from this virtualenv): the ``codex-stats`` entry point, the schema upgrade (Alembic's
environment and revisions), and the relay itself (the price table, the admin page's static files).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.engine import current_revision, head_revision, make_engine
from tests.support.relayproc import ROOT, RelayProcess

# builds the project and starts a real mitmdump; one xdist worker takes the module, so it builds once
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("packaging")]

# Not sources: a copy without them builds what a fresh checkout builds.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "data", "build", "*.egg-info", "__pycache__", ".*_cache",
                                      ".hypothesis", "results")


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(target the project is installed into, environment that uses it, a working directory outside the repo)."""
    base = tmp_path_factory.mktemp("install")
    # Built from a copy: an in-tree build leaves build/ behind, and a stale build/ could hide a missing file.
    src = shutil.copytree(ROOT, base / "src", ignore=_NOT_SOURCES)
    target = base / "target"
    # With the dev extra's setuptools pip builds offline; a virtualenv made before it had one fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-compile", "--no-deps", *isolation, "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(src)
    work = base / "work"
    work.mkdir()
    return target, dict(os.environ, PYTHONPATH=str(target)), work


def run(install, *cmd: str) -> subprocess.CompletedProcess[str]:
    target, env, work = install
    return subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=60)


def test_codex_stats_entry_point(install):
    target, _, _ = install
    done = run(install, str(target / "bin" / "codex-stats"), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: stats ") and "--since DAY" in done.stdout


def test_schema_upgrade_uses_the_installed_migrations(install):
    target, _, work = install
    url = f"sqlite:///{work / 'upgrade.db'}"
    done = run(install, sys.executable, "-c",
               "import sys, migrations, store.engine as e\n"
               "e.upgrade_to_head(e.make_engine(sys.argv[1]))\n"
               "print(e.__file__); print(migrations.__file__)", url)
    assert done.returncode == 0, done.stderr
    assert all(Path(line).is_relative_to(target) for line in done.stdout.split()), done.stdout
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            assert {"codex_invocations", "codex_daily_stats", "nodes"} <= set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_relay_starts_from_the_install(install):
    target, env, work = install
    db = work / "relay.db"
    # It loads the shipped price table at configure time and upgrades its database before it listens.
    with RelayProcess(db_url=f"sqlite:///{db}", root=target, env={"PYTHONPATH": env["PYTHONPATH"]}) as relay:
        with urllib.request.urlopen(f"{relay.url}/admin", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        with urllib.request.urlopen(f"{relay.url}/admin/static/admin.js", timeout=10) as resp:
            assert resp.status == 200
    assert db.is_file()
