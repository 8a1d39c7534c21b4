"""writer/recovery.py: streamed bodies a crash cut off."""

from __future__ import annotations

import time

import orjson
from support.helpers import calls
from support.helpers import start_writer as run


def test_a_streamed_body_cut_by_a_crash_is_recorded_as_incomplete(db_url, tmp_path):
    streams = tmp_path / "spool" / "streams"
    streams.mkdir(parents=True)
    dead_pid = 4_000_000  # above pid_max: never alive
    spill = streams / f"tap-{dead_pid}-abc.part"
    spill.write_bytes(b"x" * 5000)
    spill.with_suffix(".json").write_bytes(orjson.dumps({
        "flow_id": "cut-upload", "method": "POST", "host": "api.openai.com", "path": "/v1/files",
        "started_at": time.time(), "key_fingerprint": "fp", "side": "request"}))
    lost = streams / f"tap-{dead_pid}-nometa.part"
    lost.write_bytes(b"y" * 10)
    run(db_url, tmp_path / "spool", [])
    row = calls(db_url)["cut-upload"]
    assert not row.complete and "5,000 bytes" in row.problem and row.request_bytes == 5000
    assert row.endpoint == "files" and row.action == "upload"
    assert not spill.exists() and not spill.with_suffix(".json").exists()
    assert not lost.exists() and list(streams.glob("tap-*-nometa.part.damaged-*"))  # kept aside
