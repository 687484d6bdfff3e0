"""Interleaved rounds: every round runs the targets in an order rotated by one, so drift on a shared machine
hits each alike, and a figure is the median of its rounds (of per-round ratios, for a comparison)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def rotated[T](items: Sequence[T], r: int) -> list[T]:
    """``items`` in round ``r``'s order."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values there are (None: a round without one), rounded; None for none."""
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 3) if kept else None
