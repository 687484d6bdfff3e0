"""Client keys as accounts: the TOML form of ``codex_client_keys`` and what each key may do.

A ``@file`` whose first entry line starts with ``[`` is TOML: a ``[[keys]]`` table per key with
``name``, ``key`` or ``key_sha256`` (hex, so the file holds no secret) and optional limits
(``nodes``, ``models`` globs, ``endpoints`` globs, ``daily_requests``, ``daily_tokens``, ``monthly_cost``,
``rpm``, ``concurrency``). Any other value is the ``name=key`` line format
(``addon.services.clientkeys.parse_client_keys``), whose keys have no limits. Errors name the entry (by
position and name, never by its key).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from store.masking import digest

MAX_NAME_CHARS = 64  # codex_invocations.client_key is VARCHAR(64)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One client key: its name, the SHA-256 of the key, and its limits (None: no limit)."""

    name: str
    key_digest: bytes
    nodes: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    daily_requests: int | None = None
    daily_tokens: int | None = None
    monthly_cost: float | None = None
    rpm: int | None = None
    concurrency: int | None = None
    # Globs over the path after /v1/ that the key may reach; None: the metered endpoints and the model list
    # (addon.guard.endpoints.DEFAULT_KEY_ENDPOINTS).
    endpoints: tuple[str, ...] | None = None

    def allows_model(self, model: str | None) -> bool:
        """Whether a call for ``model`` is allowed; a call that names no model only when no list is set."""
        if self.models is None:
            return True
        return model is not None and any(fnmatch.fnmatchcase(model, p) for p in self.models)

    @property
    def needs_database(self) -> bool:
        """Whether admission reads or writes the key's usage table."""
        return any(v is not None for v in (self.daily_requests, self.daily_tokens, self.monthly_cost))


_LIST_LIMITS = ("nodes", "models", "endpoints")
_INT_LIMITS = ("daily_requests", "daily_tokens", "rpm", "concurrency")
# What a key may be limited by: every KeySpec field but its name and digest.
LIMIT_FIELDS = (*_LIST_LIMITS, *_INT_LIMITS, "monthly_cost")
_FIELDS = {f.name for f in fields(KeySpec)} - {"key_digest"} | {"key", "key_sha256"}


def toml_file(spec: str) -> str | None:
    """The text of ``@path`` when it is a TOML keys file, else None (the line format)."""
    spec = spec.strip()
    if not spec.startswith("@"):
        return None
    path = Path(spec[1:].strip()).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # the line parser reports it
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")), "")
    return text if first.startswith("[") else None


def parse_keys_toml(text: str, max_name_chars: int = MAX_NAME_CHARS) -> list[KeySpec]:
    """The keys of a TOML keys file; ValueError names the bad entry and what is wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from None
    extra = set(doc) - {"keys"}
    if extra:
        raise ValueError(f"unknown top-level field(s) {', '.join(sorted(extra))}: expected [[keys]] tables")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ValueError("no [[keys]] entries")
    specs: list[KeySpec] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for n, entry in enumerate(entries, 1):
        where = f"[[keys]] entry {n}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
        try:
            spec = _entry(entry, max_name_chars)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if spec.name in names:
            raise ValueError(f"{where}: the name {spec.name!r} is used twice")
        if spec.key_digest in digests:
            raise ValueError(f"{where}: the same key is listed twice")
        names.add(spec.name)
        digests.add(spec.key_digest)
        specs.append(spec)
    return specs


def _entry(entry: dict, max_name_chars: int) -> KeySpec:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not (0 < len(name) <= max_name_chars) or not name.isprintable():
        raise ValueError(f"name must be 1 to {max_name_chars} printable characters")
    if ("key" in entry) == ("key_sha256" in entry):
        raise ValueError("give exactly one of key and key_sha256")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            raise ValueError("key must be a non-empty string without whitespace")
        key_digest = digest(key)
    else:
        try:
            key_digest = bytes.fromhex(entry["key_sha256"])
        except (TypeError, ValueError):
            key_digest = b""
        if len(key_digest) != 32:
            raise ValueError("key_sha256 must be 64 hex digits (the SHA-256 of the key)")
    limits = parse_limits(entry)
    return KeySpec(name=name, key_digest=key_digest, **limits)  # type: ignore[arg-type]


def parse_limits(entry: Mapping[str, object], *, none_clears: bool = False) -> dict[str, object]:
    """The limits (``LIMIT_FIELDS``) ``entry`` gives, validated; other fields are ignored. With ``none_clears``
    a field given as None stays None (no limit: the admin API's partial updates); else it is an error."""
    limits: dict[str, object] = {}
    for field_name in LIMIT_FIELDS:
        if field_name not in entry:
            continue
        value = entry[field_name]
        if value is None and none_clears:
            limits[field_name] = None
        elif field_name in _LIST_LIMITS:
            if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{field_name} must be a non-empty list of non-empty strings")
            limits[field_name] = tuple(value)
        elif field_name in _INT_LIMITS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be an integer >= 0")
            limits[field_name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{field_name} must be a number >= 0 (USD)")
            limits[field_name] = float(value)
    return limits
