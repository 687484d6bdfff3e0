"""Client keys as accounts: the TOML form of ``codex_client_keys`` and what each key may do.

A ``@file`` whose first entry line starts with ``[`` is TOML: a ``[[keys]]`` table per key with
``name``, ``key`` or ``key_sha256`` (hex, so the file holds no secret) and optional limits
(``nodes``, ``models`` globs, ``endpoints`` globs, ``daily_requests``, ``daily_tokens``, ``monthly_cost``,
``rpm``, ``concurrency``, ``budgets``, ``expires_at``, ``warn_at``). ``budgets`` is a list of tables (TOML's
``[[keys.budgets]]``), each a ``window`` (``WINDOWS``), exactly one of ``requests``, ``tokens`` or ``cost``
(USD), and optional ``models`` globs (only calls of those models count against it and are refused by it);
``daily_requests``, ``daily_tokens`` and ``monthly_cost`` are shorthands kept as they were. Any other value is the
``name=key`` line format (``addon.services.clientkeys.parse_client_keys``), whose keys have no limits. Errors
name the entry (by position and name, never by its key).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from store.masking import digest

MAX_NAME_CHARS = 64  # codex_invocations.client_key is VARCHAR(64)
# A budget's window: ``5h`` rolling (counted per UTC minute), the UTC day, the ISO week (Monday 00:00 UTC),
# the UTC month, or the key's whole life.
WINDOWS = ("5h", "daily", "weekly", "monthly", "total")
UNITS = ("requests", "tokens", "cost")
MAX_BUDGETS = 16  # per key: bounds the admission's work and the metrics' labels


def _globs_match(globs: tuple[str, ...] | None, model: str | None) -> bool:
    return globs is None or (model is not None and any(fnmatch.fnmatchcase(model, p) for p in globs))


@dataclass(frozen=True, slots=True)
class Budget:
    """One plan-shaped budget of a key: at most ``limit`` ``unit`` in each ``window``, counting only the calls
    of ``models`` (globs; None: every call)."""

    window: str
    unit: str
    limit: float
    models: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """How messages, headers, metrics and alerts name it: ``weekly_cost``, ``5h_requests[claude-opus-*]``."""
        return f"{self.window}_{self.unit}" + (f"[{','.join(self.models)}]" if self.models else "")

    def counts(self, model: str | None) -> bool:
        """Whether a call of ``model`` counts against this budget (and may be refused by it)."""
        return _globs_match(self.models, model)

    def as_dict(self) -> dict[str, object]:
        """Its form in the keys file, the admin API's JSON and the ``client_keys.budgets`` column."""
        limit = int(self.limit) if self.unit != "cost" else self.limit
        return {"window": self.window, self.unit: limit, **({"models": list(self.models)} if self.models else {})}


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
    budgets: tuple[Budget, ...] | None = None  # plan-shaped budgets beyond the three shorthands
    expires_at: dt.datetime | None = None  # naive UTC: from then on the key is refused
    warn_at: float | None = None  # share of a budget (0 < x < 1) whose use raises key_budget_warning once

    def allows_model(self, model: str | None) -> bool:
        """Whether a call for ``model`` is allowed; a call that names no model only when no list is set."""
        return _globs_match(self.models, model)

    @property
    def needs_database(self) -> bool:
        """Whether admission reads or writes the key's usage tables (``client_key_usage``, ``client_key_spans``)."""
        return bool(self.budgets) or any(v is not None for v in (self.daily_requests, self.daily_tokens,
                                                                 self.monthly_cost))

    @property
    def fleet_limited(self) -> bool:
        """Whether the key has an rpm or concurrency limit (counted fleet-wide where there is a database)."""
        return self.rpm is not None or self.concurrency is not None


_LIST_LIMITS = ("nodes", "models", "endpoints")
_INT_LIMITS = ("daily_requests", "daily_tokens", "rpm", "concurrency")
# What a key may be limited by: every KeySpec field but its name and digest.
LIMIT_FIELDS = (*_LIST_LIMITS, *_INT_LIMITS, "monthly_cost", "budgets", "expires_at", "warn_at")
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
        elif field_name == "budgets":
            limits[field_name] = parse_budgets(value)
        elif field_name == "expires_at":
            limits[field_name] = parse_time(value)
        elif field_name == "warn_at":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError("warn_at must be a number between 0 and 1 (a share of each budget)")
            limits[field_name] = float(value)
        elif field_name in _INT_LIMITS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be an integer >= 0")
            limits[field_name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{field_name} must be a number >= 0 (USD)")
            limits[field_name] = float(value)
    return limits


def parse_budgets(value: object) -> tuple[Budget, ...] | None:
    """A key's ``budgets`` (a list of ``{window, requests|tokens|cost, models?}``); an empty list: none."""
    if not isinstance(value, list | tuple):
        raise ValueError("budgets must be a list of tables {window, requests|tokens|cost, models}")
    if len(value) > MAX_BUDGETS:
        raise ValueError(f"at most {MAX_BUDGETS} budgets per key")
    found: list[Budget] = []
    for n, entry in enumerate(value, 1):
        where = f"budget {n}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: must be a table {{window, requests|tokens|cost, models}}")
        unknown = set(entry) - {"window", "models", *UNITS}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if entry.get("window") not in WINDOWS:
            raise ValueError(f"{where}: window must be one of {', '.join(WINDOWS)}")
        units = [u for u in UNITS if u in entry]
        if len(units) != 1:
            raise ValueError(f"{where}: give exactly one of {', '.join(UNITS)}")
        limit = entry[units[0]]
        if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0 or (
                units[0] != "cost" and not isinstance(limit, int)):
            raise ValueError(f"{where}: {units[0]} must be {'a number' if units[0] == 'cost' else 'an integer'} >= 0")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list | tuple) or not models
                                   or not all(isinstance(m, str) and m for m in models)):
            raise ValueError(f"{where}: models must be a non-empty list of non-empty strings (globs)")
        budget = Budget(entry["window"], units[0], float(limit) if units[0] == "cost" else limit,
                        tuple(models) if models else None)
        if any(b.name == budget.name for b in found):
            raise ValueError(f"{where}: {budget.name} is given twice")
        found.append(budget)
    return tuple(found) or None


def parse_time(value: object) -> dt.datetime:
    """An instant as naive UTC: a TOML datetime or an ISO 8601 string (no offset: UTC)."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expires_at must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z, got {value!r}") from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    if not isinstance(value, dt.datetime):
        raise ValueError("expires_at must be a time (ISO 8601, UTC unless it says otherwise)")
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo is not None else value
