"""Price table: hand-computed costs, lookup rules, the shipped table, and bad files."""

from __future__ import annotations

import pytest

from store.config import ConfigError
from store.prices import CostSplit, Price, PriceTable, load_prices
from store.records import Usage

TABLE = PriceTable({"gpt-5-codex": Price(input=1.25, cached_input=0.125, output=10.0),
                    "codex-mini-latest": Price(input=1.5, cached_input=0.375, output=6.0)})


def test_split_by_input_cached_output():
    # 1,000,000 input of which 200,000 cached, 50,000 output (20,000 of them reasoning):
    # 800,000 x 1.25 / 1M = 1.00; 200,000 x 0.125 / 1M = 0.025; 50,000 x 10 / 1M = 0.50
    cost = TABLE.cost("gpt-5-codex", Usage(input_tokens=1_000_000, cached_tokens=200_000,
                                           output_tokens=50_000, reasoning_tokens=20_000))
    assert cost == CostSplit(input=1.0, cached=0.025, output=0.5)
    assert cost.total == pytest.approx(1.525, abs=1e-12)


def test_small_call():
    # 1,234 input (1,000 cached), 56 output on codex-mini-latest:
    # 234 x 1.5 = 351e-6; 1,000 x 0.375 = 375e-6; 56 x 6 = 336e-6 -> 0.001062
    cost = TABLE.cost("codex-mini-latest", Usage(input_tokens=1234, cached_tokens=1000, output_tokens=56))
    assert (cost.input, cost.cached, cost.output) == pytest.approx((351e-6, 375e-6, 336e-6), abs=1e-15)
    assert cost.total == pytest.approx(0.001062, abs=1e-15)


def test_lookup_is_case_insensitive_and_drops_snapshot_dates():
    usage = Usage(input_tokens=1_000_000)
    assert TABLE.cost("GPT-5-Codex", usage).total == 1.25
    assert TABLE.cost("gpt-5-codex-2025-09-15", usage).total == 1.25


@pytest.mark.parametrize("model", [None, "", "gpt-5-codex-max", "claude-sonnet-4"])
def test_unknown_model_has_no_cost(model):
    assert TABLE.cost(model, Usage(input_tokens=10)) is None


def test_zero_usage_costs_zero_and_cached_beyond_input_is_clamped():
    assert TABLE.cost("gpt-5-codex", Usage()).total == 0
    # A malformed usage (cached > input) must not make a negative input part.
    cost = TABLE.cost("gpt-5-codex", Usage(input_tokens=100, cached_tokens=300))
    assert cost.input == 0 and cost.cached == pytest.approx(100 * 0.125 / 1e6)


def test_shipped_table_has_the_codex_family():
    table = load_prices()  # no path: the shipped store/prices.toml
    for model in ("gpt-5-codex", "gpt-5.1-codex", "gpt-5.1-codex-mini", "gpt-5.1-codex-max", "gpt-5.2-codex",
                  "gpt-5.3-codex", "gpt-5", "gpt-5-mini"):
        assert table.price(model) is not None, model
    # 1M output of gpt-5-codex = $10.
    assert table.cost("gpt-5-codex", Usage(output_tokens=1_000_000)).total == 10.0


def test_an_empty_table_prices_nothing():
    assert PriceTable({}).cost("gpt-5-codex", Usage(input_tokens=1)) is None


def test_edited_file_and_cached_default(tmp_path):
    p = tmp_path / "prices.toml"
    p.write_text('[models."my-model"]\ninput = 2\noutput = 8\n')
    table = load_prices(p)
    # No cached_input: cached tokens cost the input price.
    assert table.cost("my-model", Usage(input_tokens=500_000, cached_tokens=250_000, output_tokens=1)) == \
        CostSplit(input=0.5, cached=0.5, output=8e-6)


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
