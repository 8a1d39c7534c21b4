"""Tokens for every stream: offline token counts for streams without usage, and velvet_stream_usage=inject."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import itertools
import re
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http as mhttp
from mitmproxy.test import tutils
from support.helpers import snapshot
from support.pg import fresh_pg_url
from support.rig import API_KEY, Proxy, bound, call_row, wait_for
from support.standin.server import ANSWER, count_tokens
from velvet_core.capture.take import StreamRecorder
from velvet_core.capture.usage import UsageStripper, ask_for_usage
from velvet_core.cli import main
from velvet_core.cost import tokens
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.extract import Tokens
from velvet_core.processing.calls import parse_call
from velvet_core.query import queries
from velvet_core.storage import database, models
from velvet_core.storage.snapshot import CallSnapshot

# -- the tokenizer -----------------------------------------------------------------------------------

# OpenAI's cookbook "How to count tokens with tiktoken": its examples and the counts it documents (which it
# says the API reported too)
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]
COOKBOOK_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]}}}}}]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"}]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_shipped_encodings_are_openais(name, monkeypatch):
    """The shipped files hash as tiktoken pins OpenAI's published ones, and velvet builds the same encoding
    as tiktoken's own constructor (fed the shipped ranks instead of a download)."""
    data = gzip.decompress((tokens.ENCODINGS_DIR / f"{name}.tiktoken.gz").read_bytes())
    source = Path(openai_public.__file__).read_text()
    pinned = re.search(rf'encodings/{name}\.tiktoken",\s*expected_hash="([0-9a-f]{{64}})"', source)
    assert pinned and hashlib.sha256(data).hexdigest() == pinned.group(1)
    ours = tokens.encoding(name)
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: tokens.ranks(name))
    theirs = getattr(openai_public, name)()
    assert (ours._pat_str, ours._special_tokens) == (theirs["pat_str"], theirs["special_tokens"])
    reference = tiktoken.Encoding(**theirs)
    text = "Tokens for every stream: déjà vu, 東京, 12345, <|endoftext|>\n\tdone."
    assert ours.n_vocab == reference.n_vocab
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_counts_work_offline(monkeypatch, tmp_path):
    """Nothing is downloaded: tiktoken's loader fails here, the counts still come."""
    def no_network(*a, **k):
        raise AssertionError("tiktoken tried to download an encoding")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tokens.Counter("gpt-4o").text("hello world") == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("model", "messages", "tools"), [
    ("gpt-4o", 124, 101), ("gpt-4o-mini-2024-07-18", 124, 101), ("gpt-4.1-mini", 124, 101),
    ("gpt-4-0613", 129, 105), ("gpt-3.5-turbo", 129, 105), ("gpt-4", 129, 105)])
def test_cookbook_counts(model, messages, tools):
    assert tokens.estimate("chat.completions", model, {"messages": COOKBOOK_MESSAGES}, None, "") == (messages, 0)
    req = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert tokens.estimate("chat.completions", model, req, None, "")[0] == tools


@pytest.mark.parametrize(("model", "name"), [
    ("gpt-4o-mini", "o200k_base"), ("gpt-4.1", "o200k_base"), ("o3-mini", "o200k_base"), ("o1", "o200k_base"),
    ("gpt-5-nano", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"), ("gpt-oss-120b", "o200k_base"),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc", "o200k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo-0125", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"), ("text-davinci-003", "cl100k_base"),
    ("llama-3-70b", "o200k_base"), (None, "o200k_base"), ("", "o200k_base")])
def test_encoding_per_model(model, name):
    assert tokens.encoding_name(model) == name


def test_estimate_shapes():
    enc = tokens.encoding("o200k_base")

    def n(s: str) -> int:
        return len(enc.encode_ordinary(s))

    # special-token text in a prompt is text, not an error
    special = {"messages": [{"role": "user", "content": "a <|endoftext|> b"}]}
    assert tokens.estimate("chat.completions", "gpt-4o", special, None, "") == (
        6 + n("user") + n("a <|endoftext|> b"), 0)
    # content parts (text counted, images not), tool calls in the prompt and in the answer, every choice
    req = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    body = {"choices": [
        {"index": 0, "message": {"content": "one",
                                 "tool_calls": [{"function": {"name": "g", "arguments": "{}"}}]}},
        {"index": 1, "message": {"content": "two", "refusal": "no"}}]}
    inp, out = tokens.estimate("chat.completions", "gpt-4o", req, body, "ignored")
    assert inp == 3 + 3 * 3 + n("user") + n("look") + n("assistant") + n("f") + n('{"x": 1}') \
        + n("tool") + n("c1") + n("42")
    assert out == n("one") + n("g") + n("{}") + n("two") + n("no")
    # responses: instructions and input items; the text when the rebuilt answer has no output yet
    req = {"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "output": "ok"}]}
    inp, out = tokens.estimate("responses", "gpt-4.1", req, {"output": []}, "partial answer")
    assert inp == 3 + 2 * 3 + n("system") + n("be brief") + n("user") + n("hi") \
        + 3 + n("f") + n("{}") + 3 + n("ok")
    assert out == n("partial answer")
    assert tokens.estimate("responses", "gpt-4.1", {"input": "hi"}, None, "")[0] == 3 + 3 + n("user") + n("hi")
    # legacy completions: text, texts, token ids
    assert tokens.estimate("completions", "gpt-3.5-turbo-instruct", {"prompt": ["ab", [1, 2, 3]]},
                           {"choices": [{"text": " ok"}]}, "") == (len(tokens.encoding("cl100k_base")
                                                                          .encode_ordinary("ab")) + 3, 1)


@pytest.mark.parametrize("request_json", [None, [], "text", {"messages": "nope"},
                                          {"messages": [None, 3, {"x": []}]},
                                          {"tools": [None, {"function": {"parameters": {"properties": []}}}]},
                                          {"input": [None, {"type": "function_call_output", "output": None}]},
                                          {"prompt": {"a": 1}}])
@pytest.mark.parametrize("kind", ["chat.completions", "responses", "completions"])
def test_estimate_never_fails_on_odd_requests(kind, request_json):
    inp, out = tokens.estimate(kind, "gpt-4o", request_json, {"choices": "x", "output": [None]}, "")
    assert inp >= 0 and out == 0


def test_counting_is_fast():
    """Measured, not asserted (timings vary): printed with ``-s``."""
    req = {"model": "gpt-4o-mini", "messages": COOKBOOK_MESSAGES, "tools": COOKBOOK_TOOLS}
    body = {"choices": [{"message": {"content": ANSWER * 20}}]}
    tokens.estimate("chat.completions", "gpt-4o-mini", req, body, "")  # encoding loaded
    t = time.perf_counter()
    for _ in range(200):
        tokens.estimate("chat.completions", "gpt-4o-mini", req, body, "")
    print(f"\ntoken estimate: {(time.perf_counter() - t) / 200 * 1e6:.0f} us per call")


# -- the processing step ------------------------------------------------------------------------------

def chat_events(usage: bool, text: str = ANSWER) -> list[bytes]:
    """An OpenAI-shaped chat stream, with what include_usage adds when ``usage``."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini-2024-07-18"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
               for w in re.findall(r"\S+\s*", text)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events = [{**e, "usage": None} for e in events]
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7,
                                                        "total_tokens": 18}})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def stream_snapshot(chunks: list[bytes], body: dict, path: str = "/v1/chat/completions",
                    status: int = 200) -> CallSnapshot:
    now = time.time()
    return snapshot(
        path, request_headers={"content-type": "application/json"},
        request_body=orjson.dumps(body), started_at=now, status_code=status,
        response_headers={"content-type": "text/event-stream"}, first_byte_at=now, ended_at=now + 1,
        stream_chunks=[(now + 0.1 * i, c) for i, c in enumerate(chunks)], stream_finished=True)


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "stream": True}


def test_stream_without_usage_is_estimated_and_priced():
    enc = tokens.encoding("o200k_base")
    row, _, _ = parse_call(stream_snapshot(chat_events(False), BODY), Pricer(), 1 << 20)
    inp = 3 + 3 + len(enc.encode_ordinary("user")) + len(enc.encode_ordinary("Say hello"))
    out = len(enc.encode_ordinary(ANSWER))
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (inp, out, inp + out)
    assert row["usage_estimated"] is True and row["cached_tokens"] is None and row["reasoning_tokens"] is None
    assert row["cost_usd"] == Pricer().cost("gpt-4o-mini-2024-07-18", Tokens(inp, out)) and row["cost_usd"] > 0
    assert row["problem"] is None


def test_stream_with_usage_is_exact():
    row, _, _ = parse_call(stream_snapshot(chat_events(True), BODY), Pricer(), 1 << 20)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 7) and "usage_estimated" not in row


def test_cut_or_failed_streams():
    cut = chat_events(False)[:4]  # role chunk and three words, no end
    row, _, _ = parse_call(stream_snapshot(cut, BODY), Pricer(), 1 << 20)
    assert row["usage_estimated"] and not row["complete"] and row["output_tokens"] == len(
        tokens.encoding("o200k_base").encode_ordinary("".join(re.findall(r"\S+\s*", ANSWER)[:3])))
    row, _, _ = parse_call(stream_snapshot([b"data: {\"error\": {\"message\": \"x\"}}\n\n"], BODY, status=500),
                           Pricer(), 1 << 20)
    assert row["input_tokens"] is None and "usage_estimated" not in row


def test_legacy_completions_stream_is_estimated():
    text_events = [b'data: {"id":"c","object":"text_completion","model":"gpt-3.5-turbo-instruct","choices":'
                   b'[{"index":0,"text":"' + w.encode() + b'","finish_reason":null}]}\n\n'
                   for w in ("Hi", " there")]
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "stream": True}
    row, _, _ = parse_call(stream_snapshot([*text_events, b"data: [DONE]\n\n"], body, "/v1/completions"),
                           Pricer(), 1 << 20)
    cl = tokens.encoding("cl100k_base")
    assert row["usage_estimated"] and row["input_tokens"] == len(cl.encode_ordinary("Say hi"))
    assert row["cost_usd"] is not None  # (the answer's side is as good as the completions reassembly)


def test_estimate_failure_keeps_the_row(monkeypatch):
    def broken(*a, **k):
        raise FileNotFoundError("o200k_base.tiktoken.gz")

    monkeypatch.setattr("velvet_core.processing.calls.estimate", broken)
    row, _, _ = parse_call(stream_snapshot(chat_events(False), BODY), Pricer(), 1 << 20)
    assert row["input_tokens"] is None and "tokens not estimated" in row["problem"] and row["complete"]


# -- inject: the request and the stream filter ------------------------------------------------------

def chat_request(body: bytes, **headers: str) -> mhttp.Request:
    h = {"host": "api.openai.com", "content-type": "application/json", "accept-encoding": "gzip, br", **headers}
    return tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                       path=b"/v1/chat/completions", content=body, headers=mhttp.Headers(**h))


def test_ask_for_usage():
    raw = orjson.dumps(BODY)
    req = chat_request(raw)
    assert ask_for_usage(req) == raw
    sent = orjson.loads(req.content)
    assert sent == {"stream_options": {"include_usage": True}, **BODY}
    assert req.headers["content-length"] == str(len(req.content)) and req.headers["accept-encoding"] == "identity"
    assert req.content.endswith(raw[1:])  # the client's bytes, untouched after the inserted member

    other = {**BODY, "stream_options": {"include_obfuscation": False, "include_usage": False}}
    req = chat_request(orjson.dumps(other))
    assert ask_for_usage(req) is not None
    assert orjson.loads(req.content)["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    req = chat_request(orjson.dumps({**BODY, "stream_options": None}))
    assert ask_for_usage(req) is not None
    assert orjson.loads(req.content)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("body", [
    orjson.dumps({**BODY, "stream_options": {"include_usage": True}}),  # asked already
    orjson.dumps({**BODY, "stream": False}), orjson.dumps({"model": "m", "messages": []}),
    b'{"stream": true, not json', b'["stream", true]', b""])
def test_ask_for_usage_leaves_others_alone(body):
    req = chat_request(body)
    assert ask_for_usage(req) is None and req.content == body and req.headers["accept-encoding"] == "gzip, br"


def test_ask_for_usage_leaves_big_bodies_alone():
    from velvet_core.capture.usage import INJECT_MAX

    body = orjson.dumps({**BODY, "messages": [{"role": "user", "content": "x" * INJECT_MAX}]})
    req = chat_request(body)
    assert ask_for_usage(req) is None and req.content == body


def test_ask_for_usage_leaves_compressed_bodies_alone():
    req = chat_request(gzip.compress(orjson.dumps(BODY)), **{"content-encoding": "gzip"})
    raw = req.raw_content
    assert ask_for_usage(req) is None and req.raw_content == raw


def strip_all(pieces: list[bytes]) -> bytes:
    s = UsageStripper()
    out = [b for p in pieces for b in s.feed(p)] + s.feed(b"")
    assert all(out)  # never an empty chunk (it would end a chunked HTTP/1.1 body)
    return b"".join(out)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), crlf=st.booleans())
def test_stripper_gives_the_client_the_stream_without_usage(cuts, crlf):
    text = 'He wrote "usage":null and {"usage": {"x": 1}, "choices": []} here.'  # in content: left alone
    with_usage, without = b"".join(chat_events(True, text)), b"".join(chat_events(False, text))
    if crlf:
        with_usage, without = with_usage.replace(b"\n", b"\r\n"), without.replace(b"\n", b"\r\n")
    assert strip_all(splits(with_usage, cuts)) == without
    assert strip_all(splits(without, cuts)) == without  # nothing to take out: all passes


def test_stripper_leaves_other_events_and_comments():
    stream = (b": keep-alive\n\nevent: x\ndata: {\"usage\": {\"a\": 1}, \"choices\": [{\"index\": 0}]}\n\n"
              b"data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n")
    assert strip_all([stream]) == stream.replace(b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n', b"")
    assert strip_all([b"data: {\"usage\":"]) == b"data: {\"usage\":"  # a cut stream: what came goes on


def test_recorder_keeps_upstream_chunks_and_falls_back_when_the_filter_fails():
    t = iter(range(100))
    rec = StreamRecorder(lambda: next(t), UsageStripper())
    events = chat_events(True)
    sent = [b for e in events for b in rec(e)] + list(rec(b""))
    assert [c for _, c in rec.chunks] == events and rec.finished  # parsing sees what upstream sent
    assert b"".join(sent) == b"".join(chat_events(False))

    class Broken(UsageStripper):
        def feed(self, data: bytes) -> list[bytes]:
            raise RuntimeError("bug")

    rec = StreamRecorder(time.time, Broken())
    assert rec(b"data: 1\n\n") == [b"data: 1\n\n"] and rec.strip is None and rec(b"more") == b"more"


# -- end to end: the official SDK through mitmdump ---------------------------------------------------

MSG = [{"role": "user", "content": "Say hello to the proxy"}]


def test_sdk_stream_without_usage_is_estimated(proxy, monkeypatch, capsys):
    client = proxy.client(monkeypatch)
    with client.chat.completions.with_streaming_response.create(model="gpt-4o-mini", messages=MSG,
                                                                stream=True) as r:
        text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
        request_id = r.headers["x-request-id"]
    assert text == ANSWER
    row = call_row(proxy.db_url, request_id)
    enc = tokens.encoding("o200k_base")
    inp = 3 + 3 + len(enc.encode_ordinary("user")) + len(enc.encode_ordinary(MSG[0]["content"]))
    assert row.stream and row.complete and row.usage_estimated
    assert (row.input_tokens, row.output_tokens) == (inp, len(enc.encode_ordinary(ANSWER)))
    assert row.cost_usd == pytest.approx(Pricer().cost(row.model, Tokens(inp, row.output_tokens)))
    assert row.cost_usd > 0 and row.ttft_ms is not None

    with bound(proxy.db_url):
        estimated = models.Call.select().where(models.Call.usage_estimated).count()
    assert main(["--db", proxy.db_url, "stats", "--json"]) == 0
    s = orjson.loads(capsys.readouterr().out)
    assert s["totals"]["estimated_calls"] == estimated >= 1
    assert sum(g["estimated_calls"] for g in s["calls"]) == estimated
    assert main(["--db", proxy.db_url, "stats"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED" in out and f"{estimated} of " in out and "estimated tokens and cost" in out
    assert main(["--db", proxy.db_url, "calls", "--json"]) == 0
    [mine] = [c for c in orjson.loads(capsys.readouterr().out) if c["request_id"] == request_id]
    assert mine["usage_estimated"] is True
    assert main(["--db", proxy.db_url, "show", request_id]) == 0
    assert "(estimated: the stream carried no usage)" in capsys.readouterr().out


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def inject(request, standin, tmp_path_factory):
    """mitmdump with velvet_stream_usage=inject."""
    tmp = tmp_path_factory.mktemp(f"inject-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    p = Proxy(url, standin.url, tmp, extra=["--set", "velvet_stream_usage=inject"]).start()
    yield p
    p.stop()


def normalised(raw: bytes) -> bytes:
    """A stand-in stream with its per-request id and clock taken out, all else byte for byte."""
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb'"id":"chatcmpl-\w+"', b'"id":"x"', raw))


def raw_stream(conn: http.client.HTTPConnection, body: dict) -> bytes:
    """The body of a streamed chat call as the client receives it (the stdlib: no client-side parsing)."""
    headers = {"authorization": f"Bearer {API_KEY}", "x-standin-delay": "0.01", "accept-encoding": "gzip",
               "content-type": "application/json", "host": "api.openai.com"}
    try:
        conn.request("POST", "/v1/chat/completions", orjson.dumps(body), headers)
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-encoding") is None
        return r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("asked", [False, True])
def test_inject_gives_the_client_the_same_chunks(inject, standin, asked):
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    up = urlsplit(standin.url)
    direct = raw_stream(http.client.HTTPConnection(up.hostname or "", up.port, timeout=30), body)
    tunnel = http.client.HTTPSConnection("127.0.0.1", inject.port, timeout=30,
                                         context=ssl.create_default_context(cafile=str(inject.ca)))
    tunnel.set_tunnel("api.openai.com", 443)
    proxied = raw_stream(tunnel, body)
    assert normalised(proxied) == normalised(direct)
    assert (b'"usage"' in proxied) is asked


def test_inject_stores_exact_usage(inject, monkeypatch):
    client = inject.client(monkeypatch)
    chunks = []
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MSG, stream=True, extra_headers={"x-standin-delay": "0.05"}) as r:
        request_id = r.headers["x-request-id"]
        chunks = list(r.parse())
    assert all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    row = call_row(inject.db_url, request_id)
    assert not row.usage_estimated and row.complete and row.problem is None
    assert (row.input_tokens, row.output_tokens) == (count_tokens(MSG), len(ANSWER.split()))
    assert row.cost_usd > 0 and row.ttft_ms > 0
    assert orjson.loads(row.request_body) == {"messages": MSG, "model": "gpt-4o-mini", "stream": True}


def test_inject_through_a_compressed_stream_breaks_nothing(inject, monkeypatch):
    """An upstream that compresses the stream anyway: the usage chunk reaches the client, all else works."""
    client = inject.client(monkeypatch)
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MSG, stream=True, extra_headers={"x-standin-gzip": "1"}) as r:
        request_id = r.headers["x-request-id"]
        chunks = list(r.parse())
    assert chunks[-1].usage is not None and not chunks[-1].choices
    row = call_row(inject.db_url, request_id)
    assert not row.usage_estimated and row.output_tokens == len(ANSWER.split())
    wait_for(lambda: "cannot take the usage chunk out" in inject.output(), what="the warning")


def test_inject_leaves_other_calls_alone(inject, monkeypatch):
    client = inject.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    row = call_row(inject.db_url, r.headers["x-request-id"])
    assert "stream_options" not in orjson.loads(row.request_body) and not row.stream
    with client.responses.with_streaming_response.create(model="gpt-4.1-mini", input="hi", stream=True) as s:
        request_id = s.headers["x-request-id"]
        list(s.parse())
    row = call_row(inject.db_url, request_id)
    assert row.stream and not row.usage_estimated and row.input_tokens is not None


def test_stats_counts_estimates_apart(sqlite_url):
    """estimated_calls per group and in totals, from rows written as the writer writes them."""
    from velvet_core.storage.bulk import insert_rows
    from velvet_core.storage.database import open_db

    db = open_db(sqlite_url)
    base = {"started_at": "2026-11-24 10:00:00", "method": "POST", "host": "api.openai.com",
            "path": "/v1/chat/completions", "endpoint": "chat.completions", "action": "create", "status_code": 200}
    with models.use(db), db.atomic():
        insert_rows(models.Call, [
            {**base, "flow_id": "a", "model": "gpt-4o-mini", "input_tokens": 10, "usage_estimated": True},
            {**base, "flow_id": "b", "model": "gpt-4o-mini", "input_tokens": 5},
            {**base, "flow_id": "c", "model": "gpt-4.1", "input_tokens": 1, "usage_estimated": True}])
    s = queries.stats(db)
    assert {g["model"]: g["estimated_calls"] for g in s["calls"]} == {"gpt-4.1": 1, "gpt-4o-mini": 1}
    assert s["totals"] == {"calls": 3, "errors": 0, "input_tokens": 16, "output_tokens": 0, "estimated_calls": 2,
                           "cost_usd": 0.0, "cache_hits": 0, "saved_usd": 0.0}
    db.close()


def test_stats_on_a_database_the_proxy_has_not_migrated(tmp_path):
    """The CLI reads without migrating: a database of an older velvet has no usage_estimated yet."""
    from test_migrations import load_released
    from velvet_core.storage.database import connect

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = connect(url)
    db.connect()
    load_released(db, 2)
    db.execute_sql("INSERT INTO calls (flow_id, started_at, method, host, path, endpoint, action, stream, "
                   "complete, status_code, input_tokens) VALUES ('f', '2026-11-24 10:00:00', 'POST', 'h', '/', "
                   "'chat.completions', 'create', 1, 1, 200, 4)")
    db.close()
    ro = database.open_readonly(url)
    try:
        assert queries.stats(ro)["totals"] == {"calls": 1, "errors": 0, "input_tokens": 4, "output_tokens": 0,
                                               "estimated_calls": 0, "cost_usd": 0.0, "cache_hits": 0,
                                               "saved_usd": 0.0}
    finally:
        ro.close()


@pytest.mark.parametrize(("path", "changed"), [
    ("/v1/chat/completions", True), ("/v1/completions", True), ("/v1/responses", False),
    ("/v1/embeddings", False), ("/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01", False),
    ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", True),
    ("/openai/deployments/gpt4o/chat/completions?api-version=2025-01-01-preview", True)])
def test_inject_hook_picks_its_requests(path, changed, sqlite_url, tmp_path):
    from mitmproxy import exceptions
    from mitmproxy.test import taddons, tflow
    from velvet_core.addon import Velvet

    v = Velvet()
    with taddons.context(v) as tctx:
        # (velvet_cache off: the cache's request hook is the other reason for one)
        tctx.configure(v, velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool"), velvet_cache="off")
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(v, velvet_stream_usage="always")
        body = orjson.dumps(BODY)
        f = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                                        path=path.encode(), content=body,
                                        headers=mhttp.Headers(host="api.openai.com",
                                                              **{"content-type": "application/json"})))
        v.requestheaders(f)
        assert v.request is None  # off: no request hook at all (mitmproxy skips a None hook)
        assert f.request.content == body
        tctx.configure(v, velvet_stream_usage="inject")
        assert v.request is not None
        v.request(f)
        assert (f.request.content != body) is changed
        assert (v.snapshots[f.id].client_body == body) is changed and (f.id in v.injected) is changed
        v.snapshots.clear()
        v.injected.clear()
        tctx.configure(v, velvet_stream_usage="off")
        assert v.request is None
        # the cache's hook (velvet_cache=header, the default) still asks for usage for a flow it leaves alone
        tctx.configure(v, velvet_stream_usage="inject", velvet_cache="header")
        f = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                                        path=path.encode(), content=body,
                                        headers=mhttp.Headers(host="api.openai.com",
                                                              **{"content-type": "application/json"})))
        v.requestheaders(f)
        assert v.request(f) is None
        assert (f.id in v.injected) is changed and (f.request.content != body) is changed


@pytest.mark.parametrize("crlf", [False, True])
def test_stripper_at_every_cut(crlf):
    """Every place one chunk can end and the next begin (between the \\r and \\n of a line end, or between two
    line ends of an event's end: a chunk ending "\\r\\n" must not end an event by itself)."""
    text = "plain"
    with_usage, without = b"".join(chat_events(True, text)), b"".join(chat_events(False, text))
    if crlf:
        with_usage, without = with_usage.replace(b"\n", b"\r\n"), without.replace(b"\n", b"\r\n")
    for cut in range(len(with_usage) + 1):
        assert strip_all(splits(with_usage, [cut])) == without, cut
