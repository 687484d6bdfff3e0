"""claude-relay-service (CRS) API stats: ``POST /apiStats/api/user-model-stats``.

Request body ``{"apiId": "<key id>", "period": "daily"}`` (set ``body`` in the source config).
Response::

    {"success": true, "period": "daily",
     "data": [{"model": "gpt-5-codex", "requests": 12, "inputTokens": 4000, "outputTokens": 900,
               "cacheCreateTokens": 0, "cacheReadTokens": 30000, "allTokens": 34900,
               "costs": {"input": 0.005, "output": 0.009, "cacheWrite": 0, "cacheRead": 0.00375,
                         "total": 0.01775}, "formatted": {...}, "pricing": {...}}]}

The response has no date: CRS reports the current period of its own clock, so the stats date comes
from the capture time and the source's ``utc_offset`` (CRS's ``TIMEZONE_OFFSET``, often +08:00).
CRS's ``inputTokens`` already excludes cache reads, as snapshots store it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from store.sources import ModelStats, Parsed, SourceFormatError, fill_totals, number

_TOKENS = {"requests": "requests", "input_tokens": "inputTokens", "output_tokens": "outputTokens",
           "cache_create_tokens": "cacheCreateTokens", "cache_read_tokens": "cacheReadTokens",
           "all_tokens": "allTokens"}
_COSTS = {"cost_input": "input", "cost_output": "output", "cost_cache_write": "cacheWrite",
          "cost_cache_read": "cacheRead", "cost_total": "total"}


def check_fields(fields: Mapping[str, Any]) -> str | None:
    return "the crs format takes no field mapping" if fields else None


def parse(payload: Any, fields: Mapping[str, Any]) -> Parsed:
    if not isinstance(payload, dict):
        raise SourceFormatError("expected a JSON object")
    if payload.get("success") is not True:
        raise SourceFormatError(f"success is not true: {payload.get('message') or payload.get('error')!r}")
    data = payload.get("data")
    if not isinstance(data, list):
        raise SourceFormatError("'data' must be a list of per-model stats")
    models = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("model"), str) or not item["model"]:
            raise SourceFormatError(f"data[{i}]: expected an object with a model name")
        where = f"data[{i}] ({item['model']})"
        m = ModelStats(model=item["model"], raw=json.dumps(item, separators=(",", ":")))
        for attr, key in _TOKENS.items():
            # A missing counter is zero (CRS omits nothing today; older versions lack some).
            setattr(m, attr, number(item.get(key, 0), f"{where}.{key}", integer=True))
        costs = item.get("costs", {})
        if not isinstance(costs, dict):
            raise SourceFormatError(f"{where}.costs: expected an object")
        for attr, key in _COSTS.items():
            setattr(m, attr, number(costs.get(key, 0), f"{where}.costs.{key}", integer=False))
        models.append(fill_totals(m))
    return Parsed(models=models)
