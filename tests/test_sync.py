"""``velvet sync`` and ``velvet reconcile`` against the stand-in, on both backends: batches made without the proxy,
pulled in page by page; a second run adds nothing; a run cut off half-way is resumed; a file that expired; the
same requests through a velvet proxy double nothing; the Usage API's figures against the logs, before and after."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from support.helpers import js, jsonl, q, run
from support.pg import fresh_pg_url
from support.rig import Proxy, wait_for
from support.standin import StandIn

KEY = "sk-sync-" + "S" * 40
ADMIN = "sk-admin-" + "A" * 40
COUNTS = ("batches", "batch_events", "batch_requests", "batch_results", "files")



def counts(url: str) -> dict[str, int]:
    return {t: q(url, f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in COUNTS}


def make_batches(standin: StandIn, n: int, lines: int = 3, finish: int = 0, prefix: str = "s") -> list[str]:
    """``n`` batches made straight at the API (no proxy); the first ``finish`` of them run to completion."""
    h = {"Authorization": f"Bearer {KEY}"}
    ids = []
    with httpx.Client(base_url=standin.url + "/v1", headers=h) as c:
        for i in range(n):
            data = jsonl([{"custom_id": f"{prefix}{i}-{j}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {j}"}]}}
                          for j in range(lines)])
            f = c.post("/files", files={"file": ("in.jsonl", io.BytesIO(data))}, data={"purpose": "batch"}).json()
            b = c.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "metadata": {"i": str(i)}}).json()
            ids.append(b["id"])
        for bid in ids[:finish]:
            while c.get(f"/batches/{bid}").json()["status"] != "completed":
                pass
    return ids


@pytest.fixture
def api(monkeypatch) -> StandIn:
    s = StandIn().start()
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", s.url + "/v1")
    yield s
    s.stop()


def test_sync_pages_then_adds_nothing(db_url, api, capsys, tmp_path):
    ids = make_batches(api, 105, finish=4)
    out = js(capsys, "--db", db_url, "sync", "--since", "1d")
    assert set(out) == {"batches", "new_batches", "updated_batches", "input_lines", "result_lines",
                        "files_downloaded", "bytes", "seconds"}
    assert (out["batches"], out["new_batches"], out["updated_batches"]) == (105, 105, 0)
    assert out["input_lines"] == 105 * 3 and out["result_lines"] == 4 * 3
    assert out["files_downloaded"] == 105 + 4 and out["bytes"] > 0
    got = {r["id"]: r for r in q(db_url, "SELECT id, status, key_fingerprint FROM batches")}
    assert set(got) == set(ids) and all(r["key_fingerprint"] for r in got.values())
    assert {got[i]["status"] for i in ids[:4]} == {"completed"} and {got[i]["status"] for i in ids[4:]} == {
        "validating"}
    assert {r["source"] for r in q(db_url, "SELECT DISTINCT source FROM batch_events")} == {"sync"}
    # answers matched to their requests by custom_id, counted as the proxy counts them
    shown = js(capsys, "--db", db_url, "batch", ids[0])
    assert (shown["lines"], shown["answered"], shown["failed"]) == (3, 3, 0) and shown["cost_usd"] > 0
    line = js(capsys, "--db", db_url, "show", ids[0], "s0-1")
    assert line["request"]["messages"][0]["content"] == "q 1" and line["status_code"] == 200
    before = counts(db_url)
    again = js(capsys, "--db", db_url, "sync", "--since", "1d")
    assert (again["batches"], again["new_batches"], again["updated_batches"], again["input_lines"],
            again["result_lines"], again["files_downloaded"]) == (105, 0, 0, 0, 0, 0)
    assert counts(db_url) == before
    # the key is in no stored byte
    if db_url.startswith("sqlite"):
        for f in Path(db_url.removeprefix("sqlite:///")).parent.glob("velvet.db*"):
            assert KEY.encode() not in f.read_bytes()
    else:
        dump = str(q(db_url, "SELECT * FROM batches")) + str(q(db_url, "SELECT * FROM batch_events"))
        assert KEY not in dump


def test_a_cut_run_is_resumed_and_a_gone_file_recorded(db_url, api, capsys):
    ids = make_batches(api, 6, finish=6, prefix="c")
    gone = api.batch_api.batches[ids[2]]["output_file_id"]
    del api.batch_api.files[gone]  # expired: the API answers 404 for it
    api.break_after(9)  # a few requests in, the API goes down
    code, out, err = run(capsys, "--db", db_url, "sync", "--since", "1d", "--json")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "the API cannot be read" in err and "run again to go on" in err and KEY not in err
    part = counts(db_url)
    assert 0 < part["batches"] < 6
    api.break_after(None)
    done = js(capsys, "--db", db_url, "sync", "--since", "1d")
    assert done["batches"] == 6
    assert q(db_url, "SELECT COUNT(*) AS n FROM batches")[0]["n"] == 6
    assert q(db_url, "SELECT COUNT(*) AS n FROM batch_requests")[0]["n"] == 6 * 3  # none twice
    assert q(db_url, "SELECT COUNT(*) AS n FROM batch_results")[0]["n"] == 5 * 3  # one output gone
    (b,) = q(db_url, "SELECT problem FROM batches WHERE id = ?", (ids[2],))
    assert gone in b["problem"] and "expired or deleted" in b["problem"]
    assert js(capsys, "--db", db_url, "batch", ids[2])["problem"] == b["problem"]
    # a bad key: one line, exit 1
    code, _, err = run(capsys, "--db", db_url, "sync", "--batch", ids[0])
    assert code == 0
    import os

    os.environ["OPENAI_API_KEY"] = "sk-bad-key"
    code, _, err = run(capsys, "--db", db_url, "sync")
    assert code == 1 and "refused the key" in err and len(err.strip().splitlines()) == 1


def test_dry_run_and_no_files(db_url, api, capsys):
    make_batches(api, 3, finish=1, prefix="d")
    dry = js(capsys, "--db", db_url, "sync", "--since", "1d", "--dry-run")
    assert (dry["batches"], dry["new_batches"], dry["input_lines"]) == (3, 3, 0)
    assert counts(db_url)["batches"] == 0
    bare = js(capsys, "--db", db_url, "sync", "--since", "1d", "--no-files")
    assert (bare["new_batches"], bare["files_downloaded"]) == (3, 0) and counts(db_url)["batch_requests"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sync_through_a_velvet_proxy_doubles_nothing(backend, api, capsys, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'velvet.db'}" if backend == "sqlite" else fresh_pg_url()
    ids = make_batches(api, 4, finish=2, prefix="p")
    proxy = Proxy(url, api.url, tmp_path).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
        out = js(capsys, "--db", url, "sync", "--since", "1d")
        assert (out["new_batches"] + out["updated_batches"] <= 4) and out["files_downloaded"] == 4 + 2
        # the proxy logged the same requests (list, downloads) and wrote the same rows: nothing twice
        wait_for(lambda: q(url, "SELECT COUNT(*) AS n FROM calls WHERE endpoint = 'files' AND action = 'content'")
                 [0]["n"] == 6, what="the proxy's download rows")
        wait_for(lambda: q(url, "SELECT COUNT(*) AS n FROM batch_results")[0]["n"] == 2 * 3, what="results")
    finally:
        assert proxy.stop() == 0
    assert q(url, "SELECT COUNT(*) AS n FROM batch_requests")[0]["n"] == 4 * 3
    assert q(url, "SELECT COUNT(*) AS n FROM batch_results")[0]["n"] == 2 * 3
    assert q(url, "SELECT COUNT(*) AS n FROM batches")[0]["n"] == 4
    assert len(q(url, "SELECT batch_id, status FROM batch_events")) == len(
        {(r["batch_id"], r["status"]) for r in q(url, "SELECT batch_id, status FROM batch_events")})
    assert set(ids) == {r["id"] for r in q(url, "SELECT id FROM batches")}


def test_reconcile_shows_the_gap_then_is_complete(db_url, api, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN)
    make_batches(api, 3, lines=4, finish=3, prefix="r")
    before = js(capsys, "--db", db_url, "reconcile", "--since", "1d")
    assert set(before) == {"since", "rows", "complete"} and before["complete"] is False
    (row,) = [r for r in before["rows"] if r["batch"]]
    assert set(row) == {"day", "model", "batch", "api_requests", "logged_requests", "api_input_tokens",
                        "logged_input_tokens", "api_output_tokens", "logged_output_tokens"}
    assert (row["api_requests"], row["logged_requests"], row["logged_input_tokens"]) == (12, 0, 0)
    code, text, _ = run(capsys, "--db", db_url, "reconcile", "--since", "1d")
    assert code == 0 and "velvet sync --since" in text and "≠" in text
    js(capsys, "--db", db_url, "sync", "--since", "1d")
    after = js(capsys, "--db", db_url, "reconcile", "--since", "1d")
    assert after["complete"] is True
    (row,) = after["rows"]
    assert row["api_requests"] == row["logged_requests"] == 12
    assert row["api_input_tokens"] == row["logged_input_tokens"] > 0
    assert row["api_output_tokens"] == row["logged_output_tokens"] > 0
    # a live call the proxy never saw: exactly that gap
    httpx.post(api.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    gap = js(capsys, "--db", db_url, "reconcile", "--since", "1d")
    (live,) = [r for r in gap["rows"] if not r["batch"]]
    assert gap["complete"] is False and (live["api_requests"], live["logged_requests"]) == (1, 0)
    monkeypatch.delenv("OPENAI_ADMIN_KEY")
    code, _, err = run(capsys, "--db", db_url, "reconcile")
    assert code == 1 and "OPENAI_ADMIN_KEY" in err
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-not-admin")
    code, _, err = run(capsys, "--db", db_url, "reconcile")
    assert code == 1 and "Usage API cannot be read" in err and "sk-not-admin" not in err


def test_a_big_file_is_synced_in_constant_memory(api, tmp_path):
    """A 40 MB input file (10,000 lines of 4 kB) downloaded and stored by ``velvet sync`` in a process of its own:
    its peak memory stays far below the file's size (bounded pieces, a few thousand lines per transaction)."""
    import resource  # noqa: F401  (the child measures itself)
    import subprocess
    import sys

    h = {"Authorization": f"Bearer {KEY}"}
    pad = "x" * 4000
    data = jsonl([{"custom_id": f"big-{i}", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": pad}]}}
                  for i in range(10_000)])
    assert len(data) > 40_000_000
    with httpx.Client(base_url=api.url + "/v1", headers=h, timeout=60) as c:
        f = c.post("/files", files={"file": ("in.jsonl", io.BytesIO(data))}, data={"purpose": "batch"}).json()
        b = c.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                     "completion_window": "24h"}).json()
    del data
    url = f"sqlite:///{tmp_path / 'velvet.db'}"
    code = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'velvet_core.cli', "
            f"'--db', {url!r}, 'sync', '--batch', {b['id']!r}, '--json']); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    *_, rss_kb = r.stdout.split()
    assert q(url, "SELECT COUNT(*) AS n FROM batch_requests")[0]["n"] == 10_000
    print(f"velvet sync of a 40 MB file: peak RSS {int(rss_kb) // 1024} MB")
    assert int(rss_kb) < 128_000, f"peak RSS {int(rss_kb) // 1024} MB for a 40 MB file"
