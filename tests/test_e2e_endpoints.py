"""End to end, every endpoint the Batch API takes: a batch of each through a real mitmdump with the addon, on
both backends, with a live call of the same request beside it (image lines cost half of it, moderation lines 0)."""

from __future__ import annotations

import io

import orjson
import pytest
from support.helpers import jsonl
from support.pg import fresh_pg_url
from support.rig import Proxy, call_row
from test_e2e_batch import run_batch, wait_rows
from velvet_core.cost.prices import VIDEO_PRICES, Pricer
from velvet_core.parsing.extract import tokens_from_usage
from velvet_core.storage.models import BatchRequest, BatchResult

IMAGE = {"model": "gpt-image-1", "prompt": "a red fox in the snow", "size": "1024x1024", "quality": "low"}


def batch_of(proxy, monkeypatch, endpoint: str, body: dict, n: int = 3):
    """The result rows of an ``n``-line batch of ``endpoint``, once matched to their requests (and priced)."""
    client = proxy.client(monkeypatch)
    lines = [{"custom_id": f"{endpoint}-{i}", "method": "POST", "url": endpoint, "body": body} for i in range(n)]
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b, _ = run_batch(client, f.id, endpoint=endpoint)
    assert b.status == "completed"
    client.files.content(b.output_file_id).read()
    return client, wait_rows(proxy.db_url, BatchResult, n, BatchResult.batch_id == b.id,
                             BatchResult.request.is_null(False), BatchResult.model.is_null(False),
                             what=f"{endpoint} results")


def test_image_generation_lines_cost_half_the_live_call(proxy, monkeypatch):
    client, res = batch_of(proxy, monkeypatch, "/v1/images/generations", IMAGE)
    live = client.images.with_raw_response.generate(**IMAGE)
    call = call_row(proxy.db_url, live.headers["x-request-id"])
    assert call.endpoint == "images" and call.input_tokens == res[0].input_tokens and call.cost_usd > 0
    for r in res:
        assert r.model == "gpt-image-1" and not r.failed and r.problem is None
        assert r.output_tokens == 272 and r.cost_usd == pytest.approx(call.cost_usd / 2)


def test_image_edit_lines_price_image_tokens_apart(proxy, monkeypatch):
    body = {**IMAGE, "images": [{"image_url": "https://example.com/fox.png"}]}
    _, res = batch_of(proxy, monkeypatch, "/v1/images/edits", body)
    for r in res:
        usage = orjson.loads(r.body)["usage"]
        assert usage["input_tokens_details"]["image_tokens"] > 0
        tokens = tokens_from_usage(usage)
        text_only = tokens_from_usage({**usage, "input_tokens_details": {}})
        live = Pricer().cost("gpt-image-1", tokens)
        assert r.cost_usd == pytest.approx(live / 2)
        # gpt-image-1's image input tokens cost more than its text ones: the split is priced, not ignored
        assert r.cost_usd > Pricer().cost("gpt-image-1", text_only, batch=True)


def test_moderation_lines_cost_zero(proxy, monkeypatch):
    body = {"model": "omni-moderation-latest", "input": "is this fine?"}
    client, res = batch_of(proxy, monkeypatch, "/v1/moderations", body)
    live = client.moderations.with_raw_response.create(**body)
    call = call_row(proxy.db_url, live.headers["x-request-id"])
    assert call.endpoint == "moderations" and call.cost_usd == 0
    assert all(r.model == "omni-moderation-latest" and r.cost_usd == 0 and r.input_tokens is None for r in res)


def test_a_line_of_an_unknown_endpoint_is_kept_whole(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    line = {"custom_id": "future-1", "method": "POST", "url": "/v1/holograms", "body": {"model": "holo-1"}}
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([line]))), purpose="batch")
    req = wait_rows(proxy.db_url, BatchRequest, 1, BatchRequest.file_id == f.id, what="the request line")[0]
    assert req.url == "/v1/holograms" and req.model == "holo-1" and orjson.loads(req.body) == line["body"]
    assert "/v1/holograms" in req.problem


def test_video_lines_cost_their_seconds_at_the_shipped_rate(proxy, monkeypatch):
    body = {"model": "sora-2", "prompt": "a fox running", "seconds": "8", "size": "720x1280"}
    client, res = batch_of(proxy, monkeypatch, "/v1/videos", body)
    live = client.videos.with_raw_response.create(**body)
    call = call_row(proxy.db_url, live.headers["x-request-id"])
    rate = VIDEO_PRICES["sora-2"].by_size["720x1280"]
    assert call.endpoint == "videos" and call.action == "create" and call.model == "sora-2"
    assert call.cost_usd == pytest.approx(float(8 * rate))
    for r in res:
        job = orjson.loads(r.body)
        assert (job["object"], job["seconds"], job["size"]) == ("video", "8", "720x1280")
        assert r.model == "sora-2" and r.cost_usd == pytest.approx(call.cost_usd / 2)
    polled = client.videos.with_raw_response.retrieve(live.parse().id)  # a poll is not billed again
    assert call_row(proxy.db_url, polled.headers["x-request-id"]).cost_usd is None


def test_a_video_line_with_bad_seconds_is_kept_unpriced(proxy, monkeypatch):
    body = {"model": "sora-2", "prompt": "a fox", "seconds": "a while", "size": "720x1280"}
    _, res = batch_of(proxy, monkeypatch, "/v1/videos", body, n=2)
    for r in res:
        assert orjson.loads(r.body)["seconds"] == "a while" and not r.failed
        assert r.model == "sora-2" and r.cost_usd is None  # unknown, not 0


def test_a_live_image_edit_sent_as_a_form_is_priced(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    live = client.images.with_raw_response.edit(model="gpt-image-1", prompt=IMAGE["prompt"],
                                                 image=("fox.png", b"\x89PNG not really", "image/png"))
    call = call_row(proxy.db_url, live.headers["x-request-id"])
    usage = live.parse().usage
    assert call.endpoint == "images" and call.model_requested == "gpt-image-1"
    assert call.input_tokens == usage.input_tokens and call.cost_usd == pytest.approx(
        Pricer().cost("gpt-image-1", tokens_from_usage(usage.model_dump())))


@pytest.mark.parametrize(("endpoint", "body", "live"), [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]},
     lambda c, b: c.chat.completions.with_raw_response.create(**b)),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "say hi", "max_tokens": 5},
     lambda c, b: c.completions.with_raw_response.create(**b)),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "some words"},
     lambda c, b: c.embeddings.with_raw_response.create(**b)),
    ("/v1/responses", {"model": "gpt-4.1-mini", "input": "write a haiku"},
     lambda c, b: c.responses.with_raw_response.create(**b)),
], ids=["chat", "completions", "embeddings", "responses"])
def test_token_endpoints_lines_cost_half_the_live_call(proxy, monkeypatch, endpoint, body, live):
    client, res = batch_of(proxy, monkeypatch, endpoint, body)
    call = call_row(proxy.db_url, live(client, body).headers["x-request-id"])
    assert call.cost_usd > 0
    for r in res:
        assert (r.input_tokens, r.output_tokens) == (call.input_tokens, call.output_tokens)
        assert r.cost_usd == pytest.approx(call.cost_usd / 2)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def priced_proxy(request, standin, tmp_path_factory):
    """A proxy with a price file that bills dall-e-3 per image (velvet_prices)."""
    tmp = tmp_path_factory.mktemp(f"per-image-{request.param}")
    prices = tmp / "prices.toml"
    prices.write_text('[models."dall-e-3"]\nper_image = { "1024x1024" = 0.04, "hd/1024x1024" = 0.08 }\n')
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    p = Proxy(url, standin.url, tmp, extra=["--set", f"velvet_prices={prices}"]).start()
    yield p
    p.stop()


def test_images_billed_per_image_live_and_batch(priced_proxy, monkeypatch):
    body = {"model": "dall-e-3", "prompt": "a lighthouse", "n": 2, "size": "1024x1024", "quality": "hd"}
    client, res = batch_of(priced_proxy, monkeypatch, "/v1/images/generations", body, n=2)
    live = client.images.with_raw_response.generate(**body)
    call = call_row(priced_proxy.db_url, live.headers["x-request-id"])
    assert call.cost_usd == pytest.approx(0.16)  # two hd images at $0.08
    assert [r.cost_usd for r in res] == pytest.approx([0.08, 0.08])  # the batch rate: half
