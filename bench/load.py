"""A small keep-alive HTTP/1.1 load generator on asyncio: requests/s, latency and TTFB percentiles.

Each client holds one connection and sends streamed Responses API calls back to back; TTFB is the
time from sending the request to the first byte of the response body (the first SSE event).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

BODY = json.dumps({"model": "gpt-5-codex", "stream": True, "input": "bench",
                   "metadata": {"fake_usage": [1200, 800, 300, 100]}}).encode()


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    ttfbs_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        s = sorted(values)
        return s[min(len(s) - 1, int(q * len(s)))]

    def summary(self) -> dict:
        return {"clients": self.clients, "requests": self.requests, "errors": self.errors,
                "rps": round(self.rps, 1),
                "latency_median_ms": round(statistics.median(self.latencies_ms), 3) if self.latencies_ms else None,
                "latency_p99_ms": round(self._pct(self.latencies_ms, 0.99), 3) if self.latencies_ms else None,
                "ttfb_median_ms": round(statistics.median(self.ttfbs_ms), 3) if self.ttfbs_ms else None}


async def _read_chunked(reader: asyncio.StreamReader, t0: float, ttfb: list[float]) -> None:
    first = True
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return
        await reader.readexactly(size + 2)
        if first:
            ttfb.append((time.perf_counter() - t0) * 1000)
            first = False


async def _client(port: int, path: str, deadline: float, max_requests: int | None, res: LoadResult) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer bench\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    done = 0
    try:
        while time.perf_counter() < deadline and (max_requests is None or done < max_requests):
            t0 = time.perf_counter()
            writer.write(head)
            status = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if headers.get("transfer-encoding") == "chunked":
                await _read_chunked(reader, t0, res.ttfbs_ms)
            else:
                await reader.readexactly(int(headers.get("content-length", 0)))
            res.latencies_ms.append((time.perf_counter() - t0) * 1000)
            if b" 200 " in status:
                res.requests += 1
            else:
                res.errors += 1
            done += 1
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        res.errors += 1
    finally:
        writer.close()


async def _run(port: int, clients: int, seconds: float, max_requests: int | None, path: str) -> LoadResult:
    res = LoadResult(clients, 0, 0, 0.0, [], [])
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_client(port, path, deadline, max_requests, res) for _ in range(clients)))
    res.seconds = time.perf_counter() - start
    return res


def run_load(port: int, *, clients: int, seconds: float, max_requests: int | None = None,
             path: str = "/v1/responses") -> LoadResult:
    """Drive ``clients`` keep-alive connections for ``seconds`` (or ``max_requests`` each)."""
    return asyncio.run(_run(port, clients, seconds, max_requests, path))
