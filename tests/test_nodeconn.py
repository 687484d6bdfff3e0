"""The relay's own connections to a node in upstream mode go through the upstream proxy as mitmproxy's do: a CONNECT
(with ``upstream_auth``'s Proxy-Authorization) for a TLS node, the proxy's own connection for a plain one; a proxy's
refusal is the connection's failure."""

from __future__ import annotations

import asyncio
import socket

import pytest
from mitmproxy.addons.upstream_auth import UpstreamAuth
from mitmproxy.test import taddons, tflow

from addon.egress import Origin
from addon.nodeconn import ProxyRefused, open_to, via_of
from tests.support.connectproxy import ConnectProxy


def _flow_via(port: int):
    flow = tflow.tflow()
    flow.server_conn.via = ("http", ("127.0.0.1", port))  # as mitmproxy sets it in upstream mode
    return flow


def _listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def test_a_tls_nodes_connection_is_a_connect_tunnel_with_the_upstream_auth():
    with _listener() as node, ConnectProxy({"node.invalid": ("127.0.0.1", node.getsockname()[1])}) as proxy:
        port = node.getsockname()[1]
        with taddons.context(UpstreamAuth()) as tctx:
            tctx.options.upstream_auth = "user:pw"
            via = via_of(_flow_via(proxy.port))

            async def connect() -> None:
                _, writer = await open_to(Origin("https", "node.invalid", port), via, tls=False)
                writer.close()
            asyncio.run(connect())
    assert proxy.connects == [f"node.invalid:{port}"]
    head = bytes(proxy.received)
    assert head.startswith(f"CONNECT node.invalid:{port} HTTP/1.1\r\n".encode())
    assert b"\r\nProxy-Authorization: Basic dXNlcjpwdw==\r\n" in head
    assert f"\r\nHost: node.invalid:{port}\r\n".encode() in head  # http_connect_send_host_header's default


def test_a_connect_the_proxy_refuses_fails_the_connection_with_its_answer():
    with ConnectProxy({}) as proxy, taddons.context(UpstreamAuth()):
        via = via_of(_flow_via(proxy.port))
        with pytest.raises(ProxyRefused, match="403 Forbidden"):
            asyncio.run(open_to(Origin("https", "node.invalid", 443), via, tls=False))
    assert proxy.connects == ["node.invalid:443"]


def test_a_plain_nodes_connection_is_the_proxys_own_and_without_a_proxy_the_nodes():
    with _listener() as node, ConnectProxy({}) as proxy, taddons.context(UpstreamAuth()):
        async def connect(origin: Origin, flow) -> None:
            _, writer = await open_to(origin, via_of(flow), tls=False)
            writer.close()
        asyncio.run(connect(Origin("http", "node.invalid", 80), _flow_via(proxy.port)))  # absolute-form requests go
        asyncio.run(connect(Origin("http", "127.0.0.1", node.getsockname()[1]), tflow.tflow()))  # reverse mode
        assert via_of(tflow.tflow()) is None
    assert proxy.connects == [] and proxy.received == b""
