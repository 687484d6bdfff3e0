"""Retention: delete ``codex_invocations`` rows older than N whole UTC days, in short transactions.

Only the raw rows go. ``codex_daily_stats`` and the nodes' counters are never touched, so every
stats view still covers the pruned days. Whole days: the cutoff is a UTC midnight, so a day's rows
are either all kept or all gone, never half a day beside its full rollup row.

Each batch is one transaction: the ids of the oldest ``batch`` rows, found through the
``occurred_at`` index, then a DELETE of exactly those ids by primary key. The writer waits for one
batch at most (a few milliseconds), never for the whole prune.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from store.records import utcnow
from store.schema import codex_invocations

BATCH = 5_000
_inv = codex_invocations.c

# progress(deleted so far, estimated total): called after each committed batch.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: dt.datetime  # rows with occurred_at before this UTC midnight were deleted
    estimated: int  # how many there were when the prune began
    deleted: int
    batches: int


def cutoff_for(days: int, now: dt.datetime | None = None) -> dt.datetime:
    """The UTC midnight ``days`` whole days before today's (``now``: naive UTC, as stored)."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    today = (now or utcnow()).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - dt.timedelta(days=days)


def count_older_than(engine: sa.Engine, days: int, now: dt.datetime | None = None) -> tuple[dt.datetime, int]:
    """The cutoff and how many invocation rows are older (what a prune would delete now)."""
    cutoff = cutoff_for(days, now)
    with engine.connect() as conn:
        return cutoff, _count(conn, cutoff)


def prune_older_than(engine: sa.Engine, days: int, batch: int = BATCH, progress: Progress | None = None,
                     now: dt.datetime | None = None) -> PruneResult:
    """Delete the invocation rows older than ``days`` whole UTC days, ``batch`` rows per transaction.

    Safe beside a running relay (the runtime may call it from a background thread): rows are
    deleted by primary key only, each batch committed before the next begins. A database error
    propagates; the batches committed before it stay deleted.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    cutoff = cutoff_for(days, now)
    with engine.connect() as conn:
        estimated = _count(conn, cutoff)
    deleted = batches = 0
    # Rows before ``start`` are gone already: each scan begins where the last batch ended, so it
    # never walks the index entries of rows deleted earlier.
    start: dt.datetime | None = None
    while True:
        with engine.begin() as conn:
            query = (sa.select(_inv.id, _inv.occurred_at).where(_inv.occurred_at < cutoff)
                     .order_by(_inv.occurred_at, _inv.id).limit(batch))
            if start is not None:
                query = query.where(_inv.occurred_at >= start)
            rows = conn.execute(query).all()
            if not rows:
                break
            gone = conn.execute(sa.delete(codex_invocations).where(_inv.id.in_([r.id for r in rows]))).rowcount
        deleted += gone
        batches += 1
        start = rows[-1].occurred_at
        if progress is not None:
            progress(deleted, max(estimated, deleted))
        if len(rows) < batch:  # the last batch: nothing older is left
            break
    return PruneResult(cutoff=cutoff, estimated=estimated, deleted=deleted, batches=batches)


def _count(conn: sa.Connection, cutoff: dt.datetime) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)
                        .where(_inv.occurred_at < cutoff)).scalar_one()
