"""The ``velvet`` command on databases filled through mitmdump by the official SDK (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import openai
import orjson
import pytest
from support.helpers import js, run
from support.pg import fresh_pg_url, reader_url
from support.rig import Proxy
from velvet_core import clock, humanize
from velvet_core.cli import main
from velvet_core.storage import sql
from velvet_core.storage.database import open_db

VELVET = Path(sys.executable).with_name("velvet")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
KEYS = {"id", "status", "endpoint", "model", "created_at", "in_progress_at", "finalizing_at", "completed_at",
        "failed_at", "expired_at", "cancelling_at", "cancelled_at", "expires_at", "input_file_id",
        "output_file_id", "error_file_id", "request_counts", "lines", "answered", "failed", "turnaround_seconds",
        "cost_usd"}
MSG = [{"role": "user", "content": "What is the exact prompt?"}]


@dataclass
class Filled:
    url: str
    ok: object = None  # the completed batch (SDK object)
    failed: object = None  # the batch that failed validation
    request_ids: dict[str, str] = field(default_factory=dict)
    calls: int = 0


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lines(n: int, bad=frozenset()) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "bad-model" if i in bad else "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"batch question {i}"}]}}) + b"\n"
        for i in range(1, n + 1))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def filled(request, standin, tmp_path_factory) -> Filled:
    """A few live calls and two batches, through a real mitmdump, then the proxy stopped (all written)."""
    tmp = tmp_path_factory.mktemp(f"cli-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    proxy = Proxy(url, standin.url, tmp).start()
    mp = pytest.MonkeyPatch()
    try:
        client = proxy.client(mp)
        f = Filled(url)
        r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
        f.request_ids["chat"] = r.headers["x-request-id"]
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=MSG, stream=True) as s:
            f.request_ids["stream"] = s.headers["x-request-id"]
            for _ in s.iter_lines():
                pass
        client.embeddings.create(model="text-embedding-3-small", input="hello")
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                           extra_headers={"x-standin-scenario": "429"})
        inp = client.files.create(file=("in.jsonl", io.BytesIO(lines(6, bad={4}))), purpose="batch")
        b = client.batches.create(input_file_id=inp.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("completed", "failed"):
            b = client.batches.retrieve(b.id)
        client.files.content(b.output_file_id).read()
        client.files.content(b.error_file_id).read()
        f.ok = b
        inp2 = client.files.create(file=("in2.jsonl", io.BytesIO(lines(2))), purpose="batch")
        b2 = client.batches.create(input_file_id=inp2.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"standin": "fail"})
        while b2.status not in ("completed", "failed"):
            b2 = client.batches.retrieve(b2.id)
        f.failed = b2
    finally:
        mp.undo()
        assert proxy.stop() == 0
    db = open_db(url)
    f.calls = db.execute_sql("SELECT count(*) FROM calls").fetchone()[0]
    db.close()
    return f




def test_batches_json(filled, capsys):
    got = js(capsys, "batches", "--db", filled.url)
    assert [b["id"] for b in got] == [filled.failed.id, filled.ok.id] or \
        {b["id"] for b in got} == {filled.failed.id, filled.ok.id}
    assert all(set(b) == KEYS for b in got)
    b = next(x for x in got if x["id"] == filled.ok.id)
    ok = filled.ok
    assert b["status"] == "completed" and b["endpoint"] == "/v1/chat/completions"
    assert b["created_at"] == iso(ok.created_at) and b["completed_at"] == iso(ok.completed_at)
    assert b["in_progress_at"] == iso(ok.in_progress_at) and b["finalizing_at"] == iso(ok.finalizing_at)
    assert b["expires_at"] == iso(ok.expires_at) and b["failed_at"] is None and b["cancelled_at"] is None
    assert all(b[k] is None or ISO.match(b[k]) for k in KEYS if k.endswith("_at"))
    assert b["input_file_id"] == ok.input_file_id and b["output_file_id"] == ok.output_file_id
    assert b["error_file_id"] == ok.error_file_id
    assert b["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert (b["lines"], b["answered"], b["failed"]) == (6, 5, 1)
    assert b["turnaround_seconds"] == ok.completed_at - ok.created_at
    assert b["cost_usd"] > 0
    f = next(x for x in got if x["id"] == filled.failed.id)
    assert f["status"] == "failed" and f["failed_at"] == iso(filled.failed.failed_at) and f["lines"] == 2
    assert f["answered"] == 0 and f["cost_usd"] is None

    assert [b["id"] for b in js(capsys, "--db", filled.url, "batches", "--status", "failed")] == [filled.failed.id]
    assert js(capsys, "--db", filled.url, "batches", "--since", "2099-01-01") == []
    assert len(js(capsys, "--db", filled.url, "batches", "--since", "1d")) == 2


def test_batches_for_people(filled, capsys):
    code, out, _ = run(capsys, "--db", filled.url, "batches")
    assert code == 0
    head, rule, *rows = out.splitlines()
    assert head.split()[:3] == ["ID", "STATUS", "ENDPOINT"] and set(rule) <= {"-", " "}
    ok = next(r for r in rows if r.startswith(filled.ok.id))
    assert " completed " in ok and re.search(r"\$\d+\.\d+$", ok) and " 3m 0s " in ok
    assert len({len(r) for r in rows if r.endswith("-")} | {len(ok)}) >= 1
    assert out.index("ENDPOINT") == rows[0].index("/v1/chat/completions")  # aligned columns


def test_batch_detail(filled, capsys):
    b = js(capsys, "--db", filled.url, "batch", filled.ok.id)
    assert set(b) >= KEYS
    assert [e["status"] for e in b["events"]] == ["validating", "in_progress", "finalizing", "completed"]
    assert b["durations"] == {"queue_seconds": filled.ok.in_progress_at - filled.ok.created_at,
                              "processing_seconds": filled.ok.finalizing_at - filled.ok.in_progress_at,
                              "finalize_seconds": filled.ok.completed_at - filled.ok.finalizing_at,
                              "turnaround_seconds": filled.ok.completed_at - filled.ok.created_at}
    [err] = b["errors"]
    assert err["code"] == "model_not_found" and err["count"] == 1 and err["example"]["custom_id"] == "q-4"
    assert err["example"]["line"] == 4
    [m] = b["cost_by_model"]
    assert m["lines"] == 5 and m["model"].startswith("gpt-4o-mini")
    assert m["cost_usd"] == pytest.approx(b["cost_usd"])
    failed = js(capsys, "--db", filled.url, "batch", filled.failed.id)
    assert failed["errors"][0]["source"] == "batch" and failed["errors"][0]["count"] >= 1

    code, out, _ = run(capsys, "batch", filled.ok.id, "--db", filled.url)
    assert code == 0 and "Status history" in out and "model_not_found" in out and "Cost by model" in out
    assert re.search(r"turnaround\s+3m 0s", out)


def test_lines_and_show(filled, capsys):
    rows = js(capsys, "--db", filled.url, "lines", filled.ok.id)
    assert [r["custom_id"] for r in rows] == [f"q-{i}" for i in range(1, 7)]
    assert [r["line"] for r in rows] == list(range(1, 7))
    assert all(r["status_code"] == 200 and r["cost_usd"] > 0 for r in rows if r["custom_id"] != "q-4")
    [bad] = js(capsys, "--db", filled.url, "lines", filled.ok.id, "--failed")
    assert bad["custom_id"] == "q-4" and bad["status_code"] == 400 and bad["error_code"] == "model_not_found"
    [one] = js(capsys, "--db", filled.url, "lines", filled.ok.id, "--custom-id", "q-2")
    assert one["line"] == 2

    shown = js(capsys, "--db", filled.url, "show", filled.ok.id, "q-2")
    assert shown["request"]["messages"] == [{"role": "user", "content": "batch question 2"}]
    assert shown["response"]["choices"][0]["message"]["content"]
    code, out, _ = run(capsys, "--db", filled.url, "show", filled.ok.id, "q-2")
    assert code == 0 and '"content": "batch question 2"' in out and "--- response ---" in out

    call = js(capsys, "--db", filled.url, "show", filled.request_ids["chat"])
    assert call["request"]["messages"] == MSG and call["response"]["object"] == "chat.completion"
    code, out, _ = run(capsys, "--db", filled.url, "show", filled.request_ids["stream"])
    assert code == 0 and "What is the exact prompt?" in out and "reassembled from the SSE events" in out
    assert js(capsys, "--db", filled.url, "show", str(call["id"]))["request_id"] == filled.request_ids["chat"]


def test_calls(filled, capsys):
    rows = js(capsys, "--db", filled.url, "calls", "--limit", "0")
    assert len(rows) == filled.calls and all(ISO.match(r["started_at"]) for r in rows)
    assert rows == sorted(rows, key=lambda r: r["started_at"], reverse=True)
    [limited] = js(capsys, "--db", filled.url, "calls", "--status", "429")
    assert limited["status_code"] == 429 and limited["error_code"] == "rate_limit_exceeded"
    assert js(capsys, "--db", filled.url, "calls", "--status", "4xx") == [limited]
    chat = js(capsys, "--db", filled.url, "calls", "--endpoint", "chat.completions")
    assert len(chat) == 3 and sum(c["stream"] for c in chat) == 1
    assert {c["model"] for c in js(capsys, "--db", filled.url, "calls", "--model", "text-embedding-3-small")} \
        == {"text-embedding-3-small"}
    code, out, _ = run(capsys, "--db", filled.url, "calls")
    assert code == 0 and "chat.completions" in out and " ms " in out


def test_stats(filled, capsys):
    s = js(capsys, "--db", filled.url, "stats", "--by", "endpoint")
    by = {g["endpoint"]: g for g in s["calls"]}
    assert sum(g["calls"] for g in s["calls"]) == filled.calls
    assert by["chat.completions"]["calls"] == 3 and by["chat.completions"]["errors"] == 1
    assert by["chat.completions"]["error_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert by["chat.completions"]["latency_p50_ms"] > 0
    assert by["chat.completions"]["latency_p95_ms"] >= by["chat.completions"]["latency_p50_ms"]
    [bat] = s["batches"]
    assert bat["endpoint"] == "/v1/chat/completions" and bat["batches"] == 2 and bat["lines"] == 8
    assert bat["turnaround_p50_seconds"] == filled.ok.completed_at - filled.ok.created_at
    day = js(capsys, "--db", filled.url, "stats", "--by", "day")
    assert [g["day"] for g in day["calls"]] == [datetime.now(UTC).date().isoformat()]
    key = js(capsys, "--db", filled.url, "stats", "--by", "key", "--since", "1h")
    assert len(key["calls"]) == 1 and re.fullmatch(r"[0-9a-f]{12}", key["calls"][0]["key"])
    code, out, _ = run(capsys, "--db", filled.url, "stats")
    assert code == 0 and "Live calls" in out and "Batches" in out and "TURNAROUND P50" in out


def test_export(filled, capsys, tmp_path):
    out = tmp_path / "lines.jsonl"
    assert main(["--db", filled.url, "export", "--batch", filled.ok.id, "--format", "jsonl", "-o", str(out)]) == 0
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"q-{i}" for i in range(1, 7)]
    assert orjson.loads(rows[0]["request_body"])["messages"][0]["content"] == "batch question 1"
    assert "6 rows written" in capsys.readouterr().err
    assert main(["--db", filled.url, "export", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == filled.calls and "api_key" not in table[0] and table[0]["key_fingerprint"]
    assert main(["--db", filled.url, "export", "--lines", "--format", "csv", "--since", "1d"]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 8


def test_sql(filled, capsys):
    url = reader_url(filled.url) if filled.url.startswith("postgresql") else filled.url  # (docs/security.md)
    got = js(capsys, "--db", url, "sql", "SELECT count(*) AS n FROM batch_lines WHERE batch_id = "
             f"'{filled.ok.id}'")
    assert got == [{"n": 6}]
    code, _, err = run(capsys, "sql", "DELETE FROM calls", "--db", url)
    assert code == 1 and err.startswith("velvet: ")
    assert js(capsys, "--db", url, "sql", "SELECT count(*) AS n FROM calls") == [{"n": filled.calls}]


def test_errors_are_one_line(filled, tmp_path):
    def velvet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VELVET), *args], capture_output=True, text=True)

    r = velvet("--db", filled.url, "batch", "batch_nope")
    assert r.returncode == 1 and r.stderr == "velvet: no batch 'batch_nope' in this database\n"
    r = velvet("lines", "batch_nope", "--db", filled.url)
    assert r.returncode == 1 and "no batch" in r.stderr and "Traceback" not in r.stderr
    r = velvet("--db", filled.url, "show", "req_nope")
    assert r.returncode == 1 and "no call" in r.stderr
    r = velvet("--db", f"sqlite:///{tmp_path}/missing.db", "batches")
    assert r.returncode == 2 and "no database" in r.stderr and "Traceback" not in r.stderr
    r = velvet("--db", "mysql://x/y", "batches")
    assert r.returncode == 2 and "use sqlite" in r.stderr
    r = velvet("--db", filled.url, "calls", "--since", "last tuesday")
    assert r.returncode == 2 and "--since" in r.stderr and "Traceback" not in r.stderr
    r = velvet("--db", "postgresql://nobody@127.0.0.1:1/none", "stats")
    assert r.returncode == 2 and r.stderr.startswith("velvet: cannot open") and len(r.stderr.splitlines()) == 1


def test_humanize():
    assert humanize.money(12.345) == "$12.35" and humanize.money(0.0012) == "$0.0012"
    assert humanize.money(0.5) == "$0.50" and humanize.money(1234.5) == "$1,234.50" and humanize.money(None) == "-"
    assert humanize.duration(3 * 3600 + 12 * 60 + 5) == "3h 12m" and humanize.duration(125) == "2m 5s"
    assert humanize.duration(45) == "45s" and humanize.duration(0.8) == "0.8s"
    assert humanize.duration(2 * 86400 + 3 * 3600) == "2d 3h"
    now = datetime(2026, 11, 24, 15, 0)
    assert clock.parse_since("2h", now) == datetime(2026, 11, 24, 13, 0)
    assert clock.parse_since("today", now) == datetime(2026, 11, 24)
    assert clock.parse_since("2026-11-24T16:00+01:00", now) == datetime(2026, 11, 24, 15, 0)
    with pytest.raises(ValueError):
        clock.parse_since("soon", now)
    assert sql.percentile([5, 1, 3, 2, 4], 50) == 3 and sql.percentile([1, 2], 95) == 2
    assert sql.percentile([], 50) is None


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        p = humanize.Progress(3, "exporting", stream=stream)
        for _ in range(3):
            p.advance()
        p.close()
    assert "exporting [" in term.getvalue() and "3/3" in term.getvalue() and term.getvalue().endswith("\n")
    assert pipe.getvalue() == ""


def test_failed_lines_are_the_failed_answers_and_the_lines_with_a_problem(db_url, capsys):
    """``velvet lines --failed`` reads from the failed answers and the lines with a problem (not every line): it
    lists exactly what the whole listing marks failed or with a problem, in line order, each once."""
    from velvet_core.storage.ops import BatchSeen, FileSeen, InputDone, OutputDone, RequestLines, ResultLines
    from velvet_core.storage.store import Store

    now = clock.now()
    db = open_db(db_url)
    try:
        store = Store(db)
        reqs = [{"file_id": "in-f", "line_no": i, "custom_id": f"c-{i}", "method": "POST",
                 "url": "/v1/chat/completions", "model": "gpt-4o-mini", "body": '{"n": 1}',
                 "problem": "not JSON" if i in (3, 5, 8) else None} for i in range(1, 11)]
        store.apply([FileSeen({"id": "in-f", "first_seen_at": now, "updated_at": now}), RequestLines(reqs),
                     InputDone("in-f")])
        store.apply([BatchSeen({"id": "batch_f", "status": "completed", "endpoint": "/v1/chat/completions",
                                "input_file_id": "in-f", "output_file_id": "out-f", "error_file_id": "err-f",
                                "created_at": now, "completed_at": now}, now, "retrieve")])
        ok = [i for i in range(1, 11) if i not in (2, 5, 7, 8)]  # 8: a line with a problem and no answer
        res = [{"file_id": "out-f", "line_no": n, "custom_id": f"c-{i}", "status_code": 200, "seen_at": now}
               for n, i in enumerate(ok, 1)]
        res += [{"file_id": "err-f", "line_no": n, "custom_id": c, "status_code": 400, "failed": True,
                 "error_code": "bad", "seen_at": now} for n, c in enumerate(("c-2", "c-5", "c-7", "c-99"), 1)]
        store.apply([ResultLines(res), OutputDone("out-f"), OutputDone("err-f")])
    finally:
        db.close()
    every = js(capsys, "--db", db_url, "lines", "batch_f")
    failed = js(capsys, "--db", db_url, "lines", "batch_f", "--failed")
    assert failed == [r for r in every if r["failed"] or r["problem"]]
    assert [r["custom_id"] for r in failed] == ["c-2", "c-3", "c-5", "c-7", "c-8", "c-99"]  # (c-99: no line)
    assert js(capsys, "--db", db_url, "lines", "batch_f", "--failed", "--custom-id", "c-5") == [failed[2]]


# Commands whose output is not a report: proxy runs mitmproxy (its output is mitmproxy's); export writes the data
# itself, in the format asked for (--format jsonl is the machines' form).
NO_JSON = {"velvet proxy", "velvet export"}


def test_every_command_has_json():
    import argparse

    from velvet_core.cli import parser

    def leaves(p: argparse.ArgumentParser, name: str):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, {o for a in p._actions for o in a.option_strings}
        for s in subs:
            for n, sp in s.choices.items():
                yield from leaves(sp, f"{name} {n}")

    found = dict(leaves(parser(), "velvet"))
    assert len(found) > 25 and set(found) >= NO_JSON
    assert [n for n, opts in found.items() if "--json" not in opts and n not in NO_JSON] == []


def test_addon_path_json(capsys):
    out = js(capsys, "addon-path")
    assert set(out) == {"path"} and Path(out["path"]).name == "velvet.py" and Path(out["path"]).is_file()
    code, text, _ = run(capsys, "addon-path")
    assert code == 0 and text.strip() == out["path"]
