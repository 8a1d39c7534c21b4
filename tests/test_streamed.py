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
from support.helpers import snapshot as make_snapshot
from support.rig import bound
from test_batch_units import multipart_body
from test_inspect import upload_flow
from velvet_core.addon import Velvet
from velvet_core.capture.tap import BodyTap
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.jsonl import LineSplitter
from velvet_core.parsing.lines import request_row
from velvet_core.parsing.multipart import fields
from velvet_core.processing.batch_files import (
    ContentIngest,
    PartIngest,
    UploadIngest,
    form_field,
    ingest_buffered,
    ingest_streamed,
    priced_result,
)
from velvet_core.processing.calls import utc
from velvet_core.storage import models
from velvet_core.storage.ops import FileSeen, InputDone, OutputDone, RequestLines, ResultLines
from velvet_core.storage.snapshot import CallSnapshot, TapInfo

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


def run(ingest, chunks: list[bytes], whole: bool = True) -> list:
    ops = []
    for c in chunks:
        ops += list(ingest.feed(c))
    ops += list(ingest.end(whole))
    return [r for op in ops if isinstance(op, RequestLines | ResultLines) for r in op.rows]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=30), st.frozensets(st.integers(1, 12), max_size=3))
def test_streamed_upload_equals_buffered(cuts, bad):
    data = lines_of(12, bad)
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", data)])
    ingest = UploadIngest("file-k", f"multipart/form-data; boundary={B}", None)
    rows = run(ingest, pieces(body, cuts))
    buffered = fields(body, B)  # the whole-body multipart helper
    want = [{**request_row(line), "line_no": line.no, "file_id": "file-k"}
            for line in LineSplitter().split(buffered["file"])]
    assert rows == want and ingest.lines == 12 and ingest.bad == len(bad)
    assert not ingest.problems
    ct = f"multipart/form-data; boundary={B}"
    assert form_field(ct, None, lambda size: iter(pieces(body, cuts))) == "batch"
    after = multipart_body(B, [("file", "in.jsonl", data), ("purpose", None, b" batch\r\n")])  # curl's order
    assert form_field(ct, None, lambda size: iter(pieces(after, cuts))) == "batch"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=30), st.integers(0, 40), st.integers(0, 40))
def test_streamed_part_equals_buffered(cuts, head_cut, tail_cut):
    data = lines_of(6)
    data = data[head_cut:len(data) - tail_cut]
    body = multipart_body(B, [("data", "blob", data)])
    ingest = PartIngest("part_1", f"multipart/form-data; boundary={B}", None)
    rows = run(ingest, pieces(body, cuts))
    first, last = data.find(b"\n"), data.rfind(b"\n")  # a part's whole lines lie between its first and
    want = {"rows": [] if first < 0 else [  # last newline; the edges wait for the upload's completion
        {**request_row(line), "part_line_no": line.no} for line in LineSplitter().split(data[first + 1:last + 1])],
        "part": {"head": data if first < 0 else data[:first], "tail": None if first < 0 else data[last + 1:]}}
    assert [{k: v for k, v in r.items() if k != "upload_part_id"} for r in rows] == want["rows"]
    assert all(r["upload_part_id"] == "part_1" for r in rows)
    assert ingest.head == want["part"]["head"]
    assert (ingest.tail if not ingest.in_head else None) == want["part"]["tail"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 500), max_size=30))
def test_streamed_download_equals_buffered(cuts):
    out = b"".join(orjson.dumps({"id": f"r{i}", "custom_id": f"s-{i}", "response": {
        "status_code": 200,
        "body": {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 4, "completion_tokens": 5}}},
        "error": None}) + b"\n" for i in range(8))
    ingest = ContentIngest("file-out", "gzip", Pricer(), NOW)
    rows = run(ingest, pieces(gzip.compress(out), cuts))
    want = [priced_result(line, Pricer(), NOW) for line in LineSplitter().split(out)]
    assert rows == [{**r, "file_id": "file-out"} for r in want]
    assert ingest.mode == "results"
    again = ContentIngest("file-in", None, Pricer(), NOW)
    assert len(run(again, [lines_of(3)])) == 3 and again.mode == "requests"


def test_truncated_or_garbled_streams_say_so():
    ingest = UploadIngest("file-k", f"multipart/form-data; boundary={B}", None)
    body = multipart_body(B, [("file", "in.jsonl", lines_of(5))])
    run(ingest, [body[: len(body) // 2]])
    assert ingest.problems and "truncated" in ingest.problems[0]
    bad = ContentIngest("f", "gzip", Pricer(), NOW)
    run(bad, [b"definitely not gzip"])
    assert bad.failed and bad.problems
    with pytest.raises(Exception, match="not a multipart body"):
        UploadIngest("file-k", "application/json", None)
    cut = ContentIngest("f", None, Pricer(), NOW)
    assert len(run(cut, [lines_of(3)[:-20]], whole=False)) == 2  # the partial last line is not a line


def test_tap_keeps_the_body_on_disk(tmp_path):
    tap = BodyTap(tmp_path / "streams")
    chunks = [bytes([65 + i]) * 30_000 for i in range(10)]
    for c in chunks:
        assert tap(c) is c  # passed on untouched
    assert tap(b"") == b"" and tap.finished and tap.bytes == 300_000
    assert tap.path is not None and tap.path.read_bytes() == b"".join(chunks)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    broken = BodyTap(blocked / "streams")
    assert broken(b"abc") == b"abc" and broken(b"def") == b"def"  # the flow goes on
    assert broken.broken and broken.bytes == 6


def snapshot(path: str, method: str = "POST", status: int | None = 200, error: str | None = None,
             ct: str = f"multipart/form-data; boundary={B}") -> CallSnapshot:
    return make_snapshot(path, method, request_headers={"content-type": ct}, started_at=time.time(),
                         status_code=status, ended_at=time.time(), error=error)


def spilled(tmp_path, data: bytes, finished: bool = True) -> TapInfo:
    tap = BodyTap(tmp_path / "streams")
    tap(data)
    if finished:
        tap(b"")
    tap.close()
    return TapInfo(tap.path, tap.bytes, tap.finished, tap.broken)


def test_ingest_streamed_outcomes(tmp_path):
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", lines_of(1200))])
    tap = spilled(tmp_path, body)
    problems: list[str] = []
    ops = list(ingest_streamed(snapshot("/v1/files"), tap, {"id": "file-1", "object": "file",
                                                           "purpose": "batch"}, Pricer(), problems))
    assert [type(op) for op in ops] == [RequestLines] * 3 + [FileSeen, InputDone] and not problems
    assert sum(len(op.rows) for op in ops if isinstance(op, RequestLines)) == 1200
    assert ops[3].row["lines"] == 1200 and ops[3].row["complete"] is True
    assert tap.path.exists()  # kept until the flow is written: the writer removes it then (test_writer_*)

    cut = spilled(tmp_path, body[:500], finished=False)
    problems = []
    ops = list(ingest_streamed(snapshot("/v1/files", status=None, error="client disconnected"), cut, None,
                               Pricer(), problems))
    assert ops == [] and "cut off after 500 bytes" in problems[0]

    refused = spilled(tmp_path, body)
    problems = []
    assert list(ingest_streamed(snapshot("/v1/files", status=400), refused, {"error": {}}, Pricer(),
                                problems)) == []

    out = b'{"custom_id":"s-1","response":{"status_code":200,"body":{}}}\n{"custom_id":"s-2","resp'
    partial = spilled(tmp_path, out, finished=False)
    problems = []
    ops = list(ingest_streamed(snapshot("/v1/files/file-out/content", "GET", error="server hung up"), partial,
                               None, Pricer(), problems))
    file = next(op.row for op in ops if isinstance(op, FileSeen))
    assert file["complete"] is False and file["lines"] == 1 and "cut off" in file["problem"]
    assert ops[-1] == OutputDone("file-out")


def test_addon_taps_big_and_already_streamed_bodies_only(tmp_path):
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=f"sqlite:///{tmp_path}/v.db", velvet_spool_dir=str(tmp_path / "spool"),
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
            gz = tflow.tflow(req=dl.request.copy(), resp=tutils.tresp(
                status_code=200, content=b"", headers=http.Headers(**{"content-length": "100",
                                                                      "content-encoding": "gzip"})))
            v.requestheaders(gz)
            v.responseheaders(gz)
            assert isinstance(gz.response.stream, BodyTap)  # 100 bytes of gzip may be 100 MB of lines
            small = tflow.tflow(req=dl.request.copy(), resp=tutils.tresp(
                status_code=200, content=b"", headers=http.Headers(**{"content-length": "100"})))
            v.requestheaders(small)
            v.responseheaders(small)
            assert small.response.stream is False
        finally:
            v.done()


def test_streamed_upload_into_the_database(tmp_path):
    """Hooks + tap + writer on a real SQLite file: every line bound to the file id from the response."""
    url = f"sqlite:///{tmp_path}/v.db"
    v = Velvet()
    data = lines_of(2000, bad=frozenset({7}))
    body = multipart_body(B, [("purpose", None, b"batch"), ("file", "in.jsonl", data)])
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=url, velvet_spool_dir=str(tmp_path / "spool"), velvet_stream_threshold=1000)
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
        assert tap.path.stat().st_size == len(body)
        v.responseheaders(f)
        v.response(f)
        v.done()
    with bound(url):
        reqs = models.BatchRequest.select().where(models.BatchRequest.file_id == "file-big")
        assert reqs.count() == 2000
        file = models.File.get_by_id("file-big")
        assert (file.lines, file.bad_lines, file.complete) == (2000, 1, True)
        call = models.Call.get()
        assert call.request_bytes == len(body) and call.complete and "streamed" not in (call.problem or "")
    assert not list((tmp_path / "spool" / "streams").glob("*.part"))  # spill files removed


def test_compressed_download_is_parsed_in_bounded_memory(tmp_path):
    """100 MB of output lines that gzip to almost nothing: what one read decodes to stays small."""
    import tracemalloc

    line = orjson.dumps({"custom_id": "c", "response": {"status_code": 200, "body": {"x": "y" * 2000}}}) + b"\n"
    raw = gzip.compress(line * 50_000, compresslevel=6)
    assert len(raw) < 2_000_000 and len(line) * 50_000 > 100_000_000
    tap = spilled(tmp_path, raw)
    s = snapshot("/v1/files/file-z/content", "GET")
    s.response_encoding = "gzip"
    tracemalloc.start()
    rows = 0
    for op in ingest_streamed(s, tap, None, Pricer(), []):
        rows += len(op.rows) if isinstance(op, ResultLines) else 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == 50_000
    assert peak < 40_000_000, f"peak {peak / 1e6:.0f} MB"


def test_a_bug_while_parsing_a_streamed_body_keeps_the_call_row(tmp_path, monkeypatch):
    from velvet_core.processing import batch_files

    def broken(*a, **k):
        yield RequestLines([])
        raise RuntimeError("parser bug")

    monkeypatch.setattr("velvet_core.processing.processor.ingest_streamed", broken)
    assert batch_files.ingest_streamed is not broken
    url = f"sqlite:///{tmp_path}/v.db"
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=url, velvet_spool_dir=str(tmp_path / "spool"), velvet_stream_threshold=10)
        v.running()
        f = upload_flow(b"", resp=b'{"id":"file-b","object":"file","purpose":"batch"}')
        f.request.headers["content-length"] = "100"
        v.requestheaders(f)
        f.request.stream(b"x" * 100)
        f.request.stream(b"")
        v.responseheaders(f)
        v.response(f)
        v.done()
    with bound(url):
        call = models.Call.get()
        assert "parser bug" in call.problem and call.status_code == 200


def test_unreadable_streamed_bodies_still_leave_a_file_row(tmp_path):
    problems: list[str] = []
    tap = spilled(tmp_path, b"not multipart at all")
    ops = list(ingest_streamed(snapshot("/v1/files", ct="application/json"), tap,
                               {"id": "file-j", "object": "file", "purpose": "batch"}, Pricer(), problems))
    assert len(ops) == 1 and isinstance(ops[0], FileSeen) and ops[0].row["complete"] is False
    assert "not a multipart body" in ops[0].row["problem"]
    s = snapshot("/v1/files/file-c/content", "GET")
    s.response_encoding = "compress"
    problems = []
    ops = list(ingest_streamed(s, spilled(tmp_path, b"xx"), None, Pricer(), problems))
    assert ops[0].row["complete"] is False and "unsupported content-encoding" in ops[0].row["problem"]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("order", ["purpose first", "file first"])
def test_upload_purpose_from_the_form_when_the_response_has_none(tmp_path, streamed, order):
    """A server that does not echo ``purpose``: the form decides, and no other purpose leaves lines."""

    def ops_for(purpose: bytes) -> list:
        parts = [("purpose", None, purpose), ("file", "in.jsonl", lines_of(3))]
        body = multipart_body(B, parts if order == "purpose first" else parts[::-1])
        resp = {"id": "file-x", "object": "file", "filename": "in.jsonl"}  # no purpose
        s = snapshot("/v1/files")
        if streamed:
            return list(ingest_streamed(s, spilled(tmp_path, body), resp, Pricer(), []))
        return list(ingest_buffered(s, body, resp, Pricer(), []))

    ops = ops_for(b"fine-tune")
    assert not [op for op in ops if isinstance(op, RequestLines)]
    assert ops == [FileSeen({"id": "file-x", "purpose": "fine-tune", "filename": "in.jsonl", "bytes": None,
                             "created_at": None, "expires_at": None, "status": None,
                             "first_seen_at": ops[0].row["first_seen_at"],
                             "updated_at": ops[0].row["updated_at"]})]
    ops = ops_for(b"batch")
    assert sum(len(op.rows) for op in ops if isinstance(op, RequestLines)) == 3
    file = next(op.row for op in ops if isinstance(op, FileSeen))
    assert file["role"] == "input" and file["purpose"] == "batch" and file["lines"] == 3
    assert ops[-1] == InputDone("file-x")


def test_tap_keeps_a_bounded_copy_for_the_flow(tmp_path):
    chunks = [bytes([65 + i]) * 1000 for i in range(10)]
    small = BodyTap(tmp_path / "streams", keep=10_000)
    for c in chunks:
        small(c)
        assert small.kept() is None  # not before the end
    small(b"")
    assert small.kept() == b"".join(chunks) and small.kept_bytes == 10_000
    assert small.path.read_bytes() == b"".join(chunks)  # still parsed from disk
    big = BodyTap(tmp_path / "streams", keep=10_000)
    held = []
    for c in [*chunks, b"x" * 1]:
        big(c)
        held.append(big.kept_bytes)
    big(b"")
    assert max(held) <= 10_000 and big.kept_bytes == 0 and big.kept() is None  # given up past the bound
    cut = BodyTap(tmp_path / "streams", keep=10_000)
    cut(b"abc")
    assert cut.kept() is None  # no end of body: not whole, not put back
    assert BodyTap(tmp_path / "streams").kept_bytes == 0  # keep=0 (the default) holds nothing


def test_small_compressed_download_goes_back_into_the_flow(tmp_path):
    """A tapped download no bigger than velvet_stream_threshold on the wire is put back into the flow
    (mitmweb shows it); a bigger one is not (memory stays bounded); both are parsed from the spill file."""
    url = f"sqlite:///{tmp_path}/v.db"
    v = Velvet()

    def download(file_id: str, n: int):
        out = b"".join(orjson.dumps({"id": f"r{i}", "custom_id": f"{file_id}-{i}", "response": {
            "status_code": 200, "body": {"model": "gpt-4o-mini", "x": "y" * (i * 37 % 101)}}}) + b"\n"
            for i in range(n))
        wire = gzip.compress(out)
        f = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"GET",
                                        path=f"/v1/files/{file_id}/content".encode(), content=b"",
                                        headers=http.Headers(host="api.openai.com")),
                        resp=tutils.tresp(status_code=200, content=b"", headers=http.Headers(**{
                            "content-length": str(len(wire)), "content-encoding": "gzip",
                            "content-type": "application/octet-stream"})))
        v.requestheaders(f)
        v.responseheaders(f)
        tap = f.response.stream
        assert isinstance(tap, BodyTap)
        for i in range(0, len(wire), 700):
            tap(wire[i:i + 700])
        tap(b"")
        f.response.raw_content = None  # as mitmproxy leaves a streamed body
        v.response(f)
        return f, out, wire

    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_db=url, velvet_spool_dir=str(tmp_path / "spool"), velvet_stream_threshold=4000)
        v.running()
        small, small_out, wire = download("file-s", 20)
        assert len(wire) <= 4000 and small.response.raw_content == wire
        assert small.response.content == small_out  # what mitmweb's view decodes
        big, _, wire = download("file-b", 1500)
        assert len(wire) > 4000 and big.response.raw_content is None
        v.done()
    with bound(url):
        lines = {f: models.BatchResult.select().where(models.BatchResult.file_id == f).count()
                 for f in ("file-s", "file-b")}
    assert lines == {"file-s": 20, "file-b": 1500}


@pytest.mark.parametrize("value", [True, 7, {"a": 1}, ["gpt-4o"], None])
def test_stream_values_that_are_not_text_are_not_kept_as_text(db_url, tmp_path, value):
    """A stream whose model, service tier or finish reason is not a JSON string (hypothesis sent "model": true):
    the call is stored whole with those left empty, on both backends (PostgreSQL refused the rollup's
    comparison of a text column with a boolean, and the row went to the dead letters)."""
    import time

    import orjson
    from support.helpers import calls, snapshot, start_writer
    from velvet_core.parsing.sse import reassemble

    meta = {"id": "c1", "object": "chat.completion.chunk", "model": value, "service_tier": value}
    events = [{**meta, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
              {**meta, "choices": [{"index": 0, "delta": {}, "finish_reason": value}]}]
    sse = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    res = reassemble(sse, "chat.completions")
    assert res.text == "hi" and res.model is None and res.service_tier is None and res.finish_reason is None
    done = {"type": "response.completed", "response": {"id": "r1", "model": value, "status": value,
                                                        "service_tier": value, "output": []}}
    res = reassemble(b"event: response.completed\ndata: " + orjson.dumps(done) + b"\n\n", "responses")
    assert res.model is None and res.finish_reason is None and res.service_tier is None
    now = time.time()
    s = snapshot(flow_id="odd", request_headers={"content-type": "application/json"}, started_at=now,
                 request_body=b'{"model":"gpt-4o-mini","stream":true,"messages":[]}', ended_at=now + 0.01,
                 status_code=200, response_headers={"content-type": "text/event-stream"}, response_body=sse,
                 stream_chunks=[(now, sse)])
    w = start_writer(db_url, tmp_path / "spool", [s])
    assert w.health.dead_lettered == 0
    row = calls(db_url)["odd"]
    assert row.model is None and row.model_requested == "gpt-4o-mini" and row.response_text == "hi"


def test_a_stream_the_client_hangs_up_on_after_its_end_is_cached_and_a_cut_one_is_not(db_url, tmp_path):
    """A client may close the connection right after a stream's end event, before the end of the HTTP body: the
    flow ends in an error, but the answer is whole. Its call row is complete and, asked for by the cache, it is
    stored, as the same stream ended cleanly is. A stream cut before its end event, and a plain answer whose flow
    failed, are not (the row and the entry decide alike)."""
    from support.helpers import calls, q, start_writer

    now = time.time()
    meta = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18"}
    events = [{**meta, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
              {**meta, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    sse = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    cut = sse[:sse.index(b"data: [DONE]")]
    answer = orjson.dumps({"id": "c2", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                        "finish_reason": "stop"}]})

    def snap(fid: str, data: bytes, error: str | None, stream: bool = True) -> CallSnapshot:
        return make_snapshot(
            flow_id=fid, request_headers={"content-type": "application/json"}, started_at=now,
            request_body=b'{"model":"gpt-4o-mini","stream":true,"messages":[]}', ended_at=now + 0.01,
            status_code=200,
            response_headers={"content-type": "text/event-stream" if stream else "application/json"},
            response_body=None if stream else data, stream_chunks=[(now, data)] if stream else None,
            stream_finished=error is None, error=error,
            cache={"key": fid.ljust(64, "0"), "ttl": 3600.0, "bucket": 1})

    hung_up = "Client disconnected."
    start_writer(db_url, tmp_path / "spool", [
        snap("clean", sse, None), snap("hungup", sse, hung_up), snap("cut", cut, hung_up),
        snap("plain", answer, hung_up, stream=False)])
    rows = calls(db_url)
    assert [rows[f].complete for f in ("clean", "hungup", "cut", "plain")] == [True, True, False, False]
    stored = {r["flow_id"]: r for r in q(db_url, "SELECT flow_id, stream, body FROM cache_entries")}
    assert sorted(stored) == ["clean", "hungup"]
    assert stored["hungup"]["body"] == stored["clean"]["body"] and '"hi"' in stored["hungup"]["body"]
