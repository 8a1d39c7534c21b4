"""Nothing from disk is unpickled that velvet did not write: spool files and journal frames are read with an
unpickler that admits velvet's own types only, and a spool folder someone else could write to is refused."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil

import pytest
from support import planted
from support.helpers import chat, start_writer
from support.rig import Proxy
from velvet_core.storage import ops
from velvet_core.writer.spool import Spool, Unpickler, Unprocessed


def test_the_unpickler_refuses_any_other_name(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match=r"refused (posix|os)\.system"):
        Unpickler(io.BytesIO(pickle.dumps(planted._Payload(marker)))).load()
    for foreign in (shutil.rmtree, os.environ.__class__, print):
        with pytest.raises(pickle.UnpicklingError, match="not one of velvet's own types"):
            Unpickler(io.BytesIO(pickle.dumps(foreign))).load()
    assert not marker.exists()
    mine = [ops.CallRow({"flow_id": "x"}), Unprocessed(chat(1))]
    assert Unpickler(io.BytesIO(pickle.dumps(mine))).load() == mine  # what velvet writes still reads back


def test_planted_spool_and_journal_files_run_nothing(sqlite_url, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    markers = planted.plant(spool, sqlite_url, tmp_path)
    w = start_writer(sqlite_url, spool, [chat(1)])
    assert w.written >= 1
    assert not [m for m in markers if m.exists()]
    assert sorted(p.name.split(".")[1] for p in spool.rglob("*.damaged-*")) == ["log", "pkl"]


def test_a_real_proxy_starts_over_planted_files_and_runs_none(standin, tmp_path, db_url, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    markers = planted.plant(spool, db_url, tmp_path)
    p = Proxy(db_url, standin.url, tmp_path).start()
    try:
        p.client(monkeypatch).chat.completions.create(model="gpt-4o-mini",
                                                      messages=[{"role": "user", "content": "x"}])
    finally:
        assert p.stop() == 0
    assert not [m for m in markers if m.exists()]
    assert "not one of velvet's own types" in p.output()


@pytest.mark.parametrize("how", ["1777", "group", "other user"])
def test_a_spool_folder_others_could_write_is_refused_by_name(standin, tmp_path, sqlite_url, how):
    spool = tmp_path / "spool"
    spool.mkdir()
    if how == "1777":
        os.chmod(spool, 0o1777)
    elif how == "group":
        os.chmod(spool, 0o770)
    else:
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chmod(spool, 0o700)
        os.chown(spool, 65534, 65534)  # nobody
    markers = planted.plant(spool, sqlite_url, tmp_path) if how != "other user" else []
    p = Proxy(sqlite_url, standin.url, tmp_path)
    with contextlib.suppress(RuntimeError):  # mitmproxy reports the OptionsError and exits (soon after it listens)
        p.start()
    assert p.proc is not None and p.proc.wait(30) != 0
    assert f"velvet_spool_dir: {spool}" in p.output() and "chmod 700" in p.output()
    p.log.close()
    assert not [m for m in markers if m.exists()]


def test_spool_reads_back_what_it_wrote(tmp_path):
    s = Spool(tmp_path, "tag")
    entries = [ops.CallRow({"flow_id": "a"}), Unprocessed(chat(2))]
    s.write(entries)
    assert s.read(s.path) == entries and s.quarantined == 0
