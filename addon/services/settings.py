"""Parsing option values into settings: the one error type, and the one parser of durations."""

from __future__ import annotations


class SettingsError(ValueError):
    """An option value the relay cannot run with; the message starts with the option's name."""


def seconds(name: str, value: str, *, allow_zero: bool = True) -> float:
    """A duration option's value: mitmproxy options have no float type, so durations come in as strings."""
    try:
        v = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {value!r}") from None
    if v < 0 or (v == 0 and not allow_zero):
        raise SettingsError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v
