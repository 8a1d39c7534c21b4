"""End to end: ``velvet replay``, ``velvet compare`` and ``velvet export --format finetune`` on traffic the
official SDK sent through a real mitmdump to the stand-in, the replays themselves sent through the same proxy
(SQLite and PostgreSQL).

Known answers (tests/support/standin/server.py): every answer is "Hello from the stand-in API." (5 tokens) unless
``max_tokens`` cuts it (finish reason ``length``) or ``response_format`` asks for JSON; a prompt of one user
message "question number N" counts 4 input tokens; a batch takes three polls and 3 minutes of API time; the
judge's score is the number of words of the answer it is shown.
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import genai_prices
import orjson
import pytest
from support.helpers import js, run
from support.pg import fresh_pg_url
from support.rig import API_KEY, Proxy, bound, wait_for
from velvet_core.experiments.compare import latest_comparisons
from velvet_core.storage import database, models

VELVET = Path(sys.executable).with_name("velvet")
ANSWER = "Hello from the stand-in API."
REPLAY_KEYS = {"experiment", "batch_id", "lines", "estimated_cost_usd"}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a word.",
                                            "parameters": {"type": "object", "properties": {
                                                "word": {"type": "string"}}, "required": ["word"]}}}]


@dataclass
class Logged:
    proxy: Proxy
    source: object = None  # the logged batch (SDK object): 5 lines, line 4 for a model that does not exist
    live_ids: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.proxy.db_url


def batch_lines(n: int, bad: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "bad-model" if i == bad else "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"question number {i}"}]}}) + b"\n"
        for i in range(1, n + 1))


def client_env(proxy: Proxy, mp: pytest.MonkeyPatch) -> None:
    """What a user's shell would hold: the proxy, its CA and the key; nothing else."""
    import os

    for k in list(os.environ):
        if "proxy" in k.lower() or k.startswith("OPENAI_"):
            mp.delenv(k)
    for k, v in proxy.env().items():
        mp.setenv(k, v)
    mp.setenv("OPENAI_API_KEY", API_KEY)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def logged(request, standin, tmp_path_factory):
    """A batch and a few live calls logged through a real mitmdump, which keeps running for the replays."""
    tmp = tmp_path_factory.mktemp(f"replay-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    proxy = Proxy(url, standin.url, tmp).start()
    mp = pytest.MonkeyPatch()
    try:
        client = proxy.client(mp)
        f = Logged(proxy)
        inp = client.files.create(file=("in.jsonl", io.BytesIO(batch_lines(5, bad=4))), purpose="batch")
        b = client.batches.create(input_file_id=inp.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("completed", "failed"):
            b = client.batches.retrieve(b.id)
        client.files.content(b.output_file_id).read()
        client.files.content(b.error_file_id).read()
        f.source = b
        for i in range(1, 4):
            r = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"live question {i}"}],
                extra_headers={"velvet-metadata-team": "replay"})
            f.live_ids.append(r.headers["x-request-id"])
        client.chat.completions.create(  # not tagged: only --tag-less selections take it
            model="gpt-4o-mini", tools=TOOLS, parallel_tool_calls=False,
            messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Define tool."}])
        client.embeddings.create(model="text-embedding-3-small", input="not a chat")
        wait_for(lambda: _count(url, "SELECT count(*) FROM batch_results WHERE batch_id = "
                                     f"'{b.id}' AND request_row_id IS NOT NULL") == 5, what="source batch lines")
        wait_for(lambda: _count(url, "SELECT count(*) FROM calls WHERE endpoint = 'embeddings'") == 1,
                 what="live calls")
        yield f
    finally:
        mp.undo()
        proxy.stop()


def _count(url: str, sql: str) -> int:
    with bound(url):
        return models.Call._meta.database.execute_sql(sql).fetchone()[0]


@pytest.fixture
def env(logged, monkeypatch):
    client_env(logged.proxy, monkeypatch)
    return logged




def live_answers_logged(url: str, experiment: str, n: int) -> None:
    """The proxy writes rows a moment after the answers went back: wait for the experiment's calls."""
    wait_for(lambda: _count(url, "SELECT count(*) FROM experiment_lines e JOIN calls c ON c.request_id = "
                                 f"e.request_id WHERE e.experiment = '{experiment}'") == n, what="replayed calls")


def batch_rate(model: str) -> tuple[Decimal, Decimal]:
    """USD per token (input, output) at batch prices, straight from the price data."""
    per = genai_prices.calc_price(genai_prices.Usage(input_tokens=10**6, output_tokens=0), model,
                                  provider_id="openai", price_context={"processing": "batch"}).total_price
    per_out = genai_prices.calc_price(genai_prices.Usage(input_tokens=0, output_tokens=10**6), model,
                                      provider_id="openai", price_context={"processing": "batch"}).total_price
    return Decimal(per) / 10**6, Decimal(per_out) / 10**6


def sync_rate(model: str) -> tuple[Decimal, Decimal]:
    m = genai_prices.calc_price(genai_prices.Usage(input_tokens=10**6, output_tokens=10**6), model,
                                provider_id="openai").model_price
    return Decimal(m.input_mtok) / 10**6, Decimal(m.output_mtok) / 10**6


def results(url: str, batch_id: str) -> dict[str, models.BatchResult]:
    with bound(url):
        return {r.custom_id: r for r in models.BatchResult.select().where(models.BatchResult.batch_id == batch_id)}


# -- batch replay, then compare --------------------------------------------------------------------

def test_batch_replayed_on_another_model_then_compared(env, capsys, standin):
    src, url = env.source, env.url
    before = set(standin.batch_api.batches)
    out = js(capsys, "--db", url, "replay", "--batch", src.id, "--model", "gpt-4o", "--set", "max_tokens=3",
             "--wait", "--poll-interval", "0.01", "--name", "cheaper")
    assert set(out) == REPLAY_KEYS and out["experiment"] == "cheaper" and out["lines"] == 5
    new = standin.batch_api.batches[out["batch_id"]]
    assert set(standin.batch_api.batches) - before == {out["batch_id"]} and new["status"] == "completed"
    assert new["metadata"] == {"velvet_experiment": "cheaper"}

    # the proxy logged the experiment's own batch: input lines (same custom_ids), status, output downloaded
    got = wait_for(lambda: (r := results(url, out["batch_id"])) and len(r) == 5 and
                   all(x.request_id for x in r.values()) and r, what="replay results")
    with bound(url):
        reqs = {r.custom_id: orjson.loads(r.body) for r in
                models.BatchRequest.select().where(models.BatchRequest.batch_id == out["batch_id"])}
        assert models.Batch.get_by_id(out["batch_id"]).status == "completed"
        exp = models.Experiment.get_by_id("cheaper")
        assert exp.mode == "batch" and exp.batch_id == out["batch_id"] and exp.lines == 5 and exp.model == "gpt-4o"
        assert orjson.loads(exp.source) == {"batch": src.id}
        assert orjson.loads(exp.overrides) == {"model": "gpt-4o", "set": {"max_tokens": 3}}
        mapped = [(e.custom_id, e.source_batch_id, e.source_custom_id) for e in
                  models.ExperimentLine.select().where(models.ExperimentLine.experiment == "cheaper")
                  .order_by(models.ExperimentLine.line_no)]
    assert mapped == [(f"req-{i}", src.id, f"req-{i}") for i in range(1, 6)]
    assert sorted(reqs) == [f"req-{i}" for i in range(1, 6)]
    assert reqs["req-2"] == {"model": "gpt-4o", "max_tokens": 3,
                             "messages": [{"role": "user", "content": "question number 2"}]}
    assert all(not x.failed and x.output_tokens == 3 and x.model == "gpt-4o-2024-08-06" for x in got.values())

    # compare: the source batch with the experiment, by batch id and by name
    c = js(capsys, "--db", url, "compare", src.id, "cheaper")
    assert set(c) == {"a", "b", "pairs", "unpaired", "metrics", "lines"}
    assert (c["a"], c["b"], c["pairs"], c["unpaired"]) == (src.id, "cheaper", 5, 0)
    assert c == js(capsys, "--db", url, "compare", "cheaper") == js(capsys, "--db", url, "compare", src.id,
                                                                     out["batch_id"]) | {"b": "cheaper"}
    m = c["metrics"]
    assert set(m) == {"cost_usd", "input_tokens", "output_tokens", "latency", "turnaround", "exact_match",
                      "json_valid", "json_fields", "finish_reason", "similarity"}
    assert all(set(v) == {"a", "b", "delta"} for v in m.values())
    # line 4 failed in the source (bad-model) and is answered in the replay
    assert m["input_tokens"] == {"a": 4 * 4, "b": 5 * 4, "delta": 4}
    assert m["output_tokens"] == {"a": 4 * 5, "b": 5 * 3, "delta": -5}
    in_a, out_a = batch_rate("gpt-4o-mini")
    in_b, out_b = batch_rate("gpt-4o")
    cost_a, cost_b = 4 * (4 * in_a + 5 * out_a), 5 * (4 * in_b + 3 * out_b)
    assert m["cost_usd"]["a"] == pytest.approx(float(cost_a), rel=1e-6)
    assert m["cost_usd"]["b"] == pytest.approx(float(cost_b), rel=1e-6)
    assert m["cost_usd"]["delta"] == pytest.approx(float(cost_b - cost_a), rel=1e-6)
    assert m["turnaround"] == {"a": 180, "b": 180, "delta": 0}
    assert m["latency"] == {"a": None, "b": None, "delta": None}  # batch lines have no latency of their own
    assert m["exact_match"] == {"a": None, "b": None, "delta": 0.0}
    assert m["similarity"] == {"a": None, "b": None, "delta": 0.75}  # 3 of 5 words, 2*3/(5+3)
    assert m["finish_reason"] == {"a": {"stop": 4}, "b": {"length": 5}, "delta": {"length": 5, "stop": -4}}
    assert m["json_valid"] == {"a": 0.0, "b": 0.0, "delta": 0.0}
    assert m["json_fields"] == {"a": None, "b": None, "delta": {}}
    lines = {ln["a"]: ln for ln in c["lines"]}
    assert [ln["a"] for ln in c["lines"]] == [f"req-{i}" for i in range(1, 6)]
    assert lines["req-4"]["status"] == {"a": 400, "b": 200}
    assert lines["req-4"]["metrics"]["exact_match"]["delta"] is None  # nothing to compare with
    assert lines["req-1"]["metrics"]["output_tokens"] == {"a": 5, "b": 3, "delta": -2}
    assert lines["req-1"]["metrics"]["finish_reason"] == {"a": "stop", "b": "length", "delta": True}

    # an [[eval]] of a rules file as a metric: its check's mean score on each side
    rules = env.proxy.tmp / "evals.toml"
    rules.write_text('[[eval]]\nname = "not cut"\ncheck = "finished"\n\n'
                     '[[eval]]\nname = "short"\ncheck = "max_chars"\nchars = 20\n\n'
                     '[[eval]]\nname = "j"\ncheck = "judge"\njudge_model = "m"\nprompt = "{output}"\n')
    e = js(capsys, "--db", url, "compare", "cheaper", "--rules", str(rules), "--metric", "eval=not cut",
           "--metric", "eval=short")["metrics"]
    assert e["eval:not cut"] == {"a": 1.0, "b": 0.0, "delta": -1.0}  # 4 answered lines stop, 5 cut at 3 tokens
    assert e["eval:short"] == {"a": 0.0, "b": 1.0, "delta": 1.0}
    for bad, why in ((["--metric", "eval=j"], "a judge"), (["--metric", "eval=nope"], "no eval named 'nope'"),
                     (["--metric", "eval"], "eval=NAME")):
        code, _, err = run(capsys, "--db", url, "compare", "cheaper", "--rules", str(rules), *bad)
        assert code == 2 and why in err, err

    code, text, _ = run(capsys, "--db", url, "compare", src.id, "cheaper")
    assert code == 0 and "exact_match" in text and "finish_reason" in text and "req-4" in text
    assert "stop 4" in text and "length +5" in text

    # values the user passes, and an LLM judge run as a batch through the proxy
    before = set(standin.batch_api.batches)
    c = js(capsys, "--db", url, "compare", "cheaper", "--metric", "contains=stand-in", "--metric", "regex=^Hello",
           "--metric", "judge=Does it greet the user?", "--metric", "output_tokens", "--poll-interval", "0.01")
    assert list(c["metrics"]) == ["contains", "regex", "judge", "output_tokens"]
    assert c["metrics"]["contains"] == {"a": 1.0, "b": 0.0, "delta": -1.0}
    assert c["metrics"]["regex"] == {"a": 1.0, "b": 1.0, "delta": 0.0}
    assert c["metrics"]["judge"] == {"a": 5.0, "b": 3.0, "delta": -2.0}  # the stand-in grades by length
    assert {ln["a"]: ln["metrics"]["judge"]["b"] for ln in c["lines"]} == {f"req-{i}": 3.0 for i in range(1, 6)}
    [judge_batch] = set(standin.batch_api.batches) - before
    j = standin.batch_api.batches[judge_batch]
    assert j["metadata"] == {"velvet_judge": "velvet compare"} and j["request_counts"]["total"] == 4 + 5
    wait_for(lambda: len(results(url, judge_batch)) == 9, what="judge results logged")

    db = database.open_readonly(url)
    try:
        recent = latest_comparisons(db)
    finally:
        db.close()
    assert recent[0]["b"] == "cheaper" and recent[0]["judge_batch_id"] == judge_batch
    assert recent[0]["metrics"]["judge"]["delta"] == -2.0 and recent[0]["pairs"] == 5
    assert len(recent) == len({(r["a"], r["b"]) for r in recent})  # the latest of each pair only

    # the comparison appears in the report
    page = env.proxy.tmp / "report.html"
    code, _, _ = run(capsys, "--db", url, "report", "--since", "1d", "-o", str(page))
    html = page.read_text()
    assert code == 0 and "<h2 id=comparisons>Comparisons</h2>" in html and "cheaper" in html and "judge" in html


def test_resume_waits_and_downloads_later(env, capsys, standin):
    out = js(capsys, "--db", env.url, "replay", "--batch", env.source.id, "--model", "gpt-4.1-nano",
             "--name", "overnight")
    assert out["batch_id"] and standin.batch_api.batches[out["batch_id"]]["status"] == "validating"
    assert results(env.url, out["batch_id"]) == {}
    again = js(capsys, "--db", env.url, "replay", "--resume", "overnight", "--poll-interval", "0.01")
    assert again == out | {"estimated_cost_usd": pytest.approx(out["estimated_cost_usd"], rel=1e-6)}
    wait_for(lambda: len(results(env.url, out["batch_id"])) == 5, what="results downloaded through the proxy")
    c = js(capsys, "--db", env.url, "compare", "overnight", "--metric", "exact_match")
    assert c["pairs"] == 5 and c["metrics"]["exact_match"]["delta"] == 1.0  # same answer on another model


# -- live replay -----------------------------------------------------------------------------------

def test_live_calls_replayed_live(env, capsys, standin):
    url = env.url
    standin.rate_limit(2)  # the first two answers are 429s: retried after the server's retry-after-ms
    out = js(capsys, "--db", url, "replay", "--calls", "--tag", "team=replay", "--from-model", "gpt-4o-mini",
             "--model", "gpt-4o", "--set", "response_format.type=json_object",
             "--system-prompt", "Answer in JSON.", "--concurrency", "2", "--name", "live-json")
    assert set(out) == REPLAY_KEYS and (out["experiment"], out["batch_id"], out["lines"]) == ("live-json", None, 3)
    in_r, out_r = sync_rate("gpt-4o")  # live: synchronous prices; each logged call had 4 in, 5 out
    assert out["estimated_cost_usd"] == pytest.approx(float(3 * (4 * in_r + 5 * out_r)), rel=1e-6)

    def tagged():
        with bound(url):
            return [c for c in models.Call.select() if c.tags and
                    orjson.loads(c.tags).get("velvet-experiment") == "live-json"]
    calls = wait_for(lambda: (c := tagged()) and len(c) == 5 and c, what="replayed calls")
    assert sorted(c.status_code for c in calls) == [200, 200, 200, 429, 429]
    ok = [c for c in calls if c.status_code == 200]
    for c in ok:
        body = orjson.loads(c.request_body)
        assert body["model"] == "gpt-4o" and body["response_format"] == {"type": "json_object"}
        assert body["messages"][0] == {"role": "system", "content": "Answer in JSON."}
        assert orjson.loads(c.tags)["velvet-custom-id"].startswith("call-")
    with bound(url):
        lines = list(models.ExperimentLine.select().where(models.ExperimentLine.experiment == "live-json"))
        originals = {c.request_id: c.id for c in models.Call.select() if c.request_id in env.live_ids}
    assert {ln.request_id for ln in lines} == {c.request_id for c in ok}
    assert {ln.source_call_id for ln in lines} == set(originals.values())
    assert all(ln.status_code == 200 and ln.custom_id == f"call-{ln.source_call_id}" for ln in lines)

    c = js(capsys, "--db", url, "compare", "live-json")
    assert (c["pairs"], c["unpaired"]) == (3, 0) and c["b"] == "live-json"
    m = c["metrics"]
    assert m["json_valid"] == {"a": 0.0, "b": 1.0, "delta": 1.0}
    assert m["exact_match"]["delta"] == 0.0 and m["json_fields"]["delta"] == {}
    assert m["latency"]["a"] > 0 and m["latency"]["b"] > 0
    assert m["turnaround"]["a"] is None and m["turnaround"]["b"] > 0  # the originals are not one run
    assert m["finish_reason"] == {"a": {"stop": 3}, "b": {"stop": 3}, "delta": {"stop": 0}}
    assert {ln["a"] for ln in c["lines"]} == {f"call-{i}" for i in originals.values()}

    # a second live replay of the same calls pairs with the first through the originals
    js(capsys, "--db", url, "replay", "--calls", "--tag", "team=replay", "--name", "live-again")
    live_answers_logged(url, "live-again", 3)
    c2 = js(capsys, "--db", url, "compare", "live-json", "live-again", "--metric", "json_fields")
    assert c2["pairs"] == 3 and all(ln["metrics"]["json_fields"]["delta"] is None for ln in c2["lines"])

    assert_key_nowhere(env.proxy)


def test_file_and_sql_selections(env, capsys, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_bytes(batch_lines(3, bad=0) + orjson.dumps({"custom_id": "emb", "method": "POST",
                                                           "url": "/v1/embeddings",
                                                           "body": {"model": "text-embedding-3-small",
                                                                    "input": "x"}}) + b"\n")
    out = js(capsys, "--db", env.url, "replay", "--file", str(path), "--name", "from-file")
    assert out["lines"] == 4 and out["batch_id"] is None and out["estimated_cost_usd"] is None  # no logged counts
    with bound(env.url):
        lines = {e.custom_id: e for e in
                 models.ExperimentLine.select().where(models.ExperimentLine.experiment == "from-file")}
    assert set(lines) == {"req-1", "req-2", "req-3", "emb"} and all(e.status_code == 200 for e in lines.values())
    code, _, err = run(capsys, "--db", env.url, "compare", "from-file")
    assert code == 2 and "never logged" in err

    sql = f"SELECT id, request_body, input_tokens, output_tokens FROM calls WHERE request_id = '{env.live_ids[0]}'"
    # (the test server's role is a superuser; replay also writes its experiment, so no read-only role here)
    out = js(capsys, "--db", env.url, "replay", "--sql", sql, "--dry-run", "--model", "gpt-4o-mini",
             "--allow-powerful-role")
    assert out["lines"] == 1 and out["estimated_cost_usd"] > 0
    sql = (f"SELECT batch_id, custom_id, request_body, url FROM batch_lines WHERE batch_id = '{env.source.id}' "
           "AND custom_id IN ('req-1', 'req-2')")
    out = js(capsys, "--db", env.url, "replay", "--sql", sql, "--mode", "live", "--name", "from-sql",
             "--allow-powerful-role")
    live_answers_logged(env.url, "from-sql", 2)
    c = js(capsys, "--db", env.url, "compare", env.source.id, "from-sql", "--metric", "exact_match")
    assert (c["pairs"], c["unpaired"]) == (2, 3) and c["metrics"]["exact_match"]["delta"] == 1.0


# -- dry run ---------------------------------------------------------------------------------------

def test_dry_run_estimates_from_logged_tokens(env, capsys):
    before = _count(env.url, "SELECT count(*) FROM calls")
    out = js(capsys, "--db", env.url, "replay", "--batch", env.source.id, "--model", "gpt-4o", "--set",
             "max_tokens=3", "--dry-run", "--name", "dry")
    # 4 lines have logged counts (4 in, 5 out); max_tokens=3 caps the output; line 4 failed: not estimated
    in_r, out_r = batch_rate("gpt-4o")
    assert out == {"experiment": "dry", "batch_id": None, "lines": 5,
                   "estimated_cost_usd": pytest.approx(float(4 * (4 * in_r + 3 * out_r)), rel=1e-6)}
    live = js(capsys, "--db", env.url, "replay", "--batch", env.source.id, "--model", "gpt-4o", "--mode", "live",
              "--dry-run")
    in_s, out_s = sync_rate("gpt-4o")
    assert live["estimated_cost_usd"] == pytest.approx(float(4 * (4 * in_s + 5 * out_s)), rel=1e-6)
    code, text, _ = run(capsys, "--db", env.url, "replay", "--batch", env.source.id, "--model", "gpt-4o",
                        "--system-prompt", "Be terse.", "--dry-run")
    assert code == 0 and "dry run: nothing sent" in text and "gpt-4o-mini (4), bad-model (1) -> gpt-4o" in text
    assert "not counted: 1 without logged token counts" in text and '"content": "Be terse."' in text
    with bound(env.url):
        assert models.Experiment.get_or_none(models.Experiment.name == "dry") is None
    assert _count(env.url, "SELECT count(*) FROM calls") == before  # nothing sent


# -- fine-tuning export ----------------------------------------------------------------------------

ROLES = {"system", "user", "assistant", "tool", "function"}


def check_finetune_line(raw: bytes) -> dict:
    """One line of OpenAI's chat fine-tuning format (FineTuneChatRequestInput in OpenAI's OpenAPI spec)."""
    line = orjson.loads(raw)
    assert isinstance(line, dict) and set(line) <= {"messages", "tools", "parallel_tool_calls", "functions"}
    messages = line["messages"]
    assert isinstance(messages, list) and messages
    for m in messages:
        assert m["role"] in ROLES, m
        if m["role"] in ("system", "user"):
            assert set(m) <= {"role", "content", "name"}
            assert isinstance(m["content"], str) or (isinstance(m["content"], list) and all(
                p.get("type") in ("text", "image_url") for p in m["content"]))
        elif m["role"] == "assistant":
            assert set(m) <= {"role", "content", "name", "tool_calls", "function_call", "refusal", "weight",
                              "audio"}
            assert m.get("content") is not None or m.get("tool_calls") or m.get("function_call")
            assert m.get("weight", 1) in (0, 1)
            for call in m.get("tool_calls") or []:
                assert call["type"] == "function" and isinstance(call["id"], str)
                assert isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)
        elif m["role"] == "tool":
            assert set(m) <= {"role", "content", "tool_call_id"} and isinstance(m["tool_call_id"], str)
    assert messages[-1]["role"] == "assistant"
    for tool in line.get("tools") or []:
        assert tool["type"] == "function" and isinstance(tool["function"]["name"], str)
    assert isinstance(line.get("parallel_tool_calls", True), bool)
    return line


def test_finetune_export(env, capsys, tmp_path):
    out = tmp_path / "train.jsonl"
    code, _, err = run(capsys, "--db", env.url, "export", "--format", "finetune", "--tag", "team=replay",
                       "-o", str(out))
    assert code == 0 and "3 examples written" in err
    got = [check_finetune_line(raw) for raw in out.read_bytes().splitlines()]
    assert [g["messages"] for g in got] == [
        [{"role": "user", "content": f"live question {i}"}, {"role": "assistant", "content": ANSWER}]
        for i in range(1, 4)]

    code, text, err = run(capsys, "--db", env.url, "export", "--format", "finetune", "--batch", env.source.id)
    got = [check_finetune_line(raw) for raw in text.encode().splitlines()]
    assert code == 0 and len(got) == 4  # line 4 failed: successful answers only
    assert got[0]["messages"] == [{"role": "user", "content": "question number 1"},
                                  {"role": "assistant", "content": ANSWER}]

    code, text, err = run(capsys, "--db", env.url, "export", "--format", "finetune", "--model", "gpt-4o-mini",
                          "--endpoint", "chat.completions", "--since", "1h")
    got = [check_finetune_line(raw) for raw in text.encode().splitlines()]
    [tooled] = [g for g in got if "tools" in g]
    assert tooled["tools"] == TOOLS and tooled["parallel_tool_calls"] is False
    assert tooled["messages"][0] == {"role": "system", "content": "Be brief."}  # developer -> system
    assert all(g["messages"][-1]["content"] for g in got)
    assert len(got) == 4  # the tagged calls and the tooled one; velvet's own replays are left out
    assert not any("Answer in JSON." in orjson.dumps(g).decode() for g in got)

    code, _, err = run(capsys, "--db", env.url, "export", "--format", "csv", "--model", "gpt-4o")
    assert code == 2 and "apply to --format finetune" in err


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["replay", "--batch", "batch_nope"], "--batch batch_nope: no such batch"),
    (["replay", "--sql", "SELECT id FROM calls", "--allow-powerful-role"], "request_body (or body) column"),
    (["replay", "--sql", "SELECT nonsense FROM nowhere", "--allow-powerful-role"], "--sql: "),
    (["replay", "--file", "/nonexistent.jsonl"], "--file /nonexistent.jsonl"),
    (["replay", "--calls", "--set", "temperature"], "--set 'temperature': use key=value"),
    (["replay", "--calls", "--set", "messages.x=1"], "--set messages.x: messages is not an object"),
    (["replay", "--calls", "--tag", "nokey"], "--tag 'nokey': use key=value"),
    (["replay", "--calls", "--endpoint", "embeddings", "--system-prompt", "x"], "--system-prompt applies to"),
    (["replay", "--calls", "--mode", "batch"], "a batch runs one endpoint"),
    (["replay", "--batch", "{source}"], "a batch runs one model; the requests ask for bad-model, gpt-4o-mini"),
    (["replay", "--calls", "--status", "sometimes"], "--status 'sometimes'"),
    (["replay", "--calls", "--tag", "team=nobody"], "matched no requests"),
    (["replay", "--file", "x.jsonl", "--since", "1h"], "not --sql or --file"),
    (["replay", "--calls", "--max-lines", "2"], "more than --max-lines 2: add --yes"),
    (["replay", "--calls", "--name", "bad name"], "--name 'bad name'"),
    (["replay", "--resume", "nothing-here"], "no experiment 'nothing-here'"),
    (["compare", "batch_nope", "batch_nada"], "neither an experiment nor a batch"),
    (["compare", "x", "y", "--metric", "vibes"], "unknown metric 'vibes'"),
    (["compare", "x", "y", "--metric", "contains"], "--metric contains needs a value"),
    (["compare", "x", "y", "--metric", "regex=("], "--metric regex=("),
])
def test_bad_input_is_one_line(env, capsys, args, message):
    code, out, err = run(capsys, "--db", env.url, *(a.format(source=env.source.id) for a in args))
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and err.startswith("velvet: ") and not out


def test_errors_from_the_installed_command(env):
    r = subprocess.run([str(VELVET), "--db", env.url, "compare", "cheaper", "--metric", "vibes"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("velvet: unknown metric") and "Traceback" not in r.stderr
    r = subprocess.run([str(VELVET), "--db", env.url, "replay", "--batch", "batch_nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr == "velvet: --batch batch_nope: no such batch in this database\n"


def test_key_required_and_name_unique(env, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    code, _, err = run(capsys, "--db", env.url, "replay", "--calls", "--tag", "team=replay")
    assert code == 2 and err == "velvet: OPENAI_API_KEY is not set: the replay needs an API key\n"
    assert js(capsys, "--db", env.url, "replay", "--calls", "--tag", "team=replay", "--dry-run")["lines"] == 3
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    code, out, err = run(capsys, "--db", env.url, "replay", "--calls", "--tag", "team=replay", "--limit", "1",
                         "--name", "once")
    assert code == 0 and "answered    1" in out and "mode        live" in out
    assert err == "compare with what it replayed: velvet compare once\n"  # the proxy is set: no warning
    code, _, err = run(capsys, "--db", env.url, "replay", "--calls", "--name", "once")
    assert code == 2 and "exists already" in err


def test_refused_key_stops_the_run(env, capsys, monkeypatch):
    bad = "sk-bad-" + "q" * 40
    monkeypatch.setenv("OPENAI_API_KEY", bad)
    code, _, err = run(capsys, "--db", env.url, "replay", "--calls", "--tag", "team=replay", "--concurrency", "1",
                       "--name", "refused")
    assert code == 1 and "refused the key" in err and bad not in err
    with bound(env.url):
        lines = list(models.ExperimentLine.select().where(models.ExperimentLine.experiment == "refused"))
    assert [ln.status_code for ln in lines if ln.status_code] == [401]  # stopped after the first answer
    code, _, err = run(capsys, "--db", env.url, "replay", "--batch", env.source.id, "--model", "gpt-4o",
                       "--name", "refused-batch")
    assert code == 1 and "401" in err and bad not in err
    with bound(env.url):  # nothing reached the API: no experiment recorded
        assert models.Experiment.get_or_none(models.Experiment.name == "refused-batch") is None
    assert_key_nowhere(env.proxy, [bad, API_KEY])


def assert_key_nowhere(proxy: Proxy, keys: list[str] | None = None) -> None:
    """No key in any column of any table (experiments included), nor in mitmdump's output."""
    keys = keys or [API_KEY]
    with bound(proxy.db_url):
        for model in models.MODELS:
            for row in model.select().dicts():
                blob = orjson.dumps(row, default=str).decode()
                assert not any(k in blob for k in keys), f"API key stored in {model._meta.table_name}"
    assert not any(k in proxy.output() for k in keys)


def test_live_run_with_no_answer_fails(env, capsys, standin):
    standin.rate_limit(3 * 6)  # every attempt of every line (5 retries each)
    try:
        code, out, err = run(capsys, "--db", env.url, "replay", "--calls", "--tag", "team=replay", "--json",
                             "--concurrency", "3", "--name", "all-limited")
    finally:
        standin.rate_limit(0)
    assert code == 1 and not out
    assert err == "velvet: APIError: none of the 3 requests was answered (429 rate_limit_exceeded x3)\n"
    with bound(env.url):
        assert {ln.status_code for ln in models.ExperimentLine.select().where(
            models.ExperimentLine.experiment == "all-limited")} == {429}
