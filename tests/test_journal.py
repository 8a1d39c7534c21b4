"""writer/journal.py and writer/tail.py: each finished flow journaled before its answer goes out, read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.helpers import calls, chat
from support.helpers import start_writer as run
from velvet_core.parsing.classify import classify

ROOT = Path(__file__).resolve().parent.parent


CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]
    from support.helpers import chat
    from velvet_core.processing.processor import Processor
    from velvet_core.writer.writer import Writer
    # the thread is never started: every flow waits in the queue, as when the writer lags behind
    w = Writer({url!r}, Processor().operations, spool_dir=__import__("pathlib").Path({spool!r}))
    for i in range({n}):
        w.submit(chat(i))
    print("submitted", flush=True)
    time.sleep(60)
""")


def test_flows_journaled_before_a_sigkill_are_written_at_the_next_start(db_url, tmp_path):
    spool = tmp_path / "spool"
    code = CHILD.format(tests=str(ROOT / "tests"), url=db_url, spool=str(spool), n=50)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "addon")}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stdout.readline().strip() == b"submitted"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list((spool / "journal").glob("journal-*"))  # left behind by the killed process
    run(db_url, spool, [])
    assert set(calls(db_url)) == {f"flow-{i}" for i in range(50)}
    assert not list((spool / "journal").glob("journal-*"))


def test_the_tail_reads_a_growing_journal_once_and_deletes_what_is_safe(tmp_path):
    """The writer process's input: every flow exactly once, across segments, while the proxy appends."""
    import threading

    from velvet_core.writer.journal import Journal
    from velvet_core.writer.tail import Tail

    j = Journal(tmp_path, "tag", max_entries=7)
    tail = Tail(tmp_path, "tag", os.getpid())
    got: list[str] = []
    segs = []
    done = threading.Event()

    def proxy() -> None:
        for i in range(100):
            j.append(chat(i))
            if i % 10 == 0:
                time.sleep(0.01)
        j.close()
        done.set()

    threading.Thread(target=proxy).start()
    while True:
        final = done.is_set()
        for snap, seg in tail.poll(final=final):
            got.append(snap.flow_id)
            segs.append(seg)
        if final:
            break
    assert got == [f"flow-{i}" for i in range(100)]
    assert list(tmp_path.glob("journal-*"))  # nothing is safe yet
    for seg in segs:
        seg.release()
    assert not list(tmp_path.glob("journal-*"))


def test_segments_rotate_by_count_and_by_age_and_each_new_one_is_private(tmp_path):
    """``append`` opens a new segment when the current one is full or old: every segment it opens is the
    owner's alone (0600 in a 0700 folder, whatever the umask), and the frames read back whole, in order."""
    import stat

    from velvet_core.writer.journal import Journal, read

    folder = tmp_path / "journal"
    j = Journal(folder, "tag", max_entries=3, max_age=0.2)
    old = os.umask(0)
    try:
        segs = [j.append(chat(i)) for i in range(7)]  # full: 3, 3, then 1
        time.sleep(0.3)
        segs += [j.append(chat(i)) for i in range(7, 9)]  # old: a new segment at once
    finally:
        os.umask(old)
    opened = list(dict.fromkeys(segs))
    assert [sum(s is seg for s in segs) for seg in opened] == [3, 3, 1, 2]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = [seg.path for seg in opened]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert [s.flow_id for f in files for s in read(f)] == [f"flow-{i}" for i in range(9)]
    for seg in segs:
        assert seg is not None
        seg.release()
    j.close()
    assert not list(folder.glob("journal-*"))  # every flow safe: no segment left


def test_a_journal_frame_is_plain_values_and_reads_back_whole(tmp_path):
    """Frames are tuples of builtins (no class looked up by name on the event loop, nothing imported to read
    them); every field comes back; frames of the older formats (the pickled dataclass, and the tuple without
    the raw header fields) are still read."""
    import dataclasses
    import pickle
    import pickletools

    from velvet_core.storage.snapshot import TapInfo, from_record, to_record
    from velvet_core.writer.journal import Journal, read

    full = dataclasses.replace(
        chat(1), request_end_at=2.5, first_byte_at=3.5, response_encoding="gzip", request_encoding="br",
        stream_chunks=[(1.0, b"data: x\n\n")], stream_finished=True, error="boom", notes=["n"],
        request_tap=TapInfo(tmp_path / "req.spill", 10, True, None), response_tap=TapInfo(None, 0, False, "cut"),
        client_body=b"{}", tags={"team": "a"}, route=classify("GET", "/openai/deployments/d/files/file-1/content"),
        request_fields=[(b"Content-Type", b"application/json")], response_fields=((b"X-Request-Id", b"req_1"),),
        scheme="http", port=18101, cache={"key": "k", "ttl": 60.0, "bucket": 1})
    assert all(getattr(full, f.name) not in (None, False) for f in dataclasses.fields(full))  # every field set
    frame = pickle.dumps(to_record(full), protocol=pickle.HIGHEST_PROTOCOL)
    assert not [op for op, *_ in pickletools.genops(frame) if "GLOBAL" in op.name or "REDUCE" in op.name]
    assert from_record(pickle.loads(frame)) == full
    assert from_record(("something", "else")) is None
    before = (2, *to_record(full)[1:-5])  # a frame of the format before the raw header fields (RECORD 2)
    assert from_record(pickle.loads(pickle.dumps(before))) == dataclasses.replace(
        full, request_fields=None, response_fields=None, scheme="https", port=None, cache=None)
    before = (3, *to_record(full)[1:-3])  # before scheme and port (RECORD 3)
    assert from_record(pickle.loads(pickle.dumps(before))) == dataclasses.replace(
        full, scheme="https", port=None, cache=None)
    before = (4, *to_record(full)[1:-1])  # before the cache's part (RECORD 4)
    assert from_record(pickle.loads(pickle.dumps(before))) == dataclasses.replace(full, cache=None)

    j = Journal(tmp_path / "j", "tag")
    j.append(full)
    j.close()
    (seg,) = (tmp_path / "j").glob("journal-*")
    with open(seg, "ab") as f:  # a frame as velvet 0.3 wrote it: the dataclass itself
        old = pickle.dumps(chat(2), protocol=pickle.HIGHEST_PROTOCOL)
        f.write(len(old).to_bytes(4, "little") + old)
    assert [s.flow_id for s in read(seg)] == ["flow-1", "flow-2"]
    assert next(read(seg)) == full


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock, and a pid known to be dead")
def test_a_dead_proxys_journal_is_left_to_its_writer_process_while_it_finishes(tmp_path):
    """mitmdump alone killed: its writer process goes on writing what it has read, and deletes the spill files
    once written. A proxy started meanwhile must leave that journal (and those spill files) alone until the
    writer process is gone, then claim what it left."""
    from velvet_core.writer.journal import Journal, finishing, hold, left_behind, release
    from velvet_core.writer.recovery import orphans

    jdir = tmp_path / "journal"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # (a pid that no longer runs: the killed proxy's)
    seg = jdir / f"journal-tag-{gone.pid}-1-1.log"
    j = Journal(jdir, "tag")
    j.append(chat(1))
    j.close()
    (made,) = jdir.glob("journal-*")
    made.rename(seg)
    spill = tmp_path / "streams" / f"tap-{gone.pid}-x.part"
    spill.parent.mkdir()
    spill.write_bytes(b"{}")
    holder = subprocess.Popen(  # the writer process of the killed proxy, still finishing
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from velvet_core.writer.journal import hold, release
            lock = hold(Path({str(jdir)!r}), "tag", {gone.pid})
            print("held", flush=True)
            sys.stdin.read()
            release(Path({str(jdir)!r}), "tag", {gone.pid}, lock)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "addon")})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert finishing(jdir, "tag", gone.pid)
        assert hold(jdir, "tag", gone.pid) is None  # (a second writer process: the first keeps its lock)
        release(jdir, "tag", gone.pid, None)
        assert finishing(jdir, "tag", gone.pid)
        assert left_behind(jdir, "tag") == [] and seg.exists()
        assert orphans(tmp_path / "streams", set(), busy=lambda pid: finishing(jdir, "tag", pid)) == []
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert not list(jdir.glob("writer-*.lock"))  # (the writer process removed its lock file)
    assert not finishing(jdir, "tag", gone.pid)
    (claimed,) = left_behind(jdir, "tag")
    assert claimed.name.startswith(seg.name) and ".replaying-" in claimed.name
    # a lock file left by a writer process killed too is no lock: the journal is claimed all the same
    (jdir / f"writer-tag-{gone.pid}.lock").write_bytes(b"")
    assert not finishing(jdir, "tag", gone.pid) and not list(jdir.glob("writer-*.lock"))
