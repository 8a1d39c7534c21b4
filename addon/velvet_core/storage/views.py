"""PostgreSQL views kept across a rewrite of the tables they read.

PostgreSQL refuses to retype a column a view reads, and drops a table's views with it: a step that does either
saves every view of the schema (velvet's and the user's), drops them, does its work, then makes them again.
"""

from __future__ import annotations

from peewee import Database


def saved(db: Database) -> dict[str, str]:
    """Every view of the current schema: name → definition."""
    return dict(db.execute_sql("SELECT viewname, definition FROM pg_views WHERE schemaname = current_schema()")
                .fetchall())


def drop(db: Database, views: dict[str, str]) -> None:
    """Drop ``views``, each once no view reads it; never one outside them (no ``CASCADE``): a view of another
    schema that reads one of them makes this raise instead of going unnoticed."""
    left = list(views)
    while left:
        kept = []
        for name in left:
            try:
                with db.atomic():  # (a savepoint: a view others still read waits for the next round)
                    db.execute_sql(f'DROP VIEW IF EXISTS "{name}"')
            except Exception:
                kept.append(name)
        if len(kept) == len(left):
            raise RuntimeError(f"could not drop the views {', '.join(sorted(kept))}: other views read them")
        left = kept


def remake(db: Database, views: dict[str, str]) -> None:
    """Make again those of ``views`` that are gone, each once the views it reads exist."""
    left = {n: d for n, d in views.items() if not db.execute_sql(
        "SELECT 1 FROM pg_views WHERE schemaname = current_schema() AND viewname = %s", (n,)).fetchone()}
    while left:
        made = []
        for name, definition in left.items():
            try:
                with db.atomic():  # (a savepoint: a view whose sources are not back yet waits for the next round)
                    db.execute_sql(f'CREATE VIEW "{name}" AS {definition}')
                made.append(name)
            except Exception:
                continue
        if not made:
            raise RuntimeError(f"could not make the views {', '.join(sorted(left))} again")
        for name in made:
            del left[name]
