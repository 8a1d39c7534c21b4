"""peewee without its eager imports of database drivers.

peewee imports psycopg (and psycopg2, pymysql, MySQLdb) when it is itself imported: about 90 ms of a command's
start, paid even for a SQLite URL. :func:`import_peewee` imports peewee with those drivers hidden;
:class:`velvet_core.storage.database.PostgresDatabase` imports psycopg itself when it connects.
"""

from __future__ import annotations

import sys

DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi", "pymysql", "MySQLdb", "pysqlite3")


def import_peewee() -> None:
    """Import peewee (once) without the drivers above; a no-op once peewee is imported."""
    if "peewee" in sys.modules:
        return
    hidden = [name for name in DRIVERS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import peewee  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]
