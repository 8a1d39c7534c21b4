"""The arguments of ``velvet alerts`` and ``velvet alerts check`` (what they do:
:mod:`velvet_core.alerts.commands`, imported when one runs)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from velvet_core import config
from velvet_core.clock import since_arg

RUN = "velvet_core.alerts.commands:"
FIRING_EXIT = 3  # `velvet alerts check` when a rule is firing


def default_rules() -> Path:
    """``$VELVET_ALERTS``, else ``<data dir>/alerts.toml``."""
    return Path(os.environ.get("VELVET_ALERTS") or config.data_dir() / "alerts.toml")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``alerts`` and ``alerts check`` to the ``velvet`` parser (``command`` is cli.py's helper)."""
    p = command("alerts", RUN + "cmd_alerts", "alert state changes recorded (firing, warning, resolved), newest "
                                              "first; 'alerts check' evaluates the rules once")
    p.add_argument("--since", type=since_arg, metavar="WHEN", help="only changes since WHEN")
    sub = p.add_subparsers(dest="alerts_command", metavar="check")
    c = sub.add_parser("check", help="evaluate the alert rules once: print each rule's state, notify and "
                                     "record changes (exit status 3 when a rule is firing)",
                       description="Evaluate the alert rules once against the database (for cron): print "
                                   "each rule's state, send and record what changed since the last check. "
                                   f"Exit status {FIRING_EXIT} when a rule is firing, 0 otherwise.")
    c.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
    c.add_argument("--rules", metavar="FILE",
                   help=f"the rules file (default $VELVET_ALERTS, else {default_rules()})")
    c.add_argument("--state", metavar="FILE", help="where the rules' states are kept between checks "
                                                   "(default: a file in the data dir per database and rules file)")
    c.add_argument("--dry-run", action="store_true", help="evaluate and print only: no message, no record")
    c.add_argument("--json", action="store_true", help="print JSON for machines")
    c.set_defaults(func=RUN + "cmd_check")
