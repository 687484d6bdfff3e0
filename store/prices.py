"""Cost estimates for relay-captured calls from a per-model price table (``store/prices.toml``).

The relay loads the table once, at configure time (``load_prices``), and calls ``PriceTable.cost``
for every record it writes, on the proxy's event loop: one or two dict hits and a few multiplications.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from store.config import ConfigError, load_toml
from store.records import Usage

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


@dataclass(frozen=True, slots=True)
class CostSplit:
    """USD of one call, by the kind of token that cost it."""

    input: float  # uncached input (cache writes included)
    cached: float  # input served from the prompt cache
    output: float  # output, reasoning included

    @property
    def total(self) -> float:
        return self.input + self.cached + self.output


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = {k.lower(): v for k, v in prices.items()}

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, model: str | None) -> Price | None:
        """The price of ``model``: exact name, else the name without a snapshot date suffix."""
        if not model:
            return None
        key = model.lower()
        return self._prices.get(key) or self._prices.get(_SNAPSHOT_SUFFIX.sub("", key))

    def cost(self, model: str | None, usage: Usage) -> CostSplit | None:
        """The estimated cost of one call (OpenAI token convention), or None for an unknown model."""
        p = self.price(model)
        if p is None:
            return None
        cached = min(usage.cached_tokens, usage.input_tokens)
        return CostSplit(input=(usage.input_tokens - cached) * p.input / 1e6,
                         cached=cached * p.cached_input / 1e6,
                         output=usage.output_tokens * p.output / 1e6)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """A price table from TOML (``[models."name"]`` input, cached_input, output); None: the shipped one.

    Raises ConfigError naming the file and the model.
    """
    path = path or DEFAULT_PRICES
    models = load_toml(path).get("models")
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: expected [models.\"<name>\"] tables")
    prices = {}
    for name, entry in models.items():
        where = f"{path}: models.{name!r}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(entry) - {"input", "cached_input", "output"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if "input" not in entry or "output" not in entry:
            raise ConfigError(f"{where}: input and output prices are required")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}: {key} must be a number >= 0 (USD per 1M tokens), got {value!r}")
        prices[name] = Price(input=float(entry["input"]), cached_input=float(entry.get("cached_input", entry["input"])),
                             output=float(entry["output"]))
    return PriceTable(prices)
