"""What a call record adds to each rollup, declared once: the writer's upserts (``store.write.batch``) and
the Prometheus counters (``addon.observe.metrics``) add up exactly what ``COUNTERS`` and ``DISTRIBUTIONS`` say.

A counter is one line: its name, its value for a call (the rule), and the targets it feeds —

- ``DAY``, ``HOUR``: ``codex_daily_stats`` and ``codex_hourly_stats``, per period, source, node and model;
- ``KEY``: ``client_key_usage``, per UTC day and client key (calls that named a key);
- ``SPAN``: ``client_key_spans``, per client key, model (the one the client asked for) and UTC minute and day:
  what the plan-shaped budgets count (``store.budgets``);
- ``node``: its column in ``nodes``, the node's lifetime row (calls served by a node);
- ``metric``: a Prometheus counter per node (``direct`` for calls no node served) and per client key name,
  optionally by model (folded: ``addon.observe.modelfold``) and HTTP status class.

The rollup columns (``DAY``, ``HOUR``, ``KEY``) carry the counter's own name; a new one also needs its
column, added by an Alembic revision. Every call has one ``outcome`` (the one success/failure rule);
a failed attempt retried on another node (``NodeStateUpdate.failed_attempt``) is an attempt, not a
call: it adds ``attempt`` to the node and Prometheus targets of the counters that declare one.

Token names follow ``store.records.Usage`` (``cached_tokens``: the cached part of the input; the
columns ``codex_invocations.cache_input_tokens`` and ``nodes.total_cached`` keep their old names).
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from store.histogram import (
    DURATION_BUCKETS_MS,
    DURATION_METRIC_BUCKETS_MS,
    TTFB_BUCKETS_MS,
    TTFB_METRIC_BUCKETS_MS,
    bucket_index,
)
from store.records import InvocationRecord
from store.schema import DURATION_COLUMNS, TTFB_COLUMNS

SUCCESS, FAILURE, ABORTED, REFUSED = "success", "failure", "aborted", "refused"
RETRIED = "retried"  # the failure kind of an attempt the client never saw


def outcome(r: InvocationRecord) -> str:
    """How a call ended, for every rollup: ``success``; ``failure``, the node's fault (what its
    ``fail_count`` and breaker count); ``aborted`` by the client; else ``refused`` (a client error, the
    relay's own 503: nobody's failure but the request's)."""
    if r.status == "success":
        return SUCCESS
    if r.node_failure:
        return FAILURE
    return ABORTED if r.status == "aborted" else REFUSED


def _timed(r: InvocationRecord) -> bool:
    """A call that measures generation speed: a successful stream with output and a stream time."""
    return r.stream and r.stream_ms is not None and r.usage.output_tokens > 0 and outcome(r) == SUCCESS


class To(enum.Flag):
    """The rollups whose column is the counter's name."""

    NONE = 0
    DAY = enum.auto()
    HOUR = enum.auto()
    KEY = enum.auto()
    SPAN = enum.auto()


DAY, HOUR, KEY, SPAN = To.DAY, To.HOUR, To.KEY, To.SPAN
PERIODS = DAY | HOUR
ALL = PERIODS | KEY


@dataclass(frozen=True, slots=True)
class Metric:
    """A Prometheus counter: ``codex_node_<family>`` labelled by node and, if ``per_client``,
    ``codex_client_<family>`` by client key name; with a ``kind`` label when ``kind`` is given or
    ``by_status`` (the kind is then the call's status, ``retried`` for a failed attempt), a ``model`` label
    when ``by_model`` and a ``code`` label (``status_class``) when ``by_code``. A counter with an ``attempt``
    has neither of the last two: an attempt names no model and told the client nothing."""

    family: str
    kind: str | None = None
    per_client: bool = True
    by_status: bool = False
    by_model: bool = False
    by_code: bool = False


def status_class(r: InvocationRecord) -> str:
    """The ``code`` label: the class of the HTTP status the client got (``2xx`` … ``5xx``), ``none`` without one."""
    return f"{r.http_status // 100}xx" if r.http_status else "none"


@dataclass(frozen=True, slots=True)
class Counter:
    """One line of ``COUNTERS``."""

    name: str  # its column in the rollups of ``to``
    value: Callable[[InvocationRecord], Any]  # its value for one call: a number (a bool counts 1)
    to: To = To.NONE
    node: str | None = None  # its column in ``nodes``
    metric: Metric | None = None
    attempt: int = 0  # what a failed attempt adds to its node and Prometheus targets


def _usage(name: str) -> Callable[[InvocationRecord], int]:
    return operator.attrgetter(f"usage.{name}")


COUNTERS: tuple[Counter, ...] = (
    #       name, value of a call                                rollups  nodes column     Prometheus
    Counter("requests", lambda r: 1,                           ALL,     "requests",      Metric("requests"),
            attempt=1),
    Counter("successes", lambda r: outcome(r) == SUCCESS,      PERIODS),
    Counter("failures", lambda r: outcome(r) == FAILURE,       PERIODS, "fail_count",
            Metric("failures", per_client=False, by_status=True), attempt=1),
    Counter("aborted", lambda r: outcome(r) == ABORTED,        PERIODS),
    Counter("input_tokens", _usage("input_tokens"),            ALL,     "total_input",   Metric("tokens", "input")),
    Counter("cached_tokens", _usage("cached_tokens"),          ALL,     "total_cached",  Metric("tokens", "cached")),
    Counter("output_tokens", _usage("output_tokens"),          ALL,     "total_output",  Metric("tokens", "output")),
    Counter("reasoning_tokens", _usage("reasoning_tokens"),    PERIODS, "total_reasoning",
            Metric("tokens", "reasoning")),
    Counter("total_tokens", _usage("total_tokens"),            ALL | SPAN),
    Counter("cost", lambda r: r.cost or 0.0,                   ALL | SPAN, None,     # an unpriced call adds 0 ...
            Metric("cost_usd", by_model=True)),
    Counter("priced", lambda r: r.cost is not None,            PERIODS),  # ... and is not priced
    Counter("bytes", operator.attrgetter("response_bytes"),    PERIODS, "total_bytes"),
    Counter("ttfb_sum", lambda r: r.ttfb_ms or 0,              PERIODS, "first_byte_ms"),
    Counter("ttfb_n", lambda r: r.ttfb_ms is not None,         PERIODS),
    Counter("stream_ms", lambda r: r.stream_ms if _timed(r) else 0,                PERIODS),
    Counter("stream_tokens", lambda r: r.usage.output_tokens if _timed(r) else 0,  PERIODS),
    Counter("stream_dur_ms", lambda r: r.stream_ms or 0,       To.NONE, "stream_dur_ms"),  # every call's stream
    Counter("duration_sum", lambda r: r.duration_ms or 0,      HOUR),
    Counter("duration_n", lambda r: r.duration_ms is not None, HOUR),
    Counter("calls", lambda r: 1,                              To.NONE, None,
            Metric("calls", by_model=True, by_code=True)),  # requests less retried attempts, by model and answer
)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A latency counted per fixed bucket (``store.histogram``): into the hour's bucket ``columns`` (upper
    ``bounds``) and the per-node Prometheus histogram ``metric`` (in seconds, coarser ``metric_bounds``).
    Calls without one count in neither."""

    value: Callable[[InvocationRecord], int | None]
    bounds: tuple[int, ...]
    columns: tuple[str, ...]
    metric: str
    metric_bounds: tuple[int, ...]


DISTRIBUTIONS: tuple[Distribution, ...] = (
    Distribution(operator.attrgetter("ttfb_ms"), TTFB_BUCKETS_MS, TTFB_COLUMNS, "codex_node_ttfb_seconds",
                 TTFB_METRIC_BUCKETS_MS),
    Distribution(operator.attrgetter("duration_ms"), DURATION_BUCKETS_MS, DURATION_COLUMNS,
                 "codex_node_duration_seconds", DURATION_METRIC_BUCKETS_MS),
)


class _Target:
    """The columns of one target and which of a call's ``values`` go in them: every call's values are
    computed once and summed per row in C, where adding them up call by call in Python cost more than the
    rest of the rollups."""

    def __init__(self, keys: tuple[str, ...], columns: tuple[tuple[str, int], ...]) -> None:
        self.columns = tuple(name for name, _ in columns)  # what its upsert increments
        self.names = (*keys, *self.columns)  # of a row
        indexes = [i for _, i in columns]
        self._pick = operator.itemgetter(*indexes) if len(indexes) > 1 else lambda v: (v[indexes[0]],)

    def sums(self, calls: list[Sequence[Any]]) -> tuple[Any, ...]:
        """The column sums of ``calls`` (each call's ``values``), in ``columns`` order."""
        return self._pick(list(map(sum, zip(*calls, strict=True))))

    def row(self, key: tuple, calls: list[Sequence[Any]]) -> dict[str, Any]:
        """A row of its upsert: ``key``, then the sums of ``calls``."""
        return dict(zip(self.names, (*key, *self.sums(calls)), strict=True))


_VALUES = tuple(c.value for c in COUNTERS)
_BUCKET_COLUMNS = tuple(col for d in DISTRIBUTIONS for col in d.columns)
_BUCKETS = tuple((d, sum(len(e.columns) for e in DISTRIBUTIONS[:i])) for i, d in enumerate(DISTRIBUTIONS))
_DAY = _Target(("day", "source", "node_id", "model"),
               tuple((c.name, i) for i, c in enumerate(COUNTERS) if DAY in c.to))
_HOUR = _Target(("hour", "source", "node_id", "model"),
                tuple((c.name, i) for i, c in enumerate(COUNTERS) if HOUR in c.to))
# Each distribution's buckets as (first index in _BUCKET_COLUMNS, count); spans of them are sent in steps of
# _SPAN_STEP buckets, so a batch's span is one of a few statements (each built once: store.upsert).
_SLICES = tuple((first, len(d.columns)) for d, first in _BUCKETS)
_SPAN_STEP = 16
_KEY = _Target(("day", "client_key"), tuple((c.name, i) for i, c in enumerate(COUNTERS) if KEY in c.to))
_SPAN = _Target(("client_key", "width", "start", "model"),
                tuple((c.name, i) for i, c in enumerate(COUNTERS) if SPAN in c.to))
_NODE = _Target((), tuple((c.node, i) for i, c in enumerate(COUNTERS) if c.node))
_NODE_ATTEMPT = tuple((c.node, c.attempt) for c in COUNTERS if c.node and c.attempt)

# What each upsert increments.
DAY_COLUMNS = _DAY.columns
HOUR_COLUMNS = (*_HOUR.columns, *_BUCKET_COLUMNS)
KEY_COLUMNS = _KEY.columns
SPAN_COLUMNS = _SPAN.columns
# The widths of ``client_key_spans``' buckets, in minutes.
MINUTE, DAY_MINUTES = 1, 1440
NODE_COLUMNS = _NODE.columns


def values(r: InvocationRecord) -> list[Any]:
    """Every counter's value for ``r``, in ``COUNTERS`` order."""
    return [value(r) for value in _VALUES]


def span_starts(t: dt.datetime) -> tuple[tuple[int, dt.datetime], tuple[int, dt.datetime]]:
    """The ``client_key_spans`` buckets (width, start) ``t`` falls in: its minute and its day."""
    return (MINUTE, t.replace(second=0, microsecond=0)), (DAY_MINUTES, t.replace(hour=0, minute=0, second=0,
                                                                                  microsecond=0))


def hour_of(t: dt.datetime) -> dt.datetime:
    """The start of ``t``'s hour (naive UTC, as stored)."""
    return t.replace(minute=0, second=0, microsecond=0)


class Sums:
    """A batch's calls added up per row of the day, hour and key rollups: the rows their upserts add."""

    def __init__(self) -> None:
        # Per row key, the values of its calls (summed by ``_Target.row``).
        self._day: dict[tuple, list[Sequence[Any]]] = {}
        self._hour: dict[tuple, list[Sequence[Any]]] = {}
        self._key: dict[tuple, list[Sequence[Any]]] = {}
        self._span: dict[tuple, list[Sequence[Any]]] = {}
        self._buckets: dict[tuple, list[int]] = {}  # per hour row, its calls per latency bucket

    def add(self, r: InvocationRecord, row: dict[str, Any], vals: Sequence[Any]) -> None:
        """Add call ``r``, stored as ``row`` (its clipped model and key name are the rollups' keys), whose
        counter values are ``vals``."""
        at = row["occurred_at"]
        day, group = at.date(), (row["source"], row["node_id"] or "", row["model"] or "")  # '': none, unknown
        self._day.setdefault((day, *group), []).append(vals)
        hour = (hour_of(at), *group)
        self._hour.setdefault(hour, []).append(vals)
        buckets = self._buckets.setdefault(hour, [0] * len(_BUCKET_COLUMNS))
        for d, first in _BUCKETS:
            ms = d.value(r)
            if ms is not None:
                buckets[first + bucket_index(d.bounds, ms)] += 1
        if row["client_key"]:
            self._key.setdefault((day, row["client_key"]), []).append(vals)
            model = row["requested_model"] or row["model"] or ""  # as admission saw it: the client's name
            for width, start in span_starts(at):
                self._span.setdefault((row["client_key"], width, start, model), []).append(vals)

    # Sorted by key: relays upserting the same rows lock them in one order (no deadlock).
    def day(self) -> list[dict[str, Any]]:
        return [_DAY.row(k, self._day[k]) for k in sorted(self._day)]

    def hour(self) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
        """The hour rows and the columns their upsert increments: the counters, and of each distribution's
        buckets only the span some row of the batch counts in (widened to ``_SPAN_STEP``), the same for every
        row: a row sends its zeros within the span, none outside it, so a batch's calls, which fall in a few
        buckets, do not send and add every bucket of 120 (most of the writer's cost per hour row)."""
        keys = sorted(self._hour)
        picked: list[int] = []
        for first, n in _SLICES:
            used = [i for i in range(first, first + n) if any(self._buckets[k][i] for k in keys)]
            if used:
                lo = first + (used[0] - first) // _SPAN_STEP * _SPAN_STEP
                hi = lo + math.ceil((used[-1] + 1 - lo) / _SPAN_STEP) * _SPAN_STEP
                picked.extend(range(lo, min(first + n, hi)))
        names = tuple(_BUCKET_COLUMNS[i] for i in picked)
        rows = []
        for k in keys:
            row = _HOUR.row(k, self._hour[k])
            buckets = self._buckets[k]
            row.update(zip(names, (buckets[i] for i in picked), strict=True))
            rows.append(row)
        return rows, (*_HOUR.columns, *names)

    def key(self) -> list[dict[str, Any]]:
        return [_KEY.row(k, self._key[k]) for k in sorted(self._key)]

    def span(self) -> list[dict[str, Any]]:
        return [_SPAN.row(k, self._span[k]) for k in sorted(self._span)]


def node_increments(calls: list[Sequence[Any]], failed_attempts: int) -> dict[str, Any]:
    """What a node's ``calls`` (each one's ``values``) and its failed attempts add to its row."""
    add = dict(zip(NODE_COLUMNS, _NODE.sums(calls), strict=True)) if calls else dict.fromkeys(NODE_COLUMNS, 0)
    for column, n in _NODE_ATTEMPT:
        add[column] += n * failed_attempts
    return add
