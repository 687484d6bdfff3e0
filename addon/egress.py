"""Where a request goes and the one place a node's key is put on it.

The invariant: a node's key is only ever set on a request whose final scheme, host and port are the
node's own. The destination is built from parsed parts (never by gluing strings, which a target such
as ``@evil:1/v1/x`` would turn into another host), then compared with the node's origin, and only then
is the key set. ``attach`` records the origin it checked on the flow; ``egress_problem`` (run by the
last addon, after every other ``request`` hook) refuses a flow whose destination no longer matches it,
or that nobody marked at all: nothing leaves the relay because a hook failed or was skipped.

Paths (``addon.nodes.nodeurl``): a node's ``base_url`` is what you would give an SDK (it carries its own
version prefix, e.g. ``https://h/openai/v1``); the client talks to the relay as to an OpenAI-style base URL ending in
``/v1``. So a leading ``/v1`` of the client's path is dropped and the rest is put after the node's
path: ``/v1/responses`` on ``https://h/openai/v1`` → ``/openai/v1/responses``. The query is kept.
Every attempt of a call (first choice, connect probe, retries) maps the client's *original* target.
"""

from __future__ import annotations

import functools

from mitmproxy import http
from mitmproxy.net.http import url

from addon.nodes.nodeurl import EgressRefused, Origin, key_header, node_path, origin_of
from store.records import NodeConfig

# Metadata: the (scheme, host, port) a flow was cleared to go to. Plain data: flows are pickled by -w.
EGRESS_KEY = "codex_egress"
# Credentials a client may send; none of them ever reaches a node as the client sent it.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")
_CREDENTIAL_NAMES = frozenset(name.encode() for name in CREDENTIAL_HEADERS)


def header_values(headers: http.Headers, wanted: tuple[str, ...]) -> dict[str, list[str]]:
    """The values of the headers named in ``wanted`` (lower case) that ``headers`` holds, by name, found in
    one pass over them: a lookup by name walks every header, and these run for every call."""
    names = _names(wanted)
    found: dict[str, list[str]] = {}
    for name, value in headers.fields:
        key = names.get(name.lower())  # as mitmproxy compares names: ASCII case
        if key is not None:
            found.setdefault(key, []).append(value.decode("utf-8", "surrogateescape"))  # as mitmproxy decodes
    return found


@functools.cache
def _names(wanted: tuple[str, ...]) -> dict[bytes, str]:
    return {name.encode(): name for name in wanted}


def credentials_in(headers: http.Headers) -> dict[str, list[str]]:
    """The values of the ``CREDENTIAL_HEADERS`` that ``headers`` holds, by name."""
    return header_values(headers, CREDENTIAL_HEADERS)


def attach(flow: http.HTTPFlow, node: NodeConfig, client_target: str) -> Origin:
    """Point ``flow``'s request at ``node`` and put the node's key on it; raises EgressRefused.

    The client's credentials are removed first, whatever happens next; the key goes in the node's own
    header (``key_header``), whichever the client used.
    """
    request = flow.request
    headers = request.headers
    name, value = key_header(node)
    # The client's credentials, and anything in the node's key header (a node's unusual header could be
    # one the client sent).
    dropped = _CREDENTIAL_NAMES | {name.encode()}
    headers.fields = tuple(field for field in headers.fields if field[0].lower() not in dropped)
    flow.metadata.pop(EGRESS_KEY, None)
    origin = origin_of(node.base_url)
    path = node_path(node.base_url, client_target)
    _point(request, origin, path)
    if (request.scheme, request.host, request.port) != origin.as_tuple():
        raise EgressRefused("the request's destination is not the node's")
    flow.metadata[EGRESS_KEY] = origin.as_tuple()
    headers.fields += ((name.encode(), value.encode("utf-8", "surrogateescape")),)
    return origin


def _point(request: http.Request, origin: Origin, path: str) -> None:
    """What mitmproxy's scheme, host, port and path setters do together, the Host header (and HTTP/2
    authority) rewritten once instead of by each setter: it is the largest part of a call's rewrite."""
    data = request.data
    data.scheme, data.host, data.port = origin.scheme.encode(), origin.host, origin.port
    data.path = path.encode("utf-8", "surrogateescape")
    header, authority = _host_values(origin)
    if data.authority:
        data.authority = authority
    # As mitmproxy sets a header: the first Host gets the value, any other is dropped; none is added.
    fields, seen = [], False
    for field in data.headers.fields:
        if field[0].lower() == b"host":
            if seen:
                continue
            seen, field = True, (field[0], header)
        fields.append(field)
    if seen:
        data.headers.fields = tuple(fields)


@functools.lru_cache(maxsize=1024)
def _host_values(origin: Origin) -> tuple[bytes, bytes]:
    """The Host header and the HTTP/2 authority of requests to ``origin``, encoded as mitmproxy's setters do."""
    value = url.hostport(origin.scheme, origin.host, origin.port)
    try:
        authority = value.encode("idna")
    except UnicodeError:
        authority = value.encode("utf8", "surrogateescape")
    return value.encode("utf-8", "surrogateescape"), authority


def clear_as_is(flow: http.HTTPFlow) -> None:
    """Let a request go where it is addressed (monitor mode: the relay routes nothing), with that Host."""
    request = flow.request
    request.headers.pop("proxy-authorization", None)  # it was for the relay (a client key), not for them
    request.host_header = url.hostport(request.scheme, request.host, request.port)
    flow.metadata[EGRESS_KEY] = (request.scheme, request.host, request.port)


def egress_problem(flow: http.HTTPFlow) -> str | None:
    """Why this request must not leave the relay, or None: it was cleared and still goes where it was cleared to."""
    cleared = flow.metadata.get(EGRESS_KEY)
    if cleared is None:
        return "no addon cleared the request for sending"
    request = flow.request
    if (request.scheme, request.host, request.port) != tuple(cleared):
        return "the request's destination changed after it was cleared"
    return None
