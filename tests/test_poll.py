"""The poller against a fake stats endpoint: a day of captures into snapshots and deltas, failures,
the background thread, and the one-shot command."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import threading
import urllib.error
import urllib.request

import pytest

from store.cli.poll import main
from store.records import utcnow
from store.sources import SourceConfig, source_from_mapping
from store.sources.poll import Poller, fetch
from store.sources.snapshots import Delta
from tests.support.databases import fresh_engine
from tests.support.fakestats import FakeStats, Key, crs_item, crs_response, delta_rows, snapshot_rows

DAY = dt.datetime(2026, 11, 23)  # 08:00 on 2026-11-23 at CRS's +08:00
KEY_ID = "3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d"


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


def crs_source(stats: FakeStats, key: Key | None = None, **kw) -> SourceConfig:
    """A source as a user writes it (name, url and the key's id), then ``kw`` set directly."""
    source = source_from_mapping({"name": "crs", "url": stats.url, "api_id": key.id if key else KEY_ID}, "test")
    return dataclasses.replace(source, timeout=5, **kw)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> dt.datetime:
    """A UTC time on 2026-11-``day``."""
    return dt.datetime(2026, 11, day, hour, minute, second)


def test_a_day_of_captures(engine, caplog):
    """Calls counted by a CRS-faithful fake, polled through a day and past CRS's midnight (+08:00)."""
    clock = Clock(at(23, 1))  # 09:00 there; CRS and the poller agree on the time
    codex, sonnet = "gpt-5-codex", "claude-sonnet-4-5-20250929"
    with FakeStats(clock=clock) as crs:
        key = crs.add_key()
        poller = Poller(engine, [crs_source(crs, key)], clock=clock)

        def poll(when: dt.datetime):
            clock.now = when
            (result,) = poller.poll_once()
            return result

        # Nothing used yet today: an empty capture, no delta.
        assert poll(at(23, 1)).ingest.note == "unchanged"
        crs.record(key, codex, input_tokens=100, output_tokens=10, cache_read=50, real_cost=0.25, rated_cost=0.5)
        crs.record(key, codex, input_tokens=200, output_tokens=20, cache_read=100, real_cost=0.5, rated_cost=1.0)
        assert poll(at(23, 2)).ingest.delta == Delta(2, 2, 0, 480, 0.75, 1.5)
        # Bedrock's name of the model: CRS files it under the normalised one.
        crs.record(key, "us.anthropic.claude-sonnet-4-5-20250929-v1:0", input_tokens=20, output_tokens=4,
                   cache_create=10, real_cost=0.125, rated_cost=0.25)
        assert poll(at(23, 3)).ingest.delta == Delta(1, 1, 0, 34, 0.125, 0.25)
        # The same capture polled twice (same epoch) writes nothing.
        assert poll(at(23, 3)).ingest.note == "capture already stored"
        # A malformed answer and an HTTP 500: logged, nothing written.
        with caplog.at_level(logging.WARNING, logger="codex.poll"):
            crs.queue(200, {"success": True, "period": "daily", "data": [{"model": codex, "requests": "many"}]})
            assert "data[0] (gpt-5-codex).requests" in poll(at(23, 4)).error
            crs.queue(500, {"error": "Internal server error", "message": "Failed to retrieve model statistics"})
            assert poll(at(23, 5)).error == ('HTTP 500 Internal Server Error: {"error": "Internal server error", '
                                             '"message": "Failed to retrieve model statistics"}')
        assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "codex.poll"] == \
            ["stats source crs", "stats source crs"]
        asked = len(crs.seen)
        # 23:59:30 there, and 00:00:30 after a call of the new day: within 120 s of CRS's midnight,
        # no capture and no request.
        assert poll(at(23, 15, 59, 30)).skipped.startswith("within 120 s of the provider's midnight")
        clock.now = at(23, 16, 0, 30)
        crs.record(key, codex, input_tokens=7, output_tokens=2, real_cost=0.0625, rated_cost=0.125)
        assert poll(at(23, 16, 0, 30)).describe() == ("crs: skipped: within 120 s of the provider's midnight, "
                                                       "whose day the answer may not match")
        assert len(crs.seen) == asked
        # 00:02:30 there: the new day starts from zero.
        assert poll(at(23, 16, 2, 30)).ingest.delta == Delta(1, 1, 0, 9, 0.0625, 0.125)

    d1, d2 = "2026-11-23", "2026-11-24"
    assert snapshot_rows(engine) == [
        ("crs", "daily", d1, epoch(at(23, 1)), None, 0, 0, 0, 0, 0, 0.0, None),
        ("crs", "daily", d1, epoch(at(23, 2)), None, 2, 300, 30, 150, 480, 0.75, 1.5),
        ("crs", "daily", d1, epoch(at(23, 2)), codex, 2, 300, 30, 150, 480, 0.75, 1.5),
        ("crs", "daily", d1, epoch(at(23, 3)), None, 3, 320, 34, 150, 514, 0.875, 1.75),
        ("crs", "daily", d1, epoch(at(23, 3)), sonnet, 1, 20, 4, 0, 34, 0.125, 0.25),
        ("crs", "daily", d1, epoch(at(23, 3)), codex, 2, 300, 30, 150, 480, 0.75, 1.5),
        ("crs", "daily", d2, epoch(at(23, 16, 2, 30)), None, 1, 7, 2, 0, 9, 0.0625, 0.125),
        ("crs", "daily", d2, epoch(at(23, 16, 2, 30)), codex, 1, 7, 2, 0, 9, 0.0625, 0.125),
    ]
    assert [d[2:] for d in delta_rows(engine)] == [
        (d1, epoch(at(23, 2)), 2, 2, 0, 480, 0.75, 1.5),
        (d1, epoch(at(23, 3)), 1, 1, 0, 34, 0.125, 0.25),
        (d2, epoch(at(23, 16, 2, 30)), 1, 1, 0, 9, 0.0625, 0.125),
    ]
    # Every poll asked CRS as it must be asked: POST, the key's id, the daily period.
    assert {(r.method, r.headers["content-type"], r.body) for r in crs.seen} == {
        ("POST", "application/json", json.dumps({"apiId": key.id, "period": "daily"}).encode())}


def test_a_poller_clock_ahead_of_crs_does_not_count_the_old_day_again(engine):
    crs_clock = Clock(at(23, 15, 59, 55))  # 23:59:55 at CRS
    with FakeStats(clock=crs_clock) as crs:
        key = crs.add_key()
        crs.record(key, "gpt-5-codex", input_tokens=100, output_tokens=10, real_cost=0.25)
        ahead = lambda: crs_clock.now + dt.timedelta(seconds=10)  # noqa: E731 - 00:00:05 the next day for us
        sources = [source_from_mapping({"name": name, "url": crs.url, "api_id": key.id, "midnight_margin": margin},
                                       "test") for name, margin in (("no-margin", 0), ("crs", 120))]
        results = Poller(engine, sources, clock=ahead).poll_once()
    # Without a margin the old day's totals are stored as the new day's (and counted again).
    assert [(d[0], d[2], d[4]) for d in delta_rows(engine)] == [("no-margin", "2026-11-24", 1)]
    assert results[1].skipped and {r[0] for r in snapshot_rows(engine)} == {"no-margin"}


def test_crs_errors_reach_the_poll_result(engine):
    with FakeStats() as crs:
        crs.add_key("off", active=False)
        noon = Clock(at(23, 12))  # far from the provider's midnight, where no poll asks (whatever the hour now)
        (unknown,) = Poller(engine, [crs_source(crs)], clock=noon).poll_once()
        off = next(iter(crs.keys.values()))
        (disabled,) = Poller(engine, [crs_source(crs, off)], clock=noon).poll_once()
    assert unknown.error == ('HTTP 404 Not Found: {"error": "API key not found", '
                             '"message": "The specified API key does not exist"}')
    assert disabled.error.startswith('HTTP 403 Forbidden: {"error": "API key is disabled"')
    assert snapshot_rows(engine) == []


def test_the_fake_answers_as_crs_does():
    """The fake itself: what CRS's route does with other methods, bodies, periods and keys."""
    with FakeStats() as crs:
        key = crs.add_key()
        crs.record(key, "llama3:latest", input_tokens=10, output_tokens=5)

        def ask(method: str, body: dict | None) -> tuple[int, str]:
            request = urllib.request.Request(crs.url, data=None if body is None else json.dumps(body).encode(),
                                             method=method, headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, text = ask("GET", None)
        assert status == 404 and "Cannot GET /apiStats/api/user-model-stats" in text
        assert ask("POST", {"apiId": "k-1", "period": "daily"}) == (400, json.dumps(
            {"error": "Invalid API ID format", "message": "API ID must be a valid UUID"}))
        assert ask("POST", {"period": "daily"})[0] == 400
        assert ask("POST", {"apiKey": "cr_wrong_key_123"})[0] == 401
        status, text = ask("POST", {"apiKey": key.secret})  # no period: CRS answers the month
        answer = json.loads(text)
        assert (status, answer["success"], answer["period"]) == (200, True, "monthly")
        (item,) = answer["data"]
        assert set(item) == {"model", "requests", "inputTokens", "outputTokens", "cacheCreateTokens",
                             "cacheReadTokens", "allTokens", "costs", "formatted", "pricing", "isLegacy"}
        assert set(item["costs"]) == {"input", "output", "cacheCreate", "cacheWrite", "cacheRead", "ephemeral5m",
                                      "ephemeral1h", "total"}
        assert (item["model"], item["allTokens"], item["isLegacy"]) == ("llama3", 15, True)


def test_one_failing_source_does_not_stop_the_others(engine, stats):
    down = SourceConfig(name="down", url="http://127.0.0.1:9/nothing", timeout=2, method="POST")
    stats.queue(200, crs_response(crs_item("gpt-5-codex", 1, 1, 1)))
    results = Poller(engine, [down, crs_source(stats)], clock=Clock(at(23, 6))).poll_once()
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
    p.write_text(f'[[sources]]\nname = "crs"\nurl = "{url}"\napi_id = "{KEY_ID}"\n{extra}')
    return str(p)


def test_command_polls_once(engine, stats, tmp_path, capsys):
    # The command polls now: a provider whose midnight is twelve hours away, so that no hour of the day the
    # suite runs at falls in the margin where no poll asks.
    offset = 12 - utcnow().hour
    zone = f'timezone = "{"+" if offset >= 0 else "-"}{abs(offset):02d}:00"\n'
    stats.queue(200, crs_response(crs_item("gpt-5-codex", 2, 10, 1, cost=0.5)))
    url = engine.url.render_as_string(hide_password=False)
    assert main(["--db", url, "--sources", write_sources(tmp_path, stats.url, zone)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("crs: captured at ") and "delta +2 requests, +11 tokens, +$0.500000" in out
    assert len(snapshot_rows(engine)) == 2

    stats.queue(500, "oops")
    assert main(["--db", url, "--sources", write_sources(tmp_path, stats.url, zone)]) == 1
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


def test_the_relays_providers_service_polls_the_configured_sources(engine, stats, tmp_path):
    from types import SimpleNamespace

    from addon.services.providers import Providers, provider_settings
    from addon.services.settings import SettingsError

    def settings(path: str):
        return provider_settings(SimpleNamespace(codex_stats_sources=path, codex_nodes=""))

    providers = Providers()
    providers.apply(settings(""), engine)
    assert providers.sources is None
    stats.queue(200, crs_response())
    path = write_sources(tmp_path, stats.url, "interval = 3600\n")
    providers.apply(settings(path), engine)
    first = providers._poller
    assert first is not None and first._thread.is_alive() and [s.name for s in providers.sources] == ["crs"]
    # A bad file is refused before the running poller is touched; a good one replaces it.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "x"\n')
    with pytest.raises(SettingsError, match="codex_stats_sources: .*url is required"):
        settings(str(bad))
    assert first._thread.is_alive()
    thread = first._thread
    providers.apply(settings(""), engine)  # sources unset: the old poller stops
    assert providers.sources is None
    assert not thread.is_alive()
