"""Retention: bodies and rows older than a cutoff removed in small transactions, a batch always whole.

- ``bodies``: the request and response bodies (and a stream's rebuilt text) of calls started before the cutoff,
  and the lines' bodies of batches that ended before it; everything else stays (tokens, costs, status, errors,
  ``custom_id``), and the row says when (``calls.pruned_at``, ``batches.pruned_at`` with ``pruned = 'bodies'``).
- ``rows``: calls started before the cutoff; the input and result lines, events, errors, files and uploads of
  batches that ended before it (the batch row stays, ``pruned = 'rows'``, with its ``batch_counts``). The rollups
  and counters stay, so ``velvet stats``, ``velvet batches`` and the report stay right for those periods.

A batch is pruned by the time it ended, never half: one that has not ended is left alone. Each transaction
changes at most :data:`CHUNK` rows, so a proxy's writer waits for one chunk at most. SQLite files velvet
creates use ``auto_vacuum = INCREMENTAL``: pruning returns their free pages to the disk.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from peewee import Database, SqliteDatabase

from velvet_core import clock
from velvet_core.storage import rollups
from velvet_core.storage.sql import adapt, is_pg, rows, ts

log = logging.getLogger(__name__)

CHUNK = 1000  # rows per transaction
ENDED = "COALESCE(completed_at, failed_at, expired_at, cancelled_at)"
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(h|d|w)\s*$")


class RetentionError(ValueError):
    pass


@dataclass(frozen=True)
class Retention:
    """How long bodies and rows are kept (None: for ever)."""

    bodies: timedelta | None = None
    rows: timedelta | None = None

    @classmethod
    def parse(cls, text: str) -> Retention:
        """``bodies=30d,rows=400d`` (either part; ``h``, ``d`` or ``w``)."""
        parts: dict[str, timedelta] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            name, _, span = item.partition("=")
            m = _SPAN.match(span)
            if name.strip() not in ("bodies", "rows") or not m or name.strip() in parts:
                raise RetentionError(f"velvet_retention: {item!r}: use bodies=30d and/or rows=400d (h, d or w)")
            parts[name.strip()] = timedelta(hours=float(m[1]) * {"h": 1, "d": 24, "w": 168}[m[2]])
        if not parts:
            raise RetentionError("velvet_retention: say bodies=30d and/or rows=400d")
        r = cls(**parts)
        if r.bodies and r.rows and r.rows < r.bodies:
            raise RetentionError("velvet_retention: rows cannot be kept for less time than bodies")
        return r

    def __str__(self) -> str:
        return ",".join(f"{k}={_days(v)}" for k, v in (("bodies", self.bodies), ("rows", self.rows)) if v)


def _days(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours / 24:g}d" if hours % 24 == 0 else f"{hours:g}h"


@dataclass
class Pruned:
    calls_pruned: int = 0
    call_bodies_pruned: int = 0
    batches_pruned: int = 0
    lines_pruned: int = 0
    bytes_freed: int = 0  # the size of the bodies removed (with their rows, or alone)
    cache_entries_pruned: int = 0  # response cache entries (each a copy of an answer)
    seconds: float = 0.0
    longest_transaction_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls_pruned": self.calls_pruned, "call_bodies_pruned": self.call_bodies_pruned,
                "batches_pruned": self.batches_pruned, "lines_pruned": self.lines_pruned,
                "bytes_freed": self.bytes_freed, "cache_entries_pruned": self.cache_entries_pruned,
                "seconds": round(self.seconds, 3)}


def prune(db: Database, *, bodies_before: datetime | None = None, rows_before: datetime | None = None,
          dry_run: bool = False, stop: Callable[[], bool] = lambda: False) -> Pruned:
    """Prune what is older than the cutoffs; ``dry_run`` counts the same figures and changes nothing."""
    t0 = time.perf_counter()
    out = Pruned()
    job = _Job(db, out, dry_run, stop)
    if rows_before is not None:
        job.call_rows(rows_before)
        job.line_partitions(rows_before)
        for batch_id in job.ended_batches(rows_before, "rows"):
            job.batch_rows(batch_id)
        job.loose_lines(rows_before, delete=True)
        job.cache_entries(rows_before)
    if bodies_before is not None:
        job.cache_entries(bodies_before)
        job.call_bodies(bodies_before)
        for batch_id in job.ended_batches(bodies_before, "bodies"):
            job.batch_bodies(batch_id)
        job.loose_lines(bodies_before, delete=False)
    if not dry_run and isinstance(db, SqliteDatabase) and db.execute_sql("PRAGMA auto_vacuum").fetchone()[0] == 2:
        while not stop() and db.execute_sql("PRAGMA freelist_count").fetchone()[0]:
            job.timed(lambda: db.execute_sql("PRAGMA incremental_vacuum(1000)").fetchall())
    out.seconds = time.perf_counter() - t0
    return out


_BODY_LEN = {False: "COALESCE(length(CAST({0} AS BLOB)), 0)",  # bytes, on SQLite and on PostgreSQL
             True: "COALESCE(octet_length({0}::text), 0)"}
_CALL_BODIES = ("request_body", "response_body", "response_text")
# the files of a batch: its own, and those it names (an input file is uploaded before the batch exists)
_BATCH_FILES = ("SELECT id FROM files WHERE batch_id = ? UNION SELECT input_file_id FROM batches WHERE id = ? "
                "UNION SELECT output_file_id FROM batches WHERE id = ? UNION SELECT error_file_id FROM batches "
                "WHERE id = ?")
_TAKEN = ("SELECT input_file_id FROM batches UNION SELECT output_file_id FROM batches UNION SELECT error_file_id "
          "FROM batches")


class _Job:
    def __init__(self, db: Database, out: Pruned, dry_run: bool, stop: Callable[[], bool]) -> None:
        self.db, self.out, self.dry_run, self.stop = db, out, dry_run, stop

    def timed(self, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            took = (time.perf_counter() - t) * 1000
            self.out.longest_transaction_ms = max(self.out.longest_transaction_ms, took)

    def sql(self, text: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return rows(self.db, text, params)

    def run(self, text: str, params: Any = ()) -> None:
        self.db.execute_sql(adapt(self.db, text), tuple(params))

    def chunks(self, select: str, params: tuple[Any, ...], apply: Callable[[list[int]], None]) -> int:
        """``apply`` the ids ``select`` finds (``id > ?`` and a ``LIMIT`` added), a chunk per transaction."""
        done, last = 0, 0
        while not self.stop():
            ids = [r["id"] for r in self.sql(f"{select} AND id > ? ORDER BY id LIMIT {CHUNK}", (*params, last))]
            if not ids:
                break
            last = ids[-1]
            if not self.dry_run:
                def step(ids: list[int] = ids) -> None:
                    with self.db.atomic():
                        apply(ids)
                self.timed(step)
            done += len(ids)
        return done

    def sizes(self, table: str, columns: tuple[str, ...], select: str, params: tuple[Any, ...]) -> None:
        """Count the bytes of ``columns`` in the rows ``select`` finds, as freed."""
        total = " + ".join(_BODY_LEN[is_pg(self.db)].format(c) for c in columns)
        where = select.split(" WHERE ", 1)[1]
        found = self.sql(f"SELECT COALESCE(sum({total}), 0) AS n FROM {table} WHERE {where}", params)
        self.out.bytes_freed += int(found[0]["n"])

    @staticmethod
    def marks(ids: list[int]) -> str:
        return ", ".join("?" * len(ids))

    # -- calls --------------------------------------------------------------------------------------

    def call_rows(self, before: datetime) -> None:
        if not self.dry_run:  # first: a rebuild must keep the rollups of what goes (even if this stops half-way)
            found = self.sql("SELECT value FROM velvet_meta WHERE key = ?", (rollups.PRUNED_BEFORE,))
            if not found or clock.parse(found[0]["value"]) < before:  # type: ignore[operator]
                with self.db.atomic():
                    self.run("DELETE FROM velvet_meta WHERE key = ?", (rollups.PRUNED_BEFORE,))
                    self.run("INSERT INTO velvet_meta (key, value) VALUES (?, ?)",
                             (rollups.PRUNED_BEFORE, before.isoformat(sep=" ")))
        select, params = "SELECT id FROM calls WHERE started_at < ?", (ts(self.db, before),)
        self.sizes("calls", _CALL_BODIES, select, params)
        if not self.dry_run:  # PostgreSQL, velvet_pg_partitions: the periods wholly before go whole
            from velvet_core.storage import partitions

            self.out.calls_pruned += partitions.drop_before(self.db, before, self.timed)[1]
        self.out.calls_pruned += self.chunks(
            select, params, lambda ids: self.run(f"DELETE FROM calls WHERE id IN ({self.marks(ids)})", ids))

    def call_bodies(self, before: datetime) -> None:
        now = ts(self.db, clock.now())
        select = ("SELECT id FROM calls WHERE started_at < ? AND (request_body IS NOT NULL OR response_body "
                  "IS NOT NULL OR response_text IS NOT NULL)")
        params = (ts(self.db, before),)
        self.sizes("calls", _CALL_BODIES, select, params)
        self.out.call_bodies_pruned += self.chunks(select, params, lambda ids: self.run(
            "UPDATE calls SET request_body = NULL, response_body = NULL, response_text = NULL, pruned_at = ? "
            f"WHERE id IN ({self.marks(ids)})", (now, *ids)))

    def cache_entries(self, before: datetime) -> None:
        """The response cache's entries stored before the cutoff: each holds a copy of an answer (a body)."""
        select, params = "SELECT id FROM cache_entries WHERE created_at < ?", (ts(self.db, before),)
        self.sizes("cache_entries", ("body",), select, params)
        self.out.cache_entries_pruned += self.chunks(
            select, params,
            lambda ids: self.run(f"DELETE FROM cache_entries WHERE id IN ({self.marks(ids)})",
                                 ids))

    # -- batches ------------------------------------------------------------------------------------

    def ended_batches(self, before: datetime, what: str) -> list[str]:
        """Batches that ended before ``before`` and are not pruned that far yet."""
        done = "('rows')" if what == "rows" else "('rows', 'bodies')"
        return [r["id"] for r in self.sql(
            f"SELECT id FROM batches WHERE {ENDED} < ? AND (pruned IS NULL OR pruned NOT IN {done}) "
            f"ORDER BY {ENDED}", (ts(self.db, before),))]

    def lines(self, where: str, params: tuple[Any, ...], *, delete: bool) -> int:
        """The input and result lines ``where`` finds: deleted (results first: they point at their
        requests), or their bodies removed; returns how many lines."""
        n = 0
        for table in ("batch_results", "batch_requests"):
            select = f"SELECT id FROM {table} WHERE {where}" + ("" if delete else " AND body IS NOT NULL")
            self.sizes(table, ("body",), select, params)
            verb = f"DELETE FROM {table}" if delete else f"UPDATE {table} SET body = NULL"

            def apply(ids: list[int], verb: str = verb) -> None:
                self.run(f"{verb} WHERE id IN ({self.marks(ids)})", ids)
            n += self.chunks(select, params, apply)
        return n

    def line_partitions(self, before: datetime) -> None:
        """PostgreSQL, velvet_pg_partitions: the batch tables' partitions wholly before the cutoff that hold only
        lines retention takes go whole (the batches they belong to then lose the rest of their lines below)."""
        if self.dry_run:
            return
        from velvet_core.storage import partitions

        _, lines, size = partitions.drop_lines_before(self.db, before, self.timed)
        self.out.lines_pruned += lines
        self.out.bytes_freed += size

    def batch_bodies(self, batch_id: str) -> None:
        self.lines("batch_id = ?", (batch_id,), delete=False)
        if self.stop():
            return
        if not self.dry_run:
            self.run("UPDATE batches SET pruned = 'bodies', pruned_at = ? WHERE id = ?",
                     (ts(self.db, clock.now()), batch_id))
        self.out.batches_pruned += 1

    def batch_rows(self, batch_id: str) -> None:
        self.out.lines_pruned += self.lines("batch_id = ?", (batch_id,), delete=True)
        if self.stop():
            return
        files = [r["id"] for r in self.sql(_BATCH_FILES, (batch_id,) * 4) if r["id"] is not None]
        if not self.dry_run:
            self.timed(lambda: self._batch_rest(batch_id, files))
        self.out.batches_pruned += 1

    def _batch_rest(self, batch_id: str, files: list[str]) -> None:
        """Its events, errors and files (with the uploads they came from) in one transaction, and the mark."""
        with self.db.atomic():
            for table in ("batch_events", "batch_errors"):
                self.run(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))
            for f in files:  # (a file whose lines another batch holds stays)
                if self.sql("SELECT id FROM batch_requests WHERE file_id = ? UNION ALL SELECT id FROM "
                            "batch_results WHERE file_id = ? LIMIT 1", (f, f)):
                    continue
                self.run("DELETE FROM upload_parts WHERE upload_id IN (SELECT id FROM uploads WHERE file_id = ?)",
                         (f,))
                self.run("DELETE FROM uploads WHERE file_id = ?", (f,))
                self.run("DELETE FROM files WHERE id = ?", (f,))
            self.run("UPDATE batches SET pruned = 'rows', pruned_at = ? WHERE id = ?",
                     (ts(self.db, clock.now()), batch_id))

    def loose_lines(self, before: datetime, *, delete: bool) -> None:
        """Lines of files no batch took (an upload never submitted), by the time the file was first seen."""
        old = self.sql(f"SELECT id FROM files WHERE batch_id IS NULL AND first_seen_at < ? AND id NOT IN (SELECT "
                       f"t.input_file_id FROM ({_TAKEN}) t WHERE t.input_file_id IS NOT NULL)",
                       (ts(self.db, before),))
        for f in old:
            n = self.lines("batch_id IS NULL AND file_id = ?", (f["id"],), delete=delete)
            if delete:
                self.out.lines_pruned += n


class Pruner(threading.Thread):
    """The proxy's retention (``velvet_retention``): prunes once an hour on its own connection, off the event
    loop; records its last run in ``velvet_meta`` for ``velvet status``."""

    def __init__(self, open_db: Callable[[], Database], retention: Retention, every: float = 3600.0) -> None:
        super().__init__(name="velvet-retention", daemon=True)
        self.open_db, self.retention, self.every = open_db, retention, every
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.once()
            except Exception:  # the next hour tries again; the proxy goes on
                log.exception("velvet: retention failed")
            self.halt.wait(self.every)

    def once(self) -> Pruned:
        db = self.open_db()
        try:
            now = clock.now()
            done = prune(db, bodies_before=now - self.retention.bodies if self.retention.bodies else None,
                         rows_before=now - self.retention.rows if self.retention.rows else None,
                         stop=self.halt.is_set)
            record(db, self.retention, done)
            if done.calls_pruned or done.call_bodies_pruned or done.batches_pruned:
                log.info("velvet: retention %s: %s", self.retention, done.as_dict())
            return done
        finally:
            db.close()

    def stop(self) -> None:
        self.halt.set()


def record(db: Database, retention: Retention, done: Pruned) -> None:
    """``velvet_meta``'s ``retention`` (what is in force) and ``retention_last_run`` (when, and what it did)."""
    import orjson

    last = orjson.dumps({"at": clock.iso_z(clock.now()), **done.as_dict()}).decode()
    for key, value in (("retention", str(retention)), ("retention_last_run", last)):
        with db.atomic():
            db.execute_sql(adapt(db, "DELETE FROM velvet_meta WHERE key = ?"), (key,))
            db.execute_sql(adapt(db, "INSERT INTO velvet_meta (key, value) VALUES (?, ?)"), (key, value))
