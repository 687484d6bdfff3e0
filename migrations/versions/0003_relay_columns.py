"""What the relay measures per invocation, and per-node cached/reasoning totals and admin state.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TIMESTAMP

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

def _node_columns() -> list[sa.Column]:
    return [
        sa.Column("total_cached", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_reasoning", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", TIMESTAMP),
        sa.Column("origin", sa.String(16), nullable=False, server_default="file"),
    ]


def _invocation_columns() -> list[sa.Column]:
    return [
        sa.Column("node_id", sa.String(64)),
        sa.Column("endpoint", sa.String(255)),
        sa.Column("api_format", sa.String(16)),
        sa.Column("stream", sa.Boolean),
        sa.Column("http_status", sa.Integer),
        sa.Column("ttfb_ms", sa.Integer),
        sa.Column("stream_ms", sa.Integer),
        sa.Column("duration_ms", sa.Integer),
        sa.Column("request_bytes", sa.BigInteger),
        sa.Column("response_bytes", sa.BigInteger),
        sa.Column("attempts", sa.Integer),
        sa.Column("client_key", sa.String(64)),
        sa.Column("cache_write_tokens", sa.BigInteger),
        sa.Column("cost_estimated", sa.Boolean),
        sa.Column("cost_input", sa.Double),
        sa.Column("cost_cached", sa.Double),
        sa.Column("cost_output", sa.Double),
    ]


_INDEXES = {
    "idx_codex_invocations_occurred_at": ["occurred_at"],
    "idx_codex_invocations_node_occurred_at": ["node_id", "occurred_at"],
    "idx_codex_invocations_model_occurred_at": ["model", "occurred_at"],
}


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        for column in _node_columns():
            batch.add_column(column)
    with op.batch_alter_table("codex_invocations") as batch:
        for column in _invocation_columns():
            batch.add_column(column)
    for name, columns in _INDEXES.items():
        op.create_index(name, "codex_invocations", columns)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="codex_invocations")
    with op.batch_alter_table("codex_invocations") as batch:
        for column in reversed(_invocation_columns()):
            batch.drop_column(column.name)
    with op.batch_alter_table("nodes") as batch:
        for column in reversed(_node_columns()):
            batch.drop_column(column.name)
