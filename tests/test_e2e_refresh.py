"""End to end: the proxy keeps a batch nobody polls current (velvet_refresh), through itself, downloads its files
when asked (velvet_refresh_download), and batch_overdue resolves once the refreshed batch completes; without a key
the refresh is off and velvet status says so."""

from __future__ import annotations

import io
import time

import pytest
from support.helpers import js, jsonl, q, run
from support.pg import fresh_pg_url
from support.rig import Proxy, wait_for
from support.standin import StandIn

KEY = "sk-refresh-" + "F" * 40
RULES = '[[rule]]\nname = "late batches"\nkind = "batch_overdue"\nhours = 1\n'



@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_refresh_keeps_a_batch_nobody_polls_current(backend, tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'velvet.db'}" if backend == "sqlite" else fresh_pg_url()
    standin = StandIn().start()
    standin.batch_api.clock = int(time.time()) - 3 * 3600  # made "3 hours ago" by the API's clock: overdue
    standin.batch_api.paused = True  # it stays open until the alert has fired
    rules = tmp_path / "alerts.toml"
    rules.write_text(RULES)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    proxy = Proxy(url, standin.url, tmp_path, extra=[
        "--set", "velvet_refresh=1", "--set", "velvet_refresh_download=true",
        "--set", f"velvet_alerts={rules}", "--set", "velvet_alert_interval=0.5"]).start()
    try:
        client = proxy.client(monkeypatch)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                 for i in range(3)]
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        # the app never polls: the refresh does, and the overdue rule fires on what it sees
        wait_for(lambda: [r for r in q(url, "SELECT state FROM alerts WHERE rule = 'late batches'")
                          if r["state"] == "firing"], timeout=30, what="batch_overdue firing")
        standin.batch_api.paused = False
        wait_for(lambda: q(url, "SELECT status FROM batches WHERE id = ?", (b.id,))[0]["status"] == "completed",
                 timeout=30, what="the batch completed in the logs")
        events = [r["status"] for r in q(url, "SELECT status FROM batch_events WHERE batch_id = ? ORDER BY id",
                                         (b.id,))]
        assert events == ["validating", "in_progress", "finalizing", "completed"]
        # its retrievals are logged as calls, made with the refresh key (its fingerprint), through the proxy
        polls = q(url, "SELECT key_fingerprint FROM calls WHERE endpoint = 'batches' AND action = 'retrieve'")
        assert polls and len({p["key_fingerprint"] for p in polls}) == 1
        # with velvet_refresh_download, its answers are logged though the app never read them
        wait_for(lambda: q(url, "SELECT COUNT(*) AS n FROM batch_results WHERE batch_id = ?", (b.id,))[0]["n"]
                 == 3, timeout=30, what="the output's lines")
        wait_for(lambda: "resolved" in [r["state"] for r in q(url, "SELECT state FROM alerts WHERE "
                                                                    "rule = 'late batches'")],
                 timeout=30, what="batch_overdue resolved")
        status = js(capsys, "--db", url, "status")["database"]["refresh"]
        assert status["state"] == "on" and status["interval"] == 1 and status["download"] is True
        assert "retrieved" in status
    finally:
        assert proxy.stop() == 0
        standin.stop()
    assert KEY not in proxy.output()


def test_without_a_key_the_refresh_is_off_and_status_says_so(tmp_path, monkeypatch, capsys, standin):
    url = f"sqlite:///{tmp_path / 'velvet.db'}"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    proxy = Proxy(url, standin.url, tmp_path, extra=["--set", "velvet_refresh_key_env=VELVET_NO_SUCH_KEY"]).start()
    try:
        got = wait_for(lambda: (d := js(capsys, "--db", url, "status")["database"]) and d.get("refresh"),
                       what="the refresh's state")
    finally:
        proxy.stop()
    assert got["state"] == "off" and got["why"] == "$VELVET_NO_SUCH_KEY is not set"
    _, out, _ = run(capsys, "--db", url, "status")
    assert "batch refresh" in out and "off ($VELVET_NO_SUCH_KEY is not set)" in out
    assert "velvet_refresh is off: $VELVET_NO_SUCH_KEY is not set" in proxy.output()
