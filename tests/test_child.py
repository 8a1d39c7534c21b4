"""writer/child.py: the writer in its own process."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.helpers import calls, chat

ROOT = Path(__file__).resolve().parent.parent


def test_a_dead_writer_process_is_replaced_and_loses_nothing(sqlite_url, tmp_path):
    """The child that writes for the proxy dies (OOM killer, say): the next flows start another (looked for once a
    second, at most once every 5 s), which reads the journal from where the dead one left off."""
    from velvet_core.writer.child import ChildWriter

    w = ChildWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
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


@pytest.mark.alone  # (it starts threads once idle-class, and allows 10 s: beside another test file it may not run)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_writer_process_gives_way_to_the_proxy_and_its_clients(sqlite_url, tmp_path):
    """Background work: the child runs niced and in the idle scheduling class (the proxy and the apps on the
    machine come first) and off the cores the proxy is pinned to."""
    from velvet_core.writer.child import NICE, ChildWriter

    w = ChildWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
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
        from velvet_core.writer.child import _unidle
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


@pytest.mark.parametrize("watcher", ["jobs", "helper"])
def test_a_background_process_that_ends_first_exits_cleanly(sqlite_url, watcher):
    """The proxy's background processes stop when their stdin ends, watched from a daemon thread. One that ends
    first while the proxy still holds that pipe open (the jobs process with nothing to do: no evals, no refresh
    key, at every start by default) exits with 0 and nothing on stderr but its own lines: the watch reads the raw
    descriptor (through ``sys.stdin.buffer`` it held the reader's lock, and the interpreter died at shutdown with
    "Fatal Python error: _enter_buffered_busy")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "addon"), "VELVET_JOBS_DB": sqlite_url}
    env.pop("OPENAI_API_KEY", None)
    if watcher == "jobs":
        args = [sys.executable, "-m", "velvet_core.jobs.worker", "--parent", str(os.getpid()), "--refresh", "3600"]
    else:  # the helper itself, in a process that ends at once
        args = [sys.executable, "-c", "import threading; from velvet_core.pids import until_stdin_ends; "
                "until_stdin_ends(threading.Event()); print('done')"]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        p.wait(60)  # (stdin still open: the process ends on its own)
        err = p.stderr.read().decode() if p.stderr else ""
    finally:
        assert p.stdin is not None
        p.stdin.close()
    assert p.returncode == 0, err
    assert "Fatal Python error" not in err and "Traceback" not in err, err


def _wakeups(pid: int) -> int:
    """How many times the main thread of ``pid`` has run (the third field of its schedstat)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[2])


def _written(url: str) -> set[str]:
    """The flows in the database so far (none before the child has made it)."""
    from peewee import OperationalError

    try:
        return set(calls(url))
    except OperationalError:
        return set()


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="reads /proc/PID/schedstat")
@pytest.mark.alone  # (a bound in seconds on an idle-class process: beside another test file it may not run)
def test_an_idle_writer_process_sleeps_until_the_proxy_nudges_it(sqlite_url, tmp_path):
    """With no flows for a second, the child stops looking at the journal 20 times a second (an idle proxy cost
    0.6 % of a core, and kept the CPU from deep sleep) and sleeps until the proxy's next flow nudges it (a byte on
    its stdin): that flow is written as soon as one that comes under load."""
    from velvet_core.writer.child import IDLE_POLLS, IDLE_WAIT, LINGER, POLL, ChildWriter

    w = ChildWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    w.start()
    assert w.proc is not None
    try:
        w.submit(chat(0))  # (the child is up once it is written)
        while "flow-0" not in _written(sqlite_url):
            time.sleep(0.05)
        for i in range(1, 4):  # (three times: a flow the 5-s safety look happened to catch would pass once)
            time.sleep(IDLE_POLLS * POLL + 0.5)  # idle by now
            before = _wakeups(w.proc.pid)
            time.sleep(2.0)
            woke = _wakeups(w.proc.pid) - before
            assert woke <= 4, f"the idle writer process's main thread ran {woke} times in 2 s"  # (polling: 40)
            sent = time.monotonic()
            w.submit(chat(i))
            while f"flow-{i}" not in _written(sqlite_url):
                assert time.monotonic() - sent < IDLE_WAIT, f"flow-{i} not written"
                time.sleep(0.05)
            assert time.monotonic() - sent < LINGER + 1.5, "the nudge did not wake the writer process"
    finally:
        assert w.stop(60)
    assert set(calls(sqlite_url)) == {f"flow-{i}" for i in range(4)}


def test_the_tail_forgets_the_segments_it_has_deleted(tmp_path):
    """The writer process's list of complete segments holds only those still on disk: it grew by one per
    segment (one per 1,000 flows or 2 s; one per call under sparse traffic) for as long as the proxy ran."""
    from velvet_core.writer.journal import Journal
    from velvet_core.writer.tail import Tail

    journal = Journal(tmp_path, "tag", max_entries=1)  # (a segment per flow)
    tail = Tail(tmp_path, "tag", os.getpid())
    for i in range(50):
        journal.append(chat(i))
    got = tail.poll()
    assert [s.flow_id for s, _ in got] == [f"flow-{i}" for i in range(50)]
    assert len(tail.done) == 49  # the last one is still being written
    for _, seg in got[:40]:
        seg.release()
    tail.poll()
    assert len(tail.done) == 9 and len(list(tmp_path.glob("journal-*"))) == 10
    for _, seg in got[40:]:
        seg.release()
    journal.close()
    tail.poll(final=True)
    assert list(tmp_path.glob("journal-*")) == []
    tail.poll()
    assert tail.done == set()


def test_a_jobs_process_with_nothing_to_do_is_reaped_at_once(sqlite_url, monkeypatch):
    """The jobs process ends at once when it has nothing to do (no evals, no refresh key: every start by default);
    the proxy reaps it then, not at its own exit (a zombie beside the proxy for as long as it runs)."""
    from velvet_core.jobs.worker import JobsProcess

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    j = JobsProcess(sqlite_url, ["--refresh", "3600"])
    j.start()
    assert j.proc is not None
    stat = Path(f"/proc/{j.proc.pid}/stat")
    deadline = time.monotonic() + 60
    while stat.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stat.exists(), f"the jobs process is left as {stat.read_text().split()[2]!r}"
    j.stop()
    assert j.proc.returncode == 0
