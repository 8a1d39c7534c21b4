"""``velvet ask``: one question, an interactive session, or ``--eval`` over a question set."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from peewee import Database

from velvet_core import config, jsonout
from velvet_core.api.client import MissingKey
from velvet_core.ask.context import load_questions
from velvet_core.ask.copilot import Answer, Copilot, ModelDown, make_client, model_name
from velvet_core.humanize import printable, table

PROMPT = "ask> "
HISTORY = "ask_history"
SHOW_SQL = 2000  # characters of a failed answer's SQL printed


def _cell(v: Any) -> Any:
    return jsonout.default(v) if v is not None and not isinstance(v, int | float | str) else v


def _json_row(r: list[Any]) -> list[Any]:
    return [_cell(v) if not isinstance(v, bool) else v for v in r]


def show(answer: Answer, as_json: bool, sql_only: bool, out: Any = None) -> None:
    """Print an answer: the SQL, the table, the row count and the attempts (or its JSON)."""
    out = out or sys.stdout
    if as_json:
        d = answer.as_json()
        d["rows"] = [_json_row(r) for r in d["rows"]]
        return jsonout.dump(d, out)
    if answer.sql:
        out.write(answer.sql + "\n\n" if sql_only or answer.result else "")
    r = answer.result
    if r is None or sql_only:
        return
    if r.columns:
        numeric = [i for i in range(len(r.columns)) if r.rows and all(
            isinstance(row[i], int | float) and not isinstance(row[i], bool)
            for row in r.rows if row[i] is not None)]
        table(r.columns, [[_cell(v) for v in row] for row in r.rows], right=numeric, out=out)
    n = len(r.rows)
    more = f" (stopped at --max-rows {n}: there may be more)" if r.truncated else ""
    tries = "1 attempt" if answer.attempts == 1 else f"{answer.attempts} attempts"
    out.write(f"\n{n} row{'s' if n != 1 else ''}{more}; {tries}\n")


def failure(answer: Answer) -> str:
    """The one line (and the last SQL) said when a question could not be answered."""
    if answer.unsupported is not None:
        return f"velvet ask: the model says it cannot answer: {printable(answer.unsupported)}"
    sql = answer.sql or "(none)"
    if len(sql) > SHOW_SQL:
        sql = sql[:SHOW_SQL] + f"... ({len(sql)} characters)"
    return (f"velvet ask: no answer after {answer.attempts} attempts: {printable(answer.error or '?')}\n"
            f"last SQL:\n{sql}")


def cmd_ask(db: Database, a: argparse.Namespace) -> int:
    if a.max_rows < 1:
        raise ValueError("--max-rows must be at least 1")
    if a.timeout <= 0:
        raise ValueError("--timeout must be positive")
    if a.eval and a.question:
        raise ValueError("give a QUESTION or --eval FILE, not both")
    try:
        client = make_client(a.base_url)
    except MissingKey as e:
        print(f"velvet ask: {e}", file=sys.stderr)
        return 2
    with client:
        cp = Copilot(db, client, model_name(a.model), max_rows=a.max_rows, timeout=a.timeout,
                     allow_powerful_role=a.allow_powerful_role)
        try:
            if a.eval:
                return _eval(cp, Path(a.eval), a.json)
            if a.question is not None:
                if not a.question.strip():
                    raise ValueError("the question is empty")
                return _one(cp, a.question, a.json, a.sql_only)
            return interactive(cp, a.json, a.sql_only)
        except ModelDown as e:
            print(f"velvet ask: {printable(str(e))}", file=sys.stderr)
            return 1


def _one(cp: Copilot, question: str, as_json: bool, sql_only: bool) -> int:
    answer = cp.ask(question, execute=not sql_only)
    if as_json:
        show(answer, True, sql_only)
        return 0 if answer.result is not None else 1
    if answer.result is None:
        print(failure(answer), file=sys.stderr)
        return 1
    show(answer, False, sql_only)
    return 0


def interactive(cp: Copilot, as_json: bool, sql_only: bool) -> int:
    """Questions until Ctrl-D; each follow-up sees the earlier ones. ``\\sql``: the last SQL."""
    history = config.data_dir() / HISTORY
    try:
        import readline
    except ImportError:  # (a Python built without it)
        readline = None  # type: ignore[assignment]
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    tty = sys.stdin.isatty()
    if tty:
        print("Ask about the logs in words; a follow-up refines the last question. \\sql shows the last SQL, "
              "Ctrl-D leaves.")
    try:
        while True:
            try:
                line = input(PROMPT if tty else "")
            except EOFError:
                if tty:
                    print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            q = line.strip()
            if not q:
                continue
            if q == "\\sql":
                print(cp.last_sql or "(no SQL yet)")
                continue
            try:
                answer = cp.ask(q, execute=not sql_only)
            except ModelDown as e:
                print(f"velvet ask: {printable(str(e))}", file=sys.stderr)
                continue
            if answer.result is None and not as_json:
                print(failure(answer), file=sys.stderr)
            else:
                show(answer, as_json, sql_only)
            sys.stdout.flush()
    finally:
        if readline is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(history)
                os.chmod(history, 0o600)
            except OSError:
                pass


def _eval(cp: Copilot, path: Path, as_json: bool) -> int:
    from velvet_core.ask.evaluate import evaluate

    try:
        questions = load_questions(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not questions:
        raise ValueError(f"{path}: no questions")
    report = evaluate(cp, questions).as_json()
    if as_json:
        jsonout.dump(report)
        return 0
    print(f"model {report['model']}: {report['correct']}/{report['questions']} correct, execution accuracy "
          f"{report['accuracy']:.1%}, {report['attempts']} attempts")
    table(["category", "questions", "correct", "accuracy"],
          [[c, v["questions"], v["correct"], f"{v['accuracy']:.1%}"] for c, v in report["by_category"].items()],
          right=[1, 2, 3])
    for m in report["misses"]:
        print(f"\nmiss ({m['category']}, {m['attempts']} attempts): {printable(m['question'])}")
        print(f"  gold:  {' '.join(m['gold_sql'].split())}")
        print(f"  model: {' '.join((m['sql'] or '(none)').split())}")
        if m["error"]:
            print(f"  error: {printable(m['error'])}")
    return 0
