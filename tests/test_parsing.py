"""Unit tests: classification, extraction, decoding, SSE reassembly."""

from __future__ import annotations

import gzip
import zlib

import brotli
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from velvet_core.parsing.classify import classify, normalise
from velvet_core.parsing.decode import DecodeError, Decoder, decode_body, zstd
from velvet_core.parsing.extract import api_error, key_fingerprint, ratelimits, safe_headers, tokens_from_usage
from velvet_core.parsing.sse import SSEParser, reassemble


@pytest.mark.parametrize(("method", "path", "kind", "action", "oid"), [
    ("POST", "/v1/chat/completions", "chat.completions", "create", None),
    ("GET", "/v1/chat/completions/cmpl_1", "chat.completions", "other", None),
    ("POST", "/v1/responses", "responses", "create", None),
    ("POST", "/v1/embeddings?x=1", "embeddings", "create", None),
    ("POST", "/v1/completions", "completions", "create", None),
    ("POST", "/v1/moderations", "moderations", "create", None),
    ("POST", "/v1/images/generations", "images", "create", None),
    ("POST", "/v1/audio/transcriptions", "audio", "create", None),
    ("POST", "/v1/files", "files", "upload", None),
    ("GET", "/v1/files", "files", "list", None),
    ("GET", "/v1/files/file-abc", "files", "retrieve", "file-abc"),
    ("DELETE", "/v1/files/file-abc", "files", "delete", "file-abc"),
    ("GET", "/v1/files/file-abc/content", "files", "content", "file-abc"),
    ("POST", "/v1/uploads", "uploads", "create", None),
    ("POST", "/v1/uploads/upload_1/parts", "uploads", "part", "upload_1"),
    ("POST", "/v1/uploads/upload_1/complete", "uploads", "complete", "upload_1"),
    ("POST", "/v1/uploads/upload_1/cancel", "uploads", "cancel", "upload_1"),
    ("POST", "/v1/batches", "batches", "create", None),
    ("GET", "/v1/batches?limit=2&after=batch_x", "batches", "list", None),
    ("GET", "/v1/batches/batch_1", "batches", "retrieve", "batch_1"),
    ("POST", "/v1/batches/batch_1/cancel", "batches", "cancel", "batch_1"),
    ("GET", "/v1/models", "other", "other", None),
    ("POST", "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21", "chat.completions",
     "create", None),
    ("POST", "/openai/batches?api-version=2024-10-21", "batches", "create", None),
    ("GET", "/openai/v1/files/file-1/content", "files", "content", "file-1"),
])
def test_classify(method, path, kind, action, oid):
    r = classify(method, path)
    assert (r.kind, r.action, r.object_id) == (kind, action, oid)


def test_azure_deployment():
    assert normalise("/openai/deployments/d1/embeddings?api-version=1") == ("/embeddings", "d1")
    assert classify("POST", "/openai/deployments/d1/embeddings").deployment == "d1"


def test_tokens_three_shapes():
    chat = tokens_from_usage({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                              "prompt_tokens_details": {"cached_tokens": 2},
                              "completion_tokens_details": {"reasoning_tokens": 1}})
    assert (chat.input, chat.output, chat.cached, chat.reasoning, chat.total) == (10, 4, 2, 1, 14)
    resp = tokens_from_usage({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                              "input_tokens_details": {"cached_tokens": 5},
                              "output_tokens_details": {"reasoning_tokens": 2}})
    assert (resp.input, resp.output, resp.cached, resp.reasoning, resp.total) == (7, 3, 5, 2, 10)
    emb = tokens_from_usage({"prompt_tokens": 8, "total_tokens": 8})
    assert (emb.input, emb.output, emb.total) == (8, None, 8)
    assert tokens_from_usage(None).input is None
    assert tokens_from_usage({"prompt_tokens": "x"}).input is None  # junk is not a count


def test_errors_headers_and_keys():
    e = api_error({"error": {"message": "m", "type": "t", "code": 42, "param": None}})
    assert (e.type, e.code, e.message) == ("t", "42", "m")
    assert api_error({"error": "plain"}).message == "plain"
    assert api_error([1]).message is None
    assert ratelimits({"x-ratelimit-remaining-tokens": "12", "x-ratelimit-reset-tokens": "1s",
                       "x-ratelimit-limit-requests": "bad"}) == {
        "rl_remaining_tokens": 12, "rl_reset_tokens": "1s", "rl_limit_requests": None}
    fp = key_fingerprint({"authorization": "Bearer sk-abc"})
    assert fp == key_fingerprint({"api-key": "sk-abc"}) and len(fp) == 12 and "abc" not in fp
    assert key_fingerprint({}) is None
    import hashlib
    assert fp == hashlib.sha256(b"sk-abc").hexdigest()[:12]
    assert fp == key_fingerprint({"authorization": "bearer  sk-abc "})
    assert len(key_fingerprint({"authorization": "Bearer "}) or "") == 12  # no key after the scheme: no crash
    assert safe_headers({"authorization": "x", "api-key": "y", "accept": "z"}) == {"accept": "z"}


PAYLOAD = b'{"a": 1}\n' * 2000


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd", "identity", None])
def test_decode_chunked(enc):
    data = {
        "gzip": gzip.compress(PAYLOAD), "deflate": zlib.compress(PAYLOAD), "br": brotli.compress(PAYLOAD),
        "zstd": zstd.compress(PAYLOAD), "identity": PAYLOAD, None: PAYLOAD,
    }[enc]
    d = Decoder(enc)
    out = b"".join(d.feed(data[i:i + 7]) for i in range(0, len(data), 7)) + d.finish()
    assert out == PAYLOAD
    assert decode_body(data, enc) == PAYLOAD


def test_decode_raw_deflate_and_gzip_members():
    c = zlib.compressobj(wbits=-15)
    raw = c.compress(PAYLOAD) + c.flush()
    assert decode_body(raw, "deflate") == PAYLOAD
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip") == b"abcd"


def test_decode_errors():
    with pytest.raises(DecodeError):
        decode_body(b"not gzip at all", "gzip")
    with pytest.raises(DecodeError):
        decode_body(gzip.compress(PAYLOAD)[:-30], "gzip")  # truncated
    with pytest.raises(DecodeError):
        decode_body(b"x", "compress")


def chat_sse(words: list[str], usage: bool = True, done: bool = True) -> bytes:
    base = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18"}
    ev = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    ev += [{**base, "choices": [{"index": 0, "delta": {"content": w}}]} for w in words]
    ev.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        ev.append({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                                                    "total_tokens": 3 + len(words)}})
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in ev)
    return out + (b"data: [DONE]\n\n" if done else b"")


def test_chat_reassembly():
    res = reassemble(chat_sse(["Hel", "lo", " world"]), "chat")
    assert res.complete and res.text == "Hello world" and res.finish_reason == "stop"
    assert res.usage["completion_tokens"] == 3 and res.model == "gpt-4o-mini-2024-07-18"
    assert res.body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    data = chat_sse(["Hel"])
    assert 0 < res.first_token_offset < len(data)
    assert res.problems == []


def test_chat_tool_calls_and_truncation():
    base = {"id": "c", "model": "m"}
    evs = [
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]},
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"q": 1}'}}]}}]},
    ]
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in evs) + b"data: {broken"
    res = reassemble(data, "chat")
    assert not res.complete
    tc = res.body["choices"][0]["message"]["tool_calls"][0]
    assert tc["id"] == "call_1" and tc["function"] == {"name": "get", "arguments": '{"q": 1}'}
    assert any("truncated" in p for p in res.problems)
    assert any("inside an event" in p for p in res.problems)


def test_responses_reassembly():
    final = {"id": "r", "object": "response", "status": "completed", "model": "gpt-4.1-mini",
             "usage": {"input_tokens": 2, "output_tokens": 2, "total_tokens": 4}}
    evs = [("response.created", {"response": {**final, "status": "in_progress", "usage": None}}),
           ("response.output_text.delta", {"delta": "Hi"}),
           ("response.output_text.delta", {"delta": " there"}),
           ("response.completed", {"response": final})]
    data = b"".join(f"event: {t}\r\n".encode() + b"data: " + orjson.dumps({"type": t, **d}) + b"\r\n\r\n"
                    for t, d in evs)
    res = reassemble(data, "responses")
    assert res.complete and res.text == "Hi there" and res.usage["output_tokens"] == 2
    assert res.finish_reason == "completed" and res.body["id"] == "r"
    cut = reassemble(data[: data.index(b"event: response.completed")], "responses")
    assert not cut.complete and cut.body["status"] == "incomplete" and cut.text == "Hi there"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_sse_any_chunking(cuts, eol):
    data = chat_sse(["a", "b", "c", "d"]).replace(b"\n", eol)
    parser = SSEParser()
    whole = parser.feed(data) + parser.close()
    p, got, i = SSEParser(), [], 0
    for n in cuts:
        got += p.feed(data[i:i + n])
        i += n
    got += p.feed(data[i:])
    got += p.close()
    # a lone \r at a chunk end is held back until the next byte (or the end)
    assert [(e.event, e.data, e.end) for e in got] == [(e.event, e.data, e.end) for e in whole]
    assert len(whole) == 8


def completions_sse(words: list[str], usage: bool = True) -> bytes:
    """A legacy ``/v1/completions`` stream: the text is in ``choices[].text``, there is no ``delta``."""
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct"}
    ev = [{**base, "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]} for w in words]
    ev.append({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]})
    if usage:
        ev.append({**base, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": len(words),
                                                    "total_tokens": 2 + len(words)}})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in ev) + b"data: [DONE]\n\n"


def test_legacy_completions_reassembly_keeps_the_text():
    data = completions_sse(["Once", " upon", " a time"])
    res = reassemble(data, "completions")
    assert res.complete and res.text == "Once upon a time" and res.finish_reason == "length"
    assert res.usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert res.model == "gpt-3.5-turbo-instruct" and res.problems == []
    assert res.body["object"] == "text_completion" and res.body["id"] == "cmpl-1"
    assert res.body["choices"] == [{"index": 0, "text": "Once upon a time", "finish_reason": "length",
                                    "logprobs": None}]
    assert res.first_token_offset == data.index(b"\n\n") + 2  # the first event carries text
    assert reassemble(data, "chat.completions").text == ""  # what happened before: the chat reader sees none
    cut = reassemble(data[: data.index(b"data: [DONE]")][:-40], "completions")
    assert not cut.complete and cut.text == "Once upon a time" and cut.usage is None
    several = b"".join(b"data: " + orjson.dumps({"choices": [{"index": i, "text": t}]}) + b"\n\n"
                       for i, t in [(0, "a"), (1, "b"), (0, "c")])
    res = reassemble(several, "completions")
    assert [c["text"] for c in res.body["choices"]] == ["ac", "b"] and not res.complete
