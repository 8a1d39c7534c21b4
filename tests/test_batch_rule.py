"""One rule for a batch's model, tokens and cost (storage/batch_rule.py), the same in `velvet batches`, `batch`,
`stats` and the report, on both backends: a batch whose API object has no model (older batches, compatible
servers) and no usage, beside one whose lines were never downloaded."""

from __future__ import annotations

import orjson
from support.reportdb import fill
from velvet_core.cli import main
from velvet_core.storage.database import open_db
from velvet_core.storage.rollups import rebuild


def no_model_batch(url: str) -> tuple[str, str, dict[str, float]]:
    """Batch A: no API model nor usage, 3 lines (2 ask for gpt-4.1-mini, 1 for bad-model, which failed).
    Batch B: no line logged, the API's model and usage. Returns their ids and A's line sums."""
    fill(url, batches=2, calls=0, lines=3, seed=4)
    db = open_db(url)
    p = db.param
    a, b = [r[0] for r in db.execute_sql("SELECT id FROM batches ORDER BY id").fetchall()]
    db.execute_sql(f"UPDATE batches SET model = NULL, input_tokens = NULL, output_tokens = NULL, "
                   f"usage_cost_usd = NULL, status = 'completed' WHERE id = {p}", (a,))
    db.execute_sql(f"UPDATE batch_requests SET model = 'gpt-4.1-mini' WHERE batch_id = {p}", (a,))
    db.execute_sql(f"UPDATE batch_requests SET model = 'bad-model' WHERE batch_id = {p} AND line_no = 1", (a,))
    db.execute_sql(f"DELETE FROM batch_results WHERE batch_id = {p}", (a,))
    db.execute_sql("INSERT INTO batch_results (file_id, line_no, batch_id, custom_id, status_code, model, failed, "
                   "error_code, input_tokens, output_tokens, cached_tokens, cost_usd, seen_at) VALUES "
                   f"({p}, 1, {p}, 'req-1', 400, NULL, {p}, 'model_not_found', NULL, NULL, 0, NULL, "
                   f"{p}), ({p}, 2, {p}, 'req-2', 200, 'gpt-4.1-mini', {p}, NULL, 100, 10, 0, 0.25, {p}), "
                   f"({p}, 3, {p}, 'req-3', 200, 'gpt-4.1-mini', {p}, NULL, 200, 20, 0, 0.5, {p})",
                   (f"file-out-{a}", a, True, _seen(db), f"file-out-{a}", a, False, _seen(db), f"file-out-{a}", a,
                    False, _seen(db)))
    db.execute_sql(f"DELETE FROM batch_results WHERE batch_id = {p}", (b,))
    db.execute_sql(f"UPDATE batches SET model = 'gpt-4o-2024-08-06', input_tokens = 1000, output_tokens = 100, "
                   f"usage_cost_usd = 2.0, status = 'completed' WHERE id = {p}", (b,))
    db.execute_sql("UPDATE batch_results SET request_row_id = (SELECT r.id FROM batch_requests r "
                   "WHERE r.batch_id = batch_results.batch_id AND r.custom_id = batch_results.custom_id)")
    rebuild(db)
    db.close()
    return a, b, {"input_tokens": 300, "output_tokens": 30, "cost_usd": 0.75}


def _seen(db):
    row = db.execute_sql("SELECT max(created_at) FROM batches").fetchone()
    return row[0]


def run(capsys, *argv: str):
    capsys.readouterr()
    main(list(argv))
    return orjson.loads(capsys.readouterr().out)


def test_batch_without_api_model_is_the_same_everywhere(db_url, capsys):
    a, b, sums = no_model_batch(db_url)
    listed = {x["id"]: x for x in run(capsys, "batches", "--db", db_url, "--json")}
    assert listed[a]["model"] == "gpt-4.1-mini" and listed[a]["cost_usd"] == sums["cost_usd"]
    assert listed[b]["model"] == "gpt-4o-2024-08-06" and listed[b]["cost_usd"] == 2.0
    one = run(capsys, "batch", a, "--db", db_url, "--json")
    assert one["model"] == "gpt-4.1-mini" and one["cost_usd"] == sums["cost_usd"]
    st = {g["model"]: g for g in run(capsys, "stats", "--db", db_url, "--json", "--by", "model")["batches"]}
    assert st["gpt-4.1-mini"]["batches"] == 1 and st["gpt-4.1-mini"]["input_tokens"] == sums["input_tokens"]
    assert st["gpt-4.1-mini"]["output_tokens"] == sums["output_tokens"]
    assert st["gpt-4.1-mini"]["cost_usd"] == sums["cost_usd"]
    assert st["gpt-4o-2024-08-06"]["input_tokens"] == 1000 and st["gpt-4o-2024-08-06"]["cost_usd"] == 2.0
    assert "bad-model" not in st and "(no model)" not in st
    rep = run(capsys, "report", "--db", db_url, "--json", "--since", "30d")
    turn = {m["model"] for m in rep["turnaround"]["by_model"]}
    assert "gpt-4.1-mini" in turn and "bad-model" not in turn and "(no model)" not in turn
    failed = {m["model"]: m for m in rep["batch_failures"]["by_model"]}
    assert "(no model)" not in failed and failed["gpt-4.1-mini"]["failed"] == 1
    spend = {r["model"] for r in rep["spend_by_day"]}
    assert "(no model)" not in spend and "gpt-4.1-mini" in spend
