"""The operations the store applies: the one vocabulary between processing and the database.

Processing (:mod:`velvet_core.processing`) turns each snapshot into a sequence of these; the writer
queues them; :class:`~velvet_core.storage.store.Store` has one handler per type. Rows are plain dicts
keyed by column name (missing columns take their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Row = dict[str, Any]


@dataclass(slots=True)
class _OneRow:
    row: Row


@dataclass(slots=True)
class CallRow(_OneRow):
    """A ``calls`` row: one HTTP call as the proxy saw it."""


@dataclass(slots=True)
class FileSeen(_OneRow):
    """A ``files`` row to insert or update (None values leave the stored ones)."""


@dataclass(slots=True)
class UploadSeen(_OneRow):
    """An ``uploads`` row to insert or update."""


@dataclass(slots=True)
class BatchSeen:
    """A batch object observed at ``observed_at`` by ``source`` (create, retrieve, cancel, list)."""

    row: Row
    observed_at: datetime
    source: str
    errors: list[Row] = field(default_factory=list)


@dataclass(slots=True)
class UploadCompleted:
    """``POST /uploads/{id}/complete``: number the parts' lines in ``part_ids`` order, stitch the edges."""

    upload_id: str
    part_ids: list[str]
    file: Row | None


@dataclass(slots=True)
class PartSeen:
    """An upload part whose whole lines are stored; ``head`` and ``tail`` are its partial edge lines."""

    id: str
    upload_id: str | None
    head: bytes
    tail: bytes | None
    lines: int
    bytes: int
    seen_at: datetime | None


@dataclass(slots=True)
class InputDone:
    """All lines of input file ``file_id`` are stored: run the checks that need the whole file."""

    file_id: str


@dataclass(slots=True)
class OutputDone:
    """All lines of output or error file ``file_id`` are stored: match them to their requests."""

    file_id: str
    all_failed: bool = False


@dataclass(slots=True)
class _Rows:
    rows: list[Row]


@dataclass(slots=True)
class RequestLines(_Rows):
    """Up to 500 ``batch_requests`` rows (input lines) of one file or upload part."""


@dataclass(slots=True)
class ResultLines(_Rows):
    """Up to 500 ``batch_results`` rows (output or error lines) of one file."""



@dataclass(slots=True)
class CacheStore:
    """A response cache entry to add (if its key holds fewer than ``bucket`` live entries): ``row`` is the
    ``cache_entries`` row."""

    row: Row
    bucket: int


@dataclass(slots=True)
class CacheHit:
    """The proxy answered a call from cache entry ``entry_id`` at ``at``."""

    entry_id: int
    at: datetime


Op = CallRow | FileSeen | BatchSeen | UploadSeen | UploadCompleted | RequestLines | ResultLines | PartSeen \
    | InputDone | OutputDone | CacheStore | CacheHit
LINES = (RequestLines, ResultLines)
"""Batch-file lines, 500 per operation: written as they come so a big body stays bounded in memory."""
