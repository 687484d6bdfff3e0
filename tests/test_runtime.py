"""The runtime's services: their options parsed once (without mitmproxy) and checked before anything starts, the
configured nodes routed over, and ``done`` letting the relay record calls still in flight before the last flush,
in one loop that stops every service."""

from __future__ import annotations

import atexit
import datetime as dt
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.nodes.breaker import BreakerPolicy
from addon.serviceoptions import RuntimeOptions
from addon.services.clientkeys import ClientKeys, key_specs
from addon.services.fleet import fleet_settings
from addon.services.healthchecks import HealthSettings, health_settings
from addon.services.runtime import Runtime
from addon.services.settings import SettingsError
from addon.services.statsdb import db_settings
from store.masking import digest
from store.records import InvocationRecord
from store.write.process import WriterProcess
from store.write.writer import Writer
from tests.support.databases import at_head, rows

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"


@pytest.mark.parametrize(("options", "message"), [
    ({"codex_fail_threshold": -1}, "codex_fail_threshold must be >= 0"),
    ({"codex_ping_interval": "often"}, "codex_ping_interval must be a number of seconds"),
    ({"codex_connect_timeout": "0"}, "codex_connect_timeout must be > 0"),
    ({"codex_sticky_ttl": "-1"}, "codex_sticky_ttl must be >= 0"),
    ({"codex_cooldown": "60", "codex_cooldown_max": "30"}, "codex_cooldown_max must be >= codex_cooldown"),
    ({"codex_upstream": "ftp://relay.example/v1"}, "codex_upstream: "),
    ({"codex_nodes": "/nonexistent/nodes.toml"}, "codex_nodes: "),
    ({"codex_prices": "/nonexistent/prices.toml"}, "codex_prices: "),
    ({"codex_prune_days": -1}, "codex_prune_days must be >= 0"),
    ({"codex_client_keys": "alice="}, "codex_client_keys: entry 1: empty key"),
])
def test_bad_options_are_refused_with_their_name(options, message):
    runtime = Runtime()
    addon = RuntimeOptions(runtime)
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(addon, **options)
    assert runtime.engine is None  # rolled back: only a change of codex_db opens the database


HEALTH = dict(codex_fail_threshold=3, codex_cooldown="30", codex_cooldown_max="600", codex_connect_timeout="10",
              codex_ping_interval="30", codex_ping_path="/models")


def test_settings_are_parsed_once_into_frozen_objects_without_mitmproxy():
    settings = health_settings(SimpleNamespace(**{**HEALTH, "codex_cooldown": "45"}))
    assert settings == HealthSettings(BreakerPolicy(3, 45.0, 600.0), 10.0, 30.0, "/models")
    with pytest.raises(AttributeError):
        settings.connect_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(SettingsError, match=r"codex_cooldown_max must be >= codex_cooldown \(45\)"):
        health_settings(SimpleNamespace(**{**HEALTH, "codex_cooldown": "45", "codex_cooldown_max": "44"}))
    fleet = fleet_settings(SimpleNamespace(codex_nodes="", codex_upstream="http://127.0.0.1:9/v1",
                                           codex_upstream_key=UPSTREAM_KEY, codex_upstream_name="",
                                           codex_sticky_ttl="0",
                                           codex_node_sync="1"))
    assert [(n.id, n.name, n.api_key) for n in fleet.nodes] == [("default", "default", UPSTREAM_KEY)]
    db = db_settings(SimpleNamespace(codex_db="sqlite://", codex_spool="", codex_writer_process=False,
                                     codex_prune_days=2), 8080)
    assert (db.url, db.prune_days, db.listen_port) == ("sqlite://", 2, 8080)


def test_client_keys_have_one_holder_of_specs_digests_and_names():
    keys = ClientKeys()
    assert not keys.enabled and keys.find(["ck-alice-0123456789"]) is None
    keys.apply(key_specs("alice=ck-alice-0123456789, ck-bare-0123456789", known_nodes=()))
    assert keys.enabled and set(keys.specs) == {"alice", "key-" + digest("ck-bare-0123456789").hex()[:8]}
    assert keys.digests == {digest("ck-alice-0123456789"), digest("ck-bare-0123456789")}
    assert keys.find(["nope-0123456789", "ck-alice-0123456789"]) == "alice"
    assert keys.name_of(" ck-alice-0123456789 ") == "alice" and keys.name_of("ck-alice-\x00") is None
    assert keys.spec("alice").key_digest == digest("ck-alice-0123456789")
    keys.apply(())  # the option emptied: no client auth
    assert not keys.enabled and keys.digests == frozenset()


def test_without_a_database_nothing_is_open():
    runtime = Runtime()
    assert (runtime.engine, runtime.db.writer_stats(), runtime.providers.sources, runtime.providers.last_polls()) == \
        (None, None, None, [])
    runtime.stop()  # nothing to stop


def test_one_upstream_routes_and_its_key_is_known(tmp_path):
    runtime = Runtime()
    addon = RuntimeOptions(runtime)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_db=f"sqlite:///{tmp_path / 'codex.db'}", codex_ping_interval="0")
        assert len(runtime.pool) == 0  # monitor mode
        tctx.configure(addon, codex_upstream="http://127.0.0.1:9/v1", codex_upstream_key=UPSTREAM_KEY)
        try:
            assert [n.id for n in runtime.pool] == ["default"]
            assert UPSTREAM_KEY not in runtime.secrets.scrub(f"echoed {UPSTREAM_KEY}")
        finally:
            addon.done()


@pytest.mark.parametrize("process", [True, False], ids=["writer process", "writer thread"])
def test_done_runs_shutdown_callbacks_before_the_last_flush(db_url, tmp_path, process):
    runtime = Runtime()
    addon = RuntimeOptions(runtime)
    record = InvocationRecord(invoke_id="in-flight", occurred_at=dt.datetime(2026, 11, 25, 12), source="relay",
                              endpoint="/v1/responses", status="aborted")
    runtime.on_shutdown(lambda: runtime.submit(record))
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_db=at_head(db_url), codex_spool=str(tmp_path / "spool.db"), codex_ping_interval="0",
                       codex_writer_process=process)
        assert isinstance(runtime.db._writer, WriterProcess if process else Writer)
        addon.done()
    assert [r.status for r in rows(db_url, "SELECT status FROM codex_invocations WHERE invoke_id = 'in-flight'")] \
        == ["aborted"]
    assert runtime.db.writer_stats() is None  # closed: a later record is dropped, not queued forever


def test_a_failed_start_stops_every_service_at_exit(monkeypatch):
    """mitmproxy ends a start whose configuration failed before any ``done``: the services stop at exit."""
    registered: list = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", registered.remove)
    runtime = Runtime()
    addon = RuntimeOptions(runtime)
    with taddons.context(addon):
        assert registered == [runtime.stop]
        addon.done()
    assert registered == []
