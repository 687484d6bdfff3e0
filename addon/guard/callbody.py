"""A call's request body, read once and exactly as a node will read it, or refused.

Plain Python (no mitmproxy import). The relay checks a call's model (client keys' ``models``, the nodes'
``models``), maps it (``model_map``) and meters it by what this module reads, so what it reads must be
what the node runs: the body after its content coding (gzip, deflate, br, zstd; decoded within a bound),
one JSON object whose top-level keys each appear once (parsers disagree on which of two counts), and a
model that is printable text (a lone surrogate or a control character can be neither matched nor
recorded). Anything else is refused before a node is chosen: a call is metered and counted, or it
reaches no node.
"""

from __future__ import annotations

from addon.guard.contentcoding import decode_bounded
from addon.guard.jsonedit import DuplicateKey, top_level
from addon.metering.usage import RequestInfo
from addon.nodes.sessions import body_session


class BodyRefused(Exception):
    """Why a call's body is refused: the HTTP status, the error code and a message for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def read_call_body(raw: bytes | None, content_encoding: str | None, *, limit: int) -> RequestInfo:
    """What the body of an API call says; ``BodyRefused`` when a node could read it otherwise than the relay.

    ``limit``: the most bytes a coded body may decode to.
    """
    try:
        body = decode_bounded(raw or b"", content_encoding, limit)
    except ValueError as e:
        raise BodyRefused(415, "unsupported_content_encoding",
                          f"codex-relay: the request body's Content-Encoding cannot be read: {e}") from None
    return _info(_keys(body))


def read_socket_message(content: bytes) -> tuple[str | None, RequestInfo, str | None]:
    """A client's Responses WebSocket message: its ``type``, what it asks for (a ``response.create`` carries
    the fields of a ``POST /v1/responses`` body) and its ``stream_id`` (the socket's lane it runs on);
    ``BodyRefused`` as for a call's body. A WebSocket message has no content coding."""
    keys = _keys(content)
    kind, lane = (keys[name][0] if name in keys else None for name in ("type", "stream_id"))
    return (kind if isinstance(kind, str) else None, _info(keys),
            lane if isinstance(lane, str) and lane else None)


def _keys(body: bytes) -> dict[str, tuple[object, int, int]]:
    try:
        keys = top_level(body.decode("utf-8"))
    except UnicodeDecodeError:
        keys = None
    except DuplicateKey as e:
        raise BodyRefused(400, "invalid_request_body", f"codex-relay: invalid request body: {e}") from None
    if keys is None:
        raise BodyRefused(400, "invalid_request_body", "codex-relay: invalid request body: not a JSON object")
    return keys


def _info(keys: dict[str, tuple[object, int, int]]) -> RequestInfo:
    model = keys["model"][0] if "model" in keys else None
    if model is not None and not (isinstance(model, str) and model and model.isprintable()):
        raise BodyRefused(400, "invalid_request_body",
                          "codex-relay: invalid request body: 'model' must be non-empty printable text")
    session = body_session(*(keys[name][0] if name in keys else None for name in ("prompt_cache_key", "metadata")))
    return RequestInfo(model, "stream" in keys and keys["stream"][0] is True, session)
