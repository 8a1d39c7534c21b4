"""mitmproxy emoji markers for our flows: failed calls, batch files up and down, batch polls."""

from __future__ import annotations

from velvet_core.parsing.classify import Route

FAILED = ":x:"
UPLOAD = ":outbox_tray:"
DOWNLOAD = ":inbox_tray:"
POLL = ":hourglass_flowing_sand:"
DONE = ":white_check_mark:"
ENDED_BADLY = ":warning:"
MARKERS = frozenset({FAILED, UPLOAD, DOWNLOAD, POLL, DONE, ENDED_BADLY})

def marker(route: Route, status: int | None, complete: bool = True, batch_status: str | None = None) -> str | None:
    """The marker for a flow: failed calls, batch files (up and down) and batch polls."""
    if status is None or status >= 400 or not complete:
        return FAILED
    if (route.kind == "files" and route.action == "upload") or (route.kind == "uploads" and route.action in (
            "part", "complete")):
        return UPLOAD
    if route.kind == "files" and route.action == "content":
        return DOWNLOAD
    if route.kind == "batches":
        if batch_status == "completed":
            return DONE
        if batch_status in ("failed", "expired", "cancelling", "cancelled"):
            return ENDED_BADLY
        return POLL
    return None
