"""Daily rollup: failures (the node's fault), aborted and priced calls, filled from the rows already there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_NEW = ("failures", "aborted", "priced")
# The relay's own 503 when every node is down: not a node's failure (addon.metering.outcome at this revision).
_NO_NODE = "no upstream node available"


def upgrade() -> None:
    with op.batch_alter_table("codex_daily_stats") as batch:
        for name in _NEW:
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
    inv = sa.table("codex_invocations", *[sa.column(n) for n in (
        "occurred_at", "source", "node_id", "model", "status", "http_status", "error_message", "cost")])
    c = inv.c
    # A row does not store whether its failure was the node's; this is how the relay decided it up to
    # now: a cut stream, or a failed call unless the node only refused the client's request (a 4xx
    # other than 401/403/429) or no node served it at all.
    status = sa.func.coalesce(c.http_status, 0)  # NULL (no response) is no client error
    client_error = sa.and_(status >= 400, status < 500, status.not_in([401, 403, 429]))
    no_node = sa.and_(c.node_id.is_(None), sa.func.coalesce(c.error_message, "") == _NO_NODE)
    node_fault = sa.or_(c.status == "truncated", sa.and_(c.status == "failed", sa.not_(client_error),
                                                          sa.not_(no_node)))
    keys = (sa.func.date(c.occurred_at), c.source, sa.func.coalesce(c.node_id, ""), sa.func.coalesce(c.model, ""))
    select = sa.select(
        *keys,
        sa.func.sum(sa.case((node_fault, 1), else_=0)),
        sa.func.sum(sa.case((c.status == "aborted", 1), else_=0)),
        sa.func.count(c.cost),
    ).group_by(*keys)
    daily = sa.table("codex_daily_stats", *[sa.column(n) for n in ("day", "source", "node_id", "model", *_NEW)])
    d = daily.c
    update = (sa.update(daily)
              .where(d.day == sa.bindparam("k_day"), d.source == sa.bindparam("k_source"),
                     d.node_id == sa.bindparam("k_node"), d.model == sa.bindparam("k_model"))
              .values({name: sa.bindparam(name) for name in _NEW}))
    conn = op.get_bind()
    # One row per rollup row (a few thousand for a million calls), each updated by its primary key.
    changes = [{"k_day": day, "k_source": source, "k_node": node, "k_model": model,
                "failures": int(failures or 0), "aborted": int(aborted or 0), "priced": int(priced or 0)}
               for day, source, node, model, failures, aborted, priced in conn.execute(select)
               if failures or aborted or priced]
    if changes:
        conn.execute(update, changes)


def downgrade() -> None:
    with op.batch_alter_table("codex_daily_stats") as batch:
        for name in reversed(_NEW):
            batch.drop_column(name)
