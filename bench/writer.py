"""The writer alone: invocations/s through ``store.write.writer.Writer`` into a real database, and its queue.

Two phases on one writer: a burst (every record submitted at once: the writer's capacity, from the
first submit until ``flush()`` returns) and a paced phase at a fixed offered rate (does the queue
stay flat, or grow?). A sampler thread reads ``writer.stats().queued`` every 100 ms throughout.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence

import sqlalchemy as sa

from bench.data import NODES, records
from bench.scratch import migrated_engine
from store.nodes import upsert_nodes
from store.records import InvocationRecord, utcnow
from store.schema import codex_invocations, nodes
from store.write.journal import Spool
from store.write.writer import Writer

SAMPLE_EVERY_S = 0.1


class QueueSampler:
    """Samples (seconds since start, queued records) of a writer in a thread."""

    def __init__(self, writer: Writer, every: float = SAMPLE_EVERY_S) -> None:
        self.writer = writer
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> QueueSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.samples.append((round(time.perf_counter() - self._t0, 3), self.writer.stats().queued))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()


def slope(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares growth of the queue, records per second (0 with fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mq = sum(q for _, q in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (q - mq) for t, q in samples) / var if var else 0.0


def _burst(writer: Writer, recs: Sequence[InvocationRecord]) -> dict:
    with QueueSampler(writer) as sampler:
        t0 = time.perf_counter()
        for r in recs:
            writer.submit(r)
        submitted = time.perf_counter() - t0
        writer.flush()
        seconds = time.perf_counter() - t0
    return {"records": len(recs), "seconds": round(seconds, 3), "per_s": round(len(recs) / seconds, 1),
            "submit_seconds": round(submitted, 3), "max_queued": max(q for _, q in sampler.samples),
            "queue": sampler.samples}


def _paced(writer: Writer, recs: Sequence[InvocationRecord], rate: float) -> dict:
    tick = 0.01  # submit every 10 ms: smooth enough to look like live traffic to the writer
    per_tick = max(1, round(rate * tick))
    with QueueSampler(writer) as sampler:
        t0 = time.perf_counter()
        for k, start in enumerate(range(0, len(recs), per_tick)):
            for r in recs[start:start + per_tick]:
                writer.submit(r)
            pause = t0 + (k + 1) * tick - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        offered_s = time.perf_counter() - t0
        submitted_at = time.perf_counter()
        writer.flush()
        drain = time.perf_counter() - submitted_at
    during = [s for s in sampler.samples if s[0] <= offered_s]
    growth = slope(during)
    return {"offered_per_s": rate, "records": len(recs), "seconds": round(offered_s, 3),
            "achieved_per_s": round(len(recs) / (offered_s + drain), 1), "drain_after_last_s": round(drain, 3),
            "max_queued": max(q for _, q in sampler.samples), "queue_growth_per_s": round(growth, 1),
            # Growing: over the run the trend added more than one full batch to the queue.
            "queue_growing": growth * offered_s > writer.batch_size, "queue": sampler.samples}


def bench_writer(url: str, *, burst: int, rate: float, seconds: float) -> dict:
    """Burst of ``burst`` records, then ``rate`` records/s for ``seconds``, into a fresh schema at ``url``."""
    engine = migrated_engine(url)
    with engine.begin() as conn:
        upsert_nodes(conn, NODES)
    paced_n = int(rate * seconds)
    recs = list(records(burst + paced_n, start=utcnow() - dt.timedelta(hours=1), span=dt.timedelta(hours=1)))
    writer = Writer(engine, Spool(None))
    writer.start()
    try:
        out = {"burst": _burst(writer, recs[:burst]), "paced": _paced(writer, recs[burst:], rate)}
        stats = writer.stats()
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(codex_invocations)).scalar_one()
            counted = conn.execute(sa.select(sa.func.sum(nodes.c.requests))).scalar_one()
    finally:
        writer.close()
    out["check"] = {"submitted": len(recs), "stored": stored, "node_requests": int(counted or 0),
                    "batches": stats.batches, "mean_batch": round(stats.written / stats.batches, 1) if stats.batches
                    else None, "rejected": stats.rejected, "spooled": stats.spooled}
    return out
