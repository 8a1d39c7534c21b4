"""End to end: answer checks and LLM judges through a real mitmdump with ``velvet_evals``, on both backends.

One mitmdump per backend; each eval is filtered on its own tag so the scenarios do not see each other. The
judges reach the stand-in through the proxy itself, with a key from the variable ``velvet_eval_key_env`` names.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import openai
import orjson
import pytest
from support.helpers import js, jsonl, run
from support.pg import fresh_pg_url
from support.rig import Proxy, wait_for
from support.standin import StandIn
from velvet_core.storage.database import open_readonly
from velvet_core.storage.sql import json_value, rows

JUDGE_KEY = "sk-judge-" + "J" * 40
MSG = [{"role": "user", "content": "Say hello"}]
JUDGE_PROMPT = 'prompt = "Rate the answer to the request.\\nRequest: {input}\\nAnswer: <answer>{output}</answer>"'

RULES = f"""
[[eval]]
name = "json answers"
check = "json_valid"
tags = {{case = "checks"}}

[[eval]]
name = "mentions the stand-in"
check = "contains"
text = "STAND-IN"
ignore_case = true
tags = {{case = "checks"}}

[[eval]]
name = "short"
check = "max_chars"
chars = 10
tags = {{case = "checks"}}

[[eval]]
name = "not cut"
check = "finished"
tags = {{case = "checks"}}

[[eval]]
name = "batch answers have an answer key"
check = "json_schema"
schema = {{type = "object", required = ["answer"]}}
source = "batch"
tags = {{case = "batch"}}

[[eval]]
name = "helpful (live judge)"
check = "judge"
judge_model = "gpt-4.1-mini"
{JUDGE_PROMPT}
via = "live"
tags = {{case = "judge-live"}}

[[eval]]
name = "helpful (batch judge)"
check = "judge"
judge_model = "gpt-4.1-mini"
{JUDGE_PROMPT}
tags = {{case = "judge-batch"}}

[[eval]]
name = "on a budget"
check = "judge"
judge_model = "gpt-4.1-mini"
{JUDGE_PROMPT}
via = "live"
max_usd_per_day = 0.0000001
tags = {{case = "budget"}}

[[eval]]
name = "alerting json"
check = "json_valid"
tags = {{case = "alerting"}}

[[rule]]
name = "json failing"
kind = "eval_fail_rate"
eval = "alerting json"
threshold = 0.5
window = "4s"
min_calls = 2

[[rule]]
name = "json score low"
kind = "eval_score"
eval = "alerting json"
threshold = 0.5
warning = 0.8
window = "4s"
min_calls = 2
"""


class Rig:
    def __init__(self, proxy: Proxy, standin: StandIn, tmp: Path) -> None:
        self.proxy, self.standin, self.tmp = proxy, standin, tmp

    @property
    def url(self) -> str:
        return self.proxy.db_url

    def client(self, monkeypatch: pytest.MonkeyPatch, case: str) -> openai.OpenAI:
        return self.proxy.client(monkeypatch, default_headers={"velvet-metadata-case": case})

    def q(self, sql: str, params: tuple = ()) -> list[dict]:
        db = open_readonly(self.url)
        try:
            return rows(db, sql, params)
        finally:
            db.close()

    def scores(self, eval_name: str, n: int, statuses: tuple[str, ...] = ("scored", "error", "skipped"),
               timeout: float = 30) -> list[dict]:
        marks = ", ".join("?" * len(statuses))

        def get() -> list[dict] | None:
            got = self.q(f"SELECT * FROM scores WHERE eval = ? AND status IN ({marks}) ORDER BY id",
                         (eval_name, *statuses))
            return got if len(got) >= n else None

        return wait_for(get, timeout=timeout, what=f"{n} scores of {eval_name!r}")

    def call_id(self, request_id: str) -> int:
        return wait_for(lambda: (r := self.q("SELECT id FROM calls WHERE request_id = ?", (request_id,)))
                        and r[0]["id"], what="the call's row")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def rig(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"evals-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    standin = StandIn().start()
    rules = tmp / "evals.toml"
    rules.write_text(RULES)
    os.environ["VELVET_TEST_JUDGE_KEY"] = JUDGE_KEY
    try:
        proxy = Proxy(url, standin.url, tmp, extra=[
            "--set", f"velvet_evals={rules}", "--set", "velvet_eval_interval=0.5",
            "--set", f"velvet_alerts={rules}", "--set", "velvet_alert_interval=0.5",
            "--set", "velvet_eval_key_env=VELVET_TEST_JUDGE_KEY"]).start()
    finally:
        del os.environ["VELVET_TEST_JUDGE_KEY"]
    yield Rig(proxy, standin, tmp)
    assert proxy.stop() == 0
    standin.stop()
    # the judge's key is in no stored byte and no log line
    assert JUDGE_KEY not in proxy.output()
    if url.startswith("sqlite"):
        for f in tmp.rglob("*"):
            if f.is_file():
                assert JUDGE_KEY.encode() not in f.read_bytes(), f


def test_checks_score_live_answers(rig, monkeypatch, capsys):
    client = rig.client(monkeypatch, "checks")
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    as_json = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, response_format={"type": "json_object"})
    cut = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG, max_tokens=2)
    ids = {name: rig.call_id(r.headers["x-request-id"]) for name, r in
           (("plain", plain), ("json", as_json), ("cut", cut))}
    got = {}
    for name in ("json answers", "mentions the stand-in", "short", "not cut"):
        for r in rig.scores(name, 3):
            got[name, next(k for k, v in ids.items() if v == r["call_id"])] = (r["status"], r["score"],
                                                                              bool(r["passed"]))
    assert got == {
        ("json answers", "plain"): ("scored", 0.0, False), ("json answers", "json"): ("scored", 1.0, True),
        ("json answers", "cut"): ("scored", 0.0, False),
        ("mentions the stand-in", "plain"): ("scored", 1.0, True),
        ("mentions the stand-in", "json"): ("scored", 1.0, True),
        ("mentions the stand-in", "cut"): ("scored", 0.0, False),  # "Hello from"
        ("short", "plain"): ("scored", 0.0, False), ("short", "json"): ("scored", 0.0, False),
        ("short", "cut"): ("scored", 1.0, True),
        ("not cut", "plain"): ("scored", 1.0, True), ("not cut", "json"): ("scored", 1.0, True),
        ("not cut", "cut"): ("scored", 0.0, False)}
    # velvet evals: per eval, with the worst examples (the call ids velvet show takes)
    summary = {e["name"]: e for e in js(capsys, "--db", rig.url, "evals", "--since", "1h")["evals"]}
    e = summary["json answers"]
    assert set(e) >= {"name", "check", "judged", "passed", "failed", "pending", "skipped", "pass_rate",
                      "mean_score", "cost_usd", "previous_pass_rate", "worst"}
    assert (e["check"], e["judged"], e["passed"], e["failed"], e["pending"], e["skipped"]) == (
        "json_valid", 3, 1, 2, 0, 0)
    assert e["pass_rate"] == pytest.approx(1 / 3) and e["mean_score"] == pytest.approx(1 / 3)
    assert e["previous_pass_rate"] is None and e["cost_usd"] == 0
    assert sorted(e["worst"]) == sorted([str(ids["plain"]), str(ids["cut"])])
    code, out, _ = run(capsys, "--db", rig.url, "evals", "--since", "1h")
    assert code == 0 and "json answers" in out and "33.3%" in out
    # the report's answer-quality section: per eval, and per day
    report = js(capsys, "--db", rig.url, "report", "--since", "1h")
    mine = next(x for x in report["evals"] if x["name"] == "json answers")
    assert (mine["judged"], mine["passed"]) == (3, 1)
    assert any(d["eval"] == "json answers" and d["pass_rate"] == pytest.approx(1 / 3)
               for d in report["evals_by_day"])
    code, _, _ = run(capsys, "--db", rig.url, "report", "--since", "1h", "-o", str(rig.tmp / "r.html"))
    page = (rig.tmp / "r.html").read_text()
    assert code == 0 and "Answer quality" in page and "json answers" in page and "33.3%" in page
    # velvet show lists the answer's scores
    shown = js(capsys, "--db", rig.url, "show", str(ids["cut"]))
    assert {s["eval"]: s["passed"] for s in shown["scores"]} == {
        "json answers": False, "mentions the stand-in": False, "short": True, "not cut": False}
    code, out, _ = run(capsys, "--db", rig.url, "show", str(ids["cut"]))
    assert "not cut" in out and "finish_reason length" in out


def test_batch_lines_are_scored(rig, monkeypatch, capsys):
    client = rig.client(monkeypatch, "batch")
    lines = [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": MSG,
                       **({"response_format": {"type": "json_object"}} if i < 3 else {})}} for i in range(4)]
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"case": "batch"})
    while b.status != "completed":
        b = client.batches.retrieve(b.id)
    assert b.output_file_id
    client.files.content(b.output_file_id).read()
    got = rig.scores("batch answers have an answer key", 4)
    assert {r["custom_id"]: bool(r["passed"]) for r in got} == {"q-0": True, "q-1": True, "q-2": True,
                                                                "q-3": False}
    assert {r["batch_id"] for r in got} == {b.id} and all(r["source"] == "batch" for r in got)
    bad = next(r for r in got if r["custom_id"] == "q-3")
    assert "not JSON" in bad["reason"]
    shown = js(capsys, "--db", rig.url, "batch", b.id)
    assert shown["evals"] == [{"name": "batch answers have an answer key", "passed": 3, "failed": 1,
                               "pending": 0, "skipped": 0, "pass_rate": 0.75}]
    code, out, _ = run(capsys, "--db", rig.url, "batch", b.id)
    assert code == 0 and "batch answers have an answer key" in out and "75.0%" in out
    line = js(capsys, "--db", rig.url, "show", b.id, "q-3")
    assert [s["passed"] for s in line["scores"]] == [False]


def test_live_judge_through_the_proxy(rig, monkeypatch):
    client = rig.client(monkeypatch, "judge-live")
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    call = rig.call_id(r.headers["x-request-id"])
    (s,) = rig.scores("helpful (live judge)", 1)
    # the stand-in scores a tenth of the words between <answer> tags: "Hello from the stand-in API." -> 0.5
    assert (s["status"], s["score"], bool(s["passed"]), s["call_id"]) == ("scored", 0.5, True, call)
    assert s["reason"] and s["judge_call"] and s["cost_usd"] > 0
    # the judge's call went through the proxy: logged, tagged, with the judge key's fingerprint, never judged
    (jc,) = wait_for(lambda: rig.q("SELECT id, tags, key_fingerprint, request_body FROM calls "
                                   "WHERE request_id = ?", (s["judge_call"],)), what="the judge's call")
    assert json_value(jc["tags"]) == {"velvet-eval": "helpful (live judge)"}
    assert jc["key_fingerprint"] and JUDGE_KEY not in str(jc)
    prompt = json_value(jc["request_body"])["messages"][0]["content"]
    assert "Request: user: Say hello" in prompt and "<answer>Hello from the stand-in API.</answer>" in prompt
    time.sleep(1.5)
    assert rig.q("SELECT COUNT(*) AS n FROM scores WHERE call_id = ?", (jc["id"],))[0]["n"] == 0


def test_a_rate_limited_judge_is_delayed_not_failed(rig, monkeypatch):
    client = rig.client(monkeypatch, "judge-live")
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG, max_tokens=4)
    rig.standin.rate_limit(1)  # the next model call, the judge's, gets a 429
    call = rig.call_id(r.headers["x-request-id"])
    got = wait_for(lambda: (x := rig.q("SELECT * FROM scores WHERE call_id = ? AND status = 'scored'", (call,)))
                   and x[0], timeout=30, what="the judge's score after the 429")
    assert got["attempts"] == 1 and got["score"] == 0.4 and not got["passed"]  # "Hello from the stand-in"
    wait_for(lambda: any(json_value(x["tags"]) == {"velvet-eval": "helpful (live judge)"}
                         for x in rig.q("SELECT tags FROM calls WHERE status_code = 429")), what="the judge's 429")


def test_batch_judge_through_the_proxy(rig, monkeypatch, capsys):
    client = rig.client(monkeypatch, "judge-batch")
    calls = [client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG,
                                                              max_tokens=n) for n in (3, 10)]
    ids = [rig.call_id(c.headers["x-request-id"]) for c in calls]
    got = rig.scores("helpful (batch judge)", 2, timeout=60)
    assert {r["call_id"]: (r["score"], bool(r["passed"])) for r in got} == {ids[0]: (0.3, False),
                                                                            ids[1]: (0.5, True)}
    (batch_id,) = {r["judge_batch_id"] for r in got}
    assert all(r["judge_custom_id"] and r["cost_usd"] > 0 for r in got)
    # the judge's batch is in the logs like any other, tagged by its metadata, and its lines are not judged
    (b,) = rig.q("SELECT metadata, status FROM batches WHERE id = ?", (batch_id,))
    assert json_value(b["metadata"])["velvet-eval"] == "helpful (batch judge)"
    assert rig.q("SELECT COUNT(*) AS n FROM scores WHERE batch_id = ?", (batch_id,))[0]["n"] == 0
    e = next(x for x in js(capsys, "--db", rig.url, "evals", "--since", "1h")["evals"]
             if x["name"] == "helpful (batch judge)")
    assert (e["judged"], e["passed"], e["failed"]) == (2, 1, 1) and e["cost_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in got))


def test_budget_cap_skips(rig, monkeypatch):
    client = rig.client(monkeypatch, "budget")
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    (s,) = rig.scores("on a budget", 1)
    assert s["status"] == "skipped" and "max_usd_per_day" in s["reason"] and s["judge_call"] is None
    assert not rig.q("SELECT id FROM calls WHERE tags IS NOT NULL AND request_body IS NOT NULL AND "
                     "endpoint = 'chat.completions' AND model_requested = 'gpt-4.1-mini' AND id > 0 AND "
                     "request_id IS NULL")


def test_backfill_dry_run_and_rerun(rig, monkeypatch, capsys, tmp_path):
    client = rig.client(monkeypatch, "backfill")
    for i in range(12):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1 + i % 6)

    def backfill_flows() -> set[str]:
        return {r["flow_id"] for r in rig.q("SELECT flow_id, tags FROM calls WHERE tags IS NOT NULL")
                if json_value(r["tags"]) == {"case": "backfill"}}

    wait_for(lambda: len(backfill_flows()) >= 12, what="the calls' rows")
    rules = tmp_path / "late.toml"
    rules.write_text('[[eval]]\nname = "late"\ncheck = "min_chars"\nchars = 15\nsample = 0.5\n'
                     'tags = {case = "backfill"}\n')
    plan = js(capsys, "--db", rig.url, "evals", "run", "--rules", str(rules), "--since", "1h", "--dry-run")
    (p,) = plan["evals"]
    assert plan["dry_run"] and p["name"] == "late" and 1 <= p["answers"] < 12
    assert rig.q("SELECT COUNT(*) AS n FROM scores WHERE eval = 'late'")[0]["n"] == 0  # a dry run writes nothing
    first = js(capsys, "--db", rig.url, "evals", "run", "--rules", str(rules), "--since", "1h")["evals"]
    assert first[0]["judged"] == p["answers"] and first[0]["passed"] + first[0]["failed"] == p["answers"]
    chosen = {r["subject"] for r in rig.q("SELECT subject FROM scores WHERE eval = 'late'")}
    from velvet_core.evals.store import sampled

    assert chosen == {f for f in backfill_flows() if sampled(f, 0.5)}  # the hash's choice, every run
    again = js(capsys, "--db", rig.url, "evals", "run", "--rules", str(rules), "--since", "1h")["evals"]
    assert again == []  # nothing new to score
    code, _, err = run(capsys, "--db", rig.url, "evals", "run", "--rules", str(rules), "--since", "1h",
                       "--name", "nope")
    assert code == 2 and "no eval named 'nope'" in err


def test_eval_alerts_fire_and_resolve(rig, monkeypatch):
    client = rig.client(monkeypatch, "alerting")
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    def states(rule: str) -> list[str]:
        return [r["state"] for r in rig.q("SELECT state FROM alerts WHERE rule = ? ORDER BY id", (rule,))]

    wait_for(lambda: "firing" in states("json failing") and "firing" in states("json score low"),
             what="both eval alerts firing")
    (fired,) = rig.q("SELECT value, text, details FROM alerts WHERE rule = 'json failing' AND state = 'firing'")
    details = orjson.loads(fired["details"])
    assert fired["value"] == 1.0 and details["eval"] == "alerting json" and details["judged"] >= 2
    assert len(details["worst"]) >= 2 and all(w["reason"].startswith("not JSON") for w in details["worst"])
    assert "100.0% of answers failed" in fired["text"]
    (low,) = rig.q("SELECT value, text FROM alerts WHERE rule = 'json score low' AND state = 'firing'")
    assert low["value"] == 0.0 and "mean score 0.00" in low["text"] and "< 0.50" in low["text"]
    deadline = time.monotonic() + 40  # good answers bring both back
    while not ("resolved" in states("json failing") and "resolved" in states("json score low")):
        assert time.monotonic() < deadline, (states("json failing"), states("json score low"))
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, response_format={"type": "json_object"})
        time.sleep(0.3)


def test_bad_rules_stop_mitmdump_at_start(tmp_path, standin):
    for text, why in [('[[eval]]\nname = "x"\ncheck = "regex"\npattern = "(("\n', "eval 'x': pattern:"),
                      ('[[eval]]\nname = "j"\ncheck = "judge"\njudge_model = "m"\nprompt = "{input}"\n',
                       "eval 'j': prompt: must contain {output}"),
                      ('[[eval]]\nname = "u"\ncheck = "spelling"\n', "eval 'u': check:")]:
        rules = tmp_path / "bad.toml"
        rules.write_text(text)
        p = Proxy(f"sqlite:///{tmp_path / 'v.db'}", standin.url, tmp_path / why[6],
                  extra=["--set", f"velvet_evals={rules}"])
        with contextlib.suppress(RuntimeError):  # mitmproxy reports the OptionsError and exits
            p.start()
        assert p.proc is not None and p.proc.wait(30) != 0
        assert f"velvet_evals: {rules}: {why}" in p.output()
        p.log.close()
