"""The journal: each finished flow, appended on the event loop before its response goes to the client.

A SIGKILL loses the writer's queue, not the journal: at the next start the flows of a dead proxy's
journal are processed again (writes are idempotent: ``flow_id`` and line numbers are unique). The
journal is split in small segments; a segment is deleted once every flow in it is in the database or
the spool. The cost on the event loop is one pickle and one ``write`` per flow (no fsync: a killed
process loses nothing the kernel already has; a power cut may lose the last moments).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # (Windows: no writer process there)
    fcntl = None  # type: ignore[assignment]

from velvet_core.pids import alive as pid_alive
from velvet_core.private import open_private, private_dir
from velvet_core.storage.snapshot import CallSnapshot, from_record, to_record
from velvet_core.writer.spool import Unpickler, quarantine

log = logging.getLogger("velvet")

FRAME = struct.Struct("<I")


class Segment:
    """One journal file; ``outstanding`` flows not yet written (or spooled)."""

    __slots__ = ("count", "file", "journal", "opened", "outstanding", "path")

    def __init__(self, path: Path, journal: Journal) -> None:
        self.path = path
        self.journal = journal
        self.file: Any = open_private(path, "ab", buffering=0)  # (closed on rotation)
        self.opened = time.monotonic()
        self.count = 0
        self.outstanding = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def release(self) -> None:
        """One of its flows is safe (written or spooled)."""
        self.journal.done(self)


class Journal:
    """Append on the event loop (:meth:`append`), acknowledge from the writer thread (:meth:`done`)."""

    def __init__(self, directory: Path, tag: str, max_entries: int = 1000, max_age: float = 2.0) -> None:
        self.dir = directory
        self.tag = tag
        self.max_entries = max_entries
        self.max_age = max_age
        self._lock = threading.Lock()
        self._current: Segment | None = None
        self._n = 0
        self.broken: str | None = None  # why appending failed last (a full disk, say)

    def append(self, snapshot: CallSnapshot) -> Segment | None:
        """Record ``snapshot``; None if it could not be recorded (then only the queue holds it)."""
        try:
            data = pickle.dumps(to_record(snapshot), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            self._fail(e)
            return None
        with self._lock:
            frame = FRAME.pack(len(data)) + data
            try:
                seg = self._current  # (the segment's checks here: a method call less for every flow)
                if seg is None or seg.count >= self.max_entries or time.monotonic() - seg.opened > self.max_age:
                    seg = self._next_segment()
                written = seg.file.write(frame)
                if written != len(frame):  # (a file size limit, a full disk: the kernel took part of it)
                    raise OSError(f"short write ({written} of {len(frame)} bytes)")
            except Exception as e:
                self._fail(e)
                self._rotate()  # never append after a torn frame: readers stop at it
                return None
            seg.count += 1
            seg.outstanding += 1
            self.broken = None
            return seg

    def done(self, seg: Segment) -> None:
        """A flow of ``seg`` is safe (written or spooled): delete the segment once all of its are."""
        with self._lock:
            seg.outstanding -= 1
            if seg is self._current and time.monotonic() - seg.opened > self.max_age:
                self._rotate()
            elif seg is not self._current and seg.outstanding == 0:
                seg.path.unlink(missing_ok=True)

    def close(self) -> None:
        """At shutdown: a segment whose flows are all safe goes; others stay for the next start."""
        with self._lock:
            if self._current is not None:
                self._rotate()

    def _next_segment(self) -> Segment:
        """Close the current segment (full, or old: :meth:`append` checked) and open a new one."""
        self._rotate()
        private_dir(self.dir)
        self._n += 1
        name = f"journal-{self.tag}-{os.getpid()}-{int(time.time())}-{self._n}.log"
        self._current = Segment(self.dir / name, self)
        return self._current

    def _rotate(self) -> None:
        cur, self._current = self._current, None
        if cur is not None:
            cur.close()
            if cur.outstanding == 0:
                cur.path.unlink(missing_ok=True)

    def _fail(self, e: BaseException) -> None:
        if self.broken is None:
            log.warning("velvet: cannot write the journal in %s (%s: %s); flows are still written, but a crash "
                        "now would lose the ones queued", self.dir, type(e).__name__, e)
        self.broken = f"{type(e).__name__}: {e}"


def _lock_path(directory: Path, tag: str, pid: int) -> Path:
    return directory / f"writer-{tag}-{pid}.lock"


def hold(directory: Path, tag: str, pid: int) -> IO[bytes] | None:
    """Say that this process writes proxy ``pid``'s journal (a writer process does, from its start), until it
    ends: a lock that goes with the process however it ends. While it is held, a proxy started meanwhile leaves
    that journal alone (see :func:`finishing`): after mitmdump alone was killed, its writer process still
    finishes the flows it has read, and the spill files it deletes once written must not be read twice."""
    if fcntl is None:
        return None
    private_dir(directory)
    f = open_private(_lock_path(directory, tag, pid), "ab")  # (kept open: the lock lives with the process)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # (another writer process for the same proxy: not started by velvet; its lock stays)
        log.warning("velvet: another writer process is writing the journal of proxy %d", pid)
        f.close()
        return None
    return f


def release(directory: Path, tag: str, pid: int, lock: IO[bytes] | None) -> None:
    """At the end of a writer process: the lock file goes (the lock itself goes with the process)."""
    if lock is not None:
        _lock_path(directory, tag, pid).unlink(missing_ok=True)
        lock.close()


def finishing(directory: Path, tag: str, pid: int) -> bool:
    """Whether a writer process still finishes the journal of proxy ``pid`` (it holds the lock of :func:`hold`)."""
    if fcntl is None:
        return False
    path = _lock_path(directory, tag, pid)
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
    with contextlib.suppress(OSError):  # free: its writer process is gone too
        path.unlink()
    return False


def left_behind(directory: Path, tag: str, skip: int | None = None) -> list[Path]:
    """Journal segments of proxies that are gone (killed), claimed for replay by this process (``skip``: a
    proxy whose journal is read otherwise, by its writer process; so is that of a dead proxy whose writer
    process still finishes it)."""
    if not directory.is_dir():
        return []
    claimed = []
    for path in sorted(directory.glob(f"journal-{tag}-*")):
        owner = _owner(path)
        if owner is None or owner in (os.getpid(), skip) or pid_alive(owner) or finishing(directory, tag, owner):
            continue
        mine = path.with_name(f"{path.name.split('.', 1)[0]}.log.replaying-{os.getpid()}")
        try:
            path.rename(mine)  # only one process replays a given segment
        except OSError:
            continue
        claimed.append(mine)
    return claimed


def _owner(path: Path) -> int | None:
    """The pid that wrote (``journal-TAG-PID-…``) or is replaying (``….replaying-PID``) ``path``."""
    try:
        if ".replaying-" in path.name:
            return int(path.name.rsplit("-", 1)[1])
        return int(path.name.split("-")[2])
    except (IndexError, ValueError):
        return None


def read(path: Path) -> Iterator[CallSnapshot]:
    """The flows in a segment; a torn last frame (killed mid-write) ends it, a damaged one is quarantined."""
    with open(path, "rb") as f:
        while head := f.read(FRAME.size):
            if len(head) < FRAME.size:
                return
            (size,) = FRAME.unpack(head)
            data = f.read(size)
            if len(data) < size:
                return
            try:
                snap = from_record(Unpickler(io.BytesIO(data)).load())
            except Exception as e:  # (quarantine logs it: a damaged file is not a bug of ours)
                quarantine(path, f"damaged journal entry ({type(e).__name__}: {e})")
                return
            if snap is not None:
                yield snap
