"""After a crash: streamed bodies whose flow never ended (the proxy died mid-transfer).

Flows that ended are in the journal and are finished from their spill files like any other. A spill
file that no journal entry names belongs to a flow cut off by the crash: its sidecar (written when the
tap started) is enough to record that flow as an incomplete ``calls`` row. The spill file is deleted
only once that row is written; one without a sidecar is quarantined, never deleted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from velvet_core import clock
from velvet_core.parsing.classify import classify
from velvet_core.pids import alive as pid_alive
from velvet_core.storage.ops import CallRow
from velvet_core.storage.snapshot import sidecar
from velvet_core.writer.spool import quarantine

log = logging.getLogger("velvet")


def orphans(spill_dir: Path, referenced: set[Path], skip: int | None = None,
            busy: Callable[[int], bool] = lambda pid: False,
            only: int | None = None) -> list[tuple[Path, CallRow]]:
    """Spill files of dead proxies that no replayed flow names, each with the row that records its flow
    (``busy``: whether a proxy's writer process still finishes its journal, and so its spill files; ``only``:
    those of this proxy, known to be dead, as its writer process records them once it has read its journal)."""
    if not spill_dir.is_dir():
        return []
    out = []
    for path in sorted(spill_dir.glob("tap-*-*.part")):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if only is not None:
            if pid != only or path in referenced:
                continue
        elif pid in (os.getpid(), skip) or pid_alive(pid) or path in referenced or busy(pid):
            continue
        try:
            meta = orjson.loads(sidecar(path).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            quarantine(path, "a streamed body of a proxy that stopped, with nothing saying whose it was")
            continue
        out.append((path, CallRow(incomplete_row(meta, path.stat().st_size))))
    return out


def incomplete_row(meta: dict[str, Any], size: int) -> dict[str, Any]:
    route = classify(meta.get("method", "POST"), meta.get("path", "/"))
    started = meta.get("started_at")
    row: dict[str, Any] = {
        "flow_id": meta.get("flow_id"), "method": meta.get("method"), "host": meta.get("host"),
        "path": meta.get("path"), "endpoint": route.kind, "action": route.action, "object_id": route.object_id,
        "key_fingerprint": meta.get("key_fingerprint"), "complete": False,
        "started_at": clock.from_epoch(started) if started else None,
        "problem": f"the proxy stopped before this flow ended: {size:,} bytes of its streamed "
                   f"{meta.get('side', 'request')} body had arrived",
    }
    row[f"{meta.get('side', 'request')}_bytes"] = size
    return row
