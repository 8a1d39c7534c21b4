"""The ``scores`` table and what the evaluator reads: answers not yet seen by an eval, judge work waiting, where
each eval got to (``velvet_meta``), and the money a judge spent today."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from peewee import Database

from velvet_core.alerts.evaluate import batch_filters, call_filters
from velvet_core.evals.answer import Answer, from_call, from_line
from velvet_core.evals.checks import Outcome
from velvet_core.evals.judge import TAG
from velvet_core.evals.rules import Eval
from velvet_core.storage.sql import adapt, rows, set_meta, ts

NOT_ANSWERS = ("batches", "files", "uploads", "other")  # endpoints whose calls are not a model's answers
CALL_COLUMNS = ("c.id, c.flow_id, c.started_at, c.endpoint, c.model, c.model_requested, c.status_code, c.stream, "
                "c.request_body, c.response_body, c.response_text, c.finish_reason, c.tags")
LINE_COLUMNS = ("r.id, r.batch_id, r.custom_id, r.seen_at, r.model, r.status_code, r.failed, r.body, "
                "q.body AS req_body, q.url AS req_url, q.model AS req_model, b.metadata")


def sample_point(subject: str) -> float:
    """Where an answer falls in [0, 1): a hash of its id. An eval of share ``s`` takes the answers below ``s``, so
    every run picks the same ones, and a larger share keeps a smaller one's picks."""
    h = int.from_bytes(hashlib.blake2b(subject.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64


def sampled(subject: str, share: float) -> bool:
    """Whether an answer is in an eval's sample."""
    return share >= 1 or sample_point(subject) < share


def is_judge_traffic(a: Answer) -> bool:
    return TAG in a.tags or "velvet_eval" in a.tags


# -- where each eval got to --------------------------------------------------------------------------------

def _meta_key(rule: Eval, source: str) -> str:
    return f"eval:{source}:{rule.name}"


def mark(db: Database, rule: Eval, source: str) -> int | None:
    got = rows(db, 'SELECT "value" FROM velvet_meta WHERE "key" = ?', (_meta_key(rule, source),))
    return int(got[0]["value"]) if got else None


def set_mark(db: Database, rule: Eval, source: str, last_id: int) -> None:
    set_meta(db, _meta_key(rule, source), str(last_id))


def newest_id(db: Database, source: str) -> int:
    table = "calls" if source == "live" else "batch_results"
    got = rows(db, f"SELECT MAX(id) AS m FROM {table}")
    return int(got[0]["m"] or 0)


# -- answers -----------------------------------------------------------------------------------------------

def answers(db: Database, rule: Eval, source: str, after: int, limit: int,
            since: datetime | None = None, until: datetime | None = None) -> list[Answer]:
    """Up to ``limit`` answers with ids above ``after`` that ``rule``'s filters take (judge traffic excluded)."""
    params: list[Any] = [after]
    if source == "live":
        sql = (f"SELECT {CALL_COLUMNS} FROM calls c WHERE c.id > ? AND c.action = 'create' "
               f"AND c.endpoint NOT IN ({', '.join('?' * len(NOT_ANSWERS))})")
        params += NOT_ANSWERS
        time_col = "c.started_at"
    else:
        sql = (f"SELECT {LINE_COLUMNS} FROM batch_results r JOIN batch_requests q ON q.id = r.request_row_id "
               "JOIN batches b ON b.id = r.batch_id WHERE r.id > ?")
        time_col = "r.seen_at"
    if since is not None:
        sql += f" AND {time_col} >= ?"
        params.append(ts(db, since))
    if until is not None:
        sql += f" AND {time_col} < ?"
        params.append(ts(db, until))
    sql += call_filters(db, rule, params) if source == "live" else batch_filters(db, rule, params)  # type: ignore[arg-type]
    sql += f" ORDER BY {'c' if source == 'live' else 'r'}.id LIMIT {int(limit)}"
    make = from_call if source == "live" else from_line
    return [make(r) for r in rows(db, sql, params)]


# -- scores ------------------------------------------------------------------------------------------------

# a new score row, in this order; ``answered_at`` as read from the answer's row, the times as :func:`ts` gives them
COLUMNS = ("eval", "check", "source", "subject", "call_id", "result_id", "batch_id", "custom_id", "answered_at",
           "status", "score", "passed", "reason", "created_at", "judged_at")
_TIMES = frozenset({"answered_at", "created_at", "judged_at"})


def _value(db: Database, column: str, v: Any) -> Any:
    return ts(db, v) if column in _TIMES and isinstance(v, datetime) else v


def insert(db: Database, records: list[tuple[Any, ...]]) -> int:
    """Insert score rows (:func:`outcome_row`, :func:`pending_row`); an answer an eval already has is left as it
    is. Returns how many were new."""
    if not records:
        return 0
    sql = adapt(db, f'INSERT INTO scores ({", ".join(f"{chr(34)}{c}{chr(34)}" for c in COLUMNS)}) '
                    f'VALUES ({", ".join("?" * len(COLUMNS))}) ON CONFLICT ("eval", "subject") DO NOTHING')
    with db.atomic():
        cur = db.cursor()
        cur.executemany(sql, records)
        return max(cur.rowcount, 0)


def outcome_row(rule: Eval, a: Answer, o: Outcome, stamp: Any) -> tuple[Any, ...]:
    return (rule.name, rule.check, a.source, a.subject, a.call_id, a.result_id, a.batch_id, a.custom_id, a.at,
            o.status, o.score, o.passed, o.reason, stamp, stamp)


def pending_row(rule: Eval, a: Answer, stamp: Any) -> tuple[Any, ...]:
    return (rule.name, rule.check, a.source, a.subject, a.call_id, a.result_id, a.batch_id, a.custom_id, a.at,
            "pending", None, None, None, stamp, None)


def waiting(db: Database, rule: Eval, status: str, limit: int) -> list[dict[str, Any]]:
    return rows(db, f"SELECT * FROM scores WHERE eval = ? AND status = ? ORDER BY id LIMIT {int(limit)}",
                (rule.name, status))


def count_waiting(db: Database, rule: Eval, status: str = "pending") -> int:
    return int(rows(db, "SELECT COUNT(*) AS n FROM scores WHERE eval = ? AND status = ?",
                    (rule.name, status))[0]["n"])


def answer_of(db: Database, score: dict[str, Any]) -> Answer | None:
    """The answer a score row is about (None when it is gone: pruned)."""
    if score["source"] == "live":
        got = rows(db, f"SELECT {CALL_COLUMNS} FROM calls c WHERE c.id = ?", (score["call_id"],))
        return from_call(got[0]) if got else None
    got = rows(db, f"SELECT {LINE_COLUMNS} FROM batch_results r JOIN batch_requests q ON q.id = r.request_row_id "
                   "JOIN batches b ON b.id = r.batch_id WHERE r.id = ?", (score["result_id"],))
    return from_line(got[0]) if got else None


def update(db: Database, score_id: int, **values: Any) -> None:
    sets = ", ".join(f'"{k}" = ?' for k in values)
    db.execute_sql(adapt(db, f"UPDATE scores SET {sets} WHERE id = ?"),
                   (*(_value(db, k, v) for k, v in values.items()), score_id))


def spent_today(db: Database, rule: Eval, now: datetime) -> float:
    """What a judge spent (or committed: sent, estimated) since 00:00 UTC."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    got = rows(db, "SELECT SUM(cost_usd) AS s FROM scores WHERE eval = ? AND judged_at >= ? "
                   "AND status IN ('sent', 'scored', 'error')", (rule.name, ts(db, day)))
    return float(got[0]["s"] or 0.0)


def has_score(db: Database, rule: Eval, a: Answer) -> bool:
    return bool(rows(db, "SELECT 1 AS x FROM scores WHERE eval = ? AND subject = ?", (rule.name, a.subject)))
