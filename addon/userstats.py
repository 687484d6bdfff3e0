"""A key holder's own usage, as claude-relay-service answers it: ``POST /apiStats/api/user-model-stats``.

Body ``{"apiKey": "<client key>", "period": "daily" | "monthly"}`` (CRS's default is monthly); the
answer is CRS's ``{"success": true, "data": [per model …], "period": …}`` for that key only, from
``codex_invocations`` (days are UTC here, so a ``crs`` source polling a codex-relay sets
``timezone = "+00:00"``). Errors are CRS's ``{"error", "message"}``. The key is the credential: the
path is open to requests without an auth header (client auth lets it through), and a key the relay
does not know gets 401. Only on the relay's own port (reverse mode) and only with client keys set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

import sqlalchemy as sa
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.errors import fail_closed
from addon.guard.target import USER_STATS_PATH, is_user_stats_path
from addon.refusal import answered
from addon.services.runtime import Runtime
from store.key_usage import models_of_key, month_start
from store.records import utcnow

log = logging.getLogger("codex.userstats")


def _format_cost(cost: float) -> str:
    """CRS's CostCalculator.formatCost."""
    return f"${cost:.2f}" if cost >= 1 else f"${cost:.4f}" if cost >= 0.001 else f"${cost:.6f}"


def crs_item(row: sa.Row, pricing: dict[str, float]) -> dict[str, Any]:
    """One model as CRS sends it: its inputTokens and input cost exclude cache reads and writes; each call's
    cost was stored, so ``real`` = ``rated`` = ``total`` and ``isLegacy`` is false."""
    n = {k: int(row._mapping[k]) for k in ("requests", "input_tokens", "cached_tokens", "cache_write_tokens",
                                           "output_tokens")}  # MySQL sums are Decimals
    cost, written = float(row.cost), float(row.cost_cache_write)  # cost_input includes the cache writes
    costs = {"input": float(row.cost_input) - written, "output": float(row.cost_output), "cacheCreate": written,
             "cacheWrite": written, "cacheRead": float(row.cost_cached), "ephemeral5m": 0.0, "ephemeral1h": 0.0,
             "total": cost, "real": cost, "rated": cost}
    return {"model": row.model, "requests": n["requests"],
            "inputTokens": n["input_tokens"] - n["cached_tokens"] - n["cache_write_tokens"],
            "outputTokens": n["output_tokens"], "cacheCreateTokens": n["cache_write_tokens"],
            "cacheReadTokens": n["cached_tokens"], "allTokens": n["input_tokens"] + n["output_tokens"],
            "costs": costs, "formatted": {k: _format_cost(costs[k]) for k in
                                         ("input", "output", "cacheWrite", "cacheRead", "total")},
            "pricing": pricing, "isLegacy": False}


class UserStats:
    """Answers the usage endpoint before the relay routes anything."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime  # its stats database, prices and client keys

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (answered(flow) or not isinstance(flow.client_conn.proxy_mode, ReverseMode)
                or not is_user_stats_path(flow.request.path) or not self.runtime.keys.enabled):
            return
        status, answer = await self._answer(flow)
        flow.response = http.Response.make(status, json.dumps(answer).encode(),
                                           {"content-type": "application/json; charset=utf-8"})

    async def _answer(self, flow: http.HTTPFlow) -> tuple[int, dict]:
        if flow.request.method != "POST":
            return 404, {"error": "Not found", "message": f"Cannot {flow.request.method} {USER_STATS_PATH}"}
        try:
            body = json.loads(flow.request.raw_content or b"{}")
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        api_key, period = body.get("apiKey"), body.get("period", "monthly")
        if not isinstance(api_key, str) or not api_key:
            return 400, {"error": "API Key or ID is required", "message": "Please provide your API Key or API ID"}
        name = self.runtime.keys.name_of(api_key)
        if name is None:
            return 401, {"error": "Invalid API key", "message": "API key not found"}
        engine = self.runtime.engine
        if engine is None:
            return 500, {"error": "Failed to get model statistics", "message": "no stats database"}
        today = utcnow().date()
        since = today if period == "daily" else month_start(today)
        rows = await asyncio.to_thread(_query, engine, name, since, today)
        prices = self.runtime.prices
        items = []
        for row in rows:
            price = prices.local_price(row.model) if prices else None
            pricing = ({"input": price.input, "output": price.output, "cacheWrite": price.cache_write,
                        "cacheRead": price.cached_input} if price else
                       {"input": 0.0, "output": 0.0, "cacheWrite": 0.0, "cacheRead": 0.0})
            items.append(crs_item(row, pricing))
        items.sort(key=lambda item: item["allTokens"], reverse=True)
        return 200, {"success": True, "data": items, "period": period}


def _query(engine: sa.Engine, key: str, since: dt.date, until: dt.date) -> list[sa.Row]:
    with engine.connect() as conn:
        return models_of_key(conn, key, since, until)
