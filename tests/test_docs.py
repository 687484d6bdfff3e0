"""The documentation cannot drift from the code: every option is in the options reference, every module in the
layout map, every relative link resolves, README stays a short guide with exactly two set-up commands, and
README's quick start runs as written against a fake provider (one real relay, started by ./run.sh)."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.support.ci import unavailable
from tests.support.fakeupstream import FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS_PAGE = DOCS / "configuration.md"
LAYOUT_PAGE = DOCS / "layout.md"

_ADD_OPTION = re.compile(r"""add_option\(\s*["'](codex_\w+)["']""")


def declared_options() -> set[str]:
    """Every codex_* option an addon declares (``loader.add_option("codex_…", …)``)."""
    found: set[str] = set()
    for path in (ROOT / "addon").rglob("*.py"):
        found |= set(_ADD_OPTION.findall(path.read_text()))
    return found


def section(text: str, heading: str) -> str:
    """The text under a ``## heading`` up to the next heading of that level."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def test_every_option_is_in_the_options_reference():
    options = declared_options()
    assert len(options) >= 30, f"the option pattern found too few: {sorted(options)}"
    table = section(OPTIONS_PAGE.read_text(), "Options")
    missing = sorted(o for o in options if f"`{o}`" not in table)
    assert not missing, f"options missing from the table in {OPTIONS_PAGE.relative_to(ROOT)}: {missing}"
    documented = set(re.findall(r"`(codex_\w+)`", table))
    unknown = sorted(documented - options)
    assert not unknown, f"the options table documents options no addon declares: {unknown}"


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_every_module_is_in_the_layout_map():
    layout = LAYOUT_PAGE.read_text()
    missing = []
    for package in ("addon", "store", "bench", "tests/support"):
        text = section(layout, f"{package}/")
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT / package)
            if "__pycache__" in rel.parts:
                continue
            # A top-level module by its file name; a subpackage's modules by their path in it.
            name = str(rel) if len(rel.parts) > 1 else rel.name
            if rel.name == "__init__.py" and (len(rel.parts) == 1 or _only_a_docstring(path)):
                continue  # a package's line says what its folder holds
            if f"`{name}`" not in text:
                missing.append(f"{package}/{rel}")
    assert not missing, f"modules missing from {LAYOUT_PAGE.relative_to(ROOT)}: {missing}"


def test_readme_is_a_short_guide_with_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    setup = section(text, "Set up")
    blocks = re.findall(r"```sh\n(.*?)```", setup, re.S)
    assert len(blocks) == 1, "the set-up section has one command block"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["./run.sh", "./run.sh test"]
    # No other way to set up: no pip, no venv by hand, no hidden set-up command.
    for other in ("pip install", "python -m venv", "./run.sh setup", "virtualenv"):
        assert other not in text, f"README shows another set-up command: {other}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"


def test_the_docs_show_the_shipped_haproxy_configuration():
    """tests/support/haproxy.py and the fleet tests run examples/haproxy.cfg: the page shows that very file."""
    assert (ROOT / "examples" / "haproxy.cfg").read_text() in (DOCS / "several-relays.md").read_text()


# -- the quick start, as written ------------------------------------------------------------------------

_MARKED = re.compile(r"<!-- quickstart: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
# What a reader fills in (README's step 1 names each), and what the test fills in instead.
PLACEHOLDERS = ("https://openai-relay.example/v1", "sk-replace-me", "sk-ant-replace-me")
FAKE_OPENAI_KEY = "sk-quickstart-openai-0123456789"
FAKE_ANTHROPIC_KEY = "sk-ant-quickstart-0123456789"


def quickstart_blocks() -> dict[str, tuple[str, str]]:
    text = section(README.read_text(), "Quick start")
    blocks = {name: (lang, body) for name, lang, body in _MARKED.findall(text)}
    for placeholder in PLACEHOLDERS:
        assert f"`{placeholder}`" in text, f"the quick start no longer says to replace {placeholder}"
    return blocks


def fake_clone(tmp: Path) -> Path:
    """A checkout as a user has it after ./run.sh set it up: run.sh itself (its folder is the checkout), the
    code and examples, and a .venv whose stamp says it is current, over the interpreter running these tests.
    So ./run.sh installs nothing (it would otherwise reinstall into a .venv other checkouts may share)."""
    clone = tmp / "codex-relay"
    clone.mkdir()
    shutil.copy2(ROOT / "run.sh", clone / "run.sh")
    for name in ("addon", "store", "migrations", "examples", "pyproject.toml"):
        (clone / name).symlink_to(ROOT / name)
    venv = clone / ".venv"
    venv.mkdir()
    prefix = Path(sys.prefix)
    for name in ("bin", "lib", "pyvenv.cfg"):
        (venv / name).symlink_to(prefix / name)
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".codex-stamp").write_text(f"{stamp}:dev\n")
    return clone


def run_sh_argv(command: str, clone: Path) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "./run.sh", command
    return [str(clone / "run.sh"), *argv[1:]]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


@pytest.mark.e2e
def test_the_quick_start_runs_as_written(tmp_path):
    if sys.prefix == sys.base_prefix:
        unavailable("the quick start test", "it runs ./run.sh over the tests' virtualenv (./run.sh test)")
    blocks = quickstart_blocks()
    assert set(blocks) >= {"setup", "relay", "codex-config", "codex-env", "claude-env", "call", "sdk", "stats"}
    clone = fake_clone(tmp_path)
    env = dict(os.environ, CODEX_DB="", CODEX_HOST="", CODEX_REVERSE_TARGET="", CODEX_PORT="0")

    # 1. The nodes file: copied as written, then filled in as step 1 says.
    subprocess.run(["bash", "-euc", blocks["setup"][1]], cwd=clone, env=env, check=True)
    nodes = clone / "nodes.toml"
    with FakeUpstream(name="provider") as provider:
        text = nodes.read_text()
        for placeholder in PLACEHOLDERS:
            assert placeholder in text, f"examples/nodes.toml no longer has {placeholder}"
        text = (text.replace(PLACEHOLDERS[0], provider.base_url)
                .replace(PLACEHOLDERS[2], FAKE_ANTHROPIC_KEY).replace(PLACEHOLDERS[1], FAKE_OPENAI_KEY)
                .replace("https://api.anthropic.com/v1", provider.base_url))
        nodes.write_text(text)

        # 2. The relay, started by ./run.sh from the checkout (port: any free one, CODEX_PORT=0).
        (relay_command,) = [ln for ln in blocks["relay"][1].splitlines() if ln.strip()]
        relay = RelayProcess(db_url=None, argv=run_sh_argv(relay_command, clone), cwd=clone,
                             env={k: env[k] for k in ("CODEX_DB", "CODEX_HOST", "CODEX_REVERSE_TARGET", "CODEX_PORT")})
        with relay:
            base = f"http://127.0.0.1:{relay.port}"
            def summary() -> list[str] | bool:  # the start-up line, or True once the relay has exited
                found = [ln for ln in relay.lines if "codex-relay ready;" in ln]
                return found or (relay.proc is not None and relay.proc.poll() is not None)

            found = wait_for(summary, 30, "the start-up summary")
            assert isinstance(found, list), f"./run.sh exited:\n{relay.output()}"
            summary = found[0]
            assert f"clients: {base}/v1 " in summary and f"admin page: {base}/admin" in summary, summary
            assert "nodes: openai-relay, anthropic;" in summary, summary
            assert f"sqlite:///{clone}/data/codex.db" in summary, summary

            def local(s: str) -> str:  # the guide's port is 8000; this relay's is another
                assert "127.0.0.1:8000" in s, s
                return s.replace("127.0.0.1:8000", f"127.0.0.1:{relay.port}")

            # The start-up line README shows is this relay's ("…" stands for what differs per checkout).
            (sample,) = [ln for ln in section(README.read_text(), "Quick start").splitlines()
                         if ln.startswith("codex-relay ready;")]
            assert re.search(re.escape(local(sample)).replace("…", ".*"), summary), (sample, summary)

            # 3. The clients' settings point at what the relay says it serves.
            codex = tomllib.loads(local(blocks["codex-config"][1]))
            provider_cfg = codex["model_providers"][codex["model_provider"]]
            assert provider_cfg["base_url"] == f"{base}/v1" and provider_cfg["wire_api"] == "responses"
            assert f"export {provider_cfg['env_key']}=" in blocks["codex-env"][1]
            assert f"export ANTHROPIC_BASE_URL={base}\n" in local(blocks["claude-env"][1])
            assert "export ANTHROPIC_API_KEY=" in blocks["claude-env"][1]

            # A call with curl after Codex's export, and one with the SDK, as written.
            script = blocks["codex-env"][1] + local(blocks["call"][1])
            out = subprocess.run(["bash", "-euc", script], cwd=clone, env=env, check=True,
                                 capture_output=True, text=True, timeout=60).stdout
            assert json.loads(out)["status"] == "completed", out
            out = subprocess.run([sys.executable, "-c", local(blocks["sdk"][1])], cwd=clone, env=env, check=True,
                                 capture_output=True, text=True, timeout=60).stdout
            assert out.strip() == "hi", out
            calls = provider.requests_to("/responses")
            assert len(calls) == 2 and all(c.headers["authorization"] == f"Bearer {FAKE_OPENAI_KEY}" for c in calls)

            # 4. The calls on the admin page's API, then in ./run.sh stats.
            def recorded() -> list[dict] | None:
                calls = get_json(f"{base}/admin/api/recent")["invocations"]
                return calls if len(calls) == 2 else None

            recent = wait_for(recorded, 30, "the two calls recorded")
            assert {(r["node_id"], r["model"], r["status"]) for r in recent} == {
                ("openai-relay", "gpt-5-codex", "success")}, recent
            with urllib.request.urlopen(f"{base}/admin", timeout=30) as r:
                assert r.status == 200 and b"<html" in r.read().lower()
            (stats_command,) = [ln for ln in blocks["stats"][1].splitlines() if ln.strip()]
            stats = subprocess.run(run_sh_argv(stats_command, clone), cwd=clone, env=env, check=True,
                                   capture_output=True, text=True, timeout=60).stdout
        header, *rows = stats.splitlines()
        row = next(r for r in rows if r.startswith("openai-relay "))
        end = header.index("requests") + len("requests")  # numbers are right-aligned under their heading
        assert row[:end].split()[-1] == "2", stats

    # The SQL recipes of the schema page run on the database the quick start wrote.
    with contextlib.closing(sqlite3.connect(clone / "data" / "codex.db")) as db:
        for query in re.findall(r"```sql\n(.*?)```", (DOCS / "schema.md").read_text(), re.S):
            db.execute(query).fetchall()
