"""What a call record adds to each rollup, declared once: the writer's upserts (``store.invocations``) and
the Prometheus counters (``addon.metrics``) add up exactly what ``COUNTERS`` and ``DISTRIBUTIONS`` say.

A counter is one line: its name, its value for a call (the rule), and the targets it feeds —

- ``DAY``, ``HOUR``: ``codex_daily_stats`` and ``codex_hourly_stats``, per period, source, node and model;
- ``KEY``: ``client_key_usage``, per UTC day and client key (calls that named a key);
- ``node``: its column in ``nodes``, the node's lifetime row (calls served by a node);
- ``metric``: a Prometheus counter per node (``direct`` for calls no node served) and per client key name.

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
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS, bucket_index
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


DAY, HOUR, KEY = To.DAY, To.HOUR, To.KEY
PERIODS = DAY | HOUR
ALL = PERIODS | KEY


@dataclass(frozen=True, slots=True)
class Metric:
    """A Prometheus counter: ``codex_node_<family>`` labelled by node and, if ``per_client``,
    ``codex_client_<family>`` by client key name; with a ``kind`` label when ``kind`` is given or
    ``by_status`` (the kind is then the call's status, ``retried`` for a failed attempt)."""

    family: str
    kind: str | None = None
    per_client: bool = True
    by_status: bool = False


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
    Counter("total_tokens", _usage("total_tokens"),            ALL),
    Counter("cost", lambda r: r.cost or 0.0,                   ALL),    # an unpriced call adds 0 ...
    Counter("priced", lambda r: r.cost is not None,            PERIODS),  # ... and is not priced
    Counter("bytes", operator.attrgetter("response_bytes"),    PERIODS, "total_bytes"),
    Counter("ttfb_sum", lambda r: r.ttfb_ms or 0,              PERIODS, "first_byte_ms"),
    Counter("ttfb_n", lambda r: r.ttfb_ms is not None,         PERIODS),
    Counter("stream_ms", lambda r: r.stream_ms if _timed(r) else 0,                PERIODS),
    Counter("stream_tokens", lambda r: r.usage.output_tokens if _timed(r) else 0,  PERIODS),
    Counter("stream_dur_ms", lambda r: r.stream_ms or 0,       To.NONE, "stream_dur_ms"),  # every call's stream
    Counter("duration_sum", lambda r: r.duration_ms or 0,      HOUR),
    Counter("duration_n", lambda r: r.duration_ms is not None, HOUR),
)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A latency counted per fixed bucket (``store.histogram``): into the hour's bucket ``columns`` and the
    per-node Prometheus histogram ``metric`` (in seconds). Calls without one count in neither."""

    value: Callable[[InvocationRecord], int | None]
    bounds: tuple[int, ...]
    columns: tuple[str, ...]
    metric: str


DISTRIBUTIONS: tuple[Distribution, ...] = (
    Distribution(operator.attrgetter("ttfb_ms"), TTFB_BUCKETS_MS, TTFB_COLUMNS, "codex_node_ttfb_seconds"),
    Distribution(operator.attrgetter("duration_ms"), DURATION_BUCKETS_MS, DURATION_COLUMNS,
                 "codex_node_duration_seconds"),
)

# Each target's columns and where its values sit in ``values(r)``: the writer adds up every call once.
_VALUES = tuple(c.value for c in COUNTERS)
_DAY = tuple((c.name, i) for i, c in enumerate(COUNTERS) if DAY in c.to)
_HOUR = tuple((c.name, i) for i, c in enumerate(COUNTERS) if HOUR in c.to)
_KEY = tuple((c.name, i) for i, c in enumerate(COUNTERS) if KEY in c.to)
NODE = tuple((c.node, i) for i, c in enumerate(COUNTERS) if c.node)
NODE_ATTEMPT = tuple((c.node, c.attempt) for c in COUNTERS if c.node and c.attempt)  # a failed attempt's

DAY_COLUMNS = tuple(name for name, _ in _DAY)
HOUR_COLUMNS = (*(name for name, _ in _HOUR), *(col for d in DISTRIBUTIONS for col in d.columns))
KEY_COLUMNS = tuple(name for name, _ in _KEY)
NODE_COLUMNS = tuple(col for col, _ in NODE)


def values(r: InvocationRecord) -> list[Any]:
    """Every counter's value for ``r``, in ``COUNTERS`` order."""
    return [value(r) for value in _VALUES]


def hour_of(t: dt.datetime) -> dt.datetime:
    """The start of ``t``'s hour (naive UTC, as stored)."""
    return t.replace(minute=0, second=0, microsecond=0)


class Sums:
    """A batch's calls added up per row of the day, hour and key rollups: the rows their upserts add."""

    def __init__(self) -> None:
        self._day: dict[tuple, dict[str, Any]] = {}
        self._hour: dict[tuple, dict[str, Any]] = {}
        self._key: dict[tuple, dict[str, Any]] = {}

    def add(self, r: InvocationRecord, row: dict[str, Any], vals: Sequence[Any]) -> None:
        """Add call ``r``, stored as ``row`` (its clipped model and key name are the rollups' keys), whose
        counter values are ``vals``."""
        at = row["occurred_at"]
        group = (row["source"], row["node_id"] or "", row["model"] or "")  # '': no node, unknown model
        _add(_row(self._day, ("day", "source", "node_id", "model"), (at.date(), *group), DAY_COLUMNS), _DAY, vals)
        hour = _row(self._hour, ("hour", "source", "node_id", "model"), (hour_of(at), *group), HOUR_COLUMNS)
        _add(hour, _HOUR, vals)
        for d in DISTRIBUTIONS:
            ms = d.value(r)
            if ms is not None:
                hour[d.columns[bucket_index(d.bounds, ms)]] += 1
        if row["client_key"]:
            _add(_row(self._key, ("day", "client_key"), (at.date(), row["client_key"]), KEY_COLUMNS), _KEY, vals)

    # Sorted by key: relays upserting the same rows lock them in one order (no deadlock).
    def day(self) -> list[dict[str, Any]]:
        return [self._day[k] for k in sorted(self._day)]

    def hour(self) -> list[dict[str, Any]]:
        return [self._hour[k] for k in sorted(self._hour)]

    def key(self) -> list[dict[str, Any]]:
        return [self._key[k] for k in sorted(self._key)]


def _row(rows: dict[tuple, dict[str, Any]], names: tuple[str, ...], key: tuple,
         columns: tuple[str, ...]) -> dict[str, Any]:
    d = rows.get(key)
    if d is None:  # every row of one upsert has the same columns
        d = rows[key] = dict(zip(names, key, strict=True)) | dict.fromkeys(columns, 0)
    return d


def _add(d: dict[str, Any], columns: tuple[tuple[str, int], ...], vals: Sequence[Any]) -> None:
    for name, i in columns:
        d[name] += vals[i]
