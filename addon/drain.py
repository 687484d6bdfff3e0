"""Stopping without cutting calls: SIGTERM drains the relay, a second SIGTERM ends it at once.

mitmproxy ends the process on SIGTERM right away, cutting every stream in flight (a balancer in front
answers those clients with its own 502). ``Drain`` takes SIGTERM over: the proxy stops listening at once
(a balancer's health check fails and new connections go to another relay), requests already on open
connections are served with ``Connection: close`` so that clients do not reuse them, and the process ends
(through mitmproxy's usual shutdown, which records and flushes) when no request is in flight any more and
no connection accepted in the last ``ARRIVING_S`` waits for its first request, or after
``codex_drain_timeout`` seconds. SIGINT (Ctrl-C) still ends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from mitmproxy import connection, ctx, http

from addon.options import seconds

log = logging.getLogger("codex.drain")

DEFAULT_DRAIN_TIMEOUT = "30"
# A connection accepted just before the listener closed may not have sent its request yet (a balancer sends it
# right after connecting): the drain waits this long for it rather than close it unanswered (HAProxy's 502).
ARRIVING_S = 1.0


class Drain:
    def __init__(self) -> None:
        self.timeout = float(DEFAULT_DRAIN_TIMEOUT)
        self.delay = 0.0
        self.draining = False
        self._in_flight: set[str] = set()  # ids of flows whose request came and whose answer has not ended
        self._arriving: dict[str, float] = {}  # client connection id -> when accepted, until its first request
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def load(self, loader) -> None:
        loader.add_option("codex_drain_delay", str, "0",
                          "On SIGTERM, seconds the relay keeps listening and serving while its health check "
                          "(GET /healthz) answers 503, before it stops listening: long enough for a balancer's "
                          "check to take it out (HAProxy: fall x inter), so that no connection is on its way "
                          "when the listener closes. 0: stop listening at once.")
        loader.add_option("codex_drain_timeout", str, DEFAULT_DRAIN_TIMEOUT,
                          "On SIGTERM the relay stops listening and waits up to this many seconds for the "
                          "calls in flight to end (they are recorded), then exits; a second SIGTERM exits at "
                          "once. 0: exit at once.")

    def configure(self, updated: set[str]) -> None:
        if "codex_drain_timeout" in updated:
            self.timeout = seconds("codex_drain_timeout", ctx.options.codex_drain_timeout)
        if "codex_drain_delay" in updated:
            self.delay = seconds("codex_drain_delay", ctx.options.codex_drain_delay)

    def running(self) -> None:
        # Replaces mitmproxy's own SIGTERM handler (which shuts down at once); synchronous, see RefusalSink.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.sigterm)

    def client_connected(self, client: connection.Client) -> None:
        self._arriving[client.id] = time.monotonic()

    def client_disconnected(self, client: connection.Client) -> None:
        if self._arriving.pop(client.id, None) is not None:
            self._idle.set()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._arriving.pop(flow.client_conn.id, None)
        self._in_flight.add(flow.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is not None and flow.response.http_version == "HTTP/1.1":
            flow.response.headers["connection"] = "close"  # served, then the client goes elsewhere

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket is in flight until it closes
            self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        if not self._in_flight:
            self._idle.set()

    def _still_arriving(self) -> bool:
        """Whether a connection accepted in the last ``ARRIVING_S`` has not sent its first request yet."""
        recent = time.monotonic() - ARRIVING_S
        return any(at > recent for at in self._arriving.values())

    @property
    def in_flight(self) -> int:
        """Requests that came and whose answer has not ended."""
        return len(self._in_flight)

    def sigterm(self) -> None:
        if self.draining:
            log.info("second SIGTERM: exiting now, %d call(s) still in flight", self.in_flight)
            ctx.master.shutdown()
            return
        self.draining = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def is_draining(self) -> bool:
        """Whether SIGTERM came: the gate's health check answers 503 from then on."""
        return self.draining

    async def _drain(self) -> None:
        if self.delay:
            log.info("SIGTERM: failing the health check for %g s before no longer listening (SIGTERM again to "
                     "exit now)", self.delay)
            await asyncio.sleep(self.delay)  # the balancer's checks, not a synchronisation: it is the point
        started = time.monotonic()
        proxyserver = ctx.master.addons.get("proxyserver")
        for server in list(proxyserver.servers) if proxyserver is not None else []:
            if server.is_running:
                await server.stop()
        if (self._in_flight or self._still_arriving()) and self.timeout:
            log.info("SIGTERM: no new connections; waiting up to %g s for %d call(s) in flight (SIGTERM again "
                     "to exit now)", self.timeout, len(self._in_flight))
            deadline = started + self.timeout
            while self._in_flight or self._still_arriving():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("drain timeout (%g s): exiting with %d call(s) in flight", self.timeout,
                                len(self._in_flight))
                    break
                self._idle.clear()
                # A call ending or a connection closing wakes the check; an arriving connection's grace ends it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), min(left, ARRIVING_S) if self._arriving else left)
            else:
                log.info("calls in flight ended in %.1f s: exiting", time.monotonic() - started)
        ctx.master.shutdown()
