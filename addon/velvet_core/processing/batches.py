"""Batch API flows (files, uploads, batches) -> operations for the store (writer thread)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from velvet_core.cost.prices import Pricer
from velvet_core.parsing.extract import tokens_from_usage, ts, utc
from velvet_core.processing.calls import Body
from velvet_core.storage.ops import BatchSeen, FileSeen, Op, UploadCompleted, UploadSeen
from velvet_core.storage.snapshot import CallSnapshot

TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at")


def file_row(obj: Any, **extra: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None
    row = {"id": obj["id"], "purpose": obj.get("purpose"), "filename": obj.get("filename"),
           "bytes": obj.get("bytes") if isinstance(obj.get("bytes"), int) else None,
           "created_at": ts(obj.get("created_at")), "expires_at": ts(obj.get("expires_at")),
           "status": obj.get("status")}
    row.update(extra)
    return row  # None values are dropped by batch_store.upsert_file


def batch_op(obj: Any, observed: float, source: str, pricer: Pricer, fp: str | None) -> BatchSeen | None:
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
    return BatchSeen(row, utc(observed), source, errors)


def prepare(s: CallSnapshot, req_body: Body, resp_body: Body | None, pricer: Pricer) -> list[Op]:
    """Operations for a files/uploads/batches flow (empty for failed calls), except the bodies of
    uploads, upload parts and file downloads: :mod:`ingest` reads those.

    The bodies come decoded (and JSON-parsed where they are JSON) from :func:`calls.parse_call`.
    """
    route = s.route
    if s.status_code is None or s.status_code >= 400 or resp_body is None or route.batch_body:
        return []
    resp = resp_body.json
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
        if action in ("retrieve",) and (row := file_row(resp, updated_at=seen)):
            return [FileSeen(row)]
        if action == "list" and isinstance(resp, dict) and isinstance(resp.get("data"), list):
            return [FileSeen(r) for f in resp["data"] if (r := file_row(f, updated_at=seen))]
        if action == "delete" and isinstance(resp, dict) and resp.get("deleted"):
            return [FileSeen({"id": route.object_id, "deleted": True, "updated_at": seen})]
        return []
    if kind == "uploads":
        return _uploads(s, req_body, resp, seen)
    return []


def _uploads(s: CallSnapshot, req_body: Body, resp: Any, seen: datetime) -> list[Op]:
    action = s.route.action
    req = req_body.json
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
        return [UploadSeen(row), UploadCompleted(resp["id"], req["part_ids"], frow)]
    return [UploadSeen(row)]
