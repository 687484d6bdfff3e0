"""``python -m store.cli.keys`` (``./run.sh keys``): the client keys in the database, for scripts.

``add NAME [limits]`` and ``rotate NAME`` print the new secret alone on stdout (the only time anyone sees it:
the database keeps its SHA-256); ``list`` prints every key (``--json`` for scripts); ``set NAME limits``
changes only the limits given (``none`` removes one); ``revoke NAME`` refuses the key from then on. A budget is
``--budget WINDOW:UNIT=LIMIT[:GLOB,GLOB]`` (e.g. ``weekly:cost=20:claude-opus-*``), repeated for several;
``set`` replaces the key's budgets with those given (``--budget none``: no budgets). Every
relay on the database applies a change within ``codex_key_sync`` seconds. Exit 0: done; 1: database error
or a conflict (a name taken, a revoked or unknown key); 2: bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from store import keyrows
from store.cli.common import OneLineParser, add_db_option, open_db
from store.engine import error_summary
from store.keys import LIMIT_FIELDS, UNITS, WINDOWS

_LISTS = ("nodes", "models", "endpoints")
_FLOATS = ("monthly_cost", "warn_at")
_KINDS = {"expires_at": "ISO 8601 time, UTC", "warn_at": "share of each budget, e.g. 0.8"}


def _add_limit_options(parser: argparse.ArgumentParser, clearing: bool) -> None:
    clear = " ('none': no limit)" if clearing else ""
    for f in LIMIT_FIELDS:
        if f == "budgets":
            parser.add_argument("--budget", dest=f, action="append", metavar="WINDOW:UNIT=LIMIT[:GLOBS]",
                                help=f"a budget: WINDOW one of {', '.join(WINDOWS)}, UNIT one of {', '.join(UNITS)} "
                                "(cost in USD), GLOBS comma-separated models it counts; repeat for several"
                                + (" (set replaces them all; 'none': no budgets)" if clearing else ""))
            continue
        kind = _KINDS.get(f) or ("comma-separated list" if f in _LISTS else "USD" if f in _FLOATS else "integer")
        parser.add_argument("--" + f.replace("_", "-"), dest=f, metavar="VALUE", help=f"{f} ({kind}){clear}")


def _budget(text: str) -> dict[str, object]:
    """``WINDOW:UNIT=LIMIT[:GLOB,GLOB]`` as the admin API's JSON gives a budget (checked by store.keys)."""
    head, _, limit_text = text.partition("=")
    window, _, unit = head.strip().partition(":")
    limit_text, _, globs = limit_text.partition(":")
    try:
        limit: float = float(limit_text) if unit.strip() == "cost" else int(limit_text)
    except ValueError:
        raise ValueError(f"--budget {text!r}: expected WINDOW:UNIT=LIMIT[:GLOB,GLOB], e.g. weekly:cost=20") from None
    models = [m.strip() for m in globs.split(",") if m.strip()]
    return {"window": window.strip(), unit.strip(): limit, **({"models": models} if models else {})}


def _limits(args: argparse.Namespace) -> dict[str, object]:
    """The limits given on the command line, as the admin API's JSON would give them; ValueError if one is bad."""
    limits: dict[str, object] = {}
    for f in LIMIT_FIELDS:
        text = getattr(args, f)
        if text is None:
            continue
        if f == "budgets":
            limits[f] = [] if [t.strip().lower() for t in text] == ["none"] else [_budget(t) for t in text]
        elif text.strip().lower() == "none":
            limits[f] = None
        elif f == "expires_at":
            limits[f] = text.strip()
        elif f in _LISTS:
            limits[f] = [v.strip() for v in text.split(",") if v.strip()]
        else:
            try:
                limits[f] = float(text) if f in _FLOATS else int(text)
            except ValueError:
                raise ValueError(f"--{f.replace('_', '-')} must be a number, got {text!r}") from None
    return limits


def _table(rows: Sequence[dict]) -> str:
    lines = [f"{'name':<24} {'source':<6} {'state':<7} limits"]
    for r in rows:
        limits = ", ".join(f"{f}={_shown(v)}" for f in LIMIT_FIELDS if (v := r[f]) not in (None, []))
        lines.append(f"{r['name']:<24} {r['source']:<6} {'revoked' if r['revoked'] else 'active':<7} {limits or '-'}")
    return "\n".join(lines)


def _shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, dict):  # a budget, as --budget writes it
        unit = next(u for u in UNITS if u in value)
        models = value.get("models")
        return f"{value['window']}:{unit}={value[unit]}" + (f":{' '.join(models)}" if models else "")
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="keys", description="Manage the client keys in the stats database; every relay "
                           "on it applies a change within codex_key_sync seconds.")
    add_db_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add = commands.add_parser("add", help="add a key; prints its secret (shown once)")
    add.add_argument("name")
    _add_limit_options(add, clearing=False)
    listing = commands.add_parser("list", help="every key, revoked ones too")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    change = commands.add_parser("set", help="change the limits given, leave the others")
    change.add_argument("name")
    _add_limit_options(change, clearing=True)
    for command, what in (("rotate", "give a key a new secret (printed; the old one is refused)"),
                          ("revoke", "refuse a key from now on")):
        commands.add_parser(command, help=what).add_argument("name")
    args = parser.parse_args(argv)
    try:
        limits = _limits(args) if args.command in ("add", "set") else {}
    except ValueError as e:
        parser.error(str(e))
    engine = open_db(args.db, "keys")
    if engine is None:
        return 1
    try:
        with engine.begin() as conn:
            if args.command == "list":
                rows = [keyrows.describe(r) for r in keyrows.load_keys(conn)]
                print(json.dumps(rows, default=str, indent=1) if args.json else _table(rows))
            elif args.command == "add":
                if any(v is None for v in limits.values()):
                    raise ValueError("'none' is for set: a new key has no limit unless given")
                print(keyrows.create_key(conn, args.name, limits))
            elif args.command == "set":
                keyrows.update_key(conn, args.name, limits)
            elif args.command == "rotate":
                print(keyrows.rotate_key(conn, args.name))
            else:
                keyrows.revoke_key(conn, args.name)
    except ValueError as e:
        parser.error(str(e))
    except keyrows.NoSuchKey:
        print(f"keys: no key {args.name!r}", file=sys.stderr)
        return 1
    except keyrows.KeyConflict as e:
        print(f"keys: {e}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as e:
        print(f"keys: database: {error_summary(e)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.command != "list":
        print(f"keys: {args.name}: {args.command} done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
