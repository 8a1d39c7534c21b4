"""The arguments of ``velvet evals`` and ``velvet evals run`` (what they do: :mod:`velvet_core.evals.commands`,
imported when one runs)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from velvet_core import config
from velvet_core.clock import since_arg

RUN = "velvet_core.evals.commands:"


def default_rules() -> Path:
    """``$VELVET_EVALS``, else ``<data dir>/evals.toml``."""
    return Path(os.environ.get("VELVET_EVALS") or config.data_dir() / "evals.toml")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``evals`` and ``evals run`` to the ``velvet`` parser (``command`` is cli.py's helper)."""
    p = command("evals", RUN + "cmd_evals", "answer quality per eval: judged, passed, failed, pending, skipped, "
                                            "pass rate against the window before, mean score, judge cost, worst "
                                            "examples; 'evals run' scores past answers")
    p.add_argument("--since", type=since_arg, default="7d", metavar="WHEN",
                   help="answers given since WHEN (default 7d)")
    sub = p.add_subparsers(dest="evals_command", metavar="run")
    r = sub.add_parser("run", help="score past calls and batch lines with the eval rules (a backfill)",
                       description="Score past calls and batch result lines with the eval rules: the same "
                                   "checks, sampling and judges as the proxy. Answers already scored are left "
                                   "as they are, so a rerun only adds what is missing.")
    r.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
    r.add_argument("--rules", metavar="FILE",
                   help=f"the rules file with [[eval]] tables (default $VELVET_EVALS, else {default_rules()})")
    r.add_argument("--name", action="append", metavar="NAME", help="only this eval (repeat for several)")
    r.add_argument("--since", type=since_arg, required=True, metavar="WHEN", help="answers given since WHEN")
    r.add_argument("--dry-run", action="store_true",
                   help="print how many answers would be scored and the judges' estimated cost; send nothing")
    r.add_argument("--wait", action="store_true",
                   help="wait for the judges' answers (their batches) before printing")
    r.add_argument("--json", action="store_true", help="print JSON for machines")
    r.set_defaults(func=RUN + "cmd_run", opens="none")
