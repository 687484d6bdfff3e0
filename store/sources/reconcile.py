"""Compare what a provider says it served with what the relay measured, per day and model.

For a source and a day (the provider's calendar day, see ``timezone``): the provider side is its
latest snapshot of that day; the relay side is ``codex_invocations`` of the source's nodes with
``occurred_at`` from the start of that day up to the snapshot's capture time (the provider had not
counted later calls yet). Models are matched by the name the provider files them under (CRS
normalises names: no ``:latest``, ``-vN:M`` or Bedrock prefixes). Compared per model and for all
models:

- ``requests``: the provider's request count vs the relay's successful calls;
- ``input_tokens`` (cached included, the relay's OpenAI convention: the provider's input + cache
  reads + cache writes), ``cached_tokens``, ``output_tokens``, ``total_tokens``;
- ``cost``: the provider's (real) cost vs the relay's estimated cost (``store/prices.py``).

The command line (``./run.sh reconcile``) is ``store.cli.reconcile``; the admin page shows ``as_json``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from store.schema import codex_invocations
from store.sources import FORMATS, SourceConfig
from store.sources.snapshots import latest_capture

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
    models = sorted(m for m in {*provider, *relay} if m is not ALL_MODELS and m is not None)  # ALL_MODELS is None
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
    normalize = FORMATS[source.format].normalize_model
    relay: dict[str | None, Totals] = {}
    for model, t in relay_totals(conn, source.nodes, start, end).items():
        key = model if model in (ALL_MODELS, NO_MODEL) else normalize(model)
        relay[key] = relay.get(key, Totals()) + t
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
        requests, input_tokens, cached_tokens, output_tokens, total_tokens = (int(v or 0) for v in values[:5])
        t = Totals(requests, input_tokens, cached_tokens, output_tokens, total_tokens, cost=float(values[5] or 0))
        key = model or NO_MODEL
        totals[key] = totals.get(key, Totals()) + t
    totals[ALL_MODELS] = sum(totals.values(), Totals())
    return totals


def as_json(rec: Reconciliation) -> dict:
    start, end = rec.window
    return {"source": rec.source, "stats_date": rec.stats_date, "tolerance": rec.tolerance, "ok": rec.ok,
            "captured_at": rec.captured_at.isoformat() if rec.captured_at else None,
            "window": {"start": start.isoformat(), "end": end.isoformat()},
            "rows": [dataclasses.asdict(r) for r in rec.rows]}
