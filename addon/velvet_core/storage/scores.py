"""The scores table (velvet_evals) as the readers see it: per eval, the answers judged, passed, failed, pending
and skipped in a window (by when the answer was given), the pass rate against the window before, the mean score,
the judges' cost and the worst examples; per batch, per answer and per day (``velvet batch``, ``velvet show``,
the report, the eval alert kinds)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from peewee import Database

from velvet_core.storage.sql import has_table, is_pg, iso, rows, ts

WORST = 5
JUDGED = "('scored', 'error')"


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if b else None


def example_id(r: dict[str, Any]) -> str:
    """How ``velvet show`` finds the answer: a call's id, or ``BATCH CUSTOM_ID``."""
    return str(r["call_id"]) if r["source"] == "live" else f"{r['batch_id']} {r['custom_id']}"


def summary(db: Database, since: datetime, until: datetime, *, names: list[str] | None = None,
            created_after: datetime | None = None, previous: bool = True) -> list[dict[str, Any]]:
    """One dict per eval with answers in ``[since, until)``: the keys of ``velvet evals --json``."""
    if not has_scores(db):
        return []
    where, params = "answered_at >= ? AND answered_at < ?", [ts(db, since), ts(db, until)]
    if names is not None:
        if not names:
            return []
        where += f" AND eval IN ({', '.join('?' * len(names))})"
        params += names
    if created_after is not None:
        where += " AND created_at >= ?"
        params.append(ts(db, created_after))
    got = rows(db, f"""SELECT eval, MAX("check") AS "check",
            SUM(CASE WHEN status IN {JUDGED} THEN 1 ELSE 0 END) AS judged,
            SUM(CASE WHEN status = 'scored' AND passed THEN 1 ELSE 0 END) AS passed,
            SUM(CASE WHEN status = 'scored' AND NOT passed THEN 1 ELSE 0 END) AS failed,
            SUM(CASE WHEN status IN ('pending', 'sent') THEN 1 ELSE 0 END) AS pending,
            SUM(CASE WHEN status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
            SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
            AVG(CASE WHEN status = 'scored' THEN score END) AS mean_score,
            SUM(CASE WHEN status IN {JUDGED} THEN cost_usd END) AS cost_usd
        FROM scores WHERE {where} GROUP BY eval ORDER BY eval""", params)
    before: dict[str, float | None] = {}
    if previous and got:
        span = until - since
        prev = rows(db, """SELECT eval, SUM(CASE WHEN status = 'scored' AND passed THEN 1 ELSE 0 END) AS passed,
                SUM(CASE WHEN status = 'scored' AND passed IS NOT NULL THEN 1 ELSE 0 END) AS decided
            FROM scores WHERE answered_at >= ? AND answered_at < ? GROUP BY eval""",
                    [ts(db, since - span), ts(db, since)])
        before = {r["eval"]: _ratio(r["passed"], r["decided"]) for r in prev}
    out = []
    for r in got:
        worst = rows(db, f"""SELECT source, call_id, batch_id, custom_id FROM scores WHERE {where} AND eval = ?
            AND status = 'scored' AND NOT passed ORDER BY score, id LIMIT {WORST}""", [*params, r["eval"]])
        passed, failed = int(r["passed"] or 0), int(r["failed"] or 0)
        out.append({
            "name": r["eval"], "check": r["check"], "judged": int(r["judged"] or 0), "passed": passed,
            "failed": failed, "pending": int(r["pending"] or 0), "skipped": int(r["skipped"] or 0),
            "errors": int(r["errors"] or 0), "pass_rate": _ratio(passed, passed + failed),
            "mean_score": None if r["mean_score"] is None else float(r["mean_score"]),
            "cost_usd": float(r["cost_usd"] or 0.0), "previous_pass_rate": before.get(r["eval"]),
            "worst": [example_id(w) for w in worst]})
    return out


def has_scores(db: Database) -> bool:
    """Whether the database has the scores table (a read-only look at a database older than schema v16)."""
    return bool(has_table(db, "scores"))


def for_batch(db: Database, batch_id: str) -> list[dict[str, Any]]:
    """Each eval's pass rate over one batch's lines."""
    if not has_scores(db):
        return []
    got = rows(db, """SELECT eval, SUM(CASE WHEN status = 'scored' AND passed THEN 1 ELSE 0 END) AS passed,
            SUM(CASE WHEN status = 'scored' AND NOT passed THEN 1 ELSE 0 END) AS failed,
            SUM(CASE WHEN status IN ('pending', 'sent') THEN 1 ELSE 0 END) AS pending,
            SUM(CASE WHEN status IN ('skipped', 'error') THEN 1 ELSE 0 END) AS other
        FROM scores WHERE batch_id = ? AND source = 'batch' GROUP BY eval ORDER BY eval""", (batch_id,))
    return [{"name": r["eval"], "passed": int(r["passed"] or 0), "failed": int(r["failed"] or 0),
             "pending": int(r["pending"] or 0), "skipped": int(r["other"] or 0),
             "pass_rate": _ratio(r["passed"] or 0, (r["passed"] or 0) + (r["failed"] or 0))} for r in got]


def for_answer(db: Database, *, call_id: int | None = None, batch_id: str | None = None,
               custom_id: str | None = None) -> list[dict[str, Any]]:
    """The scores of one answer."""
    if not has_scores(db):
        return []
    if call_id is not None:
        got = rows(db, "SELECT * FROM scores WHERE call_id = ? AND source = 'live' ORDER BY eval", (call_id,))
    else:
        got = rows(db, "SELECT * FROM scores WHERE batch_id = ? AND custom_id = ? AND source = 'batch' "
                       "ORDER BY eval", (batch_id, custom_id))
    return [{"eval": r["eval"], "check": r["check"], "status": r["status"], "score": r["score"],
             "passed": None if r["passed"] is None else bool(r["passed"]), "reason": r["reason"],
             "judged_at": iso(r["judged_at"]), "judge_call": r["judge_call"],
             "judge_batch_id": r["judge_batch_id"], "judge_custom_id": r["judge_custom_id"],
             "cost_usd": r["cost_usd"]} for r in got]


def by_day(db: Database, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Pass rate per eval per UTC day (the report)."""
    if not has_scores(db):
        return []
    day = "to_char(answered_at, 'YYYY-MM-DD')" if is_pg(db) else "substr(answered_at, 1, 10)"
    got = rows(db, f"""SELECT eval, {day} AS day,
            SUM(CASE WHEN status = 'scored' AND passed THEN 1 ELSE 0 END) AS passed,
            SUM(CASE WHEN status = 'scored' AND passed IS NOT NULL THEN 1 ELSE 0 END) AS decided,
            AVG(CASE WHEN status = 'scored' THEN score END) AS mean_score
        FROM scores WHERE answered_at >= ? AND answered_at < ? GROUP BY eval, {day} ORDER BY eval, day""",
                   (ts(db, since), ts(db, until)))
    return [{"eval": r["eval"], "day": r["day"], "decided": int(r["decided"] or 0),
             "pass_rate": _ratio(r["passed"] or 0, r["decided"]),
             "mean_score": None if r["mean_score"] is None else float(r["mean_score"])} for r in got]
