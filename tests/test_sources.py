"""Stats source formats (crs, generic) and the [[sources]] config."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from store.config import ConfigError
from store.sources import ModelStats, SourceConfig, SourceFormatError, load_sources_file, source_from_mapping
from store.sources.crs import normalize_model
from tests.support.fakestats import crs_item, crs_response

NOON = dt.datetime(2026, 11, 23, 12, 0, 0, 987_000)
KEY_ID = "3f2b8c1e-9a4d-4e7b-8c2f-1d5e6a7b8c9d"


def crs_body(*items: dict, period: str = "daily") -> str:
    return json.dumps(crs_response(*items, period=period))


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


def test_crs_rated_cost_is_kept_beside_the_real_one():
    cap = CRS.capture(crs_body(crs_item("a", 1, 10, 1, cost=0.2, rated=0.3),
                               crs_item("b", 1, 10, 1, cost=0.1, rated=0.15)), NOON)
    assert [(m.cost_total, m.cost_rated) for m in cap.models] == [(0.2, 0.3), (0.1, 0.15)]
    assert cap.total.cost_rated == pytest.approx(0.45)
    # A legacy item (CRS stored no per-call cost) has no rated cost, so neither has the day's total.
    legacy = CRS.capture(crs_body(crs_item("a", 1, 10, 1, cost=0.2, rated=0.3), crs_item("b", 1, 10, 1)), NOON)
    assert [m.cost_rated for m in legacy.models] == [0.3, None] and legacy.total.cost_rated is None


def test_crs_reported_zero_total_stays_zero():
    # CRS stored the calls' real cost as 0 (a free key): total = real = 0, though the parts are priced.
    item = crs_item("m", 2, 1000, 100, cost=0.4, rated=0.0)
    item["costs"] |= {"total": 0, "real": 0}
    (m,) = CRS.capture(crs_body(item), NOON).models
    assert (m.cost_input, m.cost_output, m.cost_total, m.cost_rated) == (0.2, 0.2, 0.0, 0.0)


@pytest.mark.parametrize("period", ["monthly", "alltime", None])
def test_crs_answer_for_another_period_is_refused(period):
    body = crs_response(crs_item("m", 1, 10, 1), period=period)
    with pytest.raises(SourceFormatError, match="not the daily one asked for"):
        CRS.capture(json.dumps(body), NOON)


@pytest.mark.parametrize("name, stored", [
    ("gpt-5-codex", "gpt-5-codex"),
    ("llama3.1:latest", "llama3.1"),
    ("my-model-v2:1", "my-model"),
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
    ("anthropic.claude-3-haiku-20240307-v1:0", "claude-3-haiku-20240307"),
    ("eu-west-1.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1-20250805"),
])
def test_model_names_normalised_as_crs_stores_them(name, stored):
    assert normalize_model(name) == stored


def test_crs_missing_counters_are_zero_and_totals_derived():
    cap = CRS.capture(json.dumps({"success": True, "period": "daily", "data": [
        {"model": "m", "requests": 2, "inputTokens": 7, "outputTokens": 3, "costs": {"input": 0.1, "output": 0.2}}]}),
        NOON)
    m = cap.models[0]
    assert (m.cache_read_tokens, m.all_tokens) == (0, 10)
    assert m.cost_total == pytest.approx(0.3)


def test_crs_empty_day_and_repeated_model():
    assert CRS.capture(crs_body(), NOON).models == []
    assert CRS.capture(crs_body(), NOON).total == ModelStats(model=None, raw=crs_body())  # rated unknown
    cap = CRS.capture(crs_body(crs_item("m", 1, 10, 1), crs_item("m", 2, 20, 2)), NOON)
    assert [(m.model, m.requests, m.input_tokens) for m in cap.models] == [("m", 3, 30)]


@pytest.mark.parametrize("body, message", [
    ("<html>busy</html>", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"error": "API key not found", "message": "The specified API key does not exist"}',
     "The specified API key does not exist"),
    ('{"success": true, "period": "daily", "data": {"m": 1}}', "'data' must be a list"),
    ('{"success": true, "period": "daily", "data": [{"requests": 1}]}',
     r"data\[0\]: expected an object with a model name"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "requests": -1}]}', "non-negative number"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "requests": "3"}]}', r"data\[0\] \(m\).requests"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "requests": 1.5}]}', "whole number"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "requests": true}]}', "non-negative number"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "costs": [1]}]}', "costs: expected an object"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "costs": {"total": NaN}}]}', "costs.total"),
    ('{"success": true, "period": "daily", "data": [{"model": "m", "costs": {"rated": -1}}]}', "costs.rated"),
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
    monthly = SourceConfig(name="m", url="http://x/", format="generic", period="monthly",
                           fields={"items": "data", "model": "model", "requests": "requests"})
    assert monthly.capture(crs_body(), late).stats_date == "2026-11"


@pytest.mark.parametrize("at, near", [
    (dt.datetime(2026, 11, 23, 16, 0, 0), True),  # 00:00:00 at +08:00
    (dt.datetime(2026, 11, 23, 15, 58, 1), True),  # 119 s before
    (dt.datetime(2026, 11, 23, 15, 58, 0), False),  # 120 s before
    (dt.datetime(2026, 11, 23, 16, 1, 59), True),
    (dt.datetime(2026, 11, 23, 16, 2, 0), False),
    (dt.datetime(2026, 11, 23, 0, 0, 30), False),  # UTC midnight is 08:00 there
])
def test_near_the_providers_midnight(at, near):
    crs = source_from_mapping({"name": "c", "url": "https://crs/x", "api_id": KEY_ID}, "s")
    assert crs.near_midnight(at) is near
    assert source_from_mapping({"name": "c", "url": "https://crs/x", "api_id": KEY_ID, "midnight_margin": 0},
                               "s").near_midnight(at) is False


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
api_id = "3F2B8C1E-9A4D-4E7B-8C2F-1D5E6A7B8C9D"
auth_env = "CRS_TOKEN"
interval = 15
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
        ("crs-main", "crs", "POST", {"apiId": "3F2B8C1E-9A4D-4E7B-8C2F-1D5E6A7B8C9D", "period": "daily"}, 15.0,
         10.0, "daily")
    assert crs.headers == {"Authorization": "Bearer secret"} and "secret" not in repr(crs)
    assert crs.nodes == ("alpha", "beta") and crs.utc_offset == dt.timedelta(hours=8)
    assert crs.midnight_margin == 120
    assert (acme.method, acme.headers, acme.period, acme.fields["requests"], acme.nodes) == \
        ("GET", {"x-api-key": "k"}, "monthly", "calls", ())
    assert acme.utc_offset == dt.timedelta(0)


def test_minimal_crs_source_is_what_crs_answers(tmp_path):
    (crs,) = load_sources_file(write(tmp_path, f"""[[sources]]
name = "crs"
format = "crs"
url = "https://crs.example/apiStats/api/user-model-stats"
api_id = "{KEY_ID}"
"""))
    assert (crs.method, crs.body, crs.period, crs.utc_offset, crs.midnight_margin) == (
        "POST", {"apiId": KEY_ID, "period": "daily"}, "daily", dt.timedelta(hours=8), 120.0)
    (by_key,) = load_sources_file(write(tmp_path, '[[sources]]\nname = "c"\nurl = "https://c/x"\n'
                                                  'api_key = "cr_0123456789abcdef"\ntimezone = "-05:00"\n'))
    assert (by_key.body, by_key.utc_offset) == ({"apiKey": "cr_0123456789abcdef", "period": "daily"},
                                                dt.timedelta(hours=-5))
    assert "cr_0123456789abcdef" not in repr(by_key)


def test_no_sources_key_means_none(tmp_path):
    assert load_sources_file(write(tmp_path, '[[nodes]]\nid = "a"\nbase_url = "https://a/v1"\n')) == []


OK = f'name = "s"\nurl = "https://s/x"\napi_id = "{KEY_ID}"\n'
GENERIC = 'name = "s"\nurl = "https://s/x"\nformat = "generic"\nfields = {items = "x", requests = "n"}\n'


@pytest.mark.parametrize("text, message", [
    ("[[sources]\n", "invalid TOML"),
    ('sources = "x"', "array of tables"),
    ('[[sources]]\nurl = "https://s"', r"sources\[0\]: name must be"),
    ('[[sources]]\nname = "a b"\nurl = "https://s"', "name must be"),
    ('[[sources]]\nname = "s"', r"sources\[0\] \(s\): url is required"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"', "give api_id .* or api_key, one of them"),
    (f'[[sources]]\n{OK}api_key = "cr_0123456789"', "give api_id .* or api_key, one of them"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\napi_id = "k-1"', "api_id must be a UUID"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\napi_id = 7', "api_id must be a UUID"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\napi_key = "short"', "api_key must be the key itself"),
    (f"[[sources]]\n{OK}body = {{apiId = 'k'}}", "builds its own request: give api_id .*, not body"),
    (f"[[sources]]\n{OK}method = 'GET'", "builds its own request: give api_id .*, not method"),
    (f"[[sources]]\n{OK}period = 'monthly'", "the crs format asks for the daily period"),
    (f"[[sources]]\n{GENERIC}api_id = '{KEY_ID}'", r"unknown keys \['api_id'\]"),
    ('[[sources]]\nname = "s"\nurl = "s.example"', "url: base_url must start with http"),
    (f"[[sources]]\n{OK}format = 'csv'", "format must be one of \\['crs', 'generic'\\]"),
    (f"[[sources]]\n{OK}fields = {{items = 'x'}}", "fields: the crs format takes no field mapping"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\nformat = "generic"', "fields: items is required"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\nformat = "generic"\nfields = {items = "x", requests = 1}',
     "requests must be a field path"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\nformat = "generic"\n'
     'fields = {items = "x", requests = "n", cost = "c"}', r"unknown keys \['cost'\]"),
    ('[[sources]]\nname = "s"\nurl = "https://s/x"\nformat = "generic"\n'
     'fields = {items = "x", requests = "n", input_includes_cache = 1}', "input_includes_cache must be true or false"),
    (f"[[sources]]\n{GENERIC}period = 'hourly'", "period must be one of"),
    (f"[[sources]]\n{OK}interval = 0", "interval must be a number of seconds >= 1"),
    (f"[[sources]]\n{OK}timeout = 'x'", "timeout must be a number"),
    (f"[[sources]]\n{GENERIC}method = 'PUT'", "method must be GET or POST"),
    (f"[[sources]]\n{GENERIC}method = 'GET'\nbody = {{a = 1}}", "a body needs method"),
    (f"[[sources]]\n{OK}auth_value = 'a'\nauth_env = 'B'", "not both"),
    (f"[[sources]]\n{OK}auth_env = 'CODEX_TEST_SURELY_UNSET'", "'CODEX_TEST_SURELY_UNSET', which is not set"),
    (f"[[sources]]\n{OK}nodes = 'alpha'", "nodes must be a list of node ids"),
    (f"[[sources]]\n{OK}timezone = 8", "timezone must look like"),
    (f"[[sources]]\n{OK}timezone = '+25:00'", "timezone must look like"),
    (f"[[sources]]\n{OK}utc_offset = '+08:00'", "utc_offset is now called timezone"),
    (f"[[sources]]\n{OK}midnight_margin = -1", "midnight_margin must be a number of seconds from 0 to 3600"),
    (f"[[sources]]\n{OK}midnight_margin = 'x'", "midnight_margin must be"),
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
