"""End to end: Batch API jobs through the SDK, mitmdump with the addon, and the stand-in."""

from __future__ import annotations

import io

import orjson
import pytest
from support.helpers import jsonl
from support.rig import bound, wait_for
from velvet_core.storage import models
from velvet_core.storage.models import Batch, BatchEvent, BatchRequest, BatchResult, File


def chat_lines(n: int, prefix: str = "req", bad: set[int] = frozenset(), url="/v1/chat/completions"):
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": url,
             "body": {"model": "bad-model" if i in bad else "gpt-4o-mini",
                      "messages": [{"role": "user", "content": f"question number {i}"}]}}
            for i in range(1, n + 1)]


def run_batch(client, file_id: str, endpoint="/v1/chat/completions", metadata=None, until=("completed",)):
    b = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h",
                              metadata=metadata or {"team": "e2e"})
    seen = [b.status]
    for _ in range(10):
        b = client.batches.retrieve(b.id)
        seen.append(b.status)
        if b.status in until:
            break
    return b, seen


def rows(url, model, *where):
    with bound(url):
        q = model.select()
        if where:
            q = q.where(*where)
        return list(q)


def wait_rows(url, model, n, *where, what="rows"):
    return wait_for(lambda: (r := rows(url, model, *where)) and len(r) >= n and r, what=what)


def test_full_batch_lifecycle(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    lines = chat_lines(6, bad={4})
    f = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b, seen = run_batch(client, f.id)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    out = client.files.content(b.output_file_id).read()
    err = client.files.content(b.error_file_id, extra_headers={"x-standin-gzip": "1"}).read()
    client.files.content(b.output_file_id).read()  # a second download duplicates nothing
    assert len(out.splitlines()) == 5 and len(err.splitlines()) == 1

    url = proxy.db_url
    res = wait_rows(url, BatchResult, 6, BatchResult.batch_id == b.id, BatchResult.request.is_null(False),
                    what="matched results")
    assert len(res) == 6
    reqs = rows(url, BatchRequest, BatchRequest.batch_id == b.id)
    assert sorted(r.custom_id for r in reqs) == [f"req-{i}" for i in range(1, 7)]
    assert all(r.file_id == f.id and r.problem is None for r in reqs)
    by_cid = {r.custom_id: r for r in reqs}
    assert orjson.loads(by_cid["req-2"].body)["messages"][0]["content"] == "question number 2"
    assert by_cid["req-2"].line_no == 2
    with bound(url):
        for r in BatchResult.select().where(BatchResult.batch_id == b.id):
            assert r.request.custom_id == r.custom_id  # matched by custom_id, whatever the order
        failed = BatchResult.get(BatchResult.custom_id == "req-4", BatchResult.batch_id == b.id)
        assert failed.failed and failed.status_code == 400 and failed.error_code == "model_not_found"
        ok = BatchResult.get(BatchResult.custom_id == "req-1", BatchResult.batch_id == b.id)
        assert ok.status_code == 200 and ok.input_tokens > 0 and ok.output_tokens == 5 and ok.cost_usd > 0
        assert ok.model == "gpt-4o-mini-2024-07-18" and ok.request_id.startswith("req_")
        batch = Batch.get_by_id(b.id)
        assert batch.status == "completed" and batch.endpoint == "/v1/chat/completions"
        assert batch.request_total == 6 and batch.request_completed == 5 and batch.request_failed == 1
        assert batch.input_file_id == f.id and batch.output_file_id == b.output_file_id
        assert batch.queue_s == 60 and batch.processing_s == 60 and batch.finalize_s == 60
        assert batch.turnaround_s == 180 and batch.completed_at is not None
        assert batch.input_tokens is not None and batch.usage_cost_usd > 0
        assert orjson.loads(batch.metadata) == {"team": "e2e"}
        events = [(e.status, e.previous_status) for e in
                  BatchEvent.select().where(BatchEvent.batch_id == b.id).order_by(BatchEvent.id)]
        assert events == [("validating", None), ("in_progress", "validating"),
                          ("finalizing", "in_progress"), ("completed", "finalizing")]
        assert all(e.api_at is not None for e in BatchEvent.select().where(BatchEvent.batch_id == b.id))
        assert BatchResult.select().where(BatchResult.batch_id == b.id).count() == 6  # no duplicates
        files = {x.id: x for x in File.select().where(File.batch_id == b.id)}
        assert files[f.id].role == "input" and files[f.id].lines == 6 and files[f.id].purpose == "batch"
        assert files[b.output_file_id].role == "output" and files[b.error_file_id].role == "error"
        db = models.Batch._meta.database
        summary = db.execute_sql(
            f"SELECT lines, answered, failed, cost_usd FROM batch_summary WHERE id = {db.param}", (b.id,)
        ).fetchone()
        assert summary[:3] == (6, 5, 1) and summary[3] > 0
        (prompt,) = db.execute_sql(
            f"SELECT request_body FROM batch_lines WHERE batch_id = {db.param} AND custom_id = 'req-3'", (b.id,)
        ).fetchone()
        assert "question number 3" in prompt
    # repeated polls duplicate nothing either
    client.batches.retrieve(b.id)
    list(client.batches.list())
    client.files.content(f.id).read()  # downloading an input file's content adds no lines
    wait_for(lambda: rows(url, models.Call, models.Call.endpoint == "batches", models.Call.action == "list"),
             what="list call")
    wait_for(lambda: rows(url, models.Call, models.Call.path == f"/v1/files/{f.id}/content"), what="content")
    assert len(rows(url, BatchEvent, BatchEvent.batch_id == b.id)) == 4
    assert len(rows(url, BatchRequest, BatchRequest.file_id == f.id)) == 6


def test_upload_api_batch(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    data = jsonl(chat_lines(5, prefix="up"))
    cut = data.index(b"question number 3")  # the parts split a line in the middle
    up = client.uploads.create(bytes=len(data), filename="big.jsonl", mime_type="text/jsonl", purpose="batch")
    p2 = client.uploads.parts.create(up.id, data=data[cut:])  # parts may arrive out of order
    p1 = client.uploads.parts.create(up.id, data=data[:cut])
    done = client.uploads.complete(up.id, part_ids=[p1.id, p2.id])
    fid = done.file.id
    b, _ = run_batch(client, fid)
    client.files.content(b.output_file_id).read()
    url = proxy.db_url
    res = wait_rows(url, BatchResult, 5, BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
    assert len(res) == 5
    reqs = sorted(rows(url, BatchRequest, BatchRequest.file_id == fid), key=lambda r: r.line_no)
    assert [(r.line_no, r.custom_id) for r in reqs] == [(i, f"up-{i}") for i in range(1, 6)]
    assert all(r.problem is None and r.batch_id == b.id for r in reqs)
    assert orjson.loads(reqs[2].body)["messages"][0]["content"] == "question number 3"
    (u,) = rows(url, models.Upload, models.Upload.id == up.id)
    assert u.status == "completed" and u.file_id == fid


def test_cancelled_upload_leaves_nothing(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    up = client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="batch")
    client.uploads.parts.create(up.id, data=jsonl(chat_lines(3, prefix="cx")))
    client.uploads.cancel(up.id)
    url = proxy.db_url
    wait_for(lambda: [u for u in rows(url, models.Upload, models.Upload.id == up.id) if u.status == "cancelled"])
    assert rows(url, BatchRequest, BatchRequest.custom_id.startswith("cx-")) == []


def test_cancelled_batch(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    f = client.files.create(file=("c.jsonl", io.BytesIO(jsonl(chat_lines(4, prefix="c")))), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    client.batches.retrieve(b.id)  # in_progress
    assert client.batches.cancel(b.id).status == "cancelling"
    b = client.batches.retrieve(b.id)
    assert b.status == "cancelled"
    client.files.content(b.output_file_id).read()
    url = proxy.db_url
    wait_rows(url, BatchResult, 2, BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
    with bound(url):
        batch = Batch.get_by_id(b.id)
        assert batch.cancelling_at and batch.cancelled_at and batch.turnaround_s > 0
        assert [e.status for e in BatchEvent.select().where(BatchEvent.batch_id == b.id).order_by(BatchEvent.id)] \
            == ["validating", "in_progress", "cancelling", "cancelled"]


def test_failed_validation(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    f = client.files.create(file=("v.jsonl", io.BytesIO(jsonl(chat_lines(3, prefix="v")))), purpose="batch")
    b, seen = run_batch(client, f.id, metadata={"standin": "fail"}, until=("failed",))
    assert seen[-1] == "failed"
    url = proxy.db_url
    errs = wait_rows(url, models.BatchError, 1, models.BatchError.batch_id == b.id)
    assert errs[0].line == 2 and errs[0].code == "invalid_request"
    with bound(url):
        assert Batch.get_by_id(b.id).failed_at is not None
        # the error's line points at an input line
        line = BatchRequest.get(BatchRequest.batch_id == b.id, BatchRequest.line_no == errs[0].line)
        assert line.custom_id == "v-2"


def test_expired_batch_partial_output(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    f = client.files.create(file=("e.jsonl", io.BytesIO(jsonl(chat_lines(4, prefix="e")))), purpose="batch")
    b, seen = run_batch(client, f.id, metadata={"standin": "expire"}, until=("expired",))
    assert seen[-1] == "expired"
    client.files.content(b.output_file_id).read()
    client.files.content(b.error_file_id).read()
    url = proxy.db_url
    res = wait_rows(url, BatchResult, 4, BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
    expired = [r for r in res if r.error_code == "batch_expired"]
    assert len(expired) == 2 and all(r.failed and r.status_code is None for r in expired)
    assert {r.custom_id for r in res if not r.failed} == {"e-1", "e-2"}


@pytest.mark.parametrize(("endpoint", "body"), [
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "some words to embed"}),
    ("/v1/responses", {"model": "gpt-4.1-mini", "input": "write a haiku"}),
])
def test_other_endpoints(proxy, monkeypatch, endpoint, body):
    client = proxy.client(monkeypatch)
    lines = [{"custom_id": f"x{i}", "method": "POST", "url": endpoint, "body": body} for i in range(3)]
    f = client.files.create(file=("o.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b, _ = run_batch(client, f.id, endpoint=endpoint)
    client.files.content(b.output_file_id).read()
    res = wait_rows(proxy.db_url, BatchResult, 3, BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
    assert all(r.input_tokens > 0 and r.cost_usd > 0 for r in res)
    if endpoint == "/v1/responses":
        assert all(r.output_tokens == 5 for r in res)


def test_malformed_input_lines(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    good = lambda i: orjson.dumps({"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",  # noqa: E731
                                   "body": {"model": "gpt-4o-mini", "messages": []}})
    data = b"\n".join([
        good(1),                                   # 1 ok
        b"{not json",                              # 2 bad JSON
        orjson.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),  # 3 no custom_id
        good(1),                                   # 4 duplicate custom_id
        good(5) + b"\r",                           # 5 CRLF
        b"",                                       # 6 blank
        b'{"custom_id": "m7", "body": {"x": "\xff"}}',  # 7 not UTF-8
        orjson.dumps({"custom_id": "m8", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}),
        good(9),                                   # 9 ok, no final newline
    ])
    f = client.files.create(file=("m.jsonl", io.BytesIO(data)), purpose="batch")
    client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    url = proxy.db_url

    def probs():
        r = {x.line_no: x for x in rows(url, BatchRequest, BatchRequest.file_id == f.id)}
        return r if len(r) == 9 and r[8].problem and "endpoint" in r[8].problem else None

    r = wait_for(probs, what="malformed lines")
    assert r[1].problem is None and r[1].custom_id == "m1"
    assert "bad JSON" in r[2].problem and "missing custom_id" in r[3].problem
    assert "duplicate custom_id" in r[4].problem and "CRLF" in r[5].problem and r[5].custom_id == "m5"
    assert "blank line" in r[6].problem and "not UTF-8 (1 invalid byte sequence replaced" in r[7].problem
    assert r[7].custom_id == "m7"  # kept with U+FFFD for the bad byte: still matched by its custom_id
    assert "url does not match" in r[8].problem and "no final newline" in r[9].problem
    assert r[9].custom_id == "m9"
    (fr,) = rows(url, File, File.id == f.id)
    assert fr.lines == 9 and fr.bad_lines >= 7


def test_answers_before_inputs_are_linked_later(proxy, monkeypatch, standin):
    """The batch and its input file were made without the proxy; the output download comes first."""
    api = standin.batch_api
    f = api.new_file(jsonl(chat_lines(3, prefix="late")), "late.jsonl", "batch")
    client = proxy.client(monkeypatch)
    import openai
    direct = openai.OpenAI(api_key="sk-direct", base_url=standin.url + "/v1", max_retries=0)
    b = direct.batches.create(input_file_id=f["id"], endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(3):
        b = direct.batches.retrieve(b.id)
    client.files.content(b.output_file_id).read()  # answers first: nothing to match yet
    url = proxy.db_url
    wait_rows(url, BatchResult, 3, BatchResult.file_id == b.output_file_id)
    client.batches.retrieve(b.id)  # now the batch: results get their batch id
    client.files.content(f["id"]).read()  # then the input lines: now they match
    res = wait_rows(url, BatchResult, 3, BatchResult.file_id == b.output_file_id,
                    BatchResult.request.is_null(False))
    assert {r.custom_id for r in res} == {"late-1", "late-2", "late-3"}


def test_fifty_thousand_line_batch_through_the_proxy(proxy, monkeypatch):
    """Correctness at size, end to end (its speed belongs to the benchmarks)."""
    client = proxy.client(monkeypatch)
    n = 50_000
    data = b"".join(b'{"custom_id":"big-%d","method":"POST","url":"/v1/chat/completions","body":'
                    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"q %d"}]}}\n' % (i, i)
                    for i in range(n))
    f = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    b, _ = run_batch(client, f.id)
    client.files.content(b.output_file_id).read()
    url = proxy.db_url

    def matched():
        with bound(url):
            q = BatchResult.select().where(BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
            return q.count() == n

    wait_for(matched, timeout=180, what="50,000 matched results")
    with bound(url):
        assert BatchRequest.select().where(BatchRequest.file_id == f.id).count() == n
        r = BatchResult.get(BatchResult.batch_id == b.id, BatchResult.custom_id == "big-31337")
        assert r.request.line_no == 31338 and r.cost_usd > 0
