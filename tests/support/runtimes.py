"""Runtimes built by in-process tests, stopped when their test ends (``tests/conftest.py``): a service they start
on first use (e.g. ``Limits``' lease round on a database) would otherwise outlive its test and its database."""

from __future__ import annotations

from addon.services.runtime import Runtime

_built: list[Runtime] = []


def built(runtime: Runtime) -> Runtime:
    """``runtime``, to be stopped when the current test ends."""
    _built.append(runtime)
    return runtime


def stop_built() -> None:
    """Stop every runtime ``built`` since the last call."""
    while _built:
        _built.pop().stop()
