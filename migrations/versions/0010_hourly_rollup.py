"""Hourly rollup with TTFB and duration distributions in fixed buckets (percentiles per hour).

Starts empty: hours before the upgrade are in the daily rollup only.

Revision ID: 0010
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0007"  # the integrator re-points it after 0008 and 0009
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


def downgrade() -> None:
    op.drop_table("codex_hourly_stats")
