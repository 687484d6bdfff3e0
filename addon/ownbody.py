"""The relay's own endpoints read at most ``MAX_BODY`` bytes of a request body, and never buffer more.

mitmproxy holds a whole request body before the ``request`` hook, whatever its size: a chunked or HTTP/2
body sent to an endpoint that needs no client key (``addon.guard.target.is_own_endpoint``: the admin page,
/metrics, the usage endpoint) took the relay's memory (RSS +800 MiB for 400 MiB sent, never given back). So, in
``requestheaders``:

- a declared length over the cap gets 413 through the refusal endpoint (``addon.refusal``: drained, not held);
- a body of unknown length (chunked, HTTP/2 or 3 without a length) goes to the refusal endpoint with that
  413 waiting there, through a stream callable that keeps its first ``MAX_BODY`` bytes. Within the cap, the
  ``request`` hook (before the endpoints') puts the request back as the client sent it, with that body, and
  the endpoint answers as usual; ``handover`` (after the endpoints) keeps that answer (and gives the request
  the headers it went with, by which mitmproxy frames the body's end), and the ``response`` hook gives it to
  the client in place of the refusal endpoint's. A request whose body turns out empty
  (an HTTP/2 GET) never streams: put back the same way, it is answered directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.egress import EGRESS_KEY
from addon.errors import error_response, fail_closed
from addon.guard.target import is_own_endpoint
from addon.refusal import REFUSED_KEY, RefusalSink, answered, body_pending
from addon.services.clientkeys import ClientKeys

MAX_BODY = 2**20


def _too_large(flow: http.HTTPFlow) -> http.Response:
    return error_response(flow.request.path, 413, f"codex-relay: the relay's own endpoints read request bodies "
                          f"of at most {MAX_BODY} bytes", "request_too_large")


@dataclass(slots=True)
class _CappedBody:
    """Stream callable: passes the body on (to the refusal endpoint, which drops it), keeping up to ``MAX_BODY``."""

    kept: bytearray = field(default_factory=bytearray)
    over: bool = False
    streamed: bool = False  # called at all: the request went to the refusal endpoint

    def __call__(self, chunk: bytes) -> bytes:
        self.streamed = True
        if not self.over:
            if len(self.kept) + len(chunk) > MAX_BODY:
                self.over = True
                self.kept = bytearray()
            else:
                self.kept += chunk
        return chunk


@dataclass(frozen=True, slots=True)
class _Sent:
    """A request's target and headers as the client sent them (``RefusalSink.refuse`` changes both)."""

    scheme: bytes
    authority: bytes
    host: str
    port: int
    path: bytes
    fields: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, request: http.Request) -> _Sent:
        d = request.data
        return cls(d.scheme, d.authority, d.host, d.port, d.path, request.headers.fields)

    def restore(self, request: http.Request) -> None:
        d = request.data
        d.scheme, d.authority, d.host, d.port, d.path = self.scheme, self.authority, self.host, self.port, self.path
        request.headers.fields = self.fields


class OwnBodies:
    """The cap; ``handover`` is its second ``request`` hook, placed after the own endpoints' addons."""

    def __init__(self, refusals: RefusalSink, keys: ClientKeys) -> None:
        self.refusals = refusals
        self.keys = keys  # with client keys, the usage endpoint is one of the own endpoints
        self._capped: dict[str, tuple[_Sent, str, _CappedBody]] = {}  # flow id -> (request, token, body)
        # flow id -> the header fields it went to the refusal endpoint with, for a flow put back after streaming
        # there: mitmproxy frames what is left of the body (its end) by them.
        self._streamed: dict[str, tuple[tuple[bytes, bytes], ...]] = {}
        self._answers: dict[str, http.Response] = {}  # flow id -> the endpoint's answer, for the response hook
        self.handover = _Handover(self._hand_over)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow) or not body_pending(flow.request) or not is_own_endpoint(
                flow.request.path, reverse=isinstance(flow.client_conn.proxy_mode, ReverseMode),
                client_keys=self.keys.enabled):
            return
        length = flow.request.headers.get("content-length")
        if length is not None:  # mitmproxy reads no more than that
            if not length.strip().isdigit() or int(length) > MAX_BODY:
                self.refusals.refuse(flow, _too_large(flow), "request body too large")
            return
        sent = _Sent.of(flow.request)
        self.refusals.refuse(flow, _too_large(flow), "request body too large")
        if flow.response is None:  # on its way to the refusal endpoint (else answered at once)
            body = _CappedBody()
            flow.request.stream = body
            self._capped[flow.id] = (sent, flow.request.path.lstrip("/"), body)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        capped = self._capped.pop(flow.id, None)
        if capped is None:
            return
        sent, token, body = capped
        if body.over or flow.response is not None or flow.error is not None:
            return  # the refusal endpoint answers 413
        if body.streamed:
            self._streamed[flow.id] = flow.request.headers.fields
        else:  # no body came: mitmproxy sends the endpoint's answer itself, nothing reaches the refusal endpoint
            self.refusals.withdraw(token)
        sent.restore(flow.request)
        flow.request.raw_content = bytes(body.kept)
        del flow.metadata[REFUSED_KEY]
        flow.metadata.pop(EGRESS_KEY, None)
        flow.comment = ""

    def _hand_over(self, flow: http.HTTPFlow) -> None:
        fields = self._streamed.pop(flow.id, None)
        if fields is None:
            return
        flow.request.headers.fields = fields
        # mitmproxy takes the refusal endpoint's answer next (the request has gone there): this one replaces it.
        if flow.response is not None:
            self._answers[flow.id] = flow.response
        else:  # no endpoint answered after all: that 413 goes out, and nothing else routes the flow
            flow.metadata[REFUSED_KEY] = 413

    def response(self, flow: http.HTTPFlow) -> None:
        answer = self._answers.pop(flow.id, None)
        if answer is not None:
            flow.response = answer

    def error(self, flow: http.HTTPFlow) -> None:
        self._capped.pop(flow.id, None)
        self._streamed.pop(flow.id, None)
        self._answers.pop(flow.id, None)


class _Handover:
    """``OwnBodies``' second ``request`` hook, as an addon of its own: it runs after the own endpoints'."""

    def __init__(self, hook: Callable[[http.HTTPFlow], None]) -> None:
        self.request = hook
