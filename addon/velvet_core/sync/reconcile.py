"""``velvet reconcile``: each UTC day and model of OpenAI's Usage API (completions, batch and not) against what
velvet logged — for batches, the answered result lines of batches that completed that day; for live traffic, the
answered calls (not the cache's) started that day — and which rows differ beyond 1 %."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from peewee import Database

from velvet_core.api.client import Client
from velvet_core.storage.sql import has_table, is_pg, rows, ts

TOLERANCE = 0.01
LIVE_ENDPOINTS = ("chat.completions", "completions", "responses")  # what the completions usage counts
FIGURES = ("requests", "input_tokens", "output_tokens")


def _day(v: Any) -> str:
    return datetime.fromtimestamp(int(v), UTC).strftime("%Y-%m-%d")


def buckets(client: Client, start: datetime, batch: bool, group_by: str = "model") -> Iterator[dict[str, Any]]:
    """Every result of the Usage API's daily buckets from ``start`` (naive UTC), page by page."""
    page: str | None = None
    t0 = int(start.replace(tzinfo=UTC).timestamp())
    while True:
        got = client.ok("GET", f"/organization/usage/completions?start_time={t0}&bucket_width=1d&limit=31"
                               f"&group_by={group_by}&batch={'true' if batch else 'false'}"
                               + (f"&page={page}" if page else ""))
        for bucket in got.get("data") or []:
            for r in bucket.get("results") or []:
                yield {**r, "day": _day(bucket["start_time"])}
        if not got.get("has_more") or not got.get("next_page"):
            return
        page = got["next_page"]


def logged(db: Database | None, start: datetime) -> dict[tuple[str, str, bool], dict[str, int]]:
    """(day, model, batch) -> requests and tokens, as velvet logged them (nothing without a database)."""
    if db is None or not has_table(db, "calls"):
        return {}
    def day(col: str) -> str:
        return f"to_char({col}, 'YYYY-MM-DD')" if is_pg(db) else f"substr({col}, 1, 10)"

    out: dict[tuple[str, str, bool], dict[str, int]] = {}
    marks = ", ".join("?" * len(LIVE_ENDPOINTS))
    live = rows(db, f"""SELECT {day('started_at')} AS day, COALESCE(model, model_requested, '') AS model,
            COUNT(*) AS requests, SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens
        FROM calls WHERE started_at >= ? AND status_code >= 200 AND status_code < 300 AND NOT cache_hit
            AND endpoint IN ({marks}) GROUP BY 1, 2""", (ts(db, start), *LIVE_ENDPOINTS))
    lines = rows(db, f"""SELECT {day('b.completed_at')} AS day, COALESCE(r.model, '') AS model,
            COUNT(*) AS requests, SUM(r.input_tokens) AS input_tokens, SUM(r.output_tokens) AS output_tokens
        FROM batch_results r JOIN batches b ON b.id = r.batch_id
        WHERE b.completed_at >= ? AND b.status = 'completed' AND NOT r.failed GROUP BY 1, 2""", (ts(db, start),))
    for batch, got in ((False, live), (True, lines)):
        for r in got:
            out[(r["day"], r["model"], batch)] = {k: int(r[k] or 0) for k in FIGURES}
    return out


def differs(a: int, b: int) -> bool:
    return abs(a - b) > TOLERANCE * max(abs(a), abs(b)) if a or b else False


def reconcile(db: Database | None, client: Client, since: datetime) -> dict[str, Any]:
    """The ``--json`` document, ``{"since", "rows", "complete"}``, with ``advice`` for people."""
    start = since.replace(hour=0, minute=0, second=0, microsecond=0)
    api: dict[tuple[str, str, bool], dict[str, int]] = {}
    for batch in (True, False):
        for r in buckets(client, start, batch):
            key = (r["day"], str(r.get("model") or ""), batch)
            got = api.setdefault(key, dict.fromkeys(FIGURES, 0))
            got["requests"] += int(r.get("num_model_requests") or 0)
            got["input_tokens"] += int(r.get("input_tokens") or 0)
            got["output_tokens"] += int(r.get("output_tokens") or 0)
    mine = logged(db, start)
    out = []
    for key in sorted(api.keys() | mine.keys(), key=lambda k: (k[0], not k[2], k[1])):
        a, m = api.get(key, dict.fromkeys(FIGURES, 0)), mine.get(key, dict.fromkeys(FIGURES, 0))
        if not any(a.values()) and not any(m.values()):
            continue
        out.append({"day": key[0], "model": key[1], "batch": key[2],
                    "api_requests": a["requests"], "logged_requests": m["requests"],
                    "api_input_tokens": a["input_tokens"], "logged_input_tokens": m["input_tokens"],
                    "api_output_tokens": a["output_tokens"], "logged_output_tokens": m["output_tokens"]})
    bad = [r for r in out if row_differs(r)]
    return {"since": start.strftime("%Y-%m-%d"), "rows": out, "complete": not bad, "advice": advice(client, bad)}


def row_differs(r: dict[str, Any]) -> bool:
    return any(differs(r[f"api_{f}"], r[f"logged_{f}"]) for f in FIGURES)


def advice(client: Client, bad: list[dict[str, Any]]) -> list[str]:
    """What to do about the rows that differ."""
    out = []
    batch_days = sorted({r["day"] for r in bad if r["batch"]})
    if batch_days:
        out.append(f"batches: run velvet sync --since {batch_days[0]} (batches of {', '.join(batch_days)} are "
                   "missing from the logs, or their output was never downloaded)")
    live_days = sorted({r["day"] for r in bad if not r["batch"]})
    if live_days:
        start = datetime.strptime(live_days[0], "%Y-%m-%d")
        keys: dict[str, int] = {}
        try:
            for r in buckets(client, start, False, "api_key_id,project_id"):
                if r["day"] in live_days:
                    who = f"key {r.get('api_key_id') or '?'} (project {r.get('project_id') or '?'})"
                    keys[who] = keys.get(who, 0) + int(r.get("num_model_requests") or 0)
        except Exception:  # (advice only)
            keys = {}
        listed = ", ".join(f"{k}: {n:,} requests" for k, n in sorted(keys.items(), key=lambda x: -x[1])[:5])
        out.append(f"live calls on {', '.join(live_days)}: the API counted calls velvet did not log; point the "
                   "apps using these keys or projects at the proxy" + (f" — {listed}" if listed else ""))
    return out
