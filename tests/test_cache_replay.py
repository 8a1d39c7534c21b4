"""A stored answer streamed again (velvet_core.cache.replay): read back by velvet's own stream reassembler, the
stream gives the same answer (text, tool calls, finish reasons, usage when asked)."""

from __future__ import annotations

import orjson
import pytest
from velvet_core.cache.replay import as_stream
from velvet_core.parsing.sse import reassemble

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
TOOL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there."}},
            {"index": 1, "finish_reason": "tool_calls",
             "message": {"role": "assistant", "content": None, "tool_calls": [TOOL]}}],
        "usage": USAGE}


@pytest.mark.parametrize("usage", [False, True])
def test_chat_round_trip(usage):
    data = as_stream("chat.completions", CHAT, usage)
    assert data.endswith(b"data: [DONE]\n\n")
    res = reassemble(data, "chat.completions")
    assert res.complete and res.text == "Hello there."
    assert res.body["choices"][0]["message"]["content"] == "Hello there."
    assert res.body["choices"][1]["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert [c["finish_reason"] for c in res.body["choices"]] == ["stop", "tool_calls"]
    assert (res.usage is not None) is usage
    if usage:
        assert res.usage["total_tokens"] == 10
    events = [orjson.loads(line[6:]) for line in data.split(b"\n\n") if line.startswith(b"data: {")]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-1" for e in events)
    assert all(("usage" in e) is usage for e in events)


def test_completions_round_trip():
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
              "choices": [{"index": 0, "text": "Once upon a time", "finish_reason": "length"}], "usage": USAGE}
    res = reassemble(as_stream("completions", answer, True), "completions")
    assert res.complete and res.text == "Once upon a time" and res.usage["completion_tokens"] == 3


RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-4o",
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Hello ", "annotations": []},
                             {"type": "output_text", "text": "there.", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}",
                 "status": "completed"}],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}


@pytest.mark.parametrize("status", ["completed", "incomplete"])
def test_responses_round_trip(status):
    answer = {**RESPONSE, "status": status}
    data = as_stream("responses", answer, False)
    res = reassemble(data, "responses")
    assert res.complete and res.text == "Hello there."
    assert res.body == answer and res.usage["total_tokens"] == 7
    events = [orjson.loads(chunk.split(b"\ndata: ", 1)[1]) for chunk in data.split(b"\n\n") if chunk]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[0]["response"]["output"] == []
    assert events[-1]["type"] == f"response.{status}"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there."
    assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"] == ['{"a":1}']
    assert all(chunk.startswith(b"event: " + orjson.loads(chunk.split(b"\ndata: ", 1)[1])["type"].encode())
               for chunk in data.split(b"\n\n") if chunk)


@pytest.mark.parametrize(("kind", "answer"), [
    ("responses", {"output": []}), ("responses", {"object": "response", "output": ["x"]}),
    ("embeddings", {"data": []}), ("chat.completions", {"choices": "x"}),
    ("chat.completions", {"choices": ["x"]})])
def test_what_cannot_be_rebuilt_is_refused(kind, answer):
    with pytest.raises(ValueError):
        as_stream(kind, answer, False)
