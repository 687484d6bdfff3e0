"""Every stats aggregate, in one place: the stats CLI and the admin page both read through here.

SQLAlchemy Core, portable between SQLite and MySQL. The aggregates read ``codex_daily_stats`` (the
writer keeps it per day, source, node and model in the same transaction as the invocation rows), so
a query costs the same over a day or a year; the recent calls read ``codex_invocations`` with range
predicates on ``occurred_at`` that its indexes serve.

Definitions, the same in every view:
- ``requests`` = calls, one per invocation row (a call retried on other nodes is one request, of the
  node that served it); ``requests`` = ``successes`` + ``failures`` + ``aborted`` + ``refused``:
  ``failures`` = calls that failed through the node's fault (HTTP 5xx/401/403/429, an error event,
  a cut stream, a connect error or timeout: what the node's ``fail_count`` counts of them);
  ``aborted`` = calls the client gave up on; ``refused`` = the other errors, nobody's failure but
  the request's (a 4xx for the client's request, the relay's own 503 when no node is available);
  ``health_rate`` = successes / requests;
- ``cost`` = the estimated cost of the calls whose model has a price, None when none has (not 0:
  unknown); ``unpriced`` = calls without a price, not in ``cost``;
- ``avg_ttfb_ms`` = mean time to first byte over the calls that have one;
- ``stream_ms_per_token`` = stream time / output tokens over successful streamed calls with output:
  how fast a node generates, independent of answer length;
- ``bytes`` = response bytes sent to clients;
- ``cache_hit_rate`` = cached ÷ input tokens (input includes cached, so 0–1): how much of the prompts a
  node's prompt cache served; None without input tokens.

The command line over these queries is ``store.cli.stats``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS, percentile
from store.masking import mask_secret
from store.nodes import config_of, load_nodes, owned_fields
from store.schema import (
    DAILY_COUNTERS,
    DURATION_COLUMNS,
    TTFB_COLUMNS,
    codex_daily_stats,
    codex_hourly_stats,
    codex_invocations,
)

_inv = codex_invocations.c
_day = codex_daily_stats.c
_hour = codex_hourly_stats.c


@dataclass(slots=True)
class Filters:
    """Which calls count: ``since``/``until`` are inclusive UTC days of ``occurred_at``."""

    since: dt.date | None = None
    until: dt.date | None = None
    source: str | None = None
    node: str | None = None
    model: str | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        return self._on(_inv, _inv.occurred_at, _midnight)

    def daily_where(self) -> list[sa.ColumnElement[bool]]:
        """The same filter on ``codex_daily_stats`` ('' there stands for no node / unknown model)."""
        return self._on(_day, _day.day, lambda day: day)

    def hourly_where(self) -> list[sa.ColumnElement[bool]]:
        """The same filter on ``codex_hourly_stats``."""
        return self._on(_hour, _hour.hour, _midnight)

    def _on(self, columns: sa.ColumnCollection, time: sa.ColumnElement,
            at: Callable[[dt.date], dt.date]) -> list[sa.ColumnElement[bool]]:
        """These filters on a table with source, node_id and model columns whose ``time`` column holds ``at(day)``
        values: the days are [since, until + 1 day)."""
        conds: list[sa.ColumnElement[bool]] = []
        if self.since is not None:
            conds.append(time >= at(self.since))
        if self.until is not None:
            conds.append(time < at(self.until + dt.timedelta(days=1)))
        for column, value in ((columns.source, self.source), (columns.node_id, self.node),
                              (columns.model, self.model)):
            if value is not None:
                conds.append(column == value)
        return conds


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time())


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date | dt.datetime) else value


@dataclass(slots=True, kw_only=True)
class Metrics:
    """What a group of calls adds up to."""

    requests: int = 0
    successes: int = 0
    failures: int = 0  # the node's fault
    aborted: int = 0  # by the client
    input_tokens: int = 0  # cached included (OpenAI convention, see store.records)
    cached_tokens: int = 0
    output_tokens: int = 0  # reasoning included
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None  # None: no call had a price
    unpriced: int = 0  # calls without a price, not in cost
    bytes: int = 0
    avg_ttfb_ms: float | None = None
    stream_ms_per_token: float | None = None

    @property
    def refused(self) -> int:
        """Calls that ended in an error that is neither the node's fault nor an abort."""
        return self.requests - self.successes - self.failures - self.aborted

    @property
    def health_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    @property
    def cache_hit_rate(self) -> float | None:
        return hit_rate(self.cached_tokens, self.input_tokens)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types; dates as ISO strings."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["refused"], d["health_rate"], d["cache_hit_rate"] = self.refused, self.health_rate, self.cache_hit_rate
        return d


def hit_rate(cached: int, input_tokens: int) -> float | None:
    """The prompt-cache hit rate: cached ÷ input tokens; None without input."""
    return cached / input_tokens if input_tokens else None


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
class HourStats(Metrics):
    """One UTC hour (its start, ``YYYY-MM-DD HH:00``) with its latency percentiles, each read from the fixed
    bucket (``store.histogram``) that holds it, within 10% of the exact value; None without calls that have one."""

    hour: str
    ttfb_p50_ms: int | None = None
    ttfb_p95_ms: int | None = None
    ttfb_p99_ms: int | None = None
    duration_p50_ms: int | None = None
    duration_p95_ms: int | None = None
    duration_p99_ms: int | None = None


@dataclass(slots=True, kw_only=True)
class Overview(Metrics):
    """One UTC day of the whole fleet: the admin page's cards. ``error_rate`` = calls that ended in an error,
    the node's or refused (not the client's aborts), ÷ requests; ``ttfb_p95_ms`` from the hourly rollup."""

    day: str
    ttfb_p95_ms: int | None = None

    @property
    def error_rate(self) -> float | None:
        return (self.failures + self.refused) / self.requests if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        return {**Metrics.as_dict(self), "error_rate": self.error_rate}


@dataclass(slots=True, kw_only=True)
class NodeStats(Metrics):
    """A node's calls in the filter window, plus its row in ``nodes`` (config, health, lifetime counters).

    ``node_id`` None groups calls that no node served (monitor mode, no node available); a node id
    without a ``nodes`` row has ``status`` None.

    The lifetime counters count attempts, not calls: a call retried on another node was also an
    attempt of each node it failed on. ``lifetime_attempts`` = the node's calls + its failed
    attempts retried elsewhere; ``lifetime_failed_attempts`` = its ``failures`` + those retried
    attempts. Without retries they equal its calls and its failures. The other lifetime sums are
    over its calls only.
    """

    node_id: str | None
    name: str | None = None
    base_url: str | None = None
    weight: int | None = None
    status: str | None = None  # active | failed | disabled
    origin: str | None = None  # 'file' or 'admin' (store.schema.nodes)
    api_key_hint: str | None = None  # never the key: store.masking.mask_secret of it
    formats: list[str] | None = None  # what the node serves (store.config); empty: everything
    models: list[str] | None = None
    model_map: dict[str, str] | None = None
    file_fields: list[str] | None = None  # the config fields the nodes file sets (store.nodes): not the page's
    last_error: str | None = None
    last_ping_ms: int | None = None
    last_ping_err: str | None = None
    fail_streak: int = 0
    lifetime_attempts: int = 0  # nodes.requests
    lifetime_failed_attempts: int = 0  # nodes.fail_count
    lifetime_bytes: int = 0
    lifetime_input_tokens: int = 0
    lifetime_cached_tokens: int = 0
    lifetime_output_tokens: int = 0
    lifetime_reasoning_tokens: int = 0
    lifetime_stream_ms: int = 0
    lifetime_ttfb_ms: int = 0  # a sum over its calls with a first byte
    # From the hourly rollup (hours since revision 10), as in HourStats.
    ttfb_p50_ms: int | None = None
    ttfb_p95_ms: int | None = None


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
    client_key: str | None  # the client key's name (None: no client auth)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(slots=True)
class SessionStats:
    """One session's calls (``codex_invocations.session_key``, addon.nodes.sessions): how much of its prompts
    the nodes' caches served, and on how many nodes it ran (more than one: it moved, and paid for it)."""

    session_key: str
    requests: int
    nodes: int  # distinct nodes that served it
    node_id: str | None  # the node of its latest call
    client_key: str | None  # the client key of its latest call
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost: float | None
    first_at: dt.datetime
    last_at: dt.datetime

    @property
    def cache_hit_rate(self) -> float | None:
        return hit_rate(self.cached_tokens, self.input_tokens)

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["cache_hit_rate"] = self.cache_hit_rate
        return d


# -- queries ---------------------------------------------------------------------------------------
def _metric_columns() -> list[sa.ColumnElement]:
    return [sa.func.sum(_day[name]).label(name) for name in DAILY_COUNTERS]


def _metrics(row: sa.Row) -> dict[str, Any]:
    """Metrics fields from a row of ``_metric_columns`` (MySQL sums come back as Decimal or NULL)."""
    m = row._mapping
    requests, priced = int(m["requests"] or 0), int(m["priced"] or 0)
    ttfb_n, stream_tokens = int(m["ttfb_n"] or 0), int(m["stream_tokens"] or 0)
    return {
        **{k: int(m[k] or 0) for k in ("requests", "successes", "failures", "aborted", "input_tokens",
                                       "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens",
                                       "bytes")},
        "cost": float(m["cost"] or 0) if priced else None, "unpriced": requests - priced,
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


def _hour_sums(names: tuple[str, ...]) -> list[sa.ColumnElement]:
    return [sa.func.sum(_hour[name]).label(name) for name in names]


def _percentiles(row: sa.Row, prefix: str, names: tuple[str, ...], bounds: tuple[int, ...],
                 qs: tuple[float, ...]) -> dict[str, int | None]:
    counts = [int(row._mapping[name] or 0) for name in names]
    return {f"{prefix}_p{round(q * 100)}_ms": percentile(bounds, counts, q) for q in qs}


def per_hour(conn: sa.Connection, f: Filters) -> list[HourStats]:
    """Per UTC hour (all sources, nodes and models the filter lets through), oldest first; hours
    without calls are absent, and so are the hours before the hourly rollup existed."""
    keys = (_hour.hour,)
    query = (sa.select(*keys, *_hour_sums(DAILY_COUNTERS + TTFB_COLUMNS + DURATION_COLUMNS))
             .where(*f.hourly_where()).group_by(*keys).order_by(*keys))
    return [_hour_stats(r) for r in conn.execute(query)]


def _hour_stats(r: sa.Row) -> HourStats:
    qs = (0.5, 0.95, 0.99)
    # Keyword names built at run time: typed Any, as mypy checks a ** dict's values against every field.
    ttfb: dict[str, Any] = _percentiles(r, "ttfb", TTFB_COLUMNS, TTFB_BUCKETS_MS, qs)
    duration: dict[str, Any] = _percentiles(r, "duration", DURATION_COLUMNS, DURATION_BUCKETS_MS, qs)
    return HourStats(hour=f"{r.hour:%Y-%m-%d %H:00}", **_metrics(r), **ttfb, **duration)


def overview(conn: sa.Connection, day: dt.date) -> Overview:
    """The fleet's ``day`` (UTC) from the rollups every relay writes to."""
    f = Filters(since=day, until=day)
    (sums,) = _grouped(conn, f)  # no group: one row, of NULLs without calls
    ttfb = conn.execute(sa.select(*_hour_sums(TTFB_COLUMNS)).where(*f.hourly_where())).one()
    p95 = _percentiles(ttfb, "ttfb", TTFB_COLUMNS, TTFB_BUCKETS_MS, (0.95,))["ttfb_p95_ms"]
    return Overview(day=day.isoformat(), **_metrics(sums), ttfb_p95_ms=p95)


def _node_ttfb_percentiles(conn: sa.Connection, f: Filters) -> dict[str | None, dict[str, int | None]]:
    query = (sa.select(_hour.node_id, *_hour_sums(TTFB_COLUMNS)).where(*f.hourly_where())
             .group_by(_hour.node_id))
    return {r.node_id or None: _percentiles(r, "ttfb", TTFB_COLUMNS, TTFB_BUCKETS_MS, (0.5, 0.95))
            for r in conn.execute(query)}


def per_node(conn: sa.Connection, f: Filters) -> list[NodeStats]:
    """Every node in ``nodes`` (even without calls in the window) and every node id the calls name,
    by id; the calls no node served last."""
    calls = {r.node_id or None: _metrics(r) for r in _grouped(conn, f, _day.node_id)}
    for node_id, ps in _node_ttfb_percentiles(conn, f).items():
        if node_id in calls:
            calls[node_id].update(ps)
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
    s.name, s.base_url, s.weight, s.status, s.origin = row.name, row.base_url, row.weight, _status(row), row.origin
    s.api_key_hint = mask_secret(row.api_key) if row.api_key else None
    s.last_error, s.last_ping_ms, s.last_ping_err = row.last_error, row.last_ping_ms, row.last_ping_err
    s.fail_streak = row.fail_streak
    config = config_of(row)
    s.formats, s.models, s.model_map = list(config.formats), list(config.models), config.model_map
    s.file_fields = owned_fields(row.file_fields)
    s.lifetime_attempts, s.lifetime_failed_attempts, s.lifetime_bytes = row.requests, row.fail_count, row.total_bytes
    s.lifetime_input_tokens, s.lifetime_cached_tokens = row.total_input, row.total_cached
    s.lifetime_output_tokens, s.lifetime_reasoning_tokens = row.total_output, row.total_reasoning
    s.lifetime_stream_ms, s.lifetime_ttfb_ms = row.stream_dur_ms, row.first_byte_ms


def recent_invocations(conn: sa.Connection, f: Filters, limit: int = 50, key: str | None = None) -> list[Invocation]:
    """The latest ``limit`` calls, newest first; ``key``: those of that client key only."""
    by_key = [] if key is None else [_inv.client_key == key]
    query = (sa.select(_inv.id, _inv.invoke_id, _inv.occurred_at, _inv.source, _inv.node_id, _inv.model,
                       _inv.endpoint, _inv.api_format, _inv.stream, _inv.status, _inv.http_status,
                       _inv.error_message, _inv.input_tokens, _inv.cache_input_tokens.label("cached_tokens"),
                       _inv.output_tokens, _inv.reasoning_tokens, _inv.total_tokens, _inv.cost, _inv.ttfb_ms,
                       _inv.stream_ms, _inv.duration_ms, _inv.response_bytes, _inv.attempts, _inv.client_key)
             .where(*f.where(), *by_key).order_by(_inv.occurred_at.desc(), _inv.id.desc()).limit(limit))
    out = []
    for r in conn.execute(query):
        m = r._mapping
        out.append(Invocation(
            id=r.id, invoke_id=r.invoke_id, occurred_at=r.occurred_at, source=r.source, node_id=r.node_id,
            model=r.model, endpoint=r.endpoint, api_format=r.api_format,
            stream=None if r.stream is None else bool(r.stream), status=r.status, http_status=r.http_status,
            error_message=r.error_message, input_tokens=m["input_tokens"] or 0,
            cached_tokens=m["cached_tokens"] or 0, output_tokens=m["output_tokens"] or 0,
            reasoning_tokens=m["reasoning_tokens"] or 0, total_tokens=m["total_tokens"] or 0, cost=r.cost,
            ttfb_ms=r.ttfb_ms, stream_ms=r.stream_ms, duration_ms=r.duration_ms, bytes=r.response_bytes or 0,
            attempts=r.attempts, client_key=r.client_key))
    return out


def per_session(conn: sa.Connection, f: Filters, limit: int = 50) -> list[SessionStats]:
    """The ``limit`` sessions with the most input tokens in the filter window (the ones whose cache matters),
    from ``codex_invocations``: calls that named no session, and calls recorded before revision 14, are in
    no session. Reads the window's rows (``occurred_at`` index): give ``--since`` on a large table."""
    inp = sa.func.sum(_inv.input_tokens).label("input_tokens")
    query = (sa.select(_inv.session_key, sa.func.count().label("requests"),
                       sa.func.count(sa.distinct(_inv.node_id)).label("nodes"), inp,
                       sa.func.sum(_inv.cache_input_tokens).label("cached_tokens"),
                       sa.func.sum(_inv.output_tokens).label("output_tokens"),
                       sa.func.sum(_inv.cost).label("cost"), sa.func.max(_inv.id).label("last_id"),
                       sa.func.min(_inv.occurred_at).label("first_at"), sa.func.max(_inv.occurred_at).label("last_at"))
             .where(*f.where(), _inv.session_key.is_not(None)).group_by(_inv.session_key)
             .order_by(inp.desc(), _inv.session_key).limit(limit))
    groups = list(conn.execute(query))
    latest = {r.id: r for r in conn.execute(sa.select(_inv.id, _inv.node_id, _inv.client_key)
                                            .where(_inv.id.in_([g.last_id for g in groups])))} if groups else {}
    out = []
    for g in groups:
        last = latest.get(g.last_id)
        out.append(SessionStats(
            session_key=g.session_key, requests=int(g.requests), nodes=int(g.nodes),
            node_id=last.node_id if last else None, client_key=last.client_key if last else None,
            input_tokens=int(g.input_tokens or 0), cached_tokens=int(g.cached_tokens or 0),
            output_tokens=int(g.output_tokens or 0), cost=None if g.cost is None else float(g.cost),
            first_at=g.first_at, last_at=g.last_at))
    return out
