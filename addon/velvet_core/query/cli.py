"""The reading commands' arguments: batches, batch, lines, show, calls, stats, status, backup, sql, rebuild.

Declarations only, so that ``velvet --help`` and each command's parsing import nothing heavy: what a command does
is in :mod:`velvet_core.query.commands`, imported when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core import config
from velvet_core.clock import since_arg

RUN = "velvet_core.query.commands:"


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The reading commands, with the CLI's ``command(name, target, help)`` helper."""
    p = command("batches", RUN + "cmd_batches", "one row per batch, newest first")
    p.add_argument("--status", help="only batches in this status (completed, failed, in_progress, ...)")
    p.add_argument("--since", type=since_arg, metavar="WHEN", help="only batches created since WHEN")
    p = command("batch", RUN + "cmd_batch", "one batch: status history, durations, errors by code, cost by model")
    p.add_argument("batch_id")
    p = command("lines", RUN + "cmd_lines", "a batch's lines with status, error, tokens and cost")
    p.add_argument("batch_id")
    p.add_argument("--failed", action="store_true", help="only failed or malformed lines")
    p.add_argument("--custom-id", help="only the line with this custom_id")
    p = command("show", RUN + "cmd_show", "the exact request and answer of a batch line (BATCH_ID CUSTOM_ID) "
                                          "or of a live call (its id or x-request-id)")
    p.add_argument("ref", metavar="ID", help="a batch id (with CUSTOM_ID), or a call id / x-request-id")
    p.add_argument("custom_id", nargs="?", metavar="CUSTOM_ID")
    p = command("calls", RUN + "cmd_calls", "live calls, newest first")
    p.add_argument("--model")
    p.add_argument("--status", help="a status code (429), a class (4xx) or 'error'")
    p.add_argument("--endpoint", help="chat.completions, responses, embeddings, files, batches, ...")
    p.add_argument("--since", type=since_arg, metavar="WHEN")
    p.add_argument("--limit", type=int, default=100, help="at most this many (0: all; default 100)")
    p = command("stats", RUN + "cmd_stats", "calls, tokens, cost, error rate, latency and batch turnaround")
    p.add_argument("--by", choices=config.STATS_GROUPS, default="model")
    p.add_argument("--since", type=since_arg, metavar="WHEN")
    p = command("status", RUN + "cmd_status", "the health of each proxy writing here: last write, queue, spooled "
                                              "and dead-lettered operations, last error (exit 1 if one is "
                                              "failing)")
    p.add_argument("--spool-dir", metavar="DIR", help=f"the proxies' spool directory (default "
                                                      f"{config.default_spool_dir()}/<a folder per database>)")
    p.set_defaults(opens="tolerant")  # must speak when the database does not
    p = command("backup", RUN + "_backup", "copy a live SQLite database into a new FILE (online backup; "
                                           "mode 0600)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(opens="none")  # reads the file itself (SQLite's backup API), not through peewee
    p = command("sql", RUN + "cmd_sql", "run one read-only SQL statement (the database engine refuses any write)")
    p.add_argument("query")
    add_readonly_options(p)


def add_readonly_options(p: argparse.ArgumentParser) -> None:
    """The options of a command that runs SQL it was given (see storage/readonly.py)."""
    p.add_argument("--timeout", type=float, default=config.SQL_TIMEOUT, metavar="SECONDS",
                   help=f"stop the statement after this long (default {config.SQL_TIMEOUT:g})")
    p.add_argument("--allow-powerful-role", action="store_true",
                   help="PostgreSQL: run even as a role that can do more than read (a superuser, or one that "
                        "reaches the server's files): only the read-only transaction stands then")


def add_maintenance(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("rebuild", RUN + "cmd_rebuild", "recompute the batch counters and call rollups from the rows "
                                                "(writes)")
    p.set_defaults(opens="writable")
    p = command("migrate", RUN + "cmd_migrate",
                "bring the schema up to date (as the proxy does at start); with --partition, make calls and "
                "batch lines partitioned by time on PostgreSQL (stop the proxies first: the tables are locked "
                "while their rows are copied)")
    p.add_argument("--partition", choices=("month", "week", "day"), metavar="PERIOD",
                   help="month, week or day: the period of each partition of calls and batch lines")
    p.set_defaults(opens="writable")
    p = command("prune", RUN + "cmd_prune", "remove request and answer bodies, or whole rows, older than WHEN "
                                            "(a batch whole, by when it ended; the rollups and counters stay)")
    p.add_argument("--bodies-after", type=since_arg, metavar="WHEN",
                   help="remove the bodies of calls started, and of batches ended, before WHEN (e.g. 30d)")
    p.add_argument("--rows-after", type=since_arg, metavar="WHEN",
                   help="remove calls started, and the lines, files and events of batches ended, before WHEN")
    p.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    p.set_defaults(opens="writable")
