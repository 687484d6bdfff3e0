"""Test helpers for stats sources: a claude-relay-service (CRS) stats endpoint on 127.0.0.1 that
behaves as CRS's code does, scripted answers, and the rows the store wrote.

``FakeStats`` follows CRS's ``src/routes/apiStats.js`` (``POST /apiStats/api/user-model-stats``) and
its usage bookkeeping, written from reading them (nothing shared with ``store.sources.crs``, so a
test of that module against this fake is not circular):

- only ``POST`` on that path; anything else gets Express's HTML 404 ("Cannot GET /…");
- a body that is not JSON reads as ``{}`` (Express's json parser skips other content types);
- ``apiId`` must be a UUID (400), name a key (404) that is active (403); else ``apiKey`` must be a
  valid key (401); neither is a 400; errors are ``{error, message}`` with no ``success``;
- ``period`` defaults to ``monthly``; ``daily`` is today in ``TIMEZONE_OFFSET`` (whole hours, +8 by
  default), ``alltime`` is everything, any other value reads the month and is echoed as given;
- each model item has every field CRS sends: ``requests, inputTokens, outputTokens,
  cacheCreateTokens, cacheReadTokens, allTokens``, ``costs{input, output, cacheCreate, cacheWrite,
  cacheRead, ephemeral5m, ephemeral1h, total}`` and, when each call's cost was stored, ``costs.real``
  and ``costs.rated`` with ``total = real``; ``formatted``, ``pricing`` and ``isLegacy``; sorted by
  ``allTokens``, largest first; models are stored under CRS's normalised names.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from store.schema import stats_source_deltas, stats_source_snapshots

PATH = "/apiStats/api/user-model-stats"
_UUID = re.compile(r"^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}$", re.IGNORECASE)
# CRS's static fallback prices, USD per 1M tokens (its pricing service knows more models).
PRICING = {"claude-sonnet-4-5-20250929": (3.0, 15.0, 3.75, 0.3), "gpt-5-codex": (1.25, 10.0, 1.25, 0.125)}
UNKNOWN_PRICING = (3.0, 15.0, 3.75, 0.3)  # input, output, cacheWrite, cacheRead
_FIELDS = ("requests", "inputTokens", "outputTokens", "cacheCreateTokens", "cacheReadTokens", "allTokens",
           "ephemeral5mTokens", "ephemeral1hTokens")


@dataclass(slots=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Key:
    id: str
    secret: str
    name: str
    active: bool = True


def crs_model_name(model: str) -> str:
    """CRS's stored name of a model (its redis ``_normalizeModelName``)."""
    if ".anthropic." in model or ".claude" in model:
        name = re.sub(r"^[a-z0-9-]+\.", "", model, count=1).replace("anthropic.", "", 1)
        return re.sub(r"-v\d+:\d+$", "", name)
    return re.sub(r"-v\d+:\d+$|:latest$", "", model)


def format_cost(cost: float) -> str:
    """CRS's CostCalculator.formatCost."""
    return f"${cost:.2f}" if cost >= 1 else f"${cost:.4f}" if cost >= 0.001 else f"${cost:.6f}"


class FakeStats:
    """A CRS stats endpoint. ``add_key`` makes an API key, ``record`` counts a call as CRS does;
    ``queue(status, body)`` scripts the next answers instead (malformed ones)."""

    def __init__(self, tz_hours: int = 8, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.seen: list[SeenRequest] = []
        self.keys: dict[str, Key] = {}
        self.tz_hours = tz_hours
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))  # naive UTC
        # redis hashes usage:{keyId}:model:{daily|monthly|alltime}:{model}[:{date|month}] -> fields
        self.usage: dict[str, dict[str, int]] = {}
        self._script: deque[tuple[int, str]] = deque()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with fake._lock:
                    fake.seen.append(SeenRequest(self.command, self.path, {k.lower(): v for k, v in
                                                                          self.headers.items()}, raw))
                    scripted = fake._script.popleft() if fake._script else None
                    status, ctype, text = ((scripted[0], "application/json", scripted[1]) if scripted
                                           else fake._route(self.command, self.path,
                                                            self.headers.get("content-type", ""), raw))
                data = text.encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="fake-stats", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{PATH}"

    def queue(self, status: int, body: str | dict) -> None:
        with self._lock:
            self._script.append((status, body if isinstance(body, str) else json.dumps(body)))

    def add_key(self, name: str = "relay", *, active: bool = True) -> Key:
        key = Key(id=str(uuid.uuid4()), secret=f"cr_{uuid.uuid4().hex}", name=name, active=active)
        with self._lock:
            self.keys[key.id] = key
        return key

    def record(self, key: Key, model: str, *, input_tokens: int = 0, output_tokens: int = 0, cache_create: int = 0,
               cache_read: int = 0, real_cost: float | None = None, rated_cost: float | None = None,
               ephemeral_1h: int = 0) -> None:
        """One call as CRS counts it: into today's, this month's and the all-time hash of its model.
        ``real_cost``/``rated_cost`` given: CRS stored the call's cost (then ``isLegacy`` is false)."""
        model = crs_model_name(model)
        today = self.today()
        counts = {"requests": 1, "inputTokens": input_tokens, "outputTokens": output_tokens,
                  "cacheCreateTokens": cache_create, "cacheReadTokens": cache_read,
                  "allTokens": input_tokens + output_tokens + cache_create + cache_read,
                  "ephemeral5mTokens": cache_create - ephemeral_1h, "ephemeral1hTokens": ephemeral_1h}
        if real_cost is not None or rated_cost is not None:
            counts["realCostMicro"] = round((real_cost or 0) * 1e6)
            counts["ratedCostMicro"] = round((rated_cost if rated_cost is not None else real_cost or 0) * 1e6)
        with self._lock:
            for bucket in (f"daily:{model}:{today}", f"monthly:{model}:{today[:7]}", f"alltime:{model}"):
                data = self.usage.setdefault(f"usage:{key.id}:model:{bucket}", {})
                for name, value in counts.items():
                    if name != "allTokens" or not bucket.startswith("alltime"):  # alltime keys lack it
                        data[name] = data.get(name, 0) + value

    def today(self) -> str:
        """CRS's getDateStringInTimezone: the date at UTC + TIMEZONE_OFFSET."""
        return (self.clock() + dt.timedelta(hours=self.tz_hours)).strftime("%Y-%m-%d")

    def _route(self, method: str, path: str, ctype: str, raw: bytes) -> tuple[int, str, str]:
        if method != "POST" or path.split("?")[0] != PATH:
            page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n'
                    f"</head>\n<body>\n<pre>Cannot {method} {path}</pre>\n</body>\n</html>\n")
            return 404, "text/html; charset=utf-8", page
        body = {}
        if "json" in ctype:
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return 400, "text/html; charset=utf-8", "<pre>SyntaxError: Unexpected token in JSON</pre>"
        status, answer = self._user_model_stats(body if isinstance(body, dict) else {})
        return status, "application/json; charset=utf-8", json.dumps(answer)

    def _user_model_stats(self, body: dict) -> tuple[int, dict]:
        api_id, api_key, period = body.get("apiId"), body.get("apiKey"), body.get("period", "monthly")
        if api_id:
            if not isinstance(api_id, str) or not _UUID.match(api_id):
                return 400, {"error": "Invalid API ID format", "message": "API ID must be a valid UUID"}
            key = self.keys.get(api_id)
            if key is None:
                return 404, {"error": "API key not found", "message": "The specified API key does not exist"}
            if not key.active:
                return 403, {"error": "API key is disabled", "message": f'API Key "{key.name}" 已被禁用',
                             "keyName": key.name}
        elif api_key:
            key = next((k for k in self.keys.values() if k.secret == api_key and k.active), None)
            if key is None:
                return 401, {"error": "Invalid API key", "message": "API key not found"}
        else:
            return 400, {"error": "API Key or ID is required", "message": "Please provide your API Key or API ID"}
        today = self.today()
        prefix = (f"usage:{key.id}:model:daily:" if period == "daily" else f"usage:{key.id}:model:alltime:"
                  if period == "alltime" else f"usage:{key.id}:model:monthly:")
        suffix = {"daily": f":{today}", "alltime": ""}.get(period, f":{today[:7]}")
        items = []
        for name, data in self.usage.items():
            if name.startswith(prefix) and name.endswith(suffix) and data:
                items.append(self._item(name[len(prefix):len(name) - len(suffix)], data, period))
        items.sort(key=lambda item: item["allTokens"], reverse=True)
        return 200, {"success": True, "data": items, "period": period}

    @staticmethod
    def _item(model: str, data: dict[str, int], period: str) -> dict:
        d = {name: data.get(name, 0) for name in _FIELDS}
        p_in, p_out, p_write, p_read = PRICING.get(model, UNKNOWN_PRICING)
        e5m, e1h = d["ephemeral5mTokens"] * p_write / 1e6, d["ephemeral1hTokens"] * p_in * 2 / 1e6
        costs = {"input": d["inputTokens"] * p_in / 1e6, "output": d["outputTokens"] * p_out / 1e6,
                 "cacheCreate": e5m + e1h, "cacheWrite": e5m + e1h, "cacheRead": d["cacheReadTokens"] * p_read / 1e6,
                 "ephemeral5m": e5m, "ephemeral1h": e1h}
        costs["total"] = costs["input"] + costs["output"] + costs["cacheWrite"] + costs["cacheRead"]
        formatted = {k: format_cost(costs[k]) for k in ("input", "output", "cacheWrite", "cacheRead", "total")}
        stored = "realCostMicro" in data or "ratedCostMicro" in data
        if stored:
            costs["real"] = data.get("realCostMicro", 0) / 1e6
            costs["rated"] = data.get("ratedCostMicro", 0) / 1e6
            costs["total"] = costs["real"]
            formatted["total"] = f"${costs['real']:.6f}"
        all_tokens = (d["inputTokens"] + d["outputTokens"] + d["cacheCreateTokens"] + d["cacheReadTokens"]
                      if period == "alltime" else d["allTokens"])
        return {"model": model, "requests": d["requests"], "inputTokens": d["inputTokens"],
                "outputTokens": d["outputTokens"], "cacheCreateTokens": d["cacheCreateTokens"],
                "cacheReadTokens": d["cacheReadTokens"], "allTokens": all_tokens, "costs": costs,
                "formatted": formatted, "pricing": {"input": p_in, "output": p_out, "cacheWrite": p_write,
                                                    "cacheRead": p_read}, "isLegacy": not stored}

    def __enter__(self) -> FakeStats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def crs_item(model: str, requests: int, input_tokens: int, output_tokens: int, cache_read: int = 0,
             cost: float = 0.0, rated: float | None = None) -> dict:
    """One model of a scripted CRS answer, every field as CRS sends it (input excludes cache reads);
    ``rated`` given: the costs were stored per call (``real`` = ``total`` = ``cost``)."""
    costs = {"input": cost / 2, "output": cost / 2, "cacheCreate": 0, "cacheWrite": 0, "cacheRead": 0,
             "ephemeral5m": 0, "ephemeral1h": 0, "total": cost}
    if rated is not None:
        costs |= {"real": cost, "rated": rated}
    return {"model": model, "requests": requests, "inputTokens": input_tokens, "outputTokens": output_tokens,
            "cacheCreateTokens": 0, "cacheReadTokens": cache_read,
            "allTokens": input_tokens + output_tokens + cache_read, "costs": costs,
            "formatted": {"total": format_cost(cost)},
            "pricing": {"input": 1.25, "output": 10, "cacheWrite": 1.25, "cacheRead": 0.125},
            "isLegacy": rated is None}


def crs_response(*items: dict, period: str = "daily") -> dict:
    return {"success": True, "data": list(items), "period": period}


def snapshot_rows(engine: sa.Engine) -> list[tuple]:
    """Every snapshot row as (source, period, stats_date, epoch, model, requests, input, output, cache_read,
    all, cost, rated)."""
    s = stats_source_snapshots
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.source, s.c.period, s.c.stats_date, s.c.captured_at_epoch, s.c.model,
                                      s.c.requests, s.c.input_tokens, s.c.output_tokens, s.c.cache_read_tokens,
                                      s.c.all_tokens, s.c.cost_total, s.c.cost_rated)).all()
    return sorted((tuple(r) for r in rows), key=lambda r: (r[0], r[1], r[3], r[4] or ""))


def delta_rows(engine: sa.Engine) -> list[tuple]:
    """Every delta row as (source, period, stats_date, epoch, total, success, failure, tokens, cost, rated)."""
    d = stats_source_deltas
    with engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.source, d.c.period, d.c.stats_date, d.c.captured_at_epoch,
                                      d.c.total_count, d.c.success_count, d.c.failure_count, d.c.total_tokens,
                                      d.c.total_cost, d.c.cost_rated)).all()
    return sorted(tuple(r) for r in rows)
