"""Batch API flows (files, uploads, batches) -> operations for the store (writer thread)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from .batchlines import first_object, looks_like_input, request_row, result_row
from .calls import Body, utc
from .extract import tokens_from_usage
from .jsonl import LineSplitter
from .multipart import MultipartError, MultipartScanner, PartData, PartEnd, PartStart, boundary_of
from .pricing import Pricer
from .snapshot import CallSnapshot
from .store import Op

log = logging.getLogger("velvet")

TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at")


def ts(v: Any) -> datetime | None:
    """A Unix-seconds API timestamp as naive UTC (tolerates ISO strings of old API versions)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return datetime.fromtimestamp(v, UTC).replace(tzinfo=None)
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None)
        except ValueError:
            return None
    return None


def file_row(obj: Any, **extra: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None
    row = {"id": obj["id"], "purpose": obj.get("purpose"), "filename": obj.get("filename"),
           "bytes": obj.get("bytes") if isinstance(obj.get("bytes"), int) else None,
           "created_at": ts(obj.get("created_at")), "expires_at": ts(obj.get("expires_at")),
           "status": obj.get("status")}
    row.update(extra)
    return row  # None values are dropped by batchstore.upsert_file


def batch_op(obj: Any, observed: float, source: str, pricer: Pricer, fp: str | None) -> Op | None:
    if not isinstance(obj, dict) or obj.get("object", "batch") != "batch" or not isinstance(obj.get("id"), str):
        return None
    row: dict[str, Any] = {
        "id": obj["id"], "status": str(obj.get("status") or "unknown"), "endpoint": obj.get("endpoint"),
        "model": obj.get("model"), "completion_window": obj.get("completion_window"),
        "input_file_id": obj.get("input_file_id"), "output_file_id": obj.get("output_file_id"),
        "error_file_id": obj.get("error_file_id"),
        "metadata": orjson.dumps(obj["metadata"]).decode() if obj.get("metadata") else None,
        "output_expires_after": orjson.dumps(obj["output_expires_after"]).decode()
        if obj.get("output_expires_after") else None,
        "key_fingerprint": fp,
    }
    for k in TIMESTAMPS:
        row[k] = ts(obj.get(k))
    rc = obj.get("request_counts")
    if isinstance(rc, dict):
        row.update(request_total=rc.get("total"), request_completed=rc.get("completed"),
                   request_failed=rc.get("failed"))
    errors = []
    errs = obj.get("errors")
    if isinstance(errs, dict) and isinstance(errs.get("data"), list):
        errors = [{"code": e.get("code"), "message": e.get("message"), "param": e.get("param"),
                   "line": e.get("line") if isinstance(e.get("line"), int) else None}
                  for e in errs["data"] if isinstance(e, dict)]
        row["errors"] = orjson.dumps(errs).decode()
    usage = obj.get("usage")
    if isinstance(usage, dict):
        t = tokens_from_usage(usage)
        row.update(t.as_dict())
        row["usage"] = orjson.dumps(usage).decode()
        row["usage_cost_usd"] = pricer.cost(obj.get("model"), t, batch=True)
    row = {k: v for k, v in row.items() if v is not None}
    return ("batch", {"row": row, "errors": errors, "observed_at": utc(observed), "source": source})


def multipart_parts(data: bytes, content_type: str, problems: list[str]) -> dict[str, tuple[PartStart, bytes]]:
    """``{name: (headers, value)}``; a truncated body keeps what was complete and says so."""
    boundary = boundary_of(content_type)
    if boundary is None:
        problems.append(f"not a multipart body ({content_type or 'no content-type'})")
        return {}
    out: dict[str, tuple[PartStart, bytes]] = {}
    scanner = MultipartScanner(boundary)
    current: PartStart | None = None
    chunks: list[bytes] = []
    try:
        for ev in scanner.feed(data):
            if isinstance(ev, PartStart):
                current, chunks = ev, []
            elif isinstance(ev, PartData):
                chunks.append(ev.data)
            elif isinstance(ev, PartEnd) and current is not None and current.name:
                out[current.name] = (current, b"".join(chunks))
        scanner.finish()
    except MultipartError as e:
        problems.append(str(e))
    return out


def prepare(s: CallSnapshot, req_body: Body, resp_body: Body | None, pricer: Pricer) -> list[Op]:
    """Operations for a files/uploads/batches flow (empty for failed calls).

    The bodies come decoded (and JSON-parsed where they are JSON) from :func:`calls.parse_call`.
    """
    route = s.route
    if s.status_code is None or s.status_code >= 400 or resp_body is None:
        return []
    resp = resp_body.json
    problems: list[str] = []
    kind, action = route.kind, route.action
    seen = utc(s.ended_at or s.started_at)
    if kind == "batches":
        if action in ("create", "retrieve", "cancel"):
            op = batch_op(resp, s.ended_at or s.started_at, action, pricer, s.key_fingerprint)
            return [op] if op else []
        if action == "list" and isinstance(resp, dict) and isinstance(resp.get("data"), list):
            ops = [batch_op(b, s.ended_at or s.started_at, "list", pricer, s.key_fingerprint)
                   for b in resp["data"]]
            return [op for op in ops if op]
        return []
    if kind == "files":
        if action == "upload":
            return _file_upload(s, req_body.data, resp, seen, problems)
        if action in ("retrieve",) and (row := file_row(resp, updated_at=seen)):
            return [("file", row)]
        if action == "list" and isinstance(resp, dict) and isinstance(resp.get("data"), list):
            return [("file", r) for f in resp["data"] if (r := file_row(f, updated_at=seen))]
        if action == "delete" and isinstance(resp, dict) and resp.get("deleted"):
            return [("file", {"id": route.object_id, "deleted": True, "updated_at": seen})]
        if action == "content" and route.object_id:
            return _file_content(resp_body.data, route.object_id, seen, pricer)
        return []
    if kind == "uploads":
        return _uploads(s, req_body, resp, seen)
    return []


def _file_upload(s: CallSnapshot, data: bytes | None, resp: Any, seen: datetime,
                 problems: list[str]) -> list[Op]:
    if data is None:
        problems.append("upload body was not captured or could not be decoded")
    parts = multipart_parts(data, s.request_headers.get("content-type", ""), problems) if data else {}
    purpose = parts["purpose"][1].decode("utf-8", "replace").strip() if "purpose" in parts else None
    if not isinstance(resp, dict) or not isinstance(resp.get("id"), str):
        return []
    fid = resp["id"]
    purpose = resp.get("purpose") or purpose
    row = file_row(resp, first_seen_at=seen, updated_at=seen) or {"id": fid}
    ops: list[Op] = []
    if purpose == "batch":
        row.update(role="input", content_seen=True)
        if "file" not in parts:
            problems.append("no 'file' part in the upload")
            row.update(complete=False)
        else:
            rows = [{**request_row(line), "line_no": line.no} for line in LineSplitter().split(parts["file"][1])]
            row.update(lines=len(rows), bad_lines=sum(1 for r in rows if r["problem"]),
                       complete=not problems)
            if row["bad_lines"]:
                first = next(r for r in rows if r["problem"])
                log.warning("velvet: batch input %s: %d of %d lines have problems (line %d: %s)", fid,
                            row["bad_lines"], len(rows), first["line_no"], first["problem"])
            ops.append(("requests", {"file_id": fid, "rows": rows}))
    if problems:
        row["problem"] = "; ".join(problems)
    return [("file", row), *ops]


def _file_content(data: bytes | None, fid: str, seen: datetime, pricer: Pricer) -> list[Op]:
    row: dict[str, Any] = {"id": fid, "updated_at": seen, "content_seen": True}
    if data is None:
        row["problem"] = "file content was not captured or could not be decoded"
        return [("file", row)]
    lines = list(LineSplitter().split(data))
    if looks_like_input(first_object(lines)):  # an input file downloaded again: known lines stay as they are
        rows = [{**request_row(line), "line_no": line.no} for line in lines]
        row.update(role="input", lines=len(rows), bad_lines=sum(1 for r in rows if r["problem"]))
        return [("file", {**row, "first_seen_at": seen}), ("requests", {"file_id": fid, "rows": rows})]
    rows = [result_row(line, pricer, seen) for line in lines]
    row.update(lines=len(rows), bad_lines=sum(1 for r in rows if r["problem"]), complete=True)
    return [("file", {**row, "first_seen_at": seen}), ("results", {"file_id": fid, "rows": rows})]


def _uploads(s: CallSnapshot, req_body: Body, resp: Any, seen: datetime) -> list[Op]:
    action, uid = s.route.action, s.route.object_id
    req = req_body.json
    if action == "part":
        data = req_body.data
        parts = multipart_parts(data, s.request_headers.get("content-type", ""), []) if data else {}
        if not isinstance(resp, dict) or not isinstance(resp.get("id"), str) or "data" not in parts:
            return []
        return [("upload_part", split_part(resp["id"], uid or resp.get("upload_id"), parts["data"][1], seen))]
    if not isinstance(resp, dict) or not isinstance(resp.get("id"), str):
        return []
    row = {"id": resp["id"], "filename": resp.get("filename"), "bytes": resp.get("bytes"),
           "purpose": resp.get("purpose"), "status": resp.get("status"), "created_at": ts(resp.get("created_at")),
           "updated_at": seen}
    f = resp.get("file") if isinstance(resp.get("file"), dict) else None
    if f:
        row["file_id"] = f.get("id")
    if action == "complete" and isinstance(req, dict) and isinstance(req.get("part_ids"), list):
        row["part_ids"] = orjson.dumps(req["part_ids"]).decode()
        frow = file_row(f, first_seen_at=seen, updated_at=seen, upload_id=resp["id"]) if f else None
        return [("upload", row),
                ("upload_complete", {"upload_id": resp["id"], "part_ids": req["part_ids"], "file": frow})]
    return [("upload", row)]


def split_part(part_id: str, upload_id: str | None, data: bytes, seen: datetime) -> dict[str, Any]:
    """A part's complete lines become requests; the partial lines at its edges wait for ``complete``."""
    first = data.find(b"\n")
    if first < 0:
        return {"part": {"id": part_id, "upload_id": upload_id, "head": data, "tail": None, "lines": 0,
                         "bytes": len(data), "seen_at": seen}, "rows": []}
    last = data.rfind(b"\n")
    rows = [{**request_row(line), "part_line_no": line.no}
            for line in LineSplitter().split(data[first + 1:last + 1])]
    return {"part": {"id": part_id, "upload_id": upload_id, "head": data[:first], "tail": data[last + 1:],
                     "lines": len(rows), "bytes": len(data), "seen_at": seen}, "rows": rows}
