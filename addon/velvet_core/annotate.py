"""Short flow comments and mitmproxy emoji markers, so mitmweb's flow list tells the story at a glance."""

from __future__ import annotations

from typing import Any

from .classify import Route
from .humanize import count, money
from .store import Op

FAILED = ":x:"
UPLOAD = ":outbox_tray:"
DOWNLOAD = ":inbox_tray:"
POLL = ":hourglass_flowing_sand:"
DONE = ":white_check_mark:"
ENDED_BADLY = ":warning:"
MARKERS = frozenset({FAILED, UPLOAD, DOWNLOAD, POLL, DONE, ENDED_BADLY})

_SHORT = {"chat.completions": "chat", "completions": "completion", "responses": "responses",
          "embeddings": "embeddings", "moderations": "moderation"}


def marker(route: Route, status: int | None, complete: bool = True, batch_status: str | None = None) -> str | None:
    """The marker for a flow: failed calls, batch files (up and down) and batch polls."""
    if status is None or status >= 400 or not complete:
        return FAILED
    if (route.kind == "files" and route.action == "upload") or (route.kind == "uploads" and route.action in (
            "part", "complete")):
        return UPLOAD
    if route.kind == "files" and route.action == "content":
        return DOWNLOAD
    if route.kind == "batches":
        if batch_status == "completed":
            return DONE
        if batch_status in ("failed", "expired", "cancelling", "cancelled"):
            return ENDED_BADLY
        return POLL
    return None


def comment(route: Route, row: dict[str, Any], ops: list[Op], last_status: dict[str, str]) -> str:
    """A one-line description of a processed call (``last_status`` remembers batch statuses)."""
    status = row.get("status_code")
    if status is None:
        return f"{route.kind} {route.action} · {row.get('error_message') or 'no response'}"
    if status >= 400:
        what = row.get("error_code") or row.get("error_type") or ""
        return " · ".join(x for x in (_name(route, row), f"{status} {what}".strip()) if x)
    kinds = {k: p for k, p in reversed(ops)}
    if route.kind == "batches":
        rows = [p["row"] for k, p in ops if k == "batch"]
        if route.action == "list":
            for b in rows:
                last_status[b["id"]] = b["status"]
            return f"batch list · {len(rows)} batches"
        if rows:
            b = rows[0]
            prev = last_status.get(b["id"])
            last_status[b["id"]] = b["status"]
            moved = f"{prev} → {b['status']}" if prev and prev != b["status"] else b["status"]
            done = ""
            if b.get("request_total"):
                done = f" ({b.get('request_completed') or 0}/{b['request_total']} done"
                done += f", {b['request_failed']} failed)" if b.get("request_failed") else ")"
            return f"batch {b['id']}: {moved}{done}"
    if route.kind == "files":
        f = kinds.get("file") or {}
        fid = f.get("id") or route.object_id or ""
        if route.action == "upload" and "requests_done" in kinds:
            return _lines("batch input", f, fid)
        if route.action == "content" and "results_done" in kinds:
            label = "batch errors" if kinds["results_done"].get("all_failed") else "batch output"
            return _lines(label, f, fid)
        if route.action == "content" and "requests_done" in kinds:
            return _lines("batch input (downloaded)", f, fid)
        return " ".join(x for x in (f"file {route.action}", fid) if x)
    if route.kind == "uploads":
        if route.action == "part" and "part_done" in kinds:
            part = kinds["part_done"]
            return f"upload part · {count(part['lines'])} whole lines · {part['id']}"
        if route.action == "complete" and "upload_complete" in kinds:
            c = kinds["upload_complete"]
            fid = (c.get("file") or {}).get("id", "")
            return f"upload complete · {len(c['part_ids'])} parts · {fid}".rstrip(" ·")
        return f"upload {route.action} {route.object_id or ''}".rstrip()
    parts = [_name(route, row)]
    tokens = row.get("total_tokens") or (row.get("input_tokens") or 0) + (row.get("output_tokens") or 0)
    if tokens:
        parts.append(f"{count(tokens)} tok")
    if row.get("cost_usd") is not None:
        parts.append(money(row["cost_usd"]))
    if row.get("latency_ms") is not None:
        parts.append(f"{row['latency_ms']:,.0f} ms")
    if row.get("ttft_ms") is not None:
        parts.append(f"ttft {row['ttft_ms']:,.0f} ms")
    if not row.get("complete", True):
        parts.append("cut off")
    return " · ".join(parts)


def _name(route: Route, row: dict[str, Any]) -> str:
    model = row.get("model") or row.get("model_requested")
    name = _SHORT.get(route.kind, route.kind if route.kind != "other" else "api")
    if route.kind == "other":
        name = f"{name} {route.path}"
    return f"{name} {model}" if model else name


def _lines(label: str, f: dict[str, Any], fid: str) -> str:
    text = f"{label} · {count(f.get('lines') or 0)} lines"
    if f.get("bad_lines"):
        text += f" ({count(f['bad_lines'])} malformed)"
    return f"{text} · {fid}" if fid else text
