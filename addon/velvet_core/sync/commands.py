"""What ``velvet sync`` and ``velvet reconcile`` do; their arguments are in :mod:`velvet_core.sync.cli`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from velvet_core import jsonout
from velvet_core.humanize import count, printable, table
from velvet_core.redact import redact

if TYPE_CHECKING:
    from peewee import Database

RETRIES = 2  # a failing API is retried briefly; a run cut off is resumed by the next one


def _fail(message: str) -> int:
    print(f"velvet: {printable(redact(message))}", file=sys.stderr)
    return 1


def cmd_sync(url: str, a: argparse.Namespace) -> int:
    from velvet_core.api.client import APIError, Client, MissingKey
    from velvet_core.storage.database import open_db
    from velvet_core.sync.pull import Sync, listed

    try:
        client = Client.from_env(max_retries=RETRIES, timeout=300.0)
    except MissingKey:
        return _fail("OPENAI_API_KEY is not set: velvet sync reads the Batch API with it")
    tty = sys.stderr.isatty() and not a.json

    def progress(text: str) -> None:
        if tty:
            print(f"\r\033[Kvelvet sync: {printable(text)[:120]}", end="", file=sys.stderr, flush=True)

    db = open_db(url)  # (creates the database and its schema, as the proxy does)
    try:
        job = Sync(db, client, files=not a.no_files, dry_run=a.dry_run, progress=progress)
        batches = ((client.batch(b) for b in a.batch) if a.batch else listed(client, a.since))
        try:
            tally = job.run(batches)
        except APIError as e:
            if tty:
                print(file=sys.stderr)
            what = "the API refused the key" if e.status in (401, 403) else "the API cannot be read"
            return _fail(f"{what}: {e} ({job.tally.batches} batches synced before it; run again to go on)")
    finally:
        db.close()
        client.close()
    if tty:
        print(file=sys.stderr)
    if a.json:
        jsonout.dump(tally.as_dict())
        return 0
    t = tally
    print(f"{count(t.batches)} batches ({count(t.new_batches)} new, {count(t.updated_batches)} updated)"
          + (" — dry run, nothing written" if a.dry_run else
             f"; {count(t.input_lines)} input and {count(t.result_lines)} result lines from "
             f"{count(t.files_downloaded)} files ({t.bytes / 1e6:.1f} MB) in {t.seconds:.1f} s"))
    return 0


def cmd_reconcile(db: Database | None, a: argparse.Namespace, db_error: str | None = None) -> int:
    from velvet_core.api.client import APIError, Client
    from velvet_core.sync.reconcile import reconcile, row_differs

    key = os.environ.get("OPENAI_ADMIN_KEY")
    if not key:
        return _fail("OPENAI_ADMIN_KEY is not set: the Usage API needs an admin key")
    try:
        with Client(key, max_retries=RETRIES) as client:
            got = reconcile(db, client, a.since)
    except APIError as e:
        return _fail(f"the Usage API cannot be read: {e}")
    advice = got.pop("advice")
    if a.json:
        jsonout.dump(got)
        return 0
    table(["DAY", "MODEL", "KIND", "API REQ", "LOGGED REQ", "API IN", "LOGGED IN", "API OUT", "LOGGED OUT", ""],
          [[r["day"], printable(r["model"]) or "-", "batch" if r["batch"] else "live", count(r["api_requests"]),
            count(r["logged_requests"]), count(r["api_input_tokens"]), count(r["logged_input_tokens"]),
            count(r["api_output_tokens"]), count(r["logged_output_tokens"]), "≠" if row_differs(r) else ""]
           for r in got["rows"]], right=range(3, 9))
    if got["complete"]:
        print(f"complete: every day and model since {got['since']} matches the Usage API within 1 %")
    for line in advice:
        print(f"- {line}")
    return 0
