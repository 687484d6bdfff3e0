"""Compare what a provider says it served with what the relay measured, per day and model.

For a source and a day (the provider's calendar day, see ``utc_offset``): the provider side is its
latest snapshot of that day; the relay side is ``codex_invocations`` of the source's nodes with
``occurred_at`` from the start of that day up to the snapshot's capture time (the provider had not
counted later calls yet). Compared per model and for all models:

- ``requests``: the provider's request count vs the relay's successful calls;
- ``input_tokens`` (cached included, the relay's OpenAI convention: the provider's input + cache
  reads + cache writes), ``cached_tokens``, ``output_tokens``, ``total_tokens``;
- ``cost``: the provider's cost vs the relay's estimated cost (``store/prices.toml``).

``python -m store.reconcile --date D`` (``./run.sh reconcile``) prints an aligned table (or JSON)
and exits 0 when every difference is within the tolerance, 1 when one is not, 2 when it cannot
compare (bad arguments or config, database error, no provider snapshot of that day).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from store.config import ConfigError
from store.poll import DEFAULT_DB, open_db
from store.records import utcnow
from store.schema import codex_invocations
from store.snapshots import latest_capture
from store.sources import SourceConfig, load_sources_file

METRICS = ("requests", "input_tokens", "cached_tokens", "output_tokens", "total_tokens", "cost")
ALL_MODELS = None  # the key of the all-models row
NO_MODEL = "(none)"  # relay calls whose model is unknown
_COST_EPSILON = 1e-9


class ReconcileError(ValueError):
    """Why a source cannot be reconciled."""


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, m) + getattr(other, m) for m in METRICS))


@dataclass(frozen=True, slots=True)
class ReconRow:
    model: str | None  # None: all models
    metric: str
    provider: int | float
    relay: int | float
    diff: int | float  # relay - provider
    rel: float | None  # diff / provider; None when the provider says 0 and the relay does not
    within: bool  # |diff| <= tolerance x provider


@dataclass(slots=True)
class Reconciliation:
    source: str
    stats_date: str
    tolerance: float
    window: tuple[dt.datetime, dt.datetime]  # relay calls compared: start <= occurred_at < end (naive UTC)
    captured_at: dt.datetime | None  # of the provider snapshot; None: there is none
    rows: list[ReconRow]

    @property
    def ok(self) -> bool:
        return self.captured_at is not None and all(r.within for r in self.rows)

    @property
    def exceeded(self) -> list[ReconRow]:
        return [r for r in self.rows if not r.within]


def compare(provider: Mapping[str | None, Totals], relay: Mapping[str | None, Totals],
            tolerance: float) -> list[ReconRow]:
    """Rows per model (sorted, the all-models row last) and metric, each with its differences.

    Pure: both sides are given as totals by model; ``None`` keys are the all-models totals.
    """
    models = sorted({*provider, *relay} - {ALL_MODELS})
    rows = []
    for model in [*models, ALL_MODELS]:
        p, r = provider.get(model, Totals()), relay.get(model, Totals())
        for metric in METRICS:
            pv, rv = getattr(p, metric), getattr(r, metric)
            diff = rv - pv
            if metric == "cost":
                diff = 0.0 if abs(diff) < _COST_EPSILON else diff
            rel = 0.0 if diff == 0 else (diff / pv if pv else None)
            rows.append(ReconRow(model=model, metric=metric, provider=pv, relay=rv, diff=diff, rel=rel,
                                 within=rel is not None and abs(rel) <= tolerance))
    return rows


def reconcile(conn: sa.Connection, source: SourceConfig, day: dt.date, tolerance: float = 0.02) -> Reconciliation:
    """Compare ``source``'s latest snapshot of ``day`` with the relay's own calls through its nodes."""
    if source.period != "daily":
        raise ReconcileError(f"source {source.name!r} reports period {source.period!r}; only daily sources "
                             "can be reconciled per day")
    if not source.nodes:
        raise ReconcileError(f"source {source.name!r} names no nodes (nodes = [...] in its [[sources]] entry)")
    stats_date = day.isoformat()
    start, end = source.day_window(day)
    snapshot = latest_capture(conn, source.name, "daily", stats_date)
    if snapshot is None:
        return Reconciliation(source.name, stats_date, tolerance, (start, end), None, [])
    end = min(end, snapshot.captured_at)
    provider = {model: Totals(requests=m.requests,
                              input_tokens=m.input_tokens + m.cache_read_tokens + m.cache_create_tokens,
                              cached_tokens=m.cache_read_tokens, output_tokens=m.output_tokens,
                              total_tokens=m.all_tokens, cost=m.cost_total)
                for model, m in snapshot.rows.items()}
    relay = relay_totals(conn, source.nodes, start, end)
    return Reconciliation(source.name, stats_date, tolerance, (start, end), snapshot.captured_at,
                          compare(provider, relay, tolerance))


def relay_totals(conn: sa.Connection, nodes: Sequence[str], start: dt.datetime,
                 end: dt.datetime) -> dict[str | None, Totals]:
    """The relay's totals by model (and for all models, key None) of calls through ``nodes``."""
    c = codex_invocations.c
    query = (sa.select(c.model, sa.func.sum(sa.case((c.status == "success", 1), else_=0)),
                       sa.func.sum(c.input_tokens), sa.func.sum(c.cache_input_tokens),
                       sa.func.sum(c.output_tokens), sa.func.sum(c.total_tokens), sa.func.sum(c.cost))
             .where(c.node_id.in_(nodes), c.occurred_at >= start, c.occurred_at < end)
             .group_by(c.model))
    totals: dict[str | None, Totals] = {}
    for model, *values in conn.execute(query):
        t = Totals(*(int(v or 0) for v in values[:5]), cost=float(values[5] or 0))
        key = model or NO_MODEL
        totals[key] = totals.get(key, Totals()) + t
    totals[ALL_MODELS] = sum(totals.values(), Totals())
    return totals


# -- output ----------------------------------------------------------------------------------------
def _num(metric: str, v: float | int, signed: bool = False) -> str:
    if metric == "cost":
        return f"{v:+.6f}" if signed else f"{v:.6f}"
    return f"{v:+,}" if signed else f"{v:,}"


def format_report(rec: Reconciliation, nodes: Sequence[str]) -> str:
    """An aligned plain-text table of one reconciliation."""
    start, end = rec.window
    head = f"source {rec.source}, day {rec.stats_date}, tolerance {rec.tolerance:.2%}"
    if rec.captured_at is None:
        return f"{head}\nno provider snapshot of {rec.stats_date}: nothing to compare\n"
    lines = [head,
             f"provider: latest snapshot, captured {rec.captured_at:%Y-%m-%d %H:%M:%S} UTC",
             f"relay:    calls via {', '.join(nodes)}, {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} UTC",
             "diff = relay - provider, rel = diff / provider", ""]
    table = [("model", "metric", "provider", "relay", "diff", "rel", "")]
    last = object()
    for r in rec.rows:
        name = "(all models)" if r.model is ALL_MODELS else r.model
        rel = "n/a" if r.rel is None else f"{r.rel:+.2%}"
        table.append((name if r.model != last else "", r.metric, _num(r.metric, r.provider),
                      _num(r.metric, r.relay), _num(r.metric, r.diff, signed=True), rel, "" if r.within else "!"))
        last = r.model
    widths = [max(len(row[i]) for row in table) for i in range(7)]
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                 *(cell.rjust(w) for cell, w in zip(row[2:6], widths[2:6], strict=True)), row[6]]
        lines.append("  ".join(cells).rstrip())
    bad = rec.exceeded
    lines.append("")
    lines.append(f"MISMATCH: {len(bad)} value(s) differ by more than {rec.tolerance:.2%} (marked !)" if bad
                 else f"OK: every value within {rec.tolerance:.2%}")
    return "\n".join(lines) + "\n"


def as_json(rec: Reconciliation) -> dict:
    start, end = rec.window
    return {"source": rec.source, "stats_date": rec.stats_date, "tolerance": rec.tolerance, "ok": rec.ok,
            "captured_at": rec.captured_at.isoformat() if rec.captured_at else None,
            "window": {"start": start.isoformat(), "end": end.isoformat()},
            "rows": [dataclasses.asdict(r) for r in rec.rows]}


def parse_day(text: str, source: SourceConfig, now: dt.datetime) -> dt.date:
    """``YYYY-MM-DD``, ``today`` or ``yesterday`` (in the provider's calendar)."""
    if text in ("today", "yesterday"):
        today = dt.date.fromisoformat(source.stats_date(now))
        return today - dt.timedelta(days=1) if text == "yesterday" else today
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ReconcileError(f"--date must be YYYY-MM-DD, today or yesterday, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reconcile", description="Compare each provider's latest daily snapshot with the relay's own "
        "calls through that provider's nodes. Exit 0: within tolerance; 1: a difference is not; 2: cannot "
        "compare.")
    parser.add_argument("--date", required=True, help="YYYY-MM-DD, today or yesterday (provider's calendar)")
    parser.add_argument("--source", action="append", metavar="NAME", help="only this source (repeatable)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest relative difference accepted, e.g. 0.02 = 2%% (default %(default)s)")
    parser.add_argument("--db", default=os.environ.get("CODEX_DB", DEFAULT_DB),
                        help="SQLAlchemy URL of the stats database (default: $CODEX_DB or %(default)s)")
    parser.add_argument("--sources", default=os.environ.get("CODEX_STATS_SOURCES"),
                        help="TOML file with [[sources]] (default: $CODEX_STATS_SOURCES)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not args.sources:
        parser.error("--sources FILE (or $CODEX_STATS_SOURCES) is required")
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        parser.error("--tolerance must be a number >= 0")
    try:
        sources = load_sources_file(args.sources)
        unknown = set(args.source or ()) - {s.name for s in sources}
        if unknown:
            raise ConfigError(f"{args.sources}: no source named {', '.join(sorted(unknown))}")
        chosen = [s for s in sources if (s.name in args.source if args.source else s.period == "daily")]
        if not chosen:
            raise ConfigError(f"{args.sources}: no daily source to reconcile")
        now = utcnow()
        days = [parse_day(args.date, s, now) for s in chosen]
    except (ConfigError, ReconcileError) as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return 2
    engine = open_db(args.db, "reconcile")
    if engine is None:
        return 2
    results = []
    try:
        with engine.connect() as conn:
            for source, day in zip(chosen, days, strict=True):
                results.append((source, reconcile(conn, source, day, args.tolerance)))
    except ReconcileError as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return 2
    except sa.exc.SQLAlchemyError as e:
        print(f"reconcile: database: {e.__class__.__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([as_json(rec) for _, rec in results], indent=2))
    else:
        print("\n".join(format_report(rec, source.nodes) for source, rec in results), end="")
    if any(rec.captured_at is None for _, rec in results):
        return 2
    return 0 if all(rec.ok for _, rec in results) else 1


if __name__ == "__main__":
    sys.exit(main())
