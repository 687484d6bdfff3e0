"""``GET /v1/key``: a client key's own limits, their use and when each resets, answered by the relay itself.

OpenAI clients' base URL (``…/v1``) and Anthropic clients' (the relay's root) both reach it. Client auth checks
the key as for a call (a missing or wrong one gets its 401), and the request never reaches a node: on the
relay's own port (reverse mode) this path is always answered here, 404 on a relay without client keys. The
answer is ``{"name", "day", "usage", "limits"}``: the key's use today (UTC) from ``client_key_usage`` (one
indexed read, off the event loop; ``usage`` is null without a reachable stats database) and per limit its
``limit``, ``used``, ``remaining``, ``resets_at`` (UTC) and ``resets_in`` (as the ``x-ratelimit-reset-*``
headers write it); ``rpm`` and ``concurrency`` as the fleet counts them (``client_key_calls``; without a
database, as this relay process does); each plan-shaped budget under its name with its ``window``, ``unit`` and
``models``. ``expires_at`` and ``warn_at`` are the key's. A key without limits gets an empty ``limits``. Status
lines poll it (docs/teams.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import sqlalchemy as sa
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.errors import CLIENT_KEY_NAME, error_response, fail_closed
from addon.guard.target import KEY_INFO_PATH, is_key_info_path
from addon.limits import RPM_WINDOW_S, Limits, Window, duration_text
from addon.refusal import answered
from addon.services.runtime import Runtime
from store import keycalls
from store.budgets import uses_of
from store.engine import error_line
from store.key_usage import KeyStats, key_report, per_key
from store.keycalls import Calls
from store.keys import KeySpec
from store.records import utcnow
from store.rollups import KEY_COLUMNS

log = logging.getLogger("codex.keyinfo")


class KeyInfo:
    """Answers ``GET /v1/key`` before the relay routes anything."""

    def __init__(self, runtime: Runtime, limits: Limits, now: Callable[[], dt.datetime] = utcnow) -> None:
        self.runtime = runtime  # its stats database and client keys
        self.limits = limits  # what this process counts of rpm and concurrency
        self._now = now

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (answered(flow) or not is_key_info_path(flow.request.path)
                or not isinstance(flow.client_conn.proxy_mode, ReverseMode)):
            return
        path = flow.request.path
        spec = self.runtime.keys.spec(flow.metadata.get(CLIENT_KEY_NAME, ""))
        if spec is None:  # client auth lets every request through: this relay has no client keys
            flow.response = error_response(path, 404, "codex-relay: this relay has no client keys "
                                           "(codex_client_keys): there is no key to describe", "no_client_keys")
            return
        if flow.request.method != "GET":
            flow.response = error_response(path, 405, f"codex-relay: {KEY_INFO_PATH} answers GET only",
                                           "method_not_allowed", allow="GET")
            return
        now = self._now()
        read, known = Read(None, {}, None), False
        engine = self.runtime.engine
        if engine is not None:
            try:
                read, known = await asyncio.to_thread(_query, engine, spec, now), True
            except Exception as e:  # the stats database is away: the answer says so (usage null)
                log.warning("GET %s for key %s: the stats database cannot be read (%s)", KEY_INFO_PATH, spec.name,
                            error_line(e))
        answer = key_answer(spec, read, known, self.limits, now)
        flow.response = http.Response.make(200, json.dumps(answer).encode(),
                                           {"content-type": "application/json", "cache-control": "no-store"})


class Read(NamedTuple):
    """What the database says of a key: its day in ``client_key_usage`` (None: no row), its budgets' use
    (``store.budgets.uses_of``), its calls fleet-wide (None: no fleet rpm or concurrency)."""

    row: KeyStats | None
    uses: dict[str, dict[str, tuple[float, dt.datetime | None]]]
    calls: Calls | None


def key_answer(spec: KeySpec, read: Read, known: bool, limits: Limits, now: dt.datetime) -> dict[str, Any]:
    """The endpoint's JSON for ``spec`` at ``now`` (UTC): ``read`` is what the database said, ``known`` whether
    it was read at all."""
    calls = read.calls

    def live(name: str, limit: str) -> int | None:
        if calls is None:
            return limits.live(name, limit)
        return calls.started if limit == "rpm" else calls.in_flight

    (report,) = key_report([read.row] if read.row is not None else [], {spec.name: spec}, now.date(), live,
                           read.uses)
    rpm = {w.name: w for w in limits.windows(spec)}.get("rpm")
    if calls is not None and calls.oldest is not None:
        rpm = Window("rpm", spec.rpm or 0, calls.started,
                     max(0.0, (calls.oldest - now).total_seconds() + RPM_WINDOW_S))
    found: dict[str, dict[str, Any]] = {}
    for name, entry in report["limits"].items():
        used = entry["used"] if known or name in ("rpm", "concurrency") else None
        resets_at = entry["resets_at"]
        wait = None
        if resets_at is not None:
            wait = (dt.datetime.fromisoformat(resets_at.removesuffix("Z")) - now).total_seconds()
        elif rpm is not None and name == "rpm":
            wait = rpm.reset_s
            resets_at = (now + dt.timedelta(seconds=wait)).isoformat(timespec="seconds") + "Z"
        found[name] = {"limit": entry["limit"], "used": used,
                       "remaining": max(0, entry["limit"] - used) if used is not None else None,
                       "resets_at": resets_at, "resets_in": duration_text(wait) if wait is not None else None}
    for b in spec.budgets or ():
        found[b.name] |= {"window": b.window, "unit": b.unit, "models": list(b.models) if b.models else None}
    usage = ({k: report[k] for k in (*KEY_COLUMNS, "month_cost", "refused")} if known else None)
    return {"name": spec.name, "day": now.date().isoformat(), "usage": usage, "limits": found,
            "expires_at": spec.expires_at.isoformat() + "Z" if spec.expires_at is not None else None,
            "warn_at": spec.warn_at}


def _query(engine: sa.Engine, spec: KeySpec, now: dt.datetime) -> Read:
    with engine.connect() as conn:
        rows = per_key(conn, now.date(), spec.name)
        uses = uses_of(conn, [spec], now)
        calls = keycalls.figures(conn, spec.name, now) if spec.fleet_limited else None
    return Read(rows[0] if rows else None, uses, calls)
