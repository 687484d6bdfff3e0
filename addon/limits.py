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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from mitmproxy import http

from addon.errors import CLIENT_KEY_NAME, refusal_response
from addon.guard.endpoints import DEFAULT_KEY_ENDPOINTS, UNBILLED, endpoint_allowed, route
from addon.observe.metrics import Budget
from addon.services.runtime import Runtime
from addon.services.settings import SettingsError
from store.engine import error_line
from store.key_usage import Budgets, KeyStats, admit, budget_reset, key_report, month_start
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
        # (key name, budget) -> (the day it was read, its use then), as the last budget check read it
        self._used: dict[tuple[str, str], tuple[dt.date, float]] = {}
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
        recent = self._recent.setdefault(spec.name, deque())
        while recent and recent[0] <= now - RPM_WINDOW_S:
            recent.popleft()
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
                seen: dict[str, float] = {}
                over = await asyncio.to_thread(_admit, engine, spec, day, seen)
                self._used.update({(spec.name, budget): (day, use) for budget, use in seen.items()})
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

    def report(self, rows: Iterable[KeyStats], day: dt.date) -> list[dict]:
        """``store.key_usage.key_report`` with this process's rpm window and calls in flight."""
        now = self._clock()

        def live(name: str, limit: str) -> int:
            return self._rpm_used(name, now) if limit == "rpm" else self.in_flight(name)

        return key_report(rows, self.runtime.keys.specs, day, live)

    def budgets(self) -> list[Budget]:
        """Every limit of the configured keys with its use (``addon.observe.metrics``): rpm and concurrency in
        this process now; a budget as its last check here read it, if that was in its current day or month."""
        now, today = self._clock(), self._now().date()
        out = []
        for spec in self.runtime.keys.specs.values():
            for name in ("rpm", "concurrency", "daily_requests", "daily_tokens", "monthly_cost"):
                value = getattr(spec, name)
                if value is None:
                    continue
                if name == "rpm":
                    used: float | None = self._rpm_used(spec.name, now)
                elif name == "concurrency":
                    used = self.in_flight(spec.name)
                else:
                    day, use = self._used.get((spec.name, name), (None, None))
                    current = day is not None and (month_start(day) == month_start(today) if name == "monthly_cost"
                                                   else day == today)
                    used = use if current else None
                out.append(Budget(spec.name, name, value, used))
        return out

    def _rpm_used(self, name: str, now: float) -> int:
        return len([t for t in self._recent.get(name, ()) if t > now - RPM_WINDOW_S])

    def _refuse(self, flow: http.HTTPFlow, spec: KeySpec, reason: str, response: http.Response) -> http.Response:
        _log_refusal(flow, spec, reason, response)
        self.runtime.submit(KeyCount(spec.name, self._now().date(), f"refused_{reason}"))
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
        return None


def db_down_policy(options: Any) -> str:
    """``codex_limits_when_db_down``: one of ``WHEN_DB_DOWN``."""
    value = options.codex_limits_when_db_down
    if value not in WHEN_DB_DOWN:
        raise SettingsError(f"codex_limits_when_db_down must be one of {', '.join(WHEN_DB_DOWN)}, got {value!r}")
    return value


def _log_refusal(flow: http.HTTPFlow, spec: KeySpec, reason: str, response: http.Response) -> None:
    log.info("key %s: %s %s refused (%s, %d, %s)", spec.name, flow.request.method,
             flow.request.path.partition("?")[0][:200], reason, response.status_code,
             response.headers.get("x-request-id", "-"))


def _admit(engine: sa.Engine, spec: KeySpec, day: dt.date, seen: dict[str, float]) -> str | None:
    with engine.begin() as conn:
        return admit(conn, spec.name, day, Budgets(spec.daily_requests, spec.daily_tokens, spec.monthly_cost),
                     seen)
