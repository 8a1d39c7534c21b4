"""What ``velvet alerts`` (the recorded state changes) and ``velvet alerts check`` (evaluate rules once, for cron)
do; their arguments are in :mod:`velvet_core.alerts.cli`."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from velvet_core import config, jsonout
from velvet_core.alerts.cli import FIRING_EXIT, default_rules
from velvet_core.alerts.evaluate import fmt_value
from velvet_core.alerts.history import listing, record
from velvet_core.alerts.notify import Notifier, payloads
from velvet_core.alerts.rules import BATCH_KINDS, RuleSet, load_rules
from velvet_core.alerts.runner import Engine, announce, utcnow
from velvet_core.humanize import printable, table, when
from velvet_core.private import private_dir, write_private
from velvet_core.storage.database import open_db
from velvet_core.storage.sql import iso

if TYPE_CHECKING:
    from peewee import Database

CHECK_SOURCE = "velvet alerts check"


def cmd_alerts(db: Database, a: argparse.Namespace) -> None:
    rows = listing(db, since=a.since)
    if a.json:
        return jsonout.dump(rows)
    table(["AT", "STATE", "RULE", "SUBJECT", "MESSAGE"],
          [[when(r["at"]), r["state"], r["rule"], r["subject"] or "-", r["text"].split(": ", 1)[-1]]
           for r in rows])
    if not rows:
        print("(no alerts)")


def state_file(url: str, rules: Path) -> Path:
    tag = hashlib.sha256(f"{url}\n{rules.resolve()}".encode()).hexdigest()[:12]
    return config.data_dir() / f"alerts-state-{tag}.json"


def cmd_check(db: Database, a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    url = a.db or config.default_db_url()
    rules_path = Path(a.rules).expanduser() if a.rules else default_rules()
    ruleset = load_rules(rules_path)  # RulesError is a ValueError: one line on stderr, status 2
    engine = Engine(ruleset)
    state = Path(a.state).expanduser() if a.state else state_file(url, rules_path)
    if state.exists():
        try:
            engine.tracker.load(orjson.loads(state.read_bytes()))
            engine.restored = True
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"velvet: ignoring unreadable state file {state}: {e}", file=sys.stderr)
    engine.tracker.forget_rules_except({r.name for r in ruleset.rules})
    now = utcnow()
    changes = engine.evaluate(db, now)
    messages = payloads(changes)
    delivered: bool | None = None
    if not a.dry_run:
        notifier = Notifier(ruleset.notify).start()
        announce(changes, notifier)
        if changes:
            wdb = open_db(url)
            try:
                record(wdb, changes, CHECK_SOURCE)
            finally:
                wdb.close()
        if notifier.enabled and messages:
            delivered = notifier.flush(ruleset.notify.timeout * (ruleset.notify.retries + 1) + 60) \
                and notifier.failed == 0
        notifier.stop(0)
        private_dir(state.parent)
        tmp = state.with_suffix(".tmp")
        write_private(tmp, orjson.dumps(engine.tracker.dump()))
        tmp.replace(state)
    report = _rule_states(engine, ruleset)
    if a.json:
        rules = [{k: v for k, v in r.items() if not k.endswith("_text")} for r in report]
        jsonout.dump({"at": iso(now), "rules": rules, "messages": messages, "delivered": delivered})
    else:
        table(["RULE", "KIND", "STATE", "VALUE", "THRESHOLD", "WHAT"],
              [[r["rule"], r["kind"], r["state"], r["value_text"], r["threshold_text"], r["text"]]
               for r in report])
        if a.dry_run:  # (otherwise each message is in the log, on standard error)
            for m in messages:
                print(f"would send: {printable(m['text'])}")
    return FIRING_EXIT if any(r["state"] == "firing" for r in report) else 0


def _rule_states(engine: Engine, ruleset: RuleSet) -> list[dict[str, Any]]:
    """Each rule's state now, its value (the worst subject's) and what was measured."""
    out = []
    for rule in ruleset.rules:
        reading = engine.readings.get(rule.name)
        state = engine.tracker.state(rule.name)
        value: float | None = None
        if reading is None:
            what, no_data = "could not be evaluated (see the warning above)", None
        elif reading.instances is None:
            what, no_data = f"no data: {reading.note}", reading.note
        else:
            no_data = None
            shown = [i for i in reading.instances if i.level != "ok"] if rule.kind in BATCH_KINDS \
                or rule.kind == "velvet_stalled" else reading.instances
            values = [i.value for i in shown if i.value is not None]
            value = max(values) if values else None
            what = "; ".join(i.summary for i in shown[:3])
            what += f"; and {len(shown) - 3} more" if len(shown) > 3 else ""
            if not shown:
                what = f"none of {len(reading.instances)} {'batches' if rule.kind in BATCH_KINDS else 'proxies'}" \
                       " at risk" if reading.instances else "nothing to watch"
        limit = rule.window if rule.kind == "velvet_stalled" else rule.threshold
        out.append({"rule": rule.name, "kind": rule.kind, "state": state, "value": value, "threshold": limit,
                    "window": rule.window_text, "no_data": no_data, "text": what,
                    "value_text": fmt_value(rule, value), "threshold_text": fmt_value(rule, limit)})
    return out
