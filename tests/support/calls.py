"""Calls through a real relay: the nodes file it reads and a client's HTTP call of each API format."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from tests.support.relayproc import RelayProcess

PATHS = {"responses": "/v1/responses", "chat": "/v1/chat/completions", "messages": "/v1/messages"}
FAST = {"codex_ping_interval": "0"}
# The weight that makes a node the first choice: a lighter node (weight 1) goes first once in 10^9.
HEAVY = 1_000_000_000


def write_nodes(path: Path, nodes: list[tuple[str, str, str, int]]) -> Path:
    text = "".join(
        f'[[nodes]]\nid = "{i}"\nname = "{i} node"\nbase_url = "{url}"\napi_key = "{key}"\nweight = {w}\n\n'
        for i, url, key, w in nodes)
    path.write_text(text)
    return path


def call(relay: RelayProcess, fmt: str, *, stream: bool, usage: tuple[int, int, int, int],
         model: str = "gpt-5-codex", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    body = {"model": model, "stream": stream, "input": "hi", "metadata": {"fake_usage": list(usage)}}
    if fmt == "chat":
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        hdrs = {"content-type": "application/json", "authorization": "Bearer client-key"}
        hdrs.update(headers or {})
        conn.request("POST", PATHS[fmt], json.dumps(body), hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
