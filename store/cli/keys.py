"""``python -m store.cli.keys`` (``./run.sh keys``): the client keys in the database, for scripts.

``add NAME [limits]`` and ``rotate NAME`` print the new secret alone on stdout (the only time anyone sees it:
the database keeps its SHA-256); ``list`` prints every key (``--json`` for scripts); ``set NAME limits``
changes only the limits given (``none`` removes one); ``revoke NAME`` refuses the key from then on. Every
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
from store.keys import LIMIT_FIELDS

_LISTS = ("nodes", "models", "endpoints")
_FLOATS = ("monthly_cost",)


def _add_limit_options(parser: argparse.ArgumentParser, clearing: bool) -> None:
    clear = " ('none': no limit)" if clearing else ""
    for f in LIMIT_FIELDS:
        kind = "comma-separated list" if f in _LISTS else "USD" if f in _FLOATS else "integer"
        parser.add_argument("--" + f.replace("_", "-"), dest=f, metavar="VALUE", help=f"{f} ({kind}){clear}")


def _limits(args: argparse.Namespace) -> dict[str, object]:
    """The limits given on the command line, as the admin API's JSON would give them; ValueError if one is bad."""
    limits: dict[str, object] = {}
    for f in LIMIT_FIELDS:
        text = getattr(args, f)
        if text is None:
            continue
        if text.strip().lower() == "none":
            limits[f] = None
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
        limits = ", ".join(f"{f}={','.join(v) if isinstance(v, list) else v}"
                           for f in LIMIT_FIELDS if (v := r[f]) is not None)
        lines.append(f"{r['name']:<24} {r['source']:<6} {'revoked' if r['revoked'] else 'active':<7} {limits or '-'}")
    return "\n".join(lines)


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
