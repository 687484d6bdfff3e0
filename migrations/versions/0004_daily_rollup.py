"""Daily rollup of invocations per source, node and model, filled from the rows already there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COUNTERS = ("requests", "successes", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
             "total_tokens", "bytes", "ttfb_sum", "ttfb_n", "stream_ms", "stream_tokens")


def upgrade() -> None:
    table = op.create_table(
        "codex_daily_stats",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("source", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        *[sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in _COUNTERS[:7]],
        sa.Column("cost", sa.Double, nullable=False, server_default="0"),
        *[sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in _COUNTERS[7:]],
    )
    # Backfill in one statement on the server: legacy and relay rows alike.
    inv = sa.table("codex_invocations", *[sa.column(n) for n in (
        "occurred_at", "source", "node_id", "model", "status", "stream", "input_tokens", "cache_input_tokens",
        "output_tokens", "reasoning_tokens", "total_tokens", "cost", "response_bytes", "ttfb_ms", "stream_ms")])
    c = inv.c
    timed = sa.and_(c.status == "success", c.stream.is_(sa.true()), c.stream_ms.is_not(None), c.output_tokens > 0)
    zero = sa.literal(0)
    keys = [sa.func.date(c.occurred_at), c.source, sa.func.coalesce(c.node_id, ""), sa.func.coalesce(c.model, "")]
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
    ).group_by(*keys)
    columns = ["day", "source", "node_id", "model", "requests", "successes", "input_tokens", "cached_tokens",
               "output_tokens", "reasoning_tokens", "total_tokens", "cost", "bytes", "ttfb_sum", "ttfb_n",
               "stream_ms", "stream_tokens"]
    op.execute(sa.insert(table).from_select(columns, select))


def downgrade() -> None:
    op.drop_table("codex_daily_stats")
