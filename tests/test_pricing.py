"""Unit tests: cost from genai-prices and from a user price file."""

from __future__ import annotations

import pytest
from velvet_core.cost.prices import PriceFileError, Pricer, load_price_file
from velvet_core.parsing.extract import Tokens


def test_known_model_costs_something():
    p = Pricer()
    c = p.cost("gpt-4o-mini", Tokens(input=1_000_000, output=1_000_000))
    assert c == pytest.approx(0.15 + 0.60)
    dated = p.cost("gpt-4o-mini-2024-07-18", Tokens(input=1_000_000, output=1_000_000))
    assert dated == pytest.approx(c)


def test_cached_tokens_are_cheaper():
    p = Pricer()
    full = p.cost("gpt-4o-mini", Tokens(input=1000, output=0))
    cached = p.cost("gpt-4o-mini", Tokens(input=1000, output=0, cached=1000))
    assert cached == pytest.approx(full / 2)


def test_unknown_model_is_null_not_zero():
    p = Pricer()
    assert p.cost("my-finetune-nobody-knows", Tokens(input=10, output=10)) is None
    assert p.cost(None, Tokens(input=10, output=10)) is None
    assert p.cost("gpt-4o-mini", Tokens()) is None


def test_batch_is_half_price():
    p = Pricer()
    t = Tokens(input=123_456, output=7_890)
    assert p.cost("gpt-4o-mini", t, batch=True) == pytest.approx(p.cost("gpt-4o-mini", t) / 2)
    assert p.cost("text-embedding-3-small", Tokens(input=1000), batch=True) == pytest.approx(
        p.cost("text-embedding-3-small", Tokens(input=1000)) / 2)


def test_price_file_overrides(tmp_path):
    f = tmp_path / "prices.toml"
    f.write_text('[models."gpt-4o-mini"]\ninput = 1.0\noutput = 2.0\n'
                 '[models."house-model"]\ninput = 3\noutput = 4\ncached_input = 1\nbatch_output = 1\n')
    p = Pricer(load_price_file(f))
    assert p.cost("gpt-4o-mini-2024-07-18", Tokens(input=1_000_000, output=1_000_000)) == pytest.approx(3.0)
    assert p.cost("house-model", Tokens(input=1_000_000, cached=500_000, output=0)) == pytest.approx(2.0)
    assert p.cost("house-model", Tokens(input=1_000_000, output=1_000_000), batch=True) == pytest.approx(2.5)
    j = tmp_path / "prices.json"
    j.write_text('{"models": {"x": {"input": 1, "output": 1}}}')
    assert Pricer(load_price_file(j)).cost("x", Tokens(input=10**6)) == pytest.approx(1.0)


@pytest.mark.parametrize("text", ["not toml [", '[models."m"]\ninput = 1\n', '[models."m"]\ninput="a"\noutput=1'])
def test_bad_price_file(tmp_path, text):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(PriceFileError):
        load_price_file(f)
    with pytest.raises(PriceFileError):
        load_price_file(tmp_path / "missing.toml")
