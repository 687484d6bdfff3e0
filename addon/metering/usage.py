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
  replaces the one before, except a 0 (or null) repeated over a figure already known; after the
  first ``message_start`` another ``message_start``, and any usage after ``message_stop``, is
  ignored and flagged ``usage_repeated``.

What counts: cache writes (OpenAI's ``*_tokens_details.cache_write_tokens``, Anthropic's
``cache_creation_input_tokens``) are part of the input like cache reads; Anthropic's
``output_tokens_details.thinking_tokens`` are its reasoning tokens. When Anthropic's usage lists
``iterations`` (server-side compaction, the advisor tool: each a billed inference, possibly by
another model), the row counts every iteration: each figure is the iterations' sum (never below the
top level's, which covers only the ``message`` iterations). ``raw_usage`` is the upstream's own usage
object (for Anthropic streams: ``message_start``'s with ``message_delta``'s figures merged in by the
rule above), so the top-level figures and each iteration's model stay recoverable
(``iteration_usages``).

An ignored event whose usage equals the kept one is no news and is not flagged. Impossible values
are clamped and flagged ``usage_clamped``: cached at most the input, reasoning at most the output.
Anthropic's cache reads and writes are bounded by construction: they are added to its input.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from addon.guard.endpoints import USAGE_SHAPE
from addon.metering.sse import SSEEvent
from store.records import Usage

# A count above this is garbage; ignoring it keeps the store's integer columns from overflowing.
_MAX_COUNT = 2**40
_MAX_ERROR_CHARS = 2000

_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Named events that carry neither usage, model nor error (with every "*.delta"): not decoding their
# JSON keeps the cost of a long stream (thousands of deltas) low.
_NOISE_EVENTS = frozenset({"content_block_start", "content_block_delta", "content_block_stop", "ping"})
_NOISE_NAMES = frozenset(name.encode() for name in _NOISE_EVENTS)
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_MODEL_KEY = re.compile(rb'"model"\s*:\s*')
# Keys (besides usage) whose presence marks an Anthropic usage object when no format is known.
_ANTHROPIC_MARKS = ("cache_read_input_tokens", "cache_creation_input_tokens", "iterations")

# Reading a big body's members by searching its bytes (on_json_ends).
_OBJECT_START = re.compile(rb"\s*\{")
_COLON = re.compile(rb"\s*:")
_CONTENT_KEYS = (b'"output"', b'"choices"', b'"content"')
_SCAN_WINDOW = 2**16  # the most decoded to read one member's value
_SCAN_TRIES = 4  # occurrences of a key tried before giving up

_INVALID = object()
_USAGE_FIELDS = tuple(f.name for f in fields(Usage))
_DECODER = json.JSONDecoder()

# Flags (sorted into ``MeterResult.flags``, then a row's ``flags`` column).
USAGE_CLAMPED = "usage_clamped"
USAGE_REPEATED = "usage_repeated"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None
    stream: bool
    session_key: str | None  # the body's session (addon.nodes.sessions.body_session): prompt_cache_key, Claude Code's


class UsageExtractor:
    """Accumulates what one response body says: usage, model, an in-body error, whether it finished.

    ``api_format`` None (an unknown endpoint) accepts every shape; a known endpoint only its own usage
    shape (``addon.guard.endpoints.USAGE_SHAPE``), so
    e.g. a ``[DONE]`` line does not finish a Responses stream.
    """

    def __init__(self, api_format: str | None) -> None:
        self.api_format = api_format
        self._shape = USAGE_SHAPE.get(api_format) if api_format is not None else None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.error: str | None = None
        self.completed = False
        self.raw_usage: str | None = None
        self.flags: set[str] = set()
        self._final = False  # the usage that counts has been read: later usage is ignored
        self._anthropic: dict[str, Any] = {}  # message_start's usage merged with message_delta's
        self._anthropic_started = False
        self._model_json: bytes | None = None  # the model as JSON: how a chunk repeating it spells it

    def _accepts(self, shape: str) -> bool:
        return self._shape is None or self._shape == shape

    @staticmethod
    def noise(name: bytes) -> bool:
        """Whether an event so named is ignored whatever its data (for ``SSEParser(noise=...)``)."""
        return name in _NOISE_NAMES or name.endswith(b".delta")

    def wants(self, name: bytes, data: bytes) -> bool:
        """Whether ``on_event`` must see this event (raw bytes, for ``SSEParser(want=...)``).

        False only when decoding it certainly changes nothing: the events ``on_event`` ignores by
        name, and unnamed events that are a chat chunk holding only a delta (no usage but null, no
        error, no type, at most the model already known). Keys spelled with escapes (``\\u``) could
        hide from these byte checks, so such a chunk is decoded.
        """
        if self.noise(name):
            return False
        if (name != b"message" or data[:1] != b"{" or data.find(b"\\u") >= 0 or data.find(b'"type"') >= 0
                or data.find(b'"error"') >= 0):
            return True
        usages = data.count(b'"usage"')  # compact JSON first, any spacing next
        if usages and usages != data.count(b'"usage":null') and usages != len(_NULL_USAGE.findall(data)):
            return True
        models = data.count(b'"model"')
        if not models:
            return False
        if models > 1 or self._model_json is None:
            return True
        if data.find(b'"model":' + self._model_json) >= 0:
            return False
        key = _MODEL_KEY.search(data)
        return key is None or not data.startswith(self._model_json, key.end())

    def on_event(self, ev: SSEEvent) -> None:
        name = ev.event
        if name in _NOISE_EVENTS or name.endswith(".delta"):
            return
        data = ev.data
        if data.strip() == "[DONE]":
            if self._accepts("chat"):
                self.completed = True
            return
        self.on_parsed(name, _loads(data), data)

    def on_parsed(self, name: str, obj: Any, data: str) -> None:
        """An event named ``name`` whose ``data`` its caller has parsed already (``obj``: anything but a dict when
        it is no JSON object); neither a noise event nor ``[DONE]``."""
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

    def on_json(self, body: bytes | bytearray) -> None:
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

    def on_json_ends(self, head: bytes | bytearray, tail: bytes | bytearray) -> str | None:
        """A body too big to parse whole, by its first and last bytes; returns why usage is unread, if so.

        In every API's answer ``model`` and ``error`` come before the content (``output``,
        ``choices``, ``content``) and ``usage`` after it (and after Responses' ``tools``), so they
        are found by searching the head and, from its end, the tail; each value is decoded alone.
        Only the body's shape is checked, not its whole syntax: ``{`` ... ``}`` counts as complete.
        """
        if not _OBJECT_START.match(head) or bytes(tail[-_SCAN_WINDOW:]).rstrip()[-1:] != b"}":
            return None
        self.completed = True
        content = min((i for key in _CONTENT_KEYS if (i := head.find(key)) >= 0), default=len(head))
        self._set_model(_member(head, b'"model"', len(head)))
        err = _member(head, b'"error"', content)
        if err and err is not _INVALID:
            self._set_error(err)
        end = len(tail)
        for _ in range(_SCAN_TRIES):  # the last "usage" may be a text value or a key inside metadata
            key = tail.rfind(b'"usage"', 0, end)
            if key < 0:
                break
            usage = _value_at(tail, key + len(b'"usage"'))
            if isinstance(usage, dict):
                self._set_usage(_usage_any(usage), usage)
                return None
            end = key
        return f"no usage found in its last {len(tail)} bytes"

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
        merged = _merged(self._anthropic, usage)
        if ignored:
            self._repeated(_usage_anthropic_billed(merged))
            return
        self._anthropic = merged
        self._set_usage(_usage_anthropic_billed(merged), merged)

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
        if model and model != self.model:
            self.model = model
            self._model_json = _model_json(model)

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


def _loads(text: str | bytes | bytearray) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, bad UTF-8, absurdly deep nesting
        return _INVALID


def _value_at(body: bytes | bytearray, pos: int) -> Any:
    """The JSON value after the key ending at ``pos`` (_INVALID: not a member, or not decodable alone)."""
    colon = _COLON.match(body, pos)
    if colon is None:
        return _INVALID
    window = bytes(body[colon.end():colon.end() + _SCAN_WINDOW]).decode("utf-8", "replace")
    try:
        return _DECODER.raw_decode(window, len(window) - len(window.lstrip()))[0]
    except (ValueError, RecursionError):
        return _INVALID


def _member(body: bytes | bytearray, key: bytes, end: int) -> Any:
    """The value of the first member named ``key`` (quoted) before ``end``; None when there is none."""
    start = 0
    for _ in range(_SCAN_TRIES):
        at = body.find(key, start, end)
        if at < 0:
            return None
        value = _value_at(body, at + len(key))
        if value is not _INVALID:
            return value
        start = at + 1
    return None


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
                 cache_write_tokens=_get(u, "input_tokens_details", "cache_write_tokens"),
                 output_tokens=_get(u, "output_tokens"),
                 reasoning_tokens=_get(u, "output_tokens_details", "reasoning_tokens"))


def _usage_chat(u: dict) -> Usage:
    return Usage(input_tokens=_get(u, "prompt_tokens"), cached_tokens=_get(u, "prompt_tokens_details", "cached_tokens"),
                 cache_write_tokens=_get(u, "prompt_tokens_details", "cache_write_tokens"),
                 output_tokens=_get(u, "completion_tokens"),
                 reasoning_tokens=_get(u, "completion_tokens_details", "reasoning_tokens"))


def _usage_anthropic(u: dict) -> Usage:
    """Anthropic's input_tokens excludes the cache; OpenAI's (stored) includes reads and writes."""
    read, write = _get(u, "cache_read_input_tokens"), _get(u, "cache_creation_input_tokens")
    return Usage(input_tokens=_get(u, "input_tokens") + read + write, cached_tokens=read, cache_write_tokens=write,
                 output_tokens=_get(u, "output_tokens"),
                 reasoning_tokens=_get(u, "output_tokens_details", "thinking_tokens"))


def _iterations(u: dict) -> list[tuple[str | None, Usage]]:
    its = u.get("iterations")
    if not isinstance(its, list):
        return []
    return [(_text(it.get("model")), _usage_anthropic(it)) for it in its if isinstance(it, dict)]


def _usage_anthropic_billed(u: dict) -> Usage:
    """Every billed iteration counted: the top level covers only the ``message`` iterations."""
    top = _usage_anthropic(u)
    its = [usage for _, usage in _iterations(u)]
    if not its:
        return top
    return Usage(**{f: max(getattr(top, f), sum(getattr(it, f) for it in its)) for f in _USAGE_FIELDS})


def iteration_usages(raw_usage: str | None) -> list[tuple[str | None, Usage]]:
    """Each billed iteration in a stored Anthropic ``raw_usage``: its model (None: the call's) and usage.

    Empty when the usage lists no iterations: the call's usage is then its only inference.
    """
    if not raw_usage or '"iterations"' not in raw_usage:  # the common case: no parse on every call
        return []
    u = _loads(raw_usage)
    return _iterations(u) if isinstance(u, dict) else []


def _usage_any(u: dict) -> Usage:
    """A whole body's usage, recognised by its keys (the Responses and Anthropic shapes differ only
    when Anthropic's cache, iteration or thinking fields are present, and those name themselves)."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        return _usage_chat(u)
    details = u.get("output_tokens_details")
    if any(key in u for key in _ANTHROPIC_MARKS) or (isinstance(details, dict) and "thinking_tokens" in details):
        return _usage_anthropic_billed(u)
    return _usage_responses(u)


def _merged(old: dict, new: dict, nested: bool = True) -> dict:
    """Anthropic's cumulative usage: ``new``'s figures replace ``old``'s, but a 0 or a value that is
    not a count (null, negative) never replaces a figure already known; detail objects (one level
    down) merge the same way, anything else (lists, text) is replaced."""
    out = dict(old)
    for key, value in new.items():
        if key not in out:
            out[key] = value
            continue
        prev = out[key]
        if isinstance(value, dict):
            out[key] = _merged(prev, value, False) if nested and isinstance(prev, dict) else value
        elif isinstance(value, (int, float)) or value is None:  # bool is an int: not a count either
            if _count(value) or _count(prev) is None:
                out[key] = value
        else:
            out[key] = value
    return out


def _clamped(u: Usage) -> Usage:
    """The usage with its parts bounded by their wholes: cache reads, then writes, by input; reasoning by output."""
    if u.cached_tokens + u.cache_write_tokens <= u.input_tokens and u.reasoning_tokens <= u.output_tokens:
        return u
    cached = min(u.cached_tokens, u.input_tokens)
    return replace(u, cached_tokens=cached, cache_write_tokens=min(u.cache_write_tokens, u.input_tokens - cached),
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


# Made once: json.dumps with options builds an encoder per call, a third of the cost of a usage object.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=256)
def _model_json(model: str) -> bytes:
    """How a chunk repeating ``model`` spells it (a call's first model; relays see a few names)."""
    return _COMPACT.encode(model).encode()


def _compact(value: Any) -> str:
    try:
        return _COMPACT.encode(value)
    except (ValueError, RecursionError):  # nesting that only just fit the parser's stack
        return "<too deeply nested>"
