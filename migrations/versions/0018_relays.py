"""The relays on the database (``relays``, their heartbeats) and which node and key fields a file sets
(``nodes.file_fields``, ``client_keys.file_fields``): the fleet admin page (issue 29 item 7).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

Branch wt-fleetpage. The integrator re-chains it after another branch's 0017 (``down_revision``, the head test in
tests/test_migrations.py); it adds a table and two nullable columns no other revision touches.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import COUNTER, TIMESTAMP

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, COUNTER, nullable=False, server_default="0")


def upgrade() -> None:
    op.create_table(
        "relays",
        sa.Column("relay", sa.String(160), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("seen_at", TIMESTAMP, nullable=False),
        sa.Column("interval_s", sa.Double, nullable=False),
        sa.Column("stopped_at", TIMESTAMP),
        sa.Column("writer", sa.String(16)),
        _counter("stalls"),
        _counter("queued"),
        _counter("written"),
        _counter("spooled"),
        _counter("rejected"),
        _counter("lost"),
        sa.Column("last_error", sa.String(300)),
    )
    # Filled in by the next start of a relay with a nodes or keys file.
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("file_fields", sa.String(255)))
    with op.batch_alter_table("client_keys") as batch:
        batch.add_column(sa.Column("file_fields", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("client_keys") as batch:
        batch.drop_column("file_fields")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("file_fields")
    op.drop_table("relays")
