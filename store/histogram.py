"""Fixed latency buckets, shared by the Prometheus histograms and the hourly rollup's bucket counts.

Fixed (never per-deployment) so that rows written by several relays and over years add up, and a
percentile read from the counts (interpolated within its bucket) is off by less than one bucket's width.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Upper bounds in milliseconds; a value above the last falls into the open bucket after it.
TTFB_BUCKETS_MS: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000, 60000)
DURATION_BUCKETS_MS: tuple[int, ...] = (250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000,
                                        300000, 600000)


def bucket_index(bounds: Sequence[int], value_ms: int) -> int:
    """The bucket of ``value_ms``: the first whose upper bound is >= it; ``len(bounds)`` above them all."""
    return bisect.bisect_left(bounds, value_ms)


def percentile(bounds: Sequence[int], counts: Sequence[int], q: float) -> int | None:
    """The ``q`` quantile (0 < q <= 1) of the counted values, interpolated linearly within the bucket that
    holds it (as Prometheus' ``histogram_quantile``: the first bucket starts at 0); None when nothing is
    counted. Values in the open bucket read as the last bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                break
            lower = bounds[i - 1] if i else 0
            return round(lower + (bounds[i] - lower) * (rank - seen) / n)
        seen += n
    return bounds[-1]
