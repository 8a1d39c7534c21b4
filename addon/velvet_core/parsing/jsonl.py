"""Incremental JSONL: feed chunks, get whole numbered lines; the partial tail is kept for later."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class Line:
    no: int  # 1-based line number in the file
    data: bytes  # without the line end
    crlf: bool = False
    final_newline: bool = True


class LineSplitter:
    """Split a byte stream into lines, whatever the chunk boundaries.

    ``feed(chunk)`` yields every line completed by ``chunk``; ``finish()`` yields the last line when
    the stream did not end with a newline.
    """

    __slots__ = ("_tail", "bytes", "no")

    def __init__(self) -> None:
        self._tail = b""
        self.no = 0
        self.bytes = 0

    def feed(self, chunk: bytes | memoryview) -> Iterator[Line]:
        if not chunk:
            return
        data = bytes(chunk)
        self.bytes += len(data)
        start = 0
        nl = data.find(b"\n")
        if nl < 0:
            self._tail += data
            return
        if self._tail:
            first = self._tail + data[:nl]
            self._tail = b""
            yield self._line(first)
            start = nl + 1
            nl = data.find(b"\n", start)
        while nl >= 0:
            yield self._line(data[start:nl])
            start = nl + 1
            nl = data.find(b"\n", start)
        self._tail = data[start:]

    def _line(self, raw: bytes) -> Line:
        self.no += 1
        if raw.endswith(b"\r"):
            return Line(self.no, raw[:-1], crlf=True)
        return Line(self.no, raw)

    def finish(self) -> Iterator[Line]:
        if self._tail:
            line = self._line(self._tail)
            line.final_newline = False
            self._tail = b""
            yield line

    def remainder(self) -> bytes:
        """The bytes after the last newline (not counted as a line), and forget them."""
        tail, self._tail = self._tail, b""
        return tail

    def split(self, data: bytes) -> Iterator[Line]:
        """All lines of a whole body."""
        yield from self.feed(data)
        yield from self.finish()
