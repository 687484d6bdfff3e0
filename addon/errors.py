"""Errors the relay itself answers, in the shape of the API the client called, and failing closed.

OpenAI SDKs parse ``{"error": {"message", "type", "code", "param"}}`` into typed exceptions with ``.code``;
Anthropic SDKs expect ``{"type": "error", "error": {"type", "message"}}``. A client of ``/v1/messages``
gets the Anthropic shape, every other client the OpenAI one. The relay's own code goes in OpenAI's
``code``; Anthropic's shape has no such field, so its ``type`` follows the HTTP status as Anthropic's
own API does.

``fail_closed`` wraps the hooks that decide where a request goes: an exception there answers a 500
instead of letting mitmproxy send the request on unchanged (it logs a hook's exception and carries on).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import http

from addon.guard.endpoints import detect_format
from addon.guard.endpoints import is_anthropic as _anthropic_endpoint

log = logging.getLogger("codex.errors")

# The metadata name under which client auth leaves the caller's key *name* (never the key).
CLIENT_KEY_NAME = "codex_client_key"

# HTTP status → (OpenAI error type, Anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    407: ("invalid_request_error", "authentication_error"),
    411: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    503: ("server_error", "overloaded_error"),
}


def is_anthropic(path: str) -> bool:
    """Whether a client of this request path expects Anthropic's error shape."""
    return _anthropic_endpoint(detect_format(path))


def error_body(path: str, status: int, message: str, code: str, openai_type: str | None = None,
               **openai_fields: object) -> bytes:
    """``openai_type`` and ``openai_fields`` replace the status's type and add fields, in OpenAI's shape only."""
    default_type, anthropic_type = _TYPES.get(status, ("server_error", "api_error"))
    if is_anthropic(path):
        return json.dumps({"type": "error", "error": {"type": anthropic_type, "message": message}}).encode()
    return json.dumps({"error": {"message": message, "type": openai_type or default_type, "code": code,
                                 "param": None, **openai_fields}}).encode()


def error_response(path: str, status: int, message: str, code: str, **headers: str) -> http.Response:
    """A relay-made error for a client of ``path``; ``headers`` are added (e.g. ``www_authenticate``)."""
    extra = {k.replace("_", "-"): v for k, v in headers.items()}
    return http.Response.make(status, error_body(path, status, message, code),
                              {"content-type": "application/json", **extra})


def refusal_response(path: str, status: int, message: str, code: str, *, retry_after: int | None = None,
                     openai_type: str | None = None, **openai_fields: object) -> http.Response:
    """A refusal of the relay's own, answered so that every client stops at once and shows ``message``
    (docs/refusals.md has what each client does with it):

    - ``x-should-retry: false``: the Stainless-based SDKs (openai, anthropic) and Claude Code stop without a retry
      (Claude Code's own backoff ignores ``retry-after`` and runs for minutes, silently);
    - ``retry-after`` only where a short wait can help: Codex, which ignores ``x-should-retry``, waits it out up
      to five times, and on a 429 without one stops at once;
    - ``x-request-id`` names the refusal: for a 429 it is the one detail Codex prints, and the relay logs it.
    """
    headers = {"x-should-retry": "false", "x-request-id": f"codex-relay-{code}-{secrets.token_hex(4)}"}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return http.Response.make(status, error_body(path, status, message, code, openai_type, **openai_fields),
                              {"content-type": "application/json", **headers})


def internal_error(flow: http.HTTPFlow) -> http.Response:
    return error_response(flow.request.path, 500, "codex-relay: internal error while handling the request "
                          "(see the relay's log); it was not forwarded", "relay_internal_error")


def _refuse_after_error(flow: http.HTTPFlow, hook: str) -> None:
    log.exception("%s failed for %s %s: the request is answered with a 500, not forwarded", hook,
                  flow.request.method, flow.request.path.partition("?")[0][:200])
    try:
        flow.response = internal_error(flow)
    except Exception:  # the flow itself is unusable: never let it reach a server
        log.exception("could not answer the failed request: killing it")
        flow.kill()


def fail_closed[F: Callable[..., Any]](hook: F) -> F:
    """Wrap a ``(self, flow)`` hook, sync or async: any exception answers the client with a 500 JSON error."""
    name = hook.__qualname__
    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def wrapped_async(self: Any, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception:
                _refuse_after_error(flow, name)
        return wrapped_async  # type: ignore[return-value]

    @functools.wraps(hook)
    def wrapped(self: Any, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            result = hook(self, flow)
        except Exception:
            _refuse_after_error(flow, name)
            return None
        # A sync hook may hand mitmproxy something to await (only on its rare path): guarded the same way.
        return _guarded(result, flow, name) if result is not None and inspect.isawaitable(result) else None
    return wrapped  # type: ignore[return-value]


async def _guarded(pending: Awaitable[Any], flow: http.HTTPFlow, name: str) -> None:
    try:
        await pending
    except Exception:
        _refuse_after_error(flow, name)
