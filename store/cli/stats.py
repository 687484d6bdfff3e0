"""``python -m store.cli.stats [nodes|models|sources|days|hours|recent|sessions|keys]``.

The same as ``./run.sh stats`` and ``codex-stats``.

Prints the aggregates of ``store.stats`` as an aligned table, ``--json`` or ``--csv``. It only reads:
a missing database, a bad URL or one whose schema is not at head is an error, never created or upgraded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from store.budgets import as_of, uses_of
from store.cli.common import OneLineParser, add_db_option, day_of
from store.engine import DEFAULT_DB, current_revision, error_summary, head_revision, make_engine
from store.key_usage import key_report, per_key
from store.keyrows import load_keys, spec_of
from store.keys import parse_keys_toml, toml_file
from store.stats import (
    Filters,
    per_day,
    per_hour,
    per_model,
    per_node,
    per_session,
    per_source,
    recent_invocations,
)


class StatsError(Exception):
    """Why the CLI cannot answer, worded for the user."""


def _int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _cost(s: Any) -> str:
    """``-`` when no call had a price (unknown, not free); the calls left out are named."""
    if s.cost is None:
        return "-"
    return f"{s.cost:.4f}" + (f" ({s.unpriced:,} unpriced)" if s.unpriced else "")


def _text(v: str | None, width: int = 40) -> str:
    if not v:
        return "-"
    v = " ".join(v.split())
    return v if len(v) <= width else v[:width - 1] + "…"


# One table per view: (heading, cell of a row, right-aligned). JSON and CSV carry every field.
Column = tuple[str, Callable[[Any], str], bool]
_CALL_COLUMNS: list[Column] = [
    ("requests", lambda s: _int(s.requests), True),
    ("failures", lambda s: _int(s.failures), True),
    ("aborted", lambda s: _int(s.aborted), True),
    ("refused", lambda s: _int(s.refused), True),
    ("health", lambda s: _rate(s.health_rate), True),
    ("input", lambda s: _int(s.input_tokens), True),
    ("cached", lambda s: _int(s.cached_tokens), True),
    ("hit", lambda s: _rate(s.cache_hit_rate), True),  # cached ÷ input: the prompt cache's share
    ("output", lambda s: _int(s.output_tokens), True),
    ("reasoning", lambda s: _int(s.reasoning_tokens), True),
]
_METRIC_COLUMNS: list[Column] = [
    *_CALL_COLUMNS,
    ("cost $", _cost, True),
    ("ttfb ms", lambda s: _ms(s.avg_ttfb_ms), True),
]
VIEWS: dict[str, tuple[Callable[..., list], list[Column]]] = {
    "nodes": (per_node, [
        ("node", lambda s: s.node_id or "(no node)", False),
        ("name", lambda s: _text(s.name, 24), False),
        ("status", lambda s: s.status or "-", False),
        ("weight", lambda s: _int(s.weight), True),
        *_CALL_COLUMNS,
        ("bytes", lambda s: _int(s.bytes), True),
        ("ttfb ms", lambda s: _ms(s.avg_ttfb_ms), True),
        ("p50 ms", lambda s: _int(s.ttfb_p50_ms), True),
        ("p95 ms", lambda s: _int(s.ttfb_p95_ms), True),
        ("ms/token", lambda s: _ms(s.stream_ms_per_token), True),
        ("ping ms", lambda s: _int(s.last_ping_ms), True),
        ("last error", lambda s: _text(s.last_error), False),
    ]),
    "models": (per_model, [("model", lambda s: s.model or "(unknown)", False), *_METRIC_COLUMNS]),
    "sources": (per_source, [("source", lambda s: s.source, False), *_METRIC_COLUMNS]),
    "days": (per_day, [("day", lambda s: s.day, False), ("source", lambda s: s.source, False),
                       *_CALL_COLUMNS, ("total", lambda s: _int(s.total_tokens), True)]),
    "hours": (per_hour, [
        ("hour (UTC)", lambda s: s.hour, False), *_CALL_COLUMNS,
        ("ttfb p50", lambda s: _int(s.ttfb_p50_ms), True),
        ("p95", lambda s: _int(s.ttfb_p95_ms), True),
        ("p99", lambda s: _int(s.ttfb_p99_ms), True),
        ("total p50", lambda s: _int(s.duration_p50_ms), True),
        ("p95", lambda s: _int(s.duration_p95_ms), True),
        ("p99", lambda s: _int(s.duration_p99_ms), True),
    ]),
    "recent": (recent_invocations, [
        ("time (UTC)", lambda s: f"{s.occurred_at:%Y-%m-%d %H:%M:%S}", False),
        ("source", lambda s: s.source, False),
        ("node", lambda s: s.node_id or "-", False),
        ("model", lambda s: s.model or "-", False),
        ("status", lambda s: s.status or "-", False),
        ("http", lambda s: _int(s.http_status), True),
        ("input", lambda s: _int(s.input_tokens), True),
        ("cached", lambda s: _int(s.cached_tokens), True),
        ("output", lambda s: _int(s.output_tokens), True),
        ("ttfb ms", lambda s: _int(s.ttfb_ms), True),
        ("total ms", lambda s: _int(s.duration_ms), True),
        ("error", lambda s: _text(s.error_message), False),
    ]),
    # The sessions with the most input (codex_invocations.session_key): --limit of them.
    "sessions": (per_session, [
        ("session", lambda s: _text(s.session_key, 48), False),
        ("requests", lambda s: _int(s.requests), True),
        ("nodes", lambda s: _int(s.nodes), True),
        ("node", lambda s: s.node_id or "-", False),
        ("key", lambda s: s.client_key or "-", False),
        ("input", lambda s: _int(s.input_tokens), True),
        ("cached", lambda s: _int(s.cached_tokens), True),
        ("hit", lambda s: _rate(s.cache_hit_rate), True),
        ("output", lambda s: _int(s.output_tokens), True),
        ("cost $", lambda s: "-" if s.cost is None else f"{s.cost:.4f}", True),
        ("last (UTC)", lambda s: f"{s.last_at:%Y-%m-%d %H:%M}", False),
    ]),
    # Teams: one UTC day (--until, default today) per client key; refusals never reached a node.
    "keys": (lambda conn, f: per_key(conn, f.until or dt.datetime.now(dt.UTC).date()), [
        ("key", lambda s: s.client_key, False),
        ("day", lambda s: str(s.day), False),
        ("requests", lambda s: _int(s.requests), True),
        ("refused", lambda s: _int(s.refused), True),
        ("model", lambda s: _int(s.refused_model), True),
        ("nodes", lambda s: _int(s.refused_nodes), True),
        ("rate", lambda s: _int(s.refused_rate), True),
        ("concurrency", lambda s: _int(s.refused_concurrency), True),
        ("budget", lambda s: _int(s.refused_budget), True),
        ("input", lambda s: _int(s.input_tokens), True),
        ("cached", lambda s: _int(s.cached_tokens), True),
        ("hit", lambda s: _rate(s.cache_hit_rate), True),
        ("output", lambda s: _int(s.output_tokens), True),
        ("total", lambda s: _int(s.total_tokens), True),
        ("cost $", lambda s: f"{s.cost:.4f}", True),
        ("month $", lambda s: f"{s.month_cost:.4f}", True),
        ("limits (used/limit, resets UTC)", lambda s: _limits(getattr(s, "limits", None)), False),
    ]),
}


class KeyRow:
    """A ``store.key_usage.key_report`` row for the keys view: its fields as attributes, limits flattened
    for CSV."""

    def __init__(self, row: dict) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        try:
            return self._row[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict:
        return self._row

    def flat(self) -> dict:
        out = {k: v for k, v in self._row.items() if k != "limits"}
        for limit, v in self._row["limits"].items():
            out |= {f"{limit}_limit": v["limit"], f"{limit}_used": v["used"], f"{limit}_resets_at": v["resets_at"]}
        return out


def _limits(limits: dict | None) -> str:
    if not limits:
        return "-"
    return "; ".join(f"{name} {'-' if v['used'] is None else _num(v['used'])}/{_num(v['limit'])}"
                     + (f" ({v['resets_at'][:16]})" if v["resets_at"] else "") for name, v in limits.items())


def _num(v: float) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    """An aligned plain-text table: text left, numbers right."""
    cells = [[name for name, _, _ in columns]] + [[cell(r) for _, cell, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if right else c.ljust(w)
                       for c, w, (_, _, right) in zip(line, widths, columns, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Any]) -> str:
    dicts = [r.flat() if isinstance(r, KeyRow) else r.as_dict() for r in rows]
    out = io.StringIO()
    if dicts:
        # Rows may differ in their fields (each key its own limits): every field, in order of appearance.
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for d in dicts for k in d)), lineterminator="\n")
        writer.writeheader()
        writer.writerows(dicts)
    return out.getvalue()


def parse_day(text: str, today: dt.date | None = None) -> dt.date:
    """``YYYY-MM-DD``, ``today`` or ``yesterday`` (UTC)."""
    try:
        return day_of(text, today or dt.datetime.now(dt.UTC).date())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, today or yesterday, got {text!r}") from None


def open_readonly(url: str) -> sa.Engine:
    """An engine on an existing, up-to-date stats database; raises StatsError saying what is wrong.

    Reading stats never creates a database or migrates one: that is the relay's job.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StatsError(f"not a database URL: {url!r} (e.g. {DEFAULT_DB})") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path in ("", ":memory:"):
            raise StatsError("an in-memory SQLite database has no stats: give the relay's database file")
        if not Path(path).expanduser().is_file():
            raise StatsError(f"no database file {path} (start the relay once, or pass --db / $CODEX_DB)")
    try:
        engine = make_engine(url)
    except ValueError as e:
        raise StatsError(str(e)) from None
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        raise StatsError(f"cannot open database {shown}: {error_summary(e)}") from None
    if revision != head_revision():
        engine.dispose()
        found = f"schema revision {revision}" if revision else "no codex-relay tables"
        raise StatsError(f"database {shown} has {found}; start the relay (or `alembic upgrade head`) to upgrade it")
    return engine


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="stats", description="Stats of the calls the relay recorded: per node, model, source, day, "
        "hour (with TTFB and duration percentiles), the sessions with the most input, or the latest calls. "
        "Days are UTC; --since and --until "
        "are inclusive.")
    parser.add_argument("view", nargs="?", default="nodes", choices=list(VIEWS), help="what to show (default nodes)")
    parser.add_argument("--since", type=parse_day, metavar="DAY", help="first day: YYYY-MM-DD, today or yesterday")
    parser.add_argument("--until", type=parse_day, metavar="DAY", help="last day, included")
    parser.add_argument("--source", help="only calls with this source tag")
    parser.add_argument("--node", help="only calls served by this node id")
    parser.add_argument("--model", help="only calls of this model")
    parser.add_argument("--limit", type=int, default=50,
                        help="rows of the recent and sessions views (default %(default)s)")
    parser.add_argument("--keys", metavar="FILE", help="keys view: the relay's TOML keys file (codex_client_keys), "
                        "to show each key's limits with their use and reset time (default: the keys in the "
                        "database, when it has any)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    add_db_option(parser)
    args = parser.parse_args(argv)
    if args.since and args.until and args.since > args.until:
        parser.error(f"--since {args.since} is after --until {args.until}")
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    specs = None
    if args.keys:
        if args.view != "keys":
            parser.error("--keys goes with the keys view")
        text = toml_file("@" + args.keys.removeprefix("@"))
        if text is None:
            parser.error(f"--keys {args.keys}: not a readable TOML keys file ([[keys]] tables)")
        try:
            specs = {s.name: s for s in parse_keys_toml(text)}
        except ValueError as e:
            parser.error(f"--keys {args.keys}: {e}")
    query, columns = VIEWS[args.view]
    f = Filters(since=args.since, until=args.until, source=args.source, node=args.node, model=args.model)
    try:
        engine = open_readonly(args.db)
        try:
            with engine.connect() as conn:
                rows = query(conn, f, args.limit) if args.view in ("recent", "sessions") else query(conn, f)
                if specs is None and args.view == "keys":  # the keys managed live, revoked ones left out
                    specs = {s.name: s for s in (spec_of(r) for r in load_keys(conn) if r.revoked_at is None)} or None
                if specs is not None:
                    day = args.until or dt.datetime.now(dt.UTC).date()
                    uses = uses_of(conn, specs.values(), as_of(day))
                    rows = [KeyRow(r) for r in key_report(rows, specs, day, budget_uses=uses)]
        finally:
            engine.dispose()
    except StatsError as e:
        print(f"stats: {e}", file=sys.stderr)
        return 2
    except sa.exc.SQLAlchemyError as e:
        print(f"stats: database: {error_summary(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif args.csv:
        print(format_csv(rows), end="")
    elif not rows:
        print(f"no calls recorded{' for these filters' if any(dataclasses.astuple(f)) else ''}")
    else:
        print(format_table(rows, columns), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
