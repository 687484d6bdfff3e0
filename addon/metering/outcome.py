"""What a finished call means: its status, whether it counts against the node, and its error text.

Plain Python so the rules are tested without mitmproxy.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from dataclasses import dataclass

# HTTP statuses that say the node (its key, its quota), not the client, is at fault.
NODE_FAILURE_STATUSES = frozenset({401, 403, 429})


def is_node_failure_status(http_status: int) -> bool:
    return http_status >= 500 or http_status in NODE_FAILURE_STATUSES


def rest_asked(http_status: int, retry_after: str | None, now: dt.datetime | None = None) -> float:
    """Seconds a node's 429 or 503 asked to be left alone: its ``Retry-After`` (seconds or an HTTP date);
    0 for any other answer or a value that says nothing."""
    if http_status not in (429, 503) or not retry_after:
        return 0.0
    try:
        seconds = float(retry_after)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:  # "-0000": UTC
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # "success" | "failed" | "aborted" | "truncated"
    node_failure: bool
    error: str | None


def classify_response(http_status: int, *, body_error: str | None, stream: bool,
                      completed: bool) -> Outcome:
    """A response that reached its end. ``body_error``: an error reported inside the body."""
    if http_status >= 400:
        return Outcome("failed", is_node_failure_status(http_status), body_error or f"HTTP {http_status}")
    if body_error:
        # An error event inside an HTTP 200 stream ("overloaded" right after response.created).
        return Outcome("failed", True, body_error)
    if stream and not completed:
        return Outcome("truncated", True, "stream ended before its final event")
    return Outcome("success", False, None)


def classify_error(message: str, *, got_response: bool) -> Outcome:
    """A flow that ended in a mitmproxy error instead of a response."""
    if "Client disconnected" in message or message == "Connection killed.":
        return Outcome("aborted", False, message)
    # Connect failures, upstream resets, timeouts: the node's fault.
    return Outcome("failed" if not got_response else "truncated", True, message)


def ms(seconds: float) -> int:
    """A duration in whole milliseconds, as records keep them (never negative: clocks may step)."""
    return max(0, round(seconds * 1000))
