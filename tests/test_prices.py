"""Prices: genai-prices for public models (published prices, tiers, cache reads and writes), the local
table on top for private ones, lookup rules, and bad files."""

from __future__ import annotations

import json

import genai_prices
import pytest

from store.config import ConfigError
from store.prices import CostSplit, Price, PriceTable, load_prices
from store.records import Usage
from tests.support.relayharness import RelayHarness, in_loop, node

LOCAL = PriceTable({"my-model": Price(input=2.0, cached_input=0.5, cache_write=2.5, output=8.0)})
SHIPPED = load_prices()


@pytest.mark.parametrize("model, published", [
    # USD per 1M tokens as OpenAI and Anthropic publish them (input, cached input, cache write, output)
    ("gpt-5-codex", (1.25, 0.125, 1.25, 10.0)),
    ("gpt-5.1-codex", (1.25, 0.125, 1.25, 10.0)),
    ("claude-sonnet-4-5", (3.0, 0.30, 3.75, 15.0)),
])
def test_known_models_cost_their_published_prices(model, published):
    input_price, cached_price, write_price, output_price = published
    # 100,000 input of which 40,000 cached and 10,000 written to the cache; 5,000 output.
    cost = SHIPPED.cost(model, Usage(input_tokens=100_000, cached_tokens=40_000, cache_write_tokens=10_000,
                                     output_tokens=5_000))
    assert cost.cached == pytest.approx(40_000 * cached_price / 1e6)
    assert cost.cache_write == pytest.approx(10_000 * write_price / 1e6)
    assert cost.input == pytest.approx((50_000 * input_price + 10_000 * write_price) / 1e6)
    assert cost.output == pytest.approx(5_000 * output_price / 1e6)


@pytest.mark.parametrize("model, usage", [
    ("gpt-5-codex", Usage(input_tokens=1234, cached_tokens=1000, output_tokens=56)),
    ("claude-sonnet-4-5", Usage(input_tokens=250_000, cached_tokens=100_000, cache_write_tokens=20_000,
                                output_tokens=3_000)),  # past the 200k tier: every token at the tier price
    ("claude-sonnet-4-5-20250929", Usage(input_tokens=3000, cached_tokens=1000, cache_write_tokens=500,
                                         output_tokens=20)),
    ("gpt-5.5", Usage(input_tokens=300_000, cached_tokens=10_000, output_tokens=100)),
])
def test_total_is_what_genai_prices_charges(model, usage):
    expected = genai_prices.calc_price(genai_prices.Usage(
        input_tokens=usage.input_tokens, cache_read_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens, output_tokens=usage.output_tokens), model_ref=model)
    assert SHIPPED.cost(model, usage).total == pytest.approx(float(expected.total_price), rel=1e-12)


def test_local_table_overrides_and_prices_private_models():
    table = PriceTable({"gpt-5-codex": Price(input=1.0, cached_input=0.1, cache_write=1.0, output=2.0)})
    assert table.cost("gpt-5-codex", Usage(output_tokens=1_000_000)).total == 2.0  # not genai-prices' 10
    # 1,000,000 input: 200,000 cached, 100,000 written; 50,000 output (reasoning included)
    cost = LOCAL.cost("my-model", Usage(input_tokens=1_000_000, cached_tokens=200_000, cache_write_tokens=100_000,
                                        output_tokens=50_000, reasoning_tokens=20_000))
    assert cost == CostSplit(input=1.4 + 0.25, cached=0.1, output=0.4, cache_write=0.25)
    assert cost.total == pytest.approx(2.15, abs=1e-12)


def test_lookup_is_case_insensitive_and_drops_snapshot_dates():
    usage = Usage(input_tokens=1_000_000)
    assert LOCAL.cost("My-Model", usage).total == 2.0
    assert LOCAL.cost("my-model-2025-09-15", usage).total == 2.0
    assert SHIPPED.cost("gpt-5-codex-2025-09-15", usage).total == 1.25


@pytest.mark.parametrize("model", [None, "", "unpriced-model", "my-private-model-2"])
def test_unknown_model_has_no_cost(model):
    assert SHIPPED.cost(model, Usage(input_tokens=10)) is None


def test_zero_usage_costs_zero_and_cached_beyond_input_is_clamped():
    assert SHIPPED.cost("gpt-5-codex", Usage()).total == 0
    # A malformed usage (cached > input) must not make a negative input part.
    cost = LOCAL.cost("my-model", Usage(input_tokens=100, cached_tokens=300, cache_write_tokens=50))
    assert (cost.input, cost.cache_write) == (0, 0) and cost.cached == pytest.approx(100 * 0.5 / 1e6)


def test_shipped_table_prices_the_codex_family():
    for model in ("gpt-5-codex", "gpt-5.1-codex", "gpt-5.1-codex-mini", "gpt-5.1-codex-max", "gpt-5.2-codex",
                  "gpt-5.3-codex", "gpt-5", "gpt-5-mini", "codex-mini-latest"):
        assert SHIPPED.cost(model, Usage(input_tokens=1)) is not None, model


def test_edited_file_and_defaults(tmp_path):
    p = tmp_path / "prices.toml"
    p.write_text('[models."my-model"]\ninput = 2\noutput = 8\n')
    table = load_prices(p)
    # No cached_input or cache_write: those tokens cost the input price.
    assert table.cost("my-model", Usage(input_tokens=500_000, cached_tokens=250_000, cache_write_tokens=50_000,
                                        output_tokens=1)) == CostSplit(input=0.5, cached=0.5, output=8e-6,
                                                                       cache_write=0.1)
    (tmp_path / "empty.toml").write_text("# nothing of our own\n")
    assert load_prices(tmp_path / "empty.toml").cost("gpt-5-codex", Usage(output_tokens=1_000_000)).total == 10.0


@pytest.mark.parametrize("text, message", [
    ('[models."m"\n', "invalid TOML"),
    ('models = 3', "expected \\[models"),
    ('[models]\nm = 3', "models.'m': must be a table"),
    ('[models."m"]\ninput = 1', "input and output prices are required"),
    ('[models."m"]\ninput = 1\noutput = -2', "output must be a number >= 0"),
    ('[models."m"]\ninput = "1"\noutput = 2', "input must be a number >= 0"),
    ('[models."m"]\ninput = 1\noutput = 2\ncache = 1', "unknown keys \\['cache'\\]"),
])
def test_bad_files(tmp_path, text, message):
    p = tmp_path / "prices.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_prices(p)


def test_a_call_with_iterations_costs_each_at_its_own_models_price():
    table = PriceTable({"main": Price(input=1.0, cached_input=0.1, cache_write=1.25, output=5.0),
                        "advisor": Price(input=15.0, cached_input=1.5, cache_write=18.75, output=75.0)})
    main, advisor = Usage(input_tokens=56_000, cached_tokens=55_000, output_tokens=100), Usage(9_000, 0, 0, 400)
    split = table.call_cost("main", Usage(65_000, 55_000, 0, 500), [(None, main), ("advisor", advisor)])
    one, other = table.cost("main", main), table.cost("advisor", advisor)
    assert (split.input, split.cached, split.output, split.cache_write) == pytest.approx(
        (one.input + other.input, one.cached + other.cached, one.output + other.output, 0.0))
    assert split.total == pytest.approx((1_000 + 55_000 * 0.1 + 500 + 9_000 * 15 + 400 * 75) / 1e6)
    # Without iterations: the call's own price; an unpriced iteration leaves the call unpriced.
    assert table.call_cost("main", main) == table.cost("main", main)
    assert table.call_cost("main", main, [(None, main), ("nobody-prices-this", advisor)]) is None


@in_loop
async def test_the_relays_record_prices_iterations_and_keeps_the_cache_write_share(listening):
    """The record the relay submits for an Anthropic answer with an advisor iteration and cache writes."""
    table = PriceTable({"main": Price(input=1.0, cached_input=0.1, cache_write=1.25, output=5.0),
                        "advisor": Price(input=15.0, cached_input=1.5, cache_write=18.75, output=75.0)})
    usage = {"input_tokens": 100, "cache_creation_input_tokens": 4000, "cache_read_input_tokens": 0,
             "output_tokens": 50, "iterations": [
                 {"type": "message", "input_tokens": 100, "cache_creation_input_tokens": 4000, "output_tokens": 50},
                 {"type": "advisor_message", "model": "advisor", "input_tokens": 2000, "output_tokens": 300}]}
    body = json.dumps({"type": "message", "model": "main", "content": [], "usage": usage}).encode()
    async with RelayHarness(node("a", listening()), prices=table) as h:
        flow = await h.send("/v1/messages", {"model": "main", "max_tokens": 10, "messages": []})
        await h.answer(flow, 200, [body], headers={"content-type": "application/json"}, length=True)
    [r] = h.records()
    write = 4000 * 1.25 / 1e6
    assert r.cost_cache_write == pytest.approx(write)
    assert r.cost_input == pytest.approx(100 / 1e6 + write + 2000 * 15 / 1e6)
    assert r.cost == pytest.approx(r.cost_input + 50 * 5 / 1e6 + 300 * 75 / 1e6)
    assert json.loads(r.raw_response)["input_tokens"] == 100  # the top level stays recoverable
