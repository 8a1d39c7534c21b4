"""The proxy keeps open batches current (``velvet_refresh``): every so often it retrieves each batch that is not
final in its logs and was created in the last 48 hours, **through itself**, so the retrievals are logged as any
call and the batch's row and events follow; with ``velvet_refresh_download`` it also downloads the output and error
files of batches that ended, so their answers are logged even when the app reads them elsewhere, or never.
A 429 doubles the wait (up to an hour); one refresh at a time (the background process's loop)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from peewee import Database

from velvet_core import clock
from velvet_core.api.client import APIError, Client
from velvet_core.storage.sql import rows, ts

log = logging.getLogger("velvet")
FINAL = ("completed", "failed", "expired", "cancelled")
RECENT = timedelta(hours=48)
MAX_WAIT = 3600.0


class Refresher:
    def __init__(self, db: Database, client: Client, interval: float, download: bool) -> None:
        self.db, self.client, self.interval, self.download = db, client, interval, download
        self.wait = interval
        self.next = time.monotonic() + interval  # the first round after one interval (a restart hammers nothing)
        self.rounds = 0
        self.last: dict[str, Any] = {}

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def step(self) -> dict[str, Any]:
        """One round: each open batch retrieved (through the proxy), the files of those that ended downloaded."""
        since = ts(self.db, clock.now() - RECENT)
        marks = ", ".join("?" * len(FINAL))
        open_ = rows(self.db, f"SELECT id FROM batches WHERE status NOT IN ({marks}) AND created_at >= ? "
                              "ORDER BY created_at", (*FINAL, since))
        ended: list[dict[str, Any]] = []
        retrieved = limited = 0
        try:
            for r in open_:
                b = self.client.batch(r["id"])
                retrieved += 1
                if b.get("status") in FINAL:
                    ended.append(b)
            if self.download:
                ended += self._unread(since)
                for b in ended:
                    for file_id in (b.get("output_file_id"), b.get("error_file_id")):
                        if isinstance(file_id, str) and not self._read(file_id):
                            for _ in self.client.download(file_id):  # the proxy logs the lines as they pass
                                pass
            self.wait = self.interval
        except APIError as e:
            if e.status != 429:
                raise
            limited = 1
            self.wait = min(self.wait * 2, MAX_WAIT)
            log.warning("velvet: refresh: the API answered 429; next round in %.0f s", self.wait)
        finally:
            self.next = time.monotonic() + self.wait
            self.rounds += 1
        self.last = {"at": clock.now().isoformat(timespec="seconds") + "Z", "open_batches": len(open_),
                     "retrieved": retrieved, "rate_limited": bool(limited)}
        return self.last

    def _read(self, file_id: str) -> bool:
        got = rows(self.db, "SELECT content_seen, complete FROM files WHERE id = ?", (file_id,))
        return bool(got and got[0]["content_seen"] and got[0]["complete"])

    def _unread(self, since: Any) -> list[dict[str, Any]]:
        """Batches that ended (in the logs) with an output or error file never downloaded."""
        marks = ", ".join("?" * len(FINAL))
        got = rows(self.db, f"""SELECT b.id, b.output_file_id, b.error_file_id FROM batches b
            WHERE b.status IN ({marks}) AND b.created_at >= ? AND (
                (b.output_file_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id = b.output_file_id
                                                              AND f.content_seen AND f.complete))
             OR (b.error_file_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id = b.error_file_id
                                                             AND f.content_seen AND f.complete)))""",
                   (*FINAL, since))
        return got
