"""The seed change: invocation source tag (legacy rows 'xy'), provider stats snapshots and deltas.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import BIGID, LONGTEXT, TIMESTAMP

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A length, not TEXT: MySQL allows neither a default on TEXT nor TEXT in an index without a prefix.
    op.add_column("codex_invocations",
                  sa.Column("source", sa.String(32), nullable=False, server_default="xy"))
    op.create_index("idx_codex_invocations_source_occurred_at", "codex_invocations", ["source", "occurred_at"])
    op.create_table(
        "stats_source_snapshots",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("stats_date", sa.String(10), nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger),
        sa.Column("output_tokens", sa.BigInteger),
        sa.Column("cache_create_tokens", sa.BigInteger),
        sa.Column("cache_read_tokens", sa.BigInteger),
        sa.Column("all_tokens", sa.BigInteger),
        sa.Column("cost_input", sa.Double),
        sa.Column("cost_output", sa.Double),
        sa.Column("cost_cache_write", sa.Double),
        sa.Column("cost_cache_read", sa.Double),
        sa.Column("cost_total", sa.Double),
        sa.Column("raw_response", LONGTEXT),
        sa.Column("captured_at", TIMESTAMP, nullable=False),
        sa.Column("captured_at_epoch", sa.BigInteger, nullable=False),
        sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
        sa.UniqueConstraint("source", "period", "stats_date", "model", "captured_at_epoch",
                            name="uq_stats_source_snapshots_capture"),
    )
    op.create_index("idx_stats_source_snapshots_date", "stats_source_snapshots",
                    ["source", "period", "stats_date", "captured_at_epoch"])
    op.create_table(
        "stats_source_deltas",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("stats_date", sa.String(10), nullable=False),
        sa.Column("captured_at", TIMESTAMP, nullable=False),
        sa.Column("captured_at_epoch", sa.BigInteger, nullable=False),
        sa.Column("total_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("success_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failure_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_cost", sa.Double, nullable=False),
        sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
        sa.UniqueConstraint("source", "period", "stats_date", "captured_at_epoch",
                            name="uq_stats_source_deltas_capture"),
    )
    op.create_index("idx_stats_source_deltas_epoch", "stats_source_deltas", ["source", "period", "captured_at_epoch"])


def downgrade() -> None:
    op.drop_index("idx_stats_source_deltas_epoch", table_name="stats_source_deltas")
    op.drop_table("stats_source_deltas")
    op.drop_index("idx_stats_source_snapshots_date", table_name="stats_source_snapshots")
    op.drop_table("stats_source_snapshots")
    op.drop_index("idx_codex_invocations_source_occurred_at", table_name="codex_invocations")
    with op.batch_alter_table("codex_invocations") as batch:
        batch.drop_column("source")
