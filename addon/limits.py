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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from mitmproxy import http

from addon.errors import CLIENT_KEY_NAME, refusal_response
from addon.runtime import Runtime
from store.key_usage import Budgets, KeyStats, admit, budget_reset, count_refusal, key_report
from store.keys import KeySpec
from store.records import utcnow

log = logging.getLogger("codex.limits")

RPM_WINDOW_S = 60.0
# A concurrency slot frees when a call of the key ends: Codex, the one client that waits on its own, retries
# after this many seconds (five times), the others are told at once.
CONCURRENCY_RETRY_AFTER_S = 1


class Limits:
    """The configured keys' limits and this process's rate and concurrency counts."""

    def __init__(self, runtime: Runtime, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = utcnow) -> None:
        self.runtime = runtime
        self.keys: dict[str, KeySpec] = {}
        self._clock = clock
        self._now = now
        self._recent: dict[str, deque[float]] = {}  # key name -> admission times in the last minute
        self._in_flight: dict[str, int] = {}  # key name -> calls holding a concurrency slot
        self._holders: dict[str, str] = {}  # flow id -> key name of its slot

    def set_keys(self, specs: Iterable[KeySpec]) -> None:
        """Use these keys from now on; ValueError names a key whose ``nodes`` name an unknown node."""
        specs = list(specs)
        known = {n.id for n in self.runtime.pool}
        for spec in specs:
            unknown = [n for n in spec.nodes or () if n not in known]
            if unknown:
                raise ValueError(f"key {spec.name!r}: unknown node id(s) {', '.join(unknown)} "
                                 f"(configured: {', '.join(sorted(known)) or 'none'})")
        self.keys = {s.name: s for s in specs}

    def _spec(self, flow: http.HTTPFlow) -> KeySpec | None:
        return self.keys.get(flow.metadata.get(CLIENT_KEY_NAME, ""))

    def barred(self, flow: http.HTTPFlow) -> set[str]:
        """The ids of the nodes this flow's key may not use."""
        spec = self._spec(flow)
        if spec is None or spec.nodes is None:
            return set()
        return {n.id for n in self.runtime.pool} - set(spec.nodes)

    async def admit(self, flow: http.HTTPFlow, model: str | None) -> http.Response | None:
        """None when the call may go on (it then holds a slot until ``release``), else the refusal."""
        spec = self._spec(flow)
        if spec is None:
            return None
        path = flow.request.path
        if not spec.allows_model(model):
            # 400, not 403: Claude Code shows every 403 as "Failed to authenticate."
            return await self._refuse(flow, spec, "model", refusal_response(
                path, 400, f"codex-relay: key {spec.name!r} may not use model {model or '(none given)'!r}; "
                f"allowed: {', '.join(spec.models or ())}", "model_not_allowed"))
        if spec.nodes is not None and self.runtime.pool.choose(exclude=self.barred(flow)) is None:
            return await self._refuse(flow, spec, "nodes", refusal_response(
                path, 429, f"codex-relay: none of key {spec.name!r}'s nodes ({', '.join(spec.nodes)}) may take "
                "calls: each is disabled or has weight 0", "no_node_available"))
        now = self._clock()
        recent = self._recent.setdefault(spec.name, deque())
        while recent and recent[0] <= now - RPM_WINDOW_S:
            recent.popleft()
        if spec.rpm is not None and len(recent) >= spec.rpm:
            wait = max(1, math.ceil(recent[0] + RPM_WINDOW_S - now)) if recent else RPM_WINDOW_S
            return await self._refuse(flow, spec, "rate", refusal_response(
                path, 429, f"codex-relay: key {spec.name!r} reached its rpm limit ({spec.rpm} requests per "
                f"minute); a request is free again in {wait} s", "rate_limited", retry_after=wait))
        if spec.concurrency is not None and self._in_flight.get(spec.name, 0) >= spec.concurrency:
            return await self._refuse(flow, spec, "concurrency", refusal_response(
                path, 429, f"codex-relay: key {spec.name!r} reached its concurrency limit ({spec.concurrency} "
                "calls in flight); one is free when a call of this key ends", "concurrency_limited",
                retry_after=CONCURRENCY_RETRY_AFTER_S))
        # Taken before the database is asked: calls admitted meanwhile see this one.
        recent.append(now)
        self._in_flight[spec.name] = self._in_flight.get(spec.name, 0) + 1
        self._holders[flow.id] = spec.name
        engine = self.runtime.engine
        if not spec.needs_database or engine is None:
            return None
        day = self._now().date()
        over: str | None = "error"  # until the database answers: an error there (a 500) frees the slot too
        try:
            over = await asyncio.to_thread(_admit, engine, spec, day)
        finally:
            if over is not None:
                self.release(flow)
                recent.remove(now)
        if over is None:
            return None
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

    def release(self, flow: http.HTTPFlow) -> None:
        """The call of ``flow`` ended: its concurrency slot is free (no-op without one)."""
        name = self._holders.pop(flow.id, None)
        if name is not None:
            self._in_flight[name] -= 1

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def report(self, rows: Iterable[KeyStats], day: dt.date) -> list[dict]:
        """``store.key_usage.key_report`` with this process's rpm window and calls in flight."""
        now = self._clock()

        def live(name: str, limit: str) -> int:
            if limit == "rpm":
                return len([t for t in self._recent.get(name, ()) if t > now - RPM_WINDOW_S])
            return self.in_flight(name)

        return key_report(rows, self.keys, day, live)

    async def _refuse(self, flow: http.HTTPFlow, spec: KeySpec, reason: str,
                      response: http.Response) -> http.Response:
        _log_refusal(flow, spec, reason, response)
        engine = self.runtime.engine
        if engine is not None:
            await asyncio.to_thread(_count, engine, spec.name, self._now().date(), reason)
        return response


def _log_refusal(flow: http.HTTPFlow, spec: KeySpec, reason: str, response: http.Response) -> None:
    log.info("key %s: %s %s refused (%s, %d, %s)", spec.name, flow.request.method,
             flow.request.path.partition("?")[0][:200], reason, response.status_code,
             response.headers.get("x-request-id", "-"))


def _admit(engine: sa.Engine, spec: KeySpec, day: dt.date) -> str | None:
    with engine.begin() as conn:
        over = admit(conn, spec.name, day, Budgets(spec.daily_requests, spec.daily_tokens, spec.monthly_cost))
        if over is not None:
            count_refusal(conn, spec.name, day, "budget")
        return over


def _count(engine: sa.Engine, name: str, day: dt.date, reason: str) -> None:
    with engine.begin() as conn:
        count_refusal(conn, name, day, reason)
