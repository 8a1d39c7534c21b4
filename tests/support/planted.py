"""Pickles velvet did not write, planted where it reads its spool and journal back (what an attacker with a
shared spool folder would try): each would create a marker file if it ever ran. For tests/test_unpickle.py and
the fault suite's ``security`` section (``unpickled_foreign``)."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def tag_of(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:10]


def plant(spool: Path, url: str, markers: Path) -> list[Path]:
    """A spool file and a journal segment of a dead proxy, each with a payload; returns the markers they would
    create (none may exist afterwards). The journal frame has velvet's own frame header, as a real one."""
    tag = tag_of(url)
    (spool / "journal").mkdir(parents=True, exist_ok=True, mode=0o700)
    out = [markers / "from-spool", markers / "from-journal"]
    (spool / f"spool-{tag}-999999-1.pkl").write_bytes(pickle.dumps([_Payload(out[0])]))
    frame = pickle.dumps(_Payload(out[1]))
    (spool / "journal" / f"journal-{tag}-999999-1-1.log").write_bytes(struct.pack("<I", len(frame)) + frame)
    return out
