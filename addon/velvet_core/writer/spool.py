"""Spool files: operations (and unprocessed snapshots) kept on disk while the database cannot take them.

Each file is a sequence of pickled lists, fsynced as written, replayed when the database is back or at
the next start, and deleted only once its operations are written. A damaged file is quarantined
(renamed ``*.damaged-…``, kept, never deleted automatically); what could be read of it is replayed.
Files written by velvet 0.1 (``(kind, payload)`` tuples, classes at their old module paths) are read too.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velvet_core.pids import alive as pid_alive
from velvet_core.private import open_private, private_dir
from velvet_core.storage import ops
from velvet_core.storage.snapshot import CallSnapshot

log = logging.getLogger("velvet")


@dataclass(slots=True)
class Unprocessed:
    """A snapshot spooled before it was processed (the queue was full)."""

    snapshot: CallSnapshot


Entry = ops.Op | Unprocessed


class Spool:
    """This process's spool file for one database (``tag``), and the files left for it by others."""

    def __init__(self, directory: Path, tag: str) -> None:
        self.dir = directory
        self.tag = tag
        self.path = directory / f"spool-{tag}-{os.getpid()}-{int(time.time() * 1000)}.pkl"
        self.entries = 0  # written to disk by this process
        self.quarantined = 0
        self._lock = threading.Lock()  # the event loop spools too, when the queue is full

    def write(self, entries: Sequence[Entry]) -> None:
        """Append ``entries`` durably (fsync); raises OSError when the disk refuses."""
        if not entries:
            return
        with self._lock:
            private_dir(self.dir)
            with open_private(self.path, "ab") as f:
                pickle.dump(list(entries), f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            self.entries += len(entries)

    def claim(self) -> list[Path]:
        """Spool files for this database (this process's own included), renamed so only we replay them."""
        if not self.dir.is_dir():
            return []
        stale = [p for p in self.dir.glob(f"spool-{self.tag}-*.replaying-*")
                 if not pid_alive(int(p.name.rsplit("-", 1)[1]))]
        claimed = []
        for path in sorted([*self.dir.glob(f"spool-{self.tag}-*.pkl"), *stale]):
            mine = path.with_name(f"{path.name.split('.pkl', 1)[0]}.pkl.replaying-{os.getpid()}")
            with self._lock:  # not while this process appends to it
                try:
                    path.rename(mine)
                except OSError:
                    continue
            claimed.append(mine)
        return claimed

    def read(self, path: Path) -> list[Entry]:
        """The entries of a claimed file; a damaged file is quarantined after what could be read."""
        entries: list[Any] = []
        with open(path, "rb") as f:
            while True:
                try:
                    entries.extend(Unpickler(f).load())
                except EOFError:
                    break
                except Exception as e:
                    self.quarantined += 1
                    quarantine(path, f"damaged spool file ({type(e).__name__}: {e}); "
                                     f"{len(entries)} operations read before the damage")
                    break
        return [u for u in map(upgrade, entries) if u is not None]


def quarantine(path: Path, why: str) -> Path | None:
    """Rename ``path`` aside (kept for a person to look at, never deleted automatically)."""
    target = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    try:
        path.rename(target)
    except OSError as e:
        log.warning("velvet: %s: %s; could not quarantine it (%s)", path, why, e)
        return None
    log.warning("velvet: %s: %s; kept as %s", path, why, target)
    return target


# where classes lived before (spool files of 0.1, and of the layout before issue 19, name them so)
_MOVED = {"velvet_core.snapshot": "velvet_core.storage.snapshot",
          "velvet_core.capture.snapshot": "velvet_core.storage.snapshot",
          "velvet_core.classify": "velvet_core.parsing.classify"}


# Everything a spool file or a journal frame may name: velvet's own types and the few of Python's they hold.
_ALLOWED = frozenset({
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta"), ("decimal", "Decimal"),
    ("pathlib", "PosixPath"), ("pathlib", "Path"), ("pathlib._local", "PosixPath"), ("pathlib._local", "Path"),
    ("velvet_core.parsing.classify", "Route"), ("velvet_core.storage.snapshot", "CallSnapshot"),
    ("velvet_core.storage.snapshot", "TapInfo"), ("velvet_core.storage.snapshot", "_rebuild"),
    ("velvet_core.writer.spool", "Unprocessed"),
    *(("velvet_core.storage.ops", n) for n, c in vars(ops).items()
      if isinstance(c, type) and c.__module__ == ops.__name__),
})


class Unpickler(pickle.Unpickler):
    """Reads only what velvet wrote: plain values and the types of :data:`_ALLOWED`. Any other name (``os.system``,
    another package's class) is refused before it is even imported, so a planted file runs nothing: it is
    quarantined as damaged."""

    def find_class(self, module: str, name: str) -> Any:
        module = _MOVED.get(module, module)
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not one of velvet's own types")
        return super().find_class(module, name)


def upgrade(entry: Any) -> Entry | None:
    """An entry of a spool file as today's types: 0.1 wrote ``(kind, payload)`` tuples."""
    if not isinstance(entry, tuple):
        return entry  # type: ignore[no-any-return,unused-ignore]
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
