"""``python -m store.cli.reconcile --date D`` (``./run.sh reconcile``): ``store.sources.reconcile`` for each source.

Prints an aligned table (or JSON) and exits 0 when every difference is within the tolerance, 1 when
one is not, 2 when it cannot compare (bad arguments or config, database error, no provider snapshot
of that day).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from store.cli.common import add_db_option, add_sources_option, day_of, open_db
from store.config import ConfigError
from store.engine import error_summary
from store.records import utcnow
from store.sources import SourceConfig, load_sources_file
from store.sources.reconcile import ALL_MODELS, ReconcileError, Reconciliation, as_json, reconcile


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


def parse_day(text: str, source: SourceConfig, now: dt.datetime) -> dt.date:
    """``YYYY-MM-DD``, ``today`` or ``yesterday`` (in the provider's calendar)."""
    try:
        return day_of(text, dt.date.fromisoformat(source.stats_date(now)))
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
    add_db_option(parser)
    add_sources_option(parser)
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
        print(f"reconcile: database: {error_summary(e)}", file=sys.stderr)
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
