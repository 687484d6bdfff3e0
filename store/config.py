"""Configuration files (TOML) read and validated, with errors a user can act on.

The nodes file, the stats sources and the price table all load through here; it sits in ``store``
so that both the store's CLIs and the addon can use it (``store`` never imports ``addon``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from store.records import NODE_CONFIG_FIELDS, NodeConfig

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What a node's ``formats`` may name: an API family, or single endpoints (addon.guard.endpoints names them; a test
# checks every one is there). "responses" includes compaction, "messages" token counting.
NODE_FORMATS: dict[str, frozenset[str]] = {
    "openai": frozenset({"responses", "compact", "chat", "completions", "embeddings", "images"}),
    "anthropic": frozenset({"messages", "count_tokens"}),
    "responses": frozenset({"responses", "compact"}), "chat": frozenset({"chat"}),
    "messages": frozenset({"messages", "count_tokens"}),
}
_NODE_KEYS = {"id", "name", "base_url", "api_key", "weight", "formats", "models", "model_map", "usage_probe",
              "auth_header", "websocket"}
# ``auth_header``: a header name; never one that frames or routes the request, or the relay's own.
_HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_NOT_AUTH_HEADERS = frozenset({"host", "content-length", "content-type", "content-encoding", "transfer-encoding",
                               "connection", "keep-alive", "te", "trailer", "upgrade", "cookie", "proxy-authorization",
                               "x-should-retry", "x-request-id"})


class ConfigError(ValueError):
    """A configuration problem, worded for the user."""


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:  # the path tried: a relative one is read from where the relay runs
        raise ConfigError(f"{p.absolute()}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def validate_base_url(url: str) -> str | None:
    """Why ``url`` cannot be a node's base URL, or None when it can."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"base_url must start with http:// or https://, got {url!r}"
    if not parts.hostname:
        return f"base_url has no host: {url!r}"
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return f"base_url has a bad port: {url!r} ({e})"
    # The node is its scheme, host and port plus a path prefix; anything else would be ambiguous.
    if parts.username is not None or parts.password is not None:
        return "base_url must not contain user:password@ (put the key in api_key)"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return f"base_url must not have a query or fragment: {url!r}"
    return None


# Paths clients append to a base URL: a base URL ending in one was given the endpoint, not the base.
_ENDPOINT_TAILS = ("/responses", "/chat/completions", "/completions", "/messages", "/embeddings", "/models")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def base_url_warnings(url: str) -> list[str]:
    """What looks wrong with a valid base URL (it starts, but probably not as meant)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    found = []
    if parts.scheme == "http" and (parts.hostname or "") not in _LOOPBACK and not (parts.hostname or "").startswith(
            "127."):
        found.append(f"{url} is plain http to another machine: the node's key crosses the network unencrypted")
    tail = next((t for t in _ENDPOINT_TAILS if path.endswith(t)), None)
    if tail is not None:
        base = url[: len(url) - len(parts.path)] + (path.removesuffix(tail) or "/v1")
        found.append(f"{url} ends with an API path: a base URL stops before it (clients' /v1/responses is "
                     f"appended to it), e.g. {base}")
    elif not path and (parts.hostname or "").startswith("api."):
        found.append(f"{url} has no path: OpenAI- and Anthropic-style APIs live under /v1 (e.g. {url.rstrip('/')}/v1)")
    return found


def node_from_mapping(item: Any, where: str) -> NodeConfig:
    """One node from a TOML table or a JSON object; raises ConfigError naming ``where``."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(item) - _NODE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    node_id = item.get("id")
    if not isinstance(node_id, str) or not _ID_RE.match(node_id):
        raise ConfigError(f"{where}: id must be 1-64 letters, digits, '.', '_' or '-', got {node_id!r}")
    base_url = item.get("base_url")
    if not isinstance(base_url, str):
        raise ConfigError(f"{where} ({node_id}): base_url is required")
    problem = validate_base_url(base_url)
    if problem:
        raise ConfigError(f"{where} ({node_id}): {problem}")
    weight = item.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
        raise ConfigError(f"{where} ({node_id}): weight must be an integer >= 0, got {weight!r}")
    api_key = item.get("api_key", "")
    name = item.get("name", node_id)
    if not isinstance(api_key, str) or not isinstance(name, str):
        raise ConfigError(f"{where} ({node_id}): name and api_key must be strings")
    # The column sizes of `nodes`: MySQL would refuse a longer value with the key in its error text.
    if len(api_key) > 512 or len(name) > 128 or len(base_url) > 512:
        raise ConfigError(f"{where} ({node_id}): api_key and base_url are limited to 512 characters, name to 128")
    # A key goes into a header: printable ASCII without spaces (a lone surrogate or a control character in a
    # JSON string would fail there, later and less clearly); a name is shown, so printable.
    if not (api_key.isascii() and api_key.isprintable() and " " not in api_key) or not name.isprintable():
        raise ConfigError(f"{where} ({node_id}): api_key must be printable ASCII without spaces, name printable")
    usage_probe = item.get("usage_probe", True)
    if not isinstance(usage_probe, bool):
        raise ConfigError(f"{where} ({node_id}): usage_probe must be true or false, got {usage_probe!r}")
    websocket = item.get("websocket", True)
    if not isinstance(websocket, bool):
        raise ConfigError(f"{where} ({node_id}): websocket must be true or false, got {websocket!r}")
    auth_header = item.get("auth_header", "")
    if not isinstance(auth_header, str) or (auth_header and (
            not _HEADER_RE.match(auth_header.lower()) or auth_header.lower() in _NOT_AUTH_HEADERS)):
        raise ConfigError(f"{where} ({node_id}): auth_header must be the name of the header the node's key goes "
                          f"in (e.g. x-api-key, authorization, api-key), got {auth_header!r}")
    formats, models, model_map = _served(item, f"{where} ({node_id})")
    return NodeConfig(id=node_id, name=name, base_url=base_url, api_key=api_key, weight=weight,
                      formats=formats, models=models, model_map=model_map, usage_probe=usage_probe,
                      auth_header=auth_header.lower(), websocket=websocket,
                      given=frozenset(item) & NODE_CONFIG_FIELDS)


def _served(item: dict, where: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    """A node's ``formats``, ``models`` (globs) and ``model_map``, validated; missing ones serve everything."""
    formats, models, model_map = item.get("formats", []), item.get("models", []), item.get("model_map", {})
    for key, value in (("formats", formats), ("models", models)):
        if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
    bad = sorted(set(formats) - NODE_FORMATS.keys())
    if bad:
        raise ConfigError(f"{where}: formats {bad} unknown; use {sorted(NODE_FORMATS)}")
    if not isinstance(model_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 128 and 0 < len(v) <= 128
            for k, v in model_map.items()):
        raise ConfigError(f"{where}: model_map must map model names to model names, got {model_map!r}")
    # Stored as JSON text in columns of this size.
    if len(models) > 64 or len(model_map) > 64:
        raise ConfigError(f"{where}: at most 64 models and 64 model_map entries")
    return tuple(dict.fromkeys(formats)), tuple(dict.fromkeys(models)), dict(model_map)


def load_entries[T](path: str | Path, key: str, parse: Callable[[Any, str], T], name: Callable[[T], str],
                    what: str, doc: dict[str, Any] | None = None) -> list[T]:
    """The ``[[key]]`` tables of a TOML file (``doc``: the file as loaded already), each parsed by
    ``parse(item, where)``, ``name`` unique.

    Raises ConfigError naming the file and the entry. No such key means no entries.
    """
    items = (load_toml(path) if doc is None else doc).get(key, [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: '{key}' must be an array of tables ([[{key}]])")
    entries: list[T] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        entry = parse(item, f"{path}: {key}[{i}]")
        if name(entry) in seen:
            raise ConfigError(f"{path}: {key}[{i}]: duplicate {what} {name(entry)!r}")
        seen.add(name(entry))
        entries.append(entry)
    return entries


# What the relay reads from its nodes file (codex_nodes): here, store.sources and addon.observe.alerts.
NODES_FILE_TABLES = ("nodes", "sources", "webhooks")


def load_nodes_file(path: str | Path) -> list[NodeConfig]:
    """The ``[[nodes]]`` of a TOML file, validated: ids unique, URLs usable, weights >= 0, each with its
    api_key, and nothing at the top but ``NODES_FILE_TABLES`` (a misspelled ``[[webhook]]`` would be ignored)."""
    doc = load_toml(path)
    unknown = sorted(set(doc) - set(NODES_FILE_TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level {', '.join(map(repr, unknown))}; a nodes file has "
                          + ", ".join(f"[[{t}]]" for t in NODES_FILE_TABLES))
    return load_entries(path, "nodes", _file_node, lambda n: n.id, "id", doc)


def _file_node(item: Any, where: str) -> NodeConfig:
    node = node_from_mapping(item, where)
    if not node.api_key:  # the admin page's save may leave it out (it keeps the stored key); a file may not
        raise ConfigError(f"{where} ({node.id}): api_key is required (any placeholder for a node that needs none)")
    return node
