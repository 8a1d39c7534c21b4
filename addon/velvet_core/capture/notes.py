"""Flow comments and markers, handed from the writer thread back to the event loop (mitmweb, the console)."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref

from mitmproxy import ctx, http
from mitmproxy.hooks import UpdateHook

from velvet_core.capture.take import META_KEY
from velvet_core.processing import markers

log = logging.getLogger("velvet")


class FlowNotes:
    """``add`` is the processor's one callback; the notes are applied in one loop callback per burst."""

    def __init__(self) -> None:
        # flows waiting for their comment; weak, so a flow nobody else keeps is not held
        self.flows: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def expect(self, flow: http.HTTPFlow) -> None:
        """(event loop) ``flow`` goes to the writer; its comment will come back."""
        self.flows[flow.id] = flow

    def add(self, flow_id: str, text: str, mark: str | None) -> None:
        """(writer thread) A processed flow's comment and marker: queue it, wake the loop once per burst."""
        if self.loop is None or self.loop.is_closed() or flow_id not in self.flows:
            return
        with self._lock:
            self._pending.append((flow_id, text, mark))
            if len(self._pending) > 1:
                return
        self.loop.call_soon_threadsafe(self.apply)

    def apply(self) -> None:
        """(event loop) Set our comments and markers unless the user has put their own there."""
        with self._lock:
            notes, self._pending = self._pending, []
        updated = []
        for flow_id, text, mark in notes:
            flow = self.flows.pop(flow_id, None)
            if flow is None:
                continue
            if not flow.comment or flow.comment == flow.metadata.get(META_KEY, {}).get("comment"):
                flow.comment = text
                flow.metadata.setdefault(META_KEY, {})["comment"] = text
            if mark and (not flow.marked or flow.marked in markers.MARKERS):
                flow.marked = mark
            updated.append(flow)
        # tell mitmweb's view; mitmdump has none, and an extra event per flow costs throughput there
        if updated and ctx.master.addons.get("view") is not None:
            try:
                ctx.master.addons.trigger(UpdateHook(updated))
            except Exception:
                log.debug("velvet: update hook failed", exc_info=True)
