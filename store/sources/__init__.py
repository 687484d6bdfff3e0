"""Provider stats sources: the ``[[sources]]`` config, the response formats, and captures.

A stats source is an endpoint of an upstream provider that reports its own tally of our usage for
the current period (e.g. today, per model). The poller fetches it, a format module turns the JSON
into ``ModelStats`` rows, and ``store.sources.snapshots`` stores them as one capture.

A format is one small module in this package, registered in ``FORMATS``, with
``CONFIG_KEYS`` (the config keys of its own), ``configure(item, where) -> dict`` (checks them, raises
ConfigError, and returns the request fields it sets: ``method``, ``body``, ``period``),
``check_fields(fields) -> str | None`` (what is wrong with its field mapping, or None),
``parse(payload, fields) -> Parsed`` (raises ``SourceFormatError`` on a malformed response) and
``normalize_model(name) -> str`` (a relay model name as the provider files it, for reconciliation).

Token convention of snapshots (the provider's, as claude-relay-service reports it):
``input_tokens`` excludes cache reads and cache writes; ``all_tokens`` = input + output +
cache_create + cache_read. ``store.sources.reconcile`` converts to the relay's OpenAI convention.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from store.config import ConfigError, load_entries, validate_base_url


class SourceFormatError(ValueError):
    """A stats response that does not have the shape its format expects."""


@dataclass(slots=True)
class ModelStats:
    """One provider-reported tally: a model's, or the aggregate over all models (``model`` None)."""

    model: str | None
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_create_tokens: int = 0
    cache_read_tokens: int = 0
    all_tokens: int = 0
    cost_input: float = 0.0
    cost_output: float = 0.0
    cost_cache_write: float = 0.0
    cost_cache_read: float = 0.0
    cost_total: float = 0.0
    cost_rated: float | None = None  # charged after the provider's rate multiplier; None: not reported
    raw: str | None = None  # this model's part of the response, as JSON

    def add(self, other: ModelStats) -> None:
        """Add ``other``'s counters to these (a rated cost stays unknown unless both report one)."""
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_rated = (None if self.cost_rated is None or other.cost_rated is None
                           else self.cost_rated + other.cost_rated)


COUNTERS = ("requests", "input_tokens", "output_tokens", "cache_create_tokens", "cache_read_tokens",
            "all_tokens", "cost_input", "cost_output", "cost_cache_write", "cost_cache_read", "cost_total")
STORED = (*COUNTERS, "cost_rated")  # the snapshot columns of a ModelStats


@dataclass(slots=True)
class Parsed:
    """What a format reads from one response."""

    models: list[ModelStats]
    stats_date: str | None = None  # when the response names its period; else the capture time decides


@dataclass(slots=True)
class Capture:
    """One poll of one source: the rows of one ``captured_at_epoch`` in ``stats_source_snapshots``."""

    source: str
    period: str
    stats_date: str
    captured_at: dt.datetime  # naive UTC
    models: list[ModelStats]
    raw_response: str

    @property
    def captured_at_epoch(self) -> int:
        return int(self.captured_at.replace(tzinfo=dt.UTC).timestamp())

    @property
    def total(self) -> ModelStats:
        """The aggregate row (model None): the sum over the models."""
        agg = ModelStats(model=None, cost_rated=0.0 if self.models else None, raw=self.raw_response)
        for m in self.models:
            agg.add(m)
        return agg


# Period name -> strftime of its stats_date (the provider's calendar, see SourceConfig.utc_offset).
PERIODS = {"daily": "%Y-%m-%d", "monthly": "%Y-%m"}
_PERIOD_RES = {"daily": re.compile(r"^\d{4}-\d{2}-\d{2}$"), "monthly": re.compile(r"^\d{4}-\d{2}$")}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_DAY = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str  # the ``source`` value of its snapshot and delta rows
    url: str
    format: str = "crs"
    fields: Mapping[str, Any] = field(default_factory=dict)  # the format's mapping (generic)
    period: str = "daily"
    interval: float = 60.0
    timeout: float = 10.0
    method: str = "GET"
    body: Any = field(default=None, repr=False)  # sent as JSON; may hold a key
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # holds the auth secret
    nodes: tuple[str, ...] = ()  # the relay's node ids whose traffic this provider counts
    # The provider's day boundaries (config key ``timezone``): its stats_date is the calendar date at
    # UTC + utc_offset.
    utc_offset: dt.timedelta = dt.timedelta(0)
    # No capture this close to the provider's midnight: with clocks a little apart, a capture taken
    # just after our midnight may still hold the provider's old day (counted again as the new one's).
    midnight_margin: float = 120.0

    def near_midnight(self, at: dt.datetime) -> bool:
        """Whether the (naive UTC) time ``at`` is within ``midnight_margin`` of the provider's midnight."""
        local = at + self.utc_offset
        since = (local - local.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
        return min(since, _DAY.total_seconds() - since) < self.midnight_margin

    def stats_date(self, captured_at: dt.datetime) -> str:
        """The provider's period key for a (naive UTC) capture time."""
        return (captured_at + self.utc_offset).strftime(PERIODS[self.period])

    def day_window(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """The naive UTC interval [start, end) of the provider's calendar day ``day``."""
        start = dt.datetime.combine(day, dt.time()) - self.utc_offset
        return start, start + _DAY

    def capture(self, text: str, captured_at: dt.datetime) -> Capture:
        """A capture from a response body; raises SourceFormatError when it is malformed."""
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise SourceFormatError(f"not JSON: {e}") from None
        parsed = FORMATS[self.format].parse(payload, self.fields)
        stats_date = parsed.stats_date or self.stats_date(captured_at)
        if not _PERIOD_RES[self.period].match(stats_date):
            raise SourceFormatError(f"stats date {stats_date!r} does not fit period {self.period!r}")
        return Capture(source=self.name, period=self.period, stats_date=stats_date,
                       captured_at=captured_at.replace(microsecond=0), models=merge_models(parsed.models),
                       raw_response=text)


def merge_models(models: Iterable[ModelStats]) -> list[ModelStats]:
    """One row per model name (a repeated name is summed: the unique key allows one), sorted."""
    by_name: dict[str, ModelStats] = {}
    for m in models:
        assert m.model is not None
        seen = by_name.get(m.model)
        if seen is None:
            by_name[m.model] = dataclasses.replace(m)
            continue
        seen.add(m)
        seen.raw = f"[{seen.raw},{m.raw}]" if seen.raw and m.raw else seen.raw or m.raw
    return [by_name[k] for k in sorted(by_name)]


def number(value: Any, what: str, *, integer: bool) -> int | float:
    """A non-negative count (integer) or amount from JSON; raises SourceFormatError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise SourceFormatError(f"{what}: expected a non-negative number, got {value!r}")
    if integer:
        if value != int(value):
            raise SourceFormatError(f"{what}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def fill_totals(m: ModelStats, reported: Collection[str]) -> ModelStats:
    """Derive ``all_tokens`` and ``cost_total`` when the provider did not report them (a reported 0
    stays 0: a provider may not charge for what it served)."""
    if "all_tokens" not in reported:
        m.all_tokens = m.input_tokens + m.output_tokens + m.cache_create_tokens + m.cache_read_tokens
    if "cost_total" not in reported:
        m.cost_total = m.cost_input + m.cost_output + m.cost_cache_write + m.cost_cache_read
    return m


# -- config ----------------------------------------------------------------------------------------
_KEYS = {"name", "url", "format", "fields", "period", "interval", "timeout", "method", "body",
         "auth_header", "auth_value", "auth_env", "nodes", "timezone", "midnight_margin"}
_DEFAULT_TIMEZONE = {"crs": "+08:00"}  # CRS's TIMEZONE_OFFSET default; others: UTC


def load_sources_file(path: str | Path) -> list[SourceConfig]:
    """The ``[[sources]]`` of a TOML file (a file of its own, or the nodes file), validated.

    Raises ConfigError naming the file and the entry. No ``sources`` key means no sources.
    """
    return load_entries(path, "sources", source_from_mapping, lambda s: s.name, "name")


def source_from_mapping(item: Any, where: str) -> SourceConfig:
    """One source from a TOML table; raises ConfigError naming ``where``."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be 1-32 letters, digits, '.', '_' or '-', got {name!r}")
    where = f"{where} ({name})"

    url = item.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: url is required")
    problem = validate_base_url(url)
    if problem:
        raise ConfigError(f"{where}: url: {problem}")

    fmt = item.get("format", "crs")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format must be one of {sorted(FORMATS)}, got {fmt!r}")
    unknown = set(item) - _KEYS - FORMATS[fmt].CONFIG_KEYS
    if "utc_offset" in unknown:
        raise ConfigError(f"{where}: utc_offset is now called timezone")
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    request = FORMATS[fmt].configure(item, where)
    fields = item.get("fields", {})
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: fields must be a table")
    problem = FORMATS[fmt].check_fields(fields)
    if problem:
        raise ConfigError(f"{where}: fields: {problem}")

    period = request.get("period", item.get("period", "daily"))
    if period not in PERIODS:
        raise ConfigError(f"{where}: period must be one of {sorted(PERIODS)}, got {period!r}")
    interval = _positive(item.get("interval", 60), f"{where}: interval", minimum=1)
    timeout = _positive(item.get("timeout", 10), f"{where}: timeout", minimum=0.1)

    body = request.get("body", item.get("body"))
    method = request.get("method") or item.get("method", "GET" if body is None else "POST")
    if method not in ("GET", "POST"):
        raise ConfigError(f"{where}: method must be GET or POST, got {method!r}")
    if body is not None and method == "GET":
        raise ConfigError(f"{where}: a body needs method = \"POST\"")

    headers: dict[str, str] = {}
    auth_header = item.get("auth_header", "Authorization")
    value = item.get("auth_value")
    env = item.get("auth_env")
    if not isinstance(auth_header, str) or not auth_header:
        raise ConfigError(f"{where}: auth_header must be a header name")
    if value is not None and env is not None:
        raise ConfigError(f"{where}: give auth_value or auth_env, not both")
    if env is not None:
        if not isinstance(env, str) or env not in os.environ:
            raise ConfigError(f"{where}: auth_env names environment variable {env!r}, which is not set")
        value = os.environ[env]
    if value is not None:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: auth_value must be a string")
        headers[auth_header] = value

    nodes = item.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise ConfigError(f"{where}: nodes must be a list of node ids, e.g. nodes = [\"alpha\"]")

    timezone = item.get("timezone", _DEFAULT_TIMEZONE.get(fmt, "+00:00"))
    m = _OFFSET_RE.match(timezone) if isinstance(timezone, str) else None
    if m is None or int(m.group(2)) > 14 or int(m.group(3)) > 59:
        raise ConfigError(f"{where}: timezone must look like \"+08:00\" or \"-05:00\", got {timezone!r}")
    offset = dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
    margin = item.get("midnight_margin", 120)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 3600:
        raise ConfigError(f"{where}: midnight_margin must be a number of seconds from 0 to 3600, got {margin!r}")

    return SourceConfig(name=name, url=url, format=fmt, fields=fields, period=period, interval=interval,
                        timeout=timeout, method=method, body=body, headers=headers, nodes=tuple(nodes),
                        utc_offset=offset, midnight_margin=float(margin))


def _positive(value: Any, what: str, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{what} must be a number of seconds >= {minimum:g}, got {value!r}")
    return float(value)


def _formats() -> dict[str, ModuleType]:
    # Imported here: the format modules use the types above.
    from store.sources import crs, generic

    return {"crs": crs, "generic": generic}


FORMATS: dict[str, ModuleType] = _formats()
