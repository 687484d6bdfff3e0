"""Legacy schema: nodes and codex_invocations as the earlier relay made them (no source tag).

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import BIGID, LONGTEXT, TIMESTAMP

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("base_url", sa.String(512)),
        sa.Column("api_key", sa.String(512)),
        sa.Column("weight", sa.Integer, nullable=False, server_default="1"),
        sa.Column("failed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
        _counter("requests"),
        _counter("fail_count"),
        sa.Column("fail_streak", sa.Integer, nullable=False, server_default="0"),
        _counter("total_bytes"),
        _counter("total_input"),
        _counter("total_output"),
        _counter("stream_dur_ms"),
        _counter("first_byte_ms"),
        sa.Column("last_ping_ms", sa.Integer),
        sa.Column("last_ping_err", sa.Text),
    )
    op.create_table(
        "codex_invocations",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("invoke_id", sa.String(64), nullable=False),
        sa.Column("occurred_at", TIMESTAMP, nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("input_tokens", sa.BigInteger),
        sa.Column("output_tokens", sa.BigInteger),
        sa.Column("cache_input_tokens", sa.BigInteger),
        sa.Column("reasoning_tokens", sa.BigInteger),
        sa.Column("total_tokens", sa.BigInteger),
        sa.Column("cost", sa.Double),
        sa.Column("status", sa.String(16)),
        sa.Column("error_message", sa.Text),
        sa.Column("payload", LONGTEXT),
        sa.Column("raw_response", LONGTEXT),
        sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
        sa.UniqueConstraint("invoke_id", "occurred_at", name="uq_codex_invocations_invoke_id_occurred_at"),
    )


def downgrade() -> None:
    op.drop_table("codex_invocations")
    op.drop_table("nodes")
