"""The relay's first and last word on every request.

``Gate`` (first addon) refuses a request whose header fields hold a CR, LF or NUL, holds every request
until start-up is over (see ``addon.startup``; 503 if it fails or takes longer than ``START_HOLD_S``) and,
on the relay's own port (reverse mode), refuses every request target that is not canonical
(``addon.guard.target``) before any other addon reads it.
``EgressCheck`` (last ``request`` hook) lets no request leave unless an addon cleared its destination
(``addon.egress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.egress import CREDENTIAL_HEADERS, egress_problem
from addon.errors import error_response, fail_closed, internal_error
from addon.guard.target import is_health_path, target_problem
from addon.refusal import REFUSED_KEY, RefusalSink, answered

log = logging.getLogger("codex.gate")

# No header field holds these (RFC 9110 5.5). mitmproxy's HTTP/1 parser takes a bare CR and a NUL in a value;
# passed on, one request could read as two to the relay and a node, or cut a value short.
_BAD_FIELD = re.compile(rb"[\r\n\x00]")

# mitmproxy listens (and may serve) before the script's ``running`` hook: a relay restarted behind a
# balancer that still counts it up gets calls then. They wait for the end of start-up (normally a few
# milliseconds), up to this long, rather than be refused.
START_HOLD_S = 30.0


def bad_fields(headers: http.Headers) -> list[tuple[bytes, bytes]]:
    """The header fields whose name or value holds a CR, LF or NUL."""
    return [(name, value) for name, value in headers.fields if _BAD_FIELD.search(value) or _BAD_FIELD.search(name)]


class Gate:
    def __init__(self, refusals: RefusalSink, draining: Callable[[], bool] = lambda: False) -> None:
        self.refusals = refusals
        self.ready = False
        self.draining = draining  # the drain's: a relay that stopped taking calls fails its health check
        self._started = asyncio.Event()  # start-up is over, ready or not

    def settle(self, ready: bool) -> None:
        """Start-up is over: serve (``ready``) or refuse the requests held and every later one."""
        self.ready = ready
        self._started.set()

    def load(self, loader) -> None:
        # The admin page must see the Host the client addressed (DNS rebinding), which reverse mode
        # otherwise replaces with the reverse target's; every request the relay sends on gets the Host
        # of where it goes (addon.egress). Set here, before this script's addons are configured.
        # Lazy connections: mitmproxy would otherwise connect to the reverse target before any hook has
        # picked a node (and a plain ``mitmdump -s addon/codex.py`` has no run.sh to set it).
        ctx.options.update(keep_host_header=True, connection_strategy="lazy")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if answered(flow):
            return None
        bad = bad_fields(flow.request.headers)
        if bad:
            problem = f"the header {bad[0][0].decode('ascii', 'replace')[:64]!r} holds a CR, LF or NUL character"
            # Not even to the refusal endpoint: its HTTP parser refuses them too.
            flow.request.headers.fields = tuple(f for f in flow.request.headers.fields if f not in bad)
            self.refusals.refuse(flow, error_response(flow.request.path, 400, f"codex-relay: {problem}",
                                                      "invalid_header"), problem)
            return None
        if isinstance(flow.client_conn.proxy_mode, ReverseMode) and is_health_path(flow.request.path):
            self._health(flow)
            return None
        if not self.ready:
            return self._hold(flow) if not self._started.is_set() else self._not_ready(flow)
        self._check_target(flow)
        return None

    async def _hold(self, flow: http.HTTPFlow) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._started.wait(), START_HOLD_S)
        if self.ready:  # mitmproxy's own start-up has run too (its hooks follow the script's, none awaits)
            self._check_target(flow)
        else:
            self._not_ready(flow)

    def _health(self, flow: http.HTTPFlow) -> None:
        # Never held, never sent on: a balancer asks it to know whether to send calls here (HAProxy's httpchk).
        status = "draining" if self.draining() else "ready" if self.ready else "starting"
        flow.response = http.Response.make(200 if status == "ready" else 503, json.dumps({"status": status}),
                                           {"content-type": "application/json", "cache-control": "no-store"})

    @staticmethod
    def _not_ready(flow: http.HTTPFlow) -> None:
        # Answered here, not by the refusal endpoint: until mitmproxy's own addons have run their ``running``
        # hooks (they follow the script's), a request sent on to that endpoint meets its TLS addon without a
        # certificate store, which ends the process. Such a body is read (only while the relay starts).
        flow.metadata[REFUSED_KEY] = 503
        flow.response = error_response(
            flow.request.path, 503, "codex-relay is not ready: it is starting, or its configuration did not "
            "complete (see its log)", "relay_not_ready")

    def _check_target(self, flow: http.HTTPFlow) -> None:
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            path = flow.request.path
            not_canonical = target_problem(path)
            if not_canonical:
                self.refusals.refuse(flow, error_response(path, 400, f"codex-relay: {not_canonical}",
                                                          "invalid_request_target"), not_canonical)


class EgressCheck:
    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:  # a refused flow is cleared for the refusal endpoint
            return
        problem = egress_problem(flow)
        if problem:
            log.error("%s %s not sent: %s", flow.request.method, flow.request.path.partition("?")[0][:200], problem)
            for name in CREDENTIAL_HEADERS:
                flow.request.headers.pop(name, None)
            flow.response = internal_error(flow)
