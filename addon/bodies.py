"""A call's bodies on their way: what each node is sent, and what meters the answer on its way back.

mitmproxy glue for ``addon.metering.call``: the client's body with the model name a node wants (its ``model_map``) and
the usage probe (``addon.metering.usageprobe``); the answer's ``StreamMeter``, behind the filter that takes out the
usage chunk the relay asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from addon.egress import header_values
from addon.metering.call import Call, is_sse
from addon.metering.meter import StreamMeter
from addon.metering.usageprobe import UsageChunkFilter, add_include_usage
from addon.nodes.modelroute import rewrite_model, upstream_model
from addon.nodes.routing import Node

CONTENT_HEADERS = ("content-length", "content-type", "content-encoding")


def prepare_body(request: http.Request, call: Call, node: Node) -> None:
    """The body this node gets: the client's, with the model name the node wants (its ``model_map``)
    and, for a streamed chat call without usage, the usage probe unless the node turns it off."""
    model = upstream_model(node.config, call.requested_model)
    mapped = model is not None and model != call.requested_model
    probe = call.api_format == "chat" and call.stream and node.config.usage_probe
    if call.original_body is None:
        if not (mapped or probe):
            return  # nothing to change for this call: the body goes as the client sent it
        if request.content is None:
            return  # a body mitmproxy streams instead of buffering: nothing to rewrite, it goes as sent
        call.original_body = request.content
    body = call.original_body
    if mapped and model is not None and (rewritten := rewrite_model(body, model)) is not None:
        body = rewritten
    probed = add_include_usage(body) if probe else None
    call.probed = probed is not None
    if probed is not None:
        body = probed
    if body != request.content:
        request.content = body  # re-encoded as the client encoded it; content-length follows


def start_meter(call: Call, request: http.Request, resp: http.Response, keep_body_bytes: int = 0,
                found: dict[str, list[str]] | None = None) -> Callable[[bytes], bytes | list[bytes]]:
    """Give the call its meter for ``resp``, the answer to ``request`` (``found``: its ``CONTENT_HEADERS``, if
    read already); returns what the body goes through: the meter, or the filter that takes out the usage chunk
    the relay asked for and passes every chunk to the meter first."""
    found = header_values(resp.headers, CONTENT_HEADERS) if found is None else found
    call.meter = StreamMeter(call.api_format, folded(found, "content-type"), folded(found, "content-encoding"),
                             keep_body_bytes=keep_body_bytes)
    if not strips_usage(call, request, resp, found):
        return call.meter
    if "content-length" in found:
        # The length counts the chunk taken out: the client would wait for bytes that never come. HTTP/2
        # frames its end without one; HTTP/1.1 gets the answer chunked.
        del resp.headers["content-length"]
        if not (request.is_http2 or request.is_http3):
            resp.headers["transfer-encoding"] = "chunked"
    return UsageChunkFilter(call.meter)


def strips_usage(call: Call, request: http.Request, resp: http.Response, found: dict[str, list[str]]) -> bool:
    """Whether the client gets this answer (``found``: its ``CONTENT_HEADERS``) without the usage chunk the
    relay asked for: only a successful event stream sent as is (compressed bytes are passed on untouched),
    and not one with a length to an HTTP/1.0 client (which can be sent neither a new length nor chunks)."""
    if not call.probed or resp.status_code != 200:
        return False
    if "content-length" in found and request.http_version == "HTTP/1.0":
        return False
    encoding = folded(found, "content-encoding")
    return (is_sse(folded(found, "content-type"))
            and (encoding if encoding is not None else "identity").strip().lower() == "identity")


def meter_whole(call: Call, request: http.Request, resp: http.Response) -> None:
    """Meter an answer held whole (a retry's, an error's): its body goes through what a stream would have."""
    feed = start_meter(call, request, resp)
    body = [*chunks(feed(resp.raw_content or b"")), *chunks(feed(b""))]
    if feed is not call.meter:
        resp.raw_content = b"".join(body)


def folded(found: dict[str, list[str]], name: str) -> str | None:
    """A header's value as mitmproxy's ``headers.get`` gives it: repeated values joined, None when absent."""
    values = found.get(name)
    return ", ".join(values) if values else None


def chunks(out: bytes | list[bytes]) -> list[bytes]:
    """What a stream callable returned, as a list of chunks."""
    return [out] if isinstance(out, bytes) else out
