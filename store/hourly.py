"""The hourly rollup's latency distributions: what the writer adds to a ``codex_hourly_stats`` row
besides the daily rollup's sums (``store.invocations`` computes those per hour, then calls this).

Percentiles are read back from the bucket counts with ``store.histogram.percentile``.
"""

from __future__ import annotations

import datetime as dt

from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS, bucket_index
from store.schema import DURATION_COLUMNS, TTFB_COLUMNS

_ZEROS = dict.fromkeys(("duration_sum", "duration_n", *TTFB_COLUMNS, *DURATION_COLUMNS), 0)


def hour_of(t: dt.datetime) -> dt.datetime:
    """The start of ``t``'s hour (naive UTC, as stored)."""
    return t.replace(minute=0, second=0, microsecond=0)


def add_latencies(d: dict, row: dict) -> None:
    """Count one invocation row's TTFB and duration into its hourly rollup row ``d``."""
    if "duration_n" not in d:
        d.update(_ZEROS)  # every row of one upsert has the same columns
    if row["ttfb_ms"] is not None:
        d[TTFB_COLUMNS[bucket_index(TTFB_BUCKETS_MS, row["ttfb_ms"])]] += 1
    if row["duration_ms"] is not None:
        d[DURATION_COLUMNS[bucket_index(DURATION_BUCKETS_MS, row["duration_ms"])]] += 1
        d["duration_sum"] += row["duration_ms"]
        d["duration_n"] += 1
