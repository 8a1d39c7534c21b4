"""The streamed path for big batch bodies: the tap (event-loop side) and the ingests (writer side)."""

from __future__ import annotations

import gzip
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rig import bound
from test_batch_units import multipart_body
from test_inspect import upload_flow
from velvet_core import batches, models
from velvet_core.calls import utc
from velvet_core.capture import Velvet
from velvet_core.classify import classify
from velvet_core.ingest import ContentIngest, PartIngest, Streams, UploadIngest
from velvet_core.pricing import Pricer
from velvet_core.snapshot import CallSnapshot, TapInfo
from velvet_core.tap import BodyTap, Budget, Spilled

NOW = utc(time.time())
B = "bnd42"


def lines_of(n: int, bad: frozenset[int] = frozenset()) -> bytes:
    return b"".join((b"not json" if i in bad else orjson.dumps(
        {"custom_id": f"s-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {i}"}]}})) + b"\n"
        for i in range(1, n + 1))


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in cuts:
        out.append(data[i:i + n])
        i += n
    return [p for p in [*out, data[i:]] if p]


def run(ingest, chunks: list[bytes]) -> list:
    ops = []
    for c in chunks:
        ops += list(ingest.feed(c))
    ops += list(ingest.end())
    return [r for _, p in ops for r in p["rows"]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=30), st.frozensets(st.integers(1, 12), max_size=3))
def test_streamed_upload_equals_buffered(cuts, bad):
    data = lines_of(12, bad)
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", data)])
    ingest = UploadIngest("~k", f"multipart/form-data; boundary={B}", None)
    rows = run(ingest, pieces(body, cuts))
    buffered = batches.multipart_parts(body, f"multipart/form-data; boundary={B}", [])
    from velvet_core.batchlines import request_row
    from velvet_core.jsonl import LineSplitter

    want = [{**request_row(line), "line_no": line.no, "file_id": "~k"}
            for line in LineSplitter().split(buffered["file"][1])]
    assert rows == want and ingest.lines == 12 and ingest.bad == len(bad) and ingest.purpose == b"batch"
    assert not ingest.problems


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=30), st.integers(0, 40), st.integers(0, 40))
def test_streamed_part_equals_buffered(cuts, head_cut, tail_cut):
    data = lines_of(6)
    data = data[head_cut:len(data) - tail_cut]
    body = multipart_body(B, [("data", "blob", data)])
    ingest = PartIngest("~p", f"multipart/form-data; boundary={B}", None)
    rows = run(ingest, pieces(body, cuts))
    want = batches.split_part("~p", "u", data, NOW)
    assert [{k: v for k, v in r.items() if k != "upload_part_id"} for r in rows] == want["rows"]
    assert ingest.head == want["part"]["head"]
    assert (ingest.tail if not ingest.in_head else None) == want["part"]["tail"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 500), max_size=30))
def test_streamed_download_equals_buffered(cuts):
    out = b"".join(orjson.dumps({"id": f"r{i}", "custom_id": f"s-{i}", "response": {
        "status_code": 200,
        "body": {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 4, "completion_tokens": 5}}},
        "error": None}) + b"\n" for i in range(8))
    wire = gzip.compress(out)
    ingest = ContentIngest("~c", "file-out", "gzip", Pricer(), NOW)
    rows = run(ingest, pieces(wire, cuts))
    ops = batches._file_content(out, "file-out", NOW, Pricer())
    assert rows == [{**r, "file_id": "file-out"} for r in ops[1][1]["rows"]]
    assert ingest.mode == "results"
    again = ContentIngest("~i", "file-in", None, Pricer(), NOW)
    assert len(run(again, [lines_of(3)])) == 3 and again.mode == "requests"


def test_truncated_or_garbled_streams_say_so():
    ingest = UploadIngest("~k", f"multipart/form-data; boundary={B}", None)
    body = multipart_body(B, [("file", "in.jsonl", lines_of(5))])
    run(ingest, [body[: len(body) // 2]])
    assert ingest.problems and "truncated" in ingest.problems[0]
    bad = ContentIngest("~c", "f", "gzip", Pricer(), NOW)
    run(bad, [b"definitely not gzip"])
    assert bad.failed and bad.problems
    with pytest.raises(Exception, match="not a multipart body"):
        UploadIngest("~k", "application/json", None)


def test_tap_budget_then_spill_keeps_order(tmp_path):
    items = []
    budget = Budget(100)
    tap = BodyTap("~t", lambda kind, p: items.append((kind, p)) or True, budget, tmp_path)
    chunks = [bytes([65 + i]) * 30 for i in range(10)]
    for c in chunks:
        assert tap(c) is c  # passed on untouched
    assert tap(b"") == b"" and tap.finished and tap.bytes == 300
    kinds = [type(p[1]).__name__ for _, p in items]
    assert kinds[:3] == ["bytes"] * 3 and set(kinds[3:]) == {"Spilled"}
    assert len(items) == 4  # the spilled chunks coalesced into one run while the writer had not taken it
    got = b"".join(p[1] if isinstance(p[1], bytes) else b"".join(p[1].pieces(size=7)) for _, p in items)
    assert got == b"".join(chunks)
    # once the writer has taken a run, a new one starts where it ended
    tap2 = BodyTap("~u", lambda kind, p: items.append((kind, p)) or True, Budget(0), tmp_path)
    tap2(b"x" * 10)
    run1: Spilled = items[-1][1][1]
    assert b"".join(run1.pieces()) == b"x" * 10
    tap2(b"y" * 5)
    run2: Spilled = items[-1][1][1]
    assert run2 is not run1 and run2.offset == 10 and b"".join(run2.pieces()) == b"y" * 5


def test_tap_full_queue_marks_the_body_lost(tmp_path):
    tap = BodyTap("~t", lambda kind, p: False, Budget(1000), tmp_path)
    assert tap(b"abc") == b"abc" and tap(b"def") == b"def"
    assert tap.broken and "queue was full" in tap.broken


def snapshot(path: str, method: str = "POST", status: int | None = 200, error: str | None = None) -> CallSnapshot:
    return CallSnapshot(flow_id="f1", method=method, host="api.openai.com", path=path,
                        route=classify(method, path), key_fingerprint=None, tags={}, request_headers={},
                        request_body=None, request_encoding=None, started_at=time.time(), status_code=status,
                        ended_at=time.time(), error=error)


def test_streams_bind_drop_and_cut(tmp_path):
    budget = Budget(1 << 20)
    streams = Streams(budget, Pricer)
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", lines_of(3))])
    streams.start({"key": "~a", "kind": "upload", "content_type": f"multipart/form-data; boundary={B}",
                   "encoding": None})
    budget.take(len(body))
    staged = list(streams.chunk(("~a", body)))
    assert budget.inflight == 0 and sum(len(p["rows"]) for _, p in staged) == 0  # under ROWS_PER_OP: kept
    ops, problems = streams.finish(snapshot("/v1/files"), TapInfo("~a", len(body), True),
                                   {"id": "file-1", "object": "file", "purpose": "batch"})
    kinds = [k for k, _ in ops]
    assert kinds == ["stage_requests", "file", "bind_staged"] and not problems
    assert ops[1][1]["lines"] == 3 and ops[1][1]["complete"] is True

    streams.start({"key": "~b", "kind": "upload", "content_type": f"multipart/form-data; boundary={B}",
                   "encoding": None})
    list(streams.chunk(("~b", body[:50])))
    ops, problems = streams.finish(snapshot("/v1/files", status=None, error="client disconnected"),
                                   TapInfo("~b", 50, False), None)
    assert ops[-1] == ("drop_staged", {"key": "~b"}) and "cut off after 50 bytes" in problems[0]

    streams.start({"key": "~c", "kind": "content", "file_id": "file-out", "encoding": None, "seen": NOW})
    list(streams.chunk(("~c", b'{"custom_id":"s-1","response":{"status_code":200,"body":{}}}\n{"cus')))
    ops, problems = streams.finish(snapshot("/v1/files/file-out/content", "GET", error="server hung up"),
                                   TapInfo("~c", 70, False), None)
    file = next(p for k, p in ops if k == "file")
    assert file["complete"] is False and file["lines"] == 1 and "cut off" in file["problem"]

    ops, problems = streams.finish(snapshot("/v1/files/file-x/content", "GET"), TapInfo("~zz", 9, True), None)
    assert ops[0][1]["complete"] is False and "lost" in problems[0]


def test_addon_taps_big_and_already_streamed_bodies_only(tmp_path):
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_db=f"sqlite:///{tmp_path}/v.db", velvet_spool_dir=str(tmp_path / "spool"),
                       velvet_stream_threshold=1000)
        v.running()
        try:
            small = upload_flow(multipart_body(B, [("file", "a.jsonl", lines_of(2))]))
            v.requestheaders(small)
            assert small.request.stream is False  # small: buffered, so mitmweb shows it
            big = upload_flow(b"")
            big.request.headers["content-length"] = "5000"
            v.requestheaders(big)
            assert isinstance(big.request.stream, BodyTap)
            sl = upload_flow(b"")
            sl.request.stream = True  # what stream_large_bodies does before our hook
            v.requestheaders(sl)
            assert isinstance(sl.request.stream, BodyTap)
            other = upload_flow(b"", path="/v1/chat/completions")
            other.request.stream = True
            v.requestheaders(other)
            assert other.request.stream is True  # not a batch body: left to mitmproxy
            mine = upload_flow(b"")
            mine.request.headers["content-length"] = "5000"
            mine.request.stream = lambda d: d  # another addon's callable wins
            v.requestheaders(mine)
            assert not isinstance(mine.request.stream, BodyTap)
            dl = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"GET",
                                             path=b"/v1/files/file-o/content", content=b"",
                                             headers=http.Headers(host="api.openai.com")),
                             resp=tutils.tresp(status_code=200, content=b"",
                                               headers=http.Headers(**{"transfer-encoding": "chunked"})))
            v.requestheaders(dl)
            v.responseheaders(dl)
            assert isinstance(dl.response.stream, BodyTap)  # a download of unknown size
        finally:
            v.done()


def test_streamed_upload_into_the_database(tmp_path):
    """Hooks + tap + writer on a real SQLite file: every line bound to the file id from the response."""
    url = f"sqlite:///{tmp_path}/v.db"
    v = Velvet()
    data = lines_of(2000, bad=frozenset({7}))
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", data)])
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_db=url, velvet_spool_dir=str(tmp_path / "spool"), velvet_stream_threshold=1000,
                       velvet_stream_memory=1 << 20)
        v.running()
        f = upload_flow(b"", resp=b'{"id":"file-big","object":"file","purpose":"batch","bytes":1}')
        f.request.headers["content-length"] = str(len(body))
        f.request.headers["content-type"] = f"multipart/form-data; boundary={B}"
        v.requestheaders(f)
        tap = f.request.stream
        for i in range(0, len(body), 8192):
            tap(body[i:i + 8192])
        tap(b"")
        f.request.raw_content = None
        v.responseheaders(f)
        v.response(f)
        v.done()
    with bound(url):
        reqs = models.BatchRequest.select().where(models.BatchRequest.file_id == "file-big")
        assert reqs.count() == 2000
        assert models.BatchRequest.select().where(models.BatchRequest.file_id.startswith("~")).count() == 0
        file = models.File.get_by_id("file-big")
        assert (file.lines, file.bad_lines, file.complete) == (2000, 1, True)
        call = models.Call.get()
        assert call.request_bytes == len(body) and call.complete and "streamed" not in (call.problem or "")
    assert not list((tmp_path / "spool" / "streams").glob("*.part"))  # spill files removed
