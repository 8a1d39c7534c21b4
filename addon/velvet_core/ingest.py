"""Streamed batch bodies, parsed chunk by chunk in the writer thread (uploads, upload parts, downloads).

Lines are written as they are parsed, under a staging key (``~<flow id>``) while the file or part id
is not known yet (it comes with the response); the response binds them to it, a failed or cut
upload drops them. A cut download keeps the lines it got and marks the file incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .batches import file_row
from .batchlines import looks_like_input, request_row, result_row
from .decode import DecodeError, Decoder
from .jsonl import Line, LineSplitter
from .multipart import MultipartError, MultipartScanner, PartData, PartEnd, PartStart, boundary_of
from .pricing import Pricer
from .snapshot import CallSnapshot, TapInfo
from .store import Op
from .tap import Budget, Spilled

log = logging.getLogger("velvet")

ROWS_PER_OP = 500


class Ingest:
    """Incremental parsing of one streamed body; ``feed`` and ``end`` yield staging operations."""

    def __init__(self, key: str, encoding: str | None) -> None:
        self.key = key
        self.decoder = Decoder(encoding)
        self.splitter = LineSplitter()
        self.problems: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.lines = 0
        self.bad = 0
        self.failed = False  # parsing gave up (the rest of the body is ignored)

    def feed(self, data: bytes) -> Iterator[Op]:
        if self.failed:
            return
        try:
            self._feed(self.decoder.feed(data))
        except (DecodeError, MultipartError) as e:
            self.problems.append(str(e))
            self.failed = True
        yield from self._flush(ROWS_PER_OP)

    def end(self) -> Iterator[Op]:
        if not self.failed:
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
        self.rows.append(row)

    def _flush(self, at_least: int) -> Iterator[Op]:
        if len(self.rows) >= at_least and self.rows:
            rows, self.rows = self.rows, []
            yield (self.stage_kind, {"rows": rows})

    stage_kind = "stage_requests"


class UploadIngest(Ingest):
    """``POST /v1/files`` (multipart): the ``file`` part's lines, and the ``purpose`` field."""

    def __init__(self, key: str, content_type: str, encoding: str | None) -> None:
        super().__init__(key, encoding)
        boundary = boundary_of(content_type)
        if boundary is None:
            raise MultipartError(f"not a multipart body ({content_type or 'no content-type'})")
        self.scanner = MultipartScanner(boundary)
        self.part: str | None = None
        self.purpose = b""
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
                elif self.part == "purpose" and len(self.purpose) < 256:
                    self.purpose += ev.data
            elif isinstance(ev, PartEnd):
                if self.part == "file":
                    for line in self.splitter.finish():
                        self._line(line)
                self.part = None

    def _end(self) -> None:
        self.scanner.finish()

    def _line(self, line: Line) -> None:
        self._add({**request_row(line), "line_no": line.no, "file_id": self.key})


class PartIngest(Ingest):
    """``POST /v1/uploads/{id}/parts``: whole lines now; the partial lines at the edges for ``complete``."""

    def __init__(self, key: str, content_type: str, encoding: str | None) -> None:
        super().__init__(key, encoding)
        boundary = boundary_of(content_type)
        if boundary is None:
            raise MultipartError(f"not a multipart body ({content_type or 'no content-type'})")
        self.scanner = MultipartScanner(boundary)
        self.part: str | None = None
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

    def _end(self) -> None:
        self.scanner.finish()

    def _line(self, line: Line) -> None:
        self._add({**request_row(line), "part_line_no": line.no, "upload_part_id": self.key})


class ContentIngest(Ingest):
    """``GET /v1/files/{id}/content``: output/error lines (or an input file's lines, downloaded again)."""

    def __init__(self, key: str, file_id: str, encoding: str | None, pricer: Pricer, seen: datetime) -> None:
        super().__init__(key, encoding)
        self.file_id = file_id
        self.pricer = pricer
        self.seen = seen
        self.mode: str | None = None  # "requests" or "results", from the first object
        self.waiting: list[Line] = []

    def _feed(self, data: bytes) -> None:
        for line in self.splitter.feed(data):
            self._line(line)

    def _end(self) -> None:
        super()._end()
        if self.mode is None and self.waiting:
            self._decide("results")

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
            self._add({**result_row(line, self.pricer, self.seen), "file_id": self.file_id})

    def _decide(self, mode: str) -> None:
        self.mode = mode
        self.stage_kind = "stage_requests" if mode == "requests" else "stage_results"
        waiting, self.waiting = self.waiting, []
        for line in waiting:
            self._line(line)


def _object(line: Line) -> Any:
    import orjson

    if not line.data.strip():
        return None
    try:
        return orjson.loads(line.data)
    except orjson.JSONDecodeError:
        return None


class Streams:
    """The ingests in progress (writer thread only), fed by ``stream`` and ``chunk`` operations."""

    def __init__(self, budget: Budget, pricer: Any) -> None:
        self.budget = budget
        self.pricer = pricer  # a callable returning the current Pricer
        self.active: dict[str, Ingest] = {}
        self.spills: dict[str, Any] = {}

    def start(self, p: dict[str, Any]) -> list[Op]:
        key, kind = p["key"], p["kind"]
        try:
            if kind == "upload":
                self.active[key] = UploadIngest(key, p["content_type"], p["encoding"])
            elif kind == "part":
                self.active[key] = PartIngest(key, p["content_type"], p["encoding"])
            else:
                self.active[key] = ContentIngest(key, p["file_id"], p["encoding"], self.pricer(), p["seen"])
        except (DecodeError, MultipartError) as e:
            log.warning("velvet: cannot follow %s body %s: %s", kind, key, e)
        return []

    def chunk(self, p: tuple[str, bytes | Spilled]) -> Iterator[Op]:
        key, data = p
        ingest = self.active.get(key)
        if isinstance(data, bytes):
            try:
                if ingest is not None:
                    yield from ingest.feed(data)
            finally:
                self.budget.give_back(len(data))
            return
        self.spills[key] = data.path
        if ingest is None:
            return
        for piece in data.pieces():
            yield from ingest.feed(piece)

    def finish(self, s: CallSnapshot, tap: TapInfo, resp: Any) -> tuple[list[Op], list[str]]:
        """Bind or drop what was staged, once the response (or the error) is known."""
        ingest = self.active.pop(tap.key, None)
        spill = self.spills.pop(tap.key, None)
        if spill is not None:
            spill.unlink(missing_ok=True)
        problems: list[str] = []
        if tap.broken:
            problems.append(tap.broken)
        if ingest is None:
            if not tap.broken:
                problems.append("velvet lost this stream's state (restarted?)")
            return self._give_up(s, tap), problems
        ops = list(ingest.end()) if tap.finished and not tap.broken else list(ingest._flush(1))
        cut = not tap.finished or s.error is not None
        if cut:
            problems.append(f"body cut off after {tap.bytes:,} bytes"
                            + (f" ({s.error})" if s.error else ""))
        problems += ingest.problems
        ok = s.status_code is not None and s.status_code < 400 and isinstance(resp, dict)
        if isinstance(ingest, ContentIngest):
            return ops + self._content_done(s, ingest, cut or bool(tap.broken), problems), problems
        if not ok or cut or tap.broken or not isinstance(resp.get("id"), str):
            return [*ops, ("drop_staged", {"key": tap.key})], problems
        seen = _utc(s.ended_at or s.started_at)
        if isinstance(ingest, PartIngest):
            part = {"id": resp["id"], "upload_id": s.route.object_id or resp.get("upload_id"),
                    "head": ingest.head, "tail": ingest.tail if not ingest.in_head else None,
                    "lines": ingest.lines, "bytes": ingest.size, "seen_at": seen}
            return [*ops, ("bind_part", {"key": tap.key, "part": part})], problems
        assert isinstance(ingest, UploadIngest)
        purpose = resp.get("purpose") or ingest.purpose.decode("utf-8", "replace").strip()
        row = file_row(resp, first_seen_at=seen, updated_at=seen) or {"id": resp["id"]}
        if purpose != "batch":
            return [*ops, ("drop_staged", {"key": tap.key}), ("file", row)], problems
        if not ingest.saw_file:
            problems.append("no 'file' part in the upload")
        row.update(role="input", content_seen=True, lines=ingest.lines, bad_lines=ingest.bad,
                   complete=not problems)
        if problems:
            row["problem"] = "; ".join(problems)
        if ingest.bad:
            log.warning("velvet: batch input %s: %d of %d lines have problems", resp["id"], ingest.bad,
                        ingest.lines)
        return [*ops, ("file", row), ("bind_staged", {"key": tap.key, "file_id": resp["id"]})], problems

    def _content_done(self, s: CallSnapshot, ingest: ContentIngest, cut: bool, problems: list[str]) -> list[Op]:
        seen = _utc(s.ended_at or s.started_at)
        row: dict[str, Any] = {"id": ingest.file_id, "updated_at": seen, "first_seen_at": seen,
                               "content_seen": True, "lines": ingest.lines, "bad_lines": ingest.bad,
                               "complete": not cut and not ingest.problems}
        if ingest.mode == "requests":
            row["role"] = "input"
        if problems:
            row["problem"] = "; ".join(problems)
        done = "requests_done" if ingest.mode == "requests" else "results_done"
        return [("file", row), (done, {"file_id": ingest.file_id})]

    def _give_up(self, s: CallSnapshot, tap: TapInfo) -> list[Op]:
        if s.route.action == "content" and s.route.object_id:
            seen = _utc(s.ended_at or s.started_at)
            return [("file", {"id": s.route.object_id, "updated_at": seen, "first_seen_at": seen,
                              "content_seen": True, "complete": False,
                              "problem": "content not captured: " + (tap.broken or "stream state lost")})]
        return [("drop_staged", {"key": tap.key})]


def _utc(ts: float | None) -> datetime | None:
    from .calls import utc

    return utc(ts)
