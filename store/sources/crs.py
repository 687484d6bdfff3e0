"""claude-relay-service (CRS) API stats: ``POST /apiStats/api/user-model-stats``.

A source needs only ``url`` (that endpoint) and ``api_id`` (the key's id, a UUID: CRS answers 400
to anything else) or ``api_key``. The request is always ``POST`` with
``{"apiId" | "apiKey": ..., "period": "daily"}``: CRS's own default period is monthly. Response::

    {"success": true, "period": "daily",
     "data": [{"model": "gpt-5-codex", "requests": 12, "inputTokens": 4000, "outputTokens": 900,
               "cacheCreateTokens": 0, "cacheReadTokens": 30000, "allTokens": 34900,
               "costs": {"input": 0.005, "output": 0.009, "cacheCreate": 0, "cacheWrite": 0,
                         "cacheRead": 0.00375, "ephemeral5m": 0, "ephemeral1h": 0, "total": 0.01775,
                         "real": 0.01775, "rated": 0.0213},
               "formatted": {...}, "pricing": {...}, "isLegacy": false}]}

An answer for another period than daily is refused. ``costs.real`` and ``costs.rated`` are there when
CRS stored the cost of each call (then ``total`` = ``real``); ``rated`` is what the key is charged
after CRS's rate multiplier. The response has no date: CRS reports the day of its own clock in its
``TIMEZONE_OFFSET`` (default +8), so the stats date comes from the capture time and the source's
``timezone`` (default "+08:00"). CRS's ``inputTokens`` excludes cache reads and writes, as snapshots
store it. CRS stores models under normalised names (``normalize_model``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from store.config import ConfigError
from store.sources import ModelStats, Parsed, SourceFormatError, fill_totals, number

CONFIG_KEYS = frozenset({"api_id", "api_key"})
PERIOD = "daily"
_UUID = re.compile(r"^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}$", re.IGNORECASE)
_TOKENS = {"requests": "requests", "input_tokens": "inputTokens", "output_tokens": "outputTokens",
           "cache_create_tokens": "cacheCreateTokens", "cache_read_tokens": "cacheReadTokens",
           "all_tokens": "allTokens"}
_COSTS = {"cost_input": "input", "cost_output": "output", "cost_cache_write": "cacheWrite",
          "cost_cache_read": "cacheRead", "cost_total": "total"}
_BEDROCK_REGION = re.compile(r"^[a-z0-9-]+\.")
_VERSION = re.compile(r"-v\d+:\d+$")


def configure(item: Mapping[str, Any], where: str) -> dict:
    """The request CRS answers: POST ``{apiId | apiKey, period: "daily"}``; raises ConfigError."""
    for key in ("body", "method"):
        if key in item:
            raise ConfigError(f"{where}: the crs format builds its own request: give api_id (or api_key), "
                              f"not {key}")
    if item.get("period", PERIOD) != PERIOD:
        raise ConfigError(f"{where}: the crs format asks for the daily period, got period {item['period']!r}")
    api_id, api_key = item.get("api_id"), item.get("api_key")
    if (api_id is None) == (api_key is None):
        raise ConfigError(f"{where}: give api_id (the key's id on the CRS stats page) or api_key, one of them")
    if api_id is not None:
        if not isinstance(api_id, str) or not _UUID.match(api_id):
            raise ConfigError(f"{where}: api_id must be a UUID such as "
                              f"\"3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d\" (CRS rejects anything else), got {api_id!r}")
        credential = {"apiId": api_id}
    else:
        if not isinstance(api_key, str) or not 10 <= len(api_key) <= 512:
            raise ConfigError(f"{where}: api_key must be the key itself, 10 to 512 characters")
        credential = {"apiKey": api_key}
    return {"method": "POST", "body": {**credential, "period": PERIOD}, "period": PERIOD}


def check_fields(fields: Mapping[str, Any]) -> str | None:
    return "the crs format takes no field mapping" if fields else None


def normalize_model(model: str) -> str:
    """A model name as CRS stores it: no Bedrock region or ``anthropic.`` prefix, no ``-vN:M`` or
    ``:latest`` suffix (CRS's redis model ``_normalizeModelName``)."""
    if ".anthropic." in model or ".claude" in model:
        return _VERSION.sub("", _BEDROCK_REGION.sub("", model, count=1).replace("anthropic.", "", 1))
    return re.sub(r"-v\d+:\d+$|:latest$", "", model)


def parse(payload: Any, fields: Mapping[str, Any]) -> Parsed:
    if not isinstance(payload, dict):
        raise SourceFormatError("expected a JSON object")
    if payload.get("success") is not True:
        raise SourceFormatError(f"success is not true: {payload.get('message') or payload.get('error')!r}")
    if payload.get("period") != PERIOD:
        raise SourceFormatError(f"the answer is for period {payload.get('period')!r}, not the {PERIOD} one asked for")
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
        if "rated" in costs:
            m.cost_rated = number(costs["rated"], f"{where}.costs.rated", integer=False)
        reported = {attr for attr, key in _TOKENS.items() if key in item}
        reported |= {attr for attr, key in _COSTS.items() if key in costs}
        models.append(fill_totals(m, reported))
    return Parsed(models=models)
