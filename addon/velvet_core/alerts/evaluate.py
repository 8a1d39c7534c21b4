"""Measure each rule's kind from the database with read-only SQL (the same on SQLite and PostgreSQL).

A rule gives a :class:`Reading`: ``None`` instances when there is no data to judge (fewer calls than
``min_calls``, no baseline spend), else one :class:`Instance` per subject: the rule itself for the
traffic kinds, one per batch for the batch kinds, one per proxy for ``velvet_stalled``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from peewee import Database

from velvet_core.alerts.rules import BELOW_KINDS, Rule
from velvet_core.humanize import duration, money
from velvet_core.redact import redact
from velvet_core.storage import batch_rule
from velvet_core.storage.sql import has_table, iso, json_field, json_key, rows, to_dt, ts

FINAL = ("completed", "failed", "expired", "cancelled")
BAD_FINAL = ("failed", "expired", "cancelled")
LEVELS = ("ok", "warning", "firing")
STALLED_MIN_SILENCE = 60.0  # a proxy refreshes its status row every few seconds: silence below this is normal


@dataclass
class Instance:
    """One subject's measurement: its value, its level and what was seen, for people and machines."""

    subject: str
    value: float | None
    level: str  # ok, warning, firing
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reading:
    instances: list[Instance] | None  # None: no data to judge
    note: str = ""  # why there is no data


# -- SQL helpers -----------------------------------------------------------------------------------




def _like(glob: str) -> str:
    """A glob (``*``, ``?``) as a LIKE pattern with ``!`` as the escape character."""
    out = glob.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return out.replace("*", "%").replace("?", "_")




def _any(column_sqls: list[str], patterns: tuple[str, ...], params: list[Any]) -> str:
    """``(col1 LIKE p OR col2 LIKE p ...)`` over every pattern."""
    parts = []
    for p in patterns:
        for col in column_sqls:
            parts.append(f"{col} LIKE ? ESCAPE '!'")
            params.append(_like(p))
    return "(" + " OR ".join(parts) + ")"


def _filters(db: Database, rule: Rule, params: list[Any], models: list[str], endpoint: str,
             endpoints: tuple[str, ...], key: str, tags: str) -> str:
    """`` AND …`` for the rule's model, endpoint, key and tags filters, on the columns given."""
    where = []
    if rule.models:
        where.append(_any(models, rule.models, params))
    if rule.endpoints:
        where.append(_any([endpoint], endpoints, params))
    if rule.keys:
        where.append(_any([key], rule.keys, params))
    for k, v in rule.tags:
        where.append(f"{json_field(db, tags)} = ?")
        params += [json_key(db, k), v]
    return "".join(" AND " + w for w in where)


def call_filters(db: Database, rule: Rule, params: list[Any]) -> str:
    """The filters on ``calls``."""
    return _filters(db, rule, params, ["model", "model_requested"], "endpoint", rule.endpoints, "key_fingerprint",
                    "tags")


BATCH_MODEL = batch_rule.model_sql("b")  # the one rule (storage/batch_rule.py), as every view


def batch_filters(db: Database, rule: Rule, params: list[Any]) -> str:
    """The filters on batches (alias ``b``); tags match the batch's metadata, endpoints its API path."""
    return _filters(db, rule, params, [BATCH_MODEL], "b.endpoint",
                    tuple("*/" + e.replace(".", "/") for e in rule.endpoints), "b.key_fingerprint", "b.metadata")


def level_of(rule: Rule, value: float | None) -> str:
    """firing above ``threshold``, warning above ``warning``, else ok (below, for the kinds that fire below)."""
    if value is None or rule.threshold is None:
        return "ok"
    if rule.kind in BELOW_KINDS:
        if value < rule.threshold:
            return "firing"
        return "warning" if rule.warning is not None and value < rule.warning else "ok"
    if value > rule.threshold:
        return "firing"
    if rule.warning is not None and value > rule.warning:
        return "warning"
    return "ok"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def fmt_value(rule: Rule, v: float | None) -> str:
    """A rule's value (or threshold) for people."""
    if v is None:
        return "-"
    if rule.kind in ("error_rate", "batch_failed", "eval_fail_rate"):
        return pct(v)
    if rule.kind == "eval_score":
        return f"{v:.2f}"
    if rule.kind in ("latency_p95_ms", "ttft_p95_ms"):
        return f"{v:,.0f} ms"
    if rule.kind == "spend_usd":
        return money(v)
    if rule.kind == "spend_spike":
        return f"{v:.1f}x"
    if rule.kind in ("batch_overdue", "batch_unread"):
        return f"{v:.1f} h"
    return duration(v)  # velvet_stalled: seconds


# -- the kinds -------------------------------------------------------------------------------------

def evaluate(db: Database, rule: Rule, now: datetime) -> Reading:
    """Measure ``rule`` at ``now`` (naive UTC)."""
    return _KINDS[rule.kind](db, rule, now)


def _error_condition(rule: Rule) -> str:
    s = rule.status
    if s is None:
        return "(status_code IS NULL OR status_code >= 400)"
    if s.endswith("xx"):
        return f"(status_code >= {int(s[0]) * 100} AND status_code < {int(s[0]) * 100 + 100})"
    return f"status_code = {int(s)}"


def _error_rate(db: Database, rule: Rule, now: datetime) -> Reading:
    params: list[Any] = [ts(db, now - timedelta(seconds=rule.window))]
    where = "started_at >= ?" + call_filters(db, rule, params)
    err = _error_condition(rule)
    (r,) = rows(db, f"SELECT count(*) AS n, sum(CASE WHEN {err} THEN 1 ELSE 0 END) AS e FROM calls WHERE {where}",
                 params)
    n, e = int(r["n"]), int(r["e"] or 0)
    if n < rule.min_calls:
        return Reading(None, f"{n} calls in {rule.window_text}, fewer than min_calls {rule.min_calls}")
    top = rows(db, "SELECT status_code, COALESCE(error_code, error_type) AS code, count(*) AS n FROM calls "
                    f"WHERE {where} AND {err} GROUP BY status_code, COALESCE(error_code, error_type) "
                    "ORDER BY n DESC, status_code LIMIT 3", params)
    errors = [{"status_code": t["status_code"], "error_code": t["code"], "count": int(t["n"])} for t in top]
    value = e / n
    what = f"{e:,} of {n:,} calls " + ("failed" if rule.status is None else f"answered {rule.status}")
    if errors:
        t = errors[0]
        what += f"; most: {t['status_code'] or 'no answer'} {t['error_code'] or ''}".rstrip() + f" x{t['count']}"
    return Reading([Instance("", value, level_of(rule, value), f"error rate {pct(value)} ({what})",
                             {"calls": n, "errors": e, "status": rule.status, "top_errors": errors})])


def _percentile_sql(db: Database, rule: Rule, now: datetime,
                    column: str) -> tuple[int, float | None, float | None]:
    """(count, p50, p95) of ``column`` over the answered calls that ended in the window (a long stream is
    known only once it ended), sorted by the database."""
    start = now - timedelta(seconds=rule.window)
    params: list[Any] = [ts(db, start - timedelta(hours=1)), ts(db, start)]  # (the first: started_at's index)
    where = (f"started_at >= ? AND ended_at >= ? AND {column} IS NOT NULL AND status_code < 400"
             + call_filters(db, rule, params))
    n = int(rows(db, f"SELECT count(*) AS n FROM calls WHERE {where}", params)[0]["n"])
    if n == 0:
        return 0, None, None

    def nearest_rank(p: float) -> float:
        k = max(0, min(n - 1, math.ceil(p / 100 * n) - 1))
        return float(rows(db, f"SELECT {column} AS v FROM calls WHERE {where} ORDER BY {column} "
                               f"LIMIT 1 OFFSET {k}", params)[0]["v"])

    return n, nearest_rank(50), nearest_rank(95)


def _latency(db: Database, rule: Rule, now: datetime) -> Reading:
    column, label = (("latency_ms", "latency") if rule.kind == "latency_p95_ms"
                     else ("ttft_ms", "time to first token"))
    n, p50, p95 = _percentile_sql(db, rule, now, column)
    if n < rule.min_calls:
        return Reading(None, f"{n} answered calls with a {label} in {rule.window_text}, "
                             f"fewer than min_calls {rule.min_calls}")
    return Reading([Instance("", p95, level_of(rule, p95),
                             f"{label} p95 {fmt_value(rule, p95)} (p50 {fmt_value(rule, p50)}, {n:,} calls)",
                             {"calls": n, "p50_ms": p50, "p95_ms": p95})])


def spend(db: Database, rule: Rule, start: datetime, end: datetime) -> dict[str, float]:
    """Live and batch spend between ``start`` and ``end``: calls by start, batches by when they ended."""
    out = {"live_usd": 0.0, "batch_usd": 0.0}
    if rule.source in ("live", "both"):
        params: list[Any] = [ts(db, start), ts(db, end)]
        where = "started_at >= ? AND started_at < ?" + call_filters(db, rule, params)
        live = rows(db, f"SELECT sum(cost_usd) AS s FROM calls WHERE {where}", params)[0]["s"]
        out["live_usd"] = float(live or 0)
    if rule.source in ("batch", "both"):
        params = [ts(db, start), ts(db, end)]
        ended = "COALESCE(b.completed_at, b.expired_at, b.cancelled_at)"
        where = f"{ended} >= ? AND {ended} < ?" + batch_filters(db, rule, params)
        out["batch_usd"] = float(rows(db, "SELECT sum(COALESCE(b.cost_usd, b.usage_cost_usd)) AS s "
                                           f"FROM batch_summary b WHERE {where}", params)[0]["s"] or 0)
    return out


def _spend_usd(db: Database, rule: Rule, now: datetime) -> Reading:
    s = spend(db, rule, now - timedelta(seconds=rule.window), now + timedelta(seconds=1))
    value = s["live_usd"] + s["batch_usd"]
    return Reading([Instance("", value, level_of(rule, value),
                             f"spend {money(value)} in {rule.window_text} (live {money(s['live_usd'])}, "
                             f"batch {money(s['batch_usd'])})", {k: round(v, 10) for k, v in s.items()})])


def _spend_spike(db: Database, rule: Rule, now: datetime) -> Reading:
    start = now - timedelta(seconds=rule.window)
    cur = sum(spend(db, rule, start, now + timedelta(seconds=1)).values())
    base = sum(spend(db, rule, start - timedelta(seconds=rule.baseline), start).values())
    average = base * rule.window / rule.baseline  # the trailing spend per window
    if average <= 0:
        return Reading(None, "no spend in the baseline period to compare with")
    value = cur / average
    level = "ok" if cur < rule.min_usd else level_of(rule, value)
    return Reading([Instance("", value, level,
                             f"spend {money(cur)} in {rule.window_text}, {value:.1f}x the trailing average "
                             f"{money(average)}", {"spend_usd": round(cur, 10), "average_usd": round(average, 10),
                                                   "baseline_usd": round(base, 10)})])


def _batch_overdue(db: Database, rule: Rule, now: datetime) -> Reading:
    params: list[Any] = [ts(db, now - timedelta(seconds=rule.window))]
    found = rows(db, f"SELECT b.id, b.status, {BATCH_MODEL} AS model, b.endpoint, b.created_at, b.first_seen_at, "
                      "b.finalizing_at, b.expires_at, b.request_total, b.request_completed, b.request_failed "
                      f"FROM batches b WHERE b.status NOT IN {FINAL!r} "
                      "AND COALESCE(b.created_at, b.first_seen_at) >= ?" + batch_filters(db, rule, params), params)
    out = []
    assert rule.threshold is not None
    for r in found:
        created = to_dt(r["created_at"]) or to_dt(r["first_seen_at"])
        assert created is not None
        age = (now - created).total_seconds() / 3600
        level = level_of(rule, age)
        reason = f"not final {age:.1f} h after it was created"
        fin = to_dt(r["finalizing_at"])
        if r["status"] == "finalizing" and fin is not None:
            stuck = (now - fin).total_seconds() / 3600
            if stuck > rule.finalizing_hours:
                level, reason = "firing", f"finalizing for {stuck:.1f} h"
        done = r["request_completed"], r["request_failed"], r["request_total"]
        out.append(Instance(r["id"], round(age, 3), level, f"{r['id']} ({r['status']}) {reason}", {
            "id": r["id"], "status": r["status"], "model": r["model"], "endpoint": r["endpoint"],
            "created_at": iso(created), "expires_at": iso(r["expires_at"]), "age_hours": round(age, 2),
            "finalizing_at": iso(fin), "request_counts": dict(zip(("completed", "failed", "total"), done,
                                                                  strict=True)), "reason": reason}))
    return Reading(out)


def _batch_failed(db: Database, rule: Rule, now: datetime) -> Reading:
    start = ts(db, now - timedelta(seconds=rule.window))
    params: list[Any] = [start]
    inner = ("SELECT b.id, b.status, b.endpoint, b.errors, b.request_total, b.request_failed, b.answered, "
             f"b.failed, {BATCH_MODEL} AS model, COALESCE((SELECT max(e.observed_at) FROM batch_events e "
             "WHERE e.batch_id = b.id AND e.status = b.status), b.last_seen_at) AS ended "
             f"FROM batch_summary b WHERE b.status IN {FINAL!r} AND b.last_seen_at >= ?"
             + batch_filters(db, rule, params))
    found = rows(db, f"SELECT * FROM ({inner}) q WHERE q.ended >= ?", [*params, start])
    out = []
    for r in found:
        logged = int(r["answered"]) + int(r["failed"])
        if logged:
            share: float | None = int(r["failed"]) / logged
        elif r["request_total"]:
            share = (r["request_failed"] or 0) / r["request_total"]
        else:
            share = None
        if r["status"] in BAD_FINAL:
            level, reason = "firing", r["status"]
        else:
            level = level_of(rule, share)
            reason = f"{pct(share)} of its lines failed"
        inst = Instance(r["id"], share, level, f"{r['id']} {reason}", {
            "id": r["id"], "status": r["status"], "model": r["model"], "endpoint": r["endpoint"],
            "failed_share": share, "failed_lines": int(r["failed"]) if logged else r["request_failed"],
            "lines": logged or r["request_total"], "ended_at": iso(r["ended"])})
        if level != "ok":
            inst.details.update(_batch_error_sample(db, r))
            if code := inst.details["top_error"]:
                inst.summary += f" ({code})"
        out.append(inst)
    return Reading(out)


def _batch_error_sample(db: Database, r: dict[str, Any]) -> dict[str, Any]:
    """The most common error code of a batch (validation or line) and example custom_ids."""
    try:
        errors = orjson.loads(r["errors"]) if r["errors"] else None
    except orjson.JSONDecodeError:
        errors = None
    data = errors.get("data") if isinstance(errors, dict) else errors
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return {"top_error": data[0].get("code"), "error_message": data[0].get("message"), "examples": []}
    top = rows(db, "SELECT error_code, count(*) AS n FROM batch_results WHERE batch_id = ? AND failed "
                    "GROUP BY error_code ORDER BY n DESC LIMIT 1", [r["id"]])
    if not top:
        return {"top_error": None, "examples": []}
    code = top[0]["error_code"]
    ex = rows(db, "SELECT custom_id FROM batch_results WHERE batch_id = ? AND failed AND "
                   + ("error_code IS NULL" if code is None else "error_code = ?")
                   + " ORDER BY custom_id LIMIT 3", [r["id"]] + ([] if code is None else [code]))
    return {"top_error": code, "examples": [e["custom_id"] for e in ex]}


def _batch_unread(db: Database, rule: Rule, now: datetime) -> Reading:
    ended = "COALESCE(b.completed_at, b.expired_at, b.cancelled_at, b.last_seen_at)"
    params: list[Any] = [ts(db, now - timedelta(seconds=rule.window))]
    found = rows(db, f"SELECT b.id, b.status, {BATCH_MODEL} AS model, b.output_file_id, b.error_file_id, "
                      f"{ended} AS ended FROM batches b WHERE b.status IN ('completed', 'expired', 'cancelled') "
                      f"AND COALESCE(b.output_file_id, b.error_file_id) IS NOT NULL AND {ended} >= ? "
                      "AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id = COALESCE(b.output_file_id, "
                      "b.error_file_id) AND f.content_seen)" + batch_filters(db, rule, params), params)
    out = []
    for r in found:
        ended_at = to_dt(r["ended"])
        assert ended_at is not None
        hours = (now - ended_at).total_seconds() / 3600
        file_id = r["output_file_id"] or r["error_file_id"]
        out.append(Instance(r["id"], round(hours, 3), level_of(rule, hours),
                            f"{r['id']} {r['status']} {hours:.1f} h ago; {file_id} never downloaded", {
                                "id": r["id"], "status": r["status"], "model": r["model"], "file_id": file_id,
                                "ended_at": iso(ended_at), "hours": round(hours, 2)}))
    return Reading(out)


def _eval(db: Database, rule: Rule, now: datetime) -> Reading:
    """eval_fail_rate (failed share of the answers judged in the window) and eval_score (their mean score)."""
    from velvet_core.storage.scores import WORST, example_id, has_scores

    if not has_scores(db):
        return Reading(None, "no scores table yet")
    params: list[Any] = [ts(db, now - timedelta(seconds=rule.window))]
    where = "status = 'scored' AND judged_at >= ?"
    if rule.eval is not None:
        where += " AND eval = ?"
        params.append(rule.eval)
    (r,) = rows(db, "SELECT count(*) AS n, sum(CASE WHEN NOT passed THEN 1 ELSE 0 END) AS f, avg(score) AS mean "
                    f"FROM scores WHERE {where} AND passed IS NOT NULL", params)
    n = int(r["n"])
    who = f"eval {rule.eval!r}" if rule.eval else "every eval"
    if n < rule.min_calls:
        return Reading(None, f"{n} answers judged by {who} in {rule.window_text}, fewer than min_calls "
                             f"{rule.min_calls}")
    worst = rows(db, f"SELECT eval, source, call_id, batch_id, custom_id, score, reason FROM scores WHERE {where} "
                     f"AND passed IS NOT NULL AND NOT passed ORDER BY score, id LIMIT {WORST}", params)
    failed = int(r["f"] or 0)
    mean = float(r["mean"]) if r["mean"] is not None else None
    details = {"eval": rule.eval, "judged": n, "failed": failed, "mean_score": mean,
               "worst": [{"eval": w["eval"], "id": example_id(w), "score": w["score"], "reason": w["reason"]}
                         for w in worst]}
    if rule.kind == "eval_score":
        return Reading([Instance("", mean, level_of(rule, mean),
                                 f"{who}: mean score {fmt_value(rule, mean)} over {n:,} answers", details)])
    value = failed / n
    return Reading([Instance("", value, level_of(rule, value),
                             f"{who}: {pct(value)} of answers failed ({failed:,} of {n:,})", details)])


def _velvet_stalled(db: Database, rule: Rule, now: datetime) -> Reading:
    if not has_table(db, "velvet_proxies"):
        return Reading(None, "this database has no velvet_proxies table (schema too old)")
    found = rows(db, "SELECT proxy, hostname, pid, updated_at, failing_since, last_error, last_error_at, "
                      "queue_depth, pending, spooled FROM velvet_proxies WHERE stopped_at IS NULL "
                      "AND updated_at >= ?", [ts(db, now - timedelta(days=1))])
    out = []
    for r in found:
        failing_since, updated = to_dt(r["failing_since"]), to_dt(r["updated_at"])
        assert updated is not None
        silent = (now - updated).total_seconds()
        failing = (now - failing_since).total_seconds() if failing_since else 0.0
        if failing > rule.window:
            level, value, reason = "firing", failing, f"writes failing for {duration(failing)}"
        elif silent > max(rule.window, STALLED_MIN_SILENCE):
            level, value, reason = "firing", silent, f"no sign of life for {duration(silent)}"
        else:
            level, value, reason = "ok", max(failing, 0.0), "writing"
        out.append(Instance(r["proxy"], round(value, 1), level, f"proxy {r['proxy']}: {reason}", {
            "proxy": r["proxy"], "hostname": r["hostname"], "pid": r["pid"], "updated_at": iso(updated),
            "failing_since": iso(failing_since), "last_error": redact(r["last_error"]),
            "queue_depth": r["queue_depth"], "pending": r["pending"], "spooled": r["spooled"], "reason": reason}))
    return Reading(out)


def unreachable(rule: Rule, who: str, since: datetime, now: datetime, error: str) -> Reading:
    """``velvet_stalled`` when the evaluator itself cannot reach the database since ``since``."""
    secs = (now - since).total_seconds()
    level = "firing" if secs > rule.window else "ok"
    reason = f"database unreachable for {duration(secs)}: {redact(error)}"
    return Reading([Instance(who, round(secs, 1), level, f"proxy {who}: {reason}",
                             {"proxy": who, "failing_since": iso(since), "last_error": redact(error),
                              "reason": reason})])



_KINDS = {
    "error_rate": _error_rate, "latency_p95_ms": _latency, "ttft_p95_ms": _latency, "spend_usd": _spend_usd,
    "spend_spike": _spend_spike, "batch_overdue": _batch_overdue, "batch_failed": _batch_failed,
    "batch_unread": _batch_unread, "velvet_stalled": _velvet_stalled, "eval_fail_rate": _eval, "eval_score": _eval,
}
