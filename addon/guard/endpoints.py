"""The API endpoints the relay knows, by request path: which one a call is, how its answer reports usage, which
API family serves it, and what a client key may reach by default.

Plain Python (no mitmproxy import). One table, read by the target predicate (``addon.guard.target``: an endpoint's
path must be canonical), the error shape (``addon.errors``), the meter (``addon.metering.usage``: each endpoint's usage
shape) and client keys' ``endpoints`` allowlist; the API families a node's ``formats`` names are
``store.config.NODE_FORMATS``, over these endpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import lru_cache

from store.config import NODE_FORMATS

# Path suffix → endpoint (a call's ``api_format``), a longer suffix before the shorter one it ends with.
_SUFFIXES = (
    ("/responses/compact", "compact"),
    ("/responses", "responses"),
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/messages/count_tokens", "count_tokens"),
    ("/messages", "messages"),
    ("/embeddings", "embeddings"),
    ("/images/generations", "images"),
)
ENDPOINTS = frozenset(name for _, name in _SUFFIXES)

# How each endpoint's answer reports usage: one of the three shapes ``UsageExtractor`` reads. Compaction and
# images answer with Responses-style usage (input_tokens, output_tokens), legacy completions and embeddings
# with Chat-style usage (prompt_tokens, completion_tokens), count_tokens with Anthropic's input_tokens.
USAGE_SHAPE = {"responses": "responses", "compact": "responses", "images": "responses", "chat": "chat",
               "completions": "chat", "embeddings": "chat", "messages": "messages", "count_tokens": "messages"}

# Calls that cost nothing and count against no budget or rate: token counting (Claude Code sends bursts).
UNBILLED = frozenset({"count_tokens"})

# What a client key reaches without an ``endpoints`` list: the metered endpoints and the model list. Globs
# over the path after the API's version prefix (``/v1/``), e.g. ``files*`` for the Files API.
DEFAULT_KEY_ENDPOINTS = ("responses", "responses/compact", "chat/completions", "completions", "messages",
                         "messages/count_tokens", "embeddings", "images/generations", "models", "models/*")


def route(path: str) -> str:
    """A request target's path: no query, fragment or trailing slash."""
    return path.split("?", 1)[0].split("#", 1)[0].rstrip("/")


def detect_format(path: str) -> str | None:
    """The endpoint of this request path (a call's ``api_format``), or None (retrieve by id, models, anything
    else the relay does not meter)."""
    r = route(path)
    for suffix, name in _SUFFIXES:
        if r.endswith(suffix):
            return name
    return None


def is_anthropic(api_format: str | None) -> bool:
    """Whether clients of this endpoint speak Anthropic's API (its error shape, ``x-api-key``)."""
    return api_format in NODE_FORMATS["anthropic"]


def is_model_list(path: str) -> bool:
    """Whether a request path lists models (``GET …/v1/models``)."""
    return route(path).endswith("/models")


def api_path(path: str) -> str:
    """The part of a request path a key's ``endpoints`` globs match: after the API's version prefix."""
    segments = route(path).lstrip("/").split("/")
    for i, segment in enumerate(segments):
        if segment[:1] == "v" and segment[1:].isdigit():
            return "/".join(segments[i + 1:])
    return "/".join(segments)


def endpoint_allowed(path: str, globs: tuple[str, ...] | None) -> bool:
    """Whether a key whose ``endpoints`` are ``globs`` (None: the default list) may reach this path."""
    # Asked per call and per turn of a socket, mostly of a few paths: remembered for short ones (paths come from
    # clients: the memory stays bounded).
    return _allowed_remembered(path, globs) if len(path) <= _REMEMBERED_PATH else _allowed(path, globs)


def _allowed(path: str, globs: tuple[str, ...] | None) -> bool:
    p = api_path(path)
    return any(fnmatchcase(p, g) for g in (globs if globs is not None else DEFAULT_KEY_ENDPOINTS))


_REMEMBERED_PATH = 256
_allowed_remembered = lru_cache(maxsize=512)(_allowed)


def filter_model_list(body: bytes, allowed: Callable[[str], bool]) -> bytes | None:
    """A model list (OpenAI's and Anthropic's ``{"data": [{"id": …}, …]}``) with only the models ``allowed``,
    the rest of the object as it was; None when ``body`` is no such list."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    doc["data"] = [m for m in doc["data"] if isinstance(m, dict) and isinstance(m.get("id"), str) and allowed(m["id"])]
    if "first_id" in doc:  # Anthropic's page bounds
        doc["first_id"] = doc["data"][0]["id"] if doc["data"] else None
        doc["last_id"] = doc["data"][-1]["id"] if doc["data"] else None
    return json.dumps(doc).encode()
