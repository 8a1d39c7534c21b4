"""The ``alerts`` table: record state changes, read the last state of each rule, list them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from peewee import Database, PostgresqlDatabase

from velvet_core.alerts.notify import text, threshold_for
from velvet_core.alerts.state import Change
from velvet_core.storage.sql import adapt, has_table, iso, to_dt, ts

ALERT_KEYS = ("id", "at", "rule", "kind", "subject", "state", "value", "threshold", "window", "text", "details",
              "source")



def record(db: Database, changes: list[Change], source: str) -> None:
    """Insert one row per change, in one short transaction."""
    if not changes:
        return
    pg = isinstance(db, PostgresqlDatabase)
    rows = [(c.at if pg else c.at.isoformat(" "), c.rule.name, c.rule.kind, c.subject, c.state, c.value,
             threshold_for(c.rule, c.state), c.rule.window_text, text(c.rule, c.state, [c.summary], c.repeat),
             orjson.dumps({**c.details, **({"repeat": True} if c.repeat else {})}).decode(), source)
            for c in changes]
    sql = adapt(db, 'INSERT INTO "alerts" ("at", "rule", "kind", "subject", "state", "value", "threshold", '
                   '"rule_window", "text", "details", "source") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)')
    with db.atomic():
        db.cursor().executemany(sql, rows)


def last_states(db: Database, rules: list[str]) -> list[dict[str, Any]]:
    """The latest row of each (rule, subject) of these rules: ``rule, subject, state, at, value``."""
    if not rules or not has_table(db, "alerts"):
        return []
    marks = ", ".join("?" * len(rules))
    cur = db.execute_sql(adapt(db, f'SELECT a."rule", a."subject", a."state", a."at", a."value" FROM "alerts" a '
                                  f'WHERE a."rule" IN ({marks}) AND a."id" = (SELECT max(b."id") FROM "alerts" b '
                                  'WHERE b."rule" = a."rule" AND b."subject" = a."subject")'), tuple(rules))
    return [{"rule": r[0], "subject": r[1], "state": r[2], "at": to_dt(r[3]), "value": r[4]}
            for r in cur.fetchall()]


def listing(db: Database, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
    """Recorded state changes, newest first (keys :data:`ALERT_KEYS`); none on a database without the table."""
    if not has_table(db, "alerts"):
        return []
    where, params = [], []
    if since is not None:
        where.append('"at" >= ?')
        params.append(ts(db, since))
    if until is not None:
        where.append('"at" <= ?')
        params.append(ts(db, until))
    sql = ('SELECT "id", "at", "rule", "kind", "subject", "state", "value", "threshold", "rule_window", "text", '
           '"details", "source" FROM "alerts"' + (" WHERE " + " AND ".join(where) if where else "")
           + ' ORDER BY "at" DESC, "id" DESC')
    out = []
    for r in db.execute_sql(adapt(db, sql), tuple(params)).fetchall():
        row = dict(zip(ALERT_KEYS, r, strict=True))
        row["at"] = iso(row["at"])
        row["details"] = orjson.loads(row["details"]) if row["details"] else None
        out.append(row)
    return out
