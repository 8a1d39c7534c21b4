"""The writer thread: takes snapshots off a bounded queue, processes them into operations, writes them.

Never loses what it was given: when the database is unreachable the prepared operations are kept
in memory (up to a bound), then spilled to a spool file that is replayed at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from velvet_core.capture.snapshot import CallSnapshot
from velvet_core.capture.tap import pid_alive
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import LINES, Op
from velvet_core.storage.store import Store
from velvet_core.writer.spool import Unpickler, Unprocessed, upgrade

log = logging.getLogger(__name__)

Process = Callable[[CallSnapshot], Iterable[Op]]
_STOP = object()


class Writer:
    """One thread owning the database connection.

    ``submit(snapshot)`` is called on the event loop and never blocks; ``process(snapshot)`` turns it
    into operations in the thread; :class:`Store` writes them.
    """

    def __init__(self, url: str, process: Process, *, spool_dir: Path,
                 queue_size: int = 10_000, max_pending: int = 50_000, batch_size: int = 500,
                 linger: float = 0.1, setup: Callable[[], None] | None = None) -> None:
        self.url = url
        self.process = process
        self.setup = setup
        self.spool_dir = spool_dir
        self.queue: queue.Queue[Any] = queue.Queue(queue_size)
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.linger = linger
        self.pending: list[Op] = []
        self.written = 0
        self.failures = 0
        self.store: Store | None = None
        self._thread: threading.Thread | None = None
        self._overflow_lock = threading.Lock()
        tag = hashlib.sha256(url.encode()).hexdigest()[:10]
        self._spool_glob = f"spool-{tag}-*.pkl"
        self._spool_file = spool_dir / f"spool-{tag}-{os.getpid()}-{int(time.time() * 1000)}.pkl"
        self.clean = True  # False once anything had to be spooled
        self._abandon = threading.Event()
        self._claimed: list[Path] = []

    # -- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="velvet-writer", daemon=True)
            self._thread.start()

    def submit(self, snapshot: CallSnapshot) -> None:
        """Hand a finished flow to the thread without blocking; if the queue is full, spool it to disk."""
        try:
            self.queue.put_nowait(snapshot)
        except queue.Full:
            log.warning("velvet: writer queue full (%d); spooling to %s", self.queue.maxsize,
                        self._spool_file)
            self._spill([Unprocessed(snapshot)])

    def stop(self, timeout: float) -> bool:
        """Write everything queued, waiting at most ``timeout`` s; spool what could not be written."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        while True:  # the sentinel must not be lost to a full queue
            try:
                self.queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(5)
        self._thread = None
        return self.clean

    # -- thread side -----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        stopping = False
        connected = False
        while True:
            if not connected:
                connected = self._connect()
            items, stopping = self._take(stopping, block=not self.pending)
            for snapshot in items:
                for op in self._process(snapshot):
                    self.pending.append(op)
                    if not isinstance(op, LINES):  # batch lines are written at once: a big body stays bounded
                        continue
                    if connected:
                        connected = self._try_flush(backoff)
                    elif sum(isinstance(o, LINES) for o in self.pending) > 8:  # database down: to disk, in order
                        self._spill(self.pending)
                        self.pending = []
            if self.pending and connected:
                connected = self._try_flush(backoff)
                if connected:
                    backoff = 0.5
            if len(self.pending) > self.max_pending:
                self._spill(self.pending)
                self.pending = []
            if stopping and (not self.pending or self._abandon.is_set()):
                break
            if self.pending and not connected:
                if stopping and self._abandon.wait(backoff):
                    break
                if not stopping:
                    time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        if self.pending:
            self._spill(self.pending)
            for path in self._claimed:  # their operations are in the new spool file now
                path.unlink(missing_ok=True)
            log.warning("velvet: %d operations could not be written; spooled to %s, written at next start",
                        len(self.pending), self._spool_file)
            self.pending = []
        self._close()

    def _try_flush(self, backoff: float) -> bool:
        """Write what is pending; False (and the rows kept) when the database failed."""
        try:
            self._flush()
            return True
        except Exception as e:  # database down, constraint bug, …: keep the rows
            self.failures += 1
            log.warning("velvet: database write failed (%s); %d operations kept, retrying in %.1fs",
                        e, len(self.pending), backoff)
            self._close()
            return False

    def _connect(self) -> bool:
        try:
            db = open_db(self.url)
        except Exception as e:
            log.warning("velvet: cannot open database %s: %s", _redact(self.url), e)
            return False
        self.store = Store(db)
        if self.setup:
            self.setup()
            self.setup = None
        self._replay_spool()
        return True

    def _close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.db.close()
            self.store = None

    def _take(self, stopping: bool, block: bool) -> tuple[list[CallSnapshot], bool]:
        items: list[CallSnapshot] = []
        if stopping:
            block = False
        try:
            first = self.queue.get(timeout=0.5) if block else self.queue.get_nowait()
        except queue.Empty:
            return items, stopping
        if first is not _STOP and not stopping and self.queue.qsize() < self.batch_size:
            # let a batch gather while asleep: waking for every item costs a thread switch and a
            # GIL hand-over per call, measurably slowing the proxy's event loop under load
            time.sleep(self.linger)
        item = first
        while True:
            if item is _STOP:
                stopping = True
            else:
                items.append(item)
            if len(items) >= self.batch_size:
                break
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
        return items, stopping

    def _process(self, snapshot: CallSnapshot) -> Iterator[Op]:
        """The snapshot's operations; a bug in processing costs that flow only, never the thread."""
        try:
            yield from self.process(snapshot)
        except Exception:
            log.exception("velvet: could not process a flow")

    def _flush(self) -> None:
        assert self.store is not None
        while self.pending:
            group = self.pending[: self.batch_size]
            self.store.apply(group)
            del self.pending[: len(group)]
            self.written += len(group)
        for path in self._claimed:  # replayed spool files are gone only once written
            path.unlink(missing_ok=True)
        self._claimed.clear()

    # -- spool -----------------------------------------------------------------------------------

    def _spill(self, ops: Sequence[Op | Unprocessed]) -> None:
        self.clean = False
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with self._overflow_lock, open(self._spool_file, "ab") as f:
            pickle.dump(ops, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())

    def _replay_spool(self) -> None:
        """Write spool files left by earlier runs (or this one) for this database."""
        if not self.spool_dir.is_dir():
            return
        stale = [p for p in self.spool_dir.glob(self._spool_glob.replace(".pkl", ".replaying-*"))
                 if not pid_alive(int(p.suffix.rsplit("-", 1)[1]))]
        for path in sorted([*self.spool_dir.glob(self._spool_glob), *stale]):
            claimed = path.with_suffix(f".replaying-{os.getpid()}")
            try:
                path.rename(claimed)  # only one process replays a given file
            except OSError:
                continue
            entries: list[Any] = []
            with open(claimed, "rb") as f:
                while True:
                    try:
                        entries.extend(Unpickler(f).load())
                    except EOFError:
                        break
                    except Exception:
                        log.exception("velvet: damaged spool file %s; kept", claimed)
                        break
            prepared: list[Op] = []
            for entry in map(upgrade, entries):
                if isinstance(entry, Unprocessed):
                    prepared.extend(self._process(entry.snapshot))
                elif entry is not None:
                    prepared.append(entry)
            log.info("velvet: replaying %d spooled operations from %s", len(prepared), path)
            self.pending[:0] = prepared
            self._claimed.append(claimed)


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    if p.password:
        netloc = p.netloc.replace(f":{p.password}@", ":***@")
        return urlunsplit(p._replace(netloc=netloc))
    return url
