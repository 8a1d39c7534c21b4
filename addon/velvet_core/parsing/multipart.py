"""An incremental multipart/form-data scanner that keeps part bodies byte for byte.

mitmproxy's own ``multipart_form`` drops the newlines inside parts (mitmproxy#4466) and re-parses the
whole body on each access; this one is fed chunks and emits events as it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message

from velvet_core.parsing.decode import DecodeError, Decoder

_COLON = ord(":")  # (a byte's value: ``b":" in line`` raises and clears a TypeError each time; test_layout.py)


class MultipartError(ValueError):
    pass


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a ``multipart/form-data`` Content-Type."""
    if not content_type.lower().startswith("multipart/"):
        return None
    m = Message()
    m["content-type"] = content_type
    b = m.get_param("boundary")
    return b if isinstance(b, str) and b else None


@dataclass(slots=True)
class PartStart:
    name: str | None
    filename: str | None
    content_type: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class PartData:
    data: bytes


@dataclass(slots=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class MultipartScanner:
    """``feed(chunk)`` yields :class:`PartStart`, :class:`PartData`… and :class:`PartEnd` events.

    ``finish()`` raises :class:`MultipartError` when the body ended before the closing boundary.
    """

    _PREAMBLE, _HEADERS, _BODY, _DONE = range(4)

    def __init__(self, boundary: str) -> None:
        self.delim = b"--" + boundary.encode("latin-1")
        self.body_delim = b"\r\n" + self.delim
        self._buf = b""
        self._state = self._PREAMBLE

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buf += chunk
        while True:
            if self._state == self._PREAMBLE:
                # the first delimiter may open the body directly (no leading CRLF)
                i = self._buf.find(self.delim)
                if i < 0:
                    self._buf = self._buf[-len(self.delim):]
                    return
                after = self._buf[i + len(self.delim): i + len(self.delim) + 2]
                if len(after) < 2:
                    return
                if after == b"--":
                    self._state = self._DONE
                    return
                self._buf = self._buf[i + len(self.delim):]
                self._state = self._HEADERS
            elif self._state == self._HEADERS:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > 64 * 1024:
                        raise MultipartError("part headers too long")
                    return
                yield _part_start(self._buf[:end])
                self._buf = self._buf[end + 4:]
                self._state = self._BODY
            elif self._state == self._BODY:
                i = self._buf.find(self.body_delim)
                if i < 0:
                    keep = len(self.body_delim) + 1  # a delimiter may straddle chunks
                    if len(self._buf) > keep:
                        yield PartData(self._buf[:-keep])
                        self._buf = self._buf[-keep:]
                    return
                after = self._buf[i + len(self.body_delim): i + len(self.body_delim) + 2]
                if len(after) < 2:
                    if i:
                        yield PartData(self._buf[:i])
                        self._buf = self._buf[i:]
                    return
                if i:
                    yield PartData(self._buf[:i])
                yield PartEnd()
                self._buf = self._buf[i + len(self.body_delim):]
                if after == b"--":
                    self._state = self._DONE
                    self._buf = b""
                    return
                self._state = self._HEADERS
            else:
                self._buf = b""
                return

    def finish(self) -> None:
        if self._state != self._DONE:
            raise MultipartError("truncated multipart body: no closing boundary")


def _part_start(raw: bytes) -> PartStart:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if _COLON in line:
            k, _, v = line.decode("utf-8", "replace").partition(":")
            headers[k.strip().lower()] = v.strip()
    m = Message()
    m["content-disposition"] = headers.get("content-disposition", "")
    name = m.get_param("name", header="content-disposition")
    filename = m.get_param("filename", header="content-disposition")
    return PartStart(name if isinstance(name, str) else None,
                     filename if isinstance(filename, str) else None,
                     headers.get("content-type"), headers)


def fields(data: bytes, boundary: str, *, keep: set[str] | None = None) -> dict[str, bytes]:
    """Whole-body helper: ``{name: value}`` of the parts (only those in ``keep``, if given)."""
    out: dict[str, list[bytes]] = {}
    scanner = MultipartScanner(boundary)
    current: str | None = None
    for ev in scanner.feed(data):
        if isinstance(ev, PartStart):
            current = ev.name if keep is None or ev.name in keep else None
            if current is not None:
                out[current] = []
        elif isinstance(ev, PartData) and current is not None:
            out[current].append(ev.data)
    scanner.finish()
    return {k: b"".join(v) for k, v in out.items()}


Read = Callable[[int], Iterator[bytes]]  # a body in pieces of at most the given size
PIECE = 1 << 20


def form_field(content_type: str, encoding: str | None, read: Read, name: str = "purpose") -> str | None:
    """A short text field of a multipart body (``None`` if absent, over 256 bytes or unreadable): an upload's
    ``purpose``, an image edit's or a video's ``model``.

    An upload's purpose is read before any line is kept, so that a file of another purpose never puts lines
    into ``batch_requests``. Stops as soon as the field has been read; when a client sends it after the file
    (``curl -F file=@… -F purpose=batch``), the body is scanned once more, without splitting lines.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    scanner, part, value = MultipartScanner(boundary), None, b""
    try:
        decoder = Decoder(encoding)
        size = PIECE if decoder.encoding == "identity" else PIECE // 64
        for piece in read(size):
            for ev in scanner.feed(decoder.feed(piece)):
                if isinstance(ev, PartStart):
                    part = ev.name
                elif isinstance(ev, PartData) and part == name:
                    value += ev.data
                    if len(value) > 256:
                        return None  # not a purpose (nor a model)
                elif isinstance(ev, PartEnd) and part == name:
                    return value.decode("utf-8", "replace").strip()
    except (DecodeError, MultipartError):
        return None
    return None
