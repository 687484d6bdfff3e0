"""Usage per client key and UTC day (``client_key_usage``): admission, refusals, the writer's sums.

Every change is an atomic increment. ``admit`` makes ``daily_requests`` exact across relays sharing
one database: ``UPDATE … SET admitted = admitted + 1 WHERE admitted < limit`` and its row count decide,
never a read then a write. Token and cost budgets are read (a call is admitted while the key is under
them, so the overshoot is bounded by the calls in flight). Refusals (and admissions made while the
database was away) are ``KeyCount`` records the writer adds (``add_counts``), journaled like every
record during an outage. The writer adds each invocation's figures (``store.rollups``, ``KEY``) in
the transaction that stores its row (``add_usage``), so these rows sum ``codex_invocations`` by
``client_key`` exactly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from store.keys import KeySpec
from store.records import KeyCount
from store.rollups import KEY_COLUMNS
from store.schema import client_key_usage, codex_invocations
from store.stats import Filters
from store.upsert import upsert

REFUSAL_REASONS = ("model", "nodes", "rate", "concurrency", "budget", "endpoint", "expired")
# What a ``KeyCount`` record may add to (its ``counter``).
KEY_COUNTERS = ("admitted", *(f"refused_{r}" for r in REFUSAL_REASONS))


@dataclass(frozen=True, slots=True)
class Budgets:
    """A key's database-backed limits (None: no limit)."""

    daily_requests: int | None = None
    daily_tokens: int | None = None
    monthly_cost: float | None = None


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month[T: (dt.date, dt.datetime)](day: T) -> T:
    """The first of the month after ``day`` (at ``day``'s time of day, for a datetime)."""
    return (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``admit`` decided, and the day's figures it read on the way (None: not read, no such budget)."""

    over: str | None  # the budget the call is over; None: admitted
    admitted: int | None = None  # calls admitted today under daily_requests, this one included
    total_tokens: int | None = None  # today's tokens before this call
    month_cost: float | None = None  # this month's cost up to today


def admit(conn: sa.Connection, key: str, day: dt.date, budgets: Budgets) -> Admission:
    """Admit one call of ``key`` on ``day``: ``over`` is None, or the name of the budget it is over.

    The caller owns the transaction. Only an admitted call with a ``daily_requests`` limit counts in
    ``admitted``. The figures read come back with the answer (the ``x-ratelimit-*`` headers show them): the
    day's row is read once, and written only where it is missing, so no statement is added for them.
    """
    t = client_key_usage.c
    seen, tokens = None, None
    if budgets.daily_tokens is not None or budgets.daily_requests is not None:
        seen = conn.execute(sa.select(t.admitted, t.total_tokens).where(t.day == day, t.client_key == key)).first()
        tokens = seen.total_tokens if seen is not None else 0
    if budgets.daily_tokens is not None and tokens is not None and tokens >= budgets.daily_tokens:
        return Admission("daily_tokens", total_tokens=tokens)
    spent = None
    if budgets.monthly_cost is not None:
        spent = float(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.cost), 0.0)).where(
            t.client_key == key, t.day >= month_start(day), t.day <= day)).scalar() or 0.0)
        if spent >= budgets.monthly_cost:
            return Admission("monthly_cost", total_tokens=tokens, month_cost=spent)
    admitted = None
    if budgets.daily_requests is not None:
        if seen is None:
            _ensure_row(conn, key, day)
        # The row count decides, not what was read: another relay may have admitted calls since.
        taken = conn.execute(sa.update(client_key_usage)
                             .where(t.day == day, t.client_key == key, t.admitted < budgets.daily_requests)
                             .values(admitted=t.admitted + 1)).rowcount
        before = seen.admitted if seen is not None else 0
        if taken != 1:
            return Admission("daily_requests", max(before, budgets.daily_requests), tokens, spent)
        admitted = before + 1
    return Admission(None, admitted, tokens, spent)


def add_counts(conn: sa.Connection, counts: Sequence[KeyCount]) -> None:
    """Add admissions and refusals (``KeyCount`` records, from the writer) to their keys' days."""
    sums: dict[tuple[dt.date, str], dict] = {}
    for c in counts:
        d = sums.setdefault((c.day, c.client_key), {"day": c.day, "client_key": c.client_key,
                                                     **dict.fromkeys(KEY_COUNTERS, 0)})
        d[c.counter] += 1
    # Sorted: relays upserting the same rows lock them in one order (no deadlock).
    upsert(conn, client_key_usage, [sums[k] for k in sorted(sums)], increment=KEY_COUNTERS)


def add_usage(conn: sa.Connection, sums: Sequence[dict]) -> None:
    """Add a batch's calls, summed per key and day (``store.rollups.Sums.key``), to their keys' days."""
    upsert(conn, client_key_usage, sums, increment=KEY_COLUMNS)


def _ensure_row(conn: sa.Connection, key: str, day: dt.date) -> None:
    # Adding 0 is the portable "insert if missing" of store.upsert.
    upsert(conn, client_key_usage, [{"day": day, "client_key": key, "admitted": 0}], increment=("admitted",))


@dataclass(frozen=True, slots=True)
class KeyStats:
    """One client key on one UTC day (``stats keys``): calls, refusals by reason, tokens, cost."""

    client_key: str
    day: dt.date
    requests: int
    admitted: int  # calls admitted under a daily_requests limit
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    total_tokens: int
    cost: float
    month_cost: float  # from the first of the month up to ``day``
    refused_model: int
    refused_nodes: int
    refused_rate: int
    refused_concurrency: int
    refused_budget: int
    refused_endpoint: int
    refused_expired: int

    @property
    def refused(self) -> int:
        return sum(getattr(self, f"refused_{r}") for r in REFUSAL_REASONS)

    @property
    def cache_hit_rate(self) -> float | None:
        """Cached ÷ input tokens (store.stats); None without input."""
        return self.cached_tokens / self.input_tokens if self.input_tokens else None

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["day"], d["refused"], d["cache_hit_rate"] = self.day.isoformat(), self.refused, self.cache_hit_rate
        return d


def per_key(conn: sa.Connection, day: dt.date, key: str | None = None) -> list[KeyStats]:
    """Every key (or only ``key``) with a row this month up to ``day``: its numbers of ``day`` (zeros without
    a row)."""
    t = client_key_usage.c
    month = (sa.select(t.client_key, sa.func.sum(t.cost).label("month_cost"))
             .where(t.day >= month_start(day), t.day <= day, *([t.client_key == key] if key is not None else []))
             .group_by(t.client_key).subquery())
    today = sa.select(client_key_usage).where(t.day == day).subquery()
    names = [f.name for f in fields(KeyStats) if f.name not in ("client_key", "day", "month_cost")]
    rows = conn.execute(
        sa.select(month.c.client_key, month.c.month_cost, *[sa.func.coalesce(today.c[n], 0).label(n) for n in names])
        .select_from(month.outerjoin(today, today.c.client_key == month.c.client_key))
        .order_by(month.c.client_key))
    return [KeyStats(day=day, **_figures(r._mapping)) for r in rows]


def _figures(row: sa.RowMapping) -> dict[str, Any]:
    """A row's columns as ``KeyStats`` fields: money as float (MySQL's sums are Decimal)."""
    return {k: (float(v) if k in ("cost", "month_cost") else v) for k, v in row.items()}


def models_of_key(conn: sa.Connection, key: str, since: dt.date, until: dt.date) -> list[sa.Row]:
    """``key``'s successful calls from ``since`` to ``until`` (UTC days, inclusive) per model, from
    codex_invocations (as claude-relay-service counts only calls that returned usage): model, requests,
    input (with cache reads and writes), cached, cache writes, output, and the cost split."""
    c = codex_invocations.c
    sums = {"input_tokens": c.input_tokens, "cached_tokens": c.cache_input_tokens,
            "cache_write_tokens": c.cache_write_tokens, "output_tokens": c.output_tokens}
    return list(conn.execute(
        sa.select(sa.func.coalesce(c.model, "unknown").label("model"), sa.func.count().label("requests"),
                  *[sa.func.sum(col).label(name) for name, col in sums.items()],
                  *[sa.func.coalesce(sa.func.sum(c[n]), 0.0).label(n)
                    for n in ("cost", "cost_input", "cost_cached", "cost_output", "cost_cache_write")])
        .where(c.client_key == key, c.status == "success", *Filters(since=since, until=until).where())
        .group_by(sa.func.coalesce(c.model, "unknown")).order_by(sa.func.coalesce(c.model, "unknown"))))


def budget_reset(day: dt.date, monthly: bool) -> dt.datetime:
    """When a daily (or monthly) budget of ``day`` starts again: the next UTC midnight (or month)."""
    nxt = next_month(day) if monthly else day + dt.timedelta(days=1)
    return dt.datetime.combine(nxt, dt.time())


def key_report(rows: Iterable[KeyStats], specs: Mapping[str, KeySpec], day: dt.date,
               live: Callable[[str, str], int | None] = lambda name, limit: None,
               budget_uses: Mapping[str, Mapping[str, tuple[float, dt.datetime | None]]] | None = None) -> list[dict]:
    """``rows`` (``per_key`` of ``day``) and every configured key without one, each with ``limits``: per
    configured limit its value, its use and when it resets. ``live(name, "rpm" | "concurrency")`` is what a
    relay process knows of its rolling window and calls in flight (None where nobody does, e.g. the CLI).
    ``budget_uses``: per key, its plan-shaped budgets' use and reset by budget name (``store.budgets.uses_of``);
    each budget is a limit under its name (``weekly_cost``, ``5h_requests[claude-opus-*]``)."""
    by_name = {r.client_key: r.as_dict() for r in rows}
    for name in specs.keys() - by_name.keys():
        by_name[name] = {"client_key": name, "day": day.isoformat(), "admitted": 0, "month_cost": 0.0,
                         "refused": 0, "cache_hit_rate": None, **dict.fromkeys(KEY_COLUMNS, 0),
                         **{f"refused_{r}": 0 for r in REFUSAL_REASONS}}
    for name, row in by_name.items():
        spec = specs.get(name)
        uses = {"daily_requests": (row["admitted"], budget_reset(day, False)),
                "daily_tokens": (row["total_tokens"], budget_reset(day, False)),
                "monthly_cost": (row["month_cost"], budget_reset(day, True)),
                "rpm": (live(name, "rpm"), None), "concurrency": (live(name, "concurrency"), None)}
        row["limits"] = {limit: {"limit": getattr(spec, limit), "used": used,
                                 "resets_at": reset.isoformat() + "Z" if reset else None}
                         for limit, (used, reset) in uses.items() if spec and getattr(spec, limit) is not None}
        known = (budget_uses or {}).get(name, {})
        for b in spec.budgets or () if spec else ():
            used_b, reset_b = known.get(b.name, (None, None))
            row["limits"][b.name] = {"limit": b.limit, "used": used_b,
                                     "resets_at": reset_b.isoformat() + "Z" if reset_b else None}
    return [by_name[n] for n in sorted(by_name)]
