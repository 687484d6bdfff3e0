"""Hourly rollup: TTFB and duration buckets at most 15% wide, so hourly percentiles are within 10%.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

Branch wt-percentiles (issue 29 item 5). The integrator re-chains ``down_revision`` after the other
branches' 0017/0018; this revision only rebuilds ``codex_hourly_stats``.

The table is rebuilt (a new one filled by one INSERT … SELECT, then renamed): some new bucket columns
have an old one's name with another meaning. Each row's new counts come

- from its calls in ``codex_invocations`` when they are all still there (their count is the row's
  ``requests``: nothing pruned): exactly as the writer files them;
- else from its old counts, spread over the new buckets in proportion to how much of each old bucket
  they cover (as the old reading interpolated linearly within it), rounded down cumulatively so the
  total is kept; the old open bucket's calls go to the first new bucket above its bound. Such an hour
  reads about as it did before: its accuracy stays the old buckets'.

The downgrade does the same towards the old buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_TABLE, _NEW_TABLE = "codex_hourly_stats", "codex_hourly_stats_new"
_KEYS = ("hour", "source", "node_id", "model")
# The sums kept as they are (revisions 6 and 10), in table order; cost is a float.
_SUMS = ("requests", "successes", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
         "total_tokens", "cost", "bytes", "ttfb_sum", "ttfb_n", "stream_ms", "stream_tokens", "failures",
         "aborted", "priced", "duration_sum", "duration_n")


def _geometric(first: int, last: int) -> tuple[int, ...]:
    """store.histogram's bounds at this revision: each at most 15% above the one before."""
    bounds = [first]
    while bounds[-1] < last:
        bounds.append(bounds[-1] * 23 // 20)
    return tuple(bounds)


# Bucket upper bounds in ms, per distribution (its column prefix and its value in codex_invocations).
_OLD = {"ttfb": (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000, 60000),
        "dur": (250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000, 300000, 600000)}
_NEW = {"ttfb": _geometric(50, 60_000), "dur": _geometric(250, 1_800_000)}
_VALUE = {"ttfb": "ttfb_ms", "dur": "duration_ms"}

Div = Callable[[sa.ColumnElement, int], sa.ColumnElement]


def _names(prefix: str, bounds: Sequence[int]) -> list[str]:
    return [*(f"{prefix}_le_{b}" for b in bounds), f"{prefix}_le_inf"]


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    _rebuild(_OLD, _NEW)


def downgrade() -> None:
    _rebuild(_NEW, _OLD)


def _rebuild(old: dict[str, tuple[int, ...]], new: dict[str, tuple[int, ...]]) -> None:
    conn = op.get_bind()
    # The copy names every column: one another revision added would be dropped without a word.
    known = {*_KEYS, *_SUMS, *(n for prefix, bounds in old.items() for n in _names(prefix, bounds))}
    unknown = {c["name"] for c in sa.inspect(conn).get_columns(_TABLE)} - known
    if unknown:
        raise RuntimeError(f"revision 0019 would drop {_TABLE}.{', '.join(sorted(unknown))}: add it to its _SUMS")
    buckets = [name for prefix, bounds in new.items() for name in _names(prefix, bounds)]
    op.create_table(
        _NEW_TABLE,
        sa.Column("hour", sa.DateTime, primary_key=True),
        sa.Column("source", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        *[sa.Column(n, sa.Double, nullable=False, server_default="0") if n == "cost" else _counter(n) for n in _SUMS],
        *[_counter(n) for n in buckets],
    )
    hourly = sa.table(_TABLE, *map(sa.column, (*_KEYS, *_SUMS)),
                      *[sa.column(n, sa.BigInteger) for p, b in old.items() for n in _names(p, b)])
    h, raw = hourly.c, _raw_buckets(conn, new).subquery("raw")
    complete = raw.c.calls == h.requests  # every call of the row still has its own row
    if conn.dialect.name == "sqlite":
        div: Div = lambda a, b: a // b  # noqa: E731 -- integers: SQLite divides them as integers
    else:
        div = lambda a, b: a.op("DIV")(b)  # noqa: E731 -- exact, where FLOOR(a / b) rounds to 4 decimals first
    spread = [expr for prefix, bounds in new.items()
              for expr in _spread([h[n] for n in _names(prefix, old[prefix])], old[prefix], bounds, div)]
    select = (sa.select(*[h[n] for n in (*_KEYS, *_SUMS)],
                        *[sa.case((complete, raw.c[n]), else_=e) for n, e in zip(buckets, spread, strict=True)])
              .select_from(hourly.outerjoin(raw, sa.and_(*[raw.c[k] == h[k] for k in _KEYS]))))
    conn.execute(sa.table(_NEW_TABLE, *map(sa.column, (*_KEYS, *_SUMS, *buckets)))
                 .insert().from_select([*_KEYS, *_SUMS, *buckets], select))
    op.drop_table(_TABLE)
    op.rename_table(_NEW_TABLE, _TABLE)


def _raw_buckets(conn: sa.Connection, bounds: dict[str, tuple[int, ...]]) -> sa.Select:
    """Per hourly row, its calls in codex_invocations and their counts per bucket of ``bounds`` (as the
    writer files a value: (previous bound, bound], then above them all)."""
    inv = sa.table("codex_invocations", *map(sa.column, ("occurred_at", "source", "node_id", "model")),
                   *[sa.column(n, sa.BigInteger) for n in _VALUE.values()])
    c = inv.c
    # The hour's start as each dialect stores a DateTime (as revision 10 filled the rows).
    hour: sa.ColumnElement
    if conn.dialect.name == "sqlite":
        hour = sa.func.strftime("%Y-%m-%d %H:00:00.000000", c.occurred_at)
    else:
        hour = sa.cast(sa.func.date_format(c.occurred_at, "%Y-%m-%d %H:00:00"), sa.DateTime)
    keys = [hour, c.source, sa.func.coalesce(c.node_id, ""), sa.func.coalesce(c.model, "")]
    labelled = [k.label(name) for k, name in zip(keys, _KEYS, strict=True)]
    # Each call's bucket found once per distribution (a CASE that stops at its bound; NULL: no value), the calls
    # counted per row and bucket, and only those few counts spread into columns: testing every call against
    # every bucket's two bounds cost ~19 s per 100,000 calls on MariaDB.
    per_bucket = []
    for prefix, b in bounds.items():
        value = c[_VALUE[prefix]]
        index = sa.case((value.is_(None), sa.null()),
                        *[(value <= sa.literal_column(str(hi)), sa.literal_column(str(i))) for i, hi in enumerate(b)],
                        else_=sa.literal_column(str(len(b))))
        per_bucket.append(sa.select(*labelled, sa.literal_column(f"'{prefix}'").label("kind"), index.label("bucket"),
                                    sa.func.count().label("n")).group_by(*keys, index))
    counted = sa.union_all(*per_bucket).subquery("counted")
    k = counted.c
    first = next(iter(bounds))  # every call is counted once per distribution: its calls are one's total
    counts = [sa.func.sum(sa.case((k.kind == first, k.n), else_=0)).label("calls")]
    for prefix, b in bounds.items():
        for i, name in enumerate(_names(prefix, b)):
            counts.append(sa.func.sum(sa.case((sa.and_(k.kind == prefix, k.bucket == i), k.n), else_=0)).label(name))
    return sa.select(*[k[name] for name in _KEYS], *counts).group_by(*[k[name] for name in _KEYS])


def _spread(counts: list[sa.ColumnElement], bounds: tuple[int, ...], to: tuple[int, ...],
            div: Div) -> list[sa.ColumnElement]:
    """The counts per bucket of ``to`` of calls counted per bucket of ``bounds`` (``counts``: one per
    bucket, then the open one): each bucket's calls spread evenly over its width, rounded down
    cumulatively; the open bucket's calls at the first bound of ``to`` above its bound."""

    def at_or_below(b: int) -> sa.ColumnElement:
        terms: list[sa.ColumnElement] = []
        lower = 0
        for n, upper in zip(counts, bounds, strict=False):
            if upper <= b:
                terms.append(n)
            elif lower < b:
                terms.append(div(n * (b - lower), upper - lower))
            lower = upper
        if b > bounds[-1]:
            terms.append(counts[-1])
        return sum(terms[1:], terms[0]) if terms else sa.literal(0)

    below = [at_or_below(b) for b in to]
    total = sum(counts[1:], counts[0])
    return [below[0], *(hi - lo for lo, hi in zip(below, below[1:], strict=False)), total - below[-1]]
