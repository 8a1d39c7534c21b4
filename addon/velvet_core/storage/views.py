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
    _in_rounds(db, {name: f'DROP VIEW IF EXISTS "{name}"' for name in views},
               "could not drop the views {}: other views read them")


def remake(db: Database, views: dict[str, str]) -> None:
    """Make again the ``views`` :func:`drop` dropped, each once the views it reads exist."""
    _in_rounds(db, {name: f'CREATE VIEW "{name}" AS {definition}' for name, definition in views.items()},
               "could not make the views {} again")


def _in_rounds(db: Database, statements: dict[str, str], failed: str) -> None:
    """Run each view's statement, in rounds, until all have run; one that fails (a view that another still
    reads, or that reads one not made yet) waits for the next round. ``failed`` names those no round could run."""
    left = dict(statements)
    while left:
        done = []
        for name, sql in left.items():
            try:
                with db.atomic():  # (a savepoint: a failed statement leaves the transaction usable)
                    db.execute_sql(sql)
                done.append(name)
            except Exception:
                continue
        if not done:
            raise RuntimeError(failed.format(", ".join(sorted(left))))
        for name in done:
            del left[name]
