"""Apply prepared operations to the database (writer thread only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peewee import Database

from . import models

Op = tuple[str, Any]
CHUNK = 500


def chunks(rows: list[dict[str, Any]], n: int = CHUNK) -> Iterable[list[dict[str, Any]]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def full_rows(model: type[models.Base], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row every column (insert_many wants one shape), using field defaults."""
    fields = [f for f in model._meta.sorted_fields if not isinstance(f, models.AutoField)]
    defaults = {f.name: f.default if not callable(f.default) else f.default() for f in fields}
    return [{**defaults, **r} for r in rows]


class Store:
    """Writes operations (``("call", row)``, …) in one transaction per group."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.handlers = {"call": self._calls}

    def register(self, kind: str, handler: Any) -> None:
        """Add a handler ``f(rows: list) -> None`` for ops of ``kind`` (used by the batch module)."""
        self.handlers[kind] = handler

    def apply(self, ops: list[Op]) -> None:
        """Write ``ops`` atomically, grouping consecutive ops of the same kind."""
        with models.use(self.db), self.db.atomic():
            group: list[Any] = []
            kind = None
            for k, payload in ops:
                if k != kind and group:
                    self.handlers[kind](group)
                    group = []
                kind = k
                group.append(payload)
            if group:
                self.handlers[kind](group)

    def _calls(self, rows: list[dict[str, Any]]) -> None:
        for part in chunks(rows, 100):
            models.Call.insert_many(full_rows(models.Call, part)).on_conflict_ignore().execute()
