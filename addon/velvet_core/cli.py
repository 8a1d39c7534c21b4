"""The ``velvet`` command: its parser and entry point. Each command group declares its commands' arguments in
its own ``cli.py`` (reading: :mod:`velvet_core.query.cli`; replay, compare and export:
:mod:`velvet_core.experiments.cli`; alerts; report) through :func:`parser`'s ``command`` helper, and what they do
in its ``commands.py`` (or a module of its own), imported only when that command runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from velvet_core import SCHEMA, __version__, config
from velvet_core.redact import redact


def parser() -> argparse.ArgumentParser:
    """The whole parser: every command and option (the CLI reference in docs/cli.md is generated from it).

    Each command names what runs it as ``"module:function"``, imported by :func:`main` when the command runs:
    building the parser imports no command's code (``velvet --help`` and ``--version`` start fast).
    """
    from velvet_core.alerts import cli as alerts_cli
    from velvet_core.ask import cli as ask_cli
    from velvet_core.cache import cli as cache_cli
    from velvet_core.evals import cli as evals_cli
    from velvet_core.experiments import cli as experiments_cli
    from velvet_core.query import cli as query_cli
    from velvet_core.report import cli as report_cli
    from velvet_core.serve import cli as serve_cli
    from velvet_core.sync import cli as sync_cli

    ap = argparse.ArgumentParser(
        prog="velvet", description="Query the OpenAI traffic velvet captured.",
        epilog="--db URL may come before or after the command; default $VELVET_DB, else "
               f"{config.default_db_url()}. WHEN is 2h, 30m, 7d, today, yesterday or an ISO date/time (UTC).")
    ap.add_argument("--db", default=None, help="database URL (sqlite:///path or postgresql://...)")
    ap.add_argument("--version", action="version", version=f"velvet {__version__} (schema v{SCHEMA})")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, target: str, help: str, json: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
        if json:
            p.add_argument("--json", action="store_true", help="print JSON for machines")
        p.set_defaults(func=target, opens="readonly")
        return p

    query_cli.add_commands(command)  # batches, batch, lines, show, calls, stats, status, backup, sql
    experiments_cli.add_export(command)  # export
    experiments_cli.add_commands(command)  # replay, compare
    alerts_cli.add_commands(command)  # alerts, alerts check
    report_cli.add_commands(command)  # report
    query_cli.add_maintenance(command)  # rebuild
    serve_cli.add_commands(command)  # proxy, addon-path
    cache_cli.add_commands(command)  # cache what-if, stats, clear
    evals_cli.add_commands(command)  # evals, evals run
    sync_cli.add_commands(command)  # sync, reconcile
    ask_cli.add_commands(command)  # ask
    return ap


def resolve(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` target names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, unknown = ap.parse_known_args(argv)
    if unknown and not getattr(args, "passthrough", False):
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passthrough_args = unknown  # (velvet proxy: what goes to mitmproxy)
    from velvet_core.storage.drivers import import_peewee

    import_peewee()  # before anything imports peewee: psycopg is imported by a PostgreSQL connection only
    from velvet_core.query import queries, rebuild
    from velvet_core.storage.database import DatabaseURLError, open_readonly
    from velvet_core.storage.readonly import ReadOnlyError

    args.func = resolve(args.func)
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
