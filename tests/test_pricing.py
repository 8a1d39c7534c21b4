"""Unit tests: cost from genai-prices and from a user price file."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from velvet_core.cost.prices import VIDEO_PRICES, PriceFileError, Pricer, load_price_file
from velvet_core.parsing.extract import Images, Tokens, Video, images_of, tokens_from_usage, video_of


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


def test_a_free_model_costs_zero_even_without_usage():
    p = Pricer()
    for batch in (False, True):
        assert p.cost("omni-moderation-latest", Tokens(), batch=batch) == 0
        assert p.cost("omni-moderation-latest", Tokens(input=50), batch=batch) == 0
    assert p.cost("a-model-nobody-knows", Tokens()) is None
    assert p.cost("gpt-4o-mini", Tokens()) is None  # known but not free: no usage is no price


def test_image_input_tokens_priced_apart():
    p = Pricer()
    usage = {"input_tokens": 1_000_000, "output_tokens": 0,
             "input_tokens_details": {"text_tokens": 500_000, "image_tokens": 500_000}}
    t = tokens_from_usage(usage)
    assert t.image == 500_000
    text_only = p.cost("gpt-image-1", Tokens(input=1_000_000, output=0))
    split = p.cost("gpt-image-1", t)
    assert split is not None and text_only is not None and split > text_only  # image input is dearer
    assert p.cost("gpt-image-1", t, batch=True) == pytest.approx(split / 2)
    # an image count bigger than the input is capped, not priced negative
    assert p.cost("gpt-image-1", Tokens(input=10, output=0, image=10**9)) > 0


def test_price_file_image_and_free_models(tmp_path):
    f = tmp_path / "prices.toml"
    f.write_text('[models."img"]\ninput = 1\noutput = 2\nimage_input = 10\n'
                 '[models."free"]\ninput = 0\noutput = 0\n')
    p = Pricer(load_price_file(f))
    assert p.cost("img", Tokens(input=2_000_000, output=0, image=1_000_000)) == pytest.approx(11.0)
    assert p.cost("img", Tokens(input=2_000_000, output=0, image=1_000_000), batch=True) == pytest.approx(5.5)
    assert p.cost("free", Tokens()) == 0 and p.cost("img", Tokens()) is None


def test_video_jobs_cost_seconds_at_their_size_rate(tmp_path):
    p = Pricer()
    job = {"object": "video", "model": "sora-2-pro", "seconds": "12", "size": "1792x1024"}
    assert video_of(job) == Video(Decimal(12), "1792x1024")
    rate = VIDEO_PRICES["sora-2-pro"].by_size["1792x1024"]
    assert p.video_cost("sora-2-pro", video_of(job)) == pytest.approx(float(12 * rate))
    assert p.video_cost("sora-2-pro-2025-10-06", video_of(job), batch=True) == pytest.approx(float(6 * rate))
    assert p.video_cost("sora-2", video_of(job)) is None  # sora-2 has no such size: unknown, not 0
    assert p.video_cost("gpt-4o", video_of(job)) is None
    assert all(e.source.startswith("https://") and e.date for e in VIDEO_PRICES.values())
    f = tmp_path / "prices.toml"
    f.write_text('[models."sora-2"]\nper_second = { "720x1280" = 1.5 }\nbatch_per_second = { "720x1280" = 1 }\n')
    mine = Pricer.from_file(f)
    v = Video(Decimal(4), "720x1280")
    assert mine.video_cost("sora-2", v) == pytest.approx(6.0) and mine.video_cost("sora-2", v, batch=True) == 4.0
    shipped = VIDEO_PRICES["sora-2-pro"].by_size["720x1280"]
    assert mine.video_cost("sora-2-pro", v) == pytest.approx(float(4 * shipped))  # the others stay


@pytest.mark.parametrize("seconds", ["lots", -1, True, None, "NaN", "1e9", [4]])
def test_a_video_with_bad_seconds_is_not_priced(seconds):
    assert video_of({"object": "video", "seconds": seconds, "size": "720x1280"}) is None
    assert Pricer().line_cost({"model": "sora-2", "body": '{"object": "video", "seconds": %s}' % (
        '"lots"' if seconds == "lots" else "-1")}) is None


def test_models_billed_per_image_from_a_price_file(tmp_path):
    f = tmp_path / "prices.toml"
    f.write_text('[models."dall-e-3"]\nper_image = { "1024x1024" = 0.04, "hd/1024x1024" = 0.08, '
                 '"1024x1792" = 0.08 }\n')
    p = Pricer.from_file(f)
    two_hd = {"created": 1, "data": [{"b64_json": "AA=="}, {"url": "https://x"}]}
    assert images_of(two_hd, {"size": "1024x1024", "quality": "hd"}) == Images(2, "1024x1024", "hd")
    assert p.image_cost("dall-e-3", images_of(two_hd, {"quality": "hd"})) == pytest.approx(0.16)
    assert p.image_cost("dall-e-3", images_of(two_hd)) == pytest.approx(0.08)  # standard, the API's default size
    tall_hd = images_of(two_hd, {"size": "1024x1792", "quality": "hd"})
    assert p.image_cost("dall-e-3", tall_hd) == pytest.approx(0.16)  # no hd/ rate for the size: the size's
    assert p.image_cost("dall-e-3", images_of({**two_hd, "size": "1024x1792"}), batch=True) == pytest.approx(0.08)
    assert p.image_cost("dall-e-3", images_of(two_hd, {"size": "512x512"})) is None  # no rate: unknown, not 0
    assert p.image_cost("gpt-image-1", images_of(two_hd)) is None and not p.is_per_image("gpt-image-1")
    assert images_of({"data": "nope"}) is None and images_of([1]) is None
    line = {"model": "dall-e-3", "body": orjson.dumps({**two_hd, "size": "1024x1024", "quality": "hd"}).decode()}
    assert p.line_cost(line) == pytest.approx(0.08)  # batch: half
    assert p.line_cost({"model": "dall-e-3", "body": "{not json"}) is None
    # gpt-image-1 stays priced by its tokens
    assert p.line_cost({"model": "gpt-image-1", "input_tokens": 20, "output_tokens": 272}) > 0


@pytest.mark.parametrize("text", ['[models."v"]\nper_second = 3\n', '[models."v"]\nper_second = { "a" = "x" }\n',
                                  '[models."i"]\nper_image = []\n', '[models."i"]\nper_image = { "a" = "x" }\n'])
def test_bad_per_second_tables(tmp_path, text):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(PriceFileError):
        Pricer.from_file(f)
