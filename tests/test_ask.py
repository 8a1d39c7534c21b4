"""``velvet ask``: a question → read-only SQL → its result, on both backends, against a database velvet itself
wrote (the SDK's traffic through a real mitmdump: tests/support/askdb.py), with the stand-in playing the model
(scripted replies; every request it received recorded). No real model is ever called."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import askdb
from support.helpers import run
from support.pg import reader_url
from support.rig import API_KEY, Proxy, free_port, wait_for
from support.standin import StandIn
from velvet_core.ask import context
from velvet_core.ask.copilot import extract_sql, unsupported, with_limit
from velvet_core.ask.evaluate import same
from velvet_core.storage.database import open_db, open_readonly
from velvet_core.storage.meanings import TABLES

JSON_KEYS = {"question", "sql", "attempts", "columns", "rows", "truncated", "error"}
VELVET = Path(sys.executable).parent / "velvet"


@pytest.fixture(scope="module")
def filled(proxy: Proxy) -> dict[str, Any]:
    """The proxy's database, filled; ``url`` to query it (PostgreSQL: a read-only role), ``owner`` its owner."""
    with pytest.MonkeyPatch.context() as mp:
        made = askdb.fill(proxy, mp)
    pg = proxy.db_url.startswith("postgresql")
    return {**made, "owner": proxy.db_url, "url": reader_url(proxy.db_url) if pg else proxy.db_url,
            "kind": "postgres" if pg else "sqlite"}


@pytest.fixture(autouse=True)
def model(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """The stand-in as the model, reached directly (no proxy), with a key from the environment."""
    for k in list(os.environ):
        if "proxy" in k.lower() or k.startswith(("OPENAI_", "VELVET_ASK_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", standin.url + "/v1")
    standin.copilot.reset()
    standin.keyless = False
    yield standin
    standin.copilot.reset()


def count(url: str, sql: str = "SELECT count(*) FROM calls") -> Any:
    db = open_db(url)
    try:
        return db.execute_sql(sql).fetchone()[0]
    finally:
        db.close()


def ask(capsys: Any, filled: dict[str, Any], *args: str) -> tuple[int, str, str]:
    return run(capsys, "ask", "--db", filled["url"], *args)


def fence(sql: str) -> str:
    return f"Here you go:\n```sql\n{sql}\n```\nThis counts them."


# -- the question set ------------------------------------------------------------------------------------------

def test_the_question_set_covers_what_people_ask() -> None:
    qs = context.load_questions(context.QUESTIONS)
    assert len(qs) >= 60
    cats = {q["category"] for q in qs}
    assert cats == {"live_calls", "batches", "lines", "custom_id", "costs", "turnaround", "errors", "tags",
                    "estimated_tokens", "time_windows"}
    assert all(isinstance(q["sqlite"], str) and isinstance(q["postgres"], str) for q in qs)
    assert len({q["question"] for q in qs}) == len(qs)
    assert 4 <= sum(bool(q.get("example")) for q in qs) <= 8


def test_every_gold_query_runs_and_finds_rows(filled: dict[str, Any]) -> None:
    from velvet_core.ask.copilot import run_sql

    db = open_readonly(filled["url"])
    try:
        empty = []
        for q in context.load_questions(context.QUESTIONS):
            r = run_sql(db, q[filled["kind"]])  # raises DBError with the database's message on any error
            if not r.rows or all(v is None for v in r.rows[0]):
                empty.append(q["question"])
        assert empty == []
    finally:
        db.close()


def test_every_column_has_its_meaning(filled: dict[str, Any]) -> None:
    db = open_readonly(filled["url"])
    try:
        schema = context.live_schema(db)
        assert set(schema) == set(TABLES)  # every table and view the meanings name is in a new database
        missing = [f"{t}.{c.name}" for t, (_, cols) in schema.items() for c in cols if not c.meaning]
        assert missing == []
        prompt = context.system_prompt(db, "cost per model per day")
        assert "json_extract" in prompt if filled["kind"] == "sqlite" else "->>" in prompt
        assert "Current UTC time: " in prompt and "custom_id" in prompt and "Worked examples" in prompt
    finally:
        db.close()


# -- one question ----------------------------------------------------------------------------------------------

def test_a_good_query(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    model.copilot.queue[:] = [fence("SELECT model, count(*) AS n FROM calls WHERE model IS NOT NULL "
                                    "GROUP BY model ORDER BY n DESC, model;")]
    code, out, err = ask(capsys, filled, "how many calls per model?", "--json")
    assert code == 0, err
    got = orjson.loads(out)
    assert set(got) == JSON_KEYS
    assert got["error"] is None and got["attempts"] == 1 and got["truncated"] is False
    assert got["columns"] == ["model", "n"]
    assert got["sql"].endswith("\nLIMIT 1000") and "ORDER BY n DESC" in got["sql"]
    assert got["rows"][0] == ["gpt-4o-mini-2024-07-18", 6] and sum(r[1] for r in got["rows"]) == count(
        filled["owner"], "SELECT count(*) FROM calls WHERE model IS NOT NULL")
    sent = model.copilot.requests[0]
    assert sent["headers"]["velvet-metadata-velvet-copilot"] == "ask"
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert sent["body"]["messages"][-1] == {"role": "user", "content": "how many calls per model?"}
    # as text: the SQL, the table, the row count and the attempts
    model.copilot.queue[:] = [fence("SELECT count(*) AS n FROM calls")]
    code, out, err = ask(capsys, filled, "how many calls?")
    assert code == 0, err
    assert out.startswith("SELECT count(*) AS n FROM calls\nLIMIT 1000\n\n")
    assert f"\n {count(filled['owner'])}\n" in out.replace("  ", " ") or str(count(filled["owner"])) in out
    assert out.rstrip().endswith("1 row; 1 attempt") and err == "" and API_KEY not in out


def test_max_rows_caps_and_says_so(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    model.copilot.queue[:] = ["SELECT id FROM calls ORDER BY id"]  # no fence: the whole reply is the SQL
    code, out, err = ask(capsys, filled, "all call ids", "--json", "--max-rows", "5")
    got = orjson.loads(out)
    assert code == 0, err
    assert got["sql"] == "SELECT id FROM calls ORDER BY id\nLIMIT 5" and len(got["rows"]) == 5 and got["truncated"]
    model.copilot.queue[:] = ["SELECT id FROM calls ORDER BY id LIMIT 3"]  # its own LIMIT is kept
    got = orjson.loads(ask(capsys, filled, "three call ids", "--json", "--max-rows", "5")[1])
    assert got["sql"] == "SELECT id FROM calls ORDER BY id LIMIT 3" and len(got["rows"]) == 3
    assert not got["truncated"]


def test_a_made_up_column_is_healed_with_the_database_error(filled: dict[str, Any], model: StandIn,
                                                             capsys: Any) -> None:
    q = "what did we spend per model?"
    model.copilot.answers[q] = [fence("SELECT model, sum(cost_dollars) AS usd FROM calls GROUP BY model"),
                                fence("SELECT model, sum(cost_usd) AS usd FROM calls GROUP BY model")]
    code, out, err = ask(capsys, filled, q, "--json")
    assert code == 0, err
    got = orjson.loads(out)
    assert got["attempts"] == 2 and got["error"] is None and "cost_usd" in got["sql"]
    assert len(model.copilot.requests) == 2
    second = model.copilot.requests[1]["body"]["messages"]
    assert second[-2]["role"] == "assistant" and "cost_dollars" in second[-2]["content"]
    assert second[-1]["role"] == "user" and "cost_dollars" in second[-1]["content"]
    said = "no such column: cost_dollars" if filled["kind"] == "sqlite" else 'column "cost_dollars" does not exist'
    assert said in second[-1]["content"]


@pytest.mark.parametrize("sql", [
    "DELETE FROM calls",
    "WITH doomed AS (SELECT id FROM calls) DELETE FROM calls WHERE id IN (SELECT id FROM doomed)",
    "SELECT count(*) FROM calls;\nDELETE FROM calls",
    "SELECT 1; DROP TABLE calls",
])
def test_a_model_that_keeps_writing_is_refused_three_times(filled: dict[str, Any], model: StandIn, capsys: Any,
                                                           sql: str) -> None:
    before = (count(filled["owner"]), count(filled["owner"], "SELECT count(*) FROM batches"))
    model.copilot.queue[:] = [fence(sql)] * 5
    # PostgreSQL: as the owner (a superuser), so that only the READ ONLY transaction stands in the way
    owner = ["--db", filled["owner"], "--allow-powerful-role"] if filled["kind"] == "postgres" else []
    code, out, err = ask(capsys, filled, "clean up the calls table", *owner)
    assert code == 1 and out == ""
    assert len(model.copilot.requests) == 3  # at most 3 attempts
    assert err.startswith("velvet ask: no answer after 3 attempts: ") and sql in err
    assert (count(filled["owner"]), count(filled["owner"], "SELECT count(*) FROM batches")) == before
    feedback = model.copilot.requests[2]["body"]["messages"][-1]["content"]
    assert feedback.startswith("The database refused that SQL:")
    if sql.startswith(("DELETE", "WITH")):  # the engine's read-only mode said no
        assert ("read-only" in feedback if filled["kind"] == "postgres" else "refused" in feedback), feedback
    code, out, _ = ask(capsys, filled, "clean up the calls table", "--json", *owner)
    got = orjson.loads(out)
    assert code == 1 and got["attempts"] == 3 and got["rows"] == [] and got["error"] and got["sql"] == sql


def test_unsupported(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    model.copilot.queue[:] = ["UNSUPPORTED: velvet does not log the weather"]
    code, out, err = ask(capsys, filled, "what was the weather when we ran batch 1?")
    assert code == 1 and out == ""
    assert err == "velvet ask: the model says it cannot answer: velvet does not log the weather\n"
    model.copilot.queue[:] = ["UNSUPPORTED: no weather"]
    code, out, _ = ask(capsys, filled, "weather?", "--json")
    assert code == 1 and orjson.loads(out)["error"] == "UNSUPPORTED: no weather"
    assert len(model.copilot.requests) == 2  # not asked again


def test_a_query_over_the_time_limit(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    slow = ("SELECT pg_sleep(20) AS s" if filled["kind"] == "postgres" else
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) AS n FROM c")
    model.copilot.queue[:] = [fence(slow)] * 3
    t = time.monotonic()
    code, _, err = ask(capsys, filled, "something slow", "--timeout", "0.3")
    assert code == 1 and time.monotonic() - t < 10, err
    assert ("statement timeout" in err if filled["kind"] == "postgres" else "stopped after 0.3 s" in err), err


def test_sql_only_runs_nothing(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    slow = "SELECT pg_sleep(5) AS s" if filled["kind"] == "postgres" else "SELECT count(*) AS n FROM calls"
    model.copilot.queue[:] = [fence(slow)]
    t = time.monotonic()
    code, out, err = ask(capsys, filled, "how many?", "--sql-only")
    assert code == 0 and out == slow + "\nLIMIT 1000\n\n" and time.monotonic() - t < 4, err


def test_a_model_that_is_down(filled: dict[str, Any], capsys: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = ask(capsys, filled, "how many calls?", "--base-url", dead)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"velvet ask: the model at {dead} is unreachable: ")


def test_a_local_server_needs_no_key_but_openai_does(filled: dict[str, Any], model: StandIn, capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    code, _, err = ask(capsys, filled, "how many calls?")
    assert code == 2 and "OPENAI_API_KEY is not set" in err
    model.keyless = True
    model.copilot.queue[:] = [fence("SELECT count(*) AS n FROM calls")]
    monkeypatch.setenv("VELVET_ASK_BASE_URL", model.url + "/v1")
    monkeypatch.setenv("VELVET_ASK_MODEL", "llama3.1:8b")
    code, _, err = ask(capsys, filled, "how many calls?", "--json")
    assert code == 0, err
    sent = model.copilot.requests[0]
    assert "authorization" not in sent["headers"] and sent["body"]["model"] == "llama3.1:8b"


def test_usage_errors(filled: dict[str, Any], capsys: Any) -> None:
    for args in (["--max-rows", "0", "q"], ["--eval", "x.jsonl", "q"], ["   "], ["--timeout", "-1", "q"]):
        code, _, err = ask(capsys, filled, *args)
        assert code == 2, (args, err)
    with pytest.raises(SystemExit) as e:
        ask(capsys, filled, "q", "--max-rows", "many")
    assert e.value.code == 2


def test_hostile_replies(filled: dict[str, Any], model: StandIn, capsys: Any) -> None:
    before = count(filled["owner"])
    model.copilot.queue[:] = ["SELECT 'a\x00b' AS x", "\ufffd\x01" * 3, "x" * 200_000,
                              fence("SELECT load_extension('/tmp/x')" if filled["kind"] == "sqlite"
                                    else "SELECT pg_read_file('/etc/passwd')")]
    for _ in range(2):
        code, _, err = ask(capsys, filled, "anything")
        assert code in (0, 1) and len(err) < 5000 and count(filled["owner"]) == before
    assert not model.copilot.queue


# -- --eval ----------------------------------------------------------------------------------------------------

def test_eval_measures_accuracy_offline(filled: dict[str, Any], model: StandIn, capsys: Any,
                                        tmp_path: Path) -> None:
    """The stand-in answers each question with its recorded SQL: the gold one for most, a wrong one for five,
    a made-up column then the gold for two: accuracy (n-5)/n, 5 misses with both SQLs, n+2 attempts."""
    qs = context.load_questions(context.QUESTIONS)
    kind = filled["kind"]
    wrong = {0: "SELECT count(*) + 1 AS calls FROM calls", 3: "SELECT count(*) AS streamed FROM calls",
             20: "SELECT custom_id FROM batch_lines", 40: "SELECT id, turnaround_s FROM batches ORDER BY id",
             50: "SELECT 'nope' AS team, 0 AS calls"}
    healed = {10, 30}
    for i, q in enumerate(qs):
        gold = q[kind]
        if i in wrong:
            model.copilot.answers[q["question"]] = [fence(wrong[i])]
        elif i in healed:
            model.copilot.answers[q["question"]] = [fence("SELECT no_such_column FROM calls"), fence(gold)]
        else:  # the same result written differently: no fence, a trailing semicolon
            model.copilot.answers[q["question"]] = [gold + ";"]
    f = tmp_path / "set.jsonl"
    f.write_bytes(context.QUESTIONS.read_bytes())
    code, out, err = ask(capsys, filled, "--eval", str(f), "--json")
    assert code == 0, err
    got = orjson.loads(out)
    n = len(qs)
    assert got["questions"] == n and got["correct"] == n - 5 and got["accuracy"] == round((n - 5) / n, 4)
    assert got["attempts"] == n + 2
    assert sorted(m["question"] for m in got["misses"]) == sorted(qs[i]["question"] for i in wrong)
    assert all(m["gold_sql"] and m["sql"] for m in got["misses"])
    assert sum(c["questions"] for c in got["by_category"].values()) == n
    assert got["by_category"][qs[0]["category"]]["correct"] < got["by_category"][qs[0]["category"]]["questions"]
    code, out, err = ask(capsys, filled, "--eval", str(f))
    assert code == 0, err
    assert out.startswith(f"model gpt-4.1-mini: {n - 5}/{n} correct, execution accuracy ")
    assert out.count("\nmiss (") == 5 and "  gold:  " in out and "  model: " in out
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "x"\n')
    assert ask(capsys, filled, "--eval", str(bad))[0] == 2


def test_result_comparison() -> None:
    assert same([[1, "a"], [2, "b"]], [[2, "b"], [1, "a"]], ordered=False)
    assert not same([[1, "a"], [2, "b"]], [[2, "b"], [1, "a"]], ordered=True)
    assert same([[0.1 + 0.2]], [[0.3]], ordered=False) and not same([[0.3]], [[0.30001]], ordered=False)
    assert same([[1, None]], [[1.0, None]], ordered=True) and not same([[1]], [[1], [1]], ordered=False)
    assert same([[True]], [[1]], ordered=False)


def test_sql_extraction() -> None:
    assert extract_sql("x\n```sql\nSELECT 1;\n```\n```sql\nSELECT 2\n```") == "SELECT 1"
    assert extract_sql("```SQL\nSELECT 1\n") == "SELECT 1" and extract_sql("  SELECT 3;;  ") == "SELECT 3"
    assert extract_sql("```\nSELECT 4\n```") == "SELECT 4"
    assert unsupported("UNSUPPORTED: no such data") == "no such data" and unsupported("SELECT 1") is None
    assert with_limit("SELECT 1", 9) == "SELECT 1\nLIMIT 9"
    assert with_limit("SELECT 1 limit 2", 9) == "SELECT 1 limit 2"
    assert with_limit("SELECT 1 -- why", 9) == "SELECT 1 -- why\nLIMIT 9"


def test_only_the_tables_a_question_needs_when_the_schema_is_large() -> None:
    texts = {n: f"table {n} ({row}):\n" + "\n".join(f"  {c} -- {m}" for c, m in cols.items())
             for n, (row, cols) in TABLES.items()}
    assert context.pick_tables(texts, "anything") == list(texts)  # small enough: all
    picked = context.pick_tables(texts, "how long did the batch events take, by status?", budget=9000)
    assert {"calls", "batches", "batch_lines", "batch_events"} <= set(picked)
    assert "call_rollups" not in picked and len(picked) < len(texts)


# -- the interactive session and the proxy -----------------------------------------------------------------------

def _read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} in {buf!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_follow_up_in_a_terminal(filled: dict[str, Any], model: StandIn, tmp_path: Path) -> None:
    q1, q2 = "how many calls per model?", "and only for gpt-4o?"
    sql1 = "SELECT model, count(*) AS n FROM calls WHERE model IS NOT NULL GROUP BY model"
    sql2 = "SELECT model, count(*) AS n FROM calls WHERE model LIKE 'gpt-4o-2%' GROUP BY model"
    model.copilot.answers.update({q1: [fence(sql1)], q2: [fence(sql2)]})
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "TERM": "dumb", "COLUMNS": "120"}
    env.pop("VELVET_HOME", None)
    fd, tty = pty.openpty()
    proc = subprocess.Popen([str(VELVET), "ask", "--db", filled["url"]], stdin=tty, stdout=tty, stderr=tty,
                            env=env, start_new_session=True)
    os.close(tty)
    try:
        _read_until(fd, b"ask> ")
        os.write(fd, q1.encode() + b"\r")
        out = _read_until(fd, b"ask> ")
        assert b"gpt-4o-mini-2024-07-18" in out and b"1 attempt" in out
        os.write(fd, q2.encode() + b"\r")
        out = _read_until(fd, b"ask> ")
        assert b"gpt-4o-2024-08-06" in out and b"gpt-4o-mini" not in out.split(b"LIMIT 1000", 1)[1]
        os.write(fd, b"\\sql\r")
        out = _read_until(fd, b"ask> ")
        assert sql2.encode() in out
        os.write(fd, b"\x04")  # Ctrl-D
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
    follow = model.copilot.requests[1]["body"]["messages"]
    assert [m["role"] for m in follow[1:]] == ["user", "assistant", "user"]
    assert follow[1]["content"] == q1 and sql1 in follow[2]["content"] and follow[3]["content"] == q2
    assert q2 in (tmp_path / "velvet" / "ask_history").read_text()


def test_through_the_proxy_the_copilot_is_logged_and_tagged(filled: dict[str, Any], proxy: Proxy,
                                                            model: StandIn, capsys: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL")  # api.openai.com, reached through the proxy (mapped to the stand-in)
    for k, v in proxy.env().items():
        monkeypatch.setenv(k, v)
    model.copilot.queue[:] = [fence("SELECT count(*) AS n FROM calls")]
    code, out, err = ask(capsys, filled, "how many calls?", "--json")
    assert code == 0, err
    tagged = "json_extract(tags, '$.\"velvet-copilot\"')" if filled["kind"] == "sqlite" else \
        "tags->>'velvet-copilot'"
    wait_for(lambda: count(filled["owner"], f"SELECT count(*) FROM calls WHERE {tagged} = 'ask'") == 1, 15,
             "the copilot's call logged")
    assert "velvet-metadata-velvet-copilot" not in str(model.copilot.requests[0]["headers"])  # taken out
    db = open_db(filled["owner"])
    try:
        row = db.execute_sql(f"SELECT endpoint, model_requested, key_fingerprint FROM calls WHERE {tagged} = 'ask'"
                             ).fetchone()
        assert row[0] == "chat.completions" and row[1] == "gpt-4.1-mini" and row[2]
        dump = "\n".join(str(r) for t in ("calls", "call_rollups") for r in
                         db.execute_sql(f"SELECT * FROM {t}").fetchall())
    finally:
        db.close()
    assert API_KEY not in dump and API_KEY[8:] not in dump and API_KEY not in out + err
    assert API_KEY.encode() not in proxy.output().encode()
    if filled["kind"] == "sqlite":
        raw = b"".join(p.read_bytes() for p in Path(filled["owner"][len("sqlite:///"):]).parent.glob("velvet.db*"))
        assert API_KEY.encode() not in raw


def test_help_is_fast_to_import() -> None:
    out = subprocess.run([str(VELVET), "ask", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--sql-only" in out.stdout and "--eval" in out.stdout


def test_a_refused_key_is_one_line_and_never_printed(filled: dict[str, Any], capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "sk-bad-" + "z" * 40
    monkeypatch.setenv("OPENAI_API_KEY", bad)
    code, out, err = ask(capsys, filled, "how many calls?")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert " answered 401: " in err and bad not in err and bad[8:] not in err
