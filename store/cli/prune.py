"""``python -m store.cli.prune --keep-days N`` (``./run.sh prune``): ``store.prune`` from the command line.

Deletes the invocation rows older than N whole UTC days, in short transactions, with progress on
stderr; the daily stats keep their totals. Exit 0: done; 1: database error; 2: bad arguments. It
never creates or upgrades a database: pruning one the relay has not made is a mistake.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import sqlalchemy as sa

from store.cli.common import OneLineParser, add_db_option
from store.cli.stats import StatsError, open_readonly
from store.engine import error_summary
from store.prune import BATCH, Progress, count_older_than, prune_older_than

_PROGRESS_EVERY_S = 1.0


def _progress_printer() -> Progress:
    """Progress on stderr, at most once a second and always at the end."""
    last = time.monotonic()

    def show(deleted: int, total: int) -> None:
        nonlocal last
        if deleted < total and time.monotonic() - last < _PROGRESS_EVERY_S:
            return
        last = time.monotonic()
        print(f"prune: {deleted:,} / ~{total:,} rows deleted ({deleted / max(total, 1):.0%})",
              file=sys.stderr, flush=True)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="prune", description="Delete the recorded calls (codex_invocations rows) older than N whole UTC "
        "days, a batch per transaction. The daily stats and node counters keep their totals. Exit 1 on a "
        "database error, 2 on bad arguments.")
    parser.add_argument("--keep-days", type=int, required=True, metavar="N",
                        help="keep today and the N whole UTC days before it (N >= 1)")
    parser.add_argument("--dry-run", action="store_true", help="only say how many rows would be deleted")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per transaction (default %(default)s)")
    add_db_option(parser)
    args = parser.parse_args(argv)
    if args.keep_days < 1:
        parser.error(f"--keep-days must be at least 1, got {args.keep_days}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    try:
        engine = open_readonly(args.db)
    except StatsError as e:
        print(f"prune: {e}", file=sys.stderr)
        return 1
    try:
        if args.dry_run:
            cutoff, count = count_older_than(engine, args.keep_days)
            print(f"would delete {count:,} invocation rows before {cutoff:%Y-%m-%d} 00:00 UTC (dry run)")
            return 0
        result = prune_older_than(engine, args.keep_days, batch=args.batch, progress=_progress_printer())
    except sa.exc.SQLAlchemyError as e:
        # Batches committed before the error stay deleted; running the command again finishes the job.
        print(f"prune: database: {error_summary(e)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"deleted {result.deleted:,} invocation rows before {result.cutoff:%Y-%m-%d} 00:00 UTC "
          f"in {result.batches:,} batches; the daily stats are unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
