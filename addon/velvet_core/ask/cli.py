"""``velvet ask``'s arguments (declarations only: what it does is in :mod:`velvet_core.ask.commands`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core.query.cli import add_readonly_options


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("ask", "velvet_core.ask.commands:cmd_ask",
                "ask a question in words: a model writes read-only SQL over the logs, velvet checks and runs it "
                "(no QUESTION: an interactive session; --eval: accuracy on a question set)")
    p.add_argument("question", nargs="?", metavar="QUESTION")
    p.add_argument("--model", help="the chat model (default $VELVET_ASK_MODEL, else gpt-4.1-mini)")
    p.add_argument("--base-url", metavar="URL",
                   help="an OpenAI-compatible API (default $VELVET_ASK_BASE_URL, else $OPENAI_BASE_URL, else "
                        "OpenAI's); a local server (Ollama, vLLM, llama.cpp) needs no OPENAI_API_KEY")
    p.add_argument("--sql-only", action="store_true", help="print the SQL (checked with EXPLAIN) and run nothing")
    p.add_argument("--max-rows", type=int, default=1000, metavar="N",
                   help="LIMIT added to a query that has none, and the most rows shown (default 1000)")
    p.add_argument("--eval", metavar="FILE.jsonl",
                   help="ask every question of FILE (question, category, sqlite, postgres) and print the "
                        "execution accuracy against the gold SQL")
    add_readonly_options(p)
