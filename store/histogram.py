"""Fixed latency buckets: the hourly rollup's bucket counts and, coarser, the Prometheus histograms.

Fixed (never per-deployment) so that rows written by several relays and over years add up. Each hourly
bound is at most 15% above the one before, and a percentile read from the counts is interpolated within
its bucket but kept within ``MAX_ERROR`` (10%) of every value the bucket holds: above the first bound and up
to the last it is within 10% of the exact percentile whatever the traffic (docs/observability.md).
Prometheus keeps its few wide buckets: each is a series per node, and ``histogram_quantile`` over them is
an estimate anyway.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

MAX_ERROR = 0.1  # of a percentile read from the hourly buckets, relative (see ``percentile``)


def _geometric(first: int, last: int) -> tuple[int, ...]:
    """Integer bounds from ``first`` until one reaches ``last``, each at most 15% above the one before:
    narrow enough that a reading can be within 10% of both ends of its bucket (1.15 < 1.1²)."""
    bounds = [first]
    while bounds[-1] < last:
        bounds.append(bounds[-1] * 23 // 20)  # rounded down: never a wider bucket
    return tuple(bounds)


# Upper bounds in milliseconds; a value above the last falls into the open bucket after it.
# The hourly rollup's: TTFB from 50 ms to ~67 s (53 bounds), call duration from 250 ms to ~32 min (65).
TTFB_BUCKETS_MS: tuple[int, ...] = _geometric(50, 60_000)
DURATION_BUCKETS_MS: tuple[int, ...] = _geometric(250, 1_800_000)
# The Prometheus histograms' (and the hourly rollup's before revision 19).
TTFB_METRIC_BUCKETS_MS: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000,
                                           60000)
DURATION_METRIC_BUCKETS_MS: tuple[int, ...] = (250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000,
                                               120000, 300000, 600000)


def bucket_index(bounds: Sequence[int], value_ms: int) -> int:
    """The bucket of ``value_ms``: the first whose upper bound is >= it; ``len(bounds)`` above them all."""
    return bisect.bisect_left(bounds, value_ms)


def percentile(bounds: Sequence[int], counts: Sequence[int], q: float) -> int | None:
    """The ``q`` quantile (0 < q <= 1) of the counted values, interpolated linearly within the bucket that
    holds it (as Prometheus' ``histogram_quantile``: the first bucket starts at 0), then kept within
    ``MAX_ERROR`` of both its ends: whichever of the bucket's values the exact quantile is, the reading is
    within 10% of it (rounding to whole ms aside); None when nothing is counted. Values in the open bucket
    read as the last bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                break
            lower, upper = (bounds[i - 1] if i else 0), bounds[i]
            read = lower + (upper - lower) * (rank - seen) / n
            if lower:
                read = min(max(read, upper / (1 + MAX_ERROR)), lower * (1 + MAX_ERROR))
            return round(read)
        seen += n
    return bounds[-1]
