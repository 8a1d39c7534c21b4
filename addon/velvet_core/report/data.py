"""The report's figures for a period, as JSON-ready values: one pass over calls, batches and their lines.

Everything is aggregated here (per hour or day, per model, per tag); the charts only draw it, so a
database of 10,000 batches and many more calls reads in seconds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
from peewee import Database

from velvet_core.alerts.history import listing
from velvet_core.cost.prices import Pricer
from velvet_core.experiments.compare import latest_comparisons
from velvet_core.parsing.extract import Tokens
from velvet_core.query import queries
from velvet_core.storage import batch_rule, cache_store, rollups
from velvet_core.storage.sql import adapt, has_table, iso, percentile, stream_rows, to_dt, ts

BAD = ("failed", "expired", "cancelled")
ENDED = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
TIMELINE_ROWS = 50  # the most recent batches (and every bad one, up to half of these) on the timeline
TOP = 10




def _hours(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else max(0.0, (b - a).total_seconds() / 3600)


def bucket_of(dt: datetime, daily: bool) -> datetime:
    return dt.replace(hour=0, minute=0, second=0, microsecond=0) if daily else dt.replace(minute=0, second=0,
                                                                                          microsecond=0)


def collect(db: Database, since: datetime, until: datetime,
            step: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every figure the report shows for calls started and batches created in [since, until)."""
    daily = until - since > timedelta(days=8)  # hourly points up to a week and a bit, daily beyond
    out: dict[str, Any] = {"since": iso(since), "until": iso(until), "bucket": "day" if daily else "hour"}
    step("reading live calls")
    spend: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"live_usd": 0.0, "batch_usd": 0.0,
                                                                          "batch_sync_usd": 0.0})
    keys: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "live_usd": 0.0, "batch_usd": 0.0})
    tags: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "batches": 0, "cost_usd": 0.0})
    read = _calls_from_rollups if queries.rollups_cover(db, since) else _calls
    out["traffic"], totals = read(db, since, until, daily, spend, keys, tags)
    step("reading batches")
    batches, lines = _batches(db, since, until)
    _batch_spend(batches, lines, spend, keys, tags)
    out["totals"] = {**totals, **_batch_totals(batches, lines, spend)}
    out["timeline"] = _timeline(batches, until)
    out["turnaround"] = _turnaround(batches)
    out["batch_failures"] = _failures(db, since, until, lines)
    days = sorted({d for d, _ in spend})
    out["spend_by_day"] = [{"day": d, "model": m, **{k: round(v, 10) for k, v in spend[(d, m)].items()}}
                           for d in days for m in sorted(m for dd, m in spend if dd == d)]
    out["cache_by_day"] = cache_store.hits_by_day(db, since, until)  # calls the response cache answered
    step("reading answer quality")
    from velvet_core.storage import scores as evals_summary

    out["evals"] = evals_summary.summary(db, since, until, previous=False)  # velvet_evals' scores
    out["evals_by_day"] = evals_summary.by_day(db, since, until)
    top_tags: list[dict[str, Any]] = [{"tag": t, **v, "cost_usd": round(v["cost_usd"], 10)}
                                      for t, v in tags.items()]
    out["top_tags"] = sorted(top_tags, key=lambda r: -r["cost_usd"])[:TOP]
    top_keys: list[dict[str, Any]] = [
        {"key_fingerprint": k, **v, "cost_usd": round(v["live_usd"] + v["batch_usd"], 10)}
        for k, v in keys.items()]
    out["top_keys"] = sorted(top_keys, key=lambda r: -r["cost_usd"])[:TOP]
    step("reading alerts")
    out["alerts"] = listing(db, since, until)[:200]
    out["comparisons"] = [c for c in latest_comparisons(db) if c["created_at"] and c["created_at"] >= iso(since)]
    return out


def _calls(db: Database, since: datetime, until: datetime, daily: bool,
           spend: dict[tuple[str, str], dict[str, float]], keys: dict[str, dict[str, float]],
           tags: dict[str, dict[str, float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    per: dict[datetime, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "errors": 0, "lat": [], "ttft": []})
    n = errors = 0
    cost = 0.0
    tokens_in = tokens_out = 0
    for r in stream_rows(db, adapt(db, "SELECT started_at, status_code, complete, latency_ms, ttft_ms, cost_usd, "
                                      "COALESCE(model, model_requested) AS model, key_fingerprint, tags, "
                                      "input_tokens, output_tokens FROM calls WHERE started_at >= ? "
                                      "AND started_at < ?"), (ts(db, since), ts(db, until))):
        started = to_dt(r["started_at"])
        assert started is not None
        p = per[bucket_of(started, daily)]
        p["calls"] += 1
        failed = r["status_code"] is None or r["status_code"] >= 400 or not r["complete"]
        p["errors"] += failed
        if not failed and r["latency_ms"] is not None:
            p["lat"].append(r["latency_ms"])
        if r["ttft_ms"] is not None:
            p["ttft"].append(r["ttft_ms"])
        n += 1
        errors += failed
        c = r["cost_usd"] or 0.0
        cost += c
        tokens_in += r["input_tokens"] or 0
        tokens_out += r["output_tokens"] or 0
        spend[(started.date().isoformat(), r["model"] or "(no model)")]["live_usd"] += c
        k = keys[r["key_fingerprint"] or "(no key)"]
        k["calls"] += 1
        k["live_usd"] += c
        for name in _tag_names(r["tags"]):
            tags[name]["calls"] += 1
            tags[name]["cost_usd"] += c
    points = []
    t = bucket_of(since, daily)
    while t < until:  # every bucket, empty ones too: a gap in traffic shows as a gap
        p = per.get(t) or {"calls": 0, "errors": 0, "lat": [], "ttft": []}
        points.append({"at": iso(t), "calls": p["calls"], "errors": p["errors"],
                       "error_rate": round(p["errors"] / p["calls"], 4) if p["calls"] else None,
                       "latency_p50_ms": percentile(p["lat"], 50), "latency_p95_ms": percentile(p["lat"], 95),
                       "ttft_p50_ms": percentile(p["ttft"], 50), "ttft_p95_ms": percentile(p["ttft"], 95)})
        t += timedelta(days=1) if daily else timedelta(hours=1)
    return {"points": points}, {"calls": n, "errors": errors, "error_rate": round(errors / n, 4) if n else None,
                                "live_usd": round(cost, 10), "input_tokens": tokens_in,
                                "output_tokens": tokens_out}


def _calls_from_rollups(db: Database, since: datetime, until: datetime, daily: bool,
                        spend: dict[tuple[str, str], dict[str, float]], keys: dict[str, dict[str, float]],
                        tags: dict[str, dict[str, float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`_calls` at scale: whole days from the daily rollups, whole hours from the hourly ones, the calls
    of the first, partial hour themselves; tags summed by the database over the tagged calls only.
    Percentiles come from the rollups' histograms (within 1 %, latency of every call with one)."""
    hour = since.replace(minute=0, second=0, microsecond=0)
    hour += timedelta(hours=1) if hour < since else timedelta()
    day = hour.replace(hour=0)
    day += timedelta(days=1) if day < hour else timedelta()
    if not daily:  # hourly points: hourly rollups all the way
        day = max(day, until)
    cols = ("SELECT hours, period, model, key_fingerprint, calls, errors, input_tokens, output_tokens, cost_usd, "
            "latency_hist, ttft_hist FROM call_rollups")
    parts = list(stream_rows(db, adapt(db, cols + " WHERE hours = 1 AND period >= ? AND period < ? AND "
                                             "period < ?"), (ts(db, hour), ts(db, day), ts(db, until))))
    if day < until:
        parts += stream_rows(db, adapt(db, cols + " WHERE hours = 24 AND period >= ? AND period < ?"),
                             (ts(db, day), ts(db, until)))
    head = rollups.accumulate(tuple(r[c] for c in rollups.CALL_COLUMNS) for r in stream_rows(
        db, adapt(db, f"SELECT {', '.join(rollups.CALL_COLUMNS)} FROM calls WHERE started_at >= ? "
                      "AND started_at < ?"), (ts(db, since), ts(db, min(hour, until)))))
    per: dict[datetime, rollups.Sums] = defaultdict(rollups.Sums)
    total = rollups.Sums()
    for (hours, period, model, _endpoint, key), sums in head.items():
        if hours == rollups.HOUR:
            parts.append({"period": period, "model": model, "key_fingerprint": key, "sums": sums})
    for r in parts:
        if "sums" in r:
            sums = r["sums"]
        else:
            sums = rollups.Sums()
            sums.calls, sums.errors = int(r["calls"]), int(r["errors"])
            sums.input_tokens, sums.output_tokens = int(r["input_tokens"]), int(r["output_tokens"])
            sums.cost = float(r["cost_usd"])
            sums.latency, sums.ttft = rollups.load_hist(r["latency_hist"]), rollups.load_hist(r["ttft_hist"])
        start = rollups.as_datetime(r["period"])
        per[bucket_of(start, daily)].add(sums)
        total.add(sums)
        spend[(start.date().isoformat(), r["model"] or "(no model)")]["live_usd"] += sums.cost
        k = keys[r["key_fingerprint"] or "(no key)"]
        k["calls"] += sums.calls
        k["live_usd"] += sums.cost
    for r in stream_rows(db, adapt(db, "SELECT tags, count(*) AS n, sum(cost_usd) AS cost FROM calls "
                                       "WHERE tags IS NOT NULL AND started_at >= ? AND started_at < ? "
                                       "GROUP BY tags"), (ts(db, since), ts(db, until))):
        for name in _tag_names(r["tags"]):
            tags[name]["calls"] += int(r["n"])
            tags[name]["cost_usd"] += float(r["cost"] or 0.0)
    points = []
    t = bucket_of(since, daily)
    while t < until:
        p = per.get(t) or rollups.Sums()
        points.append({"at": iso(t), "calls": p.calls, "errors": p.errors,
                       "error_rate": round(p.errors / p.calls, 4) if p.calls else None,
                       "latency_p50_ms": rollups.hist_percentile(p.latency, 50),
                       "latency_p95_ms": rollups.hist_percentile(p.latency, 95),
                       "ttft_p50_ms": rollups.hist_percentile(p.ttft, 50),
                       "ttft_p95_ms": rollups.hist_percentile(p.ttft, 95)})
        t += timedelta(days=1) if daily else timedelta(hours=1)
    n = total.calls
    return {"points": points}, {"calls": n, "errors": total.errors,
                                "error_rate": round(total.errors / n, 4) if n else None,
                                "live_usd": round(total.cost, 10), "input_tokens": total.input_tokens,
                                "output_tokens": total.output_tokens}


def _tag_names(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        tags = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    return [f"{k}={v}" for k, v in tags.items()] if isinstance(tags, dict) else []


def _batches(db: Database, since: datetime, until: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Batches created in the period, and their lines summed per batch and model."""
    created = "COALESCE(b.created_at, b.first_seen_at)"
    params = (ts(db, since), ts(db, until))
    batches = list(stream_rows(db, adapt(db, (
        f"SELECT b.id, b.status, {batch_rule.model_sql('b')} AS model, b.created_at, b.first_seen_at, "
        "b.in_progress_at, b.finalizing_at, "
        "b.completed_at, b.failed_at, b.expired_at, b.cancelled_at, b.turnaround_s, b.request_total, "
        "b.request_failed, b.input_tokens, b.cached_tokens, b.output_tokens, b.usage_cost_usd, "
        f"b.key_fingerprint, b.metadata FROM batches b WHERE {created} >= ? AND {created} < ? "
        f"ORDER BY {created}")), params))
    if has_table(db, "batch_counts"):  # the counters kept per batch: no line is read
        lines = list(stream_rows(db, adapt(db, (
            "SELECT c.batch_id, NULL AS model, c.results AS n, c.failed, c.cost_usd AS cost, "
            "c.input_tokens AS inp, b.cached_tokens AS cached, c.output_tokens AS outp FROM batch_counts c "
            f"JOIN batches b ON b.id = c.batch_id WHERE c.results > 0 AND {created} >= ? AND {created} < ?")),
            params))
    else:  # a database an older velvet still writes to, not migrated yet
        lines = _line_sums(db, params)
    model = {b["id"]: b["model"] for b in batches}
    for x in lines:  # a failed line names no model: it is its batch's (batch_rule)
        x["model"] = x["model"] or model.get(x["batch_id"])
    return batches, lines


def _line_sums(db: Database, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    created = "COALESCE(b.created_at, b.first_seen_at)"
    return list(stream_rows(db, adapt(db, (
        "SELECT x.batch_id, x.model, count(*) AS n, sum(CASE WHEN x.failed THEN 1 ELSE 0 END) AS failed, "
        # summed as double: PostgreSQL's REAL sum overflows at 3.4e38 (fuzzed costs crashed the report)
        "sum(CAST(x.cost_usd AS DOUBLE PRECISION)) AS cost, sum(x.input_tokens) AS inp, "
        "sum(x.cached_tokens) AS cached, sum(x.output_tokens) AS outp "
        "FROM batch_results x JOIN batches b ON b.id = x.batch_id "
        f"WHERE {created} >= ? AND {created} < ? GROUP BY x.batch_id, x.model")), params))


def _ended(b: dict[str, Any]) -> datetime | None:
    col = ENDED.get(b["status"])
    return to_dt(b[col]) if col else None


def _batch_spend(batches: list[dict[str, Any]], lines: list[dict[str, Any]],
                 spend: dict[tuple[str, str], dict[str, float]], keys: dict[str, dict[str, float]],
                 tags: dict[str, dict[str, float]]) -> None:
    """Batch cost by the day it ended (else was created) and model; what the same tokens cost live."""
    by_batch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in lines:
        by_batch[x["batch_id"]].append(x)
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for b in batches:
        when = _ended(b) or to_dt(b["created_at"]) or to_dt(b["first_seen_at"])
        assert when is not None
        day = when.date().isoformat()
        parts = [(x["model"] or b["model"] or "(no model)", x["cost"], x["inp"], x["cached"], x["outp"])
                 for x in by_batch.get(b["id"], []) if x["cost"] is not None]
        if not parts and b["usage_cost_usd"] is not None:  # output not downloaded: the API's usage figure
            parts = [(b["model"] or "(no model)", b["usage_cost_usd"], b["input_tokens"], b["cached_tokens"],
                      b["output_tokens"])]
        total = 0.0
        for model, cost, inp, cached, outp in parts:
            spend[(day, model)]["batch_usd"] += float(cost)
            t = tokens[(day, model)]
            t[0] += int(inp or 0)
            t[1] += int(cached or 0)
            t[2] += int(outp or 0)
            total += float(cost)
        k = keys[b["key_fingerprint"] or "(no key)"]
        k["batch_usd"] += total
        for t_name in _tag_names(b["metadata"]):
            tags[t_name]["batches"] += 1
            tags[t_name]["cost_usd"] += total
    pricer = Pricer()  # the same tokens at synchronous prices, priced once per day and model
    for (day, model), (inp, cached, outp) in tokens.items():
        sync = pricer.cost(model, Tokens(input=inp, cached=cached, output=outp))
        spend[(day, model)]["batch_sync_usd"] += spend[(day, model)]["batch_usd"] if sync is None else sync


def _batch_totals(batches: list[dict[str, Any]], lines: list[dict[str, Any]],
                  spend: dict[tuple[str, str], dict[str, float]]) -> dict[str, Any]:
    batch_usd = sum(v["batch_usd"] for v in spend.values())
    sync = sum(v["batch_sync_usd"] for v in spend.values())
    status = Counter(b["status"] for b in batches)
    return {"batches": len(batches), "batches_by_status": dict(sorted(status.items())),
            "batch_lines": sum(int(x["n"]) for x in lines),
            "batch_failed_lines": sum(int(x["failed"]) for x in lines),
            "batch_usd": round(batch_usd, 10), "batch_saved_usd": round(max(0.0, sync - batch_usd), 10)}


def _timeline(batches: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """Each batch's phases in hours since it was created, against its 24 h window: the most recent that
    failed, expired or were cancelled, the most recent still running, then the most recent completed."""
    bad = [b for b in batches if b["status"] in BAD][-(TIMELINE_ROWS * 3 // 10):]
    running = [b for b in batches if b["status"] not in ENDED][-(TIMELINE_ROWS // 10):]
    done = [b for b in batches if b["status"] == "completed"][-(TIMELINE_ROWS - len(bad) - len(running)):]
    rows = []
    for b in sorted(bad + running + done, key=lambda b: (str(b["created_at"] or b["first_seen_at"]), b["id"])):
        created = to_dt(b["created_at"]) or to_dt(b["first_seen_at"])
        ip, fin, end = to_dt(b["in_progress_at"]), to_dt(b["finalizing_at"]), _ended(b)
        stop = end or now
        phases = {"queue": _hours(created, ip or stop), "processing": _hours(ip, fin or stop) if ip else None,
                  "finalize": _hours(fin, stop) if fin else None}
        last = "finalize" if fin else "processing" if ip else "queue"
        rows.append({"id": b["id"], "model": b["model"], "status": b["status"], "created_at": iso(created),
                     **{f"{k}_hours": v for k, v in phases.items()}, "open": end is None,
                     "last_phase": last, "marked": b["status"] in BAD})
    return {"batches": len(batches), "shown": len(rows), "bad": sum(b["status"] in BAD for b in batches),
            "rows": rows}


def _turnaround(batches: list[dict[str, Any]]) -> dict[str, Any]:
    done = [b for b in batches if b["status"] == "completed" and b["turnaround_s"] is not None]
    by_model: dict[str, list[float]] = defaultdict(list)
    for b in done:
        by_model[b["model"] or "(no model)"].append(b["turnaround_s"] / 3600)
    hist = Counter(min(int(b["turnaround_s"] // 3600), 24) for b in done)
    return {"by_model": [{"model": m, "batches": len(v), "p50_hours": percentile(v, 50),
                          "p95_hours": percentile(v, 95)} for m, v in sorted(by_model.items())],
            "histogram": [{"hours": h, "batches": hist.get(h, 0)} for h in range(25)]}


def _failures(db: Database, since: datetime, until: datetime, lines: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for x in lines:
        per[x["model"] or "(no model)"][0] += int(x["n"])
        per[x["model"] or "(no model)"][1] += int(x["failed"])
    created = "COALESCE(b.created_at, b.first_seen_at)"
    params = (ts(db, since), ts(db, until))
    codes = list(stream_rows(db, adapt(db, (
        "SELECT x.error_code AS code, count(*) AS n, min(x.custom_id) AS example FROM batch_results x "
        f"JOIN batches b ON b.id = x.batch_id WHERE x.failed AND {created} >= ? AND {created} < ? "
        "GROUP BY x.error_code ORDER BY n DESC LIMIT 8")), params))
    top = []
    for c in codes:
        ex = list(stream_rows(db, adapt(db, (
            "SELECT x.batch_id, x.custom_id FROM batch_results x JOIN batches b ON b.id = x.batch_id "
            f"WHERE x.failed AND {created} >= ? AND {created} < ? AND "
            + ("x.error_code IS NULL" if c["code"] is None else "x.error_code = ?")
            + " ORDER BY x.batch_id LIMIT 3")), params + (() if c["code"] is None else (c["code"],))))
        top.append({"source": "line", "code": c["code"], "count": int(c["n"]),
                    "examples": [{"batch_id": e["batch_id"], "custom_id": e["custom_id"]} for e in ex]})
    for c in stream_rows(db, adapt(db, (
            "SELECT e.code, count(*) AS n, min(e.batch_id) AS batch_id FROM batch_errors e JOIN batches b "
            f"ON b.id = e.batch_id WHERE {created} >= ? AND {created} < ? GROUP BY e.code ORDER BY n DESC "
            "LIMIT 5")), params):
        top.append({"source": "batch", "code": c["code"], "count": int(c["n"]),
                    "examples": [{"batch_id": c["batch_id"], "custom_id": None}]})
    return {"by_model": [{"model": m, "lines": n, "failed": f, "failed_rate": round(f / n, 4) if n else None}
                         for m, (n, f) in sorted(per.items())],
            "top_errors": sorted(top, key=lambda t: -t["count"])}
