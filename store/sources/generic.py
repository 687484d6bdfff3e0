"""Generic JSON stats: any response shape, described by a mapping of field paths.

``fields`` in the source config (all paths are dot-separated keys; a number indexes a list; ``""``
is the object itself)::

    [sources.fields]
    items = "data.models"      # required: from the root to the per-model list, or to an object
                               #   keyed by model name
    model = "name"             # in each item: the model name (omit when items is keyed by model)
    requests = "usage.requests"  # in each item: required
    input_tokens = "usage.input"           # optional counters, in each item (missing = 0):
    output_tokens = "usage.output"         #   cache_create_tokens, cache_read_tokens, all_tokens,
    cache_read_tokens = "usage.cached"     #   cost_input, cost_output, cost_cache_write,
    cost_total = "cost"                    #   cost_cache_read, cost_total
    date = "day"               # optional, from the root: the stats date ("2026-11-23"); without it
                               #   the capture time and timezone decide
    input_includes_cache = true  # the provider's input count includes cached tokens (OpenAI style):
                                 #   cache reads and writes are subtracted, as snapshots store it

``all_tokens`` defaults to input + output + cache writes + cache reads, ``cost_total`` to the sum of
the cost parts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from store.sources import ModelStats, Parsed, SourceFormatError, fill_totals, number

_COUNTS = ("requests", "input_tokens", "output_tokens", "cache_create_tokens", "cache_read_tokens", "all_tokens")
_COSTS = ("cost_input", "cost_output", "cost_cache_write", "cost_cache_read", "cost_total")
_PATHS = {"items", "model", "date", *_COUNTS, *_COSTS}
CONFIG_KEYS: frozenset[str] = frozenset()


def configure(item: Mapping[str, Any], where: str) -> dict:
    """Nothing of its own: method, body and period are the source's keys."""
    return {}


def normalize_model(model: str) -> str:
    """Model names are compared as the provider reports them."""
    return model


def check_fields(fields: Mapping[str, Any]) -> str | None:
    unknown = set(fields) - _PATHS - {"input_includes_cache"}
    if unknown:
        return f"unknown keys {sorted(unknown)}"
    for key in ("items", "requests"):
        if key not in fields:
            return f"{key} is required (a field path)"
    for key in _PATHS & set(fields):
        if not isinstance(fields[key], str):
            return f"{key} must be a field path string, got {fields[key]!r}"
    if not isinstance(fields.get("input_includes_cache", False), bool):
        return "input_includes_cache must be true or false"
    return None


def get_path(obj: Any, path: str, where: str) -> Any:
    """The value at a dotted ``path`` in ``obj``; raises SourceFormatError naming ``where``."""
    for part in path.split(".") if path else ():
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise SourceFormatError(f"{where}: no field {path!r}")
    return obj


def parse(payload: Any, fields: Mapping[str, Any]) -> Parsed:
    items = get_path(payload, fields["items"], "response")
    if isinstance(items, dict) and "model" not in fields:
        named = list(items.items())
    elif isinstance(items, list) and "model" in fields:
        named = []
        for i, item in enumerate(items):
            name = get_path(item, fields["model"], f"item {i}")
            if not isinstance(name, str) or not name:
                raise SourceFormatError(f"item {i}: model name must be a non-empty string, got {name!r}")
            named.append((name, item))
    else:
        raise SourceFormatError(f"{fields['items']!r} must be a list (with a model path) or an object "
                                f"keyed by model (without one), got {type(items).__name__}")
    models = []
    for name, item in named:
        where = f"model {name!r}"
        m = ModelStats(model=name, raw=json.dumps(item, separators=(",", ":")))
        for attr in _COUNTS + _COSTS:
            if attr in fields:
                setattr(m, attr, number(get_path(item, fields[attr], where), f"{where}: {fields[attr]}",
                                        integer=attr in _COUNTS))
        if fields.get("input_includes_cache"):
            uncached = m.input_tokens - m.cache_read_tokens - m.cache_create_tokens
            if uncached < 0:
                raise SourceFormatError(f"{where}: input tokens {m.input_tokens} are fewer than its cached tokens")
            m.input_tokens = uncached
        models.append(fill_totals(m, fields))
    stats_date = None
    if "date" in fields:
        stats_date = get_path(payload, fields["date"], "response")
        if not isinstance(stats_date, str):
            raise SourceFormatError(f"date {fields['date']!r} must be a string, got {stats_date!r}")
    return Parsed(models=models, stats_date=stats_date)
