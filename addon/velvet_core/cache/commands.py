"""What ``velvet cache what-if | stats | clear`` do (their arguments: :mod:`velvet_core.cache.cli`)."""

from __future__ import annotations

import argparse

from peewee import Database

from velvet_core import clock, jsonout
from velvet_core.cache.key import parse_ttl
from velvet_core.humanize import count, duration, money, table


def cmd_what_if(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.cache.whatif import what_if

    ttl = parse_ttl(a.ttl)  # (a ValueError is exit status 2, with its message)
    r = what_if(db, a.since or clock.parse_since("7d"), ttl, a.scope)
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
