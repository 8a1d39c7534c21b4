"""The processing step: one finished flow's snapshot -> the operations the store applies (writer thread).

No mitmproxy here: a snapshot is plain data. The call row is always the last operation, so a flow
whose batch body is being parsed still gets its row (with the problem) if the parsing fails. When a
flow list shows comments (mitmweb), each processed flow's comment and marker go back through one
callback, ``note(flow_id, comment, marker)``, which the addon hands to the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from velvet_core.config import BODY_LIMIT
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.extract import utc
from velvet_core.processing import batches, cache, comments
from velvet_core.processing.batch_files import ingest_buffered, ingest_streamed
from velvet_core.processing.calls import Body, parse_call
from velvet_core.processing.markers import marker
from velvet_core.storage.ops import LINES, BatchSeen, CallRow, Op
from velvet_core.storage.snapshot import CallSnapshot, settle

log = logging.getLogger("velvet")

Note = Callable[[str, str, str | None], None]


class Processor:
    """Turns snapshots into operations. ``pricer`` and ``body_limit`` are read per flow (options may change)."""

    def __init__(self, pricer: Pricer | None = None, body_limit: int = BODY_LIMIT,
                 note: Note | None = None) -> None:
        self.pricer = pricer or Pricer()
        self.body_limit = body_limit
        self.note = note
        self.batch_status: dict[str, str] = {}  # last status seen per batch, for "in_progress → completed"

    def warm(self) -> None:
        """Load what the first flow would otherwise wait for (price data), in the writer thread."""
        self.pricer.warm()

    def operations(self, s: CallSnapshot) -> Iterator[Op]:
        """The operations for one flow; if processing fails before the call row, a bare row says why."""
        try:
            settle(s)
            yield from self._operations(s)
        except Exception as e:
            log.exception("velvet: could not process %s %s (flow %s)", s.method, s.path, s.flow_id)
            yield fallback(s, e)

    def _operations(self, s: CallSnapshot) -> Iterator[Op]:
        pricer = self.pricer
        row, req, resp = parse_call(s, pricer, self.body_limit)
        summary: list[Op] = []  # what the comment needs (not the lines themselves)
        if s.route.batch_body:
            for op in self._batch_body(s, row, req, resp, pricer):
                if not isinstance(op, LINES):
                    summary.append(op)
                yield op
        elif s.route.kind in ("files", "uploads", "batches"):
            summary = list(batches.prepare(s, req, resp, pricer))
            yield from summary
        cached: list[Op] = []
        if s.cache:  # the response cache: a hit's row and count, or a miss's new entry (after its call row)
            cached = [*cache.mark_hit(s, row), *cache.entry(s, row, resp, self.body_limit)]
        _log_problem(s, row)
        self._describe(s, row, summary)
        yield CallRow(row)
        yield from cached

    def _batch_body(self, s: CallSnapshot, row: dict[str, Any], req: Body, resp: Body | None,
                    pricer: Pricer) -> Iterator[Op]:
        """An upload, upload part or download: its lines as they are parsed; ``row`` gets the problems."""
        problems: list[str] = []
        tap = s.request_tap or s.response_tap
        resp_json = resp.json if resp else None
        try:
            if tap is not None:  # streamed: the tap kept it on disk
                yield from ingest_streamed(s, tap, resp_json, pricer, problems)
            elif s.status_code is not None and s.status_code < 400:
                body = resp if s.route.batch_body == "response" else req
                yield from ingest_buffered(s, body.data if body else None, resp_json, pricer, problems)
        except Exception as e:  # the call row is written whatever happened to the body
            log.exception("velvet: could not parse the body of %s %s", s.method, s.path)
            problems.append(f"velvet internal error while parsing the body: {type(e).__name__}: {e}")
        if tap is not None:
            row["request_bytes" if s.request_tap else "response_bytes"] = tap.bytes
        if problems:
            row["problem"] = "; ".join(p for p in (row.get("problem"), *problems) if p)
            if tap is not None:
                row["complete"] = row.get("complete", True) and tap.finished and not tap.broken

    def _describe(self, s: CallSnapshot, row: dict[str, Any], ops: list[Op]) -> None:
        if self.note is None:
            return
        try:
            text = comments.comment(s.route, row, ops, self.batch_status)
            status = next((op.row["status"] for op in ops if isinstance(op, BatchSeen)), None)
            self.note(s.flow_id, text, marker(s.route, row.get("status_code"), row.get("complete", True), status))
        except Exception:
            log.exception("velvet: could not describe flow %s", s.flow_id)


def _log_problem(s: CallSnapshot, row: dict[str, Any]) -> None:
    if row.get("problem"):
        level = logging.INFO if row["endpoint"] == "other" else logging.WARNING
        log.log(level, "velvet: %s %s: %s", s.method, s.path, row["problem"])


def fallback(s: CallSnapshot, exc: BaseException) -> CallRow:
    """A bare row for a flow we failed to process, so it is never lost."""
    return CallRow({
        "flow_id": s.flow_id, "method": s.method, "scheme": s.scheme, "host": s.host, "port": s.port,
        "path": s.path, "endpoint": s.route.kind, "action": s.route.action, "status_code": s.status_code,
        "started_at": utc(s.started_at), "key_fingerprint": s.key_fingerprint,
        "problem": f"velvet internal error: {type(exc).__name__}: {exc}",
    })
