"""The writer in its own process: the proxy's event loop only journals, another core does the rest.

Processing and database writes compete with mitmproxy's event loop for the GIL when they run in a thread
of the proxy (about 9 % of its throughput in the benchmark). In process mode the proxy appends each
finished flow to its journal, as it does anyway for crash safety, and a child process reads the journal
as it grows (:mod:`tail`), processes the flows and writes them with the same :class:`Writer`. The hand-off
costs the event loop nothing more than the journal append. The child stops when the proxy closes its
stdin (at shutdown, or when the proxy dies), after writing everything journaled.

Run by the addon as ``python -m velvet_core.writer.child``; not a command for people.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from velvet_core.config import BODY_LIMIT
from velvet_core.pids import until_stdin_ends
from velvet_core.private import unsafe_dir
from velvet_core.redact import redact
from velvet_core.storage.snapshot import CallSnapshot
from velvet_core.writer.journal import Journal, hold, release
from velvet_core.writer.tail import Tail

if TYPE_CHECKING:  # (imported where used: the proxy's side never loads the database code)
    from velvet_core.writer.writer import Writer

log = logging.getLogger("velvet")
POLL = 0.05  # seconds between looks at the journal while flows come
# After IDLE_POLLS looks that found nothing (a second), the writer process sleeps until the proxy nudges it (a
# byte on its stdin, at most one per POLL: :meth:`ChildWriter.submit`), or IDLE_WAIT seconds at most. An idle proxy
# then costs no CPU, where looking 20 times a second cost 0.6 % of a core, and kept the CPU from deep sleep.
IDLE_POLLS = 20
IDLE_WAIT = 5.0
# the writer process's niceness, added to the proxy's: the lowest priority. It then takes only CPU nobody else
# wants (the proxy, the clients on the machine); on a machine busy for long it falls behind, and catches up from
# the journal on disk. Against +10, in two paired runs of the benchmark's live phase: throughput ratio 0.985 /
# 0.999 against 0.934 / 0.959, p95 latency 35.7 / 34.6 ms against 39.0 / 36.6 ms (plain mitmdump 35.0 / 35.9);
# a machine this noisy needs more runs to be sure (BENCHMARKS.md at c8ffec3, "Nice 19"). Where it can, it also runs
# in the idle scheduling class (:func:`give_way`).
NICE = 19
# how long the writer lets flows gather before a transaction (a thread writer: 0.1 s). Bigger transactions cost
# less per call: in a paired live run the child's CPU per call was 160 us at 0.1 s, 120 at 0.4 and 100 at 1.0 s,
# and that CPU is not free for the proxy even on another core (the two share caches and memory). A row is in
# the database about a second after its call.
LINGER = 1.0
ENV_DB = "VELVET_WRITER_DB"


def tag_of(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:10]


class ChildWriter:
    """The proxy's side: the same interface as :class:`Writer` (``submit``, ``stop``, ``status``)."""

    # whether the child can follow the cache index for the proxy (it is handed pipes: POSIX only)
    can_index = os.name == "posix" and hasattr(socket, "send_fds")

    def __init__(self, url: str, *, spool_dir: Path, prices: str = "", body_limit: int = BODY_LIMIT,
                 flush_timeout: float = 30.0) -> None:
        self.url = url
        self.spool_dir = spool_dir
        self.prices, self.body_limit = prices, body_limit
        self.journal = Journal(spool_dir / "journal", tag_of(url))
        self.fallback: Writer | None = None  # for flows the journal could not take (a full disk)
        # (the URL goes in the environment: a command line, password included, is visible to every user)
        self.args = [sys.executable, "-m", "velvet_core.writer.child", "--spool-dir", str(spool_dir),
                     "--parent", str(os.getpid()), "--prices", prices, "--body-limit", str(body_limit),
                     "--flush-timeout", str(flush_timeout)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None  # hands the child a pipe to send the cache index through
        self._on_index: Callable[[int], None] | None = None
        self.written = 0
        self._respawned_at = 0.0
        self._check_at = 0.0  # when to look again whether the child is alive
        self._nudge_fd = -1  # the child's stdin: a byte wakes it when it sleeps (see IDLE_POLLS)
        self._nudge_at = 0.0  # when to nudge again, at the earliest

    def start(self) -> None:
        package = str(Path(__file__).resolve().parent.parent.parent)  # where velvet_core is importable from
        paths = [package, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), ENV_DB: self.url}
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.proc is not None and self.proc.stdin is not None:  # (a child started again: the old one's pipe)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        # the control socket hands the child the cache index's pipes (where descriptors can be passed)
        mine, theirs = socket.socketpair() if self.can_index else (None, None)
        args, fds = (self.args, ()) if theirs is None else \
            ([*self.args, "--control-fd", str(theirs.fileno())], (theirs.fileno(),))
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, env=env, pass_fds=fds)
        except BaseException:
            if mine is not None:
                mine.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()
        self._control = mine
        self._respawned_at = time.monotonic()
        assert self.proc.stdin is not None
        self._nudge_fd, self._nudge_at = self.proc.stdin.fileno(), 0.0
        os.set_blocking(self._nudge_fd, False)  # (a child that does not read never stalls the event loop)
        if mine is not None and self._on_index is not None:
            self.index(self._on_index)

    def index(self, on_fd: Callable[[int], None]) -> None:
        """Have the child follow the response cache's index (:class:`storage.cache_index.Follower`) into a new
        pipe, and call ``on_fd`` with its read end (``on_fd``'s owner closes it): now, and whenever the child is
        started again. A second call gives the child a new pipe, and the one before is dropped."""
        self._on_index = on_fd
        if self._control is None:
            return
        read, write = os.pipe()
        try:
            socket.send_fds(self._control, [b"i"], [write])
        except OSError:  # (the child is gone: the next one gets a pipe when it starts)
            os.close(read)
            return
        finally:
            os.close(write)
        on_fd(read)

    def submit(self, snapshot: CallSnapshot) -> None:
        """Journal the flow (the child reads it from there). Never blocks on the child."""
        if self.journal.append(snapshot) is None:  # the journal is the hand-off: write this flow in-process
            if self.fallback is None:
                from velvet_core.cost.prices import Pricer
                from velvet_core.processing.processor import Processor
                from velvet_core.writer.writer import Writer

                processor = Processor(Pricer.from_file(self.prices),
                                      self.body_limit)
                self.fallback = Writer(self.url, processor.operations, spool_dir=self.spool_dir, journaled=False,
                                       setup=processor.warm, serves=os.getpid(), pricer=lambda: processor.pricer)
                self.fallback.start()
            self.fallback.submit(snapshot)
        now = time.monotonic()
        if now >= self._nudge_at and self._nudge_fd >= 0:
            self._nudge_at = now + POLL  # (while it reads, the child looks again within POLL: no need to say)
            with contextlib.suppress(OSError):  # (a full pipe has nudges enough; a dead child is seen below)
                os.write(self._nudge_fd, b".")
        if now < self._check_at:  # (poll() is a waitpid system call: ~15 µs on the event loop, once a second)
            return
        self._check_at = now + 1.0
        if self.proc is not None and self.proc.poll() is not None and now - self._respawned_at > 5:
            log.warning("velvet: the writer process exited (%s); starting another", self.proc.returncode)
            self.start()  # it resumes from the journal: nothing is lost

    def stop(self, timeout: float) -> bool:
        """Close the journal, tell the child (stdin closed) and wait up to ``timeout`` s for it."""
        self.journal.close()
        self._nudge_fd = -1  # (closed below: its number may be reused)
        if self._control is not None:
            self._control.close()
            self._control = None
        fallback_clean = self.fallback.stop(timeout) if self.fallback is not None else True
        if self.proc is None:
            return True
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("velvet: the writer process is still writing after %.0f s; it goes on alone", timeout)
            return False
        status = self.status()
        self.written = status.get("written") or 0
        return code == 0 and not status.get("spooled") and fallback_clean

    def status(self) -> dict[str, Any]:
        """The child's last published health (its status file)."""
        pid = self.proc.pid if self.proc else 0
        path = self.spool_dir / f"status-{self.journal.tag}-{pid}.json"
        try:
            s: dict[str, Any] = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            s = {"written": 0, "queue_depth": 0, "pending": 0, "spooled": 0, "dead_lettered": 0,
                 "last_write_at": None, "failing_since": None, "last_error": None}
        return {**s, "mode": "process"}


def give_way(parent: int) -> None:
    """Run on the cores the proxy is not pinned to, if there are any (it was started with its affinity), and
    give way: the writer is background work, the proxy and the clients on the machine come first (it catches
    up from the journal when they are idle)."""
    with contextlib.suppress(OSError, AttributeError):
        everything = set(range(os.cpu_count() or 1))
        others = everything - os.sched_getaffinity(parent)
        os.sched_setaffinity(0, others or everything)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(NICE)
    # SCHED_IDLE (Linux): any other task that wakes up preempts the writer at once. Linux's EEVDF scheduler
    # (6.6 on) may let a task at nice 19 finish its slice first, which held up the benchmark's client and
    # upstream on the writer's core: throughput ratio 0.983 / 0.942 against 0.940 / 0.908 at nice 19 in two
    # paired runs (BENCHMARKS.md at c8ffec3, session 5)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _unidle() -> None:
    """The proxy has stopped: nothing to give way to, write what is left at a normal priority (Linux lets an
    unprivileged process do that only if its RLIMIT_NICE allows; otherwise it stays idle-class). Linux sets
    the policy per thread: each of this process's threads (the writer's among them)."""
    with contextlib.suppress(OSError, AttributeError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


def _record_cut(streams: Path, referenced: set[Path], proxy: int, writer: Writer) -> None:
    """The flows of the dead ``proxy`` cut off mid-transfer (spill files its journal does not name), each as
    an incomplete row, as the next start would record them (a proxy started meanwhile leaves them to this
    process: see :func:`journal.hold`)."""
    from velvet_core.storage.snapshot import sidecar
    from velvet_core.writer.recovery import orphans
    from velvet_core.writer.writer import QueuedFlow

    for spill, row in orphans(streams, referenced, only=proxy):
        log.info("velvet: recording a flow cut off when its proxy stopped (%s)", spill)
        writer.queue.put(QueuedFlow(None, ops=(row,), after=(spill, sidecar(spill))))


def follow_index(url: str, control: socket.socket, stopping: threading.Event) -> None:
    """Each pipe the proxy sends (:meth:`ChildWriter.index`) gets the cache index's updates from a follower of its
    own; a new pipe retires the one before."""
    from velvet_core.storage.cache_index import Follower

    current: threading.Event | None = None
    with contextlib.suppress(OSError):
        while not stopping.is_set():
            msg, fds, _, _ = socket.recv_fds(control, 16, 4)
            if not msg:
                break  # (the proxy closed it: stopping, or gone)
            for fd in fds[:-1]:
                os.close(fd)
            if fds:
                if current is not None:
                    current.set()
                current = threading.Event()
                threading.Thread(target=Follower(url, current, stopping).into_pipe, args=(fds[-1],),
                                 name="velvet-cache-follower", daemon=True).start()
    if current is not None:
        current.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="velvet-writer", description=__doc__)
    ap.add_argument("--spool-dir", required=True, type=Path)
    ap.add_argument("--parent", required=True, type=int)
    ap.add_argument("--prices", default="")
    ap.add_argument("--body-limit", type=int, default=BODY_LIMIT)
    ap.add_argument("--flush-timeout", type=float, default=30.0)
    ap.add_argument("--control-fd", type=int, default=-1)
    a = ap.parse_args(argv)
    url = os.environ[ENV_DB]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from velvet_core.cost.prices import Pricer
    from velvet_core.processing.processor import Processor
    from velvet_core.writer.writer import QueuedFlow, Writer, spill_files

    give_way(a.parent)
    journal_dir = a.spool_dir / "journal"
    if why := unsafe_dir(a.spool_dir) or unsafe_dir(journal_dir):  # (the addon refuses it first; never read it)
        log.error("velvet: %s: the writer process will not read a spool or journal others could write", why)
        return 2
    lock = hold(journal_dir, tag_of(url), a.parent)  # before reading any of it (see journal.hold)
    processor = Processor(Pricer.from_file(a.prices), a.body_limit)
    writer = Writer(url, processor.operations, spool_dir=a.spool_dir, setup=processor.warm, journaled=False,
                    pricer=lambda: processor.pricer, serves=a.parent, linger=LINGER)
    writer.start()
    stopping, woken = threading.Event(), threading.Event()

    until_stdin_ends(stopping, woken)  # (the proxy is stopping, or gone; or nudges)
    if a.control_fd >= 0:
        threading.Thread(target=follow_index, args=(url, socket.socket(fileno=a.control_fd), stopping),
                         name="velvet-cache-index", daemon=True).start()
    tail = Tail(journal_dir, tag_of(url), a.parent)
    referenced: set[Path] = set()  # the spill files the journal's flows name (still on disk)
    empty = 0  # looks in a row that found nothing
    while True:
        final = stopping.is_set()
        flows = tail.poll(final=final)
        for snap, seg in flows:
            referenced.update(p for p in spill_files(snap) if p.suffix == ".part")
            writer.queue.put(QueuedFlow(snap, seg))  # blocks when the writer is behind: the journal holds the rest
        if final:
            _unidle()
            if os.getppid() != a.parent:  # the proxy died (killed): its flows cut off are this process's to record
                _record_cut(a.spool_dir / "streams", referenced, a.parent, writer)
            break
        empty = 0 if flows else empty + 1
        if empty == IDLE_POLLS and referenced:  # (a quiet moment: forget the spill files already written)
            referenced = {p for p in referenced if p.exists()}
        if empty < IDLE_POLLS:
            # one read per POLL of whatever was appended meanwhile: reading again at once after each poll that
            # found something (every flow or two under load) cost the child about 20 us more CPU per call
            stopping.wait(POLL)
        else:  # idle: until the proxy nudges (a nudge that came meanwhile returns at once, and is cleared)
            woken.wait(IDLE_WAIT)
            woken.clear()
    # the proxy has stopped (or died): write what is left, as the proxy's own shutdown would, within its
    # flush timeout; what the database does not take by then is spooled for the next start
    clean = writer.stop(timeout=a.flush_timeout)
    release(journal_dir, tag_of(url), a.parent, lock)
    log.info("velvet: writer process wrote %d operations to %s", writer.written, redact(url))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
