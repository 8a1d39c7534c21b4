"""``velvet export``: live calls or batch lines as JSONL or CSV, or successful chat answers as fine-tuning data.

One writer per format; the command opens the output, counts the rows for the progress bar and hands each row to
the format's writer.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any, TextIO

import orjson
from peewee import Database

from velvet_core import jsonout
from velvet_core.experiments import finetune
from velvet_core.experiments.select import Selection, count, parse_tag, select
from velvet_core.humanize import Progress
from velvet_core.private import open_private
from velvet_core.query import queries


def cmd_export(db: Database, a: argparse.Namespace) -> None:
    if a.format != "finetune" and (a.model or a.endpoint or a.tag):
        raise ValueError("--model, --endpoint and --tag apply to --format finetune")
    if a.format == "finetune":
        total, rows, skipped = _finetune_rows(db, a)
    else:
        total, rows = queries.export_rows(db, batch_id=a.batch, lines_of_batches=a.lines, since=a.since)
        skipped = Counter()
    out = open_private(a.output, "w", follow=True, newline="", encoding="utf-8") if a.output else sys.stdout
    progress = Progress(total, f"exporting to {a.output}") if a.output else None
    written = 0
    try:
        write = WRITERS[a.format](out)
        for r in rows:
            if r is not None:
                write(r)
                written += 1
            if progress:
                progress.advance()
    finally:
        if progress:
            progress.close()
        if out is not sys.stdout:
            out.close()
    if a.format == "finetune":
        why = "; ".join(f"{n:,} {reason}" for reason, n in skipped.most_common())
        if a.output or skipped:
            print(f"{written:,} examples written{f' to {a.output}' if a.output else ''}"
                  f"{f' ({sum(skipped.values()):,} skipped: {why})' if skipped else ''}", file=sys.stderr)
    elif a.output:
        print(f"{total:,} rows written to {a.output}", file=sys.stderr)


def _finetune_rows(db: Database, a: argparse.Namespace) -> tuple[int, Iterator[dict[str, Any] | None],
                                                                  Counter[str]]:
    """Successful chat answers as fine-tuning examples (None for one skipped, counted in the Counter by why)."""
    sel = Selection(batch=a.batch, lines=a.lines, calls=not (a.batch or a.lines), model=a.model,
                    endpoint=a.endpoint, since=a.since, tags=[parse_tag(t) for t in a.tag or ()])
    if sel.endpoint not in (None, "chat.completions", "responses"):
        raise ValueError(f"--endpoint {sel.endpoint!r}: fine-tuning data comes from chat.completions or responses")
    skipped: Counter[str] = Counter()
    return count(db, sel, ok_only=True), finetune.examples(select(db, sel, answers=True, ok_only=True), skipped), \
        skipped


# -- writers: one per format, each takes the open output and returns its row writer ------------------------

def _jsonl(out: IO[Any] | TextIO) -> Callable[[dict[str, Any]], None]:
    def write(r: dict[str, Any]) -> None:
        out.write(orjson.dumps(r, default=jsonout.default).decode() + "\n")

    return write


def _csv(out: IO[Any] | TextIO) -> Callable[[dict[str, Any]], None]:
    writer: csv.DictWriter | None = None

    def write(r: dict[str, Any]) -> None:
        nonlocal writer
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(r))
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})

    return write


def _finetune(out: IO[Any] | TextIO) -> Callable[[dict[str, Any]], None]:
    def write(example: dict[str, Any]) -> None:
        out.write(orjson.dumps(example).decode() + "\n")

    return write


WRITERS: dict[str, Callable[[IO[Any]], Callable[[dict[str, Any]], None]]] = {
    "jsonl": _jsonl, "csv": _csv, "finetune": _finetune}
