"""What ``velvet report`` does: the period's picture as one HTML file (its arguments:
:mod:`velvet_core.report.cli`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import orjson

from velvet_core import clock
from velvet_core.clock import parse_since
from velvet_core.private import write_private
from velvet_core.report.cli import DEFAULT_OUTPUT
from velvet_core.report.data import collect
from velvet_core.report.page import build

if TYPE_CHECKING:
    from peewee import Database


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
