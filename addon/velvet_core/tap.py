"""The stream callable for big batch bodies (event-loop side): pass each chunk on, hand it to the writer.

mitmproxy calls a ``flow.request.stream`` / ``flow.response.stream`` callable for every chunk as it
arrives, inside its event handling, so this stays cheap: no parsing, one queue put per chunk. While
the writer is behind by more than ``budget`` bytes, chunks go to a spill file instead of memory (one
queue item per burst), so the proxy's memory stays bounded whatever the body size.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("velvet")


class Budget:
    """Bytes handed to the writer and not yet parsed, shared by all taps."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.inflight + n > self.limit:
                return False
            self.inflight += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.inflight -= n


@dataclass(slots=True)
class Spilled:
    """A run of chunks in a spill file: ``length`` grows while the writer has not taken it yet."""

    path: Path
    offset: int
    length: int
    lock: threading.Lock
    taken: bool = False

    def pieces(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The run's bytes in pieces of ``size`` (the tap stops growing it once this starts)."""
        with self.lock:
            self.taken = True
            offset, length = self.offset, self.length
        with open(self.path, "rb") as f:
            f.seek(offset)
            while length > 0:
                piece = f.read(min(size, length))
                if not piece:
                    raise OSError(f"spill file {self.path} is shorter than expected")
                length -= len(piece)
                yield piece


class BodyTap:
    """``stream`` callable: returns each chunk untouched and submits ``("chunk", (key, data|Spilled))``."""

    def __init__(self, key: str, offer: Callable[[str, Any], bool], budget: Budget, spill_dir: Path) -> None:
        self.key = key
        self.offer = offer
        self.budget = budget
        self.spill_dir = spill_dir
        self.bytes = 0
        self.finished = False
        self.broken: str | None = None
        self.lock = threading.Lock()
        self._file: Any = None
        self._path: Path | None = None
        self._written = 0
        self._run: Spilled | None = None

    def __call__(self, data: bytes) -> bytes:
        if not data:
            self.finished = True
            self._close()
            return data
        self.bytes += len(data)
        if self.broken is None:
            try:
                self._feed(data)
            except Exception as e:  # never the user's problem: note it, keep passing bytes on
                self.broken = f"velvet could not follow the stream: {type(e).__name__}: {e}"
                log.exception("velvet: stream tap %s failed; the flow continues", self.key)
        return data

    def _feed(self, data: bytes) -> None:
        if self._file is None and self.budget.take(len(data)):
            if not self.offer("chunk", (self.key, data)):
                self.budget.give_back(len(data))
                self.broken = "velvet's writer queue was full; the body was not captured"
            return
        if self._file is None:  # from now on this stream goes through the spill file, in order
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"tap-{os.getpid()}-", suffix=".part", dir=self.spill_dir)
            self._file, self._path = os.fdopen(fd, "wb", buffering=0), Path(name)
        self._file.write(data)
        with self.lock:
            run = self._run
            if run is not None and not run.taken:
                run.length += len(data)
                self._written += len(data)
                return
            assert self._path is not None
            self._run = Spilled(self._path, self._written, len(data), self.lock)
            self._written += len(data)
        if not self.offer("chunk", (self.key, self._run)):
            self.broken = "velvet's writer queue was full; the body was not captured"

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()

    def close(self) -> None:
        """At ``response``/``error``: the file stays until the writer has read it (it removes it)."""
        self._close()

    @property
    def spill_path(self) -> Path | None:
        return self._path


def remove_stale_spills(spill_dir: Path) -> None:
    """Spill files of proxies that are gone (killed mid-stream)."""
    from .writer import _alive

    if not spill_dir.is_dir():
        return
    for path in spill_dir.glob("tap-*-*.part"):
        try:
            pid = int(path.name.split("-")[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
