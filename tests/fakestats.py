"""Test helpers for stats sources: a fake provider stats endpoint on 127.0.0.1 that serves scripted
responses, claude-relay-service answers, and the rows the store wrote."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from store.engine import make_engine, upgrade_to_head
from store.schema import stats_source_deltas, stats_source_snapshots


@dataclass(slots=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeStats:
    """``queue(status, body)`` scripts the next answers; an empty script answers 503."""

    def __init__(self) -> None:
        self.seen: list[SeenRequest] = []
        self._script: deque[tuple[int, str]] = deque()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with fake._lock:
                    fake.seen.append(SeenRequest(self.command, self.path, {k.lower(): v for k, v in
                                                                          self.headers.items()}, body))
                    status, text = fake._script.popleft() if fake._script else (503, '{"error": "no script"}')
                data = text.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="fake-stats", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/apiStats/api/user-model-stats"

    def queue(self, status: int, body: str | dict) -> None:
        with self._lock:
            self._script.append((status, body if isinstance(body, str) else json.dumps(body)))

    def __enter__(self) -> FakeStats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def crs_item(model: str, requests: int, input_tokens: int, output_tokens: int, cache_read: int = 0,
             cost: float = 0.0) -> dict:
    """One model of a claude-relay-service user-model-stats answer (input excludes cache reads)."""
    return {"model": model, "requests": requests, "inputTokens": input_tokens, "outputTokens": output_tokens,
            "cacheCreateTokens": 0, "cacheReadTokens": cache_read,
            "allTokens": input_tokens + output_tokens + cache_read,
            "costs": {"input": cost / 2, "output": cost / 2, "cacheWrite": 0, "cacheRead": 0, "total": cost},
            "formatted": {"total": f"${cost:.2f}"}, "pricing": {"input": 1.25, "output": 10}}


def crs_response(*items: dict) -> dict:
    return {"success": True, "data": list(items), "period": "daily"}


@contextlib.contextmanager
def fresh_engine(db_url: str) -> Iterator[sa.Engine]:
    """The store's engine on an empty database upgraded to the latest schema."""
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def snapshot_rows(engine: sa.Engine) -> list[tuple]:
    """Every snapshot row as (stats_date, epoch, model, requests, input, output, cache_read, all, cost)."""
    s = stats_source_snapshots
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.source, s.c.period, s.c.stats_date, s.c.captured_at_epoch, s.c.model,
                                      s.c.requests, s.c.input_tokens, s.c.output_tokens, s.c.cache_read_tokens,
                                      s.c.all_tokens, s.c.cost_total)).all()
    return sorted((tuple(r) for r in rows), key=lambda r: (r[0], r[1], r[3], r[4] or ""))


def delta_rows(engine: sa.Engine) -> list[tuple]:
    """Every delta row as (source, period, stats_date, epoch, total, success, failure, tokens, cost)."""
    d = stats_source_deltas
    with engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.source, d.c.period, d.c.stats_date, d.c.captured_at_epoch,
                                      d.c.total_count, d.c.success_count, d.c.failure_count, d.c.total_tokens,
                                      d.c.total_cost)).all()
    return sorted(tuple(r) for r in rows)
