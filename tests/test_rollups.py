"""Derived data (per-batch counters, call rollups) on real SQLite and PostgreSQL databases: kept right
whatever the order operations arrive in and however often they are replayed, equal to a rebuild, and
``velvet stats`` from the rollups agrees with ``velvet stats`` from the calls."""

from __future__ import annotations

import itertools
import random
import threading
from datetime import datetime, timedelta

import orjson
import pytest
from velvet_core.cli import main
from velvet_core.query import queries
from velvet_core.storage import database, rollups, sql
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import BatchSeen, CallRow, FileSeen, InputDone, OutputDone, RequestLines, ResultLines
from velvet_core.storage.store import Store

T0 = datetime(2026, 11, 20, 9, 30)

# What batch_summary counted before the counters (schema v2's view), as the truth to compare with.
TRUTH = """SELECT b.id,
  (SELECT count(*) FROM batch_requests r WHERE r.batch_id = b.id) AS lines,
  (SELECT count(*) FROM batch_results x WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND NOT x.failed),
  (SELECT count(*) FROM batch_results x WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND x.failed),
  (SELECT sum(x.cost_usd) FROM batch_results x WHERE x.batch_id = b.id)
FROM batches b ORDER BY b.id"""
SUMMARY = "SELECT id, lines, answered, failed, cost_usd FROM batch_summary ORDER BY id"


def batch_groups(n: int) -> dict[str, list[list]]:
    """One batch's operations, as groups a writer would apply in separate transactions."""
    fin, fout, ferr, bid = f"file-in{n}", f"file-out{n}", f"file-err{n}", f"batch_{n}"
    reqs = [{"file_id": fin, "line_no": i, "custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "model": "gpt-4o-mini", "body": "{}"} for i in range(1, 7)]
    ok = [{"file_id": fout, "line_no": i, "custom_id": c, "status_code": 200, "failed": False, "seen_at": T0,
           "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.25 * i}
          for i, c in enumerate(["c1", "c2", "c3", "c5", "ghost"], 1)]  # 'ghost' has no input line
    bad = [{"file_id": ferr, "line_no": 1, "custom_id": "c4", "status_code": 400, "failed": True, "seen_at": T0,
            "error_code": "invalid_request_error"}]
    row = {"id": bid, "status": "completed", "endpoint": "/v1/chat/completions", "input_file_id": fin,
           "output_file_id": fout, "error_file_id": ferr, "created_at": T0}
    return {
        "upload": [[FileSeen({"id": fin, "purpose": "batch", "updated_at": T0}), RequestLines(reqs[:4])],
                   [RequestLines(reqs[4:]), InputDone(fin)]],
        "batch": [[BatchSeen({**row, "status": "in_progress"}, T0, "retrieve")],
                  [BatchSeen(row, T0 + timedelta(minutes=5), "retrieve")]],
        "output": [[ResultLines(ok[:2])], [ResultLines(ok[2:]), OutputDone(fout)]],
        "errors": [[ResultLines(bad), OutputDone(ferr)]],
    }


def rows(db, sql: str) -> list[tuple]:
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in db.execute_sql(sql).fetchall()]


@pytest.mark.parametrize("order", list(itertools.permutations(["upload", "batch", "output", "errors"])),
                         ids="-".join)
def test_batch_counts_any_order_and_replays(db_url, order):
    """Answers before inputs, the batch before or after its files, downloads twice, groups replayed."""
    db = open_db(db_url)
    store = Store(db)
    rng = random.Random("-".join(order))
    done = []
    for n, part in enumerate(order):
        for group in batch_groups(0)[part]:
            store.apply(group)
            done.append(group)
        if n == 1:
            store.apply(rng.choice(done))  # a spooled group written twice
    for group in batch_groups(0)["output"]:  # the output file downloaded again
        store.apply(group)
    assert rows(db, SUMMARY) == rows(db, TRUTH) == [("batch_0", 6, 4, 1, 3.75)]
    assert rows(db, "SELECT results, input_tokens, output_tokens FROM batch_counts") == [(6, 50, 15)]
    db.close()


def call(i: int, rng: random.Random) -> dict:
    status = rng.choice([200, 200, 200, 429, 500, None])
    lat = None if status is None else rng.lognormvariate(5, 1)
    return {"flow_id": f"flow-{i}", "method": "POST", "host": "api.openai.com", "path": "/v1/chat/completions",
            "endpoint": rng.choice(["chat.completions", "embeddings"]), "action": "create",
            "started_at": T0 + timedelta(seconds=rng.randrange(3 * 86400)),
            "model": rng.choice(["gpt-4o-mini", "gpt-4o", None]), "model_requested": rng.choice(["gpt-4o", None]),
            "key_fingerprint": rng.choice(["aaaa", "bbbb", None]), "status_code": status,
            "complete": rng.random() > 0.05, "stream": False, "latency_ms": lat,
            "ttft_ms": lat / 4 if lat and rng.random() < 0.3 else None, "input_tokens": rng.randint(0, 100),
            "output_tokens": rng.choice([None, 7]), "cost_usd": rng.choice([None, 0.001, 0.0025])}


def fill_calls(db, n: int = 400, seed: int = 1) -> list[dict]:
    """``n`` distinct calls in groups of every size, with duplicates in a group and groups replayed."""
    rng = random.Random(seed)
    calls = [call(i, rng) for i in range(n)]
    store = Store(db)
    i, groups = 0, []
    while i < n:
        k = rng.choice([1, 3, 60, 120])  # above and below the COPY threshold
        group = [CallRow(c) for c in calls[i:i + k]]
        group.append(CallRow({**calls[i], "latency_ms": 1e6}))  # a duplicate flow id: the first row stays
        store.apply(group)
        groups.append(group)
        i += k
    for group in rng.sample(groups, 3):  # replays
        store.apply(group)
    return calls


def rollup_rows(db) -> list[tuple]:
    out = []
    for r in db.execute_sql("SELECT hours, period, model, endpoint, key_fingerprint, calls, errors, input_tokens, "
                            "output_tokens, cost_usd, latency_hist, ttft_hist FROM call_rollups").fetchall():
        out.append((*r[:9], round(r[9], 9), orjson.loads(r[10] or "{}"), orjson.loads(r[11] or "{}")))
    return sorted(out, key=lambda r: tuple(str(v) for v in r[:5]))


def test_call_rollups_count_each_call_once_and_equal_a_rebuild(db_url, capsys):
    db = open_db(db_url)
    calls = fill_calls(db)
    kept = rollup_rows(db)
    assert sum(r[5] for r in kept if r[0] == rollups.DAY) == sum(r[5] for r in kept if r[0] == rollups.HOUR) == 400
    assert max(b for r in kept for b in map(int, r[10])) < rollups.SCALE * 10  # the 1e6 ms duplicates are not in
    assert sum(r[7] for r in kept if r[0] == rollups.DAY) == sum(c["input_tokens"] for c in calls)
    db.execute_sql("UPDATE batch_counts SET lines = 0")
    db.execute_sql("DELETE FROM call_rollups WHERE hours = 1")
    db.close()
    assert main(["rebuild", "--db", db_url, "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert set(out) == {"batches", "calls", "rollup_rows", "seconds"} and out["calls"] == 400
    db = open_db(db_url)
    assert rollup_rows(db) == kept
    assert out["rollup_rows"] == len(kept)
    db.close()
    assert main(["rebuild", "--db", db_url]) == 0
    assert "from 400 calls" in capsys.readouterr().out


def test_cache_entries_between_call_rows_do_not_split_them(db_url, monkeypatch):
    """Each miss gives a call row then its cache entry: the group's call rows still go to ``add_calls`` together
    (the entries after them), so a cache that only misses does not write each call alone; all are stored."""
    from velvet_core.storage import store as store_mod
    from velvet_core.storage.ops import CacheStore

    handed: list[int] = []
    real = store_mod.HANDLERS[CallRow]
    monkeypatch.setitem(store_mod.HANDLERS, CallRow, lambda ops: (handed.append(len(ops)), real(ops)))
    rng = random.Random(3)
    calls = [call(i, rng) for i in range(50)]
    group = []
    for c in calls:
        group += [CallRow(c), CacheStore({
            "key": f"{c['flow_id']:0>64}", "flow_id": c["flow_id"], "created_at": T0,
            "expires_at": T0 + timedelta(1), "hits": 0, "endpoint": "chat.completions",
            "content_type": "application/json", "body": "{}", "size": 2, "stream": False}, 1)]
    db = open_db(db_url)
    Store(db).apply(group)
    assert handed == [50]
    assert rows(db, "SELECT count(*) FROM calls") == rows(db, "SELECT count(*) FROM cache_entries") == [(50,)]
    assert sum(r[5] for r in rollup_rows(db) if r[0] == rollups.DAY) == 50
    db.close()


@pytest.mark.parametrize("by", queries.GROUPS)
def test_stats_from_rollups_agree_with_the_calls(db_url, by, monkeypatch):
    db = open_db(db_url)
    fill_calls(db, seed=7)
    db.close()
    ro = database.open_readonly(db_url)
    # no window; one starting mid-hour; one starting at midnight (an hour's and a day's start)
    for since in (None, T0 + timedelta(hours=20, minutes=17, seconds=3), datetime(2026, 11, 21)):
        monkeypatch.setattr(queries, "EXACT_CALLS", 10**9)
        exact = queries.stats(ro, by=by, since=since)["calls"]
        monkeypatch.setattr(queries, "EXACT_CALLS", 0)
        assert queries.rollups_cover(ro, since)  # this time from the rollups
        rolled = queries.stats(ro, by=by, since=since)["calls"]
        assert [g[by] for g in rolled] == [g[by] for g in exact] and exact
        for e, r in zip(exact, rolled, strict=True):
            assert list(r) == list(e)  # same keys, same order
            assert {k: r[k] for k in ("calls", "errors", "input_tokens", "output_tokens", "error_rate")} == \
                {k: e[k] for k in ("calls", "errors", "input_tokens", "output_tokens", "error_rate")}
            assert r["cost_usd"] == pytest.approx(e["cost_usd"], rel=1e-6)
            for k in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms"):  # histogram buckets: within 1 %
                assert (r[k] is None) == (e[k] is None)
                assert r[k] is None or r[k] == pytest.approx(e[k], rel=0.0101)
    ro.close()


def test_rollups_from_two_writers_at_once(db_url):
    """Proxies sharing a database add to the same rollup rows concurrently: nothing is lost."""
    open_db(db_url).close()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            db = open_db(db_url)
            store = Store(db)
            for g in range(15):
                store.apply([CallRow({"flow_id": f"w{w}-{g}-{i}", "method": "POST", "host": "h", "path": "/",
                                      "endpoint": "chat.completions", "action": "create", "started_at": T0,
                                      "model": "m", "latency_ms": 10.0 + w, "input_tokens": 1})
                             for i in range(1 + g % 4 * 30)])
            db.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    db = open_db(db_url)
    total = db.execute_sql("SELECT count(*) FROM calls").fetchone()[0]
    assert rows(db, "SELECT hours, calls, input_tokens FROM call_rollups ORDER BY hours") == \
        [(1, total, total), (24, total, total)]
    hist = orjson.loads(db.execute_sql("SELECT latency_hist FROM call_rollups WHERE hours = 1").fetchone()[0])
    assert sum(hist.values()) == total == 3 * sum(1 + g % 4 * 30 for g in range(15))
    db.close()


def test_histogram_percentiles():
    values = [0.0, 0.5, 3, 3.01, 40, 812.7, 812.7, 5000, 1e5]
    hist: dict[str, int] = {}
    for v in values:
        b = rollups.bucket(v)
        hist[b] = hist.get(b, 0) + 1
    for p in (1, 50, 95, 100):
        exact = sql.percentile(values, p)
        got = rollups.hist_percentile(hist, p)
        assert got == pytest.approx(max(exact, rollups.FLOOR_MS), rel=0.0101)
    assert rollups.hist_percentile({}, 50) is None


def test_rebuild_needs_a_database(tmp_path, capsys):
    assert main(["rebuild", "--db", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "no database" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("order", list(itertools.permutations(["upload", "batch", "output"])), ids="-".join)
def test_image_answers_priced_from_their_request_in_any_order(db_url, tmp_path, order):
    """An image answer names no model: whichever of its request, its batch and its answer comes last, the
    answer gets its request's model and the batch price of its usage, from the store's pricer (a price file's)."""
    from velvet_core.cost.prices import Pricer

    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-image-1"]\ninput = 5\noutput = 40\nimage_input = 10\n')
    db = open_db(db_url)
    store = Store(db, lambda: Pricer.from_file(prices))
    usage = {"input_tokens": 30, "output_tokens": 272,
             "input_tokens_details": {"text_tokens": 20, "image_tokens": 10}}
    body = orjson.dumps({"created": 1, "data": [{"b64_json": "iVBO"}], "usage": usage}).decode()
    groups = {
        "upload": [FileSeen({"id": "fi", "purpose": "batch", "updated_at": T0}),
                   RequestLines([{"file_id": "fi", "line_no": 1, "custom_id": "c1", "method": "POST",
                                  "url": "/v1/images/edits", "model": "gpt-image-1", "body": "{}"}]),
                   InputDone("fi")],
        "batch": [BatchSeen({"id": "b", "status": "completed", "endpoint": "/v1/images/edits",
                             "input_file_id": "fi", "output_file_id": "fo", "created_at": T0}, T0, "retrieve")],
        "output": [ResultLines([{"file_id": "fo", "line_no": 1, "custom_id": "c1", "status_code": 200,
                                 "failed": False, "seen_at": T0, "body": body, "input_tokens": 30,
                                 "output_tokens": 272, "total_tokens": 302}]), OutputDone("fo")],
    }
    for part in order:
        store.apply(groups[part])
    got = db.execute_sql("SELECT model, cost_usd FROM batch_results").fetchall()
    want = round((20 * 5 + 10 * 10 + 272 * 40) / 2e6, 9)  # text, image and output tokens per million, at half
    assert [(m, round(c, 9)) for m, c in got] == [("gpt-image-1", want)]
    assert rows(db, "SELECT cost_usd FROM batch_summary") == [(want,)]
