"""End to end, every endpoint the Batch API takes: a batch of each through a real mitmdump with the addon, on
both backends, with a live call of the same request beside it (image lines cost half of it, moderation lines 0)."""

from __future__ import annotations

import base64
import io
from datetime import timedelta

import orjson
import pytest
from support.helpers import jsonl
from support.pg import fresh_pg_url
from support.rig import Proxy, call_row
from test_e2e_batch import run_batch, wait_rows
from velvet_core import clock
from velvet_core.cost.prices import VIDEO_PRICES, Pricer
from velvet_core.parsing.extract import tokens_from_usage
from velvet_core.storage.database import open_db
from velvet_core.storage.models import BatchRequest, BatchResult
from velvet_core.storage.sql import adapt

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


@pytest.mark.parametrize("seconds", ["4", "240"])  # 160 kB, and 9.6 MB: over velvet_body_limit
def test_a_downloaded_video_keeps_its_size_never_its_bytes(proxy, monkeypatch, seconds):
    client = proxy.client(monkeypatch)
    job = client.videos.create(model="sora-2", prompt="waves", seconds=seconds, size="720x1280")
    got = client.videos.with_raw_response.download_content(job.id)
    data = got.content
    assert data.startswith(b"\x00\x00\x00\x18ftypmp42") and len(data) >= int(seconds) * 39_000
    call = call_row(proxy.db_url, got.headers["x-request-id"])
    assert (call.endpoint, call.action, call.object_id) == ("videos", "content", job.id)
    assert call.status_code == 200 and call.response_bytes == len(data)
    assert call.response_body is None and call.cost_usd is None  # the job's creation carried the cost


def test_show_an_image_line_gives_each_image_its_size_and_digest(proxy, monkeypatch, capsys):
    import hashlib

    from velvet_core.cli import main

    pixel = "data:image/png;base64," + base64.b64encode(b"\x89PNG edit source" + bytes(4000)).decode()
    body = {**IMAGE, "images": [{"image_url": pixel}]}
    _, res = batch_of(proxy, monkeypatch, "/v1/images/edits", body, n=1)
    capsys.readouterr()
    assert main(["show", "--db", proxy.db_url, res[0].batch_id, res[0].custom_id]) == 0
    out = capsys.readouterr().out
    image = base64.b64decode(orjson.loads(res[0].body)["data"][0]["b64_json"])
    assert f"<image: {len(image):,} bytes, sha256 {hashlib.sha256(image).hexdigest()[:16]}>" in out
    assert "<image/png: 4,016 bytes, sha256" in out  # the request's data URL too
    assert "AAAAAAAAAAAAAAAA" not in out and len(out) < 4000  # a page of text, not the base64
    assert main(["show", "--db", proxy.db_url, res[0].batch_id, res[0].custom_id, "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["response"]["data"][0]["b64_json"]  # --json: the answer whole


def test_lines_batch_stats_report_and_alerts_count_every_endpoint(proxy, monkeypatch, capsys, tmp_path):
    """Image, moderation and video lines are lines like any other: listed, counted, summed, alerted on."""
    from velvet_core.cli import main

    def cli(*argv: str) -> dict:
        capsys.readouterr()
        assert main([*argv, "--db", proxy.db_url, "--json"]) in (0, 3), capsys.readouterr().err
        return orjson.loads(capsys.readouterr().out)

    video = {"model": "sora-2", "prompt": "a fox running", "seconds": "8", "size": "720x1280"}
    moderation = {"model": "omni-moderation-latest", "input": "is this fine?"}
    runs = {e: batch_of(proxy, monkeypatch, e, b, n=2)[1] for e, b in (
        ("/v1/images/generations", IMAGE), ("/v1/moderations", moderation), ("/v1/videos", video))}
    for endpoint, res in runs.items():
        batch_id = res[0].batch_id
        lines = cli("lines", batch_id)
        assert len(lines) == 2 and all(not x["failed"] for x in lines), endpoint
        summary = cli("batch", batch_id)
        cost = sum(r.cost_usd for r in res)
        assert summary["cost_usd"] == pytest.approx(cost) and summary["answered"] == 2, endpoint
        assert (cost == 0) == (endpoint == "/v1/moderations")  # free, not unknown
    db = open_db(proxy.db_url)  # what every batch line of each model cost, to check the sums against
    per_model = {m: c for m, c in db.execute_sql(
        "SELECT model, sum(cost_usd) FROM batch_results WHERE model IN ('gpt-image-1', 'sora-2', "
        "'omni-moderation-latest') GROUP BY model").fetchall()}
    total = db.execute_sql("SELECT sum(cost_usd) FROM batch_results").fetchone()[0]
    db.close()
    stats = {g["model"]: g for g in cli("stats")["batches"]}
    for model in ("gpt-image-1", "sora-2", "omni-moderation-latest"):
        assert stats[model]["cost_usd"] == pytest.approx(per_model[model]) and stats[model]["lines"] >= 2
    # the stand-in's clock runs ahead of ours (its batches "end" later than now): back, as if run earlier
    db = open_db(proxy.db_url)
    cols = ("created_at", "in_progress_at", "finalizing_at", "completed_at")
    found = db.execute_sql(f"SELECT id, {', '.join(cols)} FROM batches").fetchall()
    ahead = max(clock.parse(v) for row in found for v in row[1:] if v is not None) - clock.now()
    for row in found:
        moved = [None if v is None else clock.parse(v) - ahead - timedelta(minutes=5) for v in row[1:]]
        db.execute_sql(adapt(db, f"UPDATE batches SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?"),
                       (*moved, row[0]))
    db.close()
    assert cli("report")["totals"]["batch_usd"] == pytest.approx(total)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "video spend"\nkind = "spend_usd"\nsource = "batch"\nmodel = "sora-2"\n'
                     'threshold = 0.01\nwindow = "2h"\n')
    check = cli("alerts", "check", "--rules", str(rules), "--dry-run", "--state", str(tmp_path / "s.json"))
    (rule,) = check["rules"]
    assert rule["state"] == "firing" and rule["value"] == pytest.approx(per_model["sora-2"])
