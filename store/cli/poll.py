"""``python -m store.cli.poll`` (``./run.sh poll-stats``): poll every configured stats source once (for cron).

Exits 1 if any source failed, 2 on a configuration or database error::

    ./run.sh poll-stats --sources sources.toml --db mysql+pymysql://relay@db/codex
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from store.cli.common import add_db_option, add_sources_option, open_db
from store.config import ConfigError
from store.sources import load_sources_file
from store.sources.poll import Poller


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poll-stats", description="Poll each configured provider stats source once and store the "
        "snapshots and deltas. Exit status 1 if any source failed, 2 on a configuration error.")
    add_db_option(parser)
    add_sources_option(parser)
    parser.add_argument("--source", action="append", metavar="NAME", help="poll only this source (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.sources:
        parser.error("--sources FILE (or $CODEX_STATS_SOURCES) is required")
    try:
        sources = load_sources_file(args.sources)
    except ConfigError as e:
        print(f"poll-stats: {e}", file=sys.stderr)
        return 2
    unknown = set(args.source or ()) - {s.name for s in sources}
    if unknown:
        print(f"poll-stats: {args.sources}: no source named {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if not sources:
        print(f"poll-stats: {args.sources}: no [[sources]] configured", file=sys.stderr)
        return 2
    engine = open_db(args.db, "poll-stats")
    if engine is None:
        return 2
    try:
        results = Poller(engine, sources).poll_once(args.source)
    finally:
        engine.dispose()
    for r in results:
        print(r.describe())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
