"""The poller against a fake stats endpoint: a day of captures into snapshots and deltas, failures,
the background thread, and the one-shot command."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import threading

import pytest

from store.poll import Poller, fetch
from store.poll_cli import main
from store.sources import SourceConfig
from tests.fakestats import FakeStats, crs_item, crs_response, delta_rows, fresh_engine, snapshot_rows

DAY = dt.datetime(2026, 11, 23)


def epoch(t: dt.datetime) -> int:
    return int(t.replace(tzinfo=dt.UTC).timestamp())


class Clock:
    """The poller's clock, set by the test."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as engine:
        yield engine


@pytest.fixture
def stats():
    with FakeStats() as server:
        yield server


def crs_source(stats: FakeStats, **kw) -> SourceConfig:
    return SourceConfig(name="crs", url=stats.url, method="POST", body={"apiId": "k-1", "period": "daily"},
                        headers={"Authorization": "Bearer sekrit"}, timeout=5, **kw)


def test_a_day_of_captures(engine, stats, caplog):
    """Captures through a day, a repeated capture, a malformed answer, a 500, a counter reset, a new day."""
    clock = Clock(DAY)
    poller = Poller(engine, [crs_source(stats)], clock=clock)
    t = [DAY.replace(hour=h) for h in range(8, 15)] + [DAY + dt.timedelta(days=1, seconds=10)]
    codex, mini = "gpt-5-codex", "gpt-5-mini"

    def poll(at: dt.datetime, status: int, body) -> str | None:
        clock.now = at
        stats.queue(status, body)
        (result,) = poller.poll_once()
        return result.error

    # 08:00 first capture of the day: its delta starts from zero.
    assert poll(t[0], 200, crs_response(crs_item(codex, 2, 100, 10, cache_read=50, cost=0.25))) is None
    # 09:00 more traffic, a second model.
    assert poll(t[1], 200, crs_response(crs_item(codex, 5, 300, 30, cache_read=150, cost=0.75),
                                        crs_item(mini, 1, 20, 4, cost=0.125))) is None
    # 10:00 nothing changed: snapshots, no delta.
    assert poll(t[2], 200, crs_response(crs_item(codex, 5, 300, 30, cache_read=150, cost=0.75),
                                        crs_item(mini, 1, 20, 4, cost=0.125))) is None
    # 10:00 again: the same capture polled twice (same epoch) writes nothing.
    assert poll(t[2], 200, crs_response(crs_item(codex, 5, 300, 30, cache_read=150, cost=0.75),
                                        crs_item(mini, 1, 20, 4, cost=0.125))) is None
    assert not poller.last_results["crs"].ingest.stored
    # 11:00 malformed, 12:00 HTTP 500: logged, nothing written.
    with caplog.at_level(logging.WARNING, logger="codex.poll"):
        assert "data[0] (gpt-5-codex).requests" in poll(t[3], 200, {"success": True, "data": [
            {"model": codex, "requests": "many"}]})
        assert poll(t[4], 500, {"error": "internal"}) == 'HTTP 500 Internal Server Error: {"error": "internal"}'
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "codex.poll"] == \
        ["stats source crs", "stats source crs"]
    # 13:00 the provider's counters went back (a reset): snapshots, a warning, no negative delta.
    with caplog.at_level(logging.WARNING, logger="codex.snapshots"):
        assert poll(t[5], 200, crs_response(crs_item(codex, 1, 10, 1, cost=0.125))) is None
    assert any("counter went backwards (requests, tokens, cost)" in r.getMessage() for r in caplog.records)
    # 14:00 growth after the reset counts from the reset value.
    assert poll(t[6], 200, crs_response(crs_item(codex, 3, 30, 3, cost=0.25))) is None
    # Next day 00:00:10: a new stats date starts from zero.
    assert poll(t[7], 200, crs_response(crs_item(codex, 1, 7, 2, cost=0.0625))) is None

    d1, d2 = "2026-11-23", "2026-11-24"
    assert snapshot_rows(engine) == [
        ("crs", "daily", d1, epoch(t[0]), None, 2, 100, 10, 50, 160, 0.25),
        ("crs", "daily", d1, epoch(t[0]), codex, 2, 100, 10, 50, 160, 0.25),
        ("crs", "daily", d1, epoch(t[1]), None, 6, 320, 34, 150, 504, 0.875),
        ("crs", "daily", d1, epoch(t[1]), codex, 5, 300, 30, 150, 480, 0.75),
        ("crs", "daily", d1, epoch(t[1]), mini, 1, 20, 4, 0, 24, 0.125),
        ("crs", "daily", d1, epoch(t[2]), None, 6, 320, 34, 150, 504, 0.875),
        ("crs", "daily", d1, epoch(t[2]), codex, 5, 300, 30, 150, 480, 0.75),
        ("crs", "daily", d1, epoch(t[2]), mini, 1, 20, 4, 0, 24, 0.125),
        ("crs", "daily", d1, epoch(t[5]), None, 1, 10, 1, 0, 11, 0.125),
        ("crs", "daily", d1, epoch(t[5]), codex, 1, 10, 1, 0, 11, 0.125),
        ("crs", "daily", d1, epoch(t[6]), None, 3, 30, 3, 0, 33, 0.25),
        ("crs", "daily", d1, epoch(t[6]), codex, 3, 30, 3, 0, 33, 0.25),
        ("crs", "daily", d2, epoch(t[7]), None, 1, 7, 2, 0, 9, 0.0625),
        ("crs", "daily", d2, epoch(t[7]), codex, 1, 7, 2, 0, 9, 0.0625),
    ]
    assert delta_rows(engine) == [
        ("crs", "daily", d1, epoch(t[0]), 2, 2, 0, 160, 0.25),
        ("crs", "daily", d1, epoch(t[1]), 4, 4, 0, 344, 0.625),
        ("crs", "daily", d1, epoch(t[6]), 2, 2, 0, 22, 0.125),
        ("crs", "daily", d2, epoch(t[7]), 1, 1, 0, 9, 0.0625),
    ]
    # Every poll sent the configured request.
    assert len(stats.seen) == 9
    req = stats.seen[0]
    assert (req.method, req.headers["authorization"], req.headers["content-type"], json.loads(req.body)) == \
        ("POST", "Bearer sekrit", "application/json", {"apiId": "k-1", "period": "daily"})


def test_one_failing_source_does_not_stop_the_others(engine, stats):
    down = SourceConfig(name="down", url="http://127.0.0.1:9/nothing", timeout=2)
    stats.queue(200, crs_response(crs_item("gpt-5-codex", 1, 1, 1)))
    results = Poller(engine, [down, crs_source(stats)], clock=Clock(DAY)).poll_once()
    assert [r.source for r in results] == ["down", "crs"]
    assert results[0].error.startswith("request failed:") and results[1].ok
    assert len(snapshot_rows(engine)) == 2


def test_database_failure_is_reported_not_raised(stats, tmp_path):
    from store.engine import make_engine

    # A database without the tables: the insert fails, the poll reports it.
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    stats.queue(200, crs_response())
    (result,) = Poller(engine, [crs_source(stats)], clock=Clock(DAY)).poll_once()
    engine.dispose()
    assert result.error.startswith("database: OperationalError")


def test_fetch_limits_and_errors(stats):
    stats.queue(404, "")
    with pytest.raises(Exception, match="HTTP 404 Not Found$"):
        fetch(crs_source(stats))
    stats.queue(200, "x" * (8 * 1024 * 1024 + 1))
    with pytest.raises(Exception, match="larger than"):
        fetch(crs_source(stats))


def test_thread_polls_retries_and_stops(engine, stats):
    """The thread survives a 500 and polls again at the next interval; stop() ends it promptly."""
    stats.queue(500, "down")
    for n in (1, 2):
        stats.queue(200, crs_response(crs_item("gpt-5-codex", n, 10 * n, n)))
    results = []
    three = threading.Event()
    times = (DAY + dt.timedelta(seconds=s) for s in itertools.count())

    def on_result(r):
        results.append(r)
        if len(results) == 3:
            three.set()

    poller = Poller(engine, [crs_source(stats, interval=0.01)], clock=lambda: next(times), on_result=on_result)
    poller.start()
    try:
        assert three.wait(30), results
    finally:
        thread = poller._thread
        poller.stop()
    assert not thread.is_alive()
    assert results[0].error == "HTTP 500 Internal Server Error: down"
    assert [r.ok for r in results[1:3]] == [True, True]
    assert [d[4] for d in delta_rows(engine)] == [1, 1]


def test_stop_interrupts_the_wait(engine, stats):
    stats.queue(200, crs_response())
    polled = threading.Event()
    poller = Poller(engine, [crs_source(stats, interval=3600)], on_result=lambda r: polled.set())
    poller.start()
    assert polled.wait(30)
    thread = poller._thread
    poller.stop(timeout=10)
    assert not thread.is_alive()


# -- one-shot command ------------------------------------------------------------------------------
def write_sources(tmp_path, url: str, extra: str = "") -> str:
    p = tmp_path / "sources.toml"
    p.write_text(f'[[sources]]\nname = "crs"\nurl = "{url}"\nbody = {{ apiId = "k" }}\n{extra}')
    return str(p)


def test_command_polls_once(engine, stats, tmp_path, capsys):
    stats.queue(200, crs_response(crs_item("gpt-5-codex", 2, 10, 1, cost=0.5)))
    url = engine.url.render_as_string(hide_password=False)
    assert main(["--db", url, "--sources", write_sources(tmp_path, stats.url)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("crs: captured at ") and "delta +2 requests, +11 tokens, +$0.500000" in out
    assert len(snapshot_rows(engine)) == 2

    stats.queue(500, "oops")
    assert main(["--db", url, "--sources", write_sources(tmp_path, stats.url)]) == 1
    assert capsys.readouterr().out == "crs: FAILED: HTTP 500 Internal Server Error: oops\n"


def test_command_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CODEX_STATS_SOURCES", raising=False)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    with pytest.raises(SystemExit) as e:
        main(["--db", db])
    assert e.value.code == 2 and "--sources FILE" in capsys.readouterr().err

    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "x"\n')
    assert main(["--db", db, "--sources", str(bad)]) == 2
    assert capsys.readouterr().err == f"poll-stats: {bad}: sources[0] (x): url is required\n"

    ok = write_sources(tmp_path, "http://127.0.0.1:9/")
    assert main(["--db", db, "--sources", ok, "--source", "nope"]) == 2
    assert "no source named nope" in capsys.readouterr().err

    assert main(["--db", "mysql+pymysql://u@127.0.0.1:9/x", "--sources", ok]) == 2
    assert capsys.readouterr().err.startswith("poll-stats: cannot open database mysql+pymysql://u@127.0.0.1:9/x")


def test_start_poller_for_the_relay(engine, stats, tmp_path):
    from store.config import ConfigError
    from store.poll import start_poller

    assert start_poller(engine, "") is None
    stats.queue(200, crs_response())
    path = write_sources(tmp_path, stats.url, "interval = 3600\n")
    first = start_poller(engine, path)
    assert first is not None and first._thread.is_alive()
    # A bad file leaves the running poller alone; a good one replaces it.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="url is required"):
        start_poller(engine, str(bad), first)
    assert first._thread.is_alive()
    thread = first._thread
    assert start_poller(engine, "", first) is None  # sources unset: the old poller stops
    assert not thread.is_alive()
