"""Prices: genai-prices under the relay's own table (``codex_prices``), for each call's cost."""

from __future__ import annotations

from typing import Any

from addon.services.settings import SettingsError
from store.config import ConfigError
from store.prices import PriceTable, load_prices


def price_settings(options: Any) -> PriceTable:
    """The price table of ``codex_prices`` (empty: the shipped one)."""
    try:
        return load_prices(options.codex_prices or None)
    except ConfigError as e:
        raise SettingsError(f"codex_prices: {e}") from None

