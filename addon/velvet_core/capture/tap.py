"""The stream callable for big batch bodies (event-loop side): pass each chunk on, keep it on disk.

mitmproxy calls a ``flow.request.stream`` / ``flow.response.stream`` callable for every chunk as it
arrives, inside its event handling. This one only appends the chunk to a spill file (page cache; the
GIL is released during the write) and returns it untouched: no parsing, no memory growth, whatever
the body's size. The writer thread parses the file once the flow is over (see :mod:`ingest`):
parsing during the transfer competes with the event loop for the GIL and measurably slowed uploads
(see docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from velvet_core.private import private_dir, write_private
from velvet_core.storage.snapshot import sidecar

log = logging.getLogger("velvet")


class BodyTap:
    """``stream`` callable: returns each chunk untouched and appends it to a spill file.

    With ``keep`` > 0 it also holds the chunks in memory while the body is no bigger than ``keep``
    bytes, so that a body that turns out small (a compressed download, one of unknown length) can be
    put back into the flow for mitmweb: :meth:`kept` gives it once the body is whole. Past ``keep``
    the copy is dropped at once: memory stays bounded by ``keep`` whatever the body's size.
    """

    __slots__ = ("_chunks", "_file", "broken", "bytes", "finished", "keep", "meta", "path", "spill_dir")

    def __init__(self, spill_dir: Path, meta: dict[str, Any] | None = None, keep: int = 0) -> None:
        self.spill_dir = spill_dir
        self.meta = meta  # written beside the spill file: enough to record the flow if the proxy dies
        self.keep = keep
        self.bytes = 0
        self.finished = False
        self.broken: str | None = None
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        self._chunks: list[bytes] | None = [] if keep > 0 else None

    @property
    def kept_bytes(self) -> int:
        """Bytes held in memory for :meth:`kept` (never more than ``keep``)."""
        return self.bytes if self._chunks is not None else 0

    def kept(self) -> bytes | None:
        """The whole body, if it was small enough to keep and has ended."""
        if self._chunks is None or not self.finished:
            return None
        return b"".join(self._chunks)

    def __call__(self, data: bytes) -> bytes:
        if not data:
            self.finished = True
            self.close()
            return data
        self.bytes += len(data)
        if self._chunks is not None:
            if self.bytes <= self.keep:
                self._chunks.append(data)
            else:
                self._chunks = None  # too big to show: give the copy up
        if self.broken is None:
            try:
                if self._file is None:
                    private_dir(self.spill_dir)  # (mkstemp's files are 0600 already)
                    fd, name = tempfile.mkstemp(prefix=f"tap-{os.getpid()}-", suffix=".part", dir=self.spill_dir)
                    self._file, self.path = os.fdopen(fd, "wb"), Path(name)
                    if self.meta is not None:
                        write_private(sidecar(self.path), orjson.dumps(self.meta))
                self._file.write(data)
            except Exception as e:  # never the user's problem (a full disk, say): note it, pass bytes on
                self.broken = f"velvet could not keep the body: {type(e).__name__}: {e}"
                log.warning("velvet: %s; the flow continues", self.broken)
                self.close()
        return data

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self.broken = self.broken or f"velvet could not keep the body: {e}"
            self._file = None
