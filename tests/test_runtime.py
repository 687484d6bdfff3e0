"""The runtime addon in process: its options are checked before anything starts, it routes over the
configured nodes, and its ``done`` lets the relay record calls still in flight before the last flush."""

from __future__ import annotations

import datetime as dt

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.runtime import Runtime
from addon.secrets import KnownSecrets
from store.records import InvocationRecord
from store.writer import Writer
from store.writerproc import WriterProcess
from tests.conftest import at_head
from tests.test_e2e import rows

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"


@pytest.mark.parametrize(("options", "message"), [
    ({"codex_fail_threshold": -1}, "codex_fail_threshold must be >= 0"),
    ({"codex_ping_interval": "often"}, "codex_ping_interval must be a number of seconds"),
    ({"codex_connect_timeout": "0"}, "codex_connect_timeout must be > 0"),
    ({"codex_sticky_ttl": "-1"}, "codex_sticky_ttl must be >= 0"),
    ({"codex_cooldown": "60", "codex_cooldown_max": "30"}, "codex_cooldown_max must be >= codex_cooldown"),
    ({"codex_upstream": "ftp://relay.example/v1"}, "codex_upstream: "),
    ({"codex_nodes": "/nonexistent/nodes.toml"}, "codex_nodes: "),
    ({"codex_prices": "/nonexistent/prices.toml"}, "codex_prices: "),
])
def test_bad_options_are_refused_with_their_name(options, message):
    runtime = Runtime()
    with taddons.context(runtime) as tctx, pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(runtime, **options)


def test_without_a_database_nothing_is_open():
    runtime = Runtime()
    assert (runtime.engine, runtime.writer_stats(), runtime.poll_sources(), runtime.last_polls()) == \
        (None, None, None, [])
    runtime.done()  # nothing to stop


def test_one_upstream_routes_and_its_key_is_known(tmp_path):
    secrets = KnownSecrets()
    runtime = Runtime(secrets)
    with taddons.context(runtime) as tctx:
        tctx.configure(runtime, codex_db=f"sqlite:///{tmp_path / 'codex.db'}", codex_ping_interval="0")
        assert len(runtime.pool) == 0  # monitor mode
        tctx.configure(runtime, codex_upstream="http://127.0.0.1:9/v1", codex_upstream_key=UPSTREAM_KEY)
        try:
            assert [n.id for n in runtime.pool] == ["default"]
            assert UPSTREAM_KEY not in secrets.scrub(f"echoed {UPSTREAM_KEY}")
        finally:
            runtime.done()


@pytest.mark.parametrize("process", [True, False], ids=["writer process", "writer thread"])
def test_done_runs_shutdown_callbacks_before_the_last_flush(db_url, tmp_path, process):
    runtime = Runtime()
    record = InvocationRecord(invoke_id="in-flight", occurred_at=dt.datetime(2026, 11, 25, 12), source="relay",
                              endpoint="/v1/responses", status="aborted")
    runtime.on_shutdown(lambda: runtime.submit(record))
    with taddons.context(runtime) as tctx:
        tctx.configure(runtime, codex_db=at_head(db_url), codex_spool=str(tmp_path / "spool.db"),
                       codex_ping_interval="0", codex_writer_process=process)
        assert isinstance(runtime._writer, WriterProcess if process else Writer)
        runtime.done()
    assert [r.status for r in rows(db_url, "SELECT status FROM codex_invocations WHERE invoke_id = 'in-flight'")] \
        == ["aborted"]
    assert runtime.writer_stats() is None  # closed: a later record is dropped, not queued forever
