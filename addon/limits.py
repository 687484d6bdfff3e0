"""Enforcing what a client key may do (``store.keys.KeySpec``) before its call reaches a node.

The relay asks ``admit`` once per API call, after client auth named the key and the body told the
model; a refusal is an error answer in the client's API shape and the call reaches no node, counts
against no node and is not an invocation; it is counted per key and reason in ``client_key_usage``.
In this order: ``models`` (400 ``model_not_allowed``), ``nodes`` (429 ``no_node_available`` when none of
them may take calls), ``rpm`` over a rolling minute and ``concurrency`` (429 ``rate_limited`` /
``concurrency_limited``, with a short ``retry-after``; both per relay process), then the database budgets
(429 ``budget_exceeded``; ``store.key_usage.admit``, run off the event loop). Every answer is an
``addon.errors.refusal_response``: docs/refusals.md has what each client does with it. ``barred`` gives
the nodes a key's calls may not use; ``release`` ends a call's concurrency slot.

Refusals are counted by ``KeyCount`` records through the writer (journaled while the database is away),
never by SQL from here. When the budgets cannot be read (the database is unreachable) the option
``codex_limits_when_db_down`` decides: ``admit`` serves the call and counts its admission through the
writer, so the day's ``admitted`` is exact once the database is back; ``refuse`` answers 503
``limits_unavailable``. Never a 500. After a failed check the database is asked again ``DB_RETRY_S`` later.

What a key has left is shown to its client (``show``): OpenAI's ``x-ratelimit-*`` headers on every answer, from
what this process knows without asking the database again — its rpm window, and the day's figures its latest
admission of the key read (``store.key_usage.Admission``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from mitmproxy import http

from addon.errors import CLIENT_KEY_NAME, refusal_response
from addon.guard.endpoints import DEFAULT_KEY_ENDPOINTS, UNBILLED, endpoint_allowed, route
from addon.observe.metrics import Budget
from addon.services.runtime import Runtime
from addon.services.settings import SettingsError
from store.engine import error_line
from store.key_usage import Admission, Budgets, KeyStats, admit, budget_reset, key_report, month_start
from store.keys import KeySpec
from store.records import KeyCount, utcnow

log = logging.getLogger("codex.limits")

RPM_WINDOW_S = 60.0
# A concurrency slot frees when a call of the key ends: Codex, the one client that waits on its own, retries
# after this many seconds (five times), the others are told at once.
CONCURRENCY_RETRY_AFTER_S = 1
WHEN_DB_DOWN = ("admit", "refuse")
_OUTAGE_LOG_EVERY_S = 10.0
# After the database failed a budget check, it is asked again only after this long: a frozen database
# would otherwise hold each call for its connect timeout.
DB_RETRY_S = 5.0


class Window(NamedTuple):
    """One limit of a key as its client sees it: its value, its use, and the seconds until it is whole again."""

    name: str
    limit: int
    used: int
    reset_s: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(slots=True)
class _DaySeen:
    """A key's day as its latest admission here read it (None: that figure was not read)."""

    day: dt.date
    admitted: int | None
    total_tokens: int | None
    month_cost: float | None = None  # the month's cost up to that day


class Limits:
    """The configured keys' limits and this process's rate and concurrency counts."""

    def __init__(self, runtime: Runtime, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = utcnow) -> None:
        self.runtime = runtime  # its client keys (``keys``) are the ones limited
        self._clock = clock
        self._now = now
        self._recent: dict[str, deque[float]] = {}  # key name -> admission times in the last minute
        self._in_flight: dict[str, int] = {}  # key name -> calls holding a concurrency slot
        self._holders: dict[str, str] = {}  # flow id -> key name of its slot
        self.when_db_down = "admit"  # codex_limits_when_db_down (addon.serviceoptions)
        self._last_outage_log = -math.inf
        self._db_retry_at = -math.inf
        self._seen: dict[str, _DaySeen] = {}  # key name -> its day as the latest admission read it
        runtime.metrics.count_budgets(self.budgets)

    def _spec(self, flow: http.HTTPFlow) -> KeySpec | None:
        return self.runtime.keys.spec(flow.metadata.get(CLIENT_KEY_NAME, ""))

    def barred(self, flow: http.HTTPFlow) -> set[str]:
        """The ids of the nodes this flow's key may not use."""
        spec = self._spec(flow)
        if spec is None or spec.nodes is None:
            return set()
        return {n.id for n in self.runtime.pool} - set(spec.nodes)

    async def admit(self, flow: http.HTTPFlow, model: str | None, holder: str | None = None, *,
                    api_format: str | None = "responses") -> http.Response | None:
        """None when the call may go on (it then holds a slot until ``release``), else the refusal. ``holder``
        names the call when a flow makes several (a WebSocket's turns); by default the flow's id.

        ``api_format``: the call's endpoint (``addon.guard.endpoints``), None for a path the relay does not meter
        (its model is not checked: it names none). Token counting is checked for its model and nodes only:
        it is never billed and counts against no rate, concurrency or budget.
        """
        spec = self._spec(flow)
        if spec is None:
            return None
        path = flow.request.path
        if not endpoint_allowed(path, spec.endpoints):
            return self._refuse(flow, spec, "endpoint", refusal_response(
                path, 400, f"codex-relay: key {spec.name!r} may not use {route(path)[:200]!r}; allowed: "
                f"{', '.join(spec.endpoints or DEFAULT_KEY_ENDPOINTS)} (its endpoints)", "endpoint_not_allowed"))
        if api_format is not None and not spec.allows_model(model):
            # 400, not 403: Claude Code shows every 403 as "Failed to authenticate."
            return self._refuse(flow, spec, "model", refusal_response(
                path, 400, f"codex-relay: key {spec.name!r} may not use model {model or '(none given)'!r}; "
                f"allowed: {', '.join(spec.models or ())}", "model_not_allowed"))
        if spec.nodes is not None and self.runtime.pool.choose(exclude=self.barred(flow)) is None:
            return self._refuse(flow, spec, "nodes", refusal_response(
                path, 429, f"codex-relay: none of key {spec.name!r}'s nodes ({', '.join(spec.nodes)}) may take "
                "calls: each is disabled or has weight 0", "no_node_available"))
        if api_format in UNBILLED:
            return None
        now = self._clock()
        recent = self._rpm_window(spec.name)
        if spec.rpm is not None and len(recent) >= spec.rpm:
            wait = max(1, math.ceil(recent[0] + RPM_WINDOW_S - now)) if recent else math.ceil(RPM_WINDOW_S)
            return self._refuse(flow, spec, "rate", refusal_response(
                path, 429, f"codex-relay: key {spec.name!r} reached its rpm limit ({spec.rpm} requests per "
                f"minute); a request is free again in {wait} s", "rate_limited", retry_after=wait))
        if spec.concurrency is not None and self._in_flight.get(spec.name, 0) >= spec.concurrency:
            return self._refuse(flow, spec, "concurrency", refusal_response(
                path, 429, f"codex-relay: key {spec.name!r} reached its concurrency limit ({spec.concurrency} "
                "calls in flight); one is free when a call of this key ends", "concurrency_limited",
                retry_after=CONCURRENCY_RETRY_AFTER_S))
        # Taken before the database is asked: calls admitted meanwhile see this one.
        recent.append(now)
        self._in_flight[spec.name] = self._in_flight.get(spec.name, 0) + 1
        holder = holder or flow.id
        self._holders[holder] = spec.name
        engine = self.runtime.engine
        if not spec.needs_database or engine is None:
            return None
        day = self._now().date()
        over: str | None = "error"  # until the database answers: an error there frees the slot too
        try:
            if self._clock() < self._db_retry_at:
                over = self._db_down(spec, day, None)
            else:
                admission = await asyncio.to_thread(_admit, engine, spec, day)
                over = admission.over
                self._saw(spec.name, day, admission)
        except Exception as e:  # unreachable, frozen, or anything else: never a 500
            self._db_retry_at = self._clock() + DB_RETRY_S
            over = self._db_down(spec, day, e)
        finally:
            if over is not None:
                self.release(flow, holder)
                recent.remove(now)
        if over is None:
            return None
        if over == "unavailable":
            return self._refuse(flow, spec, "budget", refusal_response(
                path, 503, f"codex-relay: key {spec.name!r} has budgets that cannot be checked while the stats "
                "database is unreachable; try again later", "limits_unavailable", retry_after=10))
        self.runtime.submit(KeyCount(spec.name, day, "refused_budget"))
        limit = getattr(spec, over)
        reset = budget_reset(day, monthly=over == "monthly_cost")
        self.runtime.alert("key_budget_reached", spec.name,
                           f"client key {spec.name} reached its {over} limit ({limit:g}); calls are refused until "
                           f"{reset.isoformat()}Z")
        # No retry-after: it is hours away, and Codex and the anthropic SDK would sleep all of it. OpenAI's
        # ``usage_limit_reached`` with ``resets_at`` makes Codex stop at once with "You've hit your usage limit.
        # Try again at <its local time of the reset>."; the other clients show the message.
        response = refusal_response(
            path, 429, f"codex-relay: key {spec.name!r} reached its {over} limit ({limit:g}"
            f"{' USD' if over == 'monthly_cost' else ''}); it resets at {reset.isoformat()}Z (UTC)",
            "budget_exceeded", openai_type="usage_limit_reached",
            resets_at=int(reset.replace(tzinfo=dt.UTC).timestamp()))
        _log_refusal(flow, spec, "budget", response)
        self._show(spec, response)
        return response

    def model_filter(self, flow: http.HTTPFlow) -> Callable[[str], bool] | None:
        """Which models this flow's key may use (``KeySpec.allows_model``); None: any model (or no key)."""
        spec = self._spec(flow)
        return spec.allows_model if spec is not None and spec.models is not None else None

    def release(self, flow: http.HTTPFlow, holder: str | None = None) -> None:
        """The call of ``flow`` (``holder``: as given to ``admit``) ended: its concurrency slot is free (no-op
        without one)."""
        name = self._holders.pop(holder or flow.id, None)
        if name is not None:
            self._in_flight[name] -= 1

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def live(self, name: str, limit: str) -> int:
        """What this process counts of a key's ``rpm`` (its calls in the rolling minute) or ``concurrency``."""
        if limit == "rpm":
            return len(self._rpm_window(name))
        return self.in_flight(name)

    def report(self, rows: Iterable[KeyStats], day: dt.date) -> list[dict]:
        """``store.key_usage.key_report`` with this process's rpm window and calls in flight."""
        return key_report(rows, self.runtime.keys.specs, day, self.live)

    def windows(self, spec: KeySpec) -> list[Window]:
        """The key's request and token limits as this process knows them now, without asking the database:
        ``rpm`` from its window (whole again when its newest call leaves it), ``daily_requests`` and
        ``daily_tokens`` as its latest admission of the key today read them (none read yet: left out)."""
        found = []
        if spec.rpm is not None:
            recent = self._rpm_window(spec.name)
            found.append(Window("rpm", spec.rpm, len(recent),
                                max(0.0, recent[-1] + RPM_WINDOW_S - self._clock()) if recent else 0.0))
        now = self._now()
        seen = self._seen.get(spec.name)
        if seen is not None and seen.day < now.date():
            seen = _DaySeen(now.date(), 0, 0)  # a new UTC day: the day's counts start again
        midnight = (budget_reset(now.date(), monthly=False) - now).total_seconds()
        if spec.daily_requests is not None and seen is not None and seen.admitted is not None:
            found.append(Window("daily_requests", spec.daily_requests, seen.admitted, midnight))
        if spec.daily_tokens is not None and seen is not None and seen.total_tokens is not None:
            found.append(Window("daily_tokens", spec.daily_tokens, seen.total_tokens, midnight))
        return found

    def show(self, flow: http.HTTPFlow) -> None:
        """Put the limits of ``flow``'s key on its answer (``flow.response``), when it has any."""
        spec = self._spec(flow)
        if spec is not None and flow.response is not None and (spec.rpm, spec.daily_requests, spec.daily_tokens) != (
                None, None, None):
            self._show(spec, flow.response)

    def _show(self, spec: KeySpec, response: http.Response) -> None:
        # One pass over the fields: a node's own headers (its account's, not this key's) out, the key's in.
        headers = response.headers
        headers.fields = (*(f for f in headers.fields if not f[0].lower().startswith(b"x-ratelimit-")),
                          *((k.encode(), v.encode()) for k, v in ratelimit_headers(self.windows(spec)).items()))

    def _saw(self, name: str, day: dt.date, admission: Admission) -> None:
        """Keep what an admission read of a key's day; a figure it did not read stays as read before that day."""
        before = self._seen.get(name)
        if before is None or before.day != day:
            before = _DaySeen(day, None, None)
        self._seen[name] = _DaySeen(day, before.admitted if admission.admitted is None else admission.admitted,
                                    before.total_tokens if admission.total_tokens is None else admission.total_tokens,
                                    before.month_cost if admission.month_cost is None else admission.month_cost)

    def _rpm_window(self, name: str) -> deque[float]:
        """The key's admission times in the rolling minute (the older ones dropped)."""
        recent = self._recent.setdefault(name, deque())
        now = self._clock()
        while recent and recent[0] <= now - RPM_WINDOW_S:
            recent.popleft()
        return recent

    def budgets(self) -> list[Budget]:
        """Every limit of the configured keys with its use (``addon.observe.metrics``): rpm and concurrency in
        this process now; a budget as its last admission here read it, if that was in its current day or month."""
        today = self._now().date()
        out = []
        for spec in self.runtime.keys.specs.values():
            seen = self._seen.get(spec.name)
            for name in ("rpm", "concurrency", "daily_requests", "daily_tokens", "monthly_cost"):
                value = getattr(spec, name)
                if value is None:
                    continue
                used: float | None
                if name in ("rpm", "concurrency"):
                    used = self.live(spec.name, name)
                elif seen is None:
                    used = None
                elif name == "monthly_cost":
                    used = seen.month_cost if month_start(seen.day) == month_start(today) else None
                else:
                    used = (seen.admitted if name == "daily_requests" else seen.total_tokens) \
                        if seen.day == today else None
                out.append(Budget(spec.name, name, value, used))
        return out

    def _refuse(self, flow: http.HTTPFlow, spec: KeySpec, reason: str, response: http.Response) -> http.Response:
        _log_refusal(flow, spec, reason, response)
        self.runtime.submit(KeyCount(spec.name, self._now().date(), f"refused_{reason}"))
        self._show(spec, response)
        return response

    def _db_down(self, spec: KeySpec, day: dt.date, error: Exception | None) -> str | None:
        """The budgets of ``spec`` could not be read (``error``; None: not asked, it failed just before):
        None (admitted, its admission counted through the writer's journal) or "unavailable", as
        ``codex_limits_when_db_down`` says."""
        now = self._clock()
        if error is not None and now - self._last_outage_log >= _OUTAGE_LOG_EVERY_S:
            self._last_outage_log = now
            log.warning("client key budgets cannot be checked (%s): codex_limits_when_db_down=%s",
                        error_line(error), self.when_db_down)
        if self.when_db_down == "refuse":
            return "unavailable"
        if spec.daily_requests is not None:
            self.runtime.submit(KeyCount(spec.name, day, "admitted"))
            seen = self._seen.get(spec.name)
            if seen is not None and seen.day == day and seen.admitted is not None:
                seen.admitted += 1  # journaled: it counts once the database is back
        return None


def db_down_policy(options: Any) -> str:
    """``codex_limits_when_db_down``: one of ``WHEN_DB_DOWN``."""
    value = options.codex_limits_when_db_down
    if value not in WHEN_DB_DOWN:
        raise SettingsError(f"codex_limits_when_db_down must be one of {', '.join(WHEN_DB_DOWN)}, got {value!r}")
    return value


def ratelimit_headers(windows: Sequence[Window]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for a key's limits: ``-requests`` from the request limit that binds
    first (fewest remaining; on a tie the one that lasts longer: ``rpm`` or ``daily_requests``), ``-tokens``
    from ``daily_tokens``; the reset is the time until that limit is whole again, as OpenAI writes it."""
    headers: dict[str, str] = {}
    for unit, names in (("requests", ("rpm", "daily_requests")), ("tokens", ("daily_tokens",))):
        candidates = [w for w in windows if w.name in names]
        if candidates:
            w = min(candidates, key=lambda w: (w.remaining, -w.reset_s))
            headers |= {f"x-ratelimit-limit-{unit}": str(w.limit), f"x-ratelimit-remaining-{unit}": str(w.remaining),
                        f"x-ratelimit-reset-{unit}": duration_text(w.reset_s)}
    return headers


def duration_text(seconds: float) -> str:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers write one, rounded up: "250ms", "1s", "6m0s", "3h2m1s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _log_refusal(flow: http.HTTPFlow, spec: KeySpec, reason: str, response: http.Response) -> None:
    log.info("key %s: %s %s refused (%s, %d, %s)", spec.name, flow.request.method,
             flow.request.path.partition("?")[0][:200], reason, response.status_code,
             response.headers.get("x-request-id", "-"))


def _admit(engine: sa.Engine, spec: KeySpec, day: dt.date) -> Admission:
    with engine.begin() as conn:
        return admit(conn, spec.name, day, Budgets(spec.daily_requests, spec.daily_tokens, spec.monthly_cost))
