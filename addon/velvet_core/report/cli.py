"""``velvet report [--since WHEN] [-o FILE] [--json]``: the period's picture as one HTML file."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from peewee import Database

from velvet_core import clock
from velvet_core.private import write_private
from velvet_core.report.data import collect
from velvet_core.report.page import build
from velvet_core.storage.sql import parse_since

DEFAULT_OUTPUT = "report.html"


def add_commands(command: Callable[..., argparse.ArgumentParser], since: Callable[[str], Any]) -> None:
    p = command("report", cmd_report, "one self-contained HTML page (opens offline) of a period: batch timeline, "
                                      "turnaround, failures, spend per day, traffic, top tags and keys, alerts")
    p.add_argument("--since", type=since, metavar="WHEN", help="start of the period (default 7d: the week)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help=f"write the HTML here (default {DEFAULT_OUTPUT}; '-' for standard output)")


class Steps:
    """What the report is doing, on a terminal's stderr only."""

    def __init__(self) -> None:
        self.on = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def __call__(self, what: str) -> None:
        if self.on:
            sys.stderr.write(f"\rreport: {what}…{' ' * 20}")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.write(f"{text} ({time.monotonic() - self.t0:.1f}s)\n")


def cmd_report(db: Database, a: argparse.Namespace) -> None:
    until = clock.now()
    since = a.since or parse_since("7d", until)
    steps = Steps()
    data = collect(db, since, until, steps)
    if a.json and not a.output:  # the figures only
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    html = build(data, steps)
    out = a.output or DEFAULT_OUTPUT
    if out == "-":
        sys.stdout.write(html)
        return
    write_private(out, html.encode(), follow=True)
    if a.json:
        sys.stdout.write(orjson.dumps({"output": out, "bytes": len(html.encode()), "since": data["since"],
                                       "until": data["until"], "totals": data["totals"]},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    steps.done(f"report: {len(html.encode()) / 1024:,.0f} KB written to {out}")
