"""Bad configuration at start: one clear error line, a non-zero exit, and no traceback."""

from __future__ import annotations

import subprocess

import pytest

from bench.relayproc import RelayProcess

pytestmark = pytest.mark.e2e


def start_fails(tmp_path, **options: str) -> list[str]:
    relay = RelayProcess(db_url=options.pop("codex_db", f"sqlite:///{tmp_path / 'codex.db'}"), options=options)
    proc = subprocess.run(relay.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode != 0, out
    assert not any("Traceback" in line for line in out), out
    return out


@pytest.mark.parametrize("options, message", [
    ({"codex_nodes": "{bad}"}, "invalid TOML"),
    ({"codex_nodes": "/no/such/nodes.toml"}, "nodes.toml"),
    ({"codex_retries": "-1"}, "codex_retries must be >= 0"),
    ({"codex_connect_timeout": "soon"}, "codex_connect_timeout must be a number of seconds"),
    ({"codex_db": "mysql+pymysql://root@127.0.0.1:1/x"}, "codex_db: cannot open mysql+pymysql://root@127.0.0.1:1/x"),
    ({"codex_db": "oracle://x@127.0.0.1/db"}, "unsupported database 'oracle'"),
    ({"codex_nope": "1"}, "unknown option(s): codex_nope"),
])
def test_bad_start_is_one_clear_line(tmp_path, options, message):
    if options.get("codex_nodes") == "{bad}":
        bad = tmp_path / "nodes.toml"
        bad.write_text("[[nodes]\nid = ")
        options = {"codex_nodes": str(bad)}
    out = start_fails(tmp_path, **options)
    assert sum(message in line for line in out) == 1, out
