"""A week of made-up traffic written with bulk SQL: many batches (with their lines), live calls, alerts.

For the report's tests and its screenshot (``python tests/reportdb.py URL [BATCHES]``). Deterministic
for a given seed; timestamps are spread over the ``days`` before now.
"""

from __future__ import annotations

import random
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from peewee import Database, SqliteDatabase
from velvet_core.storage import rollups
from velvet_core.storage.database import open_db

MODELS = ("gpt-4o-mini-2024-07-18", "gpt-4.1-mini", "gpt-4o-2024-08-06", "text-embedding-3-small")
PRICE = {"gpt-4o-mini-2024-07-18": (0.15, 0.6), "gpt-4.1-mini": (0.4, 1.6), "gpt-4o-2024-08-06": (2.5, 10.0),
         "text-embedding-3-small": (0.02, 0.0)}
KEYS = ("3f9a1c0d2b7e", "a41be77c0f12", "0c5d9e8f1a2b")
TEAMS = ("search", "support", "ranking", "labs")
ERRORS = (("model_not_found", 0.3), ("invalid_request", 0.3), ("context_length_exceeded", 0.25),
          ("server_error", 0.15))


def _insert(db: Database, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    sql = (f'INSERT INTO "{table}" ({", ".join(f"{c!r}".replace(chr(39), chr(34)) for c in cols)}) '
           f'VALUES ({", ".join([db.param] * len(cols))})')
    cur = db.cursor()
    for i in range(0, len(rows), 5000):
        cur.executemany(sql, [tuple(r[c] for c in cols) for r in rows[i:i + 5000]])


def fill(url: str, batches: int = 10_000, calls: int = 20_000, days: float = 7, lines: int = 3,
         seed: int = 7, now: datetime | None = None) -> dict[str, int]:
    """Write the data; returns what was written (counts by table)."""
    rnd = random.Random(seed)
    now = now or datetime.now(UTC).replace(tzinfo=None)
    db = open_db(url)
    sqlite = isinstance(db, SqliteDatabase)

    def ts(dt: datetime | None) -> Any:
        return None if dt is None else (dt.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else dt)

    span = days * 86400
    b_rows, req_rows, res_rows, err_rows = [], [], [], []
    for i in range(batches):
        model = rnd.choices(MODELS, (5, 3, 1, 1))[0]
        created = now - timedelta(seconds=span * (1 - (i + rnd.random()) / batches))
        age = (now - created).total_seconds()
        r = rnd.random()
        status = "completed" if r < 0.89 else "failed" if r < 0.93 else "expired" if r < 0.96 \
            else "cancelled" if r < 0.98 else "in_progress"
        queue = rnd.uniform(30, 1200)
        processing = min(rnd.lognormvariate(9.1, 0.6), 20 * 3600)  # about 2.5 h, a few much longer
        finalize = rnd.uniform(60, 1500)
        if status == "in_progress" or queue + processing + finalize > age:
            status, processing = "in_progress", max(0.0, min(processing, age - queue))
        t_ip: datetime | None = created + timedelta(seconds=queue)
        if t_ip is not None and t_ip > now:
            t_ip = None  # still queued
        t = {"created_at": created, "in_progress_at": t_ip, "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelled_at": None}
        if status == "failed":
            t.update(in_progress_at=None, failed_at=created + timedelta(seconds=rnd.uniform(20, 200)))
        elif status == "expired":
            t["expired_at"] = created + timedelta(hours=24)
        elif status == "cancelled":
            t["cancelled_at"] = t_ip + timedelta(seconds=processing / 3)
        elif status == "completed":
            t["finalizing_at"] = t_ip + timedelta(seconds=processing)
            t["completed_at"] = t["finalizing_at"] + timedelta(seconds=finalize)
        end = t["completed_at"] or t["failed_at"] or t["expired_at"] or t["cancelled_at"]
        if end and end > now:  # not over yet
            status, end = "in_progress", None
            t.update(finalizing_at=None, completed_at=None, failed_at=None, expired_at=None, cancelled_at=None)
        bid = f"batch_{seed:02d}{i:08d}"
        inp, outp = PRICE[model]
        b_rows.append({
            "id": bid, "status": status, "endpoint": "/v1/embeddings" if "embedding" in model
            else "/v1/chat/completions", "model": model, "completion_window": "24h",
            "input_file_id": f"file-in-{bid}", "output_file_id": f"file-out-{bid}" if status != "failed" else None,
            "metadata": orjson.dumps({"team": rnd.choice(TEAMS)}).decode(),
            **{k: ts(v) for k, v in t.items()}, "expires_at": ts(created + timedelta(hours=24)),
            "request_total": lines, "turnaround_s": (end - created).total_seconds() if end else None,
            "key_fingerprint": rnd.choice(KEYS), "first_seen_at": ts(created), "last_seen_at": ts(end or now),
            "errors": orjson.dumps({"data": [{"code": "invalid_request", "message": "bad line", "line": 2}]})
            .decode() if status == "failed" else None})
        if status == "failed":
            err_rows.append({"batch_id": bid, "code": "invalid_request", "message": "Line 2: bad", "line": 2})
        for n in range(1, lines + 1):
            req_rows.append({"file_id": f"file-in-{bid}", "line_no": n, "custom_id": f"req-{n}", "method": "POST",
                             "url": "/v1/chat/completions", "model": model, "batch_id": bid})
            if status in ("failed", "in_progress"):
                continue
            failed = rnd.random() < (0.5 if status == "expired" else 0.03)
            code = "batch_expired" if status == "expired" and failed else \
                rnd.choices([c for c, _ in ERRORS], [w for _, w in ERRORS])[0]
            i_tok, o_tok = rnd.randint(200, 2000), rnd.randint(20, 600)
            res_rows.append({"file_id": f"file-out-{bid}", "line_no": n, "batch_id": bid, "custom_id": f"req-{n}",
                             "status_code": 400 if failed else 200, "model": model, "failed": failed,
                             "error_code": code if failed else None, "input_tokens": None if failed else i_tok,
                             "output_tokens": None if failed else o_tok, "cached_tokens": 0,
                             "cost_usd": None if failed else (i_tok * inp + o_tok * outp) / 2e6,
                             "seen_at": ts(end or now)})
    c_rows = []
    for i in range(calls):
        started = now - timedelta(seconds=span * rnd.random())
        model = rnd.choices(MODELS, (6, 3, 1, 2))[0]
        hour = started.hour
        status = 429 if (hour in (13, 14) and rnd.random() < 0.3) else 500 if rnd.random() < 0.01 else 200
        stream = "embedding" not in model and rnd.random() < 0.3
        latency = rnd.lognormvariate(6.3 if stream else 5.8, 0.5) * (1.8 if 9 <= hour <= 17 else 1)
        i_tok, o_tok = rnd.randint(20, 900), 0 if "embedding" in model else rnd.randint(5, 400)
        inp, outp = PRICE[model]
        ok = status == 200
        c_rows.append({
            "flow_id": f"flow-{seed}-{i}", "started_at": ts(started), "ended_at": ts(started + timedelta(
                milliseconds=latency)), "latency_ms": latency, "ttft_ms": latency * rnd.uniform(0.1, 0.3)
            if stream and ok else None, "method": "POST", "host": "api.openai.com",
            "path": "/v1/embeddings" if "embedding" in model else "/v1/chat/completions",
            "endpoint": "embeddings" if "embedding" in model else "chat.completions", "action": "create",
            "model": model, "status_code": status, "stream": stream, "complete": True,
            "key_fingerprint": rnd.choice(KEYS), "input_tokens": i_tok if ok else None,
            "output_tokens": o_tok if ok else None, "cost_usd": (i_tok * inp + o_tok * outp) / 1e6 if ok else None,
            "error_code": "rate_limit_exceeded" if status == 429 else None,
            "tags": orjson.dumps({"team": rnd.choice(TEAMS)}).decode() if rnd.random() < 0.8 else None})
    a_rows = []
    for k in range(6):
        at = now - timedelta(hours=20 * k + 3)
        state = "firing" if k % 2 else "resolved"
        a_rows.append({"at": ts(at), "rule": "chat errors", "kind": "error_rate", "subject": "", "state": state,
                       "value": 0.31 if state == "firing" else 0.02, "threshold": 0.2, "rule_window": "5m",
                       "text": f"velvet {state.upper()} · chat errors: error rate "
                               f"{'31.0' if state == 'firing' else '2.0'}% over 5m", "details": "{}",
                       "source": "reportdb"})
    with db.atomic():
        _insert(db, "batches", b_rows)
        _insert(db, "batch_requests", req_rows)
        _insert(db, "batch_results", res_rows)
        _insert(db, "batch_errors", err_rows)
        _insert(db, "calls", c_rows)
        _insert(db, "alerts", a_rows)
    rollups.rebuild(db)  # the counters and rollups the store keeps as it writes
    db.close()
    return {"batches": len(b_rows), "batch_requests": len(req_rows), "batch_results": len(res_rows),
            "calls": len(c_rows), "alerts": len(a_rows)}


if __name__ == "__main__":
    print(fill(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10_000))
