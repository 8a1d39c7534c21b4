"""Apply prepared operations to the database (writer thread only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peewee import Database, SqliteDatabase

from velvet_core.cost.prices import Pricer
from velvet_core.storage import batch_store, cache_store, models, rollups
from velvet_core.storage.ops import (
    BatchSeen,
    CacheHit,
    CacheStore,
    CallRow,
    FileSeen,
    InputDone,
    Op,
    OutputDone,
    PartSeen,
    RequestLines,
    ResultLines,
    UploadCompleted,
    UploadSeen,
)


def _each(apply: Callable[[Any], None]) -> Callable[[list[Any]], None]:
    def handle(ops: list[Any]) -> None:
        for op in ops:
            apply(op)

    return handle


HANDLERS: dict[type, Callable[[list[Any]], object]] = {
    # consecutive operations of one type are handed over together: rows go in with one executemany
    CallRow: lambda ops: rollups.add_calls([op.row for op in ops]),  # and the hourly/daily rollups
    RequestLines: lambda ops: batch_store.add_lines(models.BatchRequest, [r for op in ops for r in op.rows]),
    ResultLines: lambda ops: batch_store.add_lines(models.BatchResult, [r for op in ops for r in op.rows]),
    FileSeen: _each(lambda op: batch_store.upsert_file(op.row)),
    UploadSeen: _each(lambda op: batch_store.upsert_upload(op.row)),
    UploadCompleted: _each(batch_store.complete_upload),
    PartSeen: _each(batch_store.part_seen),
    CacheStore: cache_store.add_entries,
    CacheHit: cache_store.count_hits,
}
# Operations that neither need another operation of their transaction nor are needed by one: the cache's (an
# entry carries its own copy of the answer; a hit names an entry committed before, or the proxy could not have
# found it). They are applied last, so a miss's entry does not cut its flow's call row from the next flow's: with
# every call a miss, the writer stored each call alone (its own look-up of known flow ids, its own rollup
# update) and spent 95 us per call instead of 41 (in-process, 20,000 snapshots into SQLite).
INDEPENDENT = (CacheStore, CacheHit)
# the operations that match answers to requests, and so price the answers that name no model (images)
PRICED: dict[type, Callable[[Any, Pricer], None]] = {
    BatchSeen: batch_store.upsert_batch,
    InputDone: lambda op, pricer: batch_store.requests_done(op.file_id, pricer),
    OutputDone: lambda op, pricer: batch_store.results_done(op.file_id, pricer),
}


class Store:
    """Writes operations in one transaction per group (writer thread only)."""

    def __init__(self, db: Database, pricer: Callable[[], Pricer] | None = None) -> None:
        self.db = db
        self.pricer = pricer or Pricer  # (called per group: the user's price file may change)
        # SQLite: take the write lock at BEGIN, so what a handler reads (which calls exist, rollup rows)
        # cannot change before it writes (and a second writer waits instead of failing mid-way)
        self._lock = {"lock_type": "IMMEDIATE"} if isinstance(db, SqliteDatabase) else {}

    def apply(self, ops: list[Op]) -> None:
        """Write ``ops`` atomically, handing consecutive operations of one type to their handler together (in
        their order, but for the :data:`INDEPENDENT` ones, which come last)."""
        if any(type(op) in INDEPENDENT for op in ops):
            ops = [op for op in ops if type(op) not in INDEPENDENT] + [op for op in ops if type(op) in INDEPENDENT]
        with models.use(self.db), self.db.atomic(**self._lock):
            group: list[Op] = []
            for op in ops:
                if group and type(op) is not type(group[0]):
                    self._handle(group)
                    group = []
                group.append(op)
            if group:
                self._handle(group)

    def _handle(self, group: list[Op]) -> None:
        if priced := PRICED.get(type(group[0])):
            pricer = self.pricer()
            for op in group:
                priced(op, pricer)
        else:
            HANDLERS[type(group[0])](group)
