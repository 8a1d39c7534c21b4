"""The arguments of ``velvet sync`` and ``velvet reconcile`` (what they do: :mod:`velvet_core.sync.commands`,
imported when one runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core.clock import since_arg

RUN = "velvet_core.sync.commands:"


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``sync`` and ``reconcile`` to the ``velvet`` parser (``command`` is cli.py's helper)."""
    p = command("sync", RUN + "cmd_sync",
                "pull batches from the API into the logs (those the proxy never saw, or saw in part): each batch, "
                "its events and its files' lines, as the proxy would have stored them")
    p.add_argument("--since", type=since_arg, default="7d", metavar="WHEN",
                   help="batches created since WHEN (default 7d)")
    p.add_argument("--batch", action="append", metavar="ID", help="only this batch (repeatable)")
    p.add_argument("--no-files", action="store_true", help="batch objects only: no input, output or error files")
    p.add_argument("--dry-run", action="store_true", help="list what would be added or updated; write nothing")
    p.set_defaults(opens="none")
    r = command("reconcile", RUN + "cmd_reconcile",
                "compare the logs with OpenAI's Usage API per day and model (batch and live; needs an admin key "
                "in $OPENAI_ADMIN_KEY): which days and models are missing, and what to do")
    r.add_argument("--since", type=since_arg, default="30d", metavar="WHEN", help="from this day (default 30d)")
    r.set_defaults(opens="tolerant")  # no database yet: everything the API counted is missing
