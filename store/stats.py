"""Every stats aggregate, in one place: the stats CLI and the admin page both read through here.

SQLAlchemy Core, portable between SQLite and MySQL. The aggregates read ``codex_daily_stats`` (the
writer keeps it per day, source, node and model in the same transaction as the invocation rows), so
a query costs the same over a day or a year; the recent calls read ``codex_invocations`` with range
predicates on ``occurred_at`` that its indexes serve.

Definitions, the same in every view:
- ``failures`` = calls whose status is not ``success`` (failed, truncated, aborted);
  ``health_rate`` = successes / requests;
- ``avg_ttfb_ms`` = mean time to first byte over the calls that have one;
- ``stream_ms_per_token`` = stream time / output tokens over successful streamed calls with output:
  how fast a node generates, independent of answer length;
- ``bytes`` = response bytes sent to clients.

``python -m store.stats [nodes|models|sources|days|recent]`` (``./run.sh stats``) prints them as an
aligned table, ``--json`` or ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa

from store.engine import DEFAULT_DB, current_revision, head_revision, make_engine
from store.nodes import load_nodes
from store.schema import DAILY_COUNTERS, codex_daily_stats, codex_invocations

_inv = codex_invocations.c
_day = codex_daily_stats.c


@dataclass(slots=True)
class Filters:
    """Which calls count: ``since``/``until`` are inclusive UTC days of ``occurred_at``."""

    since: dt.date | None = None
    until: dt.date | None = None
    source: str | None = None
    node: str | None = None
    model: str | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        conds: list[sa.ColumnElement[bool]] = []
        if self.since is not None:
            conds.append(_inv.occurred_at >= dt.datetime.combine(self.since, dt.time()))
        if self.until is not None:
            conds.append(_inv.occurred_at < dt.datetime.combine(self.until + dt.timedelta(days=1), dt.time()))
        for column, value in ((_inv.source, self.source), (_inv.node_id, self.node), (_inv.model, self.model)):
            if value is not None:
                conds.append(column == value)
        return conds

    def daily_where(self) -> list[sa.ColumnElement[bool]]:
        """The same filter on ``codex_daily_stats`` ('' there stands for no node / unknown model)."""
        conds: list[sa.ColumnElement[bool]] = []
        if self.since is not None:
            conds.append(_day.day >= self.since)
        if self.until is not None:
            conds.append(_day.day <= self.until)
        for column, value in ((_day.source, self.source), (_day.node_id, self.node), (_day.model, self.model)):
            if value is not None:
                conds.append(column == value)
        return conds


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date | dt.datetime) else value


@dataclass(slots=True, kw_only=True)
class Metrics:
    """What a group of calls adds up to."""

    requests: int = 0
    successes: int = 0
    failures: int = 0
    input_tokens: int = 0  # cached included (OpenAI convention, see store.records)
    cached_tokens: int = 0
    output_tokens: int = 0  # reasoning included
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    bytes: int = 0
    avg_ttfb_ms: float | None = None
    stream_ms_per_token: float | None = None

    @property
    def health_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types; dates as ISO strings."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["health_rate"] = self.health_rate
        return d


@dataclass(slots=True, kw_only=True)
class ModelStats(Metrics):
    model: str | None


@dataclass(slots=True, kw_only=True)
class SourceStats(Metrics):
    source: str


@dataclass(slots=True, kw_only=True)
class DayStats(Metrics):
    day: str  # YYYY-MM-DD, UTC
    source: str


@dataclass(slots=True, kw_only=True)
class NodeStats(Metrics):
    """A node's calls in the filter window, plus its row in ``nodes`` (config, health, lifetime counters).

    ``node_id`` None groups calls that no node served (monitor mode, no node available); a node id
    without a ``nodes`` row has ``status`` None.
    """

    node_id: str | None
    name: str | None = None
    base_url: str | None = None
    weight: int | None = None
    status: str | None = None  # active | failed | disabled
    api_key_hint: str | None = None  # never the key: its last 4 characters
    last_error: str | None = None
    last_ping_ms: int | None = None
    last_ping_err: str | None = None
    fail_streak: int = 0
    lifetime_requests: int = 0
    lifetime_failures: int = 0
    lifetime_bytes: int = 0
    lifetime_input_tokens: int = 0
    lifetime_cached_tokens: int = 0
    lifetime_output_tokens: int = 0
    lifetime_reasoning_tokens: int = 0
    lifetime_stream_ms: int = 0
    lifetime_ttfb_ms: int = 0  # sums: divide by lifetime_requests for the mean


@dataclass(slots=True)
class Invocation:
    """One recorded call, without its bodies."""

    id: int
    invoke_id: str
    occurred_at: dt.datetime
    source: str
    node_id: str | None
    model: str | None
    endpoint: str | None
    api_format: str | None
    stream: bool | None
    status: str | None
    http_status: int | None
    error_message: str | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost: float | None
    ttfb_ms: int | None
    stream_ms: int | None
    duration_ms: int | None
    bytes: int
    attempts: int | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def mask_key(key: str | None) -> str | None:
    """``…abcd``: enough to tell keys apart, useless to anyone who reads it. Short keys show nothing."""
    if not key:
        return None
    return "…" + key[-4:] if len(key) > 8 else "…"


# -- queries ---------------------------------------------------------------------------------------
def _metric_columns() -> list[sa.ColumnElement]:
    return [sa.func.sum(_day[name]).label(name) for name in DAILY_COUNTERS]


def _metrics(row: sa.Row) -> dict[str, Any]:
    """Metrics fields from a row of ``_metric_columns`` (MySQL sums come back as Decimal or NULL)."""
    m = row._mapping
    requests, successes = int(m["requests"] or 0), int(m["successes"] or 0)
    ttfb_n, stream_tokens = int(m["ttfb_n"] or 0), int(m["stream_tokens"] or 0)
    return {
        "requests": requests, "successes": successes, "failures": requests - successes,
        **{k: int(m[k] or 0) for k in ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
                                       "total_tokens", "bytes")},
        "cost": float(m["cost"] or 0),
        "avg_ttfb_ms": float(m["ttfb_sum"]) / ttfb_n if ttfb_n else None,
        "stream_ms_per_token": float(m["stream_ms"]) / stream_tokens if stream_tokens else None,
    }


def _grouped(conn: sa.Connection, f: Filters, *keys: sa.ColumnElement) -> list[sa.Row]:
    query = sa.select(*keys, *_metric_columns()).where(*f.daily_where()).group_by(*keys)
    return list(conn.execute(query))


def per_model(conn: sa.Connection, f: Filters) -> list[ModelStats]:
    """Per model (None: calls whose model is unknown), most requests first."""
    rows = [ModelStats(model=r.model or None, **_metrics(r)) for r in _grouped(conn, f, _day.model)]
    return sorted(rows, key=lambda s: (-s.requests, s.model or ""))


def per_source(conn: sa.Connection, f: Filters) -> list[SourceStats]:
    """Per ``source`` tag, by name."""
    rows = [SourceStats(source=r.source, **_metrics(r)) for r in _grouped(conn, f, _day.source)]
    return sorted(rows, key=lambda s: s.source)


def per_day(conn: sa.Connection, f: Filters) -> list[DayStats]:
    """Per UTC day and source, oldest day first; days without calls are absent."""
    out = []
    for r in _grouped(conn, f, _day.day, _day.source):
        out.append(DayStats(day=r.day.isoformat(), source=r.source, **_metrics(r)))
    return sorted(out, key=lambda s: (s.day, s.source))


def _status(row: sa.Row) -> str:
    return "disabled" if row.disabled else "failed" if row.failed else "active"


def per_node(conn: sa.Connection, f: Filters) -> list[NodeStats]:
    """Every node in ``nodes`` (even without calls in the window) and every node id the calls name,
    by id; the calls no node served last."""
    calls = {r.node_id or None: _metrics(r) for r in _grouped(conn, f, _day.node_id)}
    rows = {r.id: r for r in load_nodes(conn) if f.node is None or r.id == f.node}
    out = []
    for node_id in sorted(rows.keys() | {k for k in calls if k is not None}):
        stats = NodeStats(node_id=node_id, **calls.get(node_id, {}))
        row = rows.get(node_id)
        if row is not None:
            _fill_node(stats, row)
        out.append(stats)
    if None in calls:
        out.append(NodeStats(node_id=None, **calls[None]))
    return out


def _fill_node(s: NodeStats, row: sa.Row) -> None:
    s.name, s.base_url, s.weight, s.status = row.name, row.base_url, row.weight, _status(row)
    s.api_key_hint = mask_key(row.api_key)
    s.last_error, s.last_ping_ms, s.last_ping_err = row.last_error, row.last_ping_ms, row.last_ping_err
    s.fail_streak = row.fail_streak
    s.lifetime_requests, s.lifetime_failures, s.lifetime_bytes = row.requests, row.fail_count, row.total_bytes
    s.lifetime_input_tokens, s.lifetime_cached_tokens = row.total_input, row.total_cached
    s.lifetime_output_tokens, s.lifetime_reasoning_tokens = row.total_output, row.total_reasoning
    s.lifetime_stream_ms, s.lifetime_ttfb_ms = row.stream_dur_ms, row.first_byte_ms


def recent_invocations(conn: sa.Connection, f: Filters, limit: int = 50) -> list[Invocation]:
    """The latest ``limit`` calls, newest first."""
    query = (sa.select(_inv.id, _inv.invoke_id, _inv.occurred_at, _inv.source, _inv.node_id, _inv.model,
                       _inv.endpoint, _inv.api_format, _inv.stream, _inv.status, _inv.http_status,
                       _inv.error_message, _inv.input_tokens, _inv.cache_input_tokens, _inv.output_tokens,
                       _inv.reasoning_tokens, _inv.total_tokens, _inv.cost, _inv.ttfb_ms, _inv.stream_ms,
                       _inv.duration_ms, _inv.response_bytes, _inv.attempts)
             .where(*f.where()).order_by(_inv.occurred_at.desc(), _inv.id.desc()).limit(limit))
    out = []
    for r in conn.execute(query):
        m = r._mapping
        out.append(Invocation(
            id=r.id, invoke_id=r.invoke_id, occurred_at=r.occurred_at, source=r.source, node_id=r.node_id,
            model=r.model, endpoint=r.endpoint, api_format=r.api_format,
            stream=None if r.stream is None else bool(r.stream), status=r.status, http_status=r.http_status,
            error_message=r.error_message, input_tokens=m["input_tokens"] or 0,
            cached_tokens=m["cache_input_tokens"] or 0, output_tokens=m["output_tokens"] or 0,
            reasoning_tokens=m["reasoning_tokens"] or 0, total_tokens=m["total_tokens"] or 0, cost=r.cost,
            ttfb_ms=r.ttfb_ms, stream_ms=r.stream_ms, duration_ms=r.duration_ms, bytes=r.response_bytes or 0,
            attempts=r.attempts))
    return out


# -- the CLI ---------------------------------------------------------------------------------------
class StatsError(Exception):
    """Why the CLI cannot answer, worded for the user."""


def _int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _text(v: str | None, width: int = 40) -> str:
    if not v:
        return "-"
    v = " ".join(v.split())
    return v if len(v) <= width else v[:width - 1] + "…"


# One table per view: (heading, cell of a row, right-aligned). JSON and CSV carry every field.
Column = tuple[str, Callable[[Any], str], bool]
_METRIC_COLUMNS: list[Column] = [
    ("requests", lambda s: _int(s.requests), True),
    ("failures", lambda s: _int(s.failures), True),
    ("health", lambda s: _rate(s.health_rate), True),
    ("input", lambda s: _int(s.input_tokens), True),
    ("cached", lambda s: _int(s.cached_tokens), True),
    ("output", lambda s: _int(s.output_tokens), True),
    ("reasoning", lambda s: _int(s.reasoning_tokens), True),
    ("cost $", lambda s: f"{s.cost:.4f}", True),
    ("ttfb ms", lambda s: _ms(s.avg_ttfb_ms), True),
]
VIEWS: dict[str, tuple[Callable[..., list], list[Column]]] = {
    "nodes": (per_node, [
        ("node", lambda s: s.node_id or "(no node)", False),
        ("name", lambda s: _text(s.name, 24), False),
        ("status", lambda s: s.status or "-", False),
        ("weight", lambda s: _int(s.weight), True),
        *_METRIC_COLUMNS[:7],
        ("bytes", lambda s: _int(s.bytes), True),
        ("ttfb ms", lambda s: _ms(s.avg_ttfb_ms), True),
        ("ms/token", lambda s: _ms(s.stream_ms_per_token), True),
        ("ping ms", lambda s: _int(s.last_ping_ms), True),
        ("last error", lambda s: _text(s.last_error), False),
    ]),
    "models": (per_model, [("model", lambda s: s.model or "(unknown)", False), *_METRIC_COLUMNS]),
    "sources": (per_source, [("source", lambda s: s.source, False), *_METRIC_COLUMNS]),
    "days": (per_day, [("day", lambda s: s.day, False), ("source", lambda s: s.source, False),
                       *_METRIC_COLUMNS[:7], ("total", lambda s: _int(s.total_tokens), True)]),
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
}


def format_table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    """An aligned plain-text table: text left, numbers right."""
    cells = [[name for name, _, _ in columns]] + [[cell(r) for _, cell, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if right else c.ljust(w)
                       for c, w, (_, _, right) in zip(line, widths, columns, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Any]) -> str:
    dicts = [r.as_dict() for r in rows]
    out = io.StringIO()
    if dicts:
        writer = csv.DictWriter(out, fieldnames=list(dicts[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(dicts)
    return out.getvalue()


def parse_day(text: str, today: dt.date | None = None) -> dt.date:
    """``YYYY-MM-DD``, ``today`` or ``yesterday`` (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    if text == "today":
        return today
    if text == "yesterday":
        return today - dt.timedelta(days=1)
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, today or yesterday, got {text!r}") from None


def open_readonly(url: str) -> sa.Engine:
    """An engine on an existing, up-to-date stats database; raises StatsError saying what is wrong.

    Reading stats never creates a database or migrates one: that is the relay's job.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StatsError(f"not a database URL: {url!r} (e.g. sqlite:///data/codex.db)") from None
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
        raise StatsError(f"cannot open database {shown}: {_first_line(e)}") from None
    if revision != head_revision():
        engine.dispose()
        found = f"schema revision {revision}" if revision else "no codex-relay tables"
        raise StatsError(f"database {shown} has {found}; start the relay (or `alembic upgrade head`) to upgrade it")
    return engine


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0] if text else ''}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of this command (argparse would print the usage first).
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="stats", description="Stats of the calls the relay recorded: per node, model, source, day, "
        "or the latest calls. Days are UTC; --since and --until are inclusive.")
    parser.add_argument("view", nargs="?", default="nodes", choices=list(VIEWS), help="what to show (default nodes)")
    parser.add_argument("--since", type=parse_day, metavar="DAY", help="first day: YYYY-MM-DD, today or yesterday")
    parser.add_argument("--until", type=parse_day, metavar="DAY", help="last day, included")
    parser.add_argument("--source", help="only calls with this source tag")
    parser.add_argument("--node", help="only calls served by this node id")
    parser.add_argument("--model", help="only calls of this model")
    parser.add_argument("--limit", type=int, default=50, help="rows of the recent view (default %(default)s)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    parser.add_argument("--db", default=os.environ.get("CODEX_DB", DEFAULT_DB),
                        help="SQLAlchemy URL of the stats database (default: $CODEX_DB or %(default)s)")
    args = parser.parse_args(argv)
    if args.since and args.until and args.since > args.until:
        parser.error(f"--since {args.since} is after --until {args.until}")
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    query, columns = VIEWS[args.view]
    f = Filters(since=args.since, until=args.until, source=args.source, node=args.node, model=args.model)
    try:
        engine = open_readonly(args.db)
        try:
            with engine.connect() as conn:
                rows = query(conn, f, args.limit) if args.view == "recent" else query(conn, f)
        finally:
            engine.dispose()
    except StatsError as e:
        print(f"stats: {e}", file=sys.stderr)
        return 2
    except sa.exc.SQLAlchemyError as e:
        print(f"stats: database: {_first_line(e)}", file=sys.stderr)
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
