"""Answers and batch lines that are not valid UTF-8 are kept with the bad bytes replaced (issue 24 item
10), end to end through a real mitmdump and the stand-in, on both backends."""

from __future__ import annotations

import io

import orjson
from support.rig import call_row, wait_for
from support.standin.server import new_id
from test_e2e_batch import chat_lines, jsonl, rows, run_batch
from velvet_core.storage.models import BatchRequest, BatchResult

BAD = b"\xff\xfe\xc3"  # three bytes that are no UTF-8


def test_live_answer_with_bad_bytes_is_kept(proxy, standin, monkeypatch):
    rid = new_id("req_utf8_")
    answer = (b'{"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini", '
              b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "caf' + BAD + b'!"}, '
              b'"finish_reason": "stop"}], '
              b'"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}')
    key = standin.can(answer, headers=[(b"x-request-id", rid.encode())])
    client = proxy.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-standin-canned": key})
    assert r.http_response.content == answer  # the client gets the bytes as they were
    row = call_row(proxy.db_url, rid)
    assert row.response_bytes == len(answer)
    body = orjson.loads(row.response_body)
    assert body["choices"][0]["message"]["content"] == "caf\ufffd\ufffd\ufffd!"
    assert row.output_tokens == 2 and row.finish_reason == "stop"  # parsed, not only kept
    assert row.problem == "response body is not UTF-8 (3 invalid byte sequences replaced by U+FFFD)"


def test_live_text_answer_with_bad_bytes_is_kept(proxy, standin, monkeypatch):
    rid = new_id("req_utf8_")
    key = standin.can(b"not json " + BAD, headers=[(b"x-request-id", rid.encode())], content_type=b"text/plain")
    client = proxy.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-standin-canned": key})
    assert r.http_response.content == b"not json " + BAD
    row = call_row(proxy.db_url, rid)
    assert orjson.loads(row.response_body) == "not json \ufffd\ufffd\ufffd"
    assert "not UTF-8 (3 invalid byte sequences replaced by U+FFFD)" in row.problem


def stored(url, model, where, n):
    """The ``n`` rows, waited for longer than usual: the first batch of a module comes with the migrations."""
    return wait_for(lambda: len(r := rows(url, model, where)) == n and r, timeout=60, what=model.__name__)


def test_batch_lines_with_bad_bytes_keep_their_custom_id(proxy, standin, monkeypatch):
    client = proxy.client(monkeypatch)
    lines = chat_lines(3, prefix="u8")
    data = jsonl(lines).replace(b"question number 2", b"question " + BAD)
    f = client.files.create(file=("u8.jsonl", io.BytesIO(data)), purpose="batch")
    b, _ = run_batch(client, f.id)
    out = standin.batch_api.content[b.output_file_id]
    standin.batch_api.content[b.output_file_id] = out.replace(b'"u8-3"', b'"u8-3", "note": "' + BAD + b'"')
    client.files.content(b.output_file_id).read()
    client.files.content(f.id).read()
    url = proxy.db_url
    reqs = {r.custom_id: r for r in stored(url, BatchRequest, BatchRequest.file_id == f.id, 3)}
    assert set(reqs) == {"u8-1", "u8-2", "u8-3"}
    assert "question \ufffd\ufffd\ufffd" in orjson.loads(reqs["u8-2"].body)["messages"][0]["content"]
    assert "3 invalid byte sequences replaced by U+FFFD" in reqs["u8-2"].problem and reqs["u8-1"].problem is None
    # (the stand-in cannot read line 2 either: it answers lines 1 and 3)
    res = {r.custom_id: r for r in stored(url, BatchResult, BatchResult.file_id == b.output_file_id, 2)}
    assert set(res) == {"u8-1", "u8-3"} and res["u8-1"].problem is None
    assert "replaced by U+FFFD" in res["u8-3"].problem and res["u8-3"].output_tokens
    assert orjson.loads(res["u8-3"].body)["object"] == "chat.completion"  # the answer, parsed
