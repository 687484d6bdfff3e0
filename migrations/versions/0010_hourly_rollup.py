"""Hourly rollup with TTFB and duration distributions in fixed buckets (percentiles per hour), filled
from the rows already there.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# The daily rollup's counters (revision 6), in its order; cost is a float.
_DAILY = ("requests", "successes", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
          "total_tokens", "cost", "bytes", "ttfb_sum", "ttfb_n", "stream_ms", "stream_tokens", "failures",
          "aborted", "priced")
# Fixed bucket upper bounds in ms (store.histogram at this revision), then the open bucket.
_TTFB_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000, 60000)
_DURATION_MS = (250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000, 300000, 600000)
_BUCKETS = (*(f"ttfb_le_{b}" for b in _TTFB_MS), "ttfb_le_inf", *(f"dur_le_{b}" for b in _DURATION_MS), "dur_le_inf")


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    op.create_table(
        "codex_hourly_stats",
        sa.Column("hour", sa.DateTime, primary_key=True),
        sa.Column("source", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        *[sa.Column(n, sa.Double, nullable=False, server_default="0") if n == "cost" else _counter(n) for n in _DAILY],
        _counter("duration_sum"),
        _counter("duration_n"),
        *[_counter(n) for n in _BUCKETS],
    )
    _backfill()


def _bucket_sums(value: sa.ColumnElement, bounds: tuple[int, ...]) -> list[sa.ColumnElement]:
    """One count per bucket as store.histogram files a value: (previous bound, bound], then above all."""
    edges = (None, *bounds)
    sums = [sa.func.sum(sa.case((sa.and_(value <= hi, *([value > lo] if lo is not None else [])), 1), else_=0))
            for lo, hi in zip(edges, bounds, strict=False)]
    return [*sums, sa.func.sum(sa.case((value > bounds[-1], 1), else_=0))]


def _backfill() -> None:
    """One INSERT … SELECT on the server, with the same sums as the daily rollup (revisions 4 and 6)."""
    conn = op.get_bind()
    inv = sa.table("codex_invocations", *[sa.column(n) for n in (
        "occurred_at", "source", "node_id", "model", "status", "stream", "http_status", "error_message",
        "input_tokens", "cache_input_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "cost",
        "response_bytes", "ttfb_ms", "stream_ms", "duration_ms")])
    c = inv.c
    # The hour's start as each dialect stores a DateTime, so the writer's later increments hit the same row.
    if conn.dialect.name == "sqlite":
        hour = sa.func.strftime("%Y-%m-%d %H:00:00.000000", c.occurred_at)
    else:
        hour = sa.func.date_format(c.occurred_at, "%Y-%m-%d %H:00:00")
    timed = sa.and_(c.status == "success", c.stream.is_(sa.true()), c.stream_ms.is_not(None), c.output_tokens > 0)
    # The node's fault as revision 6 decides it for rows that do not store it.
    status = sa.func.coalesce(c.http_status, 0)
    client_error = sa.and_(status >= 400, status < 500, status.not_in([401, 403, 429]))
    no_node = sa.and_(c.node_id.is_(None), sa.func.coalesce(c.error_message, "") == "no upstream node available")
    node_fault = sa.or_(c.status == "truncated", sa.and_(c.status == "failed", sa.not_(client_error),
                                                          sa.not_(no_node)))
    zero = sa.literal(0)
    keys = [hour, c.source, sa.func.coalesce(c.node_id, ""), sa.func.coalesce(c.model, "")]
    select = sa.select(
        *keys,
        sa.func.count(),
        sa.func.sum(sa.case((c.status == "success", 1), else_=0)),
        *[sa.func.coalesce(sa.func.sum(col), zero) for col in (
            c.input_tokens, c.cache_input_tokens, c.output_tokens, c.reasoning_tokens, c.total_tokens, c.cost,
            c.response_bytes, c.ttfb_ms)],
        sa.func.count(c.ttfb_ms),
        sa.func.coalesce(sa.func.sum(sa.case((timed, c.stream_ms), else_=0)), zero),
        sa.func.coalesce(sa.func.sum(sa.case((timed, c.output_tokens), else_=0)), zero),
        sa.func.sum(sa.case((node_fault, 1), else_=0)),
        sa.func.sum(sa.case((c.status == "aborted", 1), else_=0)),
        sa.func.count(c.cost),
        sa.func.coalesce(sa.func.sum(c.duration_ms), zero),
        sa.func.count(c.duration_ms),
        *_bucket_sums(c.ttfb_ms, _TTFB_MS),
        *_bucket_sums(c.duration_ms, _DURATION_MS),
    ).group_by(*keys)
    columns = ["hour", "source", "node_id", "model", *_DAILY, "duration_sum", "duration_n", *_BUCKETS]
    hourly = sa.table("codex_hourly_stats", *[sa.column(n) for n in columns])
    conn.execute(sa.insert(hourly).from_select(columns, select))


def downgrade() -> None:
    op.drop_table("codex_hourly_stats")
