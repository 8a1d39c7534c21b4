"""The writer thread: takes finished flows off a bounded queue, processes them, writes the operations.

Never stalls, never loses what it accepted:

- each flow is journaled on the event loop before it is queued (:mod:`journal`), so a killed proxy's
  flows are finished at the next start; a flow's journal entry and spill files go once its operations
  are written or spooled;
- while the database is unreachable (transient errors) the operations wait in memory, up to a bound,
  then in a spool file (:mod:`spool`), and are retried with backoff;
- an operation the database refuses (a data error) is isolated by splitting the group, the others are
  written, and it is stored in a smaller form or, failing that, kept in the dead-letter file
  (:mod:`policy`, :mod:`deadletter`): one bad value never blocks the rows behind it;
- its health is published for ``velvet status`` (:mod:`health`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from velvet_core.cost.prices import Pricer
from velvet_core.redact import redact
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import LINES, Op
from velvet_core.storage.snapshot import CallSnapshot, sidecar
from velvet_core.storage.store import Store
from velvet_core.writer import journal, recovery
from velvet_core.writer.deadletter import DeadLetters
from velvet_core.writer.health import Health
from velvet_core.writer.policy import describe, exhausted, reductions, transient
from velvet_core.writer.spool import Spool, Unprocessed

log = logging.getLogger("velvet")

ToOperations = Callable[[CallSnapshot], Iterable[Op]]


class Origin(Protocol):
    """Where a flow came from (a journal segment): told when the flow is safe."""

    def release(self) -> None: ...

_STOP = object()
MAX_ATTEMPTS = 5  # a group failing this often on a live connection is treated as bad data
UPKEEP = 3600.0  # seconds between two rounds of upkeep (:meth:`Writer._upkeep`)
IDLE_TAKE = 2.0  # seconds an idle writer waits for a flow before it looks up (health: the status file's 2 s)


@dataclass(slots=True)
class FlowDone:
    """Ends a flow's operations: once they are written (or spooled), its journal entry and files can go."""

    segment: Origin | None
    files: tuple[Path, ...]


@dataclass(slots=True)
class QueuedFlow:
    """A flow to process: from the queue, or replayed from a journal or spool left by a dead proxy."""

    snapshot: CallSnapshot | None  # None: only ``after`` (the end of a replayed file)
    segment: Origin | None = None
    after: tuple[Path, ...] = ()  # files to delete once this flow is safe (a replayed journal or spool file)
    ops: tuple[Op, ...] = ()  # operations written as they are (the row of a flow cut off by a crash)


def _whole_file(w: QueuedFlow) -> bool:
    """A batch file going up or down: its lines are a transaction's worth at once (no waiting for others)."""
    return w.snapshot is not None and w.snapshot.route.batch_body is not None


def spill_files(s: CallSnapshot | None) -> tuple[Path, ...]:
    """The spill files (and their sidecars) holding a flow's streamed bodies."""
    if s is None:
        return ()
    return tuple(p for t in (s.request_tap, s.response_tap) if t is not None and t.path is not None
                 for p in (t.path, sidecar(t.path)))


class Writer:
    """One thread owning the database connection.

    ``submit(snapshot)`` is called on the event loop and never blocks; ``process(snapshot)`` turns it
    into operations in the thread; :class:`Store` writes them.
    """

    def __init__(self, url: str, operations: ToOperations, *, spool_dir: Path, queue_size: int = 10_000,
                 max_pending: int = 50_000, batch_size: int = 500, linger: float = 0.1,
                 setup: Callable[[], None] | None = None, journaled: bool = True, warn_after: float = 5.0,
                 serves: int | None = None, pricer: Callable[[], Pricer] | None = None) -> None:
        self.url = url
        self.pricer = pricer  # (read when applied) prices answers matched to their requests (image lines)
        self.operations = operations
        self.setup = setup
        self.spool_dir = spool_dir
        tag = hashlib.sha256(url.encode()).hexdigest()[:10]
        self.spool = Spool(spool_dir, tag)
        self.tag = tag
        self.journal = journal.Journal(spool_dir / "journal", tag) if journaled else None
        # the writer process serves its proxy (this pid): that proxy's journal and spill files are its input,
        # not leftovers to replay, even once the proxy is gone
        self.serves = serves
        self.dead = DeadLetters(spool_dir / "dead-letters.jsonl")
        self.health = Health(url, spool_dir, tag, warn_after)
        self.queue: queue.Queue[Any] = queue.Queue(queue_size)
        self.backlog: collections.deque[QueuedFlow] = collections.deque()  # replayed flows, before the queue
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.linger = linger
        self.pending: list[Op | FlowDone] = []
        self.written = 0
        self.failures = 0
        self.store: Store | None = None
        self.clean = True  # False once anything had to be spooled
        self._attempts = 0
        self._thread: threading.Thread | None = None
        self._abandon = threading.Event()
        self._stopping = threading.Event()  # cuts a linger short: everything queued is written at once
        self._upkeep_at = 0.0  # (the first time the database answers)

    # -- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="velvet-writer", daemon=True)
            self._thread.start()

    def submit(self, snapshot: CallSnapshot) -> None:
        """Journal a finished flow and hand it to the thread, without blocking (spooled if the queue is full)."""
        segment = self.journal.append(snapshot) if self.journal else None
        try:
            self.queue.put_nowait(QueuedFlow(snapshot, segment))
        except queue.Full:
            log.warning("velvet: writer queue full (%d); spooling to %s", self.queue.maxsize, self.spool.path)
            try:
                self.spool.write([Unprocessed(snapshot)])
            except OSError as e:  # still in the journal (if that could be written): finished at the next start
                log.error("velvet: cannot spool a flow (%s); it waits in the journal for the next start", e)
                return
            self.clean = False
            self._safe(FlowDone(segment, ()))

    def stop(self, timeout: float) -> bool:
        """Write everything queued, waiting at most ``timeout`` s; spool what could not be written."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        self._stopping.set()
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
        if self.journal:
            self.journal.close()
        return self.clean

    def status(self) -> dict[str, Any]:
        """The health figures (any thread)."""
        self.health.queue_depth = self.queue.qsize()
        return self.health.snapshot()

    # -- thread side -----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        stopping = False
        while True:
            if self.store is None:
                self._connect()
            items, stopping = self._take(stopping, block=not self.pending)
            for work in items:
                for op in self._process(work.snapshot) if work.snapshot is not None else ():
                    self.pending.append(op)
                    if isinstance(op, LINES):  # batch lines are written at once: a big body stays bounded
                        self._lines_arrived()
                self.pending.extend(work.ops)
                self.pending.append(FlowDone(work.segment, spill_files(work.snapshot) + work.after))
            if self.pending and self.store is not None and self._try_flush():
                backoff = 0.5
            if len(self.pending) > self.max_pending:
                self._spill()
            self.health.queue_depth, self.health.pending = self.queue.qsize(), len(self.pending)
            self.health.publish(self.store.db if self.store else None)
            if not stopping:
                self._upkeep()
            if stopping and (not self.pending or self._abandon.is_set()):
                break
            if self.pending and self.store is None:
                if self._wait(backoff, stopping):
                    break
                backoff = min(backoff * 2, 30.0)
        if self.pending:
            n = sum(not isinstance(p, FlowDone) for p in self.pending)
            self._spill()
            log.warning("velvet: %d operations could not be written; spooled to %s, written at next start",
                        n, self.spool.path)
        self.health.stopped_at = time.time()
        self.health.pending = len(self.pending)
        self.health.publish(self.store.db if self.store else None, force=True)
        self._close()

    def _upkeep(self) -> None:
        """Once an hour while the database answers: the calls partitions of the periods ahead
        (``velvet_pg_partitions``), and the response cache's entries expired for an hour removed (an entry may
        expire before it is even written: one just expired stays for ``velvet cache stats`` to count)."""
        if self.store is None or self.pending or time.monotonic() < self._upkeep_at:
            return
        self._upkeep_at = time.monotonic() + UPKEEP
        from velvet_core import clock
        from velvet_core.storage import cache_store, partitions

        db = self.store.db
        try:
            if made := partitions.ensure(db, clock.now()):
                log.info("velvet: calls partitions made: %s", ", ".join(made))
        except Exception as e:  # (the default partition takes the rows meanwhile)
            log.warning("velvet: could not make the calls partitions ahead: %s", redact(str(e)))
        try:
            if n := cache_store.drop_expired(db, clock.now() - timedelta(seconds=UPKEEP), stop=self._stopping):
                log.info("velvet: %d expired cache %s removed", n, "entry" if n == 1 else "entries")
        except Exception as e:  # (the next round tries again)
            log.warning("velvet: could not remove the expired cache entries: %s", redact(str(e)))

    def _wait(self, seconds: float, stopping: bool) -> bool:
        """Sleep between retries (True: abandoned while stopping), keeping health current meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if stopping and self._abandon.wait(min(left, 0.5)):
                return True
            if not stopping:
                time.sleep(min(left, 0.5))
            self.health.tick()
            self.health.publish(None)
        return False

    def _lines_arrived(self) -> None:
        if self.store is not None:
            self._try_flush()
        elif sum(isinstance(o, LINES) for o in self.pending) > 8:  # database down: to disk, in order
            self._spill()

    def _process(self, snapshot: CallSnapshot) -> Iterator[Op]:
        """The snapshot's operations; a bug in processing costs that flow only, never the thread."""
        try:
            yield from self.operations(snapshot)
        except Exception:
            log.exception("velvet: could not process a flow")

    def _take(self, stopping: bool, block: bool) -> tuple[list[QueuedFlow], bool]:
        if self.backlog:
            return [self.backlog.popleft()], stopping
        items: list[QueuedFlow] = []
        if stopping:
            block = False
        try:
            first = self.queue.get(timeout=IDLE_TAKE) if block else self.queue.get_nowait()
        except queue.Empty:
            return items, stopping
        if first is not _STOP and not stopping and self.queue.qsize() < self.batch_size and not _whole_file(first):
            # let a batch gather while asleep: waking for every item costs a thread switch and a
            # GIL hand-over per call, measurably slowing the proxy's event loop under load
            self._stopping.wait(self.linger)
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

    # -- writing ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            db = open_db(self.url)
        except Exception as e:
            self.health.failed(describe(e))
            log.debug("velvet: cannot open database %s: %s", redact(self.url), e)
            return
        self.store = Store(db, self.pricer)
        if self.setup:
            self.setup()
            self.setup = None
        self._replay()

    def _close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.db.close()
            self.store = None

    def _try_flush(self) -> bool:
        """Write what is pending; False (the operations kept) when the database failed."""
        try:
            self._flush()
            return True
        except Exception as e:  # transient: the connection or the server
            self.failures += 1
            self.health.pending = len(self.pending)
            self.health.failed(describe(e))
            log.debug("velvet: database write failed (%s); %d operations kept", describe(e), len(self.pending))
            self._close()
            return False

    def _flush(self) -> None:
        assert self.store is not None
        while self.pending:
            group = self.pending[: self.batch_size]
            ops = [o for o in group if not isinstance(o, FlowDone)]
            self._write(ops)
            del self.pending[: len(group)]
            self.written += len(ops)
            self.health.wrote(len(ops))
            for marker in group:
                if isinstance(marker, FlowDone):
                    self._safe(marker)

    def _applied(self, ops: list[Op]) -> Exception | None:
        """Apply ``ops`` in one transaction: None once written, else the error (the callers decide)."""
        assert self.store is not None
        try:
            self.store.apply(ops)
        except Exception as e:
            return e
        return None

    def _write(self, ops: list[Op]) -> None:
        """Write ``ops``; raises transient errors only: data errors are isolated here."""
        if not ops:
            return
        if (e := self._applied(ops)) is None:
            self._attempts = 0
            return
        if transient(e) or exhausted(e):
            self._attempts += 1
            if self._attempts < MAX_ATTEMPTS or exhausted(e) or not self._alive():
                raise e
        log.warning("velvet: the database refused a group of %d operations (%s); isolating the bad ones",
                    len(ops), describe(e))
        self._attempts = 0
        self._isolate(ops)

    def _isolate(self, ops: list[Op]) -> None:
        """Write every operation of ``ops`` that can be; the bad ones in a smaller form or as dead letters."""
        if not ops or (error := self._applied(ops)) is None:
            return
        self._raise_unless_data(error)
        if len(ops) > 1:
            mid = len(ops) // 2
            self._isolate(ops[:mid])
            self._isolate(ops[mid:])
            return
        op = ops[0]
        if isinstance(op, LINES) and len(op.rows) > 1:
            mid = len(op.rows) // 2
            self._isolate([type(op)(op.rows[:mid]), type(op)(op.rows[mid:])])
            return
        for smaller in reductions(op, error):
            if (e := self._applied([smaller])) is not None:
                self._raise_unless_data(e)
                continue
            log.warning("velvet: stored a %s in a smaller form: %s", type(op).__name__, describe(error))
            return
        self.dead.add(op, describe(error), self.health.proxy)
        self.health.dead_lettered += 1

    def _raise_unless_data(self, e: Exception) -> None:
        """While isolating: a lost connection or a full disk is no verdict on the operation being tried."""
        if (transient(e) and not self._alive()) or exhausted(e):
            raise e

    def _alive(self) -> bool:
        """Whether the connection still answers (a transient-looking error with a live server is about data)."""
        try:
            assert self.store is not None
            self.store.db.execute_sql("SELECT 1").fetchone()
            return True
        except Exception:
            return False

    def _safe(self, marker: FlowDone) -> None:
        if marker.segment is not None:
            marker.segment.release()
        for path in marker.files:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _spill(self) -> None:
        """Pending operations to the spool file (their flows are then safe); kept in memory if the disk refuses."""
        entries = [o for o in self.pending if not isinstance(o, FlowDone)]
        try:
            self.spool.write(entries)
        except OSError as e:
            self.health.failed(f"cannot spool: {describe(e)}")
            log.error("velvet: cannot spool %d operations to %s (%s); kept in memory", len(entries),
                      self.spool.path, e)
            return
        self.clean = False
        self.health.spooled += len(entries)
        for marker in self.pending:
            if isinstance(marker, FlowDone):
                self._safe(marker)
        self.pending = []

    # -- replay ----------------------------------------------------------------------------------

    def _replay(self) -> None:
        """What earlier runs left for this database: spool files, journals of killed proxies, their spills."""
        for path in self.spool.claim():
            entries = self.spool.read(path)
            self.health.quarantined = self.spool.quarantined
            log.info("velvet: replaying %d spooled operations from %s", len(entries), path)
            for entry in entries:
                if isinstance(entry, Unprocessed):
                    self.backlog.append(QueuedFlow(entry.snapshot))
                else:
                    self.pending.append(entry)
            self.backlog.append(QueuedFlow(None, after=(path,)))  # after the flows above and the pending ops
        referenced: set[Path] = set()
        # (a writer that does not journal itself still finishes what dead proxies journaled)
        for path in journal.left_behind(self.spool_dir / "journal", self.tag, skip=self.serves):
            flows = list(journal.read(path))
            log.info("velvet: finishing %d flows journaled by a proxy that stopped (%s)", len(flows), path)
            for snap in flows:
                referenced.update(p for p in spill_files(snap))
                self.backlog.append(QueuedFlow(snap))
            self.backlog.append(QueuedFlow(None, after=(path,)))
        jdir = self.spool_dir / "journal"
        for spill, row in recovery.orphans(self.spool_dir / "streams", referenced, skip=self.serves,
                                           busy=lambda pid: journal.finishing(jdir, self.tag, pid)):
            log.info("velvet: recording a flow cut off when its proxy stopped (%s)", spill)
            self.pending += [row, FlowDone(None, (spill, sidecar(spill)))]
        self.health.remove_stale_files()
