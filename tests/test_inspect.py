"""Flow comments and markers, the batch JSONL contentview and the ``velvet.summary`` command."""

from __future__ import annotations

import asyncio
import datetime
import tracemalloc

import orjson
import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils
from support.helpers import multipart_body
from test_addon import flow
from velvet_core.capture.contentview import BatchJsonlContentview
from velvet_core.parsing.classify import classify
from velvet_core.processing import markers
from velvet_core.processing.comments import comment
from velvet_core.storage.ops import BatchSeen, CallRow, FileSeen, InputDone, OutputDone

BOUNDARY = "velvetboundary123"


def batch_line(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                       "content": f"q{i} " + "x" * pad}]}}) + b"\n"


def multipart(file: bytes, field: str = "file") -> bytes:
    return multipart_body(BOUNDARY, [("purpose", None, b"batch"), (field, "in.jsonl", file)])


def upload_flow(body: bytes, path="/v1/files", resp=b'{"id":"file-1","object":"file","purpose":"batch"}'):
    req = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST", path=path.encode(),
                      content=body, headers=http.Headers(
                          host="api.openai.com", **{"content-type": f"multipart/form-data; boundary={BOUNDARY}"}))
    r = tutils.tresp(status_code=200, content=resp, headers=http.Headers(**{"content-type": "application/json"}))
    return tflow.tflow(req=req, resp=r)


def content_flow(body: bytes, gz: bool = False):
    req = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"GET",
                      path=b"/v1/files/file-out/content", content=b"", headers=http.Headers(host="api.openai.com"))
    hdrs = {"content-type": "application/jsonl"}
    if gz:
        hdrs["content-encoding"] = "gzip"
    r = tutils.tresp(status_code=200, content=b"", headers=http.Headers(**hdrs))
    r.content = body  # mitmproxy encodes it as the header says
    return tflow.tflow(req=req, resp=r)


def test_contentview_bounded_on_a_200mb_upload():
    lines = b"".join(batch_line(i, pad=4000) for i in range(1, 50_001))
    assert len(lines) > 200_000_000
    f = upload_flow(multipart(lines))
    contentviews.add(BatchJsonlContentview())
    with taddons.context():
        tracemalloc.start()
        res = contentviews.prettify_message(f.request, f)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert res.view_name == "Batch JSONL"
    assert res.text.startswith("File upload in.jsonl · 50,000 lines · 20")
    assert res.text.splitlines()[0].endswith(" bytes · the first 10 shown")
    assert '"custom_id": "c-1"' in res.text and "# line 10 · c-10" in res.text and "c-11" not in res.text
    assert "… 49,990 more lines" in res.text
    assert peak < 2_000_000  # a few lines decoded: no copy of the 200 MB body


@pytest.fixture
def views():
    contentviews.add(BatchJsonlContentview())
    with taddons.context() as tctx:
        yield tctx


def test_contentview_downloads_parts_and_others(views):
    out = b"".join(orjson.dumps({"id": f"r{i}", "custom_id": f"c-{i}", "response": {"status_code": 200,
                                 "body": {"model": "m"}}, "error": None}) + b"\n" for i in range(3))
    f = content_flow(out, gz=True)
    res = contentviews.prettify_message(f.response, f)
    assert res.view_name == "Batch JSONL" and "Batch file content · 3 lines" in res.text
    assert "# line 1 · c-0 · 200" in res.text and "more lines" not in res.text
    part = upload_flow(multipart(b'ial": 1}\n' + batch_line(1) + b'{"custom', field="data"),
                       path="/v1/uploads/upload_1/parts", resp=b'{"id":"part_1"}')
    res = contentviews.prettify_message(part.request, part)
    assert res.view_name == "Batch JSONL" and "Batch upload part · 3 lines" in res.text
    assert "# line 1: not JSON" in res.text and "# line 2 · c-1" in res.text
    chat = flow()
    assert contentviews.prettify_message(chat.request, chat).view_name != "Batch JSONL"
    bad = upload_flow(b"--nope\r\ngarbage")  # falls back to the raw view, never raises
    assert contentviews.prettify_message(bad.request, bad).view_name != "Batch JSONL"


NOW = datetime.datetime(2026, 11, 24, 10, 0)


def test_comments_and_markers():
    r = classify("POST", "/v1/chat/completions")
    row = {"status_code": 200, "model": "gpt-4o-mini", "total_tokens": 1234, "cost_usd": 0.0012,
           "latency_ms": 812.4}
    assert comment(r, row, [], {}) == "chat gpt-4o-mini · 1,234 tok · $0.0012 · 812 ms"
    assert comment(r, {**row, "usage_estimated": True}, [], {}) == \
        "chat gpt-4o-mini · ~1,234 tok · ~$0.0012 · 812 ms"
    assert markers.marker(r, 200) is None and markers.marker(r, 429) == markers.FAILED
    assert markers.marker(r, 200, complete=False) == markers.FAILED
    err = {"status_code": 429, "model_requested": "gpt-4o", "error_code": "rate_limit_exceeded"}
    assert comment(r, err, [], {}) == "chat gpt-4o · 429 rate_limit_exceeded"
    up = classify("POST", "/v1/files")
    ops = [CallRow({}), FileSeen({"id": "file-abc", "lines": 50_000, "bad_lines": 2}), InputDone("file-abc")]
    assert comment(up, {"status_code": 200}, ops, {}) == \
        "batch input · 50,000 lines (2 malformed) · file-abc"
    assert markers.marker(up, 200) == markers.UPLOAD
    b = classify("GET", "/v1/batches/batch_abc")
    seen: dict[str, str] = {}
    op = BatchSeen({"id": "batch_abc", "status": "in_progress", "request_total": 6, "request_completed": 2},
                   NOW, "retrieve")
    assert comment(b, {"status_code": 200}, [op], seen) == "batch batch_abc: in_progress (2/6 done)"
    op.row["status"] = "finalizing"
    assert comment(b, {"status_code": 200}, [op], seen).startswith(
        "batch batch_abc: in_progress → finalizing")
    assert markers.marker(b, 200, batch_status="finalizing") == markers.POLL
    assert markers.marker(b, 200, batch_status="completed") == markers.DONE
    assert markers.marker(b, 200, batch_status="expired") == markers.ENDED_BADLY
    dl = classify("GET", "/v1/files/file-x/content")
    ops = [FileSeen({"id": "file-x", "lines": 3}), OutputDone("file-x", all_failed=True)]
    assert comment(dl, {"status_code": 200}, ops, {}) == "batch errors · 3 lines · file-x"
    assert markers.marker(dl, 200) == markers.DOWNLOAD


async def wait_comment(f: http.HTTPFlow) -> str:
    for _ in range(200):
        if f.comment:
            return f.comment
        await asyncio.sleep(0.02)
    raise AssertionError("no comment")


@pytest.fixture
async def addon(sqlite_url, tmp_path):
    """The addon inside a running event loop, as in mitmdump (comments come back through the loop)."""
    from velvet_core.addon import Velvet

    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool"))
        v.running()
        assert not v.comments  # no flow list (as in mitmdump): no comments computed
        v.comments = True  # as in mitmweb, which has a view
        yield v
        v.done()


async def test_hooks_annotate_flows_and_keep_user_marks(addon):
    f = flow()
    await_cycle(addon, f)
    assert (await wait_comment(f)).startswith("chat gpt-4o-mini · 5 tok · $")
    assert f.marked == ""
    bad = flow(status=500, resp_body=b'{"error":{"message":"boom","type":"server_error"}}')
    await_cycle(addon, bad)
    assert bad.marked == markers.FAILED  # set at once in the hook
    assert await wait_comment(bad) == "chat gpt-4o-mini · 500 server_error"
    mine = flow(status=500)
    mine.marked, mine.comment = ":star:", "my note"
    await_cycle(addon, mine)
    await asyncio.sleep(0.5)
    assert (mine.marked, mine.comment) == (":star:", "my note")
    up = upload_flow(multipart(batch_line(1) + batch_line(2)))
    await_cycle(addon, up)
    assert up.marked == markers.UPLOAD
    assert await wait_comment(up) == "batch input · 2 lines · file-1"
    dl = content_flow(b'{"custom_id":"c-1","response":{"status_code":200,"body":{}}}\n')
    await_cycle(addon, dl)
    assert dl.marked == markers.DOWNLOAD and await wait_comment(dl) == "batch output · 1 lines · file-out"

    for _ in range(200):  # a comment is set as its row is prepared, a moment before the row is written
        summary = addon.summary()
        if summary.startswith("velvet: 5 calls"):
            break
        await asyncio.sleep(0.02)
    assert summary.startswith("velvet: 5 calls") and "batch lines" in summary


def await_cycle(addon, f):
    addon.requestheaders(f)
    addon.responseheaders(f)
    addon.response(f)


def test_summary_command_without_database(tmp_path):
    from mitmproxy import exceptions
    from velvet_core.addon import Velvet

    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_db=f"sqlite:///{tmp_path}/none.db")
        with pytest.raises(exceptions.CommandError, match="no database"):
            tctx.command(v.summary)
