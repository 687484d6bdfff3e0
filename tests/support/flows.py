"""Test flows for driving the addons in process."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow


def request_flow(path: str = "/v1/responses", headers: dict[str, str] | None = None,
                 mode: str | None = None) -> http.HTTPFlow:
    """A test flow whose request goes to ``path`` with only ``headers``; ``mode``: the proxy mode it came in."""
    f = tflow.tflow()
    if mode is not None:
        f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.request.path = path
    f.request.headers.clear()
    f.request.headers.update(headers or {})
    return f
