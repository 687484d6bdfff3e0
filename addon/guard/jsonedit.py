"""Byte-preserving edits of a JSON object's top-level keys: the rest of the body stays exactly as sent.

Plain Python (no mitmproxy): the relay rewrites a request body for its node (``addon.nodes.modelroute``,
``addon.metering.usageprobe``) without re-serialising what the client wrote.
"""

from __future__ import annotations

import json
import re

_WS = re.compile(r"[ \t\n\r]*")
# A member's key with nothing to unescape, and its colon (the common case: one match instead of four steps).
_PLAIN_KEY = re.compile(r'[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_AFTER_VALUE = re.compile(r"[ \t\n\r]*([,}])")
_DECODER = json.JSONDecoder()


class DuplicateKey(ValueError):
    """A JSON object names one top-level key twice: parsers disagree on which value counts (``json.loads``
    keeps the last, many Go parsers the first), so the relay and a node would read two different calls."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the top-level key {key!r} appears more than once")
        self.key = key


def _skip_ws(text: str, pos: int = 0) -> int:
    """The position after the whitespace at ``pos`` (``_WS`` matches the empty string, so always a match)."""
    m = _WS.match(text, pos)
    return m.end() if m else pos


def top_level(text: str) -> dict[str, tuple[object, int, int]] | None:
    """Each top-level key of the JSON object ``text``: its value and the value's span; None when ``text`` is
    not a JSON object. ``DuplicateKey`` when a key appears twice."""
    found: dict[str, tuple[object, int, int]] = {}
    try:
        pos = _skip_ws(text)
        if text[pos:pos + 1] != "{":
            return None
        pos = _skip_ws(text, pos + 1)
        if text[pos:pos + 1] == "}":
            return found
        while True:
            plain = _PLAIN_KEY.match(text, pos)
            if plain is not None:
                key, start = plain.group(1), plain.end()
            else:  # escapes in the key (or no key: raw_decode says so)
                pos = _skip_ws(text, pos)
                if text[pos:pos + 1] != '"':
                    return None
                key, pos = _DECODER.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if text[pos:pos + 1] != ":":
                    return None
                start = _skip_ws(text, pos + 1)
            value, end = _DECODER.raw_decode(text, start)
            if key in found:
                raise DuplicateKey(key)
            found[key] = (value, start, end)
            after = _AFTER_VALUE.match(text, end)
            if after is None:
                return None
            if after.group(1) == "}":
                return found if not text[after.end():].strip(" \t\n\r") else None
            pos = after.end()
    except DuplicateKey:
        raise
    except (ValueError, RecursionError):  # not JSON, or absurdly deep nesting
        pass
    return None


def set_key(body: bytes, key: str, value: object, *, add: bool = False) -> bytes | None:
    """``body`` (a UTF-8 JSON object) with its top-level ``key`` set to ``value``, every other byte as it
    was; a missing key is added first in the object when ``add``. None when ``body`` is not such an
    object, or ``key`` is missing and not ``add``."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    try:
        keys = top_level(text)
    except DuplicateKey:  # which one would the node read? Edit neither (the relay refuses such calls anyway)
        return None
    if keys is None:
        return None
    new = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if key in keys:
        _, start, end = keys[key]
        return (text[:start] + new + text[end:]).encode()
    if not add:
        return None
    brace = text.index("{") + 1
    sep = "," if keys else ""
    return (text[:brace] + json.dumps(key, ensure_ascii=False) + ":" + new + sep + text[brace:]).encode()
