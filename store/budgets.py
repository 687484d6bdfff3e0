"""Plan-shaped budgets (``store.keys.Budget``): their windows, their use, and a key's whole admission.

What they count is in ``client_key_spans``, per key, model and bucket: UTC minutes for the ``5h`` rolling
window (granularity one minute: a call leaves it 5 h after the start of its minute), UTC days for the
others (``daily``; ``weekly`` from Monday 00:00 UTC, ISO weeks; ``monthly``; ``total``: every day). ``admitted``
is added here, in the admission transaction; tokens and cost by the writer once a call is stored.

Request budgets are exact across relays: their admission holds the key's gate (``store.keycalls.gate``),
reads, and counts the call before the gate is released. Token and cost budgets are read without the gate: a
call is admitted while the key is under them, so their overshoot is at most what the calls in flight when
the budget ran out use (docs/teams.md). A key with none of these (and no fleet rpm or concurrency) pays no
statement here: ``admit_key`` is not called for it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from store import keycalls
from store.key_usage import Admission, Budgets, admit, next_month
from store.keys import Budget, KeySpec
from store.records import utcnow
from store.rollups import DAY_MINUTES, MINUTE, span_starts
from store.schema import client_key_spans
from store.upsert import upsert

ROLLING = dt.timedelta(hours=5)
MODEL_CHARS = 128  # client_key_spans.model, as the writer clips it
_COLUMN = {"requests": "admitted", "tokens": "total_tokens", "cost": "cost"}


def window_start(window: str, now: dt.datetime) -> dt.datetime | None:
    """The first bucket start ``window`` counts at ``now`` (None: ``total``, every bucket)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "5h":
        return now.replace(second=0, microsecond=0) - ROLLING + dt.timedelta(minutes=1)
    if window == "daily":
        return midnight
    if window == "weekly":
        return midnight - dt.timedelta(days=now.weekday())  # ISO: Monday
    if window == "monthly":
        return midnight.replace(day=1)
    return None


def window_number(window: str, now: dt.datetime) -> int:
    """A number that grows with each new window (a warning is told once per number): for ``5h``, each
    5-hour block since the epoch."""
    if window == "5h":
        return int(now.replace(tzinfo=dt.UTC).timestamp() // ROLLING.total_seconds())
    start = window_start(window, now)
    return start.toordinal() if start is not None else 0


def _next_window(window: str, start: dt.datetime) -> dt.datetime:
    if window == "daily":
        return start + dt.timedelta(days=1)
    if window == "weekly":
        return start + dt.timedelta(days=7)
    return next_month(start)


def first_reset(window: str, at: dt.datetime) -> dt.datetime | None:
    """When a call counted at ``at`` in an unused rolling window leaves it (None for the other windows, whose
    reset does not depend on use)."""
    return at.replace(second=0, microsecond=0) + ROLLING if window == "5h" else None


@dataclass(frozen=True, slots=True)
class Use:
    """A budget's use at a moment: ``used`` (before the call being admitted) and when it is whole again
    (None: never, a ``total`` budget, or nothing used in a rolling window)."""

    budget: Budget
    used: float
    resets_at: dt.datetime | None
    window: int  # ``window_number``

    @property
    def over(self) -> bool:
        return self.used >= self.budget.limit


def read_use(conn: sa.Connection, key: str, budgets: Sequence[Budget], now: dt.datetime) -> list[Use]:
    """Each budget's use at ``now``: one read of the key's buckets."""
    t = client_key_spans.c
    rolling = [b for b in budgets if b.window == "5h"]
    fixed = [b for b in budgets if b.window != "5h"]
    where = []
    if rolling:
        where.append(sa.and_(t.width == MINUTE, t.start >= window_start("5h", now)))
    if fixed:
        starts = [window_start(b.window, now) for b in fixed]
        since = None if None in starts else min(s for s in starts if s is not None)
        where.append(sa.and_(t.width == DAY_MINUTES, *([t.start >= since] if since is not None else [])))
    rows = conn.execute(sa.select(t.width, t.start, t.model, t.admitted, t.total_tokens, t.cost)
                        .where(t.client_key == key, sa.or_(*where))).all()
    uses = []
    for b in budgets:
        width, start = (MINUTE, window_start("5h", now)) if b.window == "5h" else (DAY_MINUTES, window_start(
            b.window, now))
        mine = [r for r in rows if r.width == width and (start is None or r.start >= start) and b.counts(r.model)]
        column = _COLUMN[b.unit]
        used = sum(float(getattr(r, column)) if b.unit == "cost" else getattr(r, column) for r in mine)
        if b.window == "5h":
            first = min((r.start for r in mine if getattr(r, column)), default=None)
            resets = first + ROLLING if first is not None else None
        else:
            resets = _next_window(b.window, start) if start is not None else None
        uses.append(Use(b, used, resets, window_number(b.window, now)))
    return uses


def as_of(day: dt.date) -> dt.datetime:
    """The moment a report of ``day`` shows budgets at: now for today, else the day's last second."""
    now = utcnow()
    return now if day >= now.date() else dt.datetime.combine(day, dt.time(23, 59, 59))


def uses_of(conn: sa.Connection, specs: Iterable[KeySpec], now: dt.datetime
            ) -> dict[str, dict[str, tuple[float, dt.datetime | None]]]:
    """Per key with budgets, each budget's use and reset at ``now`` (``store.key_usage.key_report``'s form)."""
    return {s.name: {u.budget.name: (u.used, u.resets_at) for u in read_use(conn, s.name, s.budgets, now)}
            for s in specs if s.budgets}


def count_admission(conn: sa.Connection, key: str, model: str | None, now: dt.datetime) -> None:
    """Add an admitted call of ``model`` to the key's minute and day (under its gate)."""
    model = (model or "")[:MODEL_CHARS]
    upsert(conn, client_key_spans, [{"client_key": key, "width": width, "start": start, "model": model,
                                     "admitted": 1} for width, start in span_starts(now)], increment=("admitted",))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``admit_key`` decided: ``over`` None (admitted), ``"rpm"``, ``"concurrency"``, a shorthand's name
    (``daily_requests`` …) or a budget's ``Use``; and what it read on the way, for the client's headers."""

    over: str | Use | None
    calls: keycalls.Calls | None = None  # fleet figures, before this call
    day: Admission | None = None  # the shorthands' figures (store.key_usage)
    uses: tuple[Use, ...] = ()


def admit_key(conn: sa.Connection, spec: KeySpec, now: dt.datetime, model: str | None,
              holder: str | None) -> Verdict:
    """Admit one call of ``spec`` for ``model`` at ``now`` (naive UTC), in the caller's transaction, in this
    order: fleet rpm and concurrency (``holder``: the call's row; None: not counted fleet-wide), the
    budgets, the shorthands. The gate is taken when anything exact is counted: fleet limits or request
    budgets."""
    requests = any(b.unit == "requests" for b in spec.budgets or ())
    if holder is not None or requests:
        keycalls.gate(conn, spec.name)
    calls = None
    if holder is not None:
        calls = keycalls.figures(conn, spec.name, now)
        if spec.rpm is not None and calls.started >= spec.rpm:
            return Verdict("rpm", calls)
        if spec.concurrency is not None and calls.in_flight >= spec.concurrency:
            return Verdict("concurrency", calls)
    uses = tuple(read_use(conn, spec.name, spec.budgets, now)) if spec.budgets else ()
    over = next((u for u in uses if u.budget.counts(model) and u.over), None)
    if over is not None:
        return Verdict(over, calls, None, uses)
    day = None
    shorthands = Budgets(spec.daily_requests, spec.daily_tokens, spec.monthly_cost)
    if shorthands != Budgets():
        day = admit(conn, spec.name, now.date(), shorthands)
        if day.over is not None:
            return Verdict(day.over, calls, day, uses)
    if requests:
        count_admission(conn, spec.name, model, now)
    if holder is not None:
        keycalls.start(conn, holder, spec.name, now)
    return Verdict(None, calls, day, uses)
