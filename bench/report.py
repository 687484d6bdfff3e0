"""Plain-text tables for the benchmark output: text left, numbers right."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value: object, digits: int = 1) -> str:
    """A cell: thousands separators, fixed decimals, "-" for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers)] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    # A column is numeric when every body cell of it is.
    numeric = [all(isinstance(row[i], int | float) or row[i] is None for row in rows) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric, strict=True))
             .rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"\n{title}\n" + "\n".join(lines) + "\n"
