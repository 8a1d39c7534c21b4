"""What ``velvet cache what-if | stats | clear`` do (their arguments: :mod:`velvet_core.cache.cli`)."""

from __future__ import annotations

import argparse

from peewee import Database

from velvet_core import clock, jsonout
from velvet_core.cache.key import parse_ttl
from velvet_core.humanize import count, duration, money, size, table


def cmd_what_if(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.cache.whatif import what_if

    ttl = parse_ttl(a.ttl)  # (a ValueError is exit status 2, with its message)
    r = what_if(db, a.since or clock.parse_since("7d"), ttl, a.scope, progress=not a.json)
    if a.json:
        return jsonout.dump(r)
    share = f" ({r['repeats'] / r['calls'] * 100:.1f}%)" if r["calls"] else ""
    print(f"Since {r['since']}, TTL {duration(ttl)}, scope {r['scope']}: {count(r['calls'])} cacheable calls, "
          f"{count(r['repeats'])} repeats{share}; a cache would have saved {money(r['saved_usd'])} and "
          f"{duration(r['saved_seconds'])} of waiting.")
    if r["by_model"]:
        table(["MODEL", "ENDPOINT", "CALLS", "REPEATS", "SAVED"],
              [[g["model"], g["endpoint"], count(g["calls"]), count(g["repeats"]), money(g["saved_usd"])]
               for g in r["by_model"]], right=(2, 3, 4))


def cmd_stats(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.cache_store import stats

    r = stats(db, clock.now())
    if getattr(a, "json", False):
        return jsonout.dump(r)
    print(f"{count(r['entries'])} entries ({count(r['live_entries'])} live), {size(r['size_bytes'])}; "
          f"{count(r['hits'])} calls answered from the cache, saving {money(r['saved_usd'])}")
    if r["by_model"]:
        table(["MODEL", "ENTRIES", "CALLS", "HITS", "HIT RATE", "SAVED"],
              [[g["model"], count(g["entries"]), count(g["calls"]), count(g["hits"]),
                f"{g['hit_rate'] * 100:.1f}%", money(g["saved_usd"])] for g in r["by_model"]],
              right=(1, 2, 3, 4, 5))


def cmd_clear(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.cache_store import clear

    n = clear(db, a.older_than, a.model, a.key)
    if a.json:
        return jsonout.dump({"removed": n, "older_than": clock.iso_z(a.older_than),
                             "model": a.model, "key": a.key})
    print(f"{count(n)} cache {'entry' if n == 1 else 'entries'} removed")
