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
