"""Failover: which node a call goes to, and the next one when that one fails before the client saw a byte.

Within mitmproxy's flow model (docs/how-it-works.md, "Failover"):
- a node that refuses or does not accept the connection is found by a connect probe in the ``request``
  hook (only when the client has no open connection to it yet) and the call moves to another node
  before anything is sent; when no node accepts one, the client gets a JSON 502;
- an HTTP failure status (5xx, 429, 401, 403) is kept from the client: the ``response`` hook replays the
  call on other nodes with mitmproxy's own client and hands the first good answer over whole;
- once response bytes have gone to the client nothing is retried (an error event inside a 200 stream
  is recorded as a failure of that node).

``Failover`` is the one place that answers "is there another node" for a call: the nodes its client's key
may not use (and, for a WebSocket upgrade, those that take none) are barred, and ``codex_retries`` bounds the
attempts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.proxy import server_hooks

from addon.bodies import prepare_body
from addon.egress import attach
from addon.errors import CLIENT_KEY_NAME, error_response, refusal_response
from addon.ledger import Ledger
from addon.limits import Limits
from addon.metering.call import Call
from addon.metering.outcome import is_node_failure_status
from addon.nodeconn import Via, open_to, via_of
from addon.nodes.nodeurl import Origin, origin_of
from addon.nodes.routing import Node
from addon.services.runtime import Runtime

log = logging.getLogger("codex.relay")

# Metadata of a replayed attempt: the relay's hooks leave it alone.
RETRY_KEY = "codex_retry"
# A node due for its trial within this many seconds: the refused client is told to retry then.
SHORT_WAIT_S = 5


class Failover:
    """Node choice and failover for the relay's calls (a sub-addon of ``Relay``)."""

    def __init__(self, runtime: Runtime, ledger: Ledger, limits: Limits | None,
                 websocket_barred: Callable[[], set[str]]) -> None:
        self.runtime = runtime
        self.ledger = ledger
        self.limits = limits
        self.websocket_barred = websocket_barred
        self.retries = 2
        # (client connection id, node address) of open upstream connections: no probe needed for those
        self._connected: set[tuple[str, tuple[str, int]]] = set()

    def load(self, loader) -> None:
        loader.add_option("codex_retries", int, 2,
                          "Retry a call that failed before its first byte reached the client on up to "
                          "this many other nodes.")

    def configure(self, updated: set[str]) -> None:
        if "codex_retries" in updated:
            if ctx.options.codex_retries < 0:
                raise exceptions.OptionsError("codex_retries must be >= 0")
            self.retries = ctx.options.codex_retries

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (address := data.server.address) is not None:
            self._connected.add((data.client.id, (address[0], address[1])))

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (address := data.server.address) is not None:
            self._connected.discard((data.client.id, (address[0], address[1])))

    def barred(self, flow: http.HTTPFlow, call: Call | None) -> set[str]:
        """Nodes the flow's client key may not use, and for a WebSocket upgrade those that take none."""
        barred = self.limits.barred(flow) if self.limits is not None else set()
        return barred | self.websocket_barred() if call is not None and call.websocket else barred

    async def first_node(self, flow: http.HTTPFlow, call: Call | None) -> Node | None:
        """The node ``flow`` goes to (for a ``call``: one that accepts a connection); None when there is none,
        and ``flow.response`` is the client's answer (the call's ``relay_error`` says why)."""
        target = flow.request.path
        pool = self.runtime.pool
        barred = self.barred(flow, call)
        model = call.model if call else None
        api_format = call.api_format if call else None
        if call is not None and not pool.serves_any(api_format, model, exclude=barred):
            whose = (f"none of key {flow.metadata.get(CLIENT_KEY_NAME)!r}'s nodes serves"
                     if pool.serves_any(api_format, model) else "no configured node serves")
            call.relay_error = f"{whose} model {model!r} ({api_format})"
            # 400: the one status every client takes as final and shows with its message (docs/refusals.md).
            flow.response = refusal_response(target, 400, f"codex-relay: {call.relay_error}", "model_not_found")
            return None
        node = pool.choose(session_key=call.session_key if call else None, holder=call, exclude=barred,
                           api_format=api_format, model=model)
        if node is None:
            flow.response = _no_node(target, call, pool.cooldown_left(exclude=barred, api_format=api_format,
                                                                       model=model))
            return None
        if call is None:
            return node
        call.attempt(node)
        reachable = await self._reachable(flow, call)
        if reachable is None:  # which node and why (its address) stay in the record and the relay's log
            log.warning("call %s: no node accepted a connection (%s)", call.invoke_id, call.relay_error)
            flow.response = error_response(
                target, 502, "codex-relay: no upstream node accepted a connection", "upstream_unreachable")
        return reachable

    async def _reachable(self, flow: http.HTTPFlow, call: Call) -> Node | None:
        """The call's node, or the next one that accepts a TCP connection, before anything is sent.

        A node this client already has a connection to is taken as reachable: probing costs a
        connection, so it is done only where mitmproxy is about to open one.
        """
        node = call.node
        while node is not None:
            origin = origin_of(node.config.base_url)
            if (flow.client_conn.id, (origin.host, origin.port)) in self._connected:
                return node
            err = await _probe(origin, via_of(flow), self.runtime.connect_timeout)
            if err is None:
                return node
            call.relay_error = err
            nxt = self.next_node(flow, call)
            if nxt is None:
                return None  # the last node's failure is the call's own (call.node names it)
            log.warning("node %s: %s; trying node %s", node.id, err, nxt.id)
            self.ledger.attempt_failed(node, err)
            node = nxt
        return None

    def has_another(self, flow: http.HTTPFlow, call: Call) -> bool:
        """Whether the call may go to another node now (its retry budget, and a node for it)."""
        return call.attempts <= self.retries and self.runtime.pool.choose(
            exclude=[*call.tried, *self.barred(flow, call)], api_format=call.api_format,
            model=call.requested_model) is not None

    def next_node(self, flow: http.HTTPFlow, call: Call) -> Node | None:
        """Another node for the call, if the retry budget allows; it becomes the call's node (an attempt)."""
        if call.attempts > self.retries:
            return None
        pool = self.runtime.pool
        node = pool.choose(exclude=[*call.tried, *self.barred(flow, call)], holder=call,
                           api_format=call.api_format, model=call.requested_model)
        if node is None:
            return None
        call.attempt(node)
        call.attempts += 1
        if call.session_key:
            pool.sticky.put(call.session_key, node.id)
        return node

    async def replay(self, flow: http.HTTPFlow, call: Call) -> None:
        """Try other nodes with mitmproxy's replay client; the client gets the first good answer whole.

        ``call.node`` always names the node whose answer is in ``flow.response``: its failure is the
        invocation's own, every superseded attempt is recorded as a failed attempt of its node.
        """
        assert flow.response is not None and call.node is not None
        served = call.node
        while (node := self.next_node(flow, call)) is not None:
            attempt = _copy_for_retry(flow)
            attach(attempt, node.config, call.client_target)
            prepare_body(attempt.request, call, node)
            await ReplayHandler(attempt, ctx.options).replay()
            resp = attempt.response
            if resp is None:
                self.ledger.attempt_failed(node, str(attempt.error or "no response"))
                continue
            self.ledger.attempt_failed(served, f"HTTP {flow.response.status_code}", flow.response)
            flow.response, served = resp, node
            if not is_node_failure_status(resp.status_code):
                log.info("call %s served by node %s after %d attempts", call.invoke_id, node.id, call.attempts)
                break
        call.node = served


def _no_node(target: str, call: Call | None, wait: float | None) -> http.Response:
    """The refusal of a call no node may take now (``wait``: ``NodePool.cooldown_left``); it is no attempt
    of a node. A client is told to retry only when a node is due within seconds."""
    if wait is None:
        reason, retry_after = "every node that serves this call is disabled or has weight 0", None
    else:
        due = max(1, math.ceil(wait))
        reason = f"every node that serves this call is failing; the next is tried again in {due} s"
        retry_after = due if due <= SHORT_WAIT_S else None
    if call is not None:
        call.relay_error = reason
    return refusal_response(target, 429, f"codex-relay: no upstream node is available: {reason}",
                            "no_node_available", retry_after=retry_after)


def _copy_for_retry(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the client's request for mitmproxy's replay client."""
    attempt = flow.copy()
    attempt.metadata = {RETRY_KEY: True}
    attempt.is_replay = "request"
    attempt.response = None
    attempt.error = None
    return attempt


async def _probe(origin: Origin, via: Via | None, timeout: float) -> str | None:
    """Why a connection to the node cannot be made as the call's would be (TCP, through the upstream proxy's tunnel
    in upstream mode), or None when it can."""
    where = f"{origin.host}:{origin.port}"
    try:
        _, writer = await asyncio.wait_for(open_to(origin, via, tls=False), timeout)
    except TimeoutError:
        return f"connect to {where} timed out after {timeout:g} s"
    except OSError as e:
        return f"connect to {where} failed: {e.strerror or e}"
    writer.close()
    return None
