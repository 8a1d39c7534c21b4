"""``velvet cache what-if``: repeats and savings computed from stored calls, on both backends."""

from __future__ import annotations

import time

import orjson
import pytest
from support.helpers import calls, chat, js, run, start_writer

NOW = time.time()


@pytest.fixture(autouse=True)
def _now():
    """The calls' times are relative to each test's start (``--since 2950s`` is relative to the CLI's now)."""
    global NOW
    NOW = time.time()


def at(snap, seconds_ago, *, fp="fp", body=None, status=200):
    snap.started_at = NOW - seconds_ago
    snap.ended_at = snap.started_at + 0.25
    snap.key_fingerprint = fp
    if body is not None:
        snap.request_body = body
    if status != 200:
        snap.status_code = status
        snap.response_body = b'{"error":{"message":"boom","type":"server_error"}}'
    return snap


SAME = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi 1"}]}'
SPACED = b'{ "messages": [ {"content": "hi 1", "role": "user"} ], "temperature": 1, "model": "gpt-4o-mini" }'


def test_what_if_counts_repeats_within_the_ttl(db_url, tmp_path, capsys):
    snaps = [
        at(chat(1), 3000),                     # entry
        at(chat(2), 2900, body=SPACED),        # repeat: key order, spacing, a default
        at(chat(3), 2800, body=SAME, fp="other"),  # another API key: its own entry
        at(chat(4), 2700, body=SAME + b" "),   # repeat (trailing space: JSON whitespace)
        at(chat(5), 2600),                     # another prompt ("hi 5"): its own entry
        at(chat(6), 2500, body=SAME.replace(b"}]", b'}],"max_tokens":5')),  # another max_tokens: entry
        at(chat(7), 2400, body=b'{"model":"gpt-4o-mini","mess'),  # not JSON: never a repeat
    ]
    start_writer(db_url, tmp_path / "spool", snaps)
    cost = calls(db_url)["flow-1"].cost_usd
    assert cost and cost > 0
    r = js(capsys, "--db", db_url, "cache", "what-if", "--since", "2h")
    assert (r["calls"], r["repeats"]) == (7, 2)
    assert r["saved_usd"] == pytest.approx(2 * cost)
    assert r["saved_seconds"] == pytest.approx(0.5, abs=0.01)
    assert r["by_model"] == [{"model": "gpt-4o-mini-2024-07-18", "endpoint": "chat.completions", "calls": 7,
                              "repeats": 2, "saved_usd": pytest.approx(2 * cost)}]
    assert set(r) >= {"since", "calls", "repeats", "saved_usd", "saved_seconds", "by_model"}
    # scope global: another key's identical call is a repeat too
    assert js(capsys, "--db", db_url, "cache", "what-if", "--since", "2h", "--scope", "global")["repeats"] == 3
    # --since after the first call: the repeats have no earlier entry in the window
    assert js(capsys, "--db", db_url, "cache", "what-if", "--since", "2950s")["repeats"] == 1
    code, out, _ = run(capsys, "--db", db_url, "cache", "what-if", "--since", "2h")
    assert code == 0 and "2 repeats" in out and "chat.completions" in out


def test_what_if_ttl_errors_and_streams(db_url, tmp_path, capsys):
    snaps = [
        at(chat(1), 7000, status=500),  # an error: never an entry
        at(chat(2), 6900, body=SAME),   # entry (the error before it stored nothing)
        at(chat(3), 6800, body=SAME),   # repeat
        at(chat(4), 3000, body=SAME),   # past a 1h TTL: a miss, a new entry
        at(chat(5), 2900, body=SAME.replace(b"}]", b'}],"stream":true,"stream_options":{"include_usage":true}')),
    ]
    start_writer(db_url, tmp_path / "spool", snaps)
    r = js(capsys, "--db", db_url, "cache", "what-if", "--since", "3h", "--ttl", "1h")
    assert (r["calls"], r["repeats"]) == (5, 2)  # the stream fields are not in the key
    assert js(capsys, "--db", db_url, "cache", "what-if", "--since", "3h", "--ttl", "7d")["repeats"] == 3


@pytest.mark.parametrize("ttl", ["0", "-5", "366d", "soon"])
def test_what_if_refuses_a_bad_ttl(sqlite_url, tmp_path, capsys, ttl):
    start_writer(sqlite_url, tmp_path / "spool", [chat(1)])
    code, _, err = run(capsys, "--db", sqlite_url, "cache", "what-if", "--ttl", ttl)
    assert code == 2 and repr(ttl) in err


def test_what_if_on_an_empty_window(db_url, tmp_path, capsys):
    start_writer(db_url, tmp_path / "spool", [at(chat(1), 9000)])
    r = js(capsys, "--db", db_url, "cache", "what-if", "--since", "1h")
    assert (r["calls"], r["repeats"], r["saved_usd"], r["by_model"]) == (0, 0, 0, [])
    assert orjson.dumps(r)


def test_the_writer_stores_an_entry_and_prune_removes_it_with_the_bodies(db_url, tmp_path, capsys):
    """A miss's answer becomes an entry (written after its call row); an entry is a copy of an answer, so
    ``velvet prune --bodies-after`` removes the entries stored before the cutoff too."""
    old = at(chat(1), 10 * 86400)
    old.cache = {"key": "a" * 64, "ttl": 30 * 86400.0, "bucket": 1}
    new = at(chat(2), 60)
    new.cache = {"key": "b" * 64, "ttl": 3600.0, "bucket": 1}
    bad = at(chat(3), 50, status=500)
    bad.cache = {"key": "c" * 64, "ttl": 3600.0, "bucket": 1}
    start_writer(db_url, tmp_path / "spool", [old, new, bad])
    s = js(capsys, "--db", db_url, "cache", "stats")
    assert (s["entries"], s["live_entries"]) == (2, 2)  # the error stored nothing
    code, out, err = run(capsys, "--db", db_url, "prune", "--bodies-after", "5d", "--json")
    assert code == 0, err
    assert orjson.loads(out)["cache_entries_pruned"] == 1
    assert js(capsys, "--db", db_url, "cache", "stats")["entries"] == 1


def test_a_hit_is_logged_counted_and_reported(db_url, tmp_path, capsys):
    """A call the proxy answered from an entry: cache_hit, cost 0, saved_usd and tokens of the original, the
    entry's hits counted; velvet stats, velvet cache stats and the report say so."""
    first = at(chat(1), 120)
    first.cache = {"key": "a" * 64, "ttl": 3600.0, "bucket": 1}
    start_writer(db_url, tmp_path / "spool", [first])
    orig = calls(db_url)["flow-1"]
    hit = at(chat(2), 60)
    hit.cache = {"hit": 1, "flow_id": "flow-1", "cost_usd": orig.cost_usd, "input_tokens": 11,
                 "output_tokens": 22, "model": orig.model}
    start_writer(db_url, tmp_path / "spool2", [hit])
    row = calls(db_url)["flow-2"]
    assert row.cache_hit and row.cost_usd == 0 and row.saved_usd == pytest.approx(orig.cost_usd)
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (11, 22, 33)
    s = js(capsys, "--db", db_url, "cache", "stats")
    assert s["hits"] == 1 and s["by_model"][0]["hit_rate"] == 0.5
    t = js(capsys, "--db", db_url, "stats")["totals"]
    assert t["cache_hits"] == 1 and t["saved_usd"] == pytest.approx(orig.cost_usd)
    code, out, _ = run(capsys, "--db", db_url, "stats")
    assert "1 calls answered by velvet's cache" in out
    r = js(capsys, "--db", db_url, "report", "--since", "1d")
    assert [(d["hits"], d["saved_usd"]) for d in r["cache_by_day"]] == [(1, pytest.approx(orig.cost_usd))]
    code, out, _ = run(capsys, "--db", db_url, "report", "--since", "1d", "-o", str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert code == 0 and "Answered by velvet's cache" in html and "<td class=n>1</td>" in html


def test_expired_entries_are_swept_out_and_change_nothing(db_url, tmp_path, capsys, monkeypatch):
    """The scan holds only the entries live at each moment: sweeping the expired ones out (here whenever 3 are
    held) gives the same figures as keeping them all, and what it holds no longer grows with the history."""
    from velvet_core import clock
    from velvet_core.cache import whatif
    from velvet_core.storage.database import open_db

    # 30 prompts, each asked twice 90 s apart, one call every 90 s; an entry lives 900 s: about 10 live at once
    ask = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"q%d"}]}'
    start_writer(db_url, tmp_path / "spool", [at(chat(i), 6000 - 90 * i, body=ask % (i // 2)) for i in range(60)])
    kept_sizes: list[int] = []

    def watched(entries, now):
        out = live_at(entries, now)
        kept_sizes.append(len(out))
        return out

    live_at = whatif.live_at
    db = open_db(db_url)
    try:
        start = clock.from_epoch(NOW - 7000)
        kept = whatif.what_if(db, start, 900, "key")  # (SWEEP_AT is 100,000: never swept)
        monkeypatch.setattr(whatif, "SWEEP_AT", 3)
        monkeypatch.setattr(whatif, "live_at", watched)
        swept = whatif.what_if(db, start, 900, "key")
    finally:
        db.close()
    assert kept == swept and (kept["calls"], kept["repeats"]) == (60, 30)
    assert len(kept_sizes) >= 3 and max(kept_sizes) <= 11  # swept as it went: not the 30 entries of the history


def test_what_if_shows_its_progress_on_a_terminal_only(sqlite_url, tmp_path, capsys, monkeypatch):
    from velvet_core.cache import whatif

    start_writer(sqlite_url, tmp_path / "spool", [at(chat(i), 3000 - i) for i in range(25)])
    monkeypatch.setattr(whatif, "STEP", 10)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    code, out, err = run(capsys, "--db", sqlite_url, "cache", "what-if", "--since", "2h")
    assert code == 0 and "what-if: calls read [" in err and "25/25" in err and err.endswith("\n")
    code, out, err = run(capsys, "--db", sqlite_url, "cache", "what-if", "--since", "2h", "--json")
    assert code == 0 and err == "" and orjson.loads(out)["calls"] == 25
