"""What spool files hold: operations and unprocessed snapshots, pickled; files of older versions read too."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from velvet_core.capture.snapshot import CallSnapshot
from velvet_core.storage import ops


@dataclass(slots=True)
class Unprocessed:
    """A snapshot spooled before it was processed (the queue was full)."""

    snapshot: CallSnapshot


# where classes lived before the package was grouped (spool files of 0.1 name them so)
_MOVED = {"velvet_core.snapshot": "velvet_core.capture.snapshot",
          "velvet_core.classify": "velvet_core.parsing.classify"}


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED.get(module, module), name)


def upgrade(entry: Any) -> ops.Op | Unprocessed | None:
    """An entry of a spool file as today's types: 0.1 wrote ``(kind, payload)`` tuples."""
    if not isinstance(entry, tuple):
        return entry
    kind, p = entry
    match kind:
        case "raw":
            return Unprocessed(p[1])
        case "call":
            return ops.CallRow(p)
        case "file":
            return ops.FileSeen(p)
        case "upload":
            return ops.UploadSeen(p)
        case "batch":
            return ops.BatchSeen(p["row"], p["observed_at"], p["source"], p["errors"])
        case "upload_complete":
            return ops.UploadCompleted(p["upload_id"], p["part_ids"], p["file"])
        case "request_rows":
            return ops.RequestLines(p["rows"])
        case "result_rows":
            return ops.ResultLines(p["rows"])
        case "part_done":
            return ops.PartSeen(p["id"], p["upload_id"], p["head"], p["tail"], p["lines"], p["bytes"],
                                p["seen_at"])
        case "requests_done":
            return ops.InputDone(p["file_id"])
        case "results_done":
            return ops.OutputDone(p["file_id"], p.get("all_failed", False))
    return None
