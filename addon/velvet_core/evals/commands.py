"""What ``velvet evals`` (answer quality per eval) and ``velvet evals run`` (a backfill) do; their arguments are in
:mod:`velvet_core.evals.cli`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from velvet_core import clock, jsonout
from velvet_core.evals.cli import default_rules
from velvet_core.humanize import money, printable, table

if TYPE_CHECKING:
    from peewee import Database

WAIT_STEP = 2.0  # seconds between two polls of the judges' batches (velvet evals run --wait)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _print(evals: list[dict[str, Any]]) -> None:
    table(["EVAL", "CHECK", "JUDGED", "PASSED", "FAILED", "PENDING", "SKIPPED", "PASS RATE", "BEFORE", "MEAN",
           "COST", "WORST"],
          [[printable(e["name"]), e["check"], e["judged"], e["passed"], e["failed"], e["pending"], e["skipped"],
            _pct(e["pass_rate"]), _pct(e["previous_pass_rate"]),
            "-" if e["mean_score"] is None else f"{e['mean_score']:.2f}", money(e["cost_usd"]),
            printable(", ".join(e["worst"][:3])) or "-"] for e in evals], right=range(2, 11))
    if not evals:
        print("(no scores in this window: set velvet_evals on the proxy, or run velvet evals run)")


def cmd_evals(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.scores import summary

    got = summary(db, a.since, clock.now())
    if a.json:
        return jsonout.dump({"evals": got})
    _print(got)


def cmd_run(url: str, a: argparse.Namespace) -> int:
    from velvet_core.cost.prices import Pricer
    from velvet_core.evals.engine import Evaluator, Route
    from velvet_core.evals.rules import EvalsError, load_evals
    from velvet_core.storage.database import open_db, open_readonly
    from velvet_core.storage.scores import summary

    try:
        rules = load_evals(a.rules or default_rules())
        names = set(a.name) if a.name else None
        for n in names or ():
            rules.named(n)
    except EvalsError as e:
        print(f"velvet: {printable(str(e))}", file=sys.stderr)
        return 2
    started = clock.now()
    if a.dry_run:
        db = open_readonly(url)
        try:
            plan = _dry_run(Evaluator(db, rules, Pricer.from_file(os.environ.get("VELVET_PRICES"))), a.since,
                            names)
        finally:
            db.close()
        if a.json:
            jsonout.dump({"dry_run": True, "evals": plan})
            return 0
        table(["EVAL", "CHECK", "ANSWERS", "ESTIMATED COST"],
              [[printable(p["name"]), p["check"], p["answers"],
                "-" if p["check"] != "judge" else money(p["estimated_usd"])] for p in plan], right=(2, 3))
        return 0
    db = open_db(url)
    ev = Evaluator(db, rules, Pricer.from_file(os.environ.get("VELVET_PRICES")), Route())
    try:
        tty = sys.stderr.isatty() and not a.json
        ev.take(since=a.since, until=started, names=names, progress=(lambda n: print(
            f"\rvelvet evals run: {n:,} answers read", end="", file=sys.stderr, flush=True)) if tty else None)
        if tty:
            print(file=sys.stderr)
        if any(r.check == "judge" for r in rules.evals if names is None or r.name in names):
            ev.judge_step(now=True)
            while a.wait and _waiting(db, [r.name for r in ev.judges() if names is None or r.name in names]):
                if sys.stderr.isatty():
                    print("velvet: waiting for the judges' answers …", file=sys.stderr, end="\r")
                time.sleep(WAIT_STEP)
                ev.judge_step(now=True)
        got = summary(db, a.since, started, names=sorted(names or [r.name for r in rules.evals]),
                      created_after=started, previous=False)
    finally:
        ev.close()
        db.close()
    if a.json:
        jsonout.dump({"evals": got})
        return 0
    _print(got)
    return 0


def _waiting(db: Database, names: list[str]) -> bool:
    from velvet_core.storage.sql import rows

    if not names:
        return False
    return bool(rows(db, f"SELECT 1 AS x FROM scores WHERE status IN ('pending', 'sent') AND eval IN "
                         f"({', '.join('?' * len(names))}) LIMIT 1", names))


def _dry_run(ev: Any, since: Any, names: set[str] | None) -> list[dict[str, Any]]:
    from velvet_core.evals import judge, store

    out = []
    for rule in ev.evals.evals:
        if names is not None and rule.name not in names:
            continue
        n, usd = 0, 0.0
        for source in rule.sources:
            after = 0
            while got := store.answers(ev.db, rule, source, after, 5000, since, None):
                after = max(x.call_id or x.result_id or 0 for x in got)
                for x in got:
                    if store.is_judge_traffic(x) or not store.sampled(x.subject, rule.sample):
                        continue
                    if store.has_score(ev.db, rule, x):
                        continue
                    n += 1
                    if rule.check == "judge" and not x.failed and x.text is not None:
                        usd += judge.estimate(rule, judge.request(rule, x), ev.pricer,
                                              batch=rule.via == "batch") or 0.0
                if len(got) < 5000:
                    break
        out.append({"name": rule.name, "check": rule.check, "answers": n,
                    "estimated_usd": round(usd, 6) if rule.check == "judge" else None})
    return out
