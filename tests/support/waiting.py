"""Waiting on an observable state, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for[T](condition: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``condition`` until it holds and return its value: synchronisation on an observable state,
    not a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return value


def seconds_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """How long ``condition`` took to hold (``wait_for``): for a bound a test asserts, such as a change one
    relay makes reaching another."""
    started = time.monotonic()
    wait_for(condition, timeout, what)
    return time.monotonic() - started
