"""The relay's flow hooks driven in process, as mitmproxy tests its own addons (``taddons``, ``tflow``).

``RelayHarness`` runs a ``Relay`` on a stub runtime (its pool, a real ``Health``, a writer that keeps what it
is given) inside mitmproxy's test context, and plays mitmproxy around it: each hook is triggered through the
addon manager as the proxy would, and the test plays the node (``answer``, ``fail``) where no real upstream
is needed. A stand-in for mitmproxy's connection handler of a client (``connected``) shows the test the
relay's own answers and closes (``addon.inject``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterable
from types import SimpleNamespace

from mitmproxy import connection, flow, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
    ResponseHeaders,
)
from mitmproxy.test import taddons, tflow, tutils

from addon.errors import CLIENT_KEY_NAME
from addon.limits import Limits
from addon.nodes.breaker import BreakerPolicy
from addon.nodes.health import Health
from addon.nodes.routing import Node, NodePool
from addon.relay import Relay
from addon.services.clientkeys import ClientKeys
from store.keys import KeySpec
from store.records import InvocationRecord, KeyCount, NodeConfig, NodeStateUpdate, utcnow


class StubRuntime:
    """What ``Relay`` uses of ``addon.services.runtime.Runtime``: the pool, health, prices and a writer that keeps
    records."""

    def __init__(self, nodes: Iterable[NodeConfig], *, prices=None, policy: BreakerPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.submitted: list = []
        self.pool = NodePool([Node(c) for c in nodes], clock=clock)
        self.health = Health(self.submit, policy, clock=clock)
        self.prices = prices
        self.engine = None
        self.connect_timeout = 1.0
        self.metrics = SimpleNamespace(count_in_flight=self._count_in_flight, count_budgets=lambda _: None)
        self.in_flight: Callable[[], int] = lambda: 0  # the relay's count of calls in flight, once it gives it
        self.keys = ClientKeys()
        self.shutdown: list[Callable[[], None]] = []

    def submit(self, item: object) -> None:
        self.submitted.append(item)

    def _count_in_flight(self, count: Callable[[], int]) -> None:
        self.in_flight = count

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        self.shutdown.append(callback)

    def alert(self, *args: object) -> None:
        pass


class Handler:
    """A stand-in for mitmproxy's connection handler of one client: the answer the relay injects (``answered``),
    and whether it closed the node's connection (``closed``)."""

    def __init__(self) -> None:
        self.transports: set[connection.Server] = set()
        self.closed = asyncio.Event()
        self.answered: asyncio.Future[http.Response] = asyncio.get_running_loop().create_future()

    async def server_event(self, event: object) -> None:
        """An event injected as if the node had sent it (``addon.inject.answer_waiting``)."""
        if isinstance(event, ResponseHeaders) and not self.answered.done():
            self.answered.set_result(event.response)

    def close_connection(self, conn: connection.Server) -> None:
        self.closed.set()


class RelayHarness:
    """A ``Relay`` in mitmproxy's test context; use inside a running event loop (``async with``)."""

    def __init__(self, *nodes: NodeConfig, keys: list[KeySpec] | None = None, prices=None,
                 policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = utcnow, **options: object) -> None:
        self.runtime = StubRuntime(nodes, prices=prices, policy=policy, clock=clock)
        self.limits = None
        if keys is not None:
            self.limits = Limits(self.runtime, clock=clock, now=now)  # type: ignore[arg-type]
            self.runtime.keys.apply(keys)
        self.relay = Relay(self.runtime, limits=self.limits)  # type: ignore[arg-type]
        # mitmproxy's own (its options are the proxy's): a stand-in handler per client is put in its connections
        self.proxyserver = Proxyserver()
        self.options = options

    async def __aenter__(self) -> RelayHarness:
        self.tctx = taddons.context(self.relay, self.proxyserver)
        self.tctx.configure(self.relay, **self.options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    # -- what was recorded ---------------------------------------------------------------------------
    def records(self) -> list[InvocationRecord]:
        return [r for r in self.runtime.submitted if isinstance(r, InvocationRecord)]

    def failed_attempts(self) -> list[NodeStateUpdate]:
        return [u for u in self.runtime.submitted if isinstance(u, NodeStateUpdate) and u.failed_attempt]

    def key_counts(self) -> list[KeyCount]:
        return [c for c in self.runtime.submitted if isinstance(c, KeyCount)]

    def node(self, node_id: str) -> Node:
        node = self.runtime.pool.get(node_id)
        assert node is not None
        return node

    # -- the proxy's part ----------------------------------------------------------------------------
    async def send(self, path: str = "/v1/responses", body: dict | None = None, *, method: str = "POST",
                   headers: dict[str, str] | None = None, client_key: str | None = None) -> http.HTTPFlow:
        """A client's request through the request hooks: on return it goes to ``flow.request``'s host, or the
        relay answered it (``flow.response``)."""
        content = json.dumps(body).encode() if body is not None else b""
        hdrs = {"content-type": "application/json", "authorization": "Bearer client-key",
                "content-length": str(len(content)), **(headers or {})}
        f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), content=content,
                                        headers=http.Headers(**{k.replace("-", "_"): v for k, v in hdrs.items()})))
        f.request.host, f.request.port = "relay.test", 80
        if client_key is not None:
            f.metadata[CLIENT_KEY_NAME] = client_key
        await self.hook(HttpRequestHeadersHook(f))
        if f.response is None:
            await self.hook(HttpRequestHook(f))
        if f.response is not None:  # answered by the relay itself: mitmproxy goes on with the response hook
            await self.hook(HttpResponseHook(f))
        return f

    async def connected(self, f: http.HTTPFlow, alpn: bytes | None = None) -> Handler:
        """mitmproxy opened the flow's connection to its node (``alpn``: the protocol they speak); returns the
        stand-in for the client's connection handler."""
        server = connection.Server(address=(f.request.host, f.request.port), alpn=alpn)
        server.state = connection.ConnectionState.OPEN
        f.server_conn = server
        handler = self.proxyserver.connections.setdefault(f.client_conn.id, Handler())  # type: ignore[arg-type]
        assert isinstance(handler, Handler)
        handler.transports.add(server)
        await self.hook(server_hooks.ServerConnectedHook(server_hooks.ServerConnectionHookData(server, f.client_conn)))
        return handler

    async def answer(self, f: http.HTTPFlow, status: int = 200, chunks: Iterable[bytes] = (), *,
                     headers: dict[str, str] | None = None, length: bool = False) -> bytes:
        """The node answers: headers, then the body in ``chunks``; returns what the client got of the body.
        ``length``: the answer has a content-length (else it is chunked)."""
        parts = list(chunks)
        self.headers(f, status, headers, sum(map(len, parts)) if length else None)
        await self.hook(HttpResponseHeadersHook(f))
        got = self.body(f, parts)
        await self.hook(HttpResponseHook(f))
        return got

    def headers(self, f: http.HTTPFlow, status: int, headers: dict[str, str] | None, length: int | None) -> None:
        hdrs = http.Headers(**{k.replace("-", "_"): v for k, v in (headers or {}).items()})
        if length is not None:
            hdrs["content-length"] = str(length)
        else:
            hdrs["transfer-encoding"] = "chunked"
        f.response = http.Response(b"HTTP/1.1", status, b"", hdrs, None, None, time.time(), None)

    def body(self, f: http.HTTPFlow, parts: list[bytes]) -> bytes:
        """The answer's body after its headers: through the stream callable the relay set, or held whole."""
        assert f.response is not None
        stream = f.response.stream
        if callable(stream):
            out: list[bytes] = []
            for part in [*parts, b""]:
                sent = stream(part)
                out += [sent] if isinstance(sent, bytes) else sent
            f.response.timestamp_end = time.time()
            return b"".join(out)
        f.response.raw_content = b"".join(parts)
        f.response.timestamp_end = time.time()
        return f.response.raw_content

    async def fail(self, f: http.HTTPFlow, message: str) -> None:
        """The flow ends in an error (the client went away, the node's connection broke)."""
        f.error = flow.Error(message)
        await self.hook(HttpErrorHook(f))

    async def hook(self, event: object) -> None:
        await self.tctx.master.addons.handle_lifecycle(event)  # type: ignore[arg-type]


def in_loop[**P](test: Callable[P, Coroutine[object, object, None]]) -> Callable[P, None]:
    """An async test run in an event loop of its own (the relay's hooks need a running one)."""
    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def node(node_id: str, base_url: str, weight: int = 1, **kw: object) -> NodeConfig:
    return NodeConfig(id=node_id, base_url=base_url, api_key=f"key-{node_id}", weight=weight, **kw)  # type: ignore[arg-type]
