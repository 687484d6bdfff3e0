"""The client keys: the one holder of their specs (``store.keys.KeySpec``), digests and names.

``codex_client_keys`` is parsed once (``key_specs``) into frozen specs and upserted into the database
(``store.keyrows``), where the admin API and ``./run.sh keys`` add, change, rotate and revoke keys; ``sync``
applies the database's keys and reloads them whenever their version moves (a cheap read every
``codex_key_sync`` seconds), so a change made through any relay applies on every relay. Client auth names a
request's key with ``find``, the usage endpoint with ``name_of``, the limits read a key's spec, and
``KnownSecrets`` scrubs with ``digests``. The keys themselves are not kept: only their SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa

from addon.services.settings import SettingsError
from store.keyrows import load_keys, read_version, spec_of, upsert_file_keys
from store.keys import MAX_NAME_CHARS, KeySpec, parse_keys_toml, toml_file
from store.masking import digest
from store.periodic import Periodic

log = logging.getLogger("codex.auth")


def parse_client_keys(spec: str) -> list[tuple[str, str]]:
    """``(name, key)`` pairs from the option's value; ValueError says what is wrong.

    ``spec`` is a comma-separated list of ``name=key`` or bare keys, or ``@path`` of a file with one
    entry per line (blank lines and ``#`` comment lines ignored). ``name=key`` splits at the first
    ``=``, so a key that contains ``=`` needs a name. A bare key is named ``key-`` plus the first
    8 hex digits of its SHA-256: stable across restarts, and it does not reveal the key. Messages
    name entries by position, never by their key.
    """
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:].strip()).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        entries = [(f"{path} line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)]
        entries = [(where, line) for where, line in entries if line and not line.startswith("#")]
    else:
        entries = [(f"entry {n}", item.strip()) for n, item in enumerate(spec.split(","), 1)]
        entries = [(where, item) for where, item in entries if item]
    if not entries:
        raise ValueError("no keys given (expected name=key or bare keys, comma-separated, or @file)")
    pairs: list[tuple[str, str]] = []
    names: set[str] = set()
    keys: set[str] = set()
    for where, entry in entries:
        name, sep, key = entry.partition("=")
        name, key = (name.strip(), key.strip()) if sep else ("", entry)
        if sep and not name:
            raise ValueError(f"{where}: empty name before '='")
        if not key:
            raise ValueError(f"{where}: empty key")
        if any(c.isspace() for c in key):
            raise ValueError(f"{where}: the key contains whitespace")
        if not name:
            name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"{where}: the name must be 1 to {MAX_NAME_CHARS} printable characters")
        if name in names:
            raise ValueError(f"{where}: the name {name!r} is used twice")
        if key in keys:
            raise ValueError(f"{where}: the same key is listed twice")
        names.add(name)
        keys.add(key)
        pairs.append((name, key))
    return pairs


def key_specs(spec: str, known_nodes: Iterable[str]) -> tuple[KeySpec, ...]:
    """The keys ``codex_client_keys`` gives (none when empty): a TOML ``[[keys]]`` file with limits, or the
    ``name=key`` list (``parse_client_keys``). A key's ``nodes`` must be among ``known_nodes``."""
    text = None
    try:
        if not spec.strip():
            return ()
        text = toml_file(spec)
        specs = tuple(parse_keys_toml(text, MAX_NAME_CHARS) if text is not None else
                      [KeySpec(name, digest(key)) for name, key in parse_client_keys(spec)])
        known = set(known_nodes)
        for s in specs:
            unknown = [n for n in s.nodes or () if n not in known]
            if unknown:
                raise ValueError(f"key {s.name!r}: unknown node id(s) {', '.join(unknown)} "
                                 f"(configured: {', '.join(sorted(known)) or 'none'})")
    except ValueError as e:
        where = f"{spec.strip()[1:].strip()}: " if text is not None else ""
        raise SettingsError(f"codex_client_keys: {where}{e}") from None
    return specs


class ClientKeys:
    """The client keys in use: the file's and the database's."""

    def __init__(self) -> None:
        self.specs: dict[str, KeySpec] = {}  # by name
        self.digests: frozenset[bytes] = frozenset()
        self._enabled = False
        self._engine: sa.Engine | None = None
        self._file_names: frozenset[str] = frozenset()
        self._version = -1
        self._rounds: Periodic | None = None
        self._reloading = threading.Lock()  # the sync's thread and the admin API's: one reads and applies at a time

    def apply(self, specs: Iterable[KeySpec], *, enabled: bool | None = None) -> None:
        """Use these keys from now on; client auth is on when ``enabled`` (default: when there are keys)."""
        specs = tuple(specs)
        names = sorted(s.name for s in specs)
        if names != sorted(self.specs):
            log.info("client auth: %d key(s): %s", len(names), ", ".join(names))
        self.specs = {s.name: s for s in specs}
        self.digests = frozenset(s.key_digest for s in specs)
        self._enabled = bool(specs) if enabled is None else enabled

    def sync(self, engine: sa.Engine, file_specs: Iterable[KeySpec], interval: float) -> None:
        """Upsert the file's keys into ``engine`` (``store.keyrows``' rule), use the database's keys, and reload
        them every ``interval`` seconds when they changed (0: never). Blocking DB work."""
        self.stop()
        file_specs = tuple(file_specs)
        with engine.begin() as conn:
            try:
                upsert_file_keys(conn, file_specs)
            except ValueError as e:
                raise SettingsError(f"codex_client_keys: {e}") from None
        self._engine, self._file_names, self._version = engine, frozenset(s.name for s in file_specs), -1
        self.reload()
        if interval > 0:
            self._rounds = Periodic("codex-keysync", interval, self.reload, _reload_failed)
            self._rounds.start()

    def reload(self) -> bool:
        """Read the keys again if their version moved (True then). Blocking: call it off the event loop.

        A key is accepted while it is not revoked and was made through the admin API or CLI, or this relay's
        file names it (a key dropped from the file is refused, as a node dropped from it gets no calls).
        Client auth stays on once the database holds an admin-made key, revoked or not: revoking the last
        key never opens the relay.
        """
        if self._engine is None:
            return False
        with self._reloading:
            with self._engine.connect() as conn:
                version = read_version(conn)
                if version == self._version:
                    return False
                rows = load_keys(conn)
            self._version = version
            live = [spec_of(r) for r in rows
                    if r.revoked_at is None and (r.source == "admin" or r.name in self._file_names)]
            self.apply(live, enabled=bool(self._file_names) or any(r.source == "admin" for r in rows))
        return True

    def stop(self) -> None:
        if self._rounds is not None:
            self._rounds.stop()
            self._rounds = None

    @property
    def enabled(self) -> bool:
        """Whether clients must send a client key."""
        return self._enabled

    def spec(self, name: str) -> KeySpec | None:
        return self.specs.get(name)

    def find(self, candidates: Iterable[str]) -> str | None:
        """The name of the first of ``candidates`` (secrets a request carries) that is a client key, or None."""
        names = [self._name_of(c) for c in candidates]
        return next((n for n in names if n is not None), None)

    def name_of(self, key: str) -> str | None:
        """The name of a client key given as such (the usage endpoint's ``apiKey``), or None."""
        key = key.strip()
        # A JSON string may hold what no key has: a lone surrogate (no UTF-8 to hash), a control character.
        return self._name_of(key) if key.isprintable() else None

    def _name_of(self, candidate: str) -> str | None:
        found = None
        if candidate:
            d = digest(candidate)
            for spec in self.specs.values():
                # No early exit: the time taken does not depend on which key matched.
                if hmac.compare_digest(d, spec.key_digest) and found is None:
                    found = spec.name
        return found


def _reload_failed(e: Exception) -> None:  # the database away for a while: the next round tries again
    log.warning("client key check failed: %s", e)
