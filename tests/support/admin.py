"""The admin addon driven in process: its token, a nodes file of two nodes it serves, and a request to it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from addon.admin import Admin
from tests.support.calls import write_nodes

ALPHA_KEY = "sk-alpha-0123456789abcdef"
BETA_KEY = "sk-beta-fedcba9876543210"
TOKEN = "admin-token-0123456789"
REVERSE = "reverse:http://127.0.0.1:9"


def alpha_and_beta(tmp_path) -> Path:
    """A nodes file: alpha (weight 2) and beta (weight 1), both on a port nothing listens on."""
    return write_nodes(tmp_path / "nodes.toml", [("alpha", "http://127.0.0.1:9/v1", ALPHA_KEY, 2),
                                                 ("beta", "http://127.0.0.1:9/beta/v1", BETA_KEY, 1)])


def ask(admin: Admin, method: str, path: str, body: object = None, *, headers: dict | None = None,
        peer: tuple = ("127.0.0.1", 50000), mode: str = REVERSE, host: str | None = None) -> http.Response | None:
    f = tflow.tflow()
    f.client_conn.peername = peer
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    content = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    hdrs = {"content-type": "application/json"} if body is not None and not isinstance(body, bytes) else {}
    f.request = http.Request.make(method, "http://127.0.0.1:9" + path, content, {**hdrs, **(headers or {})})
    if host is not None:  # after make: setting the URL rewrites the Host header
        f.request.headers["host"] = host
    asyncio.run(admin.request(f))
    return f.response
