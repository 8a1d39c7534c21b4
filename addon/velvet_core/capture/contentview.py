"""A mitmproxy contentview for batch JSONL: uploads, upload parts and file-content downloads.

Bounded on huge bodies: it looks at the first lines only and counts the rest with ``bytes.count``
(no copies, no splitting), so a 200 MB body renders in milliseconds instead of blocking the proxy.
"""

from __future__ import annotations

import orjson
from mitmproxy import http
from mitmproxy.contentviews import Contentview, Metadata, SyntaxHighlight

from velvet_core.parsing.classify import classify
from velvet_core.parsing.multipart import boundary_of

SHOW_LINES = 10
MAX_LINE = 16 * 1024  # longer lines are shown cut
HEAD_BYTES = 64 * 1024  # where the part headers of a multipart body are looked for


def _target(metadata: Metadata) -> str | None:
    """Which batch body this is: "upload", "part", "content", or None (not ours)."""
    flow = metadata.flow
    if not isinstance(flow, http.HTTPFlow) or metadata.http_message is None:
        return None
    route = classify(flow.request.method, flow.request.path)
    side = route.batch_body
    if side == "request" and metadata.http_message is flow.request:
        return "part" if route.kind == "uploads" else "upload"
    if side == "response" and metadata.http_message is flow.response and flow.response.status_code < 400:
        return "content"
    return None


def _file_part(data: bytes, boundary: bytes, name: bytes) -> tuple[int, int, str]:
    """(start, end, filename) of the multipart field ``name`` in ``data``, found with ``find`` only."""
    delim = b"--" + boundary
    pos = data.find(delim)
    while pos >= 0:
        head_end = data.find(b"\r\n\r\n", pos, pos + HEAD_BYTES)
        if head_end < 0:
            break
        headers = data[pos:head_end].lower()
        start = head_end + 4
        nxt = data.find(b"\r\n" + delim, start)
        end = nxt if nxt >= 0 else len(data)
        if b'name="' + name + b'"' in headers:
            raw = data[pos:head_end]
            i = raw.lower().find(b'filename="')
            filename = raw[i + 10:raw.find(b'"', i + 10)].decode("utf-8", "replace") if i >= 0 else ""
            return start, end, filename
        pos = nxt + 2 if nxt >= 0 else -1
    raise ValueError(f"no {name.decode()!r} part in this multipart body")


def render_lines(data: bytes, start: int, end: int, title: str, partial_edges: bool = False) -> str:
    """The first :data:`SHOW_LINES` lines of ``data[start:end]`` pretty-printed, and a count of the rest."""
    total = data.count(b"\n", start, end) + (0 if end == start or data[end - 1:end] == b"\n" else 1)
    head = f"{title} · {total:,} lines · {end - start:,} bytes"
    if total > SHOW_LINES:
        head += f" · the first {SHOW_LINES} shown"
    out = [head]
    if partial_edges:
        out.append("(an upload part: its first and last lines may be cut; velvet joins them at completion)")
    pos, shown = start, 0
    while pos < end and shown < SHOW_LINES:
        nl = data.find(b"\n", pos, end)
        stop = nl if nl >= 0 else end
        out.append("")
        out.append(_line(data[pos:min(stop, pos + MAX_LINE)], shown + 1, stop - pos > MAX_LINE))
        shown += 1
        pos = stop + 1
    if total > shown:
        out.append(f"\n… {total - shown:,} more lines")
    return "\n".join(out) + "\n"


def _line(raw: bytes, no: int, cut: bool) -> str:
    if cut:
        return f"# line {no} (longer than {MAX_LINE:,} bytes, cut)\n{raw.decode('utf-8', 'replace')}…"
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"# line {no}: not JSON\n{raw.decode('utf-8', 'replace').rstrip()}"
    label = f"# line {no}"
    if isinstance(obj, dict):
        if obj.get("custom_id"):
            label += f" · {obj['custom_id']}"
        if isinstance(obj.get("response"), dict) and obj["response"].get("status_code") is not None:
            label += f" · {obj['response']['status_code']}"
        elif obj.get("error"):
            label += " · error"
        elif obj.get("url"):
            label += f" · {obj.get('method', 'POST')} {obj['url']}"
    return f"{label}\n{orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()}"


class BatchJsonlContentview(Contentview):
    """Batch JSONL (first lines pretty-printed, the rest counted)."""

    @property
    def name(self) -> str:
        return "Batch JSONL"

    @property
    def syntax_highlight(self) -> SyntaxHighlight:
        return "yaml"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        return 2.5 if data and _target(metadata) else -1

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        target = _target(metadata)
        if target == "content":
            return render_lines(data, 0, len(data), "Batch file content")
        msg = metadata.http_message
        boundary = boundary_of(msg.headers.get("content-type", "")) if msg is not None else None
        if boundary is None:
            raise ValueError("not a multipart body")
        field = b"file" if target == "upload" else b"data"
        start, end, filename = _file_part(data, boundary.encode("latin-1"), field)
        title = "Batch upload part" if target == "part" else f"File upload {filename}".rstrip()
        return render_lines(data, start, end, title, partial_edges=target == "part")
