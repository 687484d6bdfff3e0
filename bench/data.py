"""Realistic invocation records: what the relay writes for a mix of nodes, models, APIs and outcomes."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Iterator

from store.records import InvocationRecord, NodeConfig, Usage

NODES = tuple(NodeConfig(id=f"node-{k}", base_url=f"https://relay-{k}.example/v1", api_key=f"sk-{k}", name=f"Relay {k}")
              for k in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"))
# (model, api format, endpoint, weight): mostly Codex on the Responses API, as the relay is used.
MODELS = (
    ("gpt-5-codex", "responses", "/v1/responses", 50),
    ("gpt-5", "responses", "/v1/responses", 15),
    ("gpt-5-mini", "chat", "/v1/chat/completions", 12),
    ("gpt-4.1", "chat", "/v1/chat/completions", 5),
    ("claude-sonnet-4-5", "messages", "/v1/messages", 10),
    ("claude-haiku-4-5", "messages", "/v1/messages", 5),
    ("o4-mini", "responses", "/v1/responses", 3),
)
SOURCES = (("relay", 90), ("xy", 10))  # 'xy': rows of the legacy importer
CLIENT_KEYS = tuple(f"ck_{uuid.UUID(int=k).hex[:16]}" for k in range(20))


def records(n: int, *, start: dt.datetime, span: dt.timedelta, seed: int = 7) -> Iterator[InvocationRecord]:
    """``n`` records in time order, spread evenly over ``start`` … ``start + span``."""
    rng = random.Random(seed)
    models = rng.choices(MODELS, weights=[m[3] for m in MODELS], k=n)
    sources = rng.choices([s[0] for s in SOURCES], weights=[s[1] for s in SOURCES], k=n)
    step = span / max(n, 1)
    for i in range(n):
        model, api_format, endpoint, _ = models[i]
        node = NODES[int(rng.triangular(0, len(NODES), 0))]  # a few nodes carry most traffic
        inp = int(rng.lognormvariate(9, 1))
        cached = int(inp * rng.random() * 0.9)
        out = int(rng.lognormvariate(6, 1.2))
        reasoning = int(out * rng.random() * 0.6)
        ok = rng.random() < 0.96
        ttfb = int(rng.lognormvariate(6.5, 0.6))
        stream_ms = int(rng.lognormvariate(8.5, 1))
        usage = Usage(input_tokens=inp, cached_tokens=cached, output_tokens=out, reasoning_tokens=reasoning)
        raw = {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
               "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": inp + out}
        yield InvocationRecord(
            invoke_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            occurred_at=start + step * i + dt.timedelta(microseconds=rng.randrange(1000)),
            source=sources[i], endpoint=endpoint, status="success" if ok else "failed", node_id=node.id,
            api_format=api_format, model=model, stream=True, http_status=200 if ok else rng.choice((429, 500, 502)),
            error_message=None if ok else "upstream overloaded", usage=usage if ok else Usage(),
            cost=round((inp - cached) * 1.25e-6 + cached * 1.25e-7 + out * 1e-5, 6) if ok else None,
            ttfb_ms=ttfb, stream_ms=stream_ms if ok else 0, duration_ms=ttfb + (stream_ms if ok else 0),
            request_bytes=int(inp * 3.5), response_bytes=int(out * 9) + 600 if ok else 180, attempts=1,
            client_key=rng.choice(CLIENT_KEYS), raw_response=json.dumps(raw, separators=(",", ":")) if ok else None,
            node_failure=not ok,
        )
