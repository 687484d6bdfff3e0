"""A node's URLs and the header its key goes in: plain functions of its configuration.

``addon.egress`` is the one place that puts a key on a request (after checking the destination with
``origin_of``); the health pinger builds its own requests from the same functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlsplit

from addon.guard.target import target_problem
from store.records import NodeConfig


class EgressRefused(ValueError):
    """The request cannot go to the node; the message is for the client (no key, no URL secrets)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    def as_tuple(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


# A node's URL is parsed for every call (probe, attach): once per URL is enough.
@functools.lru_cache(maxsize=1024)
def origin_of(base_url: str) -> Origin:
    """The scheme, host and port of a node's base URL (default ports filled in)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EgressRefused("the node's base_url is not an http(s) URL")
    return Origin(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def node_path(base_url: str, client_target: str) -> str:
    """The path and query a client's request target maps to on the node."""
    problem = target_problem(client_target)
    if problem:
        raise EgressRefused(problem)
    path, sep, query = client_target.partition("?")
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:]
    return "/" + (_base_path(base_url) + path).lstrip("/") + sep + query


@functools.lru_cache(maxsize=1024)
def _base_path(base_url: str) -> str:
    return urlsplit(base_url).path.strip("/")


def node_url(base_url: str, client_target: str) -> str:
    """The full URL of a client target on a node (health pings; requests use ``attach``)."""
    origin = origin_of(base_url)
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{origin.scheme}://{host}:{origin.port}{node_path(base_url, client_target)}"


_ANTHROPIC_FORMATS = frozenset({"anthropic", "messages"})


def key_header(node: NodeConfig) -> tuple[str, str]:
    """The header a node's key goes in, and its value: the node's ``auth_header`` if set, else ``x-api-key``
    for an Anthropic node (it serves only Anthropic's formats, or its host is anthropic.com: Anthropic's API
    takes API keys there, Bearer is for OAuth tokens), else ``Authorization: Bearer``. Never the client's choice."""
    name = node.auth_header or (
        "x-api-key" if (node.formats and _ANTHROPIC_FORMATS.issuperset(node.formats))
        or _is_anthropic_host(origin_of(node.base_url).host) else "authorization")
    return name, (f"Bearer {node.api_key}" if name == "authorization" else node.api_key)


def _is_anthropic_host(host: str) -> bool:
    return host == "anthropic.com" or host.endswith(".anthropic.com")
