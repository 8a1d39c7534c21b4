"""End to end: judge work survives a proxy killed with SIGKILL while its judge batch is open (polled again by
the next proxy, never submitted twice), and a submission cut off before its batch was recorded is found again
through the API (or sent again when the API has no such batch)."""

from __future__ import annotations

import os
import signal
import uuid
from datetime import timedelta

import httpx
import orjson
import pytest
from support.helpers import chat, q, start_writer
from support.pg import fresh_pg_url
from support.rig import Proxy, wait_for
from support.standin import StandIn
from velvet_core import clock
from velvet_core.cost.prices import Pricer
from velvet_core.evals import judge
from velvet_core.evals.engine import Evaluator, Route
from velvet_core.evals.rules import parse_evals
from velvet_core.storage.database import open_db
from velvet_core.storage.sql import rows, ts

KEY = "sk-judge-restart-" + "R" * 30
RULES = """
[[eval]]
name = "judge"
check = "judge"
judge_model = "gpt-4.1-mini"
prompt = "Rate: <answer>{output}</answer>"
tags = {case = "restart"}
"""



def judge_batches(standin: StandIn) -> list[dict]:
    return [b for b in standin.batch_api.batches.values() if (b.get("metadata") or {}).get("velvet-eval")]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_with_a_judge_batch_open(backend, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'velvet.db'}" if backend == "sqlite" else fresh_pg_url()
    standin = StandIn().start()
    standin.batch_api.paused = True  # the judge's batch stays open until the second proxy runs
    rules = tmp_path / "evals.toml"
    rules.write_text(RULES)
    extra = ["--set", f"velvet_evals={rules}", "--set", "velvet_eval_interval=0.5"]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    first = Proxy(url, standin.url, tmp_path, extra=extra).start()
    try:
        client = first.client(monkeypatch, default_headers={"velvet-metadata-case": "restart"})
        for n in (2, 4, 6):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=n)
        sent = wait_for(lambda: (r := q(url, "SELECT judge_batch_id FROM scores WHERE status = 'sent'"))
                        and len(r) == 3 and not r[0]["judge_batch_id"].startswith("submitting:") and r,
                        what="the judge batch submitted")
    finally:
        first.stop(signal.SIGKILL)
    (batch_id,) = {r["judge_batch_id"] for r in sent}
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # (the client took it out of this process's environment)
    second = Proxy(url, standin.url, tmp_path, extra=extra).start()
    try:
        standin.batch_api.paused = False
        got = wait_for(lambda: (r := q(url, "SELECT score, status, judge_batch_id FROM scores")) and all(
            x["status"] == "scored" for x in r) and r, timeout=30, what="the scores after the restart")
    finally:
        assert second.stop() == 0
        standin.stop()
    assert sorted(x["score"] for x in got) == [0.2, 0.4, 0.5]  # "Hello from" / "Hello from the stand-in"
    assert {x["judge_batch_id"] for x in got} == {batch_id}
    assert [b["id"] for b in judge_batches(standin)] == [batch_id]  # polled again, never submitted twice


def test_a_cut_submission_is_found_again_or_sent_again(db_url, tmp_path, standin, monkeypatch):
    start_writer(db_url, tmp_path / "spool", [chat(i) for i in range(4)])
    before = len(judge_batches(standin))
    evals = parse_evals({"eval": [{"name": "j", "check": "judge", "judge_model": "gpt-4.1-mini",
                                   "prompt": "Rate: <answer>{output}</answer>"}]})
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    db = open_db(db_url)
    ev = Evaluator(db, evals, Pricer(), Route(base_url=standin.url + "/v1"), interval=0.1)
    try:
        ev.take(since=clock.now() - timedelta(hours=1))
        ids = [r["id"] for r in rows(db, "SELECT id FROM scores ORDER BY id")]
        assert len(ids) == 4
        # what a process killed mid-submission leaves: two rows claimed by a token whose batch the API made
        # (its metadata names the token), two by a token the API never saw; claims ten minutes old
        made, lost = uuid.uuid4().hex, uuid.uuid4().hex
        old = ts(db, clock.now() - timedelta(minutes=11))
        for row_id, token in zip(ids, (made, made, lost, lost), strict=True):
            p = db.param
            db.execute_sql(f"UPDATE scores SET status = 'sent', judge_batch_id = {p}, judged_at = {p}, "
                           f"judge_custom_id = {p} WHERE id = {p}",
                           (f"submitting:{token}", old, f"score-{row_id}", row_id))
        body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "<answer>a b</answer>"}],
                "response_format": judge.RESPONSE_FORMAT}
        lines = b"".join(orjson.dumps({"custom_id": f"score-{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": body}) + b"\n" for i in ids[:2])
        headers = {"Authorization": f"Bearer {KEY}"}
        f = httpx.post(standin.url + "/v1/files", headers=headers, files={"file": ("x.jsonl", lines)},
                       data={"purpose": "batch"}).json()
        b = httpx.post(standin.url + "/v1/batches", headers=headers, json={
            "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"velvet-eval": "j", "velvet_eval_submission": made}}).json()
        for _ in range(10):
            ev.judge_step(now=True)
            done = rows(db, "SELECT id, status, score, judge_batch_id, attempts FROM scores ORDER BY id")
            if all(r["status"] == "scored" for r in done):
                break
        assert [r["status"] for r in done] == ["scored"] * 4
        assert [r["judge_batch_id"] for r in done[:2]] == [b["id"]] * 2  # found again: not sent twice
        assert done[0]["score"] == 0.2 and done[0]["attempts"] == 0
        assert done[2]["judge_batch_id"] not in (b["id"], None) and done[2]["attempts"] == 1  # sent again
        assert len(judge_batches(standin)) == before + 2  # the one found, and the one sent again
    finally:
        ev.close()
        db.close()
    assert os.environ["OPENAI_API_KEY"] == KEY
