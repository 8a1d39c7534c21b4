"""Answer checks without a proxy: the rules file, each check on answers that pass and fail, answers a check
cannot take (not text, a pathological pattern, a huge body), the sample, the judge's prompt and reply."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from velvet_core.cost.prices import Pricer
from velvet_core.evals import checks, judge
from velvet_core.evals.answer import Answer
from velvet_core.evals.rules import EvalsError, load_evals, parse_evals
from velvet_core.evals.store import sampled


def rule(**kw):
    return parse_evals({"eval": [{"name": "e", **kw}]}).evals[0]


def chat(content=None, finish="stop", tool_calls=None, refusal=None, **req) -> Answer:
    msg = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return Answer("flow-1", "live", None, "chat.completions", "gpt-4o-mini", {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], **req},
        {"choices": [{"message": msg, "finish_reason": finish}]})


def responses(text: str, status: str = "completed") -> Answer:
    return Answer("flow-2", "live", None, "responses", "gpt-4o", {"input": "Hi?"}, {
        "object": "response", "status": status, "incomplete_details": {"reason": "max_output_tokens"}
        if status == "incomplete" else None,
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]})


@pytest.mark.parametrize(("table", "why"), [
    ({"check": "nope"}, "check: must be one of"),
    ({"check": "regex"}, "pattern: is required"),
    ({"check": "regex", "pattern": "(unclosed"}, "pattern: not a valid regular expression"),
    ({"check": "json_schema", "schema": {"type": "nonsense"}}, "schema: not a valid JSON Schema"),
    ({"check": "json_schema"}, "schema: give exactly one of"),
    ({"check": "judge", "judge_model": "m", "prompt": "Rate {input}"}, "prompt: must contain {output}"),
    ({"check": "judge", "judge_model": "m", "prompt": "{output} {secret}"}, "unknown placeholder {secret}"),
    ({"check": "judge", "prompt": "{output}"}, "judge_model: is required"),
    ({"check": "contains", "text": "x", "pattern": "y"}, "pattern: not a key of check contains"),
    ({"check": "max_chars"}, "chars: is required"),
    ({"check": "json_valid", "sample": 0}, "sample: must be at least 0.001"),
    ({"check": "json_valid", "source": "files"}, "source: must be one of"),
    ({"check": "judge", "judge_model": "m", "prompt": "{output}", "via": "mail"}, "via: must be one of"),
])
def test_rules_errors_name_the_eval_and_the_key(table, why):
    with pytest.raises(EvalsError) as e:
        parse_evals({"eval": [{"name": "my eval", **table}]}, "evals.toml")
    assert str(e.value).startswith("evals.toml: eval 'my eval': ") and why in str(e.value)


def test_rules_file_shared_with_alerts_and_schema_file(tmp_path: Path):
    (tmp_path / "answer.schema.json").write_text('{"type": "object", "required": ["answer"]}')
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\nname = "errors"\nkind = "error_rate"\nthreshold = 0.5\n\n'
                 '[[eval]]\nname = "schema"\ncheck = "json_schema"\nschema_file = "answer.schema.json"\n')
    evals = load_evals(f)
    assert evals.evals[0].schema == {"type": "object", "required": ["answer"]}
    from velvet_core.alerts.rules import load_rules

    assert load_rules(f).rules[0].name == "errors"  # the alert rules' reader leaves [[eval]] alone
    f.write_text('[[eval]]\nname = "a"\ncheck = "json_valid"\n[[eval]]\nname = "a"\ncheck = "finished"\n')
    with pytest.raises(EvalsError, match="name: used by two evals"):
        load_evals(f)


@pytest.mark.parametrize(("table", "good", "bad"), [
    ({"check": "json_valid"}, chat('{"a": 1}'), chat("not json")),
    ({"check": "json_schema", "schema": {"type": "object", "required": ["a"],
                                         "properties": {"a": {"type": "integer"}}}},
     chat('{"a": 1}'), chat('{"a": "one"}')),
    ({"check": "regex", "pattern": r"^\d+$"}, chat("42"), chat("forty-two")),
    ({"check": "not_regex", "pattern": r"(?i)as an ai"}, chat("Sure."), chat("As an AI, I cannot.")),
    ({"check": "contains", "text": "PARIS", "ignore_case": True}, chat("It is Paris."), chat("It is Rome.")),
    ({"check": "not_contains", "text": "sorry"}, chat("Here you go."), chat("I am sorry.")),
    ({"check": "max_chars", "chars": 5}, chat("short"), chat("much too long")),
    ({"check": "min_chars", "chars": 5}, chat("long enough"), chat("no")),
    ({"check": "finished"}, chat("done"), chat("cut", finish="length")),
    ({"check": "finished"}, responses("done"), responses("cut", "incomplete")),
    ({"check": "finished"}, chat("ok"), chat(None, refusal="I can't help with that.")),
    ({"check": "contains", "text": "Paris"}, responses("Paris"), responses("Rome")),
])
def test_each_check_passes_and_fails(table, good, bad):
    r = rule(**table)
    ok, no = checks.run(r, good), checks.run(r, bad)
    assert (ok.status, ok.score, ok.passed) == ("scored", 1.0, True)
    assert (no.status, no.score, no.passed) == ("scored", 0.0, False) and no.reason


def test_tool_args_valid():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]

    def call(args: str) -> Answer:
        return chat(None, finish="tool_calls", tools=tools, tool_calls=[
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": args}}])

    r = rule(check="tool_args_valid")
    assert checks.run(r, call('{"city": "Paris"}')).passed is True
    bad = checks.run(r, call('{"town": "Paris"}'))
    assert bad.passed is False and "weather" in (bad.reason or "") and "city" in (bad.reason or "")
    assert checks.run(r, call('{"city": ')).passed is False  # not JSON
    assert checks.run(r, chat("no tools used")).status == "skipped"
    # a tool call's text is not the answer's text: text checks skip it
    assert checks.run(rule(check="contains", text="x"), call('{"city": "Paris"}')).status == "skipped"


def test_answers_that_are_not_text_are_skipped():
    emb = Answer("f", "live", None, "embeddings", "text-embedding-3-small", {"input": "x"},
                 {"data": [{"embedding": [0.1, 0.2]}]})
    img = Answer("f", "live", None, "images.generations", "dall-e-3", {"prompt": "x"},
                 {"data": [{"b64_json": "AAAA"}]})
    for table in ({"check": "json_valid"}, {"check": "contains", "text": "a"}, {"check": "finished"},
                  {"check": "max_chars", "chars": 3}):
        for a in (emb, img):
            assert checks.run(rule(**table), a).status == "skipped"
    failed = chat("x")
    failed.failed = True
    assert checks.run(rule(check="json_valid"), failed).status == "skipped"


def test_a_pathological_pattern_and_a_huge_answer_are_stopped_not_hung():
    evil = rule(check="regex", pattern=r"(a|aa)+$")  # exponential backtracking
    started = time.monotonic()
    out = checks.run(evil, chat("a" * 40 + "!"))
    assert out.status == "error" and "stopped" in (out.reason or "")
    assert time.monotonic() - started < checks.REGEX_SECONDS + 2
    huge = chat("[" + "1," * 25_000_000 + "1]")  # a 50 MB answer
    started = time.monotonic()
    out = checks.run(rule(check="json_schema", schema={"type": "array"}), huge)
    assert out.status == "error" and "too large" in (out.reason or "")
    assert checks.run(rule(check="max_chars", chars=10), huge).passed is False
    assert checks.run(rule(check="not_contains", text="x"), huge).passed is True
    assert time.monotonic() - started < 5
    # NUL bytes, control characters and lone surrogates are text like any other
    odd = chat('{"a": "\\u0000\x01"}\udcff')
    assert checks.run(rule(check="json_valid"), odd).passed is False
    assert checks.run(rule(check="contains", text="\x01"), odd).passed is True


def test_sample_is_stable_and_near_its_share():
    ids = [f"flow-{i}" for i in range(20_000)]
    picked = [i for i in ids if sampled(i, 0.05)]
    assert picked == [i for i in ids if sampled(i, 0.05)]  # the same every run
    assert 800 < len(picked) < 1200
    assert all(sampled(i, 0.2) for i in picked)  # a bigger share keeps the smaller one's picks
    assert all(sampled(i, 1) for i in ids[:100])


def test_judge_prompt_request_and_reply():
    r = rule(check="judge", judge_model="gpt-4.1-mini",
             prompt="Q: {input}\nA: {output}\nid={custom_id} m={model} team={tags.team} {{literal}}")
    a = chat("Paris.")
    a.custom_id, a.tags = "req-7", {"team": "geo"}
    body = judge.request(r, a)
    text = body["messages"][0]["content"]
    assert text == "Q: system: Be brief.\nuser: Hi?\nA: Paris.\nid=req-7 m=gpt-4o-mini team=geo {literal}"
    assert body["model"] == "gpt-4.1-mini" and body["response_format"]["type"] == "json_schema"
    pricer = Pricer()
    reply = {"choices": [{"message": {"content": '{"score": 0.75, "reason": "Right."}'}}],
             "usage": {"prompt_tokens": 100, "completion_tokens": 10}}
    v = judge.read(r, reply, pricer, batch=True)
    assert v.score == 0.75 and v.reason == "Right." and v.cost_usd and v.cost_usd > 0
    assert judge.read(r, reply, pricer, batch=False).cost_usd == pytest.approx(2 * v.cost_usd)
    for content in ("Great answer!", '{"score": 7, "reason": "x"}', '{"score": true}', '["x"]', None):
        bad = {"choices": [{"message": {"content": content}}]}
        v = judge.read(r, bad, pricer, batch=True)
        assert v.score is None and v.reason
    est = judge.estimate(r, body, pricer, batch=True)
    assert est is not None and 0 < est < 0.001


def test_judge_prompt_cuts_huge_fields():
    r = rule(check="judge", judge_model="m", prompt="{output}")
    text = judge.fill(r, chat("x" * (judge.MAX_FIELD_CHARS + 10)))
    assert len(text) < judge.MAX_FIELD_CHARS + 100 and text.endswith("10 more characters cut]")
    assert orjson.dumps(judge.request(r, chat("\udcff\x00")))  # what cannot be UTF-8 still serialises
