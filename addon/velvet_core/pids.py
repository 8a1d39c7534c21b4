"""Processes: whether one still runs (whose leftovers, journals, spool and spill files, status files, are whose),
and a background process's watch on the proxy that started it (its standard input)."""

from __future__ import annotations

import contextlib
import os
import threading


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, assumed: signal 0 there would terminate it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def until_stdin_ends(stopping: threading.Event, woken: threading.Event | None = None) -> threading.Thread:
    """Set ``stopping`` when standard input ends (the proxy closed it, or died), from a daemon thread reading the
    raw descriptor; set ``woken`` (if given) whenever bytes come (the proxy's nudges), and at the end. (Read
    through ``sys.stdin.buffer``, the thread held the reader's lock while it waited: a process that ended first,
    as the jobs process does when it has nothing to do, died at interpreter shutdown with "Fatal Python error:
    _enter_buffered_busy", printed in the proxy's terminal at every start.)"""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 1 << 16):
                if woken is not None:
                    woken.set()
        stopping.set()
        if woken is not None:
            woken.set()

    t = threading.Thread(target=watch, name="velvet-stdin", daemon=True)
    t.start()
    return t
