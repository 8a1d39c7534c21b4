"""The writer's error policy, journal, spool quarantine, crash leftovers and health, on both backends."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from rig import bound, free_port
from velvet_core.capture.snapshot import CallSnapshot
from velvet_core.parsing.classify import classify
from velvet_core.parsing.pricing import Pricer
from velvet_core.process.processor import Processor
from velvet_core.storage import models
from velvet_core.storage.ops import CallRow, RequestLines
from velvet_core.storage.values import clean_rows
from velvet_core.writer.writer import Writer

ROOT = Path(__file__).resolve().parent.parent


def chat(i: int, model: str = "gpt-4o-mini", extra: bytes = b"") -> CallSnapshot:
    path = "/v1/chat/completions"
    body = b'{"model":"%s","messages":[{"role":"user","content":"hi %d"}]%s}' % (model.encode(), i, extra)
    resp = (b'{"id":"chatcmpl-%d","object":"chat.completion","model":"gpt-4o-mini-2024-07-18",'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}' % i)
    now = time.time()
    return CallSnapshot(flow_id=f"flow-{i}", method="POST", host="api.openai.com", path=path,
                        route=classify("POST", path), key_fingerprint="fp", tags={},
                        request_headers={"content-type": "application/json"}, request_body=body,
                        request_encoding=None, started_at=now, ended_at=now + 0.01, status_code=200,
                        response_headers={"content-type": "application/json"}, response_body=resp)


def headers_with(s: CallSnapshot, headers: dict[str, str]) -> CallSnapshot:
    s.request_headers = {**s.request_headers, **headers}
    return s


def run(url: str, spool: Path, snaps: list[CallSnapshot], **kw) -> Writer:
    w = Writer(url, Processor(Pricer()).process, spool_dir=spool, **kw)
    w.start()
    for s in snaps:
        w.submit(s)
    assert w.stop(60)
    return w


def calls(url: str) -> dict[str, models.Call]:
    with bound(url):
        return {c.flow_id: c for c in models.Call.select()}


def test_poison_values_are_made_storable(db_url, tmp_path):
    """NUL characters, lone surrogates, 300-character models and out-of-range integers: every row lands."""
    poison = [
        chat(0, model="m" * 300),
        chat(1, model="gpt\\u0000x"),  # a JSON escape: the string holds a NUL character
        headers_with(chat(2), {"x-raw": "caf\udce9"}),  # a header byte that was not UTF-8 (surrogateescape)
        chat(3, extra=b',"max_tokens":100000000000000000000000000000'),
        chat(4, extra=b',"metadata":{"k":"v\\u0000"}'),
    ]
    ok = [chat(i) for i in range(10, 15)]
    w = run(db_url, tmp_path / "spool", [*poison, *ok])
    rows = calls(db_url)
    assert set(rows) == {s.flow_id for s in poison + ok}
    assert rows["flow-0"].model_requested == "m" * 300
    assert rows["flow-1"].model_requested == "gpt\ufffdx" and "NUL" in rows["flow-1"].problem
    assert json.loads(rows["flow-2"].request_headers)["x-raw"] == "caf\\udce9" and rows["flow-2"].problem is None
    assert all(rows[s.flow_id].problem is None for s in ok)
    assert w.health.dead_lettered == 0


def test_clean_rows_in_place():
    rows = [{"a": "ok", "b": "x\x00y", "n": 1 << 70, "m": -5, "problem": "earlier"}, {"c": "\udcff"}]
    clean_rows(rows)
    assert rows[0]["b"] == "x\ufffdy" and rows[0]["n"] is None and rows[0]["m"] == -5
    assert rows[0]["problem"].startswith("earlier; velvet made values storable: b: NUL")
    assert rows[1]["c"] == "\\udcff" and "surrogates" in rows[1]["problem"]


class Refused:
    """A value no database driver can bind."""


def test_a_refused_operation_never_blocks_the_others(db_url, tmp_path):
    """The bad operation is isolated: the others are written, it lands in a smaller form or as a dead letter."""
    good = [CallRow({"flow_id": f"g{i}", "method": "POST", "host": "h", "path": "/v1/x", "endpoint": "other",
                     "action": "other", "started_at": "2026-11-24 10:00:00"}) for i in range(40)]
    smaller = CallRow({**good[0].row, "flow_id": "bad-model", "input_tokens": Refused()})  # kept without it…
    smaller.row["request_body"] = "{}"
    dead = CallRow({**good[0].row, "flow_id": "no-start", "started_at": None})  # NOT NULL: cannot be stored
    lines = RequestLines([{"file_id": "f", "line_no": n, "custom_id": f"c{n}",
                           "body": Refused() if n == 7 else "{}"} for n in range(1, 21)])
    ops = [*good[:20], smaller, dead, lines, *good[20:]]

    w = Writer(db_url, lambda s: iter(ops), spool_dir=tmp_path / "spool")
    w.start()
    w.submit(chat(0))
    assert w.stop(60)
    rows = calls(db_url)
    assert {f"g{i}" for i in range(40)} <= set(rows)
    assert "bad-model" in rows and "only its identity was kept" in rows["bad-model"].problem
    assert "no-start" not in rows
    with bound(db_url):
        got = {r.line_no: r for r in models.BatchRequest.select()}
    assert set(got) == set(range(1, 21)) and got[8].body == "{}"
    assert got[7].body is None and "left out: body" in got[7].problem
    letters = [json.loads(line) for line in (tmp_path / "spool" / "dead-letters.jsonl").read_text().splitlines()]
    assert [d["data"]["row"]["flow_id"] for d in letters] == ["no-start"] and letters[0]["operation"] == "CallRow"
    assert w.health.dead_lettered == 1 and w.status()["dead_lettered"] == 1


def test_damaged_spool_file_is_quarantined_not_deleted(db_url, tmp_path):
    spool = tmp_path / "spool"
    down = Writer(db_url, Processor().process, spool_dir=spool)
    down.spool.write([CallRow({"flow_id": "spooled", "method": "GET", "host": "h", "path": "/",
                               "endpoint": "other", "action": "other", "started_at": "2026-11-24 10:00:00"})])
    with open(down.spool.path, "ab") as f:
        f.write(b"\x80\x05garbage that is no pickle")
    w = run(db_url, spool, [chat(1)])
    assert {"spooled", "flow-1"} <= set(calls(db_url))
    kept = list(spool.glob("spool-*.damaged-*"))
    assert len(kept) == 1 and b"garbage" in kept[0].read_bytes()
    assert w.health.quarantined == 1


CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]
    from test_writer_policy import chat
    from velvet_core.process.processor import Processor
    from velvet_core.writer.writer import Writer
    # the thread is never started: every flow waits in the queue, as when the writer lags behind
    w = Writer({url!r}, Processor().process, spool_dir=__import__("pathlib").Path({spool!r}))
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


def test_health_is_published(db_url, tmp_path):
    spool = tmp_path / "spool"
    w = run(db_url, spool, [chat(i) for i in range(3)])
    (status,) = [orjson.loads(p.read_bytes()) for p in spool.glob("status-*.json")]
    assert status["written"] >= 3 and status["failing_since"] is None and status["stopped_at"]
    assert status["pid"] == os.getpid() and "password" not in status["db"]
    with bound(db_url):
        (row,) = list(models.ProxyStatus.select())
    assert row.proxy == w.health.proxy and row.written >= 3 and row.stopped_at is not None


def test_outage_warns_then_recovers(tmp_path, caplog):
    """Writes failing for longer than a few seconds: one warning, then one when they recover."""
    target = tmp_path / "later"
    target.write_text("not a directory")  # the database cannot be created yet
    url = f"sqlite:///{target / 'v.db'}"
    w = Writer(url, Processor().process, spool_dir=tmp_path / "spool", warn_after=0.5)
    w.start()
    w.submit(chat(1))
    deadline = time.monotonic() + 10
    while "have failed for" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "have failed for" in caplog.text and w.status()["failing_since"] is not None
    target.unlink()
    target.mkdir()
    assert w.stop(30)
    assert "recovered after" in caplog.text and set(calls(url)) == {"flow-1"}


@pytest.mark.parametrize("text", [
    "postgresql://velvet:s3cret@db:5432/x", "dbname=x password=s3cret host=y", "Bearer sk-abcdefghijkl123",
])
def test_redact(text):
    from velvet_core.redact import redact

    assert "s3cret" not in redact(text) and "abcdefghijkl123" not in redact(text)


def test_velvet_status_reads_the_database_and_the_spool(db_url, tmp_path, capsys):
    from velvet_core.query.cli import main

    spool = tmp_path / "spool"
    w = run(db_url, spool, [chat(i) for i in range(4)])
    assert main(["--db", db_url, "status", "--spool-dir", str(spool), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s) == {"proxies", "database_error", "spool_dir", "spooled_files", "dead_letters",
                      "dead_letter_file", "quarantined"}
    (p,) = s["proxies"]
    assert p["proxy"] == w.health.proxy and p["source"] == "both" and p["written"] >= 4
    assert p["running"] is False and p["stopped_at"] and p["failing_since"] is None
    assert main(["--db", db_url, "status", "--spool-dir", str(spool)]) == 0
    assert w.health.proxy in capsys.readouterr().out

    # the database gone: the spool's status file still speaks, and the exit code says something is wrong
    nowhere = f"postgresql://velvet:s3cret@127.0.0.1:{free_port()}/x?connect_timeout=1"
    assert main(["--db", nowhere, "status", "--spool-dir", str(spool), "--json"]) == 1
    out = capsys.readouterr()
    s = json.loads(out.out)
    assert s["database_error"] and [p["source"] for p in s["proxies"]] == ["file"]
    assert "s3cret" not in out.out + out.err


async def test_velvet_status_command(tmp_path):
    from mitmproxy.test import taddons
    from velvet_core.capture.addon import Velvet

    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=f"sqlite:///{tmp_path / 'v.db'}", velvet_spool_dir=str(tmp_path / "spool"))
        v.running()
        assert v.status().startswith("velvet: writing; last write")
        v.done()
        assert v.status() == "velvet: not running"


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


def test_a_full_disk_is_never_taken_for_bad_data():
    import peewee
    from velvet_core.writer.policy import exhausted, transient

    full = peewee.OperationalError("database or disk is full")
    assert transient(full) and exhausted(full)
    hidden = peewee.OperationalError("cannot rollback - no transaction is active")  # SQLite full, as it shows
    assert exhausted(hidden)
    assert not exhausted(peewee.IntegrityError("NOT NULL constraint failed: calls.started_at"))


def test_a_dead_writer_process_is_replaced_and_loses_nothing(sqlite_url, tmp_path):
    """The child that writes for the proxy dies (OOM killer, say): the next flows start another (looked for once a
    second, at most once every 5 s), which reads the journal from where the dead one left off."""
    from velvet_core.writer.process import ProcessWriter

    w = ProcessWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    w.start()
    first = w.proc
    assert first is not None
    for i in range(20):
        w.submit(chat(i))
    first.kill()
    first.wait()
    deadline = time.monotonic() + 30
    i = 20
    while w.proc is first and time.monotonic() < deadline:
        w.submit(chat(i))
        i += 1
        time.sleep(0.05)
    assert w.proc is not first and w.proc is not None and w.proc.poll() is None
    assert w.stop(60)
    assert set(calls(sqlite_url)) == {f"flow-{n}" for n in range(i)}


def test_a_journal_frame_is_plain_values_and_reads_back_whole(tmp_path):
    """Frames are tuples of builtins (no class looked up by name on the event loop, nothing imported to read
    them); every field comes back; frames of the older formats (the pickled dataclass, and the tuple without
    the raw header fields) are still read."""
    import dataclasses
    import pickle
    import pickletools

    from velvet_core.capture.snapshot import TapInfo, from_record, to_record
    from velvet_core.writer.journal import Journal, read

    full = dataclasses.replace(
        chat(1), request_end_at=2.5, first_byte_at=3.5, response_encoding="gzip", request_encoding="br",
        stream_chunks=[(1.0, b"data: x\n\n")], stream_finished=True, error="boom", notes=["n"],
        request_tap=TapInfo(tmp_path / "req.spill", 10, True, None), response_tap=TapInfo(None, 0, False, "cut"),
        client_body=b"{}", tags={"team": "a"}, route=classify("GET", "/openai/deployments/d/files/file-1/content"),
        request_fields=[(b"Content-Type", b"application/json")], response_fields=((b"X-Request-Id", b"req_1"),),
        scheme="http", port=18101)
    assert all(getattr(full, f.name) not in (None, False) for f in dataclasses.fields(full))  # every field set
    frame = pickle.dumps(to_record(full), protocol=pickle.HIGHEST_PROTOCOL)
    assert not [op for op, *_ in pickletools.genops(frame) if "GLOBAL" in op.name or "REDUCE" in op.name]
    assert from_record(pickle.loads(frame)) == full
    assert from_record(("something", "else")) is None
    before = (2, *to_record(full)[1:-4])  # a frame of the format before the raw header fields (RECORD 2)
    assert from_record(pickle.loads(pickle.dumps(before))) == dataclasses.replace(
        full, request_fields=None, response_fields=None, scheme="https", port=None)
    before = (3, *to_record(full)[1:-2])  # before scheme and port (RECORD 3)
    assert from_record(pickle.loads(pickle.dumps(before))) == dataclasses.replace(full, scheme="https", port=None)

    j = Journal(tmp_path / "j", "tag")
    j.append(full)
    j.close()
    (seg,) = (tmp_path / "j").glob("journal-*")
    with open(seg, "ab") as f:  # a frame as velvet 0.3 wrote it: the dataclass itself
        old = pickle.dumps(chat(2), protocol=pickle.HIGHEST_PROTOCOL)
        f.write(len(old).to_bytes(4, "little") + old)
    assert [s.flow_id for s in read(seg)] == ["flow-1", "flow-2"]
    assert next(read(seg)) == full


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_writer_process_gives_way_to_the_proxy_and_its_clients(sqlite_url, tmp_path):
    """Background work: the child runs niced and in the idle scheduling class (the proxy and the apps on the
    machine come first) and off the cores the proxy is pinned to."""
    from velvet_core.writer.process import NICE, ProcessWriter

    w = ProcessWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    cpus = os.sched_getaffinity(0)
    spread = len(cpus) > 1 and cpus == set(range(os.cpu_count() or 1))  # (not in a container's cpuset)
    if spread:
        os.sched_setaffinity(0, {min(cpus)})  # pinned as a benchmark pins mitmdump (the child starts with it)
    try:
        w.start()
        assert w.proc is not None
        deadline = time.monotonic() + 10
        want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
        while time.monotonic() < deadline and os.getpriority(os.PRIO_PROCESS, w.proc.pid) != want:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, w.proc.pid) == want
        if hasattr(os, "SCHED_IDLE"):  # (Linux) every thread of the child, the writer's too
            while time.monotonic() < deadline and len(os.listdir(f"/proc/{w.proc.pid}/task")) < 3:
                time.sleep(0.05)  # (the writer's thread, and the one watching stdin)
            tids = [int(t) for t in os.listdir(f"/proc/{w.proc.pid}/task")]
            assert len(tids) >= 3
            assert {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
        if spread:
            while time.monotonic() < deadline and min(cpus) in os.sched_getaffinity(w.proc.pid):
                time.sleep(0.05)
            assert os.sched_getaffinity(w.proc.pid) == cpus - {min(cpus)}
    finally:
        os.sched_setaffinity(0, cpus)
        assert w.stop(30)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="the idle scheduling class is Linux's")
def test_once_the_proxy_stops_the_writer_process_leaves_the_idle_class_if_allowed():
    """With no proxy left to give way to, every thread returns to the normal class; an unprivileged process
    whose RLIMIT_NICE forbids it stays idle-class, without an error."""
    code = textwrap.dedent("""
        import os, threading
        from velvet_core.writer.process import _unidle
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        go = threading.Event()
        t = threading.Thread(target=go.wait)  # (inherits the idle class, as the writer's thread does)
        t.start()
        _unidle()
        print(sorted({os.sched_getscheduler(int(x)) for x in os.listdir("/proc/self/task")}))
        go.set()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "addon")}).stdout
    allowed = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20
    assert out.strip() == str([os.SCHED_OTHER] if allowed else [os.SCHED_IDLE])


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


def test_a_batch_file_is_written_at_once_however_long_the_writer_lets_calls_gather(sqlite_url, tmp_path):
    """A writer lets live calls gather before a transaction (1 s in the writer process); a batch file going up
    is a transaction's worth on its own and is written without that wait."""
    from test_batch_units import multipart_body

    b = "velvetboundary"
    data = b"".join(b'{"custom_id":"r-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n' % i
                    for i in range(20))
    now = time.time()
    upload = CallSnapshot(
        flow_id="up-1", method="POST", host="api.openai.com", path="/v1/files",
        route=classify("POST", "/v1/files"),
        key_fingerprint="fp", tags={}, request_headers={"content-type": f"multipart/form-data; boundary={b}"},
        request_body=multipart_body(b, [("purpose", None, b"batch"), ("file", "in.jsonl", data)]),
        request_encoding=None, started_at=now, ended_at=now, status_code=200,
        response_headers={"content-type": "application/json"},
        response_body=b'{"id":"file-up1","object":"file","purpose":"batch","filename":"in.jsonl","bytes":1}')
    w = Writer(sqlite_url, Processor(Pricer()).process, spool_dir=tmp_path / "spool", linger=60)
    w.start()
    try:
        w.submit(upload)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.written == 0:
            time.sleep(0.05)
        assert w.written > 0, "the upload waited for the linger"
        with bound(sqlite_url):
            assert models.BatchRequest.select().where(models.BatchRequest.file_id == "file-up1").count() == 20
    finally:
        assert w.stop(60)
