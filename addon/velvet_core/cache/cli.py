"""The arguments of ``velvet cache what-if | stats | clear`` (what they do: :mod:`velvet_core.cache.commands`,
imported when one runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core.clock import since_arg

RUN = "velvet_core.cache.commands:"


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``cache what-if``, ``cache stats`` and ``cache clear`` (``command`` is cli.py's helper)."""
    p = command("cache", RUN + "cmd_stats", "the response cache: what it would save (what-if), what it holds "
                                            "(stats), and clear", json=False)
    sub = p.add_subparsers(dest="cache_command", metavar="what-if|stats|clear", required=True)

    def sub_command(name: str, target: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
        c.set_defaults(func=RUN + target)
        return c

    c = sub_command("what-if", "cmd_what_if", "from the logs alone: how many calls had an identical earlier call "
                                              "(same canonical key) within the TTL, by model and endpoint, and "
                                              "the USD and latency a cache would have saved")
    c.add_argument("--since", type=since_arg, metavar="WHEN", help="calls started since WHEN (default 7d)")
    c.add_argument("--ttl", default="7d", metavar="T", help="entries live this long (seconds, or 30m, 2h, 7d; "
                                                             "default 7d, at most 365d)")
    c.add_argument("--scope", choices=("key", "project", "global"), default="key",
                   help="who shares entries: each API key (default), each project (openai-project), everyone")
    c.add_argument("--json", action="store_true", help="print JSON for machines")
    c = sub_command("stats", "cmd_stats", "what the cache holds: entries, size, hits, saved USD, hit rate per "
                                          "model")
    c.add_argument("--json", action="store_true", help="print JSON for machines")
    c = sub_command("clear", "cmd_clear", "remove cache entries (all, or those matching every filter given); "
                                          "the logged calls stay")
    c.add_argument("--older-than", type=since_arg, metavar="WHEN", help="only entries created before WHEN")
    c.add_argument("--model", help="only entries of this model")
    c.add_argument("--key", metavar="FINGERPRINT", help="only entries stored under this API key fingerprint")
    c.add_argument("--json", action="store_true", help="print JSON for machines")
    c.set_defaults(opens="writable")
