"""Option values mitmproxy has no type for, parsed once in ``configure``."""

from __future__ import annotations

from mitmproxy import exceptions


def seconds(name: str, value: str, *, allow_zero: bool = True) -> float:
    """A duration option's value: mitmproxy options have no float type, so durations come in as strings."""
    try:
        v = float(value)
    except ValueError:
        raise exceptions.OptionsError(f"{name} must be a number of seconds, got {value!r}") from None
    if v < 0 or (v == 0 and not allow_zero):
        raise exceptions.OptionsError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v
