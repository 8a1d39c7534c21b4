"""Read side: the questions the CLI and the mitmproxy command answer, as plain dicts.

Every function takes a connected peewee ``Database`` (SQLite or PostgreSQL) and returns JSON-ready
values: timestamps become ISO-8601 UTC strings (``2026-11-24T15:04:05Z``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from peewee import Database, PostgresqlDatabase

from velvet_core import clock, config
from velvet_core.storage import batch_rule, cache_store, rollups
from velvet_core.storage.sql import (
    has_column,
    has_table,
    iso,
    json_value,
    percentile,
    rows,
    stream_rows,
    to_dt,
    to_int,
    ts,
)


class NotFound(LookupError):
    """An id the user asked for is not in the database."""


BATCH_KEYS = ("id", "status", "endpoint", "model", "created_at", "in_progress_at", "finalizing_at",
              "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "expires_at",
              "input_file_id", "output_file_id", "error_file_id", "request_counts", "lines", "answered",
              "failed", "turnaround_seconds", "cost_usd")
_TIMES = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "expires_at")


# -- batches ---------------------------------------------------------------------------------------

# the per-batch line counters; a database of an older velvet, read without migrating, has none: sum the lines
_COUNTS_OF_LINES = ("(SELECT batch_id, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
                    "sum(cost_usd) AS cost_usd FROM batch_results WHERE batch_id IS NOT NULL GROUP BY batch_id)")


def _batch_sql(db: Database) -> str:
    """batches.* plus lines, answered, failed, cost_usd, and what batch_rule.figures reads."""
    counts = "batch_counts" if has_table(db, "batch_counts") else _COUNTS_OF_LINES
    return (f"SELECT b.*, {batch_rule.columns_sql('b', 'bc')} FROM batch_summary b "
            f"LEFT JOIN {counts} bc ON bc.batch_id = b.id")


def _batch(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: r.get(k) for k in BATCH_KEYS}
    for k in _TIMES:
        out[k] = iso(r.get(k))
    out["request_counts"] = {"total": r.get("request_total"), "completed": r.get("request_completed"),
                             "failed": r.get("request_failed")}
    out["lines"], out["answered"], out["failed"] = int(r["lines"]), int(r["answered"]), int(r["failed"])
    out["turnaround_seconds"] = r.get("turnaround_s")
    fig = batch_rule.figures(r)
    out["model"] = fig["model"]
    out["cost_usd"] = None if fig["cost_usd"] is None else round(float(fig["cost_usd"]), 10)
    return out


def batches(db: Database, status: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    """One dict per batch (keys :data:`BATCH_KEYS`), newest first."""
    where, params = [], []
    if status:
        where.append("b.status = ?")
        params.append(status)
    if since:
        where.append("COALESCE(b.created_at, b.first_seen_at) >= ?")
        params.append(ts(db, since))
    sql = _batch_sql(db) + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY COALESCE(b.created_at, b.first_seen_at) DESC, b.id"
    return [_batch(r) for r in rows(db, sql, tuple(params))]


def batch(db: Database, batch_id: str) -> dict[str, Any]:
    """One batch: its summary plus status history, durations, errors by code and cost by model."""
    found = rows(db, _batch_sql(db) + " WHERE b.id = ?", (batch_id,))
    if not found:
        raise NotFound(f"no batch {batch_id!r} in this database")
    r = found[0]
    out = _batch(r)
    out["metadata"] = json_value(r.get("metadata"))
    out["key_fingerprint"] = r.get("key_fingerprint")
    out["problem"] = r.get("problem")  # (velvet sync: a file gone)
    out["durations"] = {"queue_seconds": r.get("queue_s"), "processing_seconds": r.get("processing_s"),
                        "finalize_seconds": r.get("finalize_s"), "turnaround_seconds": r.get("turnaround_s")}
    out["usage"] = {k: r.get(k) for k in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
                                          "total_tokens")}
    out["usage"]["cost_usd"] = r.get("usage_cost_usd")
    out["events"] = [{"status": e["status"], "previous_status": e["previous_status"],
                      "observed_at": iso(e["observed_at"]), "api_at": iso(e["api_at"]), "source": e["source"]}
                     for e in rows(db, "SELECT * FROM batch_events WHERE batch_id = ? "
                                        "ORDER BY observed_at, id", (batch_id,))]
    files = rows(db, "SELECT id, role, filename, bytes, lines, bad_lines, complete, problem FROM files "
                      "WHERE id IN (?, ?, ?)", (r.get("input_file_id") or "", r.get("output_file_id") or "",
                                                 r.get("error_file_id") or ""))
    out["files"] = [{**f, "complete": None if f["complete"] is None else bool(f["complete"])} for f in files]
    out["errors"] = batch_errors(db, batch_id)
    out["cost_by_model"] = [
        {"model": m["model"], "lines": int(m["n"]), "input_tokens": to_int(m["inp"]),
         "output_tokens": to_int(m["outp"]),
         "cost_usd": None if m["cost"] is None else round(float(m["cost"]), 10)}
        # the request's model only where the answer has none, looked up by id: a join made PostgreSQL
        # hash every input line of every batch
        for m in rows(db, "SELECT model, count(*) AS n, sum(inp) AS inp, sum(outp) AS outp, sum(cost) AS cost "
                           "FROM (SELECT COALESCE(x.model, (SELECT r.model FROM batch_requests r "
                           "WHERE r.id = x.request_row_id)) AS model, x.input_tokens AS inp, "
                           "x.output_tokens AS outp, x.cost_usd AS cost FROM batch_results x "
                           "WHERE x.batch_id = ? AND NOT x.failed) q GROUP BY model "
                           "ORDER BY cost DESC", (batch_id,))]
    return out



def batch_errors(db: Database, batch_id: str) -> list[dict[str, Any]]:
    """Failed lines and batch-level (validation) errors, grouped by code, with a count and an example."""
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    for e in rows(db, "SELECT code, message, line FROM batch_errors WHERE batch_id = ? ORDER BY line, id",
                   (batch_id,)):
        g = groups.setdefault(("batch", e["code"]), {"source": "batch", "code": e["code"], "count": 0,
                                                     "example": {"line": e["line"], "message": e["message"]}})
        g["count"] += 1
    for e in rows(db, "SELECT x.error_code, x.error_message, x.custom_id, r.line_no FROM batch_results x "
                       "LEFT JOIN batch_requests r ON r.id = x.request_row_id "
                       "WHERE x.batch_id = ? AND x.failed ORDER BY r.line_no IS NULL, r.line_no, x.line_no",
                   (batch_id,)):
        g = groups.setdefault(("line", e["error_code"]), {
            "source": "line", "code": e["error_code"], "count": 0,
            "example": {"custom_id": e["custom_id"], "line": e["line_no"], "message": e["error_message"]}})
        g["count"] += 1
    for e in rows(db, "SELECT problem, custom_id, line_no FROM batch_requests WHERE batch_id = ? "
                       "AND problem IS NOT NULL ORDER BY line_no", (batch_id,)):
        g = groups.setdefault(("input", e["problem"]), {
            "source": "input", "code": "malformed_line", "count": 0,
            "example": {"custom_id": e["custom_id"], "line": e["line_no"], "message": e["problem"]}})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def lines(db: Database, batch_id: str, failed: bool = False, custom_id: str | None = None) -> list[dict[str, Any]]:
    """A batch's input lines with their answers (and answers whose input line was never logged)."""
    if not rows(db, "SELECT id FROM batches WHERE id = ? UNION SELECT batch_id FROM batch_requests "
                     "WHERE batch_id = ?", (batch_id, batch_id)):
        raise NotFound(f"no batch {batch_id!r} in this database")
    return [_line(r) for r in _stream_lines(db, _lines_sql(batch_id, failed, custom_id, bodies=False))]


_LINE_COLS = (  # (from a request and its answer, from an answer whose request was not logged)
    ("r.batch_id", "x.batch_id"), ("r.line_no", "NULL"), ("r.custom_id", "x.custom_id"),
    ("r.model AS model_requested", "NULL"), ("r.url", "NULL"), ("r.problem AS request_problem", "NULL"),
    ("x.model", "x.model"), ("x.status_code", "x.status_code"), ("x.failed", "x.failed"),
    ("x.error_code", "x.error_code"), ("x.error_message", "x.error_message"), ("x.request_id", "x.request_id"),
    ("x.input_tokens", "x.input_tokens"), ("x.output_tokens", "x.output_tokens"), ("x.cost_usd", "x.cost_usd"),
    ("x.problem AS result_problem", "COALESCE(x.problem, 'input line not logged')"))
_BODY_COLS = (("r.body AS request_body", "NULL"), ("x.body AS response_body", "x.body"))


def _unlogged(cols: tuple[tuple[str, str], ...]) -> str:
    """The columns of an answer whose input line was not logged, named as those of a line with its answer."""
    return ", ".join(f"{c[1]} AS {c[0].split(' AS ')[-1].split('.')[-1]}" for c in cols)


def _lines_sql(batch_id: str | None, failed: bool = False, custom_id: str | None = None,
               bodies: bool = True) -> list[tuple[str, tuple]]:
    """Queries for one batch's lines (``batch_id`` None: the lines bound to no batch), to run in turn.

    First the input lines with their answers, in line order, read through the input file's
    ``(file_id, line_no)`` index (no sort, which would spill to disk with the bodies); then the answers
    whose input line was not logged, by custom_id.
    """
    cols = _LINE_COLS + (_BODY_COLS if bodies else ())
    if batch_id is not None:
        req = ["r.file_id = (SELECT input_file_id FROM batches WHERE id = ?)", "r.batch_id = ?"]
        res, params = ["x.batch_id = ?", "x.request_row_id IS NULL"], [batch_id]
    else:
        req, res, params = ["r.batch_id IS NULL"], ["x.batch_id IS NULL", "x.request_row_id IS NULL"], []
    if failed:
        req.append("(x.failed OR r.problem IS NOT NULL)")
        res.append("x.failed")
    if custom_id is not None:
        req.append("r.custom_id = ?")
        res.append("x.custom_id = ?")
        params.append(custom_id)
    if failed and batch_id is not None:
        # from the failed answers (an index of its own) and the lines with a problem, not from every line: on a
        # partitioned database each line's answer is looked up in every partition (112 ms against 11 ms, 60,000
        # lines in 35 daily partitions, before this)
        names = ", ".join(c[0] for c in cols)
        also = " AND r.custom_id = ?" if custom_id is not None else ""
        return [(f"SELECT * FROM (SELECT {names} FROM batch_results x JOIN batch_requests r ON r.id = "
                 f"x.request_row_id WHERE x.batch_id = ? AND x.failed{also} UNION ALL SELECT {names} FROM "
                 f"batch_requests r LEFT JOIN batch_results x ON x.request_row_id = r.id WHERE r.batch_id = ? AND "
                 f"r.problem IS NOT NULL AND x.failed IS NOT TRUE{also}) q ORDER BY line_no",
                 tuple(params * 2)),
                (f"SELECT {_unlogged(cols)} FROM batch_results x WHERE {' AND '.join(res)} "
                 "ORDER BY x.custom_id", tuple(params))]
    return [(f"SELECT {', '.join(c[0] for c in cols)} FROM batch_requests r "
             f"LEFT JOIN batch_results x ON x.request_row_id = r.id WHERE {' AND '.join(req)} ORDER BY r.line_no",
             tuple(params[:1] + params)),
            (f"SELECT {_unlogged(cols)} FROM batch_results x WHERE {' AND '.join(res)} "
             "ORDER BY x.custom_id", tuple(params))]


def _stream_lines(db: Database, queries: list[tuple[str, tuple]]) -> Iterator[dict[str, Any]]:
    for sql, params in queries:
        yield from stream_rows(db, sql, params)


def _count_lines(db: Database, queries: list[tuple[str, tuple]]) -> int:
    return sum(int(rows(db, f"SELECT count(*) AS n FROM ({sql}) c", params)[0]["n"]) for sql, params in queries)


def _line(r: dict[str, Any]) -> dict[str, Any]:
    problems = "; ".join(p for p in (r["request_problem"], r["result_problem"]) if p) or None
    return {"line": r["line_no"], "custom_id": r["custom_id"], "status_code": r["status_code"],
            "failed": None if r["failed"] is None else bool(r["failed"]), "error_code": r["error_code"],
            "error_message": r["error_message"], "model": r["model"] or r["model_requested"],
            "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"], "cost_usd": r["cost_usd"],
            "problem": problems}


def batch_line(db: Database, batch_id: str, custom_id: str) -> dict[str, Any]:
    """One batch line with the exact request and answer."""
    found = next(_stream_lines(db, _lines_sql(batch_id, custom_id=custom_id)), None)
    if found is None:
        raise NotFound(f"no line with custom_id {custom_id!r} in batch {batch_id!r}")
    r = found
    pruned = rows(db, "SELECT pruned, pruned_at FROM batches WHERE id = ?", (batch_id,)) \
        if has_column(db, "batches", "pruned") else []
    return {"batch_id": batch_id, **_line(r), "url": r["url"], "request_id": r["request_id"],
            "request": json_value(r["request_body"]), "response": json_value(r["response_body"]),
            "pruned_at": iso(pruned[0]["pruned_at"]) if pruned and pruned[0]["pruned"] else None}


# -- live calls ------------------------------------------------------------------------------------

CALL_KEYS = ("id", "started_at", "endpoint", "action", "model", "status_code", "stream", "complete", "latency_ms",
             "ttft_ms", "input_tokens", "output_tokens", "cost_usd", "usage_estimated", "request_id", "error_code",
             "problem")


def _call(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in CALL_KEYS}
    out["started_at"] = iso(r["started_at"])
    out["model"] = r.get("model") or r.get("model_requested")
    out["stream"], out["complete"] = bool(r["stream"]), bool(r["complete"])
    out["usage_estimated"] = bool(r.get("usage_estimated"))
    out["error_code"] = r.get("error_code") or r.get("error_type")
    return out


def calls(db: Database, model: str | None = None, status: str | None = None, since: datetime | None = None,
          endpoint: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Live calls, newest first. ``status`` is a code (``429``), a class (``4xx``) or ``error``."""
    where, params = calls_where(db, model=model, status=status, since=since, endpoint=endpoint)
    sql = "SELECT * FROM calls" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY started_at DESC, id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    return [_call(r) for r in rows(db, sql, tuple(params))]


def calls_where(db: Database, model: str | None = None, status: str | None = None, since: datetime | None = None,
                endpoint: str | None = None) -> tuple[list[str], list[Any]]:
    """The conditions (``?`` placeholders) and parameters of the ``velvet calls`` filters."""
    where: list[str] = []
    params: list[Any] = []
    if model:
        where.append("(model = ? OR model_requested = ?)")
        params += [model, model]
    if endpoint:
        where.append("endpoint = ?")
        params.append(endpoint)
    if status:
        s = status.strip().lower()
        if s == "error":
            where.append("(status_code IS NULL OR status_code >= 400)")
        elif re.fullmatch(r"[1-5]xx", s):
            where.append("status_code >= ? AND status_code < ?")
            params += [int(s[0]) * 100, int(s[0]) * 100 + 100]
        elif s.isdigit():
            where.append("status_code = ?")
            params.append(int(s))
        else:
            raise ValueError(f"--status {status!r}: use a code (429), a class (4xx) or 'error'")
    if since:
        where.append("started_at >= ?")
        params.append(ts(db, since))
    return where, params


def call_url(r: dict[str, Any]) -> str:
    """A call's URL as it was sent: its scheme, and its port unless the scheme's own (rows from before
    schema v12 have neither: https, as velvet assumed then)."""
    scheme = r.get("scheme") or "https"
    port = r.get("port")
    shown = "" if port is None or port == {"https": 443, "http": 80}.get(scheme) else f":{port}"
    return f"{scheme}://{r['host']}{shown}{r['path']}"


def call(db: Database, ref: str) -> dict[str, Any]:
    """One call by its row id, flow id or ``x-request-id``, with the exact request and answer."""
    found = rows(db, "SELECT * FROM calls WHERE request_id = ? OR flow_id = ?", (ref, ref))
    if not found and ref.isdigit():
        found = rows(db, "SELECT * FROM calls WHERE id = ?", (int(ref),))
    if not found:
        raise NotFound(f"no call with id or x-request-id {ref!r} in this database")
    r = found[0]
    out = _call(r)
    out.update(method=r["method"], url=call_url(r), flow_id=r["flow_id"],
               key_fingerprint=r["key_fingerprint"], tags=json_value(r["tags"]), finish_reason=r["finish_reason"],
               error_message=r["error_message"], response_text=r["response_text"],
               request=json_value(r["request_body"]), response=json_value(r["response_body"]),
               pruned_at=iso(r.get("pruned_at")))
    return out


# -- stats -----------------------------------------------------------------------------------------

GROUPS = config.STATS_GROUPS


def _group_value(by: str, r: dict[str, Any], when: str) -> str:
    if by == "day":
        dt = to_dt(r[when])
        return dt.date().isoformat() if dt else "(unknown)"
    col = {"model": "model", "endpoint": "endpoint", "key": "key_fingerprint"}[by]
    return r.get(col) or {"model": "(no model)", "endpoint": "(none)", "key": "(no key)"}[by]


def _estimated(db: Database) -> str:
    """The ``usage_estimated`` column, or false on a database the proxy has not migrated yet (the CLI opens
    databases read-only, without migrating them)."""
    has = has_column(db, "calls", "usage_estimated")
    return "usage_estimated" if has else "FALSE AS usage_estimated"


EXACT_CALLS = 20_000
"""Up to this many calls in the window, ``stats`` reads the calls themselves (exact percentiles); beyond,
the hourly and daily rollups (percentiles from histograms, within 1 %)."""


def stats(db: Database, by: str = "model", since: datetime | None = None) -> dict[str, Any]:
    """Live calls and batches grouped ``by`` model, endpoint, day or key."""
    if by not in GROUPS:
        raise ValueError(f"--by {by!r}: use one of {', '.join(GROUPS)}")
    bw, params = "", ()  # type: tuple[str, tuple[Any, ...]]
    if since:
        bw, params = " WHERE COALESCE(created_at, first_seen_at) >= ?", (ts(db, since),)
    out_live = _live_from_rollups(db, by, since) if rollups_cover(db, since) else _live_from_calls(db, by, since)
    bat: dict[str, dict[str, Any]] = defaultdict(lambda: {"batches": 0, "lines": 0, "failed_lines": 0,
                                                          "input_tokens": 0, "output_tokens": 0,
                                                          "cost_usd": 0.0, "_turn": []})
    for r in stream_rows(db, f"SELECT * FROM ({_batch_sql(db)}{bw}) s", params):
        b = _batch(r)
        fig = batch_rule.figures(r)
        g = bat[_group_value(by, {**r, "model": fig["model"]},
                             "created_at" if r["created_at"] else "first_seen_at")]
        g["batches"] += 1
        g["lines"] += b["lines"]
        g["failed_lines"] += b["failed"]
        g["input_tokens"] += fig["input_tokens"] or 0
        g["output_tokens"] += fig["output_tokens"] or 0
        g["cost_usd"] += b["cost_usd"] or 0.0
        if r["turnaround_s"] is not None and r["status"] == "completed":
            g["_turn"].append(r["turnaround_s"])
    out_batch = []
    for key, g in sorted(bat.items()):
        turn = g.pop("_turn")
        out_batch.append({by: key, **g, "cost_usd": round(g["cost_usd"], 10),
                          "turnaround_p50_seconds": percentile(turn, 50),
                          "turnaround_p95_seconds": percentile(turn, 95)})
    totals = {k: sum(g[k] for g in out_live) for k in ("calls", "errors", "input_tokens", "output_tokens",
                                                         "estimated_calls")}
    totals["cost_usd"] = round(sum(g["cost_usd"] for g in out_live), 10)
    totals["cache_hits"], totals["saved_usd"] = cache_store.hit_totals(db, since)
    return {"by": by, "since": iso(since), "calls": out_live, "batches": out_batch, "totals": totals}


def _live_from_calls(db: Database, by: str, since: datetime | None) -> list[dict[str, Any]]:
    cw, params = "", ()  # type: tuple[str, tuple[Any, ...]]
    if since:
        cw, params = " WHERE started_at >= ?", (ts(db, since),)
    live: dict[str, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "errors": 0, "input_tokens": 0,
                                                           "output_tokens": 0, "cost_usd": 0.0,
                                                           "estimated_calls": 0, "_lat": [], "_ttft": []})
    for r in stream_rows(db, "SELECT COALESCE(model, model_requested) AS model, endpoint, key_fingerprint, "
                             "started_at, status_code, complete, latency_ms, ttft_ms, input_tokens, "
                             f"output_tokens, {_estimated(db)}, "
                             f"cost_usd FROM calls{cw}", params):
        g = live[_group_value(by, r, "started_at")]
        g["calls"] += 1
        g["errors"] += r["status_code"] is None or r["status_code"] >= 400 or not r["complete"]
        g["input_tokens"] += r["input_tokens"] or 0
        g["output_tokens"] += r["output_tokens"] or 0
        g["cost_usd"] += r["cost_usd"] or 0.0
        g["estimated_calls"] += bool(r["usage_estimated"])
        if r["latency_ms"] is not None:
            g["_lat"].append(r["latency_ms"])
        if r["ttft_ms"] is not None:
            g["_ttft"].append(r["ttft_ms"])
    out_live = []
    for key, g in sorted(live.items()):
        lat, ttft = g.pop("_lat"), g.pop("_ttft")
        out_live.append({by: key, **g, "cost_usd": round(g["cost_usd"], 10),
                         "error_rate": round(g["errors"] / g["calls"], 4),
                         "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
                         "ttft_p50_ms": percentile(ttft, 50)})
    return out_live


def _day(v: Any) -> datetime:
    return (to_dt(v) or datetime.min).replace(hour=0, minute=0, second=0, microsecond=0)


def rollups_cover(db: Database, since: datetime | None) -> bool:
    """Whether to read the rollups: they exist, and the window holds more than :data:`EXACT_CALLS` calls or
    calls pruned (``velvet prune``: only the rollups still count them)."""
    if not has_table(db, "call_rollups"):  # a database an older velvet still writes to, not migrated yet
        return False
    pruned = rows(db, "SELECT value FROM velvet_meta WHERE key = ?", (rollups.PRUNED_BEFORE,))
    if pruned and (since is None or since < clock.parse(pruned[0]["value"])):  # type: ignore[operator]
        return True
    sql, params = "SELECT COALESCE(sum(calls), 0) AS n FROM call_rollups WHERE hours = 24", ()  # type: tuple[str, tuple]
    if since is not None:
        sql, params = sql + " AND period >= ?", (ts(db, _day(since)),)
    return int(rows(db, sql, params)[0]["n"]) > EXACT_CALLS


_ROLLUP_COLS = ("SELECT period, model, endpoint, key_fingerprint, calls, errors, input_tokens, output_tokens, "
                "cost_usd, latency_hist, ttft_hist FROM call_rollups")


def _live_from_rollups(db: Database, by: str, since: datetime | None) -> list[dict[str, Any]]:
    """Whole days from the daily rollups, whole hours of the first day from the hourly ones, and the calls
    of the first, partial hour themselves."""
    groups: dict[str, rollups.Sums] = defaultdict(rollups.Sums)
    dim = {"model": "model", "endpoint": "endpoint", "key": "key_fingerprint"}.get(by)
    none = {"model": "(no model)", "endpoint": "(none)", "key": "(no key)"}.get(by, "")
    if since is None:
        periods = rows(db, _ROLLUP_COLS + " WHERE hours = 24")
    else:
        hour = since.replace(minute=0, second=0, microsecond=0)
        hour += timedelta(hours=1) if hour < since else timedelta()
        day = _day(hour)
        day += timedelta(days=1) if day < hour else timedelta()
        periods = rows(db, _ROLLUP_COLS + " WHERE hours = 24 AND period >= ?", (ts(db, day),))
        periods += rows(db, _ROLLUP_COLS + " WHERE hours = 1 AND period >= ? AND period < ?",
                      (ts(db, hour), ts(db, day)))
        cols = ", ".join(rollups.CALL_COLUMNS)
        for r in stream_rows(db, f"SELECT {cols} FROM calls WHERE started_at >= ? AND started_at < ?",
                             (ts(db, since), ts(db, hour))):
            key = to_dt(r["started_at"]).date().isoformat() if by == "day" else (  # type: ignore[union-attr]
                (r["model"] or r["model_requested"]) if by == "model" else r[dim]) or none  # type: ignore[index]
            groups[key].add_call(r["status_code"], r["complete"], r["latency_ms"], r["ttft_ms"],
                                 r["input_tokens"], r["output_tokens"], r["cost_usd"])
    estimated: dict[str, int] = defaultdict(int)  # (not in the rollups: few calls, read through an index)
    where, params = ("", ()) if since is None else (" AND started_at >= ?", (ts(db, since),))
    if has_column(db, "calls", "usage_estimated"):
        for r in stream_rows(db, "SELECT COALESCE(model, model_requested) AS model, endpoint, key_fingerprint, "
                                 f"started_at FROM calls WHERE usage_estimated{where}", params):
            estimated[_group_value(by, r, "started_at")] += 1
    for r in periods:
        key = _day(r["period"]).date().isoformat() if by == "day" else r[dim] or none  # type: ignore[index]
        g = groups[key]
        g.calls += int(r["calls"])
        g.errors += int(r["errors"])
        g.input_tokens += int(r["input_tokens"])
        g.output_tokens += int(r["output_tokens"])
        g.cost += float(r["cost_usd"])
        rollups.merge(g.latency, rollups.load_hist(r["latency_hist"]))
        rollups.merge(g.ttft, rollups.load_hist(r["ttft_hist"]))
    return [{by: key, "calls": g.calls, "errors": g.errors, "input_tokens": g.input_tokens,
             "output_tokens": g.output_tokens, "cost_usd": round(g.cost, 10), "estimated_calls": estimated[key],
             "error_rate": round(g.errors / g.calls, 4),
             "latency_p50_ms": rollups.hist_percentile(g.latency, 50),
             "latency_p95_ms": rollups.hist_percentile(g.latency, 95),
             "ttft_p50_ms": rollups.hist_percentile(g.ttft, 50)}
            for key, g in sorted(groups.items()) if g.calls]


# -- export ----------------------------------------------------------------------------------------

def export_rows(db: Database, batch_id: str | None = None, lines_of_batches: bool = False,
                since: datetime | None = None) -> tuple[int, Iterator[dict[str, Any]]]:
    """(row count, row iterator) for ``velvet export``: a batch's lines, all batch lines, or live calls."""
    if batch_id is not None or lines_of_batches:
        if batch_id is not None and not rows(db, "SELECT id FROM batches WHERE id = ?", (batch_id,)):
            raise NotFound(f"no batch {batch_id!r} in this database")
        if batch_id is not None:
            ids: list[str | None] = [batch_id]
            if since is not None and not rows(db, "SELECT id FROM batches WHERE id = ? AND COALESCE(created_at, "
                                               "first_seen_at) >= ?", (batch_id, ts(db, since))):
                ids = []
        else:  # batch by batch, each through its indexes: one sorted union would sort every line first
            where, params = ("", ()) if since is None else (
                " WHERE COALESCE(created_at, first_seen_at) >= ?", (ts(db, since),))
            ids = [r["id"] for r in rows(db, f"SELECT id FROM batches{where} ORDER BY id", params)]
            if since is None:  # and the lines bound to no batch, where the database sorts NULL
                ids = [*ids, None] if isinstance(db, PostgresqlDatabase) else [None, *ids]
        total = sum(_count_lines(db, _lines_sql(b, bodies=False)) for b in ids)
        return total, (_export_line(r) for b in ids for r in _stream_lines(db, _lines_sql(b)))
    where, params = ("", ()) if since is None else (" WHERE started_at >= ?", (ts(db, since),))
    total = rows(db, f"SELECT count(*) AS n FROM calls{where}", params)[0]["n"]
    cols = [d[0] for d in db.execute_sql("SELECT * FROM calls LIMIT 0").description]
    pg = isinstance(db, PostgresqlDatabase)
    # timestamps formatted by the database: in Python it was a third of the export's time
    fmt = ("to_char(\"{0}\", 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS \"{0}\"" if pg
           else "strftime('%Y-%m-%dT%H:%M:%SZ', \"{0}\") AS \"{0}\"")
    select = ", ".join(fmt.format(c) if c.endswith("_at") else f'"{c}"' for c in cols)
    found = stream_rows(db, f"SELECT {select} FROM calls{where} ORDER BY started_at, id", params)
    return int(total), found if pg else _export_calls(found)


def _export_line(r: dict[str, Any]) -> dict[str, Any]:
    return {"batch_id": r["batch_id"], **_line(r), "url": r["url"], "request_id": r["request_id"],
            "request_body": r["request_body"], "response_body": r["response_body"]}


def _export_calls(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for r in rows:  # SQLite's booleans are integers
        r["stream"], r["complete"] = bool(r["stream"]), bool(r["complete"])
        yield r
