"""``velvet sync``: batches from the API (a list, page by page, or given ids), each stored with its files' lines
through the proxy's own processing (:func:`~velvet_core.processing.batches.batch_op`,
:func:`~velvet_core.processing.batch_files.ingest_content`, the store): a synced batch is one seen live but for
the source of its events (``sync``). Idempotent and resumable: a file whose lines are all logged is not fetched
again, and every write is an upsert, so a second run (or the proxy logging the same requests) adds nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from peewee import Database

from velvet_core import clock
from velvet_core.api.client import APIError, Client
from velvet_core.cost.prices import Pricer
from velvet_core.processing.batch_files import ingest_content
from velvet_core.processing.batches import batch_op
from velvet_core.storage.ops import Op, RequestLines, ResultLines
from velvet_core.storage.sql import rows
from velvet_core.storage.store import Store

FINAL = ("completed", "failed", "expired", "cancelled")
PAGE = 100
OPS_PER_TRANSACTION = 20  # line operations (500 lines each) written together


@dataclass
class Tally:
    """What a run did: the keys of ``velvet sync --json``."""

    batches: int = 0
    new_batches: int = 0
    updated_batches: int = 0
    input_lines: int = 0
    result_lines: int = 0
    files_downloaded: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def listed(client: Client, since: datetime) -> Iterator[dict[str, Any]]:
    """``GET /v1/batches`` page by page (newest first) until a batch was created before ``since``."""
    after: str | None = None
    floor = (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()
    while True:
        page = client.ok("GET", f"/batches?limit={PAGE}" + (f"&after={after}" if after else ""))
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list) or not data:
            return
        for b in data:
            if isinstance(b, dict) and isinstance(b.get("created_at"), int | float) and b["created_at"] < floor:
                return
            if isinstance(b, dict) and isinstance(b.get("id"), str):
                yield b
        if not page.get("has_more"):
            return
        after = page.get("last_id") or data[-1].get("id")


class Sync:
    """One run against one database."""

    def __init__(self, db: Database, client: Client, pricer: Pricer | None = None, files: bool = True,
                 dry_run: bool = False, progress: Callable[[str], None] = lambda _: None) -> None:
        self.db, self.client, self.files, self.dry_run = db, client, files, dry_run
        self.pricer = pricer or Pricer()
        self.store = Store(db, lambda: self.pricer)
        self.tally = Tally()
        self.progress = progress

    def run(self, batches: Iterator[dict[str, Any]]) -> Tally:
        started = time.monotonic()
        for b in batches:
            self.tally.batches += 1
            self.progress(f"batch {self.tally.batches}: {b['id']} ({b.get('status')})")
            self.batch(b)
        self.tally.seconds = time.monotonic() - started
        return self.tally

    def batch(self, b: dict[str, Any]) -> None:
        old = rows(self.db, "SELECT status, last_seen_at FROM batches WHERE id = ?", (b["id"],))
        if not old:
            self.tally.new_batches += 1
        elif old[0]["status"] != b.get("status"):
            self.tally.updated_batches += 1
        if self.dry_run:
            return
        op = batch_op(b, time.time(), "sync", self.pricer, self.client.key_fingerprint)
        if op is not None:
            self.store.apply([op])
        if not self.files:
            return
        final = b.get("status") in FINAL
        for file_id, role in ((b.get("input_file_id"), "input"), (b.get("output_file_id"), "output"),
                              (b.get("error_file_id"), "error")):
            if isinstance(file_id, str) and (role == "input" or final) and not self._logged(file_id):
                self.file(b["id"], file_id, role)

    def _logged(self, file_id: str) -> bool:
        got = rows(self.db, "SELECT content_seen, complete FROM files WHERE id = ?", (file_id,))
        return bool(got and got[0]["content_seen"] and got[0]["complete"])

    def file(self, batch_id: str, file_id: str, role: str) -> None:
        """Download one file and store its lines, a few thousand per transaction (constant memory)."""
        self.progress(f"  {role} file {file_id}")
        size = 0

        def read(_: int) -> Iterator[bytes]:
            nonlocal size
            for chunk in self.client.download(file_id):
                size += len(chunk)
                yield chunk

        seen = clock.now()
        try:
            pending: list[Op] = []
            for op in ingest_content(file_id, read, None, self.pricer, seen, False, []):
                pending.append(op)
                if isinstance(op, RequestLines):
                    self.tally.input_lines += len(op.rows)
                elif isinstance(op, ResultLines):
                    self.tally.result_lines += len(op.rows)
                if len(pending) >= OPS_PER_TRANSACTION and isinstance(op, RequestLines | ResultLines):
                    self.store.apply(pending)
                    pending = []
            self.store.apply(pending)
        except APIError as e:
            if e.status in (404, 410):  # expired or deleted: recorded, and the run goes on
                self._gone(batch_id, file_id, role, str(e))
                return
            raise
        self.tally.files_downloaded += 1
        self.tally.bytes += size

    def _gone(self, batch_id: str, file_id: str, role: str, why: str) -> None:
        from velvet_core.storage.ops import FileSeen

        now = clock.now()
        problem = f"{role} file {file_id} could not be downloaded (expired or deleted): {why[:200]}"
        self.store.apply([FileSeen({"id": file_id, "updated_at": now, "first_seen_at": now, "complete": False,
                                    "problem": problem})])
        self.db.execute_sql(f"UPDATE batches SET problem = {self.db.param} WHERE id = {self.db.param}",
                            (problem, batch_id))
