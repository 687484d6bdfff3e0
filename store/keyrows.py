"""Client key rows (``client_keys``): the file's keys upserted at start, the admin API's and CLI's changes, reads.

Every change bumps ``client_key_state.version`` first, in its own transaction: on MariaDB that row lock
orders the key writers (two relays starting at once, a CLI and a page), so a change may read a row and
then write it; relays reload their keys when the version moves (``addon.services.clientkeys``).

The file's rule: at start a file key's secret and the limits the file sets are written (the file wins
them, and they are recorded as its ``file_fields``: the admin API and CLI refuse to change them); a limit the
file does not set keeps what the admin API or CLI set, and ``revoked_at`` is never touched by the file, so a
revocation holds across restarts. Usage (``client_key_usage``) is never touched.
A secret is never stored: only its SHA-256.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from store.keys import LIMIT_FIELDS, MAX_NAME_CHARS, KeySpec, parse_budgets, parse_limits
from store.masking import digest
from store.nodes import owned_fields
from store.records import utcnow
from store.schema import client_key_state, client_keys, nodes
from store.upsert import upsert

_JSON_FIELDS = ("nodes", "models", "endpoints")


class NoSuchKey(LookupError):
    """No key of that name."""


class KeyConflict(Exception):
    """The change contradicts the key's state (a name taken, a revoked key, a file key's secret)."""


def new_secret() -> str:
    """A new client key: 256 random bits, URL-safe, with a prefix that says whose key it is."""
    return "crk-" + secrets.token_urlsafe(32)


def bump_version(conn: sa.Connection) -> None:
    """Tell every relay on this database that the keys changed (in the caller's transaction)."""
    upsert(conn, client_key_state, [{"id": 1, "version": 1}], increment=("version",))


def read_version(conn: sa.Connection) -> int:
    return conn.execute(sa.select(client_key_state.c.version).where(client_key_state.c.id == 1)).scalar() or 0


def load_keys(conn: sa.Connection) -> list[sa.Row]:
    """Every key row, revoked ones too, by name."""
    return list(conn.execute(sa.select(client_keys).order_by(client_keys.c.name)))


def spec_of(row: sa.Row) -> KeySpec:
    limits = {f: getattr(row, f) for f in LIMIT_FIELDS}
    for f in _JSON_FIELDS:
        limits[f] = tuple(json.loads(limits[f])) if limits[f] is not None else None
    limits["budgets"] = parse_budgets(json.loads(row.budgets)) if row.budgets is not None else None
    return KeySpec(name=row.name, key_digest=bytes.fromhex(row.key_sha256), **limits)


def describe(row: sa.Row) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: never its secret nor its digest."""
    spec = spec_of(row)
    return {"name": row.name, "source": row.source, "revoked": row.revoked_at is not None,
            "file_fields": owned_fields(row.file_fields),
            **{f: list(v) if isinstance(v := getattr(spec, f), tuple) else v for f in LIMIT_FIELDS},
            "budgets": [b.as_dict() for b in spec.budgets or ()],
            "expires_at": spec.expires_at.isoformat() + "Z" if spec.expires_at is not None else None,
            "created_at": row.created_at, "updated_at": row.updated_at, "revoked_at": row.revoked_at}


def _columns(limits: Mapping[str, object]) -> dict[str, object]:
    columns = {f: json.dumps(list(v)) if f in _JSON_FIELDS and v is not None else v  # type: ignore[call-overload]
               for f, v in limits.items()}
    if limits.get("budgets") is not None:
        columns["budgets"] = json.dumps([b.as_dict() for b in limits["budgets"]])  # type: ignore[attr-defined]
    return columns


def _row(conn: sa.Connection, name: str) -> sa.Row | None:
    return conn.execute(sa.select(client_keys).where(client_keys.c.name == name)).first()


def _check_nodes(conn: sa.Connection, limits: Mapping[str, object]) -> None:
    wanted = limits.get("nodes") or ()
    known = set(conn.execute(sa.select(nodes.c.id)).scalars())
    unknown = [n for n in wanted if n not in known]  # type: ignore[attr-defined]
    if unknown:
        raise ValueError(f"unknown node id(s) {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})")


def _admin_key_with(conn: sa.Connection, key_sha256: str, name: str) -> str | None:
    """The other key made through the API or CLI whose secret this is (another file key's may be: a key renamed in
    the file keeps its secret, and relays whose file still has the old name keep accepting it there)."""
    c = client_keys.c
    return conn.execute(sa.select(c.name).where(c.key_sha256 == key_sha256, c.name != name,
                                                c.source == "admin")).scalar()


def upsert_file_keys(conn: sa.Connection, specs: Sequence[KeySpec]) -> None:
    """Write the keys of the codex_client_keys file by the file's rule (module docstring); ValueError names a
    key whose secret another key already has."""
    if not specs:
        return
    bump_version(conn)
    now = utcnow()
    for spec in specs:
        key_sha256 = spec.key_digest.hex()
        taken = _admin_key_with(conn, key_sha256, spec.name)
        if taken is not None:
            raise ValueError(f"key {spec.name!r}: its secret is already the key {taken!r}'s (made through the API)")
        given = _columns({f: v for f in LIMIT_FIELDS if (v := getattr(spec, f)) is not None})
        values = {"key_sha256": key_sha256, "source": "file", "updated_at": now, "file_fields": ",".join(given),
                  **given}
        if _row(conn, spec.name) is None:
            conn.execute(sa.insert(client_keys).values(name=spec.name, created_at=now, **values))
        else:
            conn.execute(sa.update(client_keys).where(client_keys.c.name == spec.name).values(**values))
    # A key the file no longer names keeps its limits, now the API's to change.
    conn.execute(sa.update(client_keys).where(client_keys.c.file_fields.is_not(None),
                                              client_keys.c.name.not_in([s.name for s in specs]))
                 .values(file_fields=None))


def create_key(conn: sa.Connection, name: Any, fields: Mapping[str, object]) -> str:
    """Add a key named ``name`` with the limits in ``fields``; its secret, which only the caller ever sees.
    ValueError: a bad name or limit; KeyConflict: the name is taken (revoked keys keep theirs)."""
    if not isinstance(name, str) or not (0 < len(name) <= MAX_NAME_CHARS) or not name.isprintable() \
            or name != name.strip():
        raise ValueError(f"name must be 1 to {MAX_NAME_CHARS} printable characters, no leading or trailing space")
    limits = parse_limits(fields)
    bump_version(conn)
    _check_nodes(conn, limits)
    if _row(conn, name) is not None:
        raise KeyConflict(f"a key named {name!r} exists")
    secret = new_secret()
    now = utcnow()
    conn.execute(sa.insert(client_keys).values(name=name, key_sha256=digest(secret).hex(), source="admin",
                                               created_at=now, updated_at=now, **_columns(limits)))
    return secret


def update_key(conn: sa.Connection, name: str, fields: Mapping[str, object]) -> sa.Row:
    """Set the limits ``fields`` gives (None: no limit), leave the others; the key's row after."""
    limits = parse_limits(fields, none_clears=True)
    bump_version(conn)
    row = _live(conn, name)
    owned = owned_fields(row.file_fields)
    changed = [f for f, v in _columns(limits).items() if f in owned and getattr(row, f) != v]
    if changed:
        raise KeyConflict(f"key {name!r}: {', '.join(changed)} set by the codex_client_keys file: change it there "
                          "(the limits the file leaves out may be changed here)")
    _check_nodes(conn, limits)
    conn.execute(sa.update(client_keys).where(client_keys.c.name == name)
                 .values(updated_at=utcnow(), **_columns(limits)))
    return _live(conn, name)


def rotate_key(conn: sa.Connection, name: str) -> str:
    """Give the key a new secret (the old one is refused from then on); the new secret."""
    bump_version(conn)
    row = _live(conn, name)
    if row.source == "file":
        raise KeyConflict(f"key {name!r} is the codex_client_keys file's: its secret is the file's "
                          "(a rotation would be undone at the next start); change it there")
    secret = new_secret()
    conn.execute(sa.update(client_keys).where(client_keys.c.name == name)
                 .values(key_sha256=digest(secret).hex(), updated_at=utcnow()))
    return secret


def revoke_key(conn: sa.Connection, name: str) -> sa.Row:
    """Refuse the key from now on, on every relay and after restarts; its name and usage stay. Revoking a
    revoked key changes nothing."""
    bump_version(conn)
    row = _row(conn, name)
    if row is None:
        raise NoSuchKey(name)
    if row.revoked_at is None:
        now = utcnow()
        conn.execute(sa.update(client_keys).where(client_keys.c.name == name).values(revoked_at=now, updated_at=now))
    return _row(conn, name)  # type: ignore[return-value]


def _live(conn: sa.Connection, name: str) -> sa.Row:
    row = _row(conn, name)
    if row is None:
        raise NoSuchKey(name)
    if row.revoked_at is not None:
        raise KeyConflict(f"key {name!r} is revoked")
    return row
