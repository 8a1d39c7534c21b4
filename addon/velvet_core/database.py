"""Open a database from a URL and create or migrate the schema to the current version."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from peewee import Database, PostgresqlDatabase, SqliteDatabase

from . import models

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2


class DatabaseURLError(ValueError):
    pass


def check_url(url: str) -> str:
    """Raise :class:`DatabaseURLError` unless ``url`` is a usable sqlite or postgresql URL."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if not parts.path or parts.path == "/":
            raise DatabaseURLError(f"{url!r}: a SQLite URL needs a file path, e.g. sqlite:///var/velvet.db")
    elif parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise DatabaseURLError(f"{url!r}: a PostgreSQL URL needs a database name, "
                                   "e.g. postgresql://user:pass@host:5432/velvet")
    else:
        raise DatabaseURLError(f"{url!r}: use sqlite:///path or postgresql://user:pass@host:port/db")
    return url


def sqlite_path(url: str) -> str:
    """As SQLAlchemy and peewee: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute."""
    return unquote(urlsplit(url).path)[1:]


def connect(url: str, *, readonly: bool = False) -> Database:
    """A peewee Database for ``url`` (not yet connected)."""
    check_url(url)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = sqlite_path(url)
        if not readonly:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pragmas = {"busy_timeout": 15000, "journal_mode": "wal", "synchronous": "normal",
                   "foreign_keys": 1}
        if readonly:
            return SqliteDatabase(f"file:{path}?mode=ro", uri=True, pragmas={"busy_timeout": 10000})
        return SqliteDatabase(path, pragmas=pragmas, check_same_thread=False)
    query = dict(parse_qsl(parts.query))
    return PostgresqlDatabase(
        unquote(parts.path.lstrip("/")), user=unquote(parts.username or "") or None,
        password=unquote(parts.password or "") or None, host=parts.hostname or None,
        port=parts.port, **query,
    )


VIEWS = {
    # one row per batch: the API's figures beside what the proxy logged and matched
    "batch_summary": """
        SELECT b.*,
          (SELECT count(*) FROM batch_requests r WHERE r.batch_id = b.id) AS lines,
          (SELECT count(*) FROM batch_results x
            WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND NOT x.failed) AS answered,
          (SELECT count(*) FROM batch_results x
            WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND x.failed) AS failed,
          (SELECT sum(x.cost_usd) FROM batch_results x WHERE x.batch_id = b.id) AS cost_usd
        FROM batches b""",
    # every input line with its answer (if downloaded): the exact prompt next to what came back
    "batch_lines": """
        SELECT r.id AS request_row_id, r.batch_id, r.custom_id, r.line_no, r.file_id AS input_file_id,
               r.model AS model_requested, r.url, r.body AS request_body, r.problem AS request_problem,
               x.file_id AS result_file_id, x.model, x.status_code, x.failed, x.error_code,
               x.error_message, x.request_id, x.body AS response_body, x.input_tokens, x.output_tokens,
               x.cached_tokens, x.reasoning_tokens, x.total_tokens, x.cost_usd
        FROM batch_requests r LEFT JOIN batch_results x ON x.request_row_id = r.id""",
}


def _v1(db: Database) -> None:
    db.create_tables(models.MODELS, safe=True)
    for name, sql in VIEWS.items():
        create = "CREATE VIEW IF NOT EXISTS" if isinstance(db, SqliteDatabase) else "CREATE OR REPLACE VIEW"
        db.execute_sql(f"{create} {name} AS {sql}")


# single-column indexes that the composite ones already cover: each cost every inserted line time
REDUNDANT_INDEXES = ("batch_requests_file_id", "batch_requests_upload_part_id", "batch_requests_custom_id",
                     "batch_requests_batch_id", "batch_results_file_id", "batch_results_batch_id",
                     "batch_results_custom_id")


def _v2(db: Database) -> None:
    for name in REDUNDANT_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


MIGRATIONS: dict[int, Callable[[Database], None]] = {1: _v1, 2: _v2}


def schema_version(db: Database) -> int:
    if not db.table_exists(models.Meta._meta.table_name):
        return 0
    with models.use(db):
        row = models.Meta.get_or_none(models.Meta.key == "schema_version")
    return int(row.value) if row else 0


def migrate(db: Database) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; safe when several proxies start at once."""
    lock = {"lock_type": "IMMEDIATE"} if isinstance(db, SqliteDatabase) else {}
    with models.use(db), db.atomic(**lock):
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(7041995)")
        current = schema_version(db)
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{current} is newer than this velvet (v{SCHEMA_VERSION})")
        for v in range(current + 1, SCHEMA_VERSION + 1):
            log.info("velvet: migrating database schema to v%d", v)
            MIGRATIONS[v](db)
            models.Meta.insert(key="schema_version", value=str(v)).on_conflict(
                conflict_target=[models.Meta.key], update={models.Meta.value: str(v)}).execute()
        return SCHEMA_VERSION


def open_db(url: str) -> Database:
    """Connect, bind the models and migrate."""
    db = connect(url)
    db.connect(reuse_if_open=True)
    migrate(db)
    return db
