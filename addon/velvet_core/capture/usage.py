"""``velvet_stream_usage=inject``: ask upstream for a stream's usage, and keep that usage from the client.

On the event loop, so both halves are cheap: the request body is parsed once (orjson) and, in the common
case, changed by inserting ``"stream_options":{"include_usage":true}`` as its first member without
re-serialising it; the stream filter looks at each complete SSE event with a byte search and parses only
the one that carries usage.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from mitmproxy import http

INJECT = b'{"stream_options":{"include_usage":true},'
# parsing a body costs the event loop about 3 ms per MiB: bigger ones (inline images, say) go untouched and
# their usage is estimated
INJECT_MAX = 1024 * 1024


def ask_for_usage(req: http.Request) -> bytes | None:
    """Add ``stream_options.include_usage`` to a streamed chat/completions request that did not ask for it.

    Returns the client's body when the request was changed, else None (not streamed, asked already, not a
    JSON object, compressed, over :data:`INJECT_MAX`, or a body mitmproxy streams: those go upstream untouched).
    """
    raw = req.raw_content
    if not raw or req.stream or len(raw) > INJECT_MAX or raw.find(b'"stream"') < 0:
        return None
    if req.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    opts = obj.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        return None  # the client asked: it gets the usage chunk, as without velvet
    body = raw.lstrip()
    if "stream_options" not in obj and body[:1] == b"{":
        req.content = INJECT + body[1:]  # (updates Content-Length)
    else:
        obj["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        req.content = orjson.dumps(obj)
    # an uncompressed answer, so that the usage chunk can be taken out of it on the way to the client
    if "accept-encoding" in req.headers:
        req.headers["accept-encoding"] = "identity"
    return raw


# (Byte searches use .find() or a byte's value: in CPython 3.12 ``b"x" in data`` first reads the needle as an int,
# raising and clearing a TypeError each time: 0.4-0.7 us, three to ten times a .find(); tests/test_layout.py.)
_CR = ord("\r")
# an event ends with an empty line; each line ends with \r\n, \n or \r
# (a \r followed by \n is one line end, never two: a chunk ending between "\r\n" and "\r\n" ends no event)
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\n|\r(?!\n))")
# the member include_usage adds to every other chunk (in JSON text a bare quote cannot be inside a string,
# so this matches only a real "usage": null member)
_USAGE_NULL = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')
_DATA = re.compile(rb"^data: ?(.*?)\r?$", re.M)


class UsageStripper:
    """Takes out of an SSE stream what ``include_usage`` added: the usage-only chunk (empty ``choices``)
    and the ``"usage":null`` member of the other chunks, so the client gets the chunks it asked for.

    Events may span chunks: the bytes after the last complete event are held until the event ends (a
    client's SSE parser does nothing with half an event anyway). Everything else passes unchanged.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The bytes to send on for ``data`` (``b""``: the end of the stream, flush what is held)."""
        if not data:
            rest, self.buf = self.buf, b""
            out = _filter(rest) if rest else b""
            return [out] if out else []
        if not self.buf and data.endswith(b"\n\n"):  # the usual chunk: whole events, nothing held
            out = _filter(data)
            return [out] if out else []
        buf = self.buf + data if self.buf else data
        end = previous = 0
        for m in _EVENT_END.finditer(buf, max(0, len(self.buf) - 3)):  # the held bytes had no event end
            previous, end = end, m.end()
        if end == len(buf) and buf.endswith(b"\r"):  # maybe the first half of a \r\n: wait for what follows
            end = previous
        self.buf = buf[end:]
        out = _filter(buf[:end]) if end else b""
        return [out] if out else []


def _filter(block: bytes) -> bytes:
    """Events (the last one may be unterminated at the end of the stream), without what include_usage added."""
    if block.find(b'"usage"') < 0:
        return block
    if block.find(b"\n\n") == len(block) - 2 and _CR not in block:  # the usual block: one event
        return _event(block[:-2], b"\n\n")
    out: list[bytes] = []
    pos = 0
    for m in _EVENT_END.finditer(block):
        out.append(_event(block[pos:m.start()], block[m.start():m.end()]))
        pos = m.end()
    if pos < len(block):
        out.append(_event(block[pos:], b""))
    return b"".join(out)


def _event(ev: bytes, end: bytes) -> bytes:
    if ev.find(b'"usage"') < 0:
        return ev + end
    if ev.find(b',"usage":null') >= 0:  # OpenAI's compact JSON: a plain byte search
        return ev.replace(b',"usage":null', b"", 1) + end
    if _USAGE_NULL.search(ev):
        return _USAGE_NULL.sub(b"", ev, count=1) + end
    data = b"\n".join(m.group(1) for m in _DATA.finditer(ev))
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return ev + end
    if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
        return b""  # the usage-only chunk: velvet keeps it (the recorder saw it), the client never asked
    return ev + end
