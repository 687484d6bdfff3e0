"""Provider stats captures into ``stats_source_snapshots`` and ``stats_source_deltas``.

A capture is one poll of one source: one snapshot row per model plus one aggregate row
(``model`` NULL), all with the same ``captured_at_epoch``. Rules:

- **Idempotent.** Storing the same capture (source, period, stats_date, captured_at_epoch) again
  writes nothing. The unique key cannot enforce this for the aggregate row: NULLs never collide in a
  unique index, on MySQL/MariaDB and on SQLite alike. So each capture is stored under a per-source
  lock (MySQL ``GET_LOCK``; on SQLite the transaction takes the database write lock before it reads)
  and skipped when its aggregate row is already there.
- **Deltas** of the aggregate's requests, tokens (``all_tokens``), cost (``cost_total``) and rated
  cost (``cost_rated``) are each taken against the date's maximum so far (over the earlier captures
  of the same source/period/stats_date) and floored at 0, as codex-vibe-monitor polled CRS: a
  counter that dips (a provider correction, a lagging replica) and recovers is never counted twice,
  and the deltas of a date add up to its highest totals. The first capture of a date starts from
  zero. No row when nothing grew; a dip is logged. A capture older than one already stored (two
  pollers, one late) writes its snapshot but no delta. The rated cost of a delta is NULL while the
  provider reports none.
- Providers report no failures: ``success_count`` = ``total_count``, ``failure_count`` = 0.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import sqlalchemy as sa

from store.locks import named_lock
from store.schema import stats_source_deltas, stats_source_snapshots
from store.sources import COUNTERS, STORED, Capture, ModelStats

log = logging.getLogger("codex.snapshots")

_COST_EPSILON = 1e-9  # USD: float noise in provider sums is not a change
_LOCK_TIMEOUT_S = 30


@dataclass(slots=True)
class Delta:
    total_count: int
    success_count: int
    failure_count: int
    total_tokens: int
    total_cost: float
    cost_rated: float | None = None


@dataclass(slots=True)
class IngestResult:
    stored: bool  # False: this capture was stored before, nothing written
    delta: Delta | None = None  # the delta row written, if any
    note: str | None = None  # why there is no delta row


@dataclass(slots=True)
class StoredCapture:
    """A capture as read back: its time and its rows by model (None: the aggregate)."""

    captured_at: dt.datetime
    captured_at_epoch: int
    rows: dict[str | None, ModelStats]


def ingest(engine: sa.Engine, capture: Capture) -> IngestResult:
    """Store one capture and its delta in one transaction (see the module rules)."""
    with engine.connect() as conn, named_lock(conn, f"snapshots/{capture.source}", _LOCK_TIMEOUT_S), conn.begin():
        if conn.dialect.name == "sqlite":
            # A write first: SQLite takes its write lock now, so the checks below see the final state.
            conn.execute(sa.update(stats_source_snapshots).where(sa.false())
                         .values(id=stats_source_snapshots.c.id))
        return _ingest(conn, capture)


def _ingest(conn: sa.Connection, capture: Capture) -> IngestResult:
    s = stats_source_snapshots
    epoch = capture.captured_at_epoch
    same_date = sa.and_(s.c.source == capture.source, s.c.period == capture.period,
                        s.c.stats_date == capture.stats_date, s.c.model.is_(None))
    if conn.execute(sa.select(s.c.id).where(same_date, s.c.captured_at_epoch == epoch).limit(1)).first():
        return IngestResult(stored=False, note="capture already stored")
    highs = conn.execute(sa.select(sa.func.max(s.c.requests), sa.func.max(s.c.all_tokens),
                                  sa.func.max(s.c.cost_total), sa.func.max(s.c.cost_rated))
                        .where(same_date, s.c.captured_at_epoch < epoch)).one()
    newer = conn.execute(sa.select(s.c.id).where(same_date, s.c.captured_at_epoch > epoch).limit(1)).first()

    total = capture.total
    conn.execute(sa.insert(s), [_snapshot_row(capture, m) for m in [*capture.models, total]])

    if newer is not None:
        return IngestResult(stored=True, note="older than a capture already stored")
    now = {"requests": total.requests, "tokens": total.all_tokens, "cost": total.cost_total,
           "rated cost": total.cost_rated}
    growth = {name: _growth(value, high) for (name, value), high in zip(now.items(), highs, strict=True)}
    dips = [f"{name} {high} -> {now[name]}" for (name, g), high in zip(growth.items(), highs, strict=True)
            if g is not None and g < 0]
    growth = {name: None if g is None else max(g, 0) for name, g in growth.items()}
    if dips:
        log.warning("stats source %s %s %s: below the day's maximum (%s); counted from the maximum",
                    capture.source, capture.period, capture.stats_date, ", ".join(dips))
    if not any(growth.values()):
        note = f"below the day's maximum: {', '.join(dips)}" if dips else "unchanged"
        return IngestResult(stored=True, note=note)
    # Only "rated cost" can be None: a capture always has requests, tokens and a cost (ModelStats fields).
    count = int(growth["requests"] or 0)
    delta = Delta(total_count=count, success_count=count, failure_count=0, total_tokens=int(growth["tokens"] or 0),
                  total_cost=float(growth["cost"] or 0), cost_rated=growth["rated cost"])
    conn.execute(sa.insert(stats_source_deltas).values(
        source=capture.source, period=capture.period, stats_date=capture.stats_date,
        captured_at=capture.captured_at, captured_at_epoch=epoch, total_count=delta.total_count,
        success_count=delta.success_count, failure_count=delta.failure_count,
        total_tokens=delta.total_tokens, total_cost=delta.total_cost, cost_rated=delta.cost_rated))
    return IngestResult(stored=True, delta=delta)


def _growth(now: int | float | None, high: int | float | None) -> int | float | None:
    """``now`` - the maximum so far (negative: a dip); None when the provider reports no such figure.
    Float noise in provider cost sums is not a change."""
    if now is None:
        return None
    diff = now - (high or 0)
    if isinstance(diff, float):
        return 0.0 if abs(diff) <= _COST_EPSILON else round(diff, 9)
    return diff


def latest_capture(conn: sa.Connection, source: str, period: str, stats_date: str) -> StoredCapture | None:
    """The most recent capture of a source's period/date, or None when there is none."""
    s = stats_source_snapshots
    key = sa.and_(s.c.source == source, s.c.period == period, s.c.stats_date == stats_date)
    last = conn.execute(sa.select(s.c.captured_at, s.c.captured_at_epoch).where(key, s.c.model.is_(None))
                        .order_by(s.c.captured_at_epoch.desc()).limit(1)).first()
    if last is None:
        return None
    rows = conn.execute(sa.select(s.c.model, *_counter_columns())
                        .where(key, s.c.captured_at_epoch == last.captured_at_epoch)).all()
    return StoredCapture(captured_at=last.captured_at, captured_at_epoch=last.captured_at_epoch,
                         rows={r.model: _stats(r.model, r) for r in rows})


def _counter_columns() -> list[sa.ColumnElement]:
    return [stats_source_snapshots.c[name] for name in STORED]


def _stats(model: str | None, row: sa.Row) -> ModelStats:
    m = ModelStats(model=model, cost_rated=row.cost_rated)
    for name in COUNTERS:
        value = getattr(row, name)
        if value is not None:  # a NULL counter (older rows) reads as zero
            setattr(m, name, type(getattr(m, name))(value))
    return m


def _snapshot_row(capture: Capture, m: ModelStats) -> dict:
    return {"source": capture.source, "period": capture.period, "stats_date": capture.stats_date,
            "model": m.model, "raw_response": m.raw, "captured_at": capture.captured_at,
            "captured_at_epoch": capture.captured_at_epoch, **{name: getattr(m, name) for name in STORED}}
