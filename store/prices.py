"""Cost estimates for relay-captured calls: prices from ``genai-prices``, a local TOML table on top.

``genai-prices`` (Pydantic's maintained price data) prices hundreds of models, tiers and cache prices
included; it runs offline from the data bundled with the installed package and is never asked to
fetch updates here (upgrade the package for newer prices). The local table (``store/prices.toml``, or
the file of the relay's ``codex_prices`` option) overrides it for custom or private models.

The relay loads the prices once, at configure time (``load_prices``), and calls ``PriceTable.cost``
for every record it writes, on the proxy's event loop: a model's price is resolved once and cached,
then a call costs a few multiplications.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import genai_prices
from genai_prices.types import ModelPrice, TieredPrices, calc_unit_price

from store.config import ConfigError, load_toml
from store.records import Usage

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_KEYS = {"input", "cached_input", "cache_write", "output"}
_PER = 1_000_000  # prices are per 1M tokens


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens of a local-table model (no tiers)."""

    input: float
    cached_input: float
    cache_write: float
    output: float


@dataclass(frozen=True, slots=True)
class CostSplit:
    """USD of one call, by the kind of token that cost it; ``total`` = input + cached + output."""

    input: float  # input not served from the prompt cache, cache writes included
    cached: float  # input served from the prompt cache
    output: float  # output, reasoning included
    cache_write: float = 0.0  # the share of ``input`` spent writing the prompt cache

    @property
    def total(self) -> float:
        return self.input + self.cached + self.output


class PriceTable:
    """The local table over ``genai-prices``; ``cost`` is what the relay calls."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = {k.lower(): v for k, v in prices.items()}

    def __len__(self) -> int:
        """Models of the local table."""
        return len(self._prices)

    def local_price(self, model: str | None) -> Price | None:
        """``model``'s price in the local table: exact name, else the name without a snapshot date."""
        if not model:
            return None
        key = model.lower()
        return self._prices.get(key) or self._prices.get(_SNAPSHOT_SUFFIX.sub("", key))

    def cost(self, model: str | None, usage: Usage) -> CostSplit | None:
        """The estimated cost of one call (OpenAI token convention: input includes cached tokens and
        cache writes), or None for a model neither the local table nor genai-prices knows."""
        price = self.local_price(model)
        if price is None:
            price = _maintained_rates(model.lower(), usage.input_tokens) if model else None
            if price is None:
                return None
        cached = min(usage.cached_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - cached)
        cache_write = written * price.cache_write / _PER
        return CostSplit(input=(usage.input_tokens - cached - written) * price.input / _PER + cache_write,
                         cached=cached * price.cached_input / _PER, output=usage.output_tokens * price.output / _PER,
                         cache_write=cache_write)

    def call_cost(self, model: str | None, usage: Usage,
                  iterations: Sequence[tuple[str | None, Usage]] = ()) -> CostSplit | None:
        """A call's cost: with Anthropic ``usage.iterations`` (``addon.metering.usage.iteration_usages``: each
        one's model, None for the call's, and usage) the sum of each iteration at its own model's price,
        None if any is unpriced; without, ``cost(model, usage)``."""
        if not iterations:
            return self.cost(model, usage)
        splits = [self.cost(m or model, u) for m, u in iterations]
        priced = [s for s in splits if s is not None]
        if len(priced) < len(splits):
            return None
        return CostSplit(input=sum(s.input for s in priced), cached=sum(s.cached for s in priced),
                         output=sum(s.output for s in priced), cache_write=sum(s.cache_write for s in priced))


def _at_tier(price: ModelPrice, input_tokens: int) -> Price:
    """genai-prices' rates for a call with ``input_tokens`` of input: every token of a call costs the
    tier its total input reaches; an unpriced cache read or write costs the input price, as there."""
    def rate(value: Decimal | TieredPrices | None) -> float | None:
        return None if value is None else float(calc_unit_price(value, _PER, input_tokens, _PER))

    uncached = rate(price.input_mtok) or 0.0
    cached, written = rate(price.cache_read_mtok), rate(price.cache_write_mtok)
    return Price(input=uncached, cached_input=uncached if cached is None else cached,
                 cache_write=uncached if written is None else written, output=rate(price.output_mtok) or 0.0)


@dataclass(frozen=True, slots=True)
class _Maintained:
    price: ModelPrice
    starts: tuple[int, ...]  # the tier starts of all its prices, sorted: where a call's rates change


@lru_cache(maxsize=1024)  # bounded: model names come from clients
def _maintained_price(model: str) -> _Maintained | None:
    """genai-prices' current price of ``model`` (or of its name without a snapshot date), from its
    bundled data; None when it does not know the model."""
    for ref in dict.fromkeys((model, _SNAPSHOT_SUFFIX.sub("", model))):
        try:
            price = genai_prices.calc_price(genai_prices.Usage(), model_ref=ref).model_price
        except LookupError:
            continue
        tiered = (price.input_mtok, price.cache_read_mtok, price.cache_write_mtok, price.output_mtok)
        return _Maintained(price, tuple(sorted({t.start for p in tiered if isinstance(p, TieredPrices)
                                                for t in p.tiers})))
    return None


def _maintained_rates(model: str, input_tokens: int) -> Price | None:
    """genai-prices' rates of ``model`` for a call with ``input_tokens`` of input; None: unknown model.
    Worked out once per model and tier (Decimal arithmetic), not for every call."""
    found = _maintained_price(model)
    if found is None:
        return None
    return _rates_at(model, bisect_left(found.starts, input_tokens))  # the tier starts the input passes


@lru_cache(maxsize=1024)
def _rates_at(model: str, passed: int) -> Price:
    """``model``'s rates for an input that passes its first ``passed`` tier starts (``input > start``)."""
    found = _maintained_price(model)
    assert found is not None
    starts = found.starts
    # Any input with the same starts passed has the same rates: the first start itself passes none.
    return _at_tier(found.price, starts[passed - 1] + 1 if passed else starts[0] if starts else 0)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """genai-prices under a local TOML table (``[models."name"]`` input, cached_input, cache_write,
    output, USD per 1M tokens); None: the shipped table.

    Raises ConfigError naming the file and the model.
    """
    path = path or DEFAULT_PRICES
    models = load_toml(path).get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: expected [models.\"<name>\"] tables")
    prices = {}
    for name, entry in models.items():
        where = f"{path}: models.{name!r}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if "input" not in entry or "output" not in entry:
            raise ConfigError(f"{where}: input and output prices are required")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}: {key} must be a number >= 0 (USD per 1M tokens), got {value!r}")
        input_price = float(entry["input"])
        prices[name] = Price(input=input_price, cached_input=float(entry.get("cached_input", input_price)),
                             cache_write=float(entry.get("cache_write", input_price)), output=float(entry["output"]))
    return PriceTable(prices)

