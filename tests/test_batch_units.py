"""Unit tests: JSONL splitting, the multipart scanner, batch lines, and the batch store."""

from __future__ import annotations

import itertools
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.helpers import multipart_body
from support.rig import bound
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.classify import classify
from velvet_core.parsing.extract import Tokens, utc
from velvet_core.parsing.jsonl import LineSplitter
from velvet_core.parsing.lines import request_row
from velvet_core.parsing.multipart import (
    MultipartError,
    MultipartScanner,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
    fields,
)
from velvet_core.processing import batches
from velvet_core.processing.batch_files import ingest_buffered, priced_result
from velvet_core.storage import models
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import InputDone, OutputDone, RequestLines, ResultLines, UploadCompleted
from velvet_core.storage.snapshot import CallSnapshot
from velvet_core.storage.store import Store

NOW = utc(time.time())


def feed_in_pieces(feed, data: bytes, cuts: list[int]):
    out, i = [], 0
    for n in cuts:
        out += list(feed(data[i:i + n]))
        i += n
    out += list(feed(data[i:]))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.booleans(), st.lists(st.integers(1, 25), max_size=40))
def test_line_splitter_any_chunking(lines, final_nl, cuts):
    data = b"\n".join(lines) + (b"\n" if final_nl and lines else b"")
    s = LineSplitter()
    got = feed_in_pieces(s.feed, data, cuts) + list(s.finish())
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert [(x.data + (b"\r" if x.crlf else b"")) for x in got] == expected
    assert [x.no for x in got] == list(range(1, len(expected) + 1))
    if got:
        assert got[-1].final_newline == (final_nl or data.endswith(b"\n"))



def scan(data: bytes, boundary: str, cuts: list[int]) -> dict[str, bytes]:
    sc = MultipartScanner(boundary)
    out: dict[str, bytes] = {}
    name = None
    for ev in feed_in_pieces(sc.feed, data, cuts):
        if isinstance(ev, PartStart):
            name = ev.name
            out[name] = b""
        elif isinstance(ev, PartData):
            out[name] += ev.data
        elif isinstance(ev, PartEnd):
            name = None
    sc.finish()
    return out


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=30))
def test_multipart_keeps_bytes_any_chunking(payload, cuts):
    boundary = "----velvetboundary42"
    payload = payload.replace(b"--" + boundary.encode(), b"")
    data = multipart_body(boundary, [("purpose", None, b"batch"), ("file", "in.jsonl", payload)])
    assert scan(data, boundary, cuts) == {"purpose": b"batch", "file": payload}


def test_multipart_newlines_survive():
    jl = b'{"a": 1}\n{"b": 2}\r\n\n{"c": 3}'
    data = multipart_body("b1", [("file", "x.jsonl", jl)])
    assert fields(data, "b1") == {"file": jl}


def test_multipart_truncated_and_boundary():
    data = multipart_body("b1", [("file", "x.jsonl", b"abc\n" * 100)])
    with pytest.raises(MultipartError):
        fields(data[: len(data) // 2], "b1")
    assert boundary_of('multipart/form-data; boundary="a b"') == "a b"
    assert boundary_of("multipart/form-data; boundary=xyz") == "xyz"
    assert boundary_of("application/json") is None


def test_request_and_result_rows():
    from velvet_core.parsing.jsonl import Line
    r = request_row(Line(1, orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": "gpt-4o-mini", "messages": []}})))
    assert r["custom_id"] == "a" and r["model"] == "gpt-4o-mini" and r["problem"] is None
    assert "line is not a JSON object" in request_row(Line(2, b"[1, 2]"))["problem"]
    out = priced_result(Line(1, orjson.dumps({
        "id": "batch_req_1", "custom_id": "a", "error": None,
        "response": {"status_code": 200, "request_id": "req_1",
                     "body": {"model": "gpt-4o-mini",
                              "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}}})),
        Pricer(), NOW)
    sync = Pricer().cost("gpt-4o-mini", Tokens(1000, 1000))
    assert out["cost_usd"] == pytest.approx(sync / 2) and out["input_tokens"] == 1000 and not out["failed"]
    exp = priced_result(Line(2, b'{"id": "x", "custom_id": "b", "response": null, '
                             b'"error": {"code": "batch_expired", "message": "late"}}'), Pricer(), NOW)
    assert exp["failed"] and exp["error_code"] == "batch_expired" and exp.get("cost_usd") is None
    unknown = priced_result(Line(3, orjson.dumps({"custom_id": "c", "response": {"status_code": 200, "body": {
        "model": "no-such-model", "usage": {"prompt_tokens": 5}}}})), Pricer(), NOW)
    assert unknown["cost_usd"] is None and unknown["input_tokens"] == 5


def batch_obj(bid, status, **kw):
    base = {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-in",
            "completion_window": "24h", "status": status, "created_at": 1000}
    return {**base, **kw}


def part_ops(part_id: str, upload_id: str, chunk: bytes) -> list:
    """What the writer makes of ``POST /v1/uploads/{id}/parts`` carrying ``chunk``."""
    path = f"/v1/uploads/{upload_id}/parts"
    s = CallSnapshot(flow_id="f", method="POST", host="api.openai.com", path=path, route=classify("POST", path),
                     key_fingerprint=None, tags={},
                     request_headers={"content-type": "multipart/form-data; boundary=pb"}, request_body=None,
                     request_encoding=None, started_at=time.time(), status_code=200, ended_at=time.time())
    body = multipart_body("pb", [("data", "blob", chunk)])
    return list(ingest_buffered(s, body, {"id": part_id, "object": "upload.part"}, Pricer(), []))


def apply(store, ops):
    store.apply(ops)


def input_ops(file_id: str, data: bytes) -> list:
    """What ingest emits for an input file's lines: the rows, then the whole-file checks."""
    rows = [{**request_row(x), "line_no": x.no, "file_id": file_id} for x in LineSplitter().split(data)]
    return [RequestLines(rows), InputDone(file_id)]


def output_ops(file_id: str, data: bytes, p: Pricer) -> list:
    rows = [{**priced_result(x, p, NOW), "file_id": file_id} for x in LineSplitter().split(data)]
    return [ResultLines(rows), OutputDone(file_id)]


@pytest.fixture
def store(db_url):
    db = open_db(db_url)
    s = Store(db)
    yield s, db_url
    db.close()


def test_store_matching_idempotent_any_order(store):
    s, url = store
    p = Pricer()
    lines = b"".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini"}}) + b"\n" for i in range(5))
    outs = b"".join(orjson.dumps({"custom_id": f"c{i}", "response": {"status_code": 200, "body": {
        "model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 2}}}}) + b"\n"
        for i in reversed(range(5)))
    results_ops = output_ops("file-out", outs, p)
    reqs_ops = input_ops("file-in", lines)
    t = time.time()
    done = batches.batch_op(batch_obj("batch_1", "completed", output_file_id="file-out", in_progress_at=1010,
                                      finalizing_at=1100, completed_at=1130), t, "retrieve", p, None)
    early = batches.batch_op(batch_obj("batch_1", "in_progress", in_progress_at=1010), t - 5, "list", p, None)
    # answers first, then the batch, then a stale list page, then the inputs; all twice
    for _ in range(2):
        apply(s, results_ops)
        apply(s, [done])
        apply(s, [early])
        apply(s, reqs_ops)
    with bound(url):
        res = list(models.BatchResult.select())
        assert len(res) == 5 and all(r.request and r.request.custom_id == r.custom_id for r in res)
        assert models.BatchRequest.select().count() == 5
        b = models.Batch.get_by_id("batch_1")
        assert b.status == "completed"  # the stale observation did not win
        assert (b.queue_s, b.processing_s, b.finalize_s, b.turnaround_s) == (10, 90, 30, 130)
        events = {e.status: e for e in models.BatchEvent.select()}
        assert set(events) == {"completed", "in_progress"}  # each status once, however often seen
        assert events["in_progress"].observed_at < events["completed"].observed_at
        assert events["in_progress"].previous_status is None


def test_custom_id_scoped_per_batch(store):
    s, url = store
    p = Pricer()
    for n in (1, 2):
        line = orjson.dumps({"custom_id": "same", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "gpt-4o-mini", "n": n}}) + b"\n"
        out = orjson.dumps({"custom_id": "same", "response": {"status_code": 200, "body": {"n": n}}}) + b"\n"
        apply(s, [*input_ops(f"in{n}", line),
                  batches.batch_op(batch_obj(f"b{n}", "completed", input_file_id=f"in{n}",
                                             output_file_id=f"out{n}"),
                                   time.time(), "retrieve", p, None),
                  *output_ops(f"out{n}", out, p)])
    with bound(url):
        for r in models.BatchResult.select():
            assert orjson.loads(r.request.body)["n"] == orjson.loads(r.body)["n"]


def test_upload_parts_stitched(store):
    s, url = store
    data = b"".join(orjson.dumps({"custom_id": f"u{i}", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"model": "m", "input": "x" * i}}) + b"\n" for i in range(1, 8))
    cuts = [0, 5, 40, 41, 150, len(data) - 3, len(data)]  # a part with no newline at all, a tiny tail
    parts = [data[a:b] for a, b in itertools.pairwise(cuts)]
    ids = [f"part_{i}" for i in range(len(parts))]
    for pid, chunk in reversed(list(zip(ids, parts, strict=True))):  # out of order
        apply(s, part_ops(pid, "up1", chunk))
    apply(s, [UploadCompleted("up1", ids, {"id": "file-up", "purpose": "batch", "first_seen_at": NOW,
                                           "updated_at": NOW})])
    with bound(url):
        got = [(r.line_no, r.custom_id, r.problem) for r in
               models.BatchRequest.select().where(models.BatchRequest.file_id == "file-up")
               .order_by(models.BatchRequest.line_no)]
        assert got == [(i, f"u{i}", None) for i in range(1, 8)]
        assert models.File.get_by_id("file-up").lines == 7


def test_fifty_thousand_lines(store):
    """Correctness at size (speed belongs to the benchmarks)."""
    s, url = store
    p = Pricer()
    n = 50_000
    data = b"".join(b'{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":'
                    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"q %d"}]}}\n' % (i, i)
                    for i in range(n))
    out = b"".join(b'{"id":"batch_req_%d","custom_id":"r%d","response":{"status_code":200,"request_id":"x",'
                   b'"body":{"model":"gpt-4o-mini","usage":{"prompt_tokens":7,"completion_tokens":3}}},'
                   b'"error":null}\n' % (i, i) for i in reversed(range(n)))
    apply(s, input_ops("big-in", data))
    apply(s, [batches.batch_op(batch_obj("big", "completed", input_file_id="big-in", output_file_id="big-out"),
                               time.time(), "retrieve", p, None)])
    apply(s, output_ops("big-out", out, p))
    with bound(url):
        q = models.BatchResult.select().where(models.BatchResult.batch_id == "big")
        assert q.count() == n
        assert q.where(models.BatchResult.request.is_null()).count() == 0
        r = models.BatchResult.get(models.BatchResult.custom_id == "r4242")
        assert r.request.line_no == 4243 and orjson.loads(r.request.body)["messages"][0]["content"] == "q 4242"
        total = sum(x.cost_usd for x in q)
        assert total == pytest.approx(n * Pricer().cost("gpt-4o-mini", Tokens(7, 3), batch=True))
