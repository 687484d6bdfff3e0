"""What a call asks for and what its answer says it used: Responses, Chat Completions, Anthropic Messages.

Plain Python (no mitmproxy, no DB). Every field read from the wire is untrusted: missing, null or
mistyped values count as 0 or are ignored, never an exception. Token counts follow the convention
of ``store.records``: OpenAI's, so Anthropic's cache reads and writes are added to its input.

Which usage counts when a body says it more than once (one rule per API):

- Responses: the first terminal event (``response.completed``, ``.incomplete``, ``.failed``) holding
  a response object is the answer's end; a later terminal event is ignored whole (usage, error)
  and flagged ``usage_repeated``.
- Chat Completions: usage on chunks before the final one is provisional (servers that report
  running totals on every chunk), the first final usage chunk (no choices, or a finish_reason)
  wins; a later chunk carrying usage is ignored and flagged ``usage_repeated``.
- Anthropic Messages: one message per stream. ``message_delta`` counts are cumulative, so each
  replaces the one before; after the first ``message_start`` another ``message_start``, and any
  usage after ``message_stop``, is ignored and flagged ``usage_repeated``.

An ignored event whose usage equals the kept one is no news and is not flagged. Impossible values
are clamped and flagged ``usage_clamped``: cached at most the input, reasoning at most the output.
Anthropic's cache reads and writes are bounded by construction: they are added to its input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from addon.sse import SSEEvent
from store.records import Usage

_FORMAT_SUFFIXES = (("/responses", "responses"), ("/chat/completions", "chat"), ("/messages", "messages"))

# A count above this is garbage; ignoring it keeps the store's integer columns from overflowing.
_MAX_COUNT = 2**40
_MAX_ERROR_CHARS = 2000

_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC_USAGE_KEYS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
# Named events that carry neither usage, model nor error (with every "*.delta"): not decoding their
# JSON keeps the cost of a long stream (thousands of deltas) low.
_NOISE_EVENTS = frozenset({"content_block_start", "content_block_delta", "content_block_stop", "ping"})

_INVALID = object()

# Flags (sorted into ``MeterResult.flags``, then a row's ``flags`` column).
USAGE_CLAMPED = "usage_clamped"
USAGE_REPEATED = "usage_repeated"


def detect_format(path: str) -> str | None:
    """The API format metered at this request path, or None (compact, retrieve by id, anything else)."""
    route = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    for suffix, fmt in _FORMAT_SUFFIXES:
        if route.endswith(suffix):
            return fmt
    return None


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None
    stream: bool
    session_key: str | None


def parse_request(body: bytes | None) -> RequestInfo:
    """The request body's model, stream flag and prompt_cache_key; defaults when it is not such JSON."""
    obj = _loads(body) if body else None
    if not isinstance(obj, dict):
        return RequestInfo(None, False, None)
    return RequestInfo(_text(obj.get("model")), obj.get("stream") is True, _text(obj.get("prompt_cache_key")))


class UsageExtractor:
    """Accumulates what one response body says: usage, model, an in-body error, whether it finished.

    ``api_format`` None (an unknown endpoint) accepts every shape; a known format only its own, so
    e.g. a ``[DONE]`` line does not finish a Responses stream.
    """

    def __init__(self, api_format: str | None) -> None:
        self.api_format = api_format
        self.usage: Usage | None = None
        self.model: str | None = None
        self.error: str | None = None
        self.completed = False
        self.raw_usage: str | None = None
        self.flags: set[str] = set()
        self._final = False  # the usage that counts has been read: later usage is ignored
        self._anthropic: dict[str, int] = {}  # message_start usage overwritten by message_delta's
        self._anthropic_started = False

    def _accepts(self, fmt: str) -> bool:
        return self.api_format is None or self.api_format == fmt

    def on_event(self, ev: SSEEvent) -> None:
        name = ev.event
        if name in _NOISE_EVENTS or name.endswith(".delta"):
            return
        data = ev.data
        if data.strip() == "[DONE]":
            if self._accepts("chat"):
                self.completed = True
            return
        obj = _loads(data)
        if isinstance(obj, dict):
            self._error_in(obj)
        if name == "error" and self.error is None:
            self._set_error(obj if isinstance(obj, dict) else data)
        if not isinstance(obj, dict):
            return  # a malformed or foreign data line: skipped, the stream goes on
        kind = obj.get("type")
        if not isinstance(kind, str) and name != "message":
            kind = name  # a server that names its events but leaves ``type`` out of the data
        if not isinstance(kind, str):
            if self._accepts("chat"):
                self._chat_chunk(obj)
        elif kind.startswith("response."):
            if self._accepts("responses"):
                self._responses_event(kind, obj)
        elif kind.startswith("message_") and self._accepts("messages"):
            self._anthropic_event(kind, obj)

    def on_json(self, body: bytes) -> None:
        """A whole (non-streamed) body: a Responses object, a chat completion, an Anthropic message, an error."""
        obj = _loads(body)
        if obj is _INVALID:
            return
        self.completed = True
        if not isinstance(obj, dict):
            return
        self._error_in(obj)
        self._set_model(obj.get("model"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._set_usage(_usage_any(usage), usage)

    # -- per format ---------------------------------------------------------------------------------
    def _responses_event(self, kind: str, obj: dict) -> None:
        terminal = kind in _RESPONSES_TERMINAL
        resp = obj.get("response")
        final = terminal and isinstance(resp, dict)  # a bare terminal name in a foreign line ends nothing
        if not isinstance(resp, dict):
            resp = {}
        usage = resp.get("usage")
        if self._final:  # the first terminal event ended the answer: what follows is ignored
            if terminal and isinstance(usage, dict):
                self._repeated(_usage_responses(usage))
            return
        self._set_model(resp.get("model"))
        if not terminal:
            return
        self.completed = True
        self._final = final
        if isinstance(usage, dict):
            self._set_usage(_usage_responses(usage), usage)
        if kind == "response.failed":
            err = resp.get("error")
            self._set_error(err if err else "response failed")

    def _chat_chunk(self, obj: dict) -> None:
        self._set_model(obj.get("model"))
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return
        if self._final:
            self._repeated(_usage_chat(usage))
            return
        self._set_usage(_usage_chat(usage), usage)
        choices = obj.get("choices")
        # With include_usage the usage comes last, in a chunk without choices; some servers put it
        # in the chunk that carries finish_reason instead.
        if not choices or (isinstance(choices, list)
                           and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)):
            self.completed = self._final = True

    def _anthropic_event(self, kind: str, obj: dict) -> None:
        if kind == "message_stop":
            self.completed = self._final = True
            return
        usage: Any = None
        ignored = self._final
        if kind == "message_start":
            msg = obj.get("message")
            if not isinstance(msg, dict):
                msg = {}
            usage = msg.get("usage")
            ignored = ignored or self._anthropic_started  # a second start would reset the counts
            if not ignored:
                self._anthropic_started = True
                self._set_model(msg.get("model"))
        elif kind == "message_delta":
            usage = obj.get("usage")
        if not isinstance(usage, dict):
            return
        # Counts are cumulative: a later event's value replaces the earlier one, never adds to it.
        counts = dict(self._anthropic)
        counts.update((key, n) for key in _ANTHROPIC_USAGE_KEYS if (n := _count(usage.get(key))) is not None)
        if ignored:
            self._repeated(_usage_anthropic(counts))
            return
        self._anthropic = counts
        self._set_usage(_usage_anthropic(counts), counts)

    # -- shared -------------------------------------------------------------------------------------
    def _set_usage(self, usage: Usage, raw: dict) -> None:
        possible = _clamped(usage)
        if possible != usage:
            self.flags.add(USAGE_CLAMPED)
        self.usage = possible
        self.raw_usage = _compact(raw)

    def _repeated(self, usage: Usage) -> None:
        """A later report of usage, ignored: flagged when it says something else."""
        if _clamped(usage) != self.usage:
            self.flags.add(USAGE_REPEATED)

    def _set_model(self, value: Any) -> None:
        model = _text(value)
        if model:
            self.model = model

    def _error_in(self, obj: dict) -> None:
        """An error reported by the object itself: an ``error`` member, or ``type: "error"``."""
        err = obj.get("error")
        if err:
            self._set_error(err)
        elif obj.get("type") == "error":
            self._set_error(obj)

    def _set_error(self, err: Any) -> None:
        if self.error is None:  # the first error is the cause; later ones are its echoes
            self.error = _error_text(err)


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, bad UTF-8, absurdly deep nesting
        return _INVALID


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    """A token count, or None when the value is not one (null, text, negative, fractional, absurd)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def _get(obj: dict, key: str, sub: str | None = None) -> int:
    value = obj.get(key)
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
    return _count(value) or 0


def _usage_responses(u: dict) -> Usage:
    return Usage(input_tokens=_get(u, "input_tokens"), cached_tokens=_get(u, "input_tokens_details", "cached_tokens"),
                 output_tokens=_get(u, "output_tokens"),
                 reasoning_tokens=_get(u, "output_tokens_details", "reasoning_tokens"))


def _usage_chat(u: dict) -> Usage:
    return Usage(input_tokens=_get(u, "prompt_tokens"), cached_tokens=_get(u, "prompt_tokens_details", "cached_tokens"),
                 output_tokens=_get(u, "completion_tokens"),
                 reasoning_tokens=_get(u, "completion_tokens_details", "reasoning_tokens"))


def _usage_anthropic(u: dict) -> Usage:
    """Anthropic's input_tokens excludes the cache; OpenAI's (stored) includes reads and writes."""
    read, write = _get(u, "cache_read_input_tokens"), _get(u, "cache_creation_input_tokens")
    return Usage(input_tokens=_get(u, "input_tokens") + read + write, cached_tokens=read, cache_write_tokens=write,
                 output_tokens=_get(u, "output_tokens"))


def _usage_any(u: dict) -> Usage:
    """A whole body's usage, recognised by its keys (the Responses and Anthropic shapes differ only
    when the cache fields are present, and then the Anthropic ones name themselves)."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        return _usage_chat(u)
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
        return _usage_anthropic(u)
    return _usage_responses(u)


def _clamped(u: Usage) -> Usage:
    """The usage with its parts bounded by their wholes: cached by input, reasoning by output."""
    if u.cached_tokens <= u.input_tokens and u.reasoning_tokens <= u.output_tokens:
        return u
    return replace(u, cached_tokens=min(u.cached_tokens, u.input_tokens),
                   reasoning_tokens=min(u.reasoning_tokens, u.output_tokens))


def _error_text(err: Any) -> str:
    """A readable one-liner: ``code: message`` from an error object, else its JSON."""
    if isinstance(err, dict):
        message = _text(err.get("message"))
        code = next((c for c in (err.get("code"), err.get("type")) if _text(c) and c != "error"), None)
        if message:
            text = f"{code}: {message}" if code else message
        elif code:
            text = code
        else:
            text = _compact(err)
    else:
        text = err if isinstance(err, str) else _compact(err)
    return text[:_MAX_ERROR_CHARS] or "error"


def _compact(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):  # nesting that only just fit the parser's stack
        return "<too deeply nested>"
