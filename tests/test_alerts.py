"""Alert rules, states, delivery and ``velvet alerts [check]`` against real databases (no mitmdump here;
test_e2e_alerts.py runs every kind through one)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from support.rig import free_port
from support.webhook import WebhookServer, velvet_webhook_ok
from velvet_core.addon import Velvet
from velvet_core.alerts.evaluate import Instance, Reading
from velvet_core.alerts.notify import Notifier, payloads, signature
from velvet_core.alerts.rules import Notify, RulesError, load_rules, parse_rules
from velvet_core.alerts.runner import AlertRunner
from velvet_core.alerts.state import Tracker
from velvet_core.cli import main
from velvet_core.storage.database import open_db

GOOD = """
[[rule]]
name = "chat errors"
kind = "error_rate"
threshold = 0.2
warning = 0.1
window = "5m"
min_calls = 10
model = "gpt-4o*"
endpoint = "/v1/chat/completions"
key = "3f9a*"
tags = {team = "search"}
for = "2m"
no_data = "keep"
renotify = "1h"
status = "5xx"

[[rule]]
name = "nightly"
kind = "batch_overdue"
hours = 20
finalizing_hours = 1.5

[notify]
webhook = ["https://hooks.example/T000/B000/XXXX", "http://127.0.0.1:9/x"]
command = "/usr/local/bin/page-me --loud"
secret = "s3cret"
"""


def rules_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "alerts.toml"
    p.write_text(text)
    return p


def test_rules_file_every_key(tmp_path):
    rs = load_rules(rules_file(tmp_path, GOOD))
    r, n = rs.rules
    assert (r.name, r.kind, r.threshold, r.warning, r.window, r.window_text) == ("chat errors", "error_rate", 0.2,
                                                                                 0.1, 300, "5m")
    assert (r.min_calls, r.models, r.endpoints, r.keys, r.tags) == (10, ("gpt-4o*",), ("chat.completions",),
                                                                    ("3f9a*",), (("team", "search"),))
    assert (r.for_, r.no_data, r.renotify, r.status) == (120, "keep", 3600, "5xx")
    assert (n.kind, n.threshold, n.finalizing_hours, n.window_text) == ("batch_overdue", 20, 1.5, "7d")
    assert rs.notify.webhooks == ("https://hooks.example/T000/B000/XXXX", "http://127.0.0.1:9/x")
    assert rs.notify.command == ("/usr/local/bin/page-me", "--loud") and rs.notify.secret == "s3cret"
    assert "s3cret" not in repr(rs.notify)


BAD = [
    ('[[rule]]\nname = "a"\nkind = "errors"\n', "rule 'a': kind: must be one of error_rate"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\n', "rule 'a': threshold: is required"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 20\n', "rule 'a': threshold: must be at most 1"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 0.2\nwindow = "5 minutes"\n',
     "rule 'a': window: must be a duration such as 30s"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 0.2\nwarning = 0.3\n',
     "rule 'a': warning: must be below threshold (0.2)"),
    ('[[rule]]\nname = "a"\nkind = "spend_usd"\nthreshold = 5\nfactor = 2\n',
     "rule 'a': factor: not a key of kind spend_usd"),
    ('[[rule]]\nname = "a"\nkind = "latency_p95_ms"\nthreshold = 900\ntags = ["x"]\n', "rule 'a': tags: must be"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 0.2\nstatus = "teapot"\n', "rule 'a': status:"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 0.2\nno_data = "maybe"\n', "rule 'a': no_data:"),
    ('[[rule]]\nname = "a"\nkind = "error_rate"\nthreshold = 0.2\nmin_calls = 0\n', "rule 'a': min_calls:"),
    ('[[rule]]\nname = "a"\nkind = "spend_spike"\nfactor = 1\n', "rule 'a': factor: must be above 1"),
    ('[[rule]]\nname = "a"\nkind = "batch_unread"\nthreshold = 1\n', "rule 'a': threshold: not a key of kind"),
    ('[[rule]]\nkind = "error_rate"\nthreshold = 0.2\n', "rule #1: name: is required"),
    ('[[rule]]\nname = "a"\nkind = "velvet_stalled"\n[[rule]]\nname = "a"\nkind = "velvet_stalled"\n',
     "rule 'a': name: used by two rules"),
    ('[[rule]]\nname = "a"\nkind = "velvet_stalled"\n[notify]\nwebhook = "ftp://x/secret-token"\n',
     "[notify]: webhook: must be an http"),
    ('[[rule]]\nname = "a"\nkind = "velvet_stalled"\n[notify]\nretries = 99\n', "[notify]: retries:"),
    ('[[rule]]\nname = "a"\nkind = "velvet_stalled"\n[alerting]\n', "unknown table or key 'alerting'"),
    ('[notify]\nwebhook = "https://x"\n', "no [[rule]] defined"),
    ("[[rule]\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_rules_name_the_rule_and_key(tmp_path, text, message):
    path = rules_file(tmp_path, text)
    with pytest.raises(RulesError) as e:
        load_rules(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "secret-token" not in str(e.value)


def test_missing_rules_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read alert rules"):
        load_rules(tmp_path / "nope.toml")


def test_addon_options(tmp_path, sqlite_url):
    v = Velvet()
    with taddons.context(v) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"velvet_alerts: .*rule 'a': kind: must be one of"):
            tctx.configure(v, velvet_alerts=str(rules_file(tmp_path, '[[rule]]\nname = "a"\nkind = "x"\n')))
        with pytest.raises(exceptions.OptionsError, match="velvet_alert_interval: must be a number"):
            tctx.configure(v, velvet_alert_interval="soon")
        with pytest.raises(exceptions.OptionsError, match="velvet_alert_interval: must be a number"):
            tctx.configure(v, velvet_alert_interval="0")
        tctx.configure(v, velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool"),
                       velvet_alerts=str(rules_file(tmp_path, GOOD)), velvet_alert_interval="0.25")
        assert v.alert_rules is not None and v.alert_interval == 0.25
        v.running()
        assert v.alerts is not None and v.alerts.interval == 0.25
        runner = v.alerts
        tctx.configure(v, velvet_alerts="")  # turned off while running
        assert v.alerts is None and runner._thread is None
        v.done()


# -- states ---------------------------------------------------------------------------------------

def rule(**kw):
    base = {"name": "r", "kind": "error_rate", "threshold": 0.5}
    return parse_rules({"rule": [{k: v for k, v in {**base, **kw}.items() if v is not None}]}).rules[0]


def reading(level: str, value: float = 0.0, subject: str = "") -> Reading:
    return Reading([Instance(subject, value, level, f"value {value}")])


T0 = datetime(2026, 11, 24, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_state_changes_once_and_resolves():
    r, t = rule(), Tracker()
    assert t.step(r, reading("ok"), at(0)) == []
    (c,) = t.step(r, reading("firing", 0.9), at(1))
    assert (c.state, c.value, c.repeat) == ("firing", 0.9, False)
    assert t.step(r, reading("firing", 0.95), at(2)) == []  # no flood
    assert t.state("r") == "firing"
    (c,) = t.step(r, reading("ok", 0.1), at(3))
    assert c.state == "resolved" and t.state("r") == "ok" and t.tracks == {}


def test_for_and_warning():
    r, t = rule(warning=0.3, **{"for": "60s"}), Tracker()
    assert t.step(r, reading("firing", 0.9), at(0)) == []
    assert t.state("r") == "pending"
    assert t.step(r, reading("warning", 0.4), at(30)) == []  # still warning or worse, for 30 s only
    (c,) = t.step(r, reading("firing", 0.9), at(61))  # warning or worse for 61 s, firing for 0 s
    assert c.state == "warning"
    assert t.step(r, reading("firing", 0.9), at(100)) == []
    (c,) = t.step(r, reading("firing", 0.9), at(122))
    assert c.state == "firing"
    (c,) = t.step(r, reading("warning", 0.4), at(130))  # down to warning at once
    assert c.state == "warning"
    (c,) = t.step(r, reading("ok", 0.1), at(131))
    assert c.state == "resolved"
    assert t.step(r, reading("firing", 0.9), at(140)) == [] and t.step(r, reading("ok"), at(150)) == []


@pytest.mark.parametrize(("policy", "expect"), [("ok", ["resolved"]), ("keep", []), ("alert", [])])
def test_no_data(policy, expect):
    r, t = rule(no_data=policy), Tracker()
    t.step(r, reading("firing", 0.9), at(0))
    assert [c.state for c in t.step(r, Reading(None, "3 calls"), at(1))] == expect
    if policy == "alert":
        assert t.state("r") == "firing"
    fresh = Tracker()
    changes = fresh.step(r, Reading(None, "3 calls"), at(0))
    assert [c.state for c in changes] == (["firing"] if policy == "alert" else [])
    if changes:
        assert payloads(changes)[0]["text"] == "velvet FIRING · r: no data: 3 calls"


def test_renotify_and_unevaluable():
    r, t = rule(renotify="10m"), Tracker()
    t.step(r, reading("firing", 0.9), at(0))
    assert t.step(r, reading("firing", 0.9), at(599)) == []
    (c,) = t.step(r, reading("firing", 0.8), at(600))
    assert c.repeat and c.state == "firing"
    assert payloads([c])[0]["text"].startswith("velvet STILL FIRING · r: ")
    assert t.step(r, None, at(700)) == []  # an evaluation that failed changes nothing


def test_subjects_fire_and_resolve_apart_and_restore():
    r, t = rule(kind="batch_overdue", hours=1, threshold=None), Tracker()
    a, b = Instance("batch_a", 3.0, "firing", "batch_a late"), Instance("batch_b", 5.0, "firing", "batch_b late")
    changes = t.step(r, Reading([a, b]), at(0))
    (p,) = payloads(changes)  # one message for both
    assert p["value"] == 5.0 and p["text"].startswith("velvet FIRING · r: 2 batches: batch_a late; batch_b late")
    assert [c.state for c in t.step(r, Reading([b]), at(1))] == ["resolved"]  # batch_a is done
    restored = Tracker()
    restored.restore([{"rule": "r", "subject": "batch_b", "state": "firing", "at": at(0), "value": 5.0},
                      {"rule": "r", "subject": "batch_a", "state": "resolved", "at": at(1), "value": None}])
    assert restored.step(r, Reading([b]), at(2)) == []  # a restart does not fire it again
    dumped = Tracker()
    dumped.load(orjson.loads(orjson.dumps(restored.dump())))
    assert dumped.tracks == restored.tracks


# -- delivery -------------------------------------------------------------------------------------

PAYLOAD = {"rule": "r", "kind": "error_rate", "state": "firing", "value": 0.9, "threshold": 0.5, "window": "5m",
           "at": "2026-11-24T12:00:00Z", "details": {}, "text": "velvet FIRING · r: boom"}


def test_webhook_signed_and_retried_with_backoff(caplog):
    hooks = WebhookServer()
    hooks.fail_next = 2
    n = Notifier(Notify(webhooks=(hooks.url + "/tok3n",), secret="k3y", retries=3), backoff=0.05).start()
    try:
        with caplog.at_level(logging.WARNING):
            n.send(PAYLOAD)
            assert n.flush(30)
        (got,) = hooks.received
        assert hooks.attempts == 3 and n.delivered == 1 and n.failed == 0
        assert got["json"] == PAYLOAD and got["headers"]["content-type"] == "application/json"
        ts = got["headers"]["x-velvet-timestamp"]
        assert abs(int(ts) - time.time()) < 60
        assert got["headers"]["x-velvet-signature"] == "v1=" + hmac.new(b"k3y", ts.encode() + b"." + got["body"],
                                                                         hashlib.sha256).hexdigest()
        assert signature("k3y", int(ts), got["body"]) == got["headers"]["x-velvet-signature"]
        assert velvet_webhook_ok(b"k3y", got["headers"], got["body"])
        assert "retrying" in caplog.text and "HTTP 500" in caplog.text and "tok3n" not in caplog.text
    finally:
        n.stop()
        hooks.stop()


def test_webhook_replay_refused_and_slack_text_escaped(db_url, tmp_path, capsys):
    """The documented receiver check: a fresh message passes; the same one 5 minutes later, one with its
    timestamp changed, or one without the secret fails. Traffic text in ``text`` is Slack-inert."""
    hooks = WebhookServer()
    rules = rules_file(tmp_path, CHECK_RULES.replace("{url}", hooks.url).replace('model = "gpt-4o*"\n', "")
                       + 'secret = "s3cret"\n')
    open_db(db_url).close()
    db = open_db(db_url)
    now = datetime.now(UTC).replace(tzinfo=None)
    p = db.param
    with db.atomic():
        for i in range(4):
            db.execute_sql(
                f"INSERT INTO calls (flow_id, started_at, method, host, path, endpoint, action, model, "
                f"status_code, error_code, stream, complete, tags) VALUES ({', '.join([p] * 13)})",
                (f"f-esc-{i}", now if "postgres" in db_url else now.isoformat(" "), "POST", "api.openai.com",
                 "/v1/chat/completions", "chat.completions", "create", "<!channel> & <https://x.example|y>",
                 429, "<!channel>", False, True, orjson.dumps({"team": "search"}).decode()))
    db.close()
    code, out = check(capsys, db_url, rules, tmp_path / "state.json")
    assert code == 3 and out["delivered"] is True
    (got,) = hooks.received
    text = got["json"]["text"]
    assert "429 &lt;!channel&gt; x4" in text and "<!" not in text, text
    assert velvet_webhook_ok(b"s3cret", got["headers"], got["body"])
    ts = int(got["headers"]["x-velvet-timestamp"])
    assert not velvet_webhook_ok(b"s3cret", got["headers"], got["body"], now=ts + 301)  # replayed later
    assert velvet_webhook_ok(b"s3cret", got["headers"], got["body"], now=ts + 299)
    moved = {**got["headers"], "x-velvet-timestamp": str(ts + 1)}
    assert not velvet_webhook_ok(b"s3cret", moved, got["body"])  # a fresh timestamp on an old signature
    assert not velvet_webhook_ok(b"other", got["headers"], got["body"])
    assert not velvet_webhook_ok(b"s3cret", got["headers"], got["body"] + b" ")
    hooks.stop()


def test_unreachable_webhook_is_a_warning_and_never_blocks(caplog):
    url = f"http://127.0.0.1:{free_port()}/secret-path"  # nothing listens
    n = Notifier(Notify(webhooks=(url,), retries=2, timeout=2), backoff=0.05).start()
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            n.send(PAYLOAD)  # returns at once: delivery is the thread's job
        assert n.flush(60)
    n.stop()
    assert n.failed == 50 and n.delivered == 0
    assert "gave up after 3 attempts" in caplog.text and "secret-path" not in caplog.text


def test_command_gets_the_json_on_stdin(tmp_path, caplog):
    out = tmp_path / "got.json"
    script = tmp_path / "page.py"
    script.write_text(f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())\n")
    n = Notifier(Notify(command=(sys.executable, str(script)))).start()
    n.send(PAYLOAD)
    assert n.flush(30)
    assert orjson.loads(out.read_bytes()) == PAYLOAD and n.delivered == 1
    failing = Notifier(Notify(command=(sys.executable, "-c", "import sys; sys.exit('no pager')"))).start()
    with caplog.at_level(logging.WARNING):
        failing.send(PAYLOAD)
        assert failing.flush(30)
    assert failing.failed == 1 and "exited with status 1: no pager" in caplog.text
    n.stop()
    failing.stop()


# -- the evaluator's own database connection --------------------------------------------------------

def test_unreachable_database_fires_velvet_stalled(tmp_path, caplog):
    rs = parse_rules({"rule": [{"name": "health", "kind": "velvet_stalled", "window": "0.2s"},
                               {"name": "errors", "kind": "error_rate", "threshold": 0.1}]})
    url = f"postgresql://velvet:pw-never-shown@127.0.0.1:{free_port()}/velvet"  # nothing listens
    runner = AlertRunner(url, rs, 60, source="here:1")
    with caplog.at_level(logging.WARNING):
        runner.tick()
        assert runner.engine.tracker.state("health") == "ok"
        time.sleep(0.3)
        runner.tick()
    assert runner.engine.tracker.state("health") == "firing" and runner.engine.tracker.state("errors") == "ok"
    assert "velvet FIRING · health: proxy here:1: database unreachable for" in caplog.text
    assert "pw-never-shown" not in caplog.text
    assert len(runner._unrecorded) == 1  # kept for when the database is back
    runner.stop(0)


# -- velvet alerts check / velvet alerts ------------------------------------------------------------

CHECK_RULES = """
[[rule]]
name = "chat errors"
kind = "error_rate"
threshold = 0.3
window = "10m"
min_calls = 4
model = "gpt-4o*"
tags = {team = "search"}

[notify]
webhook = "{url}/hook"
"""


def add_calls(url: str, statuses: list[int], model: str = "gpt-4o-mini", team: str = "search") -> None:
    db = open_db(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    p = db.param
    with db.atomic():
        for s in statuses:
            db.execute_sql(
                f"INSERT INTO calls (flow_id, started_at, method, host, path, endpoint, action, model, "
                f"status_code, stream, complete, tags) VALUES ({', '.join([p] * 12)})",
                (f"f-{time.monotonic_ns()}", now if "postgres" in url else now.isoformat(" "), "POST",
                 "api.openai.com", "/v1/chat/completions", "chat.completions", "create", model, s, False, True,
                 orjson.dumps({"team": team}).decode()))
    db.close()


def check(capsys, url: str, rules: Path, state: Path, *extra: str) -> tuple[int, dict]:
    code = main(["alerts", "check", "--db", url, "--rules", str(rules), "--state", str(state), "--json", *extra])
    out, _ = capsys.readouterr()
    return code, orjson.loads(out)


def test_alerts_check(db_url, tmp_path, capsys):
    hooks = WebhookServer()
    rules = rules_file(tmp_path, CHECK_RULES.replace("{url}", hooks.url))
    state = tmp_path / "state.json"
    open_db(db_url).close()
    add_calls(db_url, [200, 200, 200])  # fewer than min_calls: no data, ok
    add_calls(db_url, [500] * 10, model="o3")  # other models and teams do not count
    add_calls(db_url, [500] * 10, team="ads")
    code, out = check(capsys, db_url, rules, state)
    assert code == 0 and out["messages"] == [] and out["delivered"] is None
    (r,) = out["rules"]
    assert r["state"] == "ok" and r["no_data"] == "3 calls in 10m, fewer than min_calls 4"
    assert set(r) == {"rule", "kind", "state", "value", "threshold", "window", "no_data", "text"}

    add_calls(db_url, [429, 429, 500])
    before = state.read_bytes()
    code, out = check(capsys, db_url, rules, state, "--dry-run")
    assert code == 3 and out["rules"][0]["state"] == "firing" and out["messages"][0]["state"] == "firing"
    assert hooks.received == [] and state.read_bytes() == before  # a dry run sends and keeps nothing

    code, out = check(capsys, db_url, rules, state)
    assert code == 3 and out["delivered"] is True
    (m,) = out["messages"]
    assert m["state"] == "firing" and m["value"] == 0.5 and m["details"]["errors"] == 3
    assert [h["json"] for h in hooks.received] == [m]
    code, out = check(capsys, db_url, rules, state)  # still firing: no second message
    assert code == 3 and out["messages"] == [] and len(hooks.received) == 1

    add_calls(db_url, [200] * 6)
    code, out = check(capsys, db_url, rules, state)
    assert code == 0 and [m["state"] for m in out["messages"]] == ["resolved"] and len(hooks.received) == 2

    assert main(["alerts", "--db", db_url, "--json"]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["resolved", "firing"]
    assert {r["source"] for r in rows} == {"velvet alerts check"} and rows[1]["value"] == 0.5
    assert set(rows[0]) == {"id", "at", "rule", "kind", "subject", "state", "value", "threshold", "window", "text",
                            "details", "source"}
    assert main(["alerts", "--db", db_url, "--since", "1h"]) == 0
    text = capsys.readouterr().out
    assert "RESOLVED" not in text and "resolved" in text and "chat errors" in text
    state.unlink()  # without its state file, check starts from the alerts table: nothing to repeat
    code, out = check(capsys, db_url, rules, state)
    assert code == 0 and out["messages"] == []
    hooks.stop()


def test_alerts_check_usage_errors(sqlite_url, tmp_path, capsys):
    open_db(sqlite_url).close()
    bad = rules_file(tmp_path, '[[rule]]\nname = "x"\nkind = "spend_usd"\n')
    assert main(["alerts", "check", "--db", sqlite_url, "--rules", str(bad)]) == 2
    assert "rule 'x': threshold: is required" in capsys.readouterr().err
    assert main(["alerts", "--db", sqlite_url]) == 0
    assert "(no alerts)" in capsys.readouterr().out
