"""Poll provider stats sources into snapshots and deltas: a thread in the relay, or once from cron.

In the relay the ``Poller`` thread does blocking HTTP (urllib) and DB work, never the event loop.
A failed poll (connection, HTTP status, malformed body, database) is logged and tried again at the
next interval; nothing a source does stops the thread.

Polling once from the command line (cron) is ``store.cli.poll``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from store.engine import error_summary
from store.records import utcnow
from store.sources import SourceConfig, SourceFormatError
from store.sources.snapshots import IngestResult, ingest

log = logging.getLogger("codex.poll")

MAX_BODY_BYTES = 8 * 1024 * 1024


class PollError(RuntimeError):
    """A stats request that brought no usable response."""


@dataclass(slots=True)
class PollResult:
    source: str
    captured_at: dt.datetime
    error: str | None = None  # None: the capture was stored (or was stored before), or skipped
    ingest: IngestResult | None = None
    skipped: str | None = None  # why no capture was taken (not a failure)

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.source}: FAILED: {self.error}"
        if self.skipped is not None:
            return f"{self.source}: skipped: {self.skipped}"
        assert self.ingest is not None
        if not self.ingest.stored:
            return f"{self.source}: {self.ingest.note}"
        d = self.ingest.delta
        change = (f"delta +{d.total_count} requests, +{d.total_tokens} tokens, +${d.total_cost:.6f}"
                  if d else f"no delta ({self.ingest.note})")
        return f"{self.source}: captured at {self.captured_at:%Y-%m-%d %H:%M:%S} UTC, {change}"


def fetch(source: SourceConfig) -> str:
    """The body of one stats request; raises PollError with a reason a user can act on."""
    data = None if source.body is None else json.dumps(source.body).encode()
    headers = {"Accept": "application/json", "User-Agent": "codex-relay stats poller", **source.headers}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(source.url, data=data, headers=headers, method=source.method)
    try:
        with urllib.request.urlopen(request, timeout=source.timeout) as resp:
            body = resp.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace").strip()
        raise PollError(f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as e:
        raise PollError(f"request failed: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, broken HTTP
        raise PollError(f"request failed: {e.__class__.__name__}: {e}") from None
    if len(body) > MAX_BODY_BYTES:
        raise PollError(f"response larger than {MAX_BODY_BYTES} bytes")
    return body.decode("utf-8", "replace")


class Poller:
    """Polls each source at its own interval on one background thread."""

    def __init__(self, engine: sa.Engine, sources: Sequence[SourceConfig], *,
                 fetch: Callable[[SourceConfig], str] = fetch, clock: Callable[[], dt.datetime] = utcnow,
                 on_result: Callable[[PollResult], None] | None = None) -> None:
        self.engine = engine
        self.sources = list(sources)
        self.last_results: dict[str, PollResult] = {}  # by source name, for the admin page
        self._fetch = fetch
        self._clock = clock
        self._on_result = on_result
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self, names: Sequence[str] | None = None) -> list[PollResult]:
        """Poll every source (or those named) now, one after the other; never raises."""
        return [self.poll(s) for s in self.sources if names is None or s.name in names]

    def poll(self, source: SourceConfig) -> PollResult:
        """Fetch, parse and store one capture of ``source``; never raises."""
        result = PollResult(source=source.name, captured_at=self._clock())
        try:
            # Checked before asking (no needless request) and again at the answer.
            text = None if source.near_midnight(result.captured_at) else self._fetch(source)
            result.captured_at = self._clock()  # the provider's tally is as of its answer
            if text is None or source.near_midnight(result.captured_at):
                result.skipped = (f"within {source.midnight_margin:g} s of the provider's midnight, whose day "
                                  "the answer may not match")
            else:
                result.ingest = ingest(self.engine, source.capture(text, result.captured_at))
        except (PollError, SourceFormatError) as e:
            result.error = str(e)
        except sa.exc.SQLAlchemyError as e:
            result.error = f"database: {error_summary(e)}"
        except Exception as e:  # a bug must not stop the other sources or the thread
            log.exception("stats source %s: unexpected error", source.name)
            result.error = f"{e.__class__.__name__}: {e}"
        if result.error is None:
            log.debug("%s", result.describe())
        else:
            log.warning("stats source %s: %s (next try in %g s)", source.name, result.error, source.interval)
        self.last_results[source.name] = result
        if self._on_result is not None:
            self._on_result(result)
        return result

    def start(self) -> None:
        if not self.sources or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="codex-stats-poller", daemon=True)
        self._thread.start()
        log.info("polling %d stats source(s): %s", len(self.sources),
                 ", ".join(f"{s.name} every {s.interval:g} s" for s in self.sources))

    def stop(self, timeout: float = 30) -> None:
        """Stop the thread; a poll in flight finishes first (bounded by its source's timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        due = dict.fromkeys((s.name for s in self.sources), time.monotonic())
        while not self._stop.is_set():
            for source in self.sources:
                if self._stop.is_set():
                    return
                started = time.monotonic()
                if due[source.name] <= started:
                    self.poll(source)
                    due[source.name] = started + source.interval
            self._stop.wait(max(0.0, min(due.values()) - time.monotonic()))
