"""Which nodes serve a call (API format and model), and the request body rewritten for a node's model map.

Plain Python (no mitmproxy): the pool filters its choice with ``serves``, the relay rewrites a mapped
call's body with ``rewrite_model`` before it is sent.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from addon.guard.jsonedit import set_key
from store.config import NODE_FORMATS
from store.records import NodeConfig


def serves(config: NodeConfig, api_format: str | None, model: str | None) -> bool:
    """Whether the node takes this call: its format is among the node's ``formats`` and its model
    matches one of the node's ``models`` globs or is a key of its ``model_map``. Empty lists, and a
    call whose format or model is unknown (not an API call, no model in the body), put no limit."""
    if api_format is None:
        return True
    if config.formats and not any(api_format in NODE_FORMATS.get(f, ()) for f in config.formats):
        return False
    return model is None or serves_model(config, model)


def serves_model(config: NodeConfig, model: str) -> bool:
    """Whether ``model`` matches one of the node's ``models`` globs (none: every model) or its ``model_map``."""
    return not config.models or model in config.model_map or any(fnmatchcase(model, glob) for glob in config.models)


def upstream_model(config: NodeConfig, model: str | None) -> str | None:
    """The model name to send to this node for the client's ``model``."""
    return config.model_map.get(model, model) if model is not None else None


def rewrite_model(body: bytes, model: str) -> bytes | None:
    """``body`` (a JSON object) with its top-level ``model`` set to ``model``, every other byte as it was;
    None when the body is not such an object (then nothing is rewritten)."""
    return set_key(body, "model", model)
