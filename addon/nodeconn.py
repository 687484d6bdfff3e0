"""The relay's own connections to a node (the connect probe, the WebSocket upgrade check), made as mitmproxy makes
the call's: straight to the node, or through the upstream proxy of ``--mode upstream:…``.

Through a proxy mitmproxy (its ``HttpUpstreamProxy``) tunnels a TLS node's connection with ``CONNECT host:port``
(a ``Host`` header as ``http_connect_send_host_header`` says, ``Proxy-Authorization`` from ``upstream_auth``) and
sends a plain-HTTP node's requests to the proxy itself, in absolute form; an ``https://`` proxy is reached over
TLS first. A check that went straight to the node would fail where only the proxy can reach out, or go around
it where it must not.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.addons.upstream_auth import parse_upstream_auth

from addon.egress import Origin


class ProxyRefused(OSError):
    """The upstream proxy did not open a tunnel to the node (its answer, or its lack of one, in the message)."""


@dataclass(frozen=True, slots=True)
class Via:
    """The upstream proxy a flow's connections go through (``flow.server_conn.via``) and what CONNECT carries."""

    scheme: str  # of the proxy: http or https
    host: str
    port: int
    connect_headers: tuple[tuple[bytes, bytes], ...] = ()


def via_of(flow: http.HTTPFlow) -> Via | None:
    """The proxy mitmproxy sends this flow's request through (set in upstream mode), or None: straight to it."""
    spec = flow.server_conn.via
    if spec is None:
        return None
    headers = []
    if ctx.options.upstream_auth:  # as mitmproxy's UpstreamAuth puts it on a CONNECT (http_connect_upstream)
        headers.append((b"Proxy-Authorization", parse_upstream_auth(ctx.options.upstream_auth)))
    scheme, (host, port) = spec
    return Via(scheme, host, port, tuple(headers))


def upstream_tls() -> ssl.SSLContext:
    """TLS to a node or to the upstream proxy, verified as mitmproxy's options say it verifies upstreams."""
    opts = ctx.options
    tls = ssl.create_default_context(cafile=opts.ssl_verify_upstream_trusted_ca or None,
                                     capath=opts.ssl_verify_upstream_trusted_confdir or None)
    if opts.ssl_insecure:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["http/1.1"])
    return tls


async def open_to(origin: Origin, via: Via | None, *, tls: bool
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that reaches ``origin`` as mitmproxy's for a request to it would: through ``via`` when set (a
    tunnel when the node is TLS, else the proxy's own connection, which takes the request in absolute form), with
    TLS to the node when ``tls``. Raises OSError (``ProxyRefused`` for a proxy's no)."""
    node_tls = upstream_tls() if tls else None
    if via is None:
        return await asyncio.open_connection(origin.host, origin.port, ssl=node_tls,
                                             server_hostname=origin.host if node_tls else None)
    proxy_tls = upstream_tls() if via.scheme == "https" else None
    reader, writer = await asyncio.open_connection(via.host, via.port, ssl=proxy_tls,
                                                   server_hostname=via.host if proxy_tls else None)
    try:
        if origin.scheme == "https":
            await _connect(reader, writer, origin, via)
            if node_tls is not None:
                await writer.start_tls(node_tls, server_hostname=origin.host)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: Origin, via: Via) -> None:
    authority = origin.host.encode("idna") + f":{origin.port}".encode()
    headers = [(b"Host", authority)] if ctx.options.http_connect_send_host_header else []
    head = b"CONNECT " + authority + b" HTTP/1.1\r\n" + b"".join(
        k + b": " + v + b"\r\n" for k, v in [*headers, *via.connect_headers]) + b"\r\n"
    writer.write(head)
    where = f"upstream proxy {via.host}:{via.port}"
    try:
        answer = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise ProxyRefused(f"{where} closed the connection before answering CONNECT") from e
    except asyncio.LimitOverrunError as e:
        raise ProxyRefused(f"{where} answered CONNECT with an overlong head") from e
    status_line = answer.split(b"\r\n", 1)[0]
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProxyRefused(f"{where} gave no HTTP answer to CONNECT")
    if not 200 <= int(parts[1]) < 300:  # as mitmproxy takes it
        raise ProxyRefused(f"{where} refused HTTP CONNECT to {origin.host}:{origin.port}: "
                           f"{status_line.decode('ascii', 'replace')}")
