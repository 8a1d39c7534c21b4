"""The arguments of ``velvet report [--since WHEN] [-o FILE] [--json]`` (what it does:
:mod:`velvet_core.report.commands`, imported when it runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core.clock import since_arg

DEFAULT_OUTPUT = "report.html"


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("report", "velvet_core.report.commands:cmd_report",
                "one self-contained HTML page (opens offline) of a period: batch timeline, turnaround, failures, "
                "spend per day, traffic, top tags and keys, answer quality (velvet_evals), alerts")
    p.add_argument("--since", type=since_arg, metavar="WHEN", help="start of the period (default 7d: the week)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help=f"write the HTML here (default {DEFAULT_OUTPUT}; '-' for standard output)")
