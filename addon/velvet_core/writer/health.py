"""The writer's health: what it wrote, what waits, what failed; published for `velvet status` and alerts.

Published twice: a status file in the spool directory (readable when the database is not) every couple
of seconds, and a ``velvet_proxies`` row whenever the database is reachable. The mitmproxy log says at
WARN level when writes have failed for longer than ``warn_after`` seconds, and again when they recover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from velvet_core import clock
from velvet_core.pids import alive as pid_alive
from velvet_core.private import private_dir, write_private
from velvet_core.redact import redact
from velvet_core.storage import models

log = logging.getLogger("velvet")


_utc = clock.from_epoch
# seconds between two publications while nothing changes (an idle proxy: its database row is not written every
# 5 s for as long as it runs)
QUIET = 10.0


class Health:
    """Updated by the writer thread only; ``snapshot()`` may be read from any thread."""

    def __init__(self, url: str, spool_dir: Path, tag: str, warn_after: float = 5.0) -> None:
        self.started_at = time.time()
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.proxy = f"{self.hostname}:{self.pid}:{int(self.started_at)}"
        self.db = redact(url)
        self.file = spool_dir / f"status-{tag}-{self.pid}.json"
        self.warn_after = warn_after
        self.last_write_at: float | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.written = 0
        self.dead_lettered = 0
        self.spooled = 0
        self.quarantined = 0
        self.queue_depth = 0
        self.pending = 0
        self.stopped_at: float | None = None
        self._warned = False
        self._file_at = 0.0
        self._row_at = 0.0
        self._file_state: tuple[Any, ...] = ()  # what the last file and row published (see QUIET)
        self._row_state: tuple[Any, ...] = ()

    def wrote(self, n: int) -> None:
        now = time.time()
        self.written += n
        self.last_write_at = now
        if self.failing_since is not None:
            if self._warned:
                log.warning("velvet: database writes recovered after %.0f s", now - self.failing_since)
            self.failing_since = None
            self._warned = False

    def failed(self, error: str) -> None:
        now = time.time()
        self.last_error, self.last_error_at = error, now
        if self.failing_since is None:
            self.failing_since = now
        self.tick()

    def tick(self) -> None:
        """Warn once writes have failed for ``warn_after`` seconds (called often, also between retries)."""
        now = time.time()
        if self.failing_since is not None and not self._warned and now - self.failing_since >= self.warn_after:
            self._warned = True
            log.warning("velvet: database writes have failed for %.0f s (%s); %d operations kept in memory, "
                        "%d spooled to disk", now - self.failing_since, self.last_error, self.pending,
                        self.spooled)

    def snapshot(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "hostname": self.hostname, "pid": self.pid, "db": self.db,
                "started_at": _utc(self.started_at), "updated_at": _utc(time.time()),
                "stopped_at": _utc(self.stopped_at), "last_write_at": _utc(self.last_write_at),
                "failing_since": _utc(self.failing_since), "last_error": self.last_error,
                "last_error_at": _utc(self.last_error_at), "queue_depth": self.queue_depth,
                "pending": self.pending, "spooled": self.spooled, "dead_lettered": self.dead_lettered,
                "written": self.written}

    def publish(self, db: Any | None, force: bool = False) -> None:
        """The status file every 2 s, the database row every 5 s (``force``: now, e.g. at shutdown); both every
        :data:`QUIET` s while nothing changes (a heartbeat: ``velvet status`` calls a proxy silent for 30 s
        stopped)."""
        now = time.monotonic()
        state = (self.written, self.dead_lettered, self.spooled, self.quarantined, self.queue_depth, self.pending,
                 self.failing_since, self.last_error_at, self.stopped_at)
        snap: dict[str, Any] = {}
        if force or now - self._file_at >= (QUIET if state == self._file_state else 2.0):
            self._file_at, self._file_state = now, state
            snap = self.snapshot()
            with contextlib.suppress(OSError):
                private_dir(self.file.parent)
                tmp = self.file.with_suffix(".tmp")
                write_private(tmp, orjson.dumps({**snap, "quarantined": self.quarantined},
                                                option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z))
                tmp.replace(self.file)
        if db is not None and (force or now - self._row_at >= (QUIET if state == self._row_state else 5.0)):
            self._row_at, self._row_state = now, state
            snap = snap or self.snapshot()
            try:
                with models.use(db), db.atomic():
                    models.ProxyStatus.insert(**snap).on_conflict(
                        conflict_target=[models.ProxyStatus.proxy],
                        update={k: v for k, v in snap.items() if k != "proxy"}).execute()
            except Exception as e:  # health must never cost a write
                log.debug("velvet: could not record health: %s", e)

    def remove_stale_files(self) -> None:
        """Status files of proxies that are gone (their database row keeps the history)."""
        for path in self.file.parent.glob("status-*-*.json"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(path.stem.rsplit("-", 1)[1])
                if pid != self.pid and not pid_alive(pid):
                    path.unlink()


def status_line(s: dict[str, Any]) -> str:
    """One line for people: ``velvet.status`` and the log."""
    def ago(t: datetime | str | None) -> str:
        if t is None:
            return "never"
        return f"{(clock.now() - clock.parse(t)).total_seconds():.0f} s ago"  # type: ignore[operator]

    state = "writing" if s["failing_since"] is None else f"FAILING since {ago(s['failing_since'])}"
    text = (f"velvet: {state}; last write {ago(s['last_write_at'])}; {s['written']:,} written; queue "
            f"{s['queue_depth']:,}, pending {s['pending']:,}, spooled {s['spooled']:,}, "
            f"dead-lettered {s['dead_lettered']:,}")
    return text + (f"; last error: {s['last_error']}" if s["last_error"] else "")
