"""Stats source formats (crs, generic) and the [[sources]] config."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from store.config import ConfigError
from store.sources import ModelStats, SourceConfig, SourceFormatError, load_sources_file

NOON = dt.datetime(2026, 11, 23, 12, 0, 0, 987_000)


def crs_item(model: str, requests: int, inp: int, out: int, cache_read: int = 0, cache_create: int = 0,
             cost: float = 0.0) -> dict:
    return {"model": model, "requests": requests, "inputTokens": inp, "outputTokens": out,
            "cacheCreateTokens": cache_create, "cacheReadTokens": cache_read,
            "allTokens": inp + out + cache_read + cache_create,
            "costs": {"input": cost / 2, "output": cost / 2, "cacheWrite": 0, "cacheRead": 0, "total": cost},
            "formatted": {"total": f"${cost:.2f}"}, "pricing": {"input": 1.25}}


def crs_body(*items: dict) -> str:
    return json.dumps({"success": True, "data": list(items), "period": "daily"})


CRS = SourceConfig(name="crs", url="http://127.0.0.1:1/apiStats/api/user-model-stats")


def test_crs_response():
    cap = CRS.capture(crs_body(crs_item("gpt-5-codex", 3, 100, 40, cache_read=500, cost=0.25),
                               crs_item("gpt-5", 1, 10, 4, cost=0.5)), NOON)
    assert (cap.source, cap.period, cap.stats_date) == ("crs", "daily", "2026-11-23")
    assert cap.captured_at == dt.datetime(2026, 11, 23, 12, 0, 0)  # whole seconds, as the epoch
    assert cap.captured_at_epoch == int(dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC).timestamp())
    assert [m.model for m in cap.models] == ["gpt-5", "gpt-5-codex"]
    codex = cap.models[1]
    assert (codex.requests, codex.input_tokens, codex.output_tokens, codex.cache_read_tokens,
            codex.all_tokens, codex.cost_input, codex.cost_total) == (3, 100, 40, 500, 640, 0.125, 0.25)
    assert json.loads(codex.raw)["model"] == "gpt-5-codex"
    total = cap.total
    assert total.model is None
    assert (total.requests, total.all_tokens, total.cost_total) == (4, 654, 0.75)
    assert total.raw == cap.raw_response


def test_crs_missing_counters_are_zero_and_totals_derived():
    cap = CRS.capture(json.dumps({"success": True, "data": [
        {"model": "m", "requests": 2, "inputTokens": 7, "outputTokens": 3, "costs": {"input": 0.1, "output": 0.2}}]}),
        NOON)
    m = cap.models[0]
    assert (m.cache_read_tokens, m.all_tokens) == (0, 10)
    assert m.cost_total == pytest.approx(0.3)


def test_crs_empty_day_and_repeated_model():
    assert CRS.capture(crs_body(), NOON).models == []
    assert CRS.capture(crs_body(), NOON).total == ModelStats(model=None, raw=crs_body())
    cap = CRS.capture(crs_body(crs_item("m", 1, 10, 1), crs_item("m", 2, 20, 2)), NOON)
    assert [(m.model, m.requests, m.input_tokens) for m in cap.models] == [("m", 3, 30)]


@pytest.mark.parametrize("body, message", [
    ("<html>busy</html>", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"success": false, "message": "API key not found"}', "API key not found"),
    ('{"success": true, "data": {"m": 1}}', "'data' must be a list"),
    ('{"success": true, "data": [{"requests": 1}]}', r"data\[0\]: expected an object with a model name"),
    ('{"success": true, "data": [{"model": "m", "requests": -1}]}', "non-negative number"),
    ('{"success": true, "data": [{"model": "m", "requests": "3"}]}', r"data\[0\] \(m\).requests"),
    ('{"success": true, "data": [{"model": "m", "requests": 1.5}]}', "whole number"),
    ('{"success": true, "data": [{"model": "m", "requests": true}]}', "non-negative number"),
    ('{"success": true, "data": [{"model": "m", "costs": [1]}]}', "costs: expected an object"),
    ('{"success": true, "data": [{"model": "m", "costs": {"total": NaN}}]}', "costs.total"),
])
def test_crs_malformed(body, message):
    with pytest.raises(SourceFormatError, match=message):
        CRS.capture(body, NOON)


def test_stats_date_follows_the_providers_clock():
    east = SourceConfig(name="e", url="http://x/", utc_offset=dt.timedelta(hours=8))
    west = SourceConfig(name="w", url="http://x/", utc_offset=dt.timedelta(hours=-5))
    late = dt.datetime(2026, 11, 23, 20, 30)
    assert east.stats_date(late) == "2026-11-24"
    assert west.stats_date(dt.datetime(2026, 11, 23, 3, 0)) == "2026-11-22"
    assert east.day_window(dt.date(2026, 11, 24)) == (dt.datetime(2026, 11, 23, 16), dt.datetime(2026, 11, 24, 16))
    monthly = SourceConfig(name="m", url="http://x/", period="monthly")
    assert monthly.capture(crs_body(), late).stats_date == "2026-11"


GENERIC_FIELDS = {"items": "result.0.models", "model": "id", "requests": "n", "input_tokens": "tokens.in",
                  "output_tokens": "tokens.out", "cache_read_tokens": "tokens.cached", "cost_total": "usd",
                  "date": "result.0.day", "input_includes_cache": True}


def test_generic_list_with_paths():
    src = SourceConfig(name="g", url="http://x/", format="generic", fields=GENERIC_FIELDS)
    body = {"result": [{"day": "2026-11-22", "models": [
        {"id": "gpt-5-codex", "n": 4, "tokens": {"in": 1000, "out": 50, "cached": 600}, "usd": 0.1},
        {"id": "gpt-5", "n": 1, "tokens": {"in": 10, "out": 5, "cached": 0}, "usd": 0.01}]}]}
    cap = src.capture(json.dumps(body), NOON)
    assert cap.stats_date == "2026-11-22"  # the response's own date wins over the capture time
    codex = next(m for m in cap.models if m.model == "gpt-5-codex")
    # OpenAI-style input (1000 incl. 600 cached) is stored without the cache: 400.
    assert (codex.requests, codex.input_tokens, codex.cache_read_tokens, codex.output_tokens,
            codex.all_tokens, codex.cost_total) == (4, 400, 600, 50, 1050, 0.1)


def test_generic_object_keyed_by_model():
    src = SourceConfig(name="g", url="http://x/", format="generic",
                       fields={"items": "usage", "requests": "count", "all_tokens": "tokens"})
    cap = src.capture('{"usage": {"b": {"count": 2, "tokens": 30}, "a": {"count": 1, "tokens": 5}}}', NOON)
    assert [(m.model, m.requests, m.all_tokens) for m in cap.models] == [("a", 1, 5), ("b", 2, 30)]
    assert cap.stats_date == "2026-11-23"


@pytest.mark.parametrize("fields, body, message", [
    (GENERIC_FIELDS, '{"result": []}', "response: no field 'result.0.models'"),
    (GENERIC_FIELDS, '{"result": [{"models": [{"n": 1}]}]}', "item 0: no field 'id'"),
    (GENERIC_FIELDS, '{"result": [{"models": [{"id": 3}]}]}', "model name must be a non-empty string"),
    (GENERIC_FIELDS, '{"result": [{"models": [{"id": "m", "n": 1, "tokens": {"in": 1, "out": 0, "cached": 5},'
                     ' "usd": 0}], "day": "2026-11-22"}]}', "fewer than its cached"),
    (GENERIC_FIELDS, '{"result": [{"models": [], "day": 20261122}]}', "must be a string"),
    (GENERIC_FIELDS, '{"result": [{"models": [], "day": "22.11.2026"}]}', "does not fit period 'daily'"),
    ({"items": "m", "requests": "n"}, '{"m": [{"n": 1}]}', "must be a list \\(with a model path\\)"),
])
def test_generic_malformed(fields, body, message):
    src = SourceConfig(name="g", url="http://x/", format="generic", fields=fields)
    with pytest.raises(SourceFormatError, match=message):
        src.capture(body, NOON)


# -- config file -----------------------------------------------------------------------------------
def write(tmp_path, text: str):
    p = tmp_path / "sources.toml"
    p.write_text(text)
    return p


def test_loads_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("CRS_TOKEN", "Bearer secret")
    p = write(tmp_path, """
[[nodes]]
id = "alpha"
base_url = "https://alpha/v1"

[[sources]]
name = "crs-main"
url = "https://crs.example/apiStats/api/user-model-stats"
body = { apiId = "k-1", period = "daily" }
auth_env = "CRS_TOKEN"
interval = 15
utc_offset = "+08:00"
nodes = ["alpha", "beta"]

[[sources]]
name = "acme"
url = "http://127.0.0.1:9/usage"
format = "generic"
auth_header = "x-api-key"
auth_value = "k"
period = "monthly"
[sources.fields]
items = "models"
model = "name"
requests = "calls"
""")
    crs, acme = load_sources_file(p)
    assert (crs.name, crs.format, crs.method, crs.body, crs.interval, crs.timeout, crs.period) == \
        ("crs-main", "crs", "POST", {"apiId": "k-1", "period": "daily"}, 15.0, 10.0, "daily")
    assert crs.headers == {"Authorization": "Bearer secret"} and "secret" not in repr(crs)
    assert crs.nodes == ("alpha", "beta") and crs.utc_offset == dt.timedelta(hours=8)
    assert (acme.method, acme.headers, acme.period, acme.fields["requests"], acme.nodes) == \
        ("GET", {"x-api-key": "k"}, "monthly", "calls", ())
    assert acme.utc_offset == dt.timedelta(0)


def test_no_sources_key_means_none(tmp_path):
    assert load_sources_file(write(tmp_path, '[[nodes]]\nid = "a"\nbase_url = "https://a/v1"\n')) == []


OK = 'name = "s"\nurl = "https://s/x"\n'


@pytest.mark.parametrize("text, message", [
    ("[[sources]\n", "invalid TOML"),
    ('sources = "x"', "array of tables"),
    ('[[sources]]\nurl = "https://s"', r"sources\[0\]: name must be"),
    ('[[sources]]\nname = "a b"\nurl = "https://s"', "name must be"),
    ('[[sources]]\nname = "s"', r"sources\[0\] \(s\): url is required"),
    ('[[sources]]\nname = "s"\nurl = "s.example"', "url: base_url must start with http"),
    (f"[[sources]]\n{OK}format = 'csv'", "format must be one of \\['crs', 'generic'\\]"),
    (f"[[sources]]\n{OK}fields = {{items = 'x'}}", "fields: the crs format takes no field mapping"),
    (f"[[sources]]\n{OK}format = 'generic'", "fields: items is required"),
    (f"[[sources]]\n{OK}format = 'generic'\nfields = {{items = 'x', requests = 1}}", "requests must be a field path"),
    (f"[[sources]]\n{OK}format = 'generic'\nfields = {{items = 'x', requests = 'n', cost = 'c'}}",
     r"unknown keys \['cost'\]"),
    (f"[[sources]]\n{OK}format = 'generic'\nfields = {{items = 'x', requests = 'n', input_includes_cache = 1}}",
     "input_includes_cache must be true or false"),
    (f"[[sources]]\n{OK}period = 'hourly'", "period must be one of"),
    (f"[[sources]]\n{OK}interval = 0", "interval must be a number of seconds >= 1"),
    (f"[[sources]]\n{OK}timeout = 'x'", "timeout must be a number"),
    (f"[[sources]]\n{OK}method = 'PUT'", "method must be GET or POST"),
    (f"[[sources]]\n{OK}method = 'GET'\nbody = {{a = 1}}", "a body needs method"),
    (f"[[sources]]\n{OK}auth_value = 'a'\nauth_env = 'B'", "not both"),
    (f"[[sources]]\n{OK}auth_env = 'CODEX_TEST_SURELY_UNSET'", "'CODEX_TEST_SURELY_UNSET', which is not set"),
    (f"[[sources]]\n{OK}nodes = 'alpha'", "nodes must be a list of node ids"),
    (f"[[sources]]\n{OK}utc_offset = 8", "utc_offset must look like"),
    (f"[[sources]]\n{OK}utc_offset = '+25:00'", "utc_offset must look like"),
    (f"[[sources]]\n{OK}intervall = 5", r"unknown keys \['intervall'\]"),
    (f"[[sources]]\n{OK}[[sources]]\n{OK}", r"sources\[1\]: duplicate name 's'"),
])
def test_bad_files_give_clear_errors(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_sources_file(p)
    assert str(e.value).startswith(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_sources_file(tmp_path / "nope.toml")


def test_shipped_example_loads_and_parses_its_sample(monkeypatch):
    monkeypatch.setenv("ACME_USAGE_KEY", "k")
    crs, acme = load_sources_file(Path(__file__).parent.parent / "store" / "sources.toml.example")
    assert (crs.name, crs.method, crs.nodes, acme.name, acme.headers) == \
        ("crs-main", "POST", ("alpha", "beta"), "acme", {"x-api-key": "k"})
    sample = {"date": "2026-11-23", "models": [{"name": "gpt-5-codex", "calls": 12, "tokens": {
        "input": 45000, "cached": 30000, "output": 3000}, "usd": 0.091}]}
    (m,) = acme.capture(json.dumps(sample), NOON).models
    assert (m.requests, m.input_tokens, m.cache_read_tokens, m.output_tokens, m.all_tokens, m.cost_total) == \
        (12, 15000, 30000, 3000, 48000, 0.091)
