"""Reading a live proxy's journal as it grows: how the writer process receives the flows.

The proxy appends whole frames to its current segment and starts a new one from time to time; a
segment is complete once a newer one exists (or the proxy has stopped). A frame still being written
is read again later. A segment is deleted once it is complete and each of its flows is safe.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

from velvet_core.storage.snapshot import CallSnapshot, from_record
from velvet_core.writer.journal import FRAME
from velvet_core.writer.spool import Unpickler, quarantine

log = logging.getLogger("velvet")


class TailSegment:
    """A segment being read; ``release`` is called once per flow when it is safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.outstanding = 0
        self.complete = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self.outstanding -= 1
        self._maybe_delete()

    def finish(self) -> None:
        self.complete = True
        self._maybe_delete()

    def _maybe_delete(self) -> None:
        with self._lock:
            if self.complete and self.outstanding == 0:
                self.path.unlink(missing_ok=True)


def _number(path: Path) -> int:
    try:
        return int(path.name.rsplit(".", 1)[0].rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


class Tail:
    """The journal segments of proxy ``pid`` for database ``tag``, read in order as they grow."""

    def __init__(self, directory: Path, tag: str, pid: int) -> None:
        self.dir = directory
        self.pattern = f"journal-{tag}-{pid}-*.log"
        self.segments: dict[Path, TailSegment] = {}
        self.done: set[Path] = set()  # complete segments still on disk (some of their flows are not yet safe)

    def poll(self, final: bool = False) -> list[tuple[CallSnapshot, TailSegment]]:
        """The flows appended since the last call; ``final``: the proxy has stopped, every segment is complete."""
        out: list[tuple[CallSnapshot, TailSegment]] = []
        found = list(self.dir.glob(self.pattern))
        if self.done:  # (a deleted segment is never listed again: forgotten, else the set grows while it runs)
            self.done.intersection_update(found)
        paths = sorted((p for p in found if p not in self.done), key=_number)
        for i, path in enumerate(paths):
            seg = self.segments.setdefault(path, TailSegment(path))
            self._read(seg, out)
            if final or i < len(paths) - 1:  # a newer segment exists: the proxy has moved on
                self._read(seg, out)  # (what was appended between the two reads)
                self.done.add(path)
                del self.segments[path]
                seg.finish()
        return out

    def _read(self, seg: TailSegment, out: list[tuple[CallSnapshot, TailSegment]]) -> None:
        try:
            f = open(seg.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            f.seek(seg.offset)
            while True:
                head = f.read(FRAME.size)
                if len(head) < FRAME.size:
                    return
                (size,) = FRAME.unpack(head)
                data = f.read(size)
                if len(data) < size:
                    return  # being written: read again next time
                seg.offset += FRAME.size + size
                try:
                    snap = from_record(Unpickler(io.BytesIO(data)).load())
                except Exception as e:  # (quarantine logs it: a damaged file is not a bug of ours)
                    quarantine(seg.path, f"damaged journal entry ({type(e).__name__}: {e})")
                    return
                if snap is not None:
                    with seg._lock:
                        seg.outstanding += 1
                    out.append((snap, seg))
