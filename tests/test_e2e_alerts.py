"""End to end: each alert kind fires and resolves on traffic through a real mitmdump at the stand-in.

One mitmdump per backend with ``velvet_alerts`` (every kind, each rule filtered on its own tag so the
scenarios do not see each other) evaluated every 0.5 s; the webhook is a local HTTP server.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import time
from datetime import UTC, datetime, timedelta

import openai
import orjson
import pytest
from support.pg import fresh_pg_url
from support.rig import WAIT, Proxy, bound
from support.standin import StandIn
from support.webhook import WebhookServer, velvet_webhook_ok
from velvet_core.alerts.history import listing
from velvet_core.storage import models
from velvet_core.storage.database import open_readonly

SECRET = "hook-secret-for-tests"
TOKEN = "T0KEN-in-the-webhook-path"
KEYS = {"rule", "kind", "state", "value", "threshold", "window", "at", "details", "text"}
MSG = [{"role": "user", "content": "Alert me"}]

RULES = """
[[rule]]
name = "chat errors"
kind = "error_rate"
status = 429
threshold = 0.5
window = "5s"
min_calls = 2
tags = {case = "errors"}

[[rule]]
name = "slow answers"
kind = "latency_p95_ms"
threshold = 700
window = "3s"
tags = {case = "latency"}

[[rule]]
name = "slow first token"
kind = "ttft_p95_ms"
threshold = 300
window = "3s"
tags = {case = "ttft"}

[[rule]]
name = "live spend"
kind = "spend_usd"
source = "live"
threshold = 0.00002
window = "3s"
tags = {case = "spend"}

[[rule]]
name = "spend spike"
kind = "spend_spike"
factor = 3
window = "3s"
baseline = "60s"
tags = {case = "spike"}

[[rule]]
name = "overdue batches"
kind = "batch_overdue"
hours = 1
tags = {case = "overdue"}

[[rule]]
name = "failed batches"
kind = "batch_failed"
window = "4s"
tags = {case = "failed"}

[[rule]]
name = "unread output"
kind = "batch_unread"
hours = 1
tags = {case = "unread"}

[[rule]]
name = "velvet health"
kind = "velvet_stalled"
window = "2s"

[notify]
webhook = "{url}/hook/{token}"
secret = "{secret}"
"""


class Rig:
    def __init__(self, proxy: Proxy, hooks: WebhookServer, standin: StandIn) -> None:
        self.proxy, self.hooks, self.standin = proxy, hooks, standin

    def client(self, monkeypatch: pytest.MonkeyPatch, case: str) -> openai.OpenAI:
        return self.proxy.client(monkeypatch, default_headers={"velvet-metadata-case": case})

    def fired_then_resolved(self, rule: str) -> tuple[dict, dict]:
        fired = self.hooks.wait_state(rule, "firing")
        resolved = self.hooks.wait_state(rule, "resolved")
        return fired, resolved


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def rig(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"alerts-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    hooks = WebhookServer()
    standin = StandIn().start()
    standin.batch_api.clock = int(time.time()) - 3 * 3600  # batches made "3 hours ago" by the API's clock
    rules = tmp / "alerts.toml"
    rules.write_text(RULES.replace("{url}", hooks.url).replace("{token}", TOKEN).replace("{secret}", SECRET))
    proxy = Proxy(url, standin.url, tmp, extra=["--set", f"velvet_alerts={rules}",
                                                "--set", "velvet_alert_interval=0.5"]).start()
    yield Rig(proxy, hooks, standin)
    assert proxy.stop() == 0
    standin.stop()
    hooks.stop()


def check_message(m: dict, rig: Rig) -> None:
    assert set(m) == KEYS
    assert m["state"] in ("firing", "warning", "resolved")
    assert datetime.strptime(m["at"], "%Y-%m-%dT%H:%M:%SZ")
    assert m["text"].startswith(f"velvet {m['state'].upper()} · {m['rule']}: ") and "\n" not in m["text"]


def test_error_rate_fires_and_resolves(rig, monkeypatch):
    client = rig.client(monkeypatch, "errors")
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                           extra_headers={"x-standin-scenario": "429"})
    fired = rig.hooks.wait_state("chat errors", "firing")
    check_message(fired, rig)
    assert fired["kind"] == "error_rate" and fired["value"] == 1.0 and fired["threshold"] == 0.5
    assert fired["window"] == "5s" and fired["details"]["calls"] == 3 and fired["details"]["errors"] == 3
    assert fired["details"]["top_errors"][0] == {"status_code": 429, "error_code": "rate_limit_exceeded",
                                                 "count": 3}
    assert "error rate 100.0%" in fired["text"] and "> 50.0% over 5s" in fired["text"]
    # no flood: nothing more while it keeps firing
    time.sleep(1)
    assert [m["state"] for m in rig.hooks.messages("chat errors")] == ["firing"]
    deadline = time.monotonic() + WAIT  # answered calls bring the error rate down (once written: idle-class)
    while not [m for m in rig.hooks.messages("chat errors") if m["state"] == "resolved"]:
        assert time.monotonic() < deadline, "error_rate never resolved"
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        time.sleep(0.3)
    resolved = rig.hooks.wait_state("chat errors", "resolved")
    check_message(resolved, rig)
    # not above the threshold; or None: a window whose errors have aged out before the answered calls are
    # written has no data, which resolves the rule (no_data = "ok", the default: docs/alerts.md)
    assert resolved["value"] is None or resolved["value"] <= 0.5
    # the signature is the HMAC-SHA256 of the timestamp and the exact body (the check of docs/security.md);
    # the path's token reached the hook
    hit = next(r for r in rig.hooks.received if r["json"] == fired)
    assert hit["path"] == f"/hook/{TOKEN}"
    ts = hit["headers"]["x-velvet-timestamp"]
    expected = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + hit["body"], hashlib.sha256).hexdigest()
    assert hit["headers"]["x-velvet-signature"] == expected
    assert velvet_webhook_ok(SECRET.encode(), hit["headers"], hit["body"])
    # the mitmproxy log and the alerts table have both changes; the webhook's token is never logged
    out = rig.proxy.output()
    assert fired["text"] in out and resolved["text"] in out and TOKEN not in out and SECRET not in out
    db = open_readonly(rig.proxy.db_url)
    try:
        rows = [r for r in listing(db) if r["rule"] == "chat errors"]
    finally:
        db.close()
    assert [r["state"] for r in rows] == ["resolved", "firing"]
    assert rows[1]["kind"] == "error_rate" and rows[1]["value"] == 1.0 and rows[1]["window"] == "5s"
    assert rows[1]["details"]["errors"] == 3 and rows[1]["source"] and rows[1]["subject"] == ""


def test_latency_fires_and_resolves(rig, monkeypatch):
    client = rig.client(monkeypatch, "latency")
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                       extra_headers={"x-standin-scenario": "slow", "x-standin-delay": "1"})
    fired = rig.hooks.wait_state("slow answers", "firing")
    check_message(fired, rig)
    assert fired["value"] >= 1000 and fired["threshold"] == 700 and "latency p95" in fired["text"]
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    resolved = rig.hooks.wait_state("slow answers", "resolved")
    assert resolved["value"] is None or resolved["value"] < 700


def test_ttft_fires_and_resolves(rig, monkeypatch):
    client = rig.client(monkeypatch, "ttft")
    for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True,
                                            extra_headers={"x-standin-delay": "0.4"}):
        pass
    fired = rig.hooks.wait_state("slow first token", "firing")
    check_message(fired, rig)
    assert fired["value"] > 300 and fired["details"]["calls"] == 1
    resolved = rig.hooks.wait_state("slow first token", "resolved")  # the window empties: no data is ok
    check_message(resolved, rig)


def test_spend_fires_and_resolves(rig, monkeypatch):
    client = rig.client(monkeypatch, "spend")
    for _ in range(12):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    fired, resolved = rig.fired_then_resolved("live spend")
    check_message(fired, rig)
    assert fired["value"] > 0.00002 and fired["details"]["batch_usd"] == 0
    assert fired["details"]["live_usd"] == pytest.approx(fired["value"])
    assert resolved["value"] < 0.00002


def test_spend_spike_fires_and_resolves(rig, monkeypatch):
    client = rig.client(monkeypatch, "spike")
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # the baseline
    time.sleep(3.5)  # it leaves the 3 s window for the 60 s baseline
    for _ in range(8):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    fired, resolved = rig.fired_then_resolved("spend spike")
    check_message(fired, rig)
    assert fired["value"] > 3 and fired["threshold"] == 3
    assert fired["details"]["spend_usd"] > fired["details"]["average_usd"] * 3
    assert resolved["value"] < 3


def batch_file(client: openai.OpenAI, n: int = 4) -> str:
    data = b"".join(orjson.dumps({"custom_id": f"a-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "gpt-4o-mini", "messages": MSG}}) + b"\n" for i in range(n))
    return client.files.create(file=("alerts.jsonl", io.BytesIO(data)), purpose="batch").id


def test_batch_overdue_fires_and_resolves(rig, monkeypatch):
    client = rig.proxy.client(monkeypatch)
    b = client.batches.create(input_file_id=batch_file(client), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"case": "overdue", "standin": "stuck"})
    assert client.batches.retrieve(b.id).status == "in_progress"
    fired = rig.hooks.wait_state("overdue batches", "firing")
    check_message(fired, rig)
    (info,) = fired["details"]["batches"]
    # (the status known when the rule ran: the poll's row may land up to a second after the create's)
    assert info["id"] == b.id and info["status"] in ("validating", "in_progress") and info["age_hours"] > 2.5
    assert fired["value"] > 2.5 and fired["threshold"] == 1 and b.id in fired["text"]
    assert rig.hooks.messages("overdue batches")[-1]["state"] == "firing"
    client.batches.cancel(b.id)
    assert client.batches.retrieve(b.id).status == "cancelled"
    resolved = rig.hooks.wait_state("overdue batches", "resolved")
    assert resolved["details"]["batches"][0]["id"] == b.id


def test_batch_failed_fires_and_resolves(rig, monkeypatch):
    client = rig.proxy.client(monkeypatch)
    b = client.batches.create(input_file_id=batch_file(client), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"case": "failed", "standin": "fail"})
    assert client.batches.retrieve(b.id).status == "failed"
    fired = rig.hooks.wait_state("failed batches", "firing")
    check_message(fired, rig)
    (info,) = fired["details"]["batches"]
    assert info["id"] == b.id and info["status"] == "failed" and info["top_error"] == "invalid_request"
    resolved = rig.hooks.wait_state("failed batches", "resolved")  # 4 s after velvet saw it fail
    assert resolved["details"]["batches"][0]["id"] == b.id


def test_batch_unread_fires_and_resolves(rig, monkeypatch):
    client = rig.proxy.client(monkeypatch)
    b = client.batches.create(input_file_id=batch_file(client), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"case": "unread"})
    while b.status != "completed":
        b = client.batches.retrieve(b.id)
    fired = rig.hooks.wait_state("unread output", "firing")
    check_message(fired, rig)
    (info,) = fired["details"]["batches"]
    assert info["id"] == b.id and info["file_id"] == b.output_file_id and info["hours"] > 2
    assert len(client.files.content(b.output_file_id).read().splitlines()) == 4
    resolved = rig.hooks.wait_state("unread output", "resolved")
    assert resolved["details"]["batches"][0]["id"] == b.id


def test_velvet_stalled_fires_and_resolves(rig):
    now = datetime.now(UTC).replace(tzinfo=None)
    row = {"hostname": "far-host", "pid": 4242, "started_at": now - timedelta(minutes=5), "updated_at": now,
           "queue_depth": 7, "pending": 120, "spooled": 0, "dead_lettered": 0, "written": 10}
    with bound(rig.proxy.db_url):  # another proxy whose writes fail since 10 s
        models.ProxyStatus.insert(proxy="far-host:4242:1", failing_since=now - timedelta(seconds=10),
                                  last_error="connection to postgresql://velvet:hunter2@db:5432/v refused",
                                  **row).execute()
    fired = rig.hooks.wait_state("velvet health", "firing")
    check_message(fired, rig)
    (info,) = fired["details"]["proxies"]
    assert info["proxy"] == "far-host:4242:1" and info["queue_depth"] == 7 and "hunter2" not in fired["text"]
    assert "hunter2" not in info["last_error"] and fired["threshold"] == 2 and fired["value"] >= 10
    with bound(rig.proxy.db_url):  # its writes succeed again
        models.ProxyStatus.update(failing_since=None, updated_at=datetime.now(UTC).replace(tzinfo=None)).where(
            models.ProxyStatus.proxy == "far-host:4242:1").execute()
    rig.hooks.wait_state("velvet health", "resolved")
    n = len(rig.hooks.messages("velvet health"))
    with bound(rig.proxy.db_url):  # a proxy silent for an hour, never stopped (killed)
        models.ProxyStatus.update(stopped_at=datetime.now(UTC).replace(tzinfo=None)).execute()
        models.ProxyStatus.insert(proxy="gone-host:1:1", **{**row, "hostname": "gone-host", "pid": 1,
                                                            "updated_at": now - timedelta(hours=1)}).execute()
    fired = rig.hooks.wait_state("velvet health", "firing", after=n)
    assert fired["details"]["proxies"][0]["proxy"] == "gone-host:1:1" and "no sign of life" in fired["text"]
    with bound(rig.proxy.db_url):
        models.ProxyStatus.update(stopped_at=datetime.now(UTC).replace(tzinfo=None)).execute()
    rig.hooks.wait_state("velvet health", "resolved", after=n)


def test_bad_rules_file_is_refused_by_mitmdump(tmp_path, standin):
    rules = tmp_path / "bad.toml"
    rules.write_text('[[rule]]\nname = "x"\nkind = "error_rate"\nthreshold = "high"\n')
    p = Proxy(f"sqlite:///{tmp_path / 'v.db'}", standin.url, tmp_path,
              extra=["--set", f"velvet_alerts={rules}"])
    with contextlib.suppress(RuntimeError):  # mitmproxy reports the OptionsError and exits (soon after it listens)
        p.start()
    assert p.proc is not None
    assert p.proc.wait(30) != 0
    assert f"velvet_alerts: {rules}: rule 'x': threshold: must be a number, got 'high'" in p.output()
    p.log.close()
