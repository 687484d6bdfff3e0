"""A small keep-alive HTTP/1.1 load generator on asyncio: requests/s, latency and TTFB percentiles.

Each client holds one connection and sends streamed Responses API calls back to back; TTFB is the
time from sending the request to the first chunk of the response body (the first SSE event). A
connection the server drops counts as an error and is opened again.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

BODY = json.dumps({"model": "gpt-5-codex", "stream": True, "input": "bench",
                   "metadata": {"fake_usage": [1200, 800, 300, 100]}}).encode()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class LoadResult:
    clients: int
    requests: int = 0  # HTTP 200 answers read to the end
    errors: int = 0  # other statuses and broken connections
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttfbs_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def merge(cls, results: Iterable[LoadResult]) -> LoadResult:
        """Pool runs of the same target: counts and samples add up."""
        out = cls(clients=0)
        for r in results:
            out.clients = r.clients
            out.requests += r.requests
            out.errors += r.errors
            out.seconds += r.seconds
            out.latencies_ms += r.latencies_ms
            out.ttfbs_ms += r.ttfbs_ms
        return out

    def summary(self) -> dict:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {"clients": self.clients, "requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
                "latency_median_ms": ms(statistics.median(self.latencies_ms)) if self.latencies_ms else None,
                "latency_p99_ms": ms(percentile(self.latencies_ms, 0.99)),
                "ttfb_median_ms": ms(statistics.median(self.ttfbs_ms)) if self.ttfbs_ms else None,
                "ttfb_p99_ms": ms(percentile(self.ttfbs_ms, 0.99))}


async def _read_chunked(reader: asyncio.StreamReader, t0: float) -> float | None:
    """Read a chunked body to its end; the TTFB in ms (None for an empty body)."""
    ttfb = None
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return ttfb
        await reader.readexactly(size + 2)
        if ttfb is None:
            ttfb = (time.perf_counter() - t0) * 1000


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                    res: LoadResult) -> None:
    t0 = time.perf_counter()
    writer.write(head)
    status = await reader.readline()
    if not status:
        raise ConnectionError("connection closed by the server")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    ttfb = None
    if headers.get("transfer-encoding") == "chunked":
        ttfb = await _read_chunked(reader, t0)
    else:
        await reader.readexactly(int(headers.get("content-length", 0)))
    if b" 200 " not in status:
        res.errors += 1
        return
    res.requests += 1
    res.latencies_ms.append((time.perf_counter() - t0) * 1000)
    if ttfb is not None:
        res.ttfbs_ms.append(ttfb)


async def _client(port: int, path: str, deadline: float, max_requests: int | None, res: LoadResult) -> None:
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer bench\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    done = 0
    while time.perf_counter() < deadline and (max_requests is None or done < max_requests):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            res.errors += 1
            done += 1
            await asyncio.sleep(0.05)  # no busy loop against a server that is not there
            continue
        try:
            while time.perf_counter() < deadline and (max_requests is None or done < max_requests):
                done += 1
                await _exchange(reader, writer, head, res)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            res.errors += 1
        finally:
            writer.close()


async def _run(port: int, clients: int, seconds: float, max_requests: int | None, path: str) -> LoadResult:
    res = LoadResult(clients)
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_client(port, path, deadline, max_requests, res) for _ in range(clients)))
    res.seconds = time.perf_counter() - start
    return res


def run_load(port: int, *, clients: int, seconds: float, max_requests: int | None = None,
             path: str = "/v1/responses") -> LoadResult:
    """Drive ``clients`` keep-alive connections for ``seconds`` (or ``max_requests`` each)."""
    return asyncio.run(_run(port, clients, seconds, max_requests, path))
