"""The relay's first and last word on every request.

``Gate`` (first addon) refuses a request whose header fields hold a CR, LF or NUL, answers 503 until the
script is fully configured (see ``addon.startup``) and, on the relay's own port (reverse mode), refuses
every request target that is not canonical (``addon.target``) before any other addon reads it.
``EgressCheck`` (last ``request`` hook) lets no request leave unless an addon cleared its destination
(``addon.egress``).
"""

from __future__ import annotations

import logging
import re

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.egress import CREDENTIAL_HEADERS, egress_problem
from addon.errors import error_response, fail_closed, internal_error
from addon.refusal import REFUSED_KEY, RefusalSink, answered
from addon.target import target_problem

log = logging.getLogger("codex.gate")

# No header field holds these (RFC 9110 5.5). mitmproxy's HTTP/1 parser takes a bare CR and a NUL in a value;
# passed on, one request could read as two to the relay and a node, or cut a value short.
_BAD_FIELD = re.compile(rb"[\r\n\x00]")


def bad_fields(headers: http.Headers) -> list[tuple[bytes, bytes]]:
    """The header fields whose name or value holds a CR, LF or NUL."""
    return [(name, value) for name, value in headers.fields if _BAD_FIELD.search(value) or _BAD_FIELD.search(name)]


class Gate:
    def __init__(self, refusals: RefusalSink) -> None:
        self.refusals = refusals
        self.ready = False

    def load(self, loader) -> None:
        # The admin page must see the Host the client addressed (DNS rebinding), which reverse mode
        # otherwise replaces with the reverse target's; every request the relay sends on gets the Host
        # of where it goes (addon.egress). Set here, before this script's addons are configured.
        # Lazy connections: mitmproxy would otherwise connect to the reverse target before any hook has
        # picked a node (and a plain ``mitmdump -s addon/codex.py`` has no run.sh to set it).
        ctx.options.update(keep_host_header=True, connection_strategy="lazy")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow):
            return
        path = flow.request.path
        bad = bad_fields(flow.request.headers)
        if bad:
            problem = f"the header {bad[0][0].decode('ascii', 'replace')[:64]!r} holds a CR, LF or NUL character"
            # Not even to the refusal endpoint: its HTTP parser refuses them too.
            flow.request.headers.fields = tuple(f for f in flow.request.headers.fields if f not in bad)
            self.refusals.refuse(flow, error_response(path, 400, f"codex-relay: {problem}", "invalid_header"),
                                 problem)
            return
        if not self.ready:
            # Answered here, not by the refusal endpoint: until mitmproxy's own addons have run their ``running``
            # hooks (they follow the script's), a request sent on to that endpoint meets its TLS addon without a
            # certificate store, which ends the process. Such a body is read (only while the relay starts).
            flow.metadata[REFUSED_KEY] = 503
            flow.response = error_response(
                path, 503, "codex-relay is not ready: its configuration did not complete (see its log)",
                "relay_not_ready")
            return
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
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
