"""The ``velvet`` command: its parser and entry point. Each command group registers its commands from its own
``cli.py`` (reading: :mod:`velvet_core.query.cli`; replay and compare: :mod:`velvet_core.experiments.cli`;
export: :mod:`velvet_core.experiments.export`; alerts; report) through :func:`parser`'s ``command`` helper."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from velvet_core import __version__, config
from velvet_core.redact import redact


def parser() -> argparse.ArgumentParser:
    """The whole parser: every command and option (the CLI reference in docs/cli.md is generated from it)."""
    from velvet_core.alerts import cli as alerts_cli
    from velvet_core.experiments import cli as experiments_cli
    from velvet_core.experiments import export
    from velvet_core.query import cli as query_cli
    from velvet_core.report import cli as report_cli
    from velvet_core.storage.migrations import SCHEMA_VERSION
    from velvet_core.storage.sql import since_arg

    ap = argparse.ArgumentParser(
        prog="velvet", description="Query the OpenAI traffic velvet captured.",
        epilog="--db URL may come before or after the command; default $VELVET_DB, else "
               f"{config.default_db_url()}. WHEN is 2h, 30m, 7d, today, yesterday or an ISO date/time (UTC).")
    ap.add_argument("--db", default=None, help="database URL (sqlite:///path or postgresql://...)")
    ap.add_argument("--version", action="version", version=f"velvet {__version__} (schema v{SCHEMA_VERSION})")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str, json: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
        if json:
            p.add_argument("--json", action="store_true", help="print JSON for machines")
        p.set_defaults(func=func, opens="readonly")
        return p

    query_cli.add_commands(command)  # batches, batch, lines, show, calls, stats, status, sql
    export.add_commands(command)  # export
    experiments_cli.add_commands(command)  # replay, compare
    alerts_cli.add_commands(command, since_arg)  # alerts, alerts check
    report_cli.add_commands(command, since_arg)  # report
    query_cli.add_maintenance(command)  # rebuild
    return ap


def main(argv: list[str] | None = None) -> int:
    from velvet_core.query import queries, rebuild
    from velvet_core.storage.database import DatabaseURLError, open_readonly
    from velvet_core.storage.readonly import ReadOnlyError

    args = parser().parse_args(argv)
    url = args.db or config.default_db_url()
    if args.opens == "none":  # the command opens what it needs itself
        return int(args.func(url, args))
    if args.opens == "tolerant":
        try:
            db = open_readonly(url)
        except Exception as e:
            return int(args.func(None, args, redact(_first_line(e))))
        try:
            return int(args.func(db, args))
        finally:
            db.close()
    try:
        db = rebuild.open_writable(url) if args.opens == "writable" else open_readonly(url)
    except DatabaseURLError as e:
        return _fail(str(e), 2)
    except Exception as e:
        return _fail(f"cannot open {url}: {_first_line(e)}", 2)
    try:
        code = args.func(db, args)  # None, or an exit status (alerts check)
    except queries.NotFound as e:
        return _fail(str(e.args[0]), 1)
    except ReadOnlyError as e:
        return _fail(str(e), 1)
    except ValueError as e:
        return _fail(str(e), 2)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return _fail(f"{type(e).__name__}: {_first_line(e)}", 1)
    finally:
        db.close()
    return code if isinstance(code, int) else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(message: str, code: int) -> int:
    from velvet_core.humanize import printable

    print(f"velvet: {printable(redact(message))}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
