"""Database side of the Batch API: upserts, status history, line binding and custom_id matching."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, cast

from peewee import fn

from velvet_core.cost.prices import Pricer
from velvet_core.parsing.classify import normalise
from velvet_core.parsing.extract import Tokens, images_of, tokens_from_usage, utc
from velvet_core.parsing.jsonl import Line
from velvet_core.parsing.lines import request_row
from velvet_core.storage import rollups
from velvet_core.storage.bulk import chunks, indexed, insert_rows
from velvet_core.storage.models import (
    Batch,
    BatchError,
    BatchEvent,
    BatchRequest,
    BatchResult,
    File,
    Upload,
    UploadPart,
)
from velvet_core.storage.ops import BatchSeen, PartSeen, UploadCompleted
from velvet_core.storage.sql import json_value
from velvet_core.storage.values import clean_rows, clean_text

STATUS_TIME = {"validating": "created_at", "in_progress": "in_progress_at", "finalizing": "finalizing_at",
               "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
               "cancelling": "cancelling_at", "cancelled": "cancelled_at"}
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def requests_done(file_id: str, pricer: Pricer | None = None) -> None:
    """The checks that need the whole input file: duplicates, its batch's endpoint, bad-line count."""
    mark_duplicates(file_id)
    for b in Batch.select().where(Batch.input_file_id == file_id):
        link(b, pricer)
    recount(file_id)


def results_done(file_id: str, pricer: Pricer | None = None) -> None:
    for b in Batch.select().where((Batch.output_file_id == file_id) | (Batch.error_file_id == file_id)):
        link(b, pricer)


def upsert_file(row: dict[str, Any]) -> None:
    row = {k: v for k, v in row.items() if v is not None}
    clean_rows([row], bounded=indexed(File))
    if row.get("complete") is True and "problem" not in row:
        row["problem"] = None  # a whole download clears what an earlier, cut one said
    existing = File.get_or_none(File.id == row["id"])
    if existing is None:
        row.setdefault("first_seen_at", row.get("updated_at") or utc(time.time()))
        row.setdefault("updated_at", row["first_seen_at"])
        File.insert(**row).on_conflict_ignore().execute()
    else:
        if existing.role == "input":
            row.pop("role", None)  # an input file stays one
        row.pop("first_seen_at", None)
        File.update(**row).where(File.id == row["id"]).execute()


def add_requests(file_id: str, rows: list[dict[str, Any]]) -> None:
    add_lines(BatchRequest, [{**r, "file_id": file_id} for r in rows])
    requests_done(file_id)


def add_lines(model: type[BatchRequest] | type[BatchResult], rows: list[dict[str, Any]]) -> None:
    """Insert input or result lines (a line already stored is left as it is), each with ``file_at``.

    ``file_at`` is the partition key of the batch tables on a partitioned PostgreSQL database, and part of their
    unique keys there, so every line of a file must get the same one, whoever stores it and when: the lines of
    the file already stored have it; else it is when the file was first seen (``files``), else when the lines
    were seen. Lines of an upload part not yet a file go by their part until the upload completes."""
    at: dict[tuple[str, str] | None, datetime] = {}
    out = []
    for r in rows:
        if r.get("file_at") is None:  # (a copy: a group written again after a rollback looks it up again)
            ref = ("file_id", r["file_id"]) if r.get("file_id") is not None else \
                ("upload_part_id", r["upload_part_id"]) if r.get("upload_part_id") is not None else None
            if ref not in at:
                at[ref] = (_file_at(model, *ref) if ref else None) or r.get("seen_at") or utc(time.time())
            r = {**r, "file_at": at[ref]}
        out.append(r)
    insert_rows(model, out)


def _file_at(model: type[BatchRequest] | type[BatchResult], column: str, value: str) -> datetime | None:
    field = getattr(model, column)
    got = (model.select(model.file_at).where(field == value, model.file_at.is_null(False)).limit(1)
           .scalar())
    if got is None and column == "file_id":
        got = File.select(File.first_seen_at).where(File.id == value).scalar()
    return cast(datetime | None, got)


def recount(file_id: str) -> None:
    """``files.bad_lines`` after the checks that need the whole file or its batch."""
    bad = BatchRequest.select().where(BatchRequest.file_id == file_id, BatchRequest.problem.is_null(False))
    File.update(bad_lines=bad.count()).where(File.id == file_id).execute()


def mark_duplicates(file_id: str) -> None:
    """The first line with a custom_id is the request; later lines with the same one are errors."""
    dup = (BatchRequest.select(BatchRequest.custom_id, fn.MIN(BatchRequest.line_no).alias("first"))
           .where(BatchRequest.file_id == file_id, BatchRequest.custom_id.is_null(False))
           .group_by(BatchRequest.custom_id).having(fn.COUNT(BatchRequest.id) > 1))
    for d in cast(list[dict[str, Any]], dup.dicts()):  # (peewee's stubs type every row as the model)
        add_problem(f"duplicate custom_id (first on line {d['first']})", "duplicate custom_id",
                    BatchRequest.file_id == file_id, BatchRequest.custom_id == d["custom_id"],
                    BatchRequest.line_no > d["first"])


def add_problem(message: str, marker: str, *where: Any) -> None:
    """Append ``message`` to the problem of the matching requests, once (``marker`` tells)."""
    (BatchRequest.update(problem=fn.COALESCE(BatchRequest.problem.concat("; "), "").concat(message))
     .where(*where, BatchRequest.problem.is_null() | ~BatchRequest.problem.contains(marker))
     .execute())


def upsert_batch(p: BatchSeen, pricer: Pricer | None = None) -> None:
    row, observed = dict(p.row), p.observed_at
    clean_rows([row], problem=None, bounded=indexed(Batch))
    clean_rows(p.errors, problem=None, bounded=indexed(BatchError))
    old = Batch.get_or_none(Batch.id == row["id"])
    status = row["status"]
    stale = False
    if old is None:
        Batch.insert(**row, first_seen_at=observed, last_seen_at=observed).on_conflict_ignore().execute()
        previous = None
    else:
        previous = old.status
        stale = observed < old.last_seen_at or (old.status in TERMINAL and status not in TERMINAL)
        if stale:  # an older observation (e.g. a list page fetched earlier): keep the newer status
            row.pop("status")
        update = {k: v for k, v in row.items() if k != "id"}
        if not stale:
            update["last_seen_at"] = observed
        Batch.update(**update).where(Batch.id == row["id"]).execute()
    if previous != status:  # a stale observation is history too, but we do not know what preceded it
        BatchEvent.insert(batch_id=row["id"], status=status, previous_status=None if stale else previous,
                          observed_at=observed,
                          api_at=row.get(STATUS_TIME.get(status, "")), source=p.source
                          ).on_conflict_ignore().execute()
    for e in p.errors:
        BatchError.insert(batch_id=row["id"], **e).on_conflict_ignore().execute()
    b = Batch.get(Batch.id == row["id"])
    durations(b)
    link(b, pricer)


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def durations(b: Batch) -> None:
    end = b.completed_at or b.failed_at or b.expired_at or b.cancelled_at
    Batch.update(queue_s=_secs(b.created_at, b.in_progress_at),
                 processing_s=_secs(b.in_progress_at, b.finalizing_at),
                 finalize_s=_secs(b.finalizing_at, b.completed_at),
                 turnaround_s=_secs(b.created_at, end)).where(Batch.id == b.id).execute()


def link(b: Batch, pricer: Pricer | None = None) -> None:
    """Bind input lines, files and results to batch ``b`` and match results to requests by custom_id.

    A matched answer that names no model (an image answer never does) takes its request's, and is priced
    then (with ``pricer``). When that bound or matched any line, the batch's counters (``batch_counts``)
    are recomputed.
    """
    now = utc(time.time())
    changed = 0
    if b.input_file_id:
        changed += BatchRequest.update(batch_id=b.id).where(BatchRequest.file_id == b.input_file_id,
                                                            BatchRequest.batch_id.is_null()).execute()
        File.update(batch_id=b.id, role="input").where(File.id == b.input_file_id).execute()
        check_urls(b)
        recount(b.input_file_id)
    for fid, role in ((b.output_file_id, "output"), (b.error_file_id, "error")):
        if not fid:
            continue
        if File.get_or_none(File.id == fid) is None:  # (first seen when the batch naming it was)
            seen = b.last_seen_at or now
            File.insert(id=fid, role=role, batch_id=b.id, first_seen_at=seen, updated_at=seen
                        ).on_conflict_ignore().execute()
        else:
            File.update(batch_id=b.id, role=role).where(File.id == fid).execute()
        changed += BatchResult.update(batch_id=b.id).where(BatchResult.file_id == fid,
                                                           BatchResult.batch_id.is_null()).execute()
    first = (BatchRequest.select(BatchRequest.id)
             .where(BatchRequest.batch_id == b.id, BatchRequest.custom_id == BatchResult.custom_id)
             .order_by(BatchRequest.line_no).limit(1))
    # only answers that have a request to match: an unmatched one is neither rewritten nor counted as a change
    changed += BatchResult.update(request=first).where(BatchResult.batch_id == b.id, BatchResult.request.is_null(),
                                                       fn.EXISTS(first)).execute()
    changed += price_unnamed(b.id, pricer or Pricer())
    if changed:
        rollups.recount_batch(b.id)


def price_unnamed(batch_id: str, pricer: Pricer) -> int:
    """Answers of batch ``batch_id`` matched to a request but naming no model and not priced (image answers):
    their request's model, and their cost at the batch rate from it (the image tokens of the answer's usage
    priced apart). Returns how many it changed."""
    query = (BatchResult.select(BatchResult.id, BatchResult.body, BatchResult.input_tokens,
                                BatchResult.output_tokens, BatchResult.cached_tokens,
                                BatchRequest.model.alias("req_model"), BatchRequest.body.alias("req_body"))
             .join(BatchRequest, on=(BatchResult.request == BatchRequest.id))
             .where(BatchResult.batch_id == batch_id, BatchResult.model.is_null(), BatchResult.cost_usd.is_null(),
                    BatchRequest.model.is_null(False)))
    rows = cast(list[dict[str, Any]], list(query.dicts()))  # (peewee's stubs type every row as the model)
    for r in rows:
        if pricer.is_per_image(r["req_model"]):  # billed per image: the count from the answer, size from both
            request = json_value(r["req_body"])
            cost = pricer.image_cost(r["req_model"], images_of(json_value(r["body"]), request.get("body")
                                                               if isinstance(request, dict) else None), batch=True)
            BatchResult.update(model=r["req_model"], cost_usd=cost).where(BatchResult.id == r["id"]).execute()
            continue
        tokens = Tokens.of_row(r)
        if tokens.input:  # the split of image and text input tokens, from the answer as stored
            tokens.image = tokens_from_usage(_usage(r["body"])).image
        cost = pricer.cost(r["req_model"], tokens, batch=True)
        BatchResult.update(model=r["req_model"], cost_usd=cost).where(BatchResult.id == r["id"]).execute()
    return len(rows)


def _usage(body: str | None) -> Any:
    obj = json_value(body)
    return obj.get("usage") if isinstance(obj, dict) else None


def check_urls(b: Batch) -> None:
    """Lines whose url is not the batch's endpoint are errors."""
    if not b.endpoint:
        return
    want = normalise(b.endpoint)[0]
    # a url equal to the endpoint is right by definition: only the others are read and normalised
    bad = [r.id for r in BatchRequest.select(BatchRequest.id, BatchRequest.url)
           .where(BatchRequest.batch_id == b.id, BatchRequest.url.is_null(False), BatchRequest.url != b.endpoint)
           if normalise(r.url or "")[0] != want]
    for ids in chunks(bad):
        add_problem(f"url does not match the batch endpoint {b.endpoint}", "batch endpoint",
                    BatchRequest.id.in_(ids))


def upsert_upload(row: dict[str, Any]) -> None:
    row = {k: v for k, v in row.items() if v is not None}
    clean_rows([row], problem=None, bounded=indexed(Upload))
    if Upload.get_or_none(Upload.id == row["id"]) is None:
        Upload.insert(**row).on_conflict_ignore().execute()
    else:
        Upload.update(**{k: v for k, v in row.items() if k != "id"}).where(Upload.id == row["id"]).execute()
    if row.get("status") in ("cancelled", "expired"):  # no file will come of it
        parts = UploadPart.select(UploadPart.id).where(UploadPart.upload_id == row["id"])
        BatchRequest.delete().where(BatchRequest.upload_part_id.in_(parts),
                                    BatchRequest.file_id.is_null()).execute()


def part_seen(p: PartSeen) -> None:
    row = {"id": p.id, "upload_id": p.upload_id, "head": p.head, "tail": p.tail, "lines": p.lines,
           "bytes": p.bytes, "seen_at": p.seen_at}
    clean_rows([row], problem=None, bounded=indexed(UploadPart))
    UploadPart.insert(**row).on_conflict_ignore().execute()


def complete_upload(p: UploadCompleted) -> None:
    """Number the parts' lines in ``part_ids`` order and stitch the lines that span parts."""
    frow = p.file
    if not frow:
        return
    part_ids = [clean_text(pid)[0] if isinstance(pid, str) else str(pid) for pid in p.part_ids]
    fid = frow["id"]
    parts = {u.id: u for u in UploadPart.select().where(UploadPart.id.in_(part_ids))}
    missing = [pid for pid in part_ids if pid not in parts]
    frow = {**frow, "role": "input", "complete": not missing}
    upsert_file(frow)  # (first: its first sight is the file_at of all its lines)
    file_at = _file_at(BatchRequest, "file_id", fid)
    n, carry, stitched = 0, b"", []
    for pid in part_ids:
        part = parts.get(pid)
        if part is None:
            continue
        head = bytes(part.head or b"")
        if part.tail is None:  # no newline in this part
            carry += head
            continue
        n += 1
        stitched.append(_line(n, carry + head))
        BatchRequest.update(file_id=fid, line_no=BatchRequest.part_line_no + n, file_at=file_at).where(
            BatchRequest.upload_part_id == pid, BatchRequest.file_id.is_null()).execute()
        n += part.lines
        carry = bytes(part.tail)
    if carry:
        n += 1
        last = _line(n, carry)
        last.final_newline = False
        stitched.append(last)
    rows = [{**request_row(line), "line_no": line.no} for line in stitched]
    frow = {**frow, "lines": n, "content_seen": True}
    if missing:
        frow["problem"] = f"parts not seen by the proxy: {', '.join(missing)}"
    upsert_file(frow)
    add_requests(fid, rows)


def _line(no: int, data: bytes) -> Line:
    if data.endswith(b"\r"):
        return Line(no, data[:-1], crlf=True)
    return Line(no, data)
