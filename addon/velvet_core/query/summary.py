"""The one-line summary of ``velvet.summary`` (mitmproxy command)."""

from __future__ import annotations

from velvet_core.humanize import money
from velvet_core.query import queries
from velvet_core.storage import database


def text(url: str) -> str:
    """Calls, tokens, cost and batches by status, in one line."""
    db = database.open_readonly(url)
    try:
        s = queries.stats(db, by="endpoint")
        by_status: dict[str, int] = {}
        for b in queries.batches(db):
            by_status[b["status"]] = by_status.get(b["status"], 0) + 1
    finally:
        db.close()
    calls = sum(g["calls"] for g in s["calls"])
    tokens = sum(g["input_tokens"] + g["output_tokens"] for g in s["calls"])
    cost = sum(g["cost_usd"] for g in s["calls"]) + sum(g["cost_usd"] for g in s["batches"])
    lines = sum(g["lines"] for g in s["batches"])
    statuses = ", ".join(f"{n} {st}" for st, n in sorted(by_status.items())) or "none"
    return (f"velvet: {calls:,} calls, {tokens:,} tokens; batches: {statuses}; {lines:,} batch lines; "
            f"cost {money(cost)}")
