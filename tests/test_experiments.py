"""The pieces of replay, compare and the fine-tuning export that need no proxy: overrides, plans and their
estimates, the client's retries (against the stand-in), answer reading, metrics, pairing, judge scores and
the fine-tuning conversion."""

from __future__ import annotations

import email.utils
import time

import httpx2
import orjson
import pytest
from support.rig import API_KEY, free_port
from velvet_core.api.client import APIError, Client, backoff, retry_after
from velvet_core.cost.prices import Pricer
from velvet_core.experiments import finetune, judge
from velvet_core.experiments.compare import (
    Answer,
    CompareError,
    Metric,
    Side,
    compare,
    latest_comparisons,
    pair,
    parse_metrics,
    similarity,
)
from velvet_core.experiments.plan import Overrides, PlanError, build, parse_set
from velvet_core.experiments.select import Logged, Selection, SelectionError, parse_tag, select
from velvet_core.parsing import answers
from velvet_core.parsing.extract import Tokens
from velvet_core.storage.database import connect, open_db

CHAT = "/v1/chat/completions"


# -- overrides -------------------------------------------------------------------------------------

def test_parse_set():
    assert parse_set("temperature=0") == (("temperature",), 0)
    assert parse_set("max_tokens=200") == (("max_tokens",), 200)
    assert parse_set("response_format.type=json_object") == (("response_format", "type"), "json_object")
    assert parse_set('stop=["\\n"]') == (("stop",), ["\n"])
    assert parse_set("user=alice=bob") == (("user",), "alice=bob")  # not JSON: text
    assert parse_set('user="42"') == (("user",), "42")
    assert parse_set("logprobs=true") == (("logprobs",), True)
    assert parse_set("max_tokens=null") == (("max_tokens",), None)
    for bad in ("temperature", "=1", "a..b=1", ".a=1"):
        with pytest.raises(ValueError, match="use key=value"):
            parse_set(bad)
    assert parse_tag("Team=search") == ("team", "search")  # tag keys are stored lower-case
    with pytest.raises(ValueError):
        parse_tag("team")


def test_overrides_apply():
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}
    o = Overrides("gpt-4o", (parse_set("response_format.type=json_object"), parse_set("max_tokens=null"),
                             parse_set("metadata.run.id=7")), "Be terse.")
    out = o.apply(CHAT, body)
    assert out == {"model": "gpt-4o", "response_format": {"type": "json_object"}, "metadata": {"run": {"id": 7}},
                   "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]}
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "hi"}]  # untouched
    assert o.describe() == {"model": "gpt-4o", "set": {"response_format.type": "json_object", "max_tokens": None,
                                                       "metadata.run.id": 7}, "system_prompt": "Be terse."}
    dev = {"messages": [{"role": "user", "content": "a"}, {"role": "developer", "content": "old"},
                        {"role": "system", "content": "second"}]}
    replaced = Overrides(system_prompt="new").apply(CHAT, dev)["messages"]
    assert replaced[1] == {"role": "developer", "content": "new"} and replaced[2]["content"] == "second"
    assert Overrides(system_prompt="new").apply("/v1/responses", {"input": "x"}) == {"input": "x",
                                                                                      "instructions": "new"}
    with pytest.raises(PlanError, match="--system-prompt applies to chat completions and responses"):
        Overrides(system_prompt="x").apply("/v1/embeddings", {"input": "x"})
    with pytest.raises(PlanError, match="messages is not an object"):
        Overrides(sets=(parse_set("messages.role=user"),)).apply(CHAT, dev)
    assert Overrides().describe() == {}


def test_plan_custom_ids_and_estimate():
    p = Pricer()
    items = [
        Logged(CHAT, {"model": "gpt-4o-mini"}, custom_id="a", batch_id="b1", input_tokens=1000, output_tokens=200),
        Logged(CHAT, {"model": "gpt-4o-mini"}, custom_id="a", batch_id="b2", input_tokens=1000, output_tokens=200),
        Logged(CHAT, {"model": "gpt-4o-mini"}, call_id=7, input_tokens=1000, cached_tokens=500, output_tokens=50),
        Logged(CHAT, {"model": "gpt-4o-mini"}, custom_id="x" * 65),  # no counts: not estimated
        Logged(CHAT, {"model": "gpt-4o-mini"}, custom_id="line-5", input_tokens=10, output_tokens=10),
    ]
    plan = build(items, Overrides(model="gpt-4.1-nano", sets=(parse_set("max_tokens=100"),)), p)
    try:
        assert [ln.custom_id for ln in plan.lines] == ["a", "line-2", "call-7", "line-4", "line-5"]
        assert [(ln.source_batch_id, ln.source_custom_id, ln.source_call_id) for ln in plan.lines] == [
            ("b1", "a", None), ("b2", "a", None), (None, None, 7), (None, "x" * 65, None), (None, "line-5", None)]
        assert plan.unpriced == 1 and plan.input_tokens == 3010 and plan.output_tokens == 100 + 100 + 50 + 10
        counts = ((1000, 100, None), (1000, 100, None), (1000, 50, 500), (10, 10, None))
        for mode, batch in (("batch", True), ("live", False)):
            want = sum(p.cost("gpt-4.1-nano", Tokens(input=i, output=o, cached=c), batch=batch) or 0
                       for i, o, c in counts)
            assert plan.estimated_cost(mode) == pytest.approx(want)
        assert plan.estimated_cost("live") > plan.estimated_cost("batch") > 0
        assert plan.endpoint == CHAT and dict(plan.models) == {"gpt-4.1-nano": 5}
        lines = list(plan.requests())
        assert lines[0] == ("a", CHAT, {"model": "gpt-4.1-nano", "max_tokens": 100})
    finally:
        plan.close()
    unknown = build([Logged(CHAT, {"model": "my-own-model"}, input_tokens=5, output_tokens=5)], Overrides())
    assert unknown.unpriced == 1 and unknown.estimated_cost("batch") is None
    unknown.close()


def test_selection_filters_only_where_they_apply(sqlite_url, tmp_path):
    db = open_db(sqlite_url)
    try:
        with pytest.raises(SelectionError, match="not --sql or --file"):
            list(select(db, Selection(sql="SELECT 1", status="429")))
        with pytest.raises(SelectionError, match="filter live calls"):
            list(select(db, Selection(batch="b", tags=[("a", "b")])))
        with pytest.raises(SelectionError, match="--endpoint 'images'"):
            list(select(db, Selection(calls=True, endpoint="images")))
        f = tmp_path / "in.jsonl"
        f.write_text('{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": []}}\n\n{"x": 1}\n')
        with pytest.raises(SelectionError, match="line 3 is not a batch input line"):
            list(select(db, Selection(file=str(f))))
        f.write_text('{"custom_id": "a", "url": "/v1/images/generations", "body": {}}\n')
        with pytest.raises(SelectionError, match="line 1: url '/v1/images/generations' is not an endpoint"):
            list(select(db, Selection(file=str(f))))
        f.write_text("not json\n")
        with pytest.raises(SelectionError, match="line 1 is not JSON"):
            list(select(db, Selection(file=str(f))))
        query = """SELECT '{"input": "x"}' AS body, 'embeddings' AS endpoint, 3 AS call_id"""
        [row] = select(db, Selection(sql=query))
        assert (row.url, row.body, row.call_id) == ("/v1/embeddings", {"input": "x"}, 3)
        with pytest.raises(SelectionError, match="cannot tell the endpoint"):
            list(select(db, Selection(sql="""SELECT '{"input": "x"}' AS body""")))
        with pytest.raises(SelectionError, match="row 1: body is not a JSON object"):
            list(select(db, Selection(sql="SELECT '[1]' AS body")))
    finally:
        db.close()


# -- the client ------------------------------------------------------------------------------------

def test_retry_after_and_backoff():
    assert retry_after(httpx2.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after(httpx2.Headers({"retry-after": "3"})) == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (retry_after(httpx2.Headers({"retry-after": soon})) or 0) <= 30
    assert retry_after(httpx2.Headers({"retry-after": "whenever"})) is None
    assert retry_after(httpx2.Headers({})) is None
    assert backoff(1, httpx2.Headers({"retry-after": "2"})) == 2.0
    assert backoff(1, httpx2.Headers({"retry-after": "600"})) <= 0.5  # too long: our own backoff
    assert 0.375 <= backoff(1) <= 0.5 and 6 <= backoff(10) <= 8.0


def test_client_retries_rate_limits(standin, monkeypatch):
    for k in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(k, raising=False)
    slept: list[float] = []
    with Client(API_KEY, base_url=standin.url + "/v1/", sleep=slept.append) as c:
        assert c.url("/v1/chat/completions") == standin.url + "/v1/chat/completions"
        assert c.url("/files") == standin.url + "/v1/files"
        standin.rate_limit(2)
        r = c.request("POST", CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert r.status == 200 and r.attempts == 3 and slept == [0.05, 0.05] and r.request_id.startswith("req_")
        assert r.body["choices"][0]["message"]["content"] == "Hello from the stand-in API."
        standin.rate_limit(10)
        assert c.request("POST", CHAT, json={}).status == 429  # gives up after max_retries
        standin.rate_limit(0)
        with pytest.raises(APIError, match="404"):
            c.ok("GET", "/batches/batch_nope")
    with Client("sk-bad-key", base_url=standin.url, sleep=slept.append) as c:
        slept.clear()
        assert c.request("POST", CHAT, json={}).status == 401 and slept == []  # not retried
    with Client(API_KEY, base_url=f"http://127.0.0.1:{free_port()}", max_retries=2, sleep=slept.append) as c:
        slept.clear()
        with pytest.raises(APIError, match="ConnectError"):
            c.request("GET", "/models")
        assert len(slept) == 2
    monkeypatch.setenv("OPENAI_BASE_URL", "https://example.test/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with Client.from_env() as c:
        assert c.url("/v1/responses") == "https://example.test/v1/responses"
        assert c.key_fingerprint and c.key_fingerprint not in API_KEY


# -- answers and metrics ---------------------------------------------------------------------------

def test_reading_answers():
    tool = {"choices": [{"finish_reason": "tool_calls", "message": {"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}}]}
    assert answers.read(tool) == answers.Said('[{"name":"f","arguments":"{\\"a\\":1}"}]', "tool_calls")
    refusal = {"choices": [{"finish_reason": "stop", "message": {"content": None, "refusal": "No."}}]}
    assert answers.read(refusal).text == "No."
    completion = {"choices": [{"text": "done", "finish_reason": "length"}]}
    assert answers.read(completion) == answers.Said("done", "length")
    resp = {"object": "response", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
            "output": [{"type": "reasoning"}, {"type": "message", "content": [
                {"type": "output_text", "text": "Hel"}, {"type": "output_text", "text": "lo"}]}]}
    assert answers.read(resp) == answers.Said("Hello", "max_output_tokens")
    assert answers.read({"object": "list", "data": [{"embedding": [0.1, 0.2]}]}).vector == [0.1, 0.2]
    assert answers.read({"results": [{"flagged": False}]}).text == '[{"flagged":false}]'
    assert answers.read("nope") == answers.Said()
    assert answers.prompt({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                        {"role": "assistant", "content": "x"}]}) == "hi"
    assert answers.prompt({"input": "question"}) == "question"


def said(text=None, finish=None, vector=None) -> answers.Said:
    return answers.Said(text, finish, vector)


def test_similarity():
    assert similarity(said("Hello from the stand-in API."), said("hello  FROM the")) == 0.75
    assert similarity(said(""), said("")) == 1.0
    assert similarity(said("a"), said(None)) is None
    assert similarity(said(vector=[1.0, 0.0]), said(vector=[1.0, 0.0])) == 1.0
    assert similarity(said(vector=[1.0, 0.0]), said(vector=[0.0, 2.0])) == 0.0


def ans(i: str, key, text=None, ok=True, **kw) -> Answer:
    return Answer(i, key, kw.pop("custom_id", i), 200 if ok else 400, ok, said(text, kw.pop("finish", None)), **kw)


def test_metrics_and_pairing():
    a = Side("A", [ans("1", ("b", 1), '{"x": 1, "y": {"z": 2}}', finish="stop", cost_usd=0.5),
                   ans("2", ("b", 2), "not json", finish="stop", latency_ms=10.0),
                   ans("3", ("b", 3), ok=False)], turnaround_s=100)
    b = Side("B", [ans("1", ("b", 1), '{"x": 1, "y": {"z": 3}, "w": 0}', finish="length", cost_usd=0.25),
                   ans("2", ("b", 2), "not json", finish="stop", latency_ms=30.0),
                   ans("9", ("b", 9), "extra")], turnaround_s=40)
    ms = parse_metrics(["cost_usd", "latency", "turnaround", "exact_match", "json_valid", "json_fields",
                        "finish_reason", "contains=json", "regex=^not"])
    c = compare(a, b, ms)
    assert (c["pairs"], c["unpaired"]) == (2, 2)  # line 3 of A and line 9 of B
    m = c["metrics"]
    assert m["cost_usd"] == {"a": 0.5, "b": 0.25, "delta": -0.25}
    assert m["latency"] == {"a": 10.0, "b": 30.0, "delta": 20.0}
    assert m["turnaround"] == {"a": 100, "b": 40, "delta": -60}
    assert m["exact_match"] == {"a": None, "b": None, "delta": 0.5}
    assert m["json_valid"] == {"a": 0.5, "b": 0.5, "delta": 0.0}
    assert m["json_fields"] == {"a": None, "b": None, "delta": {"w": 1, "y.z": 1}}
    assert m["finish_reason"] == {"a": {"stop": 2}, "b": {"length": 1, "stop": 1},
                                  "delta": {"length": 1, "stop": -1}}
    assert m["contains"] == {"a": 0.5, "b": 0.5, "delta": 0.0} and m["regex"]["b"] == 0.5
    assert c["lines"][0]["metrics"]["json_fields"]["delta"] == ["w", "y.z"]
    assert c["lines"][0]["metrics"]["json_valid"] == {"a": True, "b": True, "delta": 0}
    assert "turnaround" not in c["lines"][0]["metrics"]

    # unrelated runs (nothing in common) pair by custom_id
    x = Side("X", [ans("p", ("batch", "X", "p"), "a"), ans("q", ("batch", "X", "q"), "b")])
    y = Side("Y", [ans("q", ("batch", "Y", "q"), "b"), ans("r", ("batch", "Y", "r"), "c")])
    pairs, unpaired = pair(x, y)
    assert [(p.id, q.id) for p, q in pairs] == [("q", "q")] and unpaired == 2


def test_parse_metrics(tmp_path):
    assert [m.name for m in parse_metrics(None)][:3] == ["cost_usd", "input_tokens", "output_tokens"]
    assert parse_metrics(["cost_usd,exact_match"]) == [Metric("cost_usd"), Metric("exact_match")]
    assert parse_metrics(["contains=a,b"]) == [Metric("contains", "a,b")]  # a value keeps its commas
    assert parse_metrics(["latency,judge=Is it kind, and short?"]) == [Metric("latency"),
                                                                       Metric("judge", "Is it kind, and short?")]
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Polite and correct.")
    assert parse_metrics([f"judge=@{rubric}"]) == [Metric("judge", "Polite and correct.")]
    for bad, msg in ((["speed"], "unknown metric 'speed'"), (["judge"], "needs a value"),
                     (["cost_usd=1"], "takes no value"), (["exact_match", "exact_match"], "given twice"),
                     (["regex=[a"], "regex=\\[a"), (["judge=@/nonexistent"], "judge=@/nonexistent")):
        with pytest.raises(CompareError, match=msg):
            parse_metrics(bad)


def test_judge_scores():
    def line(content, status=200):
        return {"response": {"status_code": status, "body": {"choices": [{"message": {"content": content}}]}}}
    assert judge.score(line('{"score": 7, "reason": "ok"}')) == 7.0
    assert judge.score(line('{"score": 11}')) is None and judge.score(line('{"score": true}')) is None
    assert judge.score(line("seven")) is None and judge.score({"response": None, "error": {}}) is None
    req = judge.request("Be kind.", "Say hi", "Hi!", "gpt-4o-mini")
    assert req["response_format"]["type"] == "json_schema" and "<answer>\nHi!\n</answer>" in \
        req["messages"][1]["content"] and "Be kind." in req["messages"][1]["content"]


def test_latest_comparisons_without_the_table(tmp_path):
    db = connect(f"sqlite:///{tmp_path / 'old.db'}")
    db.connect()
    try:
        assert latest_comparisons(db) == []
    finally:
        db.close()


# -- fine-tuning conversion ------------------------------------------------------------------------

def ok_item(url: str, body: dict, response: dict) -> Logged:
    return Logged(url, body, ok=True, response=response)


def test_finetune_examples():
    resp = {"status": "completed", "output": [{"type": "reasoning"}, {"type": "message", "content": [
        {"type": "output_text", "text": "Paris."}]}]}
    got = finetune.example(ok_item("/v1/responses", {"instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Geography."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]}]},
        resp))
    assert got == {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "system", "content": "Geography."},
                                {"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris."}]}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool_answer = {"choices": [{"message": {"role": "assistant", "content": None, "refusal": None,
                                            "tool_calls": [call]}}]}
    request = {"messages": [{"role": "user", "content": "x", "name": "u"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}
    got = finetune.example(ok_item(CHAT, request, tool_answer))
    assert got["messages"][-1] == {"role": "assistant", "tool_calls": [call]}
    assert got["messages"][0] == {"role": "user", "content": "x", "name": "u"}
    skips = {
        "no successful answer": Logged(CHAT, {"messages": []}, ok=False),
        "not a chat endpoint": ok_item("/v1/embeddings", {}, {}),
        "tools other than functions": ok_item(CHAT, {"messages": [{"role": "user", "content": "x"}],
                                                     "tools": [{"type": "web_search"}]},
                                              {"choices": [{"message": {"content": "y"}}]}),
        "an incomplete response": ok_item("/v1/responses", {"input": "x"}, {"status": "incomplete"}),
        "a 'function_call' output item": ok_item("/v1/responses", {"input": "x"}, {
            "status": "completed", "output": [{"type": "function_call"}]}),
        "an answer with neither content nor tool calls (a refusal?)": ok_item(
            CHAT, {"messages": [{"role": "user", "content": "x"}]},
            {"choices": [{"message": {"content": None, "refusal": "No."}}]}),
    }
    for reason, item in skips.items():
        with pytest.raises(finetune.Skip) as e:
            finetune.example(item)
        assert str(e.value) == reason


def test_batch_wait_and_download_against_the_standin(standin):
    """The batch path without a proxy: upload, create, poll (a status line only on a terminal), download."""
    import io

    from velvet_core.experiments import replay

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plan = build([Logged(CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {i}"}]},
                         custom_id=f"c{i}") for i in range(3)], Overrides(sets=(parse_set("max_tokens=2"),)))
    term, pipe, naps = Terminal(), io.StringIO(), []
    try:
        with Client(API_KEY, base_url=standin.url + "/v1") as c:
            b = replay.submit(c, plan, "unit")
            assert b["status"] == "validating" and b["metadata"] == {"velvet_experiment": "unit"}
            done = replay.wait(c, b["id"], 7.5, status=term, sleep=naps.append)
            assert done["status"] == "completed" and naps == [7.5, 7.5]  # validating, in_progress, finalizing
            files = replay.download(c, done, keep=True)
            b2 = replay.submit(c, plan, "unit2")
            replay.wait(c, b2["id"], 0, status=pipe, sleep=naps.append)
    finally:
        plan.close()
    assert "in_progress (0/0 done)" in term.getvalue() and "completed (3/3 done)" in term.getvalue()
    assert pipe.getvalue() == ""
    assert set(files) == {"output"} and files["output"]["lines"] == 3
    answers_ = sorted(orjson.loads(x)["response"]["body"]["choices"][0]["message"]["content"]
                      for x in files["output"]["content"].splitlines())
    assert answers_ == ["Hello from"] * 3
