"""Short flow comments, so mitmweb's flow list tells the story at a glance (computed in the writer thread)."""

from __future__ import annotations

from typing import Any

from velvet_core.humanize import count, money
from velvet_core.parsing.classify import Route
from velvet_core.storage.ops import BatchSeen, FileSeen, InputDone, Op, OutputDone, PartSeen, UploadCompleted

_SHORT = {"chat.completions": "chat", "completions": "completion", "responses": "responses",
          "embeddings": "embeddings", "moderations": "moderation"}


def comment(route: Route, row: dict[str, Any], ops: list[Op], last_status: dict[str, str]) -> str:
    """A one-line description of a processed call (``last_status`` remembers batch statuses)."""
    status = row.get("status_code")
    if status is None:
        return f"{route.kind} {route.action} · {row.get('error_message') or 'no response'}"
    if status >= 400:
        what = row.get("error_code") or row.get("error_type") or ""
        return " · ".join(x for x in (_name(route, row), f"{status} {what}".strip()) if x)
    if route.kind == "batches":
        rows = [op.row for op in ops if isinstance(op, BatchSeen)]
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
    first = {type(op): op for op in reversed(ops)}
    if route.kind == "files":
        f = seen.row if isinstance(seen := first.get(FileSeen), FileSeen) else {}
        fid = f.get("id") or route.object_id or ""
        out = first.get(OutputDone)
        if route.action == "upload" and InputDone in first:
            return _lines("batch input", f, fid)
        if route.action == "content" and isinstance(out, OutputDone):
            return _lines("batch errors" if out.all_failed else "batch output", f, fid)
        if route.action == "content" and InputDone in first:
            return _lines("batch input (downloaded)", f, fid)
        return " ".join(x for x in (f"file {route.action}", fid) if x)
    if route.kind == "uploads":
        if route.action == "part" and isinstance(part := first.get(PartSeen), PartSeen):
            return f"upload part · {count(part.lines)} whole lines · {part.id}"
        if route.action == "complete" and isinstance(c := first.get(UploadCompleted), UploadCompleted):
            fid = (c.file or {}).get("id", "")
            return f"upload complete · {len(c.part_ids)} parts · {fid}".rstrip(" ·")
        return f"upload {route.action} {route.object_id or ''}".rstrip()
    parts = [_name(route, row)]
    tokens = row.get("total_tokens") or (row.get("input_tokens") or 0) + (row.get("output_tokens") or 0)
    est = "~" if row.get("usage_estimated") else ""  # counted by velvet: the stream carried no usage
    if tokens:
        parts.append(f"{est}{count(tokens)} tok")
    if row.get("cost_usd") is not None:
        parts.append(est + money(row["cost_usd"]))
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
