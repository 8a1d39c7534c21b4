"""writer/spool.py: operations kept on disk while the database cannot take them."""

from __future__ import annotations

from support.helpers import calls, chat
from support.helpers import start_writer as run
from velvet_core.processing.processor import Processor
from velvet_core.storage.ops import CallRow
from velvet_core.writer.writer import Writer


def test_damaged_spool_file_is_quarantined_not_deleted(db_url, tmp_path):
    spool = tmp_path / "spool"
    down = Writer(db_url, Processor().operations, spool_dir=spool)
    down.spool.write([CallRow({"flow_id": "spooled", "method": "GET", "host": "h", "path": "/",
                               "endpoint": "other", "action": "other", "started_at": "2026-11-24 10:00:00"})])
    with open(down.spool.path, "ab") as f:
        f.write(b"\x80\x05garbage that is no pickle")
    w = run(db_url, spool, [chat(1)])
    assert {"spooled", "flow-1"} <= set(calls(db_url))
    kept = list(spool.glob("spool-*.damaged-*"))
    assert len(kept) == 1 and b"garbage" in kept[0].read_bytes()
    assert w.health.quarantined == 1
