"""Whether a process still runs: whose leftovers (journals, spool and spill files, status files) are whose."""

from __future__ import annotations

import os


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
