"""codex_prune_days: the runtime prunes old invocation rows on its own thread, again at each interval,
and the rollups keep their totals (SQLite and MariaDB)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.serviceoptions import RuntimeOptions
from addon.services.runtime import Runtime
from store.records import InvocationRecord, Usage, utcnow
from store.schema import codex_daily_stats, codex_hourly_stats, codex_invocations
from store.write.batch import apply_batch
from tests.support.databases import at_head
from tests.support.waiting import wait_for


def old_call(name: str, days_ago: int) -> InvocationRecord:
    return InvocationRecord(invoke_id=name, occurred_at=utcnow() - dt.timedelta(days=days_ago), source="relay",
                            endpoint="/v1/responses", status="success", usage=Usage(input_tokens=10), ttfb_ms=100)


def ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(codex_invocations.c.invoke_id)).scalars())


def rollup_inputs(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return tuple(int(conn.execute(sa.select(sa.func.sum(t.c.input_tokens))).scalar() or 0)
                     for t in (codex_daily_stats, codex_hourly_stats))


def test_runtime_prunes_daily_and_keeps_the_rollups(db_url, tmp_path):
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    runtime.db.prune_interval = 0.05
    with taddons.context(options) as tctx:
        # The pruner is tested here; the writer in test_writerproc.
        tctx.configure(options, codex_db=at_head(db_url), codex_spool=str(tmp_path / "spool.db"),
                       codex_ping_interval="0", codex_writer_process=False)
        try:
            with runtime.engine.begin() as conn:
                apply_batch(conn, [old_call("old", 10), old_call("new", 0)])
            tctx.configure(options, codex_prune_days=3)
            wait_for(lambda: ids(runtime.engine) == {"new"}, timeout=20, what="the old row pruned")
            with runtime.engine.begin() as conn:  # a later round prunes again
                apply_batch(conn, [old_call("older", 20)])
            wait_for(lambda: ids(runtime.engine) == {"new"}, timeout=20, what="the next round")
            assert rollup_inputs(runtime.engine) == (30, 30)
        finally:
            options.done()


def test_negative_days_are_refused():
    runtime = Runtime()
    options = RuntimeOptions(runtime)
    with taddons.context(options) as tctx, pytest.raises(exceptions.OptionsError, match="codex_prune_days"):
        tctx.configure(options, codex_prune_days=-1)
