"""Enforcing what a client key may do (``store.keys.KeySpec``) before its call reaches a node.

The relay asks ``admit`` once per API call, after client auth named the key and the body told the
model; a refusal is an error answer in the client's API shape and the call reaches no node, counts
against no node and is not an invocation; it is counted per key and reason in ``client_key_usage``.
In this order: ``expires_at`` (400 ``key_expired``), ``endpoints``, ``models`` (400 ``model_not_allowed``),
``nodes`` (429 ``no_node_available`` when none of them may take calls), ``rpm`` over a rolling minute and
``concurrency`` (429 ``rate_limited`` / ``concurrency_limited``, with a short ``retry-after``; counted
fleet-wide in the database, ``store.keycalls``, or in this process without one), then the budgets (429
``budget_exceeded``): all in one transaction run off the event loop (``store.budgets.admit_key``). Every answer is an
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
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import sqlalchemy as sa
from mitmproxy import http

from addon.errors import CLIENT_KEY_NAME, refusal_response
from addon.guard.endpoints import DEFAULT_KEY_ENDPOINTS, UNBILLED, endpoint_allowed, route
from addon.observe.metrics import Budget
from addon.services.runtime import Runtime
from addon.services.settings import SettingsError
from store import keycalls
from store.budgets import Use, Verdict, admit_key, first_reset
from store.engine import error_line
from store.key_usage import KeyStats, budget_reset, key_report, month_start
from store.keys import KeySpec
from store.periodic import Periodic
from store.records import KeyCount, utcnow

log = logging.getLogger("codex.limits")

RPM_WINDOW_S = keycalls.RPM_WINDOW_S
TIDY_EVERY = dt.timedelta(minutes=1)  # how often a relay drops the calls and minute buckets no count needs
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
        self._uses: dict[str, tuple[Use, ...]] = {}  # key name -> its budgets as the latest admission read them
        self._fleet_rpm: dict[str, tuple[int, float]] = {}  # key name -> fleet rpm use, when it is whole again
        self._rows: dict[str, str] = {}  # holder -> its client_key_calls row (fleet-wide slots)
        self._leases: Periodic | None = None
        self._tidy_at = dt.datetime.min
        self._ending: set[asyncio.Future[None]] = set()  # fleet slots being ended off the event loop
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
        if spec.expires_at is not None and self._now() >= spec.expires_at:
            # 400: both clients stop at once and show the message (Claude Code shows a 403 as "Failed to
            # authenticate.", hiding why).
            return self._refuse(flow, spec, "expired", refusal_response(
                path, 400, f"codex-relay: key {spec.name!r} expired at {spec.expires_at.isoformat()}Z (UTC); ask "
                "the relay's operator for a new key or a later expires_at", "key_expired"))
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
        engine = self.runtime.engine
        # Fleet-wide when the database is there (and was not failing a moment ago), else this process's count.
        fleet = spec.fleet_limited and engine is not None and self._clock() >= self._db_retry_at
        if not fleet and (refusal := self._local_limits(flow, spec)) is not None:
            return refusal
        holder = holder or flow.id
        now = self._take(spec.name, holder)  # before the database is asked: calls admitted meanwhile see it
        if engine is None:
            return None
        self._keep_leases(engine)  # every key's calls fill minute buckets: the round drops the stale ones
        if not (spec.needs_database or fleet):
            return None
        at = self._now()
        over: str | Use | None = "error"  # until the database answers: an error there frees the slot too
        verdict = None
        try:
            if self._clock() < self._db_retry_at:
                over = self._db_down(spec, at.date(), None)
            else:
                row = uuid.uuid4().hex if fleet else None
                if fleet and self._ending:
                    await asyncio.wait(list(self._ending))  # a slot this relay freed is free fleet-wide first
                verdict = await asyncio.to_thread(_admit, engine, spec, at, model, row)
                over = verdict.over
                if over is None and row is not None:
                    self._rows[holder] = row
                self._saw(spec, at, model, verdict)
        except Exception as e:  # unreachable, frozen, or anything else: never a 500
            self._db_retry_at = self._clock() + DB_RETRY_S
            over = self._db_down(spec, at.date(), e)
            if over is None and fleet:  # the fleet's counts are away: this process's own, as without a database
                self._give_back(flow, holder, spec.name, now)
                if (refusal := self._local_limits(flow, spec)) is not None:
                    return refusal
                self._take(spec.name, holder)
        finally:
            if over is not None:
                self._give_back(flow, holder, spec.name, now)
        if over is None:
            if verdict is not None:
                self._warn(spec, model, verdict)
            return None
        if over == "unavailable":
            return self._refuse(flow, spec, "budget", refusal_response(
                path, 503, f"codex-relay: key {spec.name!r} has limits that cannot be checked while the stats "
                "database is unreachable; try again later", "limits_unavailable", retry_after=10))
        if over == "rpm":
            assert verdict is not None and verdict.calls is not None
            oldest = verdict.calls.oldest
            wait = max(1, math.ceil((oldest - at).total_seconds() + RPM_WINDOW_S)) if oldest else 1
            return self._rpm_refusal(flow, spec, wait)
        if over == "concurrency":
            return self._concurrency_refusal(flow, spec)
        return self._budget_refusal(flow, spec, over, at)

    def _local_limits(self, flow: http.HTTPFlow, spec: KeySpec) -> http.Response | None:
        """The key's rpm and concurrency as this process counts them: the refusal, or None."""
        now = self._clock()
        recent = self._rpm_window(spec.name)
        if spec.rpm is not None and len(recent) >= spec.rpm:
            wait = max(1, math.ceil(recent[0] + RPM_WINDOW_S - now)) if recent else math.ceil(RPM_WINDOW_S)
            return self._rpm_refusal(flow, spec, wait)
        if spec.concurrency is not None and self._in_flight.get(spec.name, 0) >= spec.concurrency:
            return self._concurrency_refusal(flow, spec)
        return None

    def _rpm_refusal(self, flow: http.HTTPFlow, spec: KeySpec, wait: int) -> http.Response:
        return self._refuse(flow, spec, "rate", refusal_response(
            flow.request.path, 429, f"codex-relay: key {spec.name!r} reached its rpm limit ({spec.rpm} requests "
            f"per minute); a request is free again in {wait} s", "rate_limited", retry_after=wait))

    def _concurrency_refusal(self, flow: http.HTTPFlow, spec: KeySpec) -> http.Response:
        return self._refuse(flow, spec, "concurrency", refusal_response(
            flow.request.path, 429, f"codex-relay: key {spec.name!r} reached its concurrency limit "
            f"({spec.concurrency} calls in flight); one is free when a call of this key ends", "concurrency_limited",
            retry_after=CONCURRENCY_RETRY_AFTER_S))

    def _budget_refusal(self, flow: http.HTTPFlow, spec: KeySpec, over: str | Use, at: dt.datetime) -> http.Response:
        """A budget (a shorthand's name, or a plan-shaped budget's ``Use``) refused the call."""
        day = at.date()
        self.runtime.submit(KeyCount(spec.name, day, "refused_budget"))
        if isinstance(over, Use):
            name, limit, reset, unit = over.budget.name, over.budget.limit, over.resets_at, over.budget.unit
            subject = f"{spec.name} {name}"
        else:
            name, limit, reset = over, getattr(spec, over), budget_reset(day, monthly=over == "monthly_cost")
            unit, subject = "cost" if over == "monthly_cost" else "", spec.name
        until = f"it resets at {reset.isoformat()}Z (UTC)" if reset is not None else "it does not reset"
        self.runtime.alert("key_budget_reached", subject,
                           f"client key {spec.name} reached its {name} limit ({limit:g}); calls are refused "
                           + (f"until {reset.isoformat()}Z" if reset is not None else "from now on"))
        # No retry-after: it is hours away, and Codex and the anthropic SDK would sleep all of it. OpenAI's
        # ``usage_limit_reached`` with ``resets_at`` makes Codex stop at once with "You've hit your usage limit.
        # Try again at <its local time of the reset>."; the other clients show the message.
        response = refusal_response(
            flow.request.path, 429, f"codex-relay: key {spec.name!r} reached its {name} limit ({limit:g}"
            f"{' USD' if unit == 'cost' else ''}); {until}", "budget_exceeded", openai_type="usage_limit_reached",
            **({"resets_at": int(reset.replace(tzinfo=dt.UTC).timestamp())} if reset is not None else {}))
        _log_refusal(flow, spec, "budget", response)
        self._show(spec, response)
        return response

    def _warn(self, spec: KeySpec, model: str | None, verdict: Verdict) -> None:
        """``key_budget_warning`` for each budget of this call that its admission took to ``warn_at`` of its
        limit (told once per budget and window, fleet-wide: ``addon.observe.alerts``)."""
        if spec.warn_at is None:
            return
        for use in verdict.uses:
            b = use.budget
            used = use.used + (1 if b.unit == "requests" else 0)
            if b.counts(model) and used >= spec.warn_at * b.limit:
                self.runtime.alert("key_budget_warning", f"{spec.name} {b.name}",
                                   f"client key {spec.name} used {used:g} of its {b.name} limit ({b.limit:g}, "
                                   f"warning at {spec.warn_at:.0%})", window=use.window)

    def _take(self, name: str, holder: str) -> float:
        """Count a call of key ``name`` here (rpm window, concurrency slot); its time on the process clock."""
        now = self._clock()
        self._rpm_window(name).append(now)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._holders[holder] = name
        return now

    def _give_back(self, flow: http.HTTPFlow, holder: str, name: str, taken: float) -> None:
        """Undo ``_take``: the call was refused after all."""
        self.release(flow, holder)
        recent = self._recent.get(name)
        if recent is not None and taken in recent:
            recent.remove(taken)

    def _keep_leases(self, engine: sa.Engine) -> None:
        """Start the round that keeps this relay's fleet slots leased and drops stale calls and minute buckets
        (once)."""
        if self._leases is None:
            self._leases = Periodic("codex-leases", keycalls.LEASE_S / 4, lambda: self._lease_round(engine),
                                    lambda e: log.warning("client key leases not refreshed: %s", error_line(e)))
            self._leases.start()
            self.runtime.on_shutdown(self._leases.stop)

    def _lease_round(self, engine: sa.Engine) -> None:
        now = self._now()
        keycalls.refresh(engine, list(self._rows.values()), now)
        if now >= self._tidy_at:
            keycalls.tidy(engine, now)
            self._tidy_at = now + TIDY_EVERY

    def model_filter(self, flow: http.HTTPFlow) -> Callable[[str], bool] | None:
        """Which models this flow's key may use (``KeySpec.allows_model``); None: any model (or no key)."""
        spec = self._spec(flow)
        return spec.allows_model if spec is not None and spec.models is not None else None

    def release(self, flow: http.HTTPFlow, holder: str | None = None) -> None:
        """The call of ``flow`` (``holder``: as given to ``admit``) ended: its concurrency slot is free (no-op
        without one)."""
        holder = holder or flow.id
        name = self._holders.pop(holder, None)
        if name is not None:
            self._in_flight[name] -= 1
        row = self._rows.pop(holder, None)
        engine = self.runtime.engine
        if row is not None and engine is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the event loop (a test, a hook run by hand): end it here
                _end(engine, row)
                return
            ending = loop.run_in_executor(None, _end, engine, row)
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def live(self, name: str, limit: str) -> int:
        """What this process counts of a key's ``rpm`` (its calls in the rolling minute) or ``concurrency``."""
        if limit == "rpm":
            return len(self._rpm_window(name))
        return self.in_flight(name)

    def report(self, rows: Iterable[KeyStats], day: dt.date,
               budget_uses: Mapping[str, Mapping[str, tuple[float, dt.datetime | None]]] | None = None) -> list[dict]:
        """``store.key_usage.key_report`` with this process's rpm window and calls in flight."""
        return key_report(rows, self.runtime.keys.specs, day, self.live, budget_uses)

    def windows(self, spec: KeySpec) -> list[Window]:
        """The key's request and token limits as this process knows them now, without asking the database:
        ``rpm`` from its window (whole again when its newest call leaves it), ``daily_requests`` and
        ``daily_tokens`` as its latest admission of the key today read them (none read yet: left out)."""
        found = []
        if spec.rpm is not None:
            recent = self._rpm_window(spec.name)
            used, reset = len(recent), max(0.0, recent[-1] + RPM_WINDOW_S - self._clock()) if recent else 0.0
            fleet_used, whole_at = self._fleet_rpm.get(spec.name, (0, -math.inf))
            if whole_at > self._clock() and fleet_used > used:  # the fleet's count as the latest admission read it
                used, reset = fleet_used, whole_at - self._clock()
            found.append(Window("rpm", spec.rpm, used, reset))
        now = self._now()
        seen = self._seen.get(spec.name)
        if seen is not None and seen.day < now.date():
            seen = _DaySeen(now.date(), 0, 0)  # a new UTC day: the day's counts start again
        midnight = (budget_reset(now.date(), monthly=False) - now).total_seconds()
        if spec.daily_requests is not None and seen is not None and seen.admitted is not None:
            found.append(Window("daily_requests", spec.daily_requests, seen.admitted, midnight))
        if spec.daily_tokens is not None and seen is not None and seen.total_tokens is not None:
            found.append(Window("daily_tokens", spec.daily_tokens, seen.total_tokens, midnight))
        for use in self.current_uses(spec):
            b = use.budget
            if b.unit != "cost" and b.models is None:  # a per-model budget does not bind the key's other calls
                found.append(Window(b.name, int(b.limit), int(use.used),
                                    (use.resets_at - now).total_seconds() if use.resets_at is not None else math.inf))
        return found

    def show(self, flow: http.HTTPFlow) -> None:
        """Put the limits of ``flow``'s key on its answer (``flow.response``), when it has any."""
        spec = self._spec(flow)
        if spec is not None and flow.response is not None and (
                (spec.rpm, spec.daily_requests, spec.daily_tokens) != (None, None, None)
                or any(b.unit != "cost" and b.models is None for b in spec.budgets or ())):
            self._show(spec, flow.response)

    def _show(self, spec: KeySpec, response: http.Response) -> None:
        # One pass over the fields: a node's own headers (its account's, not this key's) out, the key's in.
        headers = response.headers
        headers.fields = (*(f for f in headers.fields if not f[0].lower().startswith(b"x-ratelimit-")),
                          *((k.encode(), v.encode()) for k, v in ratelimit_headers(self.windows(spec)).items()))

    def _saw(self, spec: KeySpec, at: dt.datetime, model: str | None, verdict: Verdict) -> None:
        """Keep what an admission read: the key's day (a figure it did not read stays as read before that day),
        its budgets, its fleet rpm."""
        name, day, admission = spec.name, at.date(), verdict.day
        if verdict.uses:
            # An admitted call is one of the requests its budgets count (tokens and cost come after it).
            counted = verdict.over is None
            self._uses[name] = tuple(
                replace(u, used=u.used + 1, resets_at=u.resets_at or first_reset(u.budget.window, at))
                if counted and u.budget.unit == "requests" and u.budget.counts(model) else u
                for u in verdict.uses)
        if verdict.calls is not None:
            calls = verdict.calls
            oldest = calls.oldest or at
            self._fleet_rpm[name] = (calls.started + (verdict.over is None),
                                     self._clock() + max(0.0, (oldest - at).total_seconds() + RPM_WINDOW_S))
        if admission is None:
            return
        before = self._seen.get(name)
        if before is None or before.day != day:
            before = _DaySeen(day, None, None)
        self._seen[name] = _DaySeen(day, before.admitted if admission.admitted is None else admission.admitted,
                                    before.total_tokens if admission.total_tokens is None else admission.total_tokens,
                                    before.month_cost if admission.month_cost is None else admission.month_cost)

    def current_uses(self, spec: KeySpec) -> list[Use]:
        """The key's budgets as its latest admission here read them, those whose window has not moved on since
        (a rolling window's always)."""
        now = self._now()
        return [u for u in self._uses.get(spec.name, ()) if u.budget in (spec.budgets or ())
                and (u.budget.window in ("5h", "total") or u.resets_at is None or u.resets_at > now)]

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
            uses = {u.budget: u.used for u in self.current_uses(spec)}
            out.extend(Budget(spec.name, b.name, b.limit, uses.get(b)) for b in spec.budgets or ())
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
    first (fewest remaining; on a tie the one that lasts longer: ``rpm``, ``daily_requests`` or a budget of
    requests), ``-tokens`` likewise from ``daily_tokens`` and the budgets of tokens; the reset is the time until
    that limit is whole again, as OpenAI writes it (a ``total`` budget's never: its limit is shown alone)."""
    headers: dict[str, str] = {}
    for unit in ("requests", "tokens"):
        candidates = [w for w in windows if w.name == "rpm" and unit == "requests" or w.name.endswith(f"_{unit}")]
        if candidates:
            w = min(candidates, key=lambda w: (w.remaining, -w.reset_s))
            headers |= {f"x-ratelimit-limit-{unit}": str(w.limit), f"x-ratelimit-remaining-{unit}": str(w.remaining),
                        **({f"x-ratelimit-reset-{unit}": duration_text(w.reset_s)} if math.isfinite(w.reset_s) else {})}
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


_DEADLOCK = 1213  # MariaDB's ER_LOCK_DEADLOCK: the transaction was rolled back and may simply run again


def _admit(engine: sa.Engine, spec: KeySpec, at: dt.datetime, model: str | None, row: str | None) -> Verdict:
    try:
        with engine.begin() as conn:
            return admit_key(conn, spec, at, model, row)
    except sa.exc.OperationalError as e:
        # A deadlock with the writer's upserts is no outage: run it once more before calling the database down.
        if getattr(e.orig, "args", (None,))[0] != _DEADLOCK:
            raise
    with engine.begin() as conn:
        return admit_key(conn, spec, at, model, row)


def _end(engine: sa.Engine, row: str) -> None:
    try:
        keycalls.end(engine, row)
    except Exception as e:  # its lease runs out instead
        log.warning("a fleet slot was not ended (its lease frees it): %s", error_line(e))
