"""Generate the references in docs/ (run by cog: ``scripts/docs`` rewrites them, ``scripts/lint`` checks them).

``cli_reference()``: every ``velvet`` command and subcommand with its full ``--help``, walked from the argparse
parser. ``options_table()``: the mitmproxy options velvet declares. Both are rendered in a fixed environment
(100 columns, the data dir ``~/.local/share/velvet``, no ``$VELVET_*``) so the text does not depend on who runs it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WIDTH = "100"
# Variables that change the rendered defaults (config.data_dir, config.default_db_url) or the width.
_ENV = ("COLUMNS", "VELVET_DB", "VELVET_HOME", "XDG_DATA_HOME")


@contextmanager
def stable_env() -> Iterator[None]:
    """Render defaults as ``~/.local/share/velvet/…`` and help at 100 columns, whatever the caller's env."""
    saved = {k: os.environ.get(k) for k in _ENV}
    for k in _ENV:
        os.environ.pop(k, None)
    os.environ.update(COLUMNS=WIDTH, XDG_DATA_HOME="~/.local/share")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parser() -> argparse.ArgumentParser:
    from velvet_core.cli import parser

    return parser()


def _subcommands(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser's subcommands in declaration order (aliases skipped)."""
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.append((name, sub))
    return out


def _walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    yield path, p.format_help()
    for name, sub in _subcommands(p):
        yield from _walk(sub, (*path, name))


def cli_reference() -> str:
    """Markdown: one heading and one ``--help`` block per command, ``velvet`` first, depth first."""
    with stable_env():
        parts = []
        for path, text in _walk(_parser(), ("velvet",)):
            level = "###" if len(path) <= 2 else "####"
            parts.append(f"{level} `{' '.join(path)}`\n\n```text\n{text.rstrip()}\n```\n")
        return "\n".join(parts)


def _options() -> tuple[Any, ...]:
    from velvet_core.options import OPTIONS

    return OPTIONS


def _type_name(typespec: Any) -> str:
    from mitmproxy.utils.typecheck import typespec_to_str
    return typespec_to_str(typespec)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def column_reference() -> str:
    """Markdown: every column of the tables people query with its meaning (velvet_core.storage.meanings)."""
    from velvet_core.storage.meanings import reference

    return reference()


def options_table() -> str:
    """Markdown table: option, type, default, choices and help, as velvet declares them to mitmproxy."""
    with stable_env():
        rows = ["| option | type | default | help |", "|---|---|---|---|"]
        for o in _options():
            default = o.default
            if isinstance(default, list | tuple):
                default = ", ".join(map(str, default))
            shown = f"`{default}`" if default not in ("", None) else "(empty)"
            help_ = o.help + (f" Choices: {', '.join(f'`{c}`' for c in o.choices)}." if o.choices else "")
            rows.append(f"| `{o.name}` | {_type_name(o.type)} | {_cell(shown)} | {_cell(help_)} |")
        return "\n".join(rows) + "\n"
