"""Batch file bodies -> line rows, parsed incrementally in the writer thread.

Uploads (``POST /v1/files``), upload parts and file downloads come here once their flow is over, when
the response has named the file or part: from the tap's spill file when they were streamed (bigger than
``velvet_stream_threshold``), or from the buffered body. Either way the same parsers read the body
piece by piece and the lines are written 500 at a time (bounded memory, any size). An upload that
failed or was cut stores no lines; a cut download keeps the lines that arrived and marks the file
incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson

from velvet_core.cost.prices import Pricer
from velvet_core.parsing.decode import DecodeError, Decoder
from velvet_core.parsing.extract import utc
from velvet_core.parsing.jsonl import Line, LineSplitter
from velvet_core.parsing.lines import looks_like_input, request_row, result_row
from velvet_core.parsing.multipart import (
    PIECE,
    MultipartError,
    MultipartScanner,
    PartData,
    PartEnd,
    PartStart,
    Read,
    boundary_of,
    form_field,
)
from velvet_core.processing.batches import file_row
from velvet_core.storage.ops import FileSeen, InputDone, Op, OutputDone, PartSeen, RequestLines, ResultLines
from velvet_core.storage.snapshot import CallSnapshot, TapInfo

log = logging.getLogger("velvet")

ROWS_PER_OP = 500


class Ingest:
    """Incremental parsing of one body; ``feed`` and ``end`` yield row operations."""

    lines_op: type[RequestLines | ResultLines] = RequestLines

    def __init__(self, encoding: str | None) -> None:
        self.decoder = Decoder(encoding)
        self.splitter = LineSplitter()
        self.problems: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.lines = 0
        self.bad = 0
        self.failed_lines = 0
        self.failed = False  # parsing gave up (the rest of the body is ignored)

    def feed(self, data: bytes) -> Iterator[Op]:
        if not self.failed:
            try:
                self._feed(self.decoder.feed(data))
            except (DecodeError, MultipartError) as e:
                self.problems.append(str(e))
                self.failed = True
        yield from self._flush(ROWS_PER_OP)

    def end(self, whole: bool) -> Iterator[Op]:
        """The body is over; ``whole`` is False when it was cut (the partial last line is dropped)."""
        if whole and not self.failed:
            try:
                self._feed(self.decoder.finish())
                self._end()
            except (DecodeError, MultipartError) as e:
                self.problems.append(str(e))
        yield from self._flush(1)

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        for line in self.splitter.finish():
            self._line(line)

    def _line(self, line: Line) -> None:
        raise NotImplementedError

    def _add(self, row: dict[str, Any]) -> None:
        self.lines += 1
        self.bad += row.get("problem") is not None
        self.failed_lines += bool(row.get("failed"))
        self.rows.append(row)

    def _flush(self, at_least: int) -> Iterator[Op]:
        while self.rows and len(self.rows) >= at_least:
            rows, self.rows = self.rows[:ROWS_PER_OP], self.rows[ROWS_PER_OP:]
            yield self.lines_op(rows)


class MultipartIngest(Ingest):
    """A multipart body: the incremental scanner, and the name of the part being read."""

    def __init__(self, content_type: str, encoding: str | None) -> None:
        super().__init__(encoding)
        boundary = boundary_of(content_type)
        if boundary is None:
            raise MultipartError(f"not a multipart body ({content_type or 'no content-type'})")
        self.scanner = MultipartScanner(boundary)
        self.part: str | None = None

    def _end(self) -> None:
        self.scanner.finish()


class UploadIngest(MultipartIngest):
    """``POST /v1/files`` (multipart): the ``file`` part's lines."""

    def __init__(self, file_id: str, content_type: str, encoding: str | None) -> None:
        super().__init__(content_type, encoding)
        self.file_id = file_id
        self.saw_file = False

    def _feed(self, data: bytes) -> None:
        for ev in self.scanner.feed(data):
            if isinstance(ev, PartStart):
                self.part = ev.name
                self.saw_file |= ev.name == "file"
            elif isinstance(ev, PartData):
                if self.part == "file":
                    for line in self.splitter.feed(ev.data):
                        self._line(line)
            elif isinstance(ev, PartEnd):
                if self.part == "file":
                    for line in self.splitter.finish():
                        self._line(line)
                self.part = None

    def _line(self, line: Line) -> None:
        self._add({**request_row(line), "line_no": line.no, "file_id": self.file_id})


class PartIngest(MultipartIngest):
    """``POST /v1/uploads/{id}/parts``: whole lines now; the partial lines at the edges for ``complete``."""

    def __init__(self, part_id: str, content_type: str, encoding: str | None) -> None:
        super().__init__(content_type, encoding)
        self.part_id = part_id
        self.head = b""
        self.in_head = True
        self.tail: bytes | None = None
        self.size = 0

    def _feed(self, data: bytes) -> None:
        for ev in self.scanner.feed(data):
            if isinstance(ev, PartStart):
                self.part = ev.name
            elif isinstance(ev, PartData) and self.part == "data":
                chunk = ev.data
                self.size += len(chunk)
                if self.in_head:
                    i = chunk.find(b"\n")
                    if i < 0:
                        self.head += chunk
                        continue
                    self.head += chunk[:i]
                    self.in_head = False
                    chunk = chunk[i + 1:]
                for line in self.splitter.feed(chunk):
                    self._line(line)
            elif isinstance(ev, PartEnd):
                if self.part == "data" and not self.in_head:
                    self.tail = self.splitter.remainder()
                self.part = None

    def _line(self, line: Line) -> None:
        self._add({**request_row(line), "part_line_no": line.no, "upload_part_id": self.part_id})


def priced_result(line: Line, pricer: Pricer, seen: datetime) -> dict[str, Any]:
    """An output or error line's row, priced at the batch rate."""
    row = result_row(line, seen)
    row["cost_usd"] = pricer.line_cost(row)
    return row


class ContentIngest(Ingest):
    """``GET /v1/files/{id}/content``: output/error lines (or an input file's lines, downloaded again)."""

    def __init__(self, file_id: str, encoding: str | None, pricer: Pricer, seen: datetime) -> None:
        super().__init__(encoding)
        self.file_id = file_id
        self.pricer = pricer
        self.seen = seen
        self.mode: str | None = None  # "requests" or "results", from the first object
        self.waiting: list[Line] = []

    def _feed(self, data: bytes) -> None:
        for line in self.splitter.feed(data):
            self._line(line)

    def end(self, whole: bool) -> Iterator[Op]:
        if whole and not self.failed:
            try:
                self._feed(self.decoder.finish())
                for line in self.splitter.finish():
                    self._line(line)
            except DecodeError as e:
                self.problems.append(str(e))
        if self.mode is None and self.waiting:
            self._decide("results")
        yield from self._flush(1)

    def _line(self, line: Line) -> None:
        if self.mode is None:
            self.waiting.append(line)
            obj = _object(line)
            if obj is not None or len(self.waiting) >= 100:
                self._decide("requests" if looks_like_input(obj) else "results")
            return
        if self.mode == "requests":
            self._add({**request_row(line), "line_no": line.no, "file_id": self.file_id})
        else:
            self._add({**priced_result(line, self.pricer, self.seen), "file_id": self.file_id})

    def _decide(self, mode: str) -> None:
        self.mode = mode
        self.lines_op = RequestLines if mode == "requests" else ResultLines
        waiting, self.waiting = self.waiting, []
        for line in waiting:
            self._line(line)


def _object(line: Line) -> Any:
    if not line.data.strip():
        return None
    try:
        return orjson.loads(line.data)
    except orjson.JSONDecodeError:
        return None




def _feed(ingest: Ingest, read: Read) -> Iterator[Op]:
    # compressed input in small pieces: what one piece decodes to stays bounded
    size = PIECE if ingest.decoder.encoding == "identity" else PIECE // 64
    for piece in read(size):
        yield from ingest.feed(piece)


def ingest_streamed(s: CallSnapshot, tap: TapInfo, resp: Any, pricer: Pricer, problems: list[str]) -> Iterator[Op]:
    """Operations for a batch body the tap kept on disk (still content-encoded); ``problems`` is filled."""

    def read(size: int) -> Iterator[bytes]:
        if tap.path is None:  # an empty body
            return
        with open(tap.path, "rb") as f:
            while piece := f.read(size):
                yield piece

    if tap.broken:
        problems.append(tap.broken)
    cut = not tap.finished or (s.error is not None and s.status_code is None)
    if cut:
        problems.append(f"body cut off after {tap.bytes:,} bytes" + (f" ({s.error})" if s.error else ""))
    # (the spill file stays until the flow's operations are written: the writer removes it then)
    yield from _ingest(s, resp, pricer, problems, None if tap.broken else read, cut, encoded=True)


def ingest_buffered(s: CallSnapshot, data: bytes | None, resp: Any, pricer: Pricer,
                    problems: list[str]) -> Iterator[Op]:
    """The same for a body mitmproxy buffered, already decoded (``None``: not captured or undecodable)."""

    def read(size: int) -> Iterator[bytes]:
        assert data is not None
        for i in range(0, len(data), size):
            yield data[i:i + size]

    if data is None:
        problems.append("body was not captured or could not be decoded")
    cut = s.error is not None and s.status_code is None
    yield from _ingest(s, resp, pricer, problems, None if data is None else read, cut, encoded=False)


def ingest_content(file_id: str, read: Read | None, encoding: str | None, pricer: Pricer, seen: datetime,
                   cut: bool, problems: list[str]) -> Iterator[Op]:
    """Lines, then the file's operations, for a file's content (``GET /v1/files/{id}/content``): input lines, or
    result lines priced at the batch rate. The proxy reads a download's body with it, ``velvet sync`` what it
    downloads itself."""
    unreadable = {"id": file_id, "updated_at": seen, "first_seen_at": seen, "content_seen": True,
                  "complete": False}
    try:
        ingest = ContentIngest(file_id, encoding, pricer, seen)
    except DecodeError as e:
        problems.append(str(e))
        read = None
    if read is None:
        yield FileSeen({**unreadable, "problem": "; ".join(problems)})
        return
    yield from _feed(ingest, read)
    yield from ingest.end(whole=not cut)
    problems += ingest.problems
    row: dict[str, Any] = {**unreadable, "lines": ingest.lines, "bad_lines": ingest.bad,
                           "complete": not (cut or ingest.problems)}
    if ingest.mode == "requests":
        row["role"] = "input"
    if problems:
        row["problem"] = "; ".join(problems)
    yield FileSeen(row)
    if ingest.mode == "requests":
        yield InputDone(file_id)
    else:  # all lines failed: an error file (for the flow comment)
        yield OutputDone(file_id, all_failed=0 < ingest.lines == ingest.failed_lines)


def _ingest(s: CallSnapshot, resp: Any, pricer: Pricer, problems: list[str], read: Read | None, cut: bool,
            encoded: bool) -> Iterator[Op]:
    """Lines, then file (or part) operations, for an upload, an upload part or a file download."""
    route = s.route
    seen = utc(s.ended_at or s.started_at)
    if route.action == "content":
        if not route.object_id or s.status_code is None or s.status_code >= 400:
            return
        yield from ingest_content(route.object_id, read, s.response_encoding if encoded else None, pricer, seen,
                                  cut, problems)
        return
    ok = s.status_code is not None and s.status_code < 400 and isinstance(resp, dict) \
        and isinstance(resp.get("id"), str)
    if not ok or cut:
        return  # an upload that did not make a file has no lines
    ct, enc = s.request_headers.get("content-type", ""), s.request_encoding if encoded else None
    row = file_row(resp, first_seen_at=seen, updated_at=seen) or {"id": resp["id"]}
    try:
        kind = PartIngest if route.kind == "uploads" else UploadIngest
        body: PartIngest | UploadIngest = kind(resp["id"], ct, enc)
    except (MultipartError, DecodeError) as e:
        problems.append(str(e))
        read = None
    if read is None:  # the API made the file (or part) all the same
        if route.kind == "files":
            batch = resp.get("purpose") in (None, "batch")
            yield FileSeen({**row, **({"role": "input"} if batch else {}), "content_seen": True,
                            "complete": False, "problem": "; ".join(problems)})
        return
    if isinstance(body, PartIngest):
        yield from _feed(body, read)
        yield from body.end(whole=True)
        problems += body.problems
        yield PartSeen(resp["id"], route.object_id or resp.get("upload_id"), head=body.head,
                       tail=body.tail if not body.in_head else None, lines=body.lines, bytes=body.size,
                       seen_at=seen)
        return
    purpose = resp.get("purpose")
    if purpose is None:  # a server that does not echo it (some OpenAI-compatible ones): the form says
        purpose = form_field(ct, enc, read)
        if purpose is not None:
            row["purpose"] = purpose
    if purpose != "batch":
        yield FileSeen(row)  # not a batch file: its content is not ours to keep
        return
    yield from _feed(body, read)
    yield from body.end(whole=True)
    problems += body.problems
    if not body.saw_file:
        problems.append("no 'file' part in the upload")
    row.update(role="input", content_seen=True, lines=body.lines, bad_lines=body.bad, complete=not problems)
    if problems:
        row["problem"] = "; ".join(problems)
    if body.bad:
        log.warning("velvet: batch input %s: %d of %d lines have problems", resp["id"], body.bad, body.lines)
    yield FileSeen(row)
    yield InputDone(resp["id"])
