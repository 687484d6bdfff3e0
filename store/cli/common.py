"""What the store's command-line tools (``stats_cli``, ``poll_cli``, ``reconcile_cli``) share: the
``--db`` and ``--sources`` options, opening the database of a tool that writes, and reading a day."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from typing import NoReturn

import sqlalchemy as sa

from store.engine import DEFAULT_DB, error_summary, make_engine, upgrade_to_head


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=os.environ.get("CODEX_DB", DEFAULT_DB),
                        help="SQLAlchemy URL of the stats database (default: $CODEX_DB or %(default)s)")


def add_sources_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", default=os.environ.get("CODEX_STATS_SOURCES"),
                        help="TOML file with [[sources]] (default: $CODEX_STATS_SOURCES)")


def open_db(url: str, prog: str) -> sa.Engine | None:
    """The engine of an upgraded database, or None after printing why it cannot be opened."""
    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        print(f"{prog}: not a database URL: {url!r} (e.g. {DEFAULT_DB})", file=sys.stderr)
        return None
    try:
        engine = make_engine(url)
        upgrade_to_head(engine)
    except Exception as e:  # any failure here is the user's URL or server: say it plainly
        print(f"{prog}: cannot open database {shown}: {error_summary(e)}", file=sys.stderr)
        return None
    return engine


def day_of(text: str, today: dt.date) -> dt.date:
    """``YYYY-MM-DD``, ``today`` or ``yesterday`` (``today`` in whichever calendar the tool counts); raises
    ValueError for anything else."""
    if text in ("today", "yesterday"):
        return today - dt.timedelta(days=1) if text == "yesterday" else today
    return dt.date.fromisoformat(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the CLIs (it would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
