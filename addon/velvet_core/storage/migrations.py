"""The database schema's history: a frozen baseline and named, append-only steps after it.

Nothing here reads the peewee models: a step must do the same thing on every database forever, so
each one is written out as it was the day it was added. To change the schema, append a step to
:data:`MIGRATIONS` (and change the models to match); never edit the baseline or an existing step.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from peewee import Database, PostgresqlDatabase, SqliteDatabase

import velvet_core
from velvet_core.storage.sql import has_table

log = logging.getLogger(__name__)

# The two views as of schema v2, the same SQL on both backends.
VIEWS_V2 = """
CREATE VIEW batch_summary AS
SELECT b.*,
  (SELECT count(*) FROM batch_requests r WHERE r.batch_id = b.id) AS lines,
  (SELECT count(*) FROM batch_results x
    WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND NOT x.failed) AS answered,
  (SELECT count(*) FROM batch_results x
    WHERE x.batch_id = b.id AND x.request_row_id IS NOT NULL AND x.failed) AS failed,
  (SELECT sum(x.cost_usd) FROM batch_results x WHERE x.batch_id = b.id) AS cost_usd
FROM batches b;

CREATE VIEW batch_lines AS
SELECT r.id AS request_row_id, r.batch_id, r.custom_id, r.line_no, r.file_id AS input_file_id,
       r.model AS model_requested, r.url, r.body AS request_body, r.problem AS request_problem,
       x.file_id AS result_file_id, x.model, x.status_code, x.failed, x.error_code,
       x.error_message, x.request_id, x.body AS response_body, x.input_tokens, x.output_tokens,
       x.cached_tokens, x.reasoning_tokens, x.total_tokens, x.cost_usd
FROM batch_requests r LEFT JOIN batch_results x ON x.request_row_id = r.id;
"""

# A new database starts at schema v2, written out as velvet 0.1 created it (peewee's DDL for its models,
# minus the indexes step 2 drops) so that a new database and an upgraded one end up alike.
BASELINE_VERSION = 2

BASELINE_SQLITE = """
CREATE TABLE "velvet_meta" (
    "key" VARCHAR(255) NOT NULL PRIMARY KEY,
    "value" TEXT NOT NULL
);

CREATE TABLE "calls" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "flow_id" VARCHAR(255) NOT NULL,
    "started_at" DATETIME NOT NULL,
    "request_end_at" DATETIME,
    "first_byte_at" DATETIME,
    "ended_at" DATETIME,
    "latency_ms" REAL,
    "ttft_ms" REAL,
    "processing_ms" INTEGER,
    "method" VARCHAR(255) NOT NULL,
    "host" VARCHAR(255) NOT NULL,
    "path" TEXT NOT NULL,
    "endpoint" VARCHAR(255) NOT NULL,
    "action" VARCHAR(255) NOT NULL,
    "object_id" VARCHAR(255),
    "model_requested" VARCHAR(255),
    "model" VARCHAR(255),
    "deployment" VARCHAR(255),
    "status_code" INTEGER,
    "stream" INTEGER NOT NULL,
    "complete" INTEGER NOT NULL,
    "service_tier" VARCHAR(255),
    "request_id" VARCHAR(255),
    "organization" VARCHAR(255),
    "project" VARCHAR(255),
    "key_fingerprint" VARCHAR(255),
    "rl_limit_requests" INTEGER,
    "rl_limit_tokens" INTEGER,
    "rl_remaining_requests" INTEGER,
    "rl_remaining_tokens" INTEGER,
    "rl_reset_requests" VARCHAR(255),
    "rl_reset_tokens" VARCHAR(255),
    "input_tokens" INTEGER,
    "output_tokens" INTEGER,
    "cached_tokens" INTEGER,
    "reasoning_tokens" INTEGER,
    "total_tokens" INTEGER,
    "cost_usd" REAL,
    "error_type" VARCHAR(255),
    "error_code" VARCHAR(255),
    "error_message" TEXT,
    "finish_reason" VARCHAR(255),
    "response_text" TEXT,
    "problem" TEXT,
    "tags" TEXT,
    "request_headers" TEXT,
    "response_headers" TEXT,
    "request_bytes" INTEGER,
    "response_bytes" INTEGER,
    "request_body" TEXT,
    "response_body" TEXT
);
CREATE UNIQUE INDEX "calls_flow_id" ON "calls" ("flow_id");
CREATE INDEX "calls_started_at" ON "calls" ("started_at");
CREATE INDEX "calls_endpoint" ON "calls" ("endpoint");
CREATE INDEX "calls_object_id" ON "calls" ("object_id");
CREATE INDEX "calls_model" ON "calls" ("model");
CREATE INDEX "calls_status_code" ON "calls" ("status_code");
CREATE INDEX "calls_request_id" ON "calls" ("request_id");
CREATE INDEX "calls_key_fingerprint" ON "calls" ("key_fingerprint");

CREATE TABLE "files" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "purpose" VARCHAR(255),
    "filename" TEXT,
    "bytes" INTEGER,
    "created_at" DATETIME,
    "expires_at" DATETIME,
    "status" VARCHAR(255),
    "deleted" INTEGER NOT NULL,
    "role" VARCHAR(255),
    "batch_id" VARCHAR(255),
    "upload_id" VARCHAR(255),
    "lines" INTEGER,
    "bad_lines" INTEGER,
    "content_seen" INTEGER NOT NULL,
    "complete" INTEGER,
    "problem" TEXT,
    "first_seen_at" DATETIME NOT NULL,
    "updated_at" DATETIME NOT NULL
);
CREATE INDEX "files_purpose" ON "files" ("purpose");
CREATE INDEX "files_batch_id" ON "files" ("batch_id");

CREATE TABLE "batches" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "status" VARCHAR(255) NOT NULL,
    "endpoint" VARCHAR(255),
    "model" VARCHAR(255),
    "completion_window" VARCHAR(255),
    "input_file_id" VARCHAR(255),
    "output_file_id" VARCHAR(255),
    "error_file_id" VARCHAR(255),
    "metadata" TEXT,
    "output_expires_after" TEXT,
    "created_at" DATETIME,
    "in_progress_at" DATETIME,
    "expires_at" DATETIME,
    "finalizing_at" DATETIME,
    "completed_at" DATETIME,
    "failed_at" DATETIME,
    "expired_at" DATETIME,
    "cancelling_at" DATETIME,
    "cancelled_at" DATETIME,
    "request_total" INTEGER,
    "request_completed" INTEGER,
    "request_failed" INTEGER,
    "errors" TEXT,
    "usage" TEXT,
    "input_tokens" INTEGER,
    "output_tokens" INTEGER,
    "cached_tokens" INTEGER,
    "reasoning_tokens" INTEGER,
    "total_tokens" INTEGER,
    "usage_cost_usd" REAL,
    "queue_s" REAL,
    "processing_s" REAL,
    "finalize_s" REAL,
    "turnaround_s" REAL,
    "key_fingerprint" VARCHAR(255),
    "first_seen_at" DATETIME NOT NULL,
    "last_seen_at" DATETIME NOT NULL
);
CREATE INDEX "batches_status" ON "batches" ("status");
CREATE INDEX "batches_model" ON "batches" ("model");
CREATE INDEX "batches_input_file_id" ON "batches" ("input_file_id");
CREATE INDEX "batches_created_at" ON "batches" ("created_at");

CREATE TABLE "batch_events" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "batch_id" VARCHAR(255) NOT NULL,
    "status" VARCHAR(255) NOT NULL,
    "previous_status" VARCHAR(255),
    "observed_at" DATETIME NOT NULL,
    "api_at" DATETIME,
    "source" VARCHAR(255) NOT NULL
);
CREATE INDEX "batch_events_batch_id" ON "batch_events" ("batch_id");
CREATE UNIQUE INDEX "batch_events_batch_id_status" ON "batch_events" ("batch_id", "status");

CREATE TABLE "batch_errors" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "batch_id" VARCHAR(255) NOT NULL,
    "code" VARCHAR(255),
    "message" TEXT,
    "param" VARCHAR(255),
    "line" INTEGER
);
CREATE INDEX "batch_errors_batch_id" ON "batch_errors" ("batch_id");
CREATE UNIQUE INDEX "batch_errors_batch_id_code_line_message"
    ON "batch_errors" ("batch_id", "code", "line", "message");

CREATE TABLE "batch_requests" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "file_id" VARCHAR(255),
    "upload_part_id" VARCHAR(255),
    "part_line_no" INTEGER,
    "line_no" INTEGER,
    "custom_id" VARCHAR(255),
    "method" VARCHAR(255),
    "url" VARCHAR(255),
    "model" VARCHAR(255),
    "body" TEXT,
    "problem" TEXT,
    "batch_id" VARCHAR(255)
);
CREATE UNIQUE INDEX "batch_requests_file_id_line_no" ON "batch_requests" ("file_id", "line_no");
CREATE UNIQUE INDEX "batch_requests_upload_part_id_part_line_no"
    ON "batch_requests" ("upload_part_id", "part_line_no");
CREATE INDEX "batch_requests_batch_id_custom_id" ON "batch_requests" ("batch_id", "custom_id");

CREATE TABLE "batch_results" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "file_id" VARCHAR(255) NOT NULL,
    "line_no" INTEGER NOT NULL,
    "batch_id" VARCHAR(255),
    "custom_id" VARCHAR(255),
    "request_row_id" INTEGER,
    "result_id" VARCHAR(255),
    "status_code" INTEGER,
    "request_id" VARCHAR(255),
    "model" VARCHAR(255),
    "body" TEXT,
    "error_code" VARCHAR(255),
    "error_message" TEXT,
    "input_tokens" INTEGER,
    "output_tokens" INTEGER,
    "cached_tokens" INTEGER,
    "reasoning_tokens" INTEGER,
    "total_tokens" INTEGER,
    "cost_usd" REAL,
    "failed" INTEGER NOT NULL,
    "problem" TEXT,
    "seen_at" DATETIME NOT NULL,
    FOREIGN KEY ("request_row_id") REFERENCES "batch_requests" ("id") ON DELETE SET NULL
);
CREATE INDEX "batch_results_request_row_id" ON "batch_results" ("request_row_id");
CREATE UNIQUE INDEX "batch_results_file_id_line_no" ON "batch_results" ("file_id", "line_no");
CREATE INDEX "batch_results_batch_id_custom_id" ON "batch_results" ("batch_id", "custom_id");

CREATE TABLE "uploads" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "filename" TEXT,
    "bytes" INTEGER,
    "purpose" VARCHAR(255),
    "status" VARCHAR(255),
    "file_id" VARCHAR(255),
    "part_ids" TEXT,
    "created_at" DATETIME,
    "updated_at" DATETIME NOT NULL
);

CREATE TABLE "upload_parts" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "upload_id" VARCHAR(255) NOT NULL,
    "head" BLOB,
    "tail" BLOB,
    "lines" INTEGER NOT NULL,
    "bytes" INTEGER,
    "seen_at" DATETIME NOT NULL
);
CREATE INDEX "upload_parts_upload_id" ON "upload_parts" ("upload_id");
""" + VIEWS_V2

BASELINE_PG = """
CREATE TABLE "velvet_meta" (
    "key" VARCHAR(255) NOT NULL PRIMARY KEY,
    "value" TEXT NOT NULL
);

CREATE TABLE "calls" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "flow_id" VARCHAR(255) NOT NULL,
    "started_at" TIMESTAMP NOT NULL,
    "request_end_at" TIMESTAMP,
    "first_byte_at" TIMESTAMP,
    "ended_at" TIMESTAMP,
    "latency_ms" REAL,
    "ttft_ms" REAL,
    "processing_ms" INTEGER,
    "method" VARCHAR(255) NOT NULL,
    "host" VARCHAR(255) NOT NULL,
    "path" TEXT NOT NULL,
    "endpoint" VARCHAR(255) NOT NULL,
    "action" VARCHAR(255) NOT NULL,
    "object_id" VARCHAR(255),
    "model_requested" VARCHAR(255),
    "model" VARCHAR(255),
    "deployment" VARCHAR(255),
    "status_code" INTEGER,
    "stream" BOOLEAN NOT NULL,
    "complete" BOOLEAN NOT NULL,
    "service_tier" VARCHAR(255),
    "request_id" VARCHAR(255),
    "organization" VARCHAR(255),
    "project" VARCHAR(255),
    "key_fingerprint" VARCHAR(255),
    "rl_limit_requests" BIGINT,
    "rl_limit_tokens" BIGINT,
    "rl_remaining_requests" BIGINT,
    "rl_remaining_tokens" BIGINT,
    "rl_reset_requests" VARCHAR(255),
    "rl_reset_tokens" VARCHAR(255),
    "input_tokens" BIGINT,
    "output_tokens" BIGINT,
    "cached_tokens" BIGINT,
    "reasoning_tokens" BIGINT,
    "total_tokens" BIGINT,
    "cost_usd" REAL,
    "error_type" VARCHAR(255),
    "error_code" VARCHAR(255),
    "error_message" TEXT,
    "finish_reason" VARCHAR(255),
    "response_text" TEXT,
    "problem" TEXT,
    "tags" TEXT,
    "request_headers" TEXT,
    "response_headers" TEXT,
    "request_bytes" BIGINT,
    "response_bytes" BIGINT,
    "request_body" TEXT,
    "response_body" TEXT
);
CREATE UNIQUE INDEX "calls_flow_id" ON "calls" ("flow_id");
CREATE INDEX "calls_started_at" ON "calls" ("started_at");
CREATE INDEX "calls_endpoint" ON "calls" ("endpoint");
CREATE INDEX "calls_object_id" ON "calls" ("object_id");
CREATE INDEX "calls_model" ON "calls" ("model");
CREATE INDEX "calls_status_code" ON "calls" ("status_code");
CREATE INDEX "calls_request_id" ON "calls" ("request_id");
CREATE INDEX "calls_key_fingerprint" ON "calls" ("key_fingerprint");

CREATE TABLE "files" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "purpose" VARCHAR(255),
    "filename" TEXT,
    "bytes" BIGINT,
    "created_at" TIMESTAMP,
    "expires_at" TIMESTAMP,
    "status" VARCHAR(255),
    "deleted" BOOLEAN NOT NULL,
    "role" VARCHAR(255),
    "batch_id" VARCHAR(255),
    "upload_id" VARCHAR(255),
    "lines" INTEGER,
    "bad_lines" INTEGER,
    "content_seen" BOOLEAN NOT NULL,
    "complete" BOOLEAN,
    "problem" TEXT,
    "first_seen_at" TIMESTAMP NOT NULL,
    "updated_at" TIMESTAMP NOT NULL
);
CREATE INDEX "files_purpose" ON "files" ("purpose");
CREATE INDEX "files_batch_id" ON "files" ("batch_id");

CREATE TABLE "batches" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "status" VARCHAR(255) NOT NULL,
    "endpoint" VARCHAR(255),
    "model" VARCHAR(255),
    "completion_window" VARCHAR(255),
    "input_file_id" VARCHAR(255),
    "output_file_id" VARCHAR(255),
    "error_file_id" VARCHAR(255),
    "metadata" TEXT,
    "output_expires_after" TEXT,
    "created_at" TIMESTAMP,
    "in_progress_at" TIMESTAMP,
    "expires_at" TIMESTAMP,
    "finalizing_at" TIMESTAMP,
    "completed_at" TIMESTAMP,
    "failed_at" TIMESTAMP,
    "expired_at" TIMESTAMP,
    "cancelling_at" TIMESTAMP,
    "cancelled_at" TIMESTAMP,
    "request_total" INTEGER,
    "request_completed" INTEGER,
    "request_failed" INTEGER,
    "errors" TEXT,
    "usage" TEXT,
    "input_tokens" BIGINT,
    "output_tokens" BIGINT,
    "cached_tokens" BIGINT,
    "reasoning_tokens" BIGINT,
    "total_tokens" BIGINT,
    "usage_cost_usd" REAL,
    "queue_s" REAL,
    "processing_s" REAL,
    "finalize_s" REAL,
    "turnaround_s" REAL,
    "key_fingerprint" VARCHAR(255),
    "first_seen_at" TIMESTAMP NOT NULL,
    "last_seen_at" TIMESTAMP NOT NULL
);
CREATE INDEX "batches_status" ON "batches" ("status");
CREATE INDEX "batches_model" ON "batches" ("model");
CREATE INDEX "batches_input_file_id" ON "batches" ("input_file_id");
CREATE INDEX "batches_created_at" ON "batches" ("created_at");

CREATE TABLE "batch_events" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "batch_id" VARCHAR(255) NOT NULL,
    "status" VARCHAR(255) NOT NULL,
    "previous_status" VARCHAR(255),
    "observed_at" TIMESTAMP NOT NULL,
    "api_at" TIMESTAMP,
    "source" VARCHAR(255) NOT NULL
);
CREATE INDEX "batch_events_batch_id" ON "batch_events" ("batch_id");
CREATE UNIQUE INDEX "batch_events_batch_id_status" ON "batch_events" ("batch_id", "status");

CREATE TABLE "batch_errors" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "batch_id" VARCHAR(255) NOT NULL,
    "code" VARCHAR(255),
    "message" TEXT,
    "param" VARCHAR(255),
    "line" INTEGER
);
CREATE INDEX "batch_errors_batch_id" ON "batch_errors" ("batch_id");
CREATE UNIQUE INDEX "batch_errors_batch_id_code_line_message"
    ON "batch_errors" ("batch_id", "code", "line", "message");

CREATE TABLE "batch_requests" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "file_id" VARCHAR(255),
    "upload_part_id" VARCHAR(255),
    "part_line_no" INTEGER,
    "line_no" INTEGER,
    "custom_id" VARCHAR(255),
    "method" VARCHAR(255),
    "url" VARCHAR(255),
    "model" VARCHAR(255),
    "body" TEXT,
    "problem" TEXT,
    "batch_id" VARCHAR(255)
);
CREATE UNIQUE INDEX "batch_requests_file_id_line_no" ON "batch_requests" ("file_id", "line_no");
CREATE UNIQUE INDEX "batch_requests_upload_part_id_part_line_no"
    ON "batch_requests" ("upload_part_id", "part_line_no");
CREATE INDEX "batch_requests_batch_id_custom_id" ON "batch_requests" ("batch_id", "custom_id");

CREATE TABLE "batch_results" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "file_id" VARCHAR(255) NOT NULL,
    "line_no" INTEGER NOT NULL,
    "batch_id" VARCHAR(255),
    "custom_id" VARCHAR(255),
    "request_row_id" INTEGER,
    "result_id" VARCHAR(255),
    "status_code" INTEGER,
    "request_id" VARCHAR(255),
    "model" VARCHAR(255),
    "body" TEXT,
    "error_code" VARCHAR(255),
    "error_message" TEXT,
    "input_tokens" BIGINT,
    "output_tokens" BIGINT,
    "cached_tokens" BIGINT,
    "reasoning_tokens" BIGINT,
    "total_tokens" BIGINT,
    "cost_usd" REAL,
    "failed" BOOLEAN NOT NULL,
    "problem" TEXT,
    "seen_at" TIMESTAMP NOT NULL,
    FOREIGN KEY ("request_row_id") REFERENCES "batch_requests" ("id") ON DELETE SET NULL
);
CREATE INDEX "batch_results_request_row_id" ON "batch_results" ("request_row_id");
CREATE UNIQUE INDEX "batch_results_file_id_line_no" ON "batch_results" ("file_id", "line_no");
CREATE INDEX "batch_results_batch_id_custom_id" ON "batch_results" ("batch_id", "custom_id");

CREATE TABLE "uploads" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "filename" TEXT,
    "bytes" BIGINT,
    "purpose" VARCHAR(255),
    "status" VARCHAR(255),
    "file_id" VARCHAR(255),
    "part_ids" TEXT,
    "created_at" TIMESTAMP,
    "updated_at" TIMESTAMP NOT NULL
);

CREATE TABLE "upload_parts" (
    "id" VARCHAR(255) NOT NULL PRIMARY KEY,
    "upload_id" VARCHAR(255) NOT NULL,
    "head" BYTEA,
    "tail" BYTEA,
    "lines" INTEGER NOT NULL,
    "bytes" BIGINT,
    "seen_at" TIMESTAMP NOT NULL
);
CREATE INDEX "upload_parts_upload_id" ON "upload_parts" ("upload_id");
""" + VIEWS_V2


def _run(db: Database, script: str) -> None:
    # statement by statement: sqlite3 runs one per call, and its executescript would commit the transaction
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute_sql(statement)


def _drop_redundant_indexes(db: Database) -> None:
    # single-column indexes that the composite ones already cover: each cost every inserted line time
    for name in ("batch_requests_file_id", "batch_requests_upload_part_id", "batch_requests_custom_id",
                 "batch_requests_batch_id", "batch_results_file_id", "batch_results_batch_id",
                 "batch_results_custom_id"):
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


# Every VARCHAR(255) column of schema v2 but velvet_meta.key: ids, names and codes that clients or the
# API choose, which nothing promises to keep under 255 characters.
_BOUNDED_COLUMNS = {
    "calls": "flow_id method host endpoint action object_id model_requested model deployment service_tier "
             "request_id organization project key_fingerprint rl_reset_requests rl_reset_tokens error_type "
             "error_code finish_reason",
    "files": "id purpose status role batch_id upload_id",
    "batches": "id status endpoint model completion_window input_file_id output_file_id error_file_id "
               "key_fingerprint",
    "batch_events": "batch_id status previous_status source",
    "batch_errors": "batch_id code param",
    "batch_requests": "file_id upload_part_id custom_id method url model batch_id",
    "batch_results": "file_id batch_id custom_id result_id request_id model error_code",
    "uploads": "id purpose status file_id",
    "upload_parts": "id upload_id",
}


def _unbounded_text(db: Database) -> None:
    if isinstance(db, SqliteDatabase):
        return  # SQLite never enforces a VARCHAR length (the column already has TEXT affinity)
    # PostgreSQL refuses to retype a column that a view reads: drop the views, recreate them after
    db.execute_sql("DROP VIEW IF EXISTS batch_summary, batch_lines")
    for table, columns in _BOUNDED_COLUMNS.items():
        alters = ", ".join(f'ALTER COLUMN "{column}" TYPE TEXT' for column in columns.split())
        db.execute_sql(f'ALTER TABLE "{table}" {alters}')
    _run(db, VIEWS_V2)


def _proxy_status(db: Database) -> None:
    # one row per running (or last run of a) proxy writing here: its health, for `velvet status` and alerts
    ts = "DATETIME" if isinstance(db, SqliteDatabase) else "TIMESTAMP"
    db.execute_sql(f"""CREATE TABLE "velvet_proxies" (
        "proxy" TEXT NOT NULL PRIMARY KEY,
        "hostname" TEXT NOT NULL,
        "pid" INTEGER NOT NULL,
        "db" TEXT,
        "started_at" {ts} NOT NULL,
        "updated_at" {ts} NOT NULL,
        "stopped_at" {ts},
        "last_write_at" {ts},
        "failing_since" {ts},
        "last_error" TEXT,
        "last_error_at" {ts},
        "queue_depth" INTEGER NOT NULL,
        "pending" INTEGER NOT NULL,
        "spooled" INTEGER NOT NULL,
        "dead_lettered" INTEGER NOT NULL,
        "written" BIGINT NOT NULL
    )""")


def _experiments(db: Database) -> None:
    # `velvet replay` experiments, the line map pairing each replayed line with its original, and the
    # summaries `velvet compare` recorded
    sqlite = isinstance(db, SqliteDatabase)
    ts, serial = ("DATETIME", "INTEGER") if sqlite else ("TIMESTAMP", "SERIAL")
    _run(db, f"""CREATE TABLE "experiments" (
    "name" TEXT NOT NULL PRIMARY KEY,
    "created_at" {ts} NOT NULL,
    "source" TEXT NOT NULL,
    "overrides" TEXT NOT NULL,
    "mode" TEXT NOT NULL,
    "endpoint" TEXT,
    "model" TEXT,
    "lines" INTEGER NOT NULL,
    "estimated_cost_usd" REAL,
    "batch_id" TEXT,
    "input_file_id" TEXT,
    "key_fingerprint" TEXT
);
CREATE INDEX "experiments_batch_id" ON "experiments" ("batch_id");
CREATE TABLE "experiment_lines" (
    "id" {serial} NOT NULL PRIMARY KEY,
    "experiment" TEXT NOT NULL,
    "line_no" INTEGER NOT NULL,
    "custom_id" TEXT NOT NULL,
    "source_batch_id" TEXT,
    "source_custom_id" TEXT,
    "source_call_id" INTEGER,
    "request_id" TEXT,
    "status_code" INTEGER
);
CREATE UNIQUE INDEX "experiment_lines_experiment_custom_id" ON "experiment_lines" ("experiment", "custom_id");
CREATE TABLE "comparisons" (
    "id" {serial} NOT NULL PRIMARY KEY,
    "a" TEXT NOT NULL,
    "b" TEXT NOT NULL,
    "created_at" {ts} NOT NULL,
    "pairs" INTEGER NOT NULL,
    "unpaired" INTEGER NOT NULL,
    "metrics" TEXT NOT NULL,
    "judge_batch_id" TEXT
);
CREATE INDEX "comparisons_created_at" ON "comparisons" ("created_at")""")


def _usage_estimated(db: Database) -> None:
    # true when velvet counted a call's tokens itself (a stream without usage), not the API
    kind = "INTEGER" if isinstance(db, SqliteDatabase) else "BOOLEAN"
    db.execute_sql(f'ALTER TABLE "calls" ADD COLUMN "usage_estimated" {kind} NOT NULL DEFAULT FALSE')


# Every column holding a JSON document as of schema v6.
_JSON_COLUMNS = {
    "calls": "tags request_headers response_headers request_body response_body",
    "batches": "metadata output_expires_after errors usage",
    "batch_requests": "body",
    "batch_results": "body",
    "uploads": "part_ids",
}

# Text to jsonb for rows written before: JSON as it is; JSON with the escape \u0000 (which jsonb refuses) with
# U+FFFD in its place; anything else (a body that is not JSON, a malformed batch line) whole as a JSON string.
_TO_JSONB = r"""
CREATE FUNCTION velvet_to_jsonb(t text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
BEGIN
  BEGIN
    RETURN t::jsonb;
  EXCEPTION WHEN data_exception THEN NULL;
  END;
  BEGIN
    RETURN regexp_replace(t, '(?<!\\)((\\\\)*)\\u0000', '\1\\ufffd', 'g')::jsonb;
  EXCEPTION WHEN data_exception THEN NULL;
  END;
  RETURN to_jsonb(t);
END
$f$"""


# the JSON escape of U+0000, not an escaped backslash followed by "u0000"
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _jsonb(db: Database) -> None:
    if isinstance(db, SqliteDatabase):
        # SQLite keeps JSON as text. As velvet now writes them: a value that is not JSON becomes a JSON string
        # (json_extract fails the whole query at one malformed value), the escape \u0000 becomes \ufffd
        # (json_extract cuts a string at U+0000)
        db.connection().create_function("velvet_nul_escapes", 1, lambda t: _NUL_ESCAPE.sub(r"\1\\ufffd", t),
                                        deterministic=True)
        for table, columns in _JSON_COLUMNS.items():
            for c in columns.split():
                db.execute_sql(f'UPDATE "{table}" SET "{c}" = json_quote("{c}") '
                               f'WHERE "{c}" IS NOT NULL AND NOT json_valid("{c}")')
                db.execute_sql(f'UPDATE "{table}" SET "{c}" = velvet_nul_escapes("{c}") '
                               f"WHERE instr(\"{c}\", '\\u0000') > 0")
        return
    # PostgreSQL refuses to retype a column that a view reads: drop the views, recreate them after
    db.execute_sql("DROP VIEW IF EXISTS batch_summary, batch_lines")
    db.execute_sql(_TO_JSONB)
    for table, columns in _JSON_COLUMNS.items():
        alters = ", ".join(f'ALTER COLUMN "{c}" TYPE jsonb USING velvet_to_jsonb("{c}")' for c in columns.split())
        db.execute_sql(f'ALTER TABLE "{table}" {alters}')
    db.execute_sql("DROP FUNCTION velvet_to_jsonb(text)")
    _run(db, VIEWS_V2)


def _alerts(db: Database) -> None:
    # every alert state change (firing, warning, resolved) for `velvet alerts` and the report
    sqlite = isinstance(db, SqliteDatabase)
    ts = "DATETIME" if sqlite else "TIMESTAMP"
    db.execute_sql(f"""CREATE TABLE "alerts" (
        "id" {"INTEGER NOT NULL PRIMARY KEY" if sqlite else "SERIAL NOT NULL PRIMARY KEY"},
        "at" {ts} NOT NULL,
        "rule" TEXT NOT NULL,
        "kind" TEXT NOT NULL,
        "subject" TEXT NOT NULL,
        "state" TEXT NOT NULL,
        "value" REAL,
        "threshold" REAL,
        "rule_window" TEXT,
        "text" TEXT NOT NULL,
        "details" TEXT,
        "source" TEXT
    )""")
    db.execute_sql('CREATE INDEX "alerts_at" ON "alerts" ("at")')
    db.execute_sql('CREATE INDEX "alerts_rule_subject" ON "alerts" ("rule", "subject")')
# Schema v5: batch_summary reads per-batch counters instead of counting lines on every read.
VIEW_SUMMARY_V5 = """CREATE VIEW batch_summary AS
SELECT b.*, COALESCE(c.lines, 0) AS lines, COALESCE(c.answered, 0) AS answered, COALESCE(c.failed, 0) AS failed,
  c.cost_usd AS cost_usd
FROM batches b LEFT JOIN batch_counts c ON c.batch_id = b.id"""

VIEWS = VIEW_SUMMARY_V5 + ";\n\n" + VIEWS_V2[VIEWS_V2.index("CREATE VIEW batch_lines"):]
"""The views as the current schema defines them."""


def _derived_counts(db: Database) -> None:
    # per-batch line counters and per-hour/day call rollups (kept by the store from now on), filled from the rows
    pg = isinstance(db, PostgresqlDatabase)
    big, ts = ("BIGINT", "TIMESTAMP") if pg else ("INTEGER", "DATETIME")
    real = "DOUBLE PRECISION" if pg else "REAL"
    db.execute_sql(f"""CREATE TABLE "batch_counts" (
        "batch_id" TEXT NOT NULL PRIMARY KEY,
        "lines" {big} NOT NULL,
        "answered" {big} NOT NULL,
        "failed" {big} NOT NULL,
        "results" {big} NOT NULL,
        "input_tokens" {big},
        "output_tokens" {big},
        "cost_usd" {real}
    )""")
    db.execute_sql(f"""CREATE TABLE "call_rollups" (
        "id" {"SERIAL" if pg else "INTEGER"} NOT NULL PRIMARY KEY,
        "hours" INTEGER NOT NULL,
        "period" {ts} NOT NULL,
        "model" TEXT NOT NULL,
        "endpoint" TEXT NOT NULL,
        "key_fingerprint" TEXT NOT NULL,
        "calls" {big} NOT NULL,
        "errors" {big} NOT NULL,
        "input_tokens" {big} NOT NULL,
        "output_tokens" {big} NOT NULL,
        "cost_usd" {real} NOT NULL,
        "latency_hist" TEXT,
        "ttft_hist" TEXT
    )""")
    db.execute_sql('CREATE UNIQUE INDEX "call_rollups_hours_period_model_endpoint_key_fingerprint" '
                   'ON "call_rollups" ("hours", "period", "model", "endpoint", "key_fingerprint")')
    db.execute_sql("DROP VIEW batch_summary")
    db.execute_sql(VIEW_SUMMARY_V5)
    db.execute_sql("""INSERT INTO "batch_counts" ("batch_id", "lines", "answered", "failed", "results",
  "input_tokens", "output_tokens", "cost_usd")
SELECT b."id", coalesce(r.n, 0), coalesce(x.answered, 0), coalesce(x.failed, 0), coalesce(x.n, 0), x.inp, x.outp,
  x.cost
FROM "batches" b
LEFT JOIN (SELECT "batch_id", count(*) AS n FROM "batch_requests" WHERE "batch_id" IS NOT NULL
           GROUP BY "batch_id") r ON r."batch_id" = b."id"
LEFT JOIN (SELECT "batch_id", count(*) AS n,
             sum(CASE WHEN "request_row_id" IS NOT NULL AND NOT "failed" THEN 1 ELSE 0 END) AS answered,
             sum(CASE WHEN "request_row_id" IS NOT NULL AND "failed" THEN 1 ELSE 0 END) AS failed,
             sum("input_tokens") AS inp, sum("output_tokens") AS outp, sum("cost_usd") AS cost
           FROM "batch_results" WHERE "batch_id" IS NOT NULL GROUP BY "batch_id") x ON x."batch_id" = b."id\"""")
    # Rollups: hour (1) and day (24) x model x endpoint x key; histograms {round(50 ln ms): count}
    sums: dict[tuple, list[Any]] = {}
    cur = db.execute_sql('SELECT "started_at", COALESCE("model", "model_requested"), "endpoint", '
                         '"key_fingerprint", '
                         '"status_code", "complete", "latency_ms", "ttft_ms", "input_tokens", "output_tokens", '
                         '"cost_usd" FROM "calls"')
    while rows := cur.fetchmany(5000):
        for started, model, endpoint, key, status, complete, lat, ttft, inp, outp, cost in rows:
            t = started if isinstance(started, datetime) else datetime.fromisoformat(str(started))
            hour = t.replace(minute=0, second=0, microsecond=0)
            for hours, period in ((1, hour), (24, hour.replace(hour=0))):
                s = sums.setdefault((hours, period, model or "", endpoint or "", key or ""),
                                    [0, 0, 0, 0, 0.0, {}, {}])
                s[0] += 1
                s[1] += status is None or status >= 400 or not complete
                s[2] += inp or 0
                s[3] += outp or 0
                s[4] += cost or 0.0
                for hist, ms in ((s[5], lat), (s[6], ttft)):
                    if ms is not None:
                        b = str(round(50 * math.log(max(ms, 0.001))))
                        hist[b] = hist.get(b, 0) + 1
    values = [(h, p if pg else p.strftime("%Y-%m-%d %H:%M:%S"), m, e, k, *s[:5],
               orjson.dumps(s[5]).decode() if s[5] else None, orjson.dumps(s[6]).decode() if s[6] else None)
              for (h, p, m, e, k), s in sorted(sums.items())]
    param = "%s" if pg else "?"
    db.cursor().executemany(
        'INSERT INTO "call_rollups" ("hours", "period", "model", "endpoint", "key_fingerprint", "calls", '
        '"errors", "input_tokens", "output_tokens", "cost_usd", "latency_hist", "ttft_hist") '
        f'VALUES ({", ".join([param] * 12)})',
        values)


def _problem_indexes(db: Database) -> None:
    # the lines with a problem, by file and by batch: partial indexes (a few entries), so that counting them at
    # each poll of a batch, or listing them for `velvet batch`, never reads the lines themselves (on SQLite,
    # `problem` comes after the body, in its overflow pages: 59 ms -> 0.6 ms for a 50,000-line file)
    db.execute_sql('CREATE INDEX "batch_requests_file_problems" ON "batch_requests" ("file_id") '
                   'WHERE ("problem" IS NOT NULL)')
    db.execute_sql('CREATE INDEX "batch_requests_batch_problems" ON "batch_requests" ("batch_id", "line_no") '
                   'WHERE ("problem" IS NOT NULL)')


def _estimated_index(db: Database) -> None:
    # the calls whose tokens velvet estimated (a stream without usage): `velvet stats` counts them beside the
    # rollups, and without an index that read every call (270 ms at 1 M calls, growing with history)
    db.execute_sql('CREATE INDEX "calls_usage_estimated" ON "calls" ("started_at") WHERE "usage_estimated"')


def _call_origin(db: Database) -> None:
    # the URL of a call as it was: a local or compatible server may be plain http on any port
    db.execute_sql('ALTER TABLE "calls" ADD COLUMN "scheme" TEXT')
    db.execute_sql('ALTER TABLE "calls" ADD COLUMN "port" INTEGER')


def _report_indexes(db: Database) -> None:
    # `velvet report` at scale reads the rollups and counters, and beside them only what they do not keep: the
    # failed lines' error codes (a few percent of the lines) and the tags of tagged calls. Partial indexes let
    # it read those rows alone (without them, every line and call of the period: 23.8 s at 10 M lines)
    db.execute_sql('CREATE INDEX "batch_results_failed" ON "batch_results" ("batch_id", "error_code") '
                   'WHERE "failed"')
    db.execute_sql('CREATE INDEX "calls_tagged" ON "calls" ("started_at") WHERE ("tags" IS NOT NULL)')


def _retention(db: Database) -> None:
    # velvet prune / velvet_retention: when a call's bodies went, and how far a batch was pruned ('bodies' or
    # 'rows') and when, so that `velvet show` says so instead of showing nothing
    ts = "TIMESTAMP" if isinstance(db, PostgresqlDatabase) else "DATETIME"
    db.execute_sql(f'ALTER TABLE "calls" ADD COLUMN "pruned_at" {ts}')
    db.execute_sql('ALTER TABLE "batches" ADD COLUMN "pruned" TEXT')
    db.execute_sql(f'ALTER TABLE "batches" ADD COLUMN "pruned_at" {ts}')
    db.execute_sql("DROP VIEW batch_summary")  # (PostgreSQL fixed b.* when the view was made: made again)
    db.execute_sql(VIEW_SUMMARY_V5)


def _cache(db: Database) -> None:
    # the response cache (issue 23): its entries, and on calls whether the proxy answered from one and what
    # that saved. An entry keeps the answer's exact bytes (``body``): the calls row's response_body is jsonb on
    # PostgreSQL, which rewrites key order and spacing, and a hit must give the client the same bytes.
    sqlite = isinstance(db, SqliteDatabase)
    ts = "DATETIME" if sqlite else "TIMESTAMP"
    boolean = "INTEGER" if sqlite else "BOOLEAN"  # (peewee's BooleanField on each)
    db.execute_sql(f'ALTER TABLE "calls" ADD COLUMN "cache_hit" {boolean} DEFAULT FALSE NOT NULL')
    db.execute_sql('ALTER TABLE "calls" ADD COLUMN "saved_usd" REAL')
    db.execute_sql(f"""CREATE TABLE "cache_entries" (
        "id" {"INTEGER NOT NULL PRIMARY KEY" if sqlite else "SERIAL NOT NULL PRIMARY KEY"},
        "key" TEXT NOT NULL,
        "flow_id" TEXT NOT NULL,
        "created_at" {ts} NOT NULL,
        "expires_at" {ts} NOT NULL,
        "hits" INTEGER NOT NULL,
        "last_hit_at" {ts},
        "endpoint" TEXT NOT NULL,
        "model" TEXT,
        "key_fingerprint" TEXT,
        "content_type" TEXT NOT NULL,
        "body" TEXT NOT NULL,
        "size" BIGINT NOT NULL,
        "stream" {boolean} NOT NULL,
        "input_tokens" BIGINT,
        "output_tokens" BIGINT,
        "cost_usd" REAL
    )""")
    db.execute_sql('CREATE INDEX "cache_entries_key" ON "cache_entries" ("key")')
    db.execute_sql('CREATE INDEX "cache_entries_expires_at" ON "cache_entries" ("expires_at")')
    db.execute_sql('CREATE INDEX "calls_cache_hit" ON "calls" ("started_at") WHERE "cache_hit"')


def _scores(db: Database) -> None:
    # answer checks and judges (velvet_evals, issue 20): one row per eval and answer (a call's flow id, or a
    # batch line's batch/custom_id), from the moment it is chosen (pending) to its score
    sqlite = isinstance(db, SqliteDatabase)
    ts = "DATETIME" if sqlite else "TIMESTAMP"
    boolean = "INTEGER" if sqlite else "BOOLEAN"
    db.execute_sql(f"""CREATE TABLE "scores" (
        "id" {"INTEGER NOT NULL PRIMARY KEY" if sqlite else "SERIAL NOT NULL PRIMARY KEY"},
        "eval" TEXT NOT NULL,
        "check" TEXT NOT NULL,
        "source" TEXT NOT NULL,
        "subject" TEXT NOT NULL,
        "call_id" BIGINT,
        "result_id" BIGINT,
        "batch_id" TEXT,
        "custom_id" TEXT,
        "answered_at" {ts},
        "status" TEXT NOT NULL,
        "score" REAL,
        "passed" {boolean},
        "reason" TEXT,
        "created_at" {ts} NOT NULL,
        "judged_at" {ts},
        "attempts" INTEGER NOT NULL DEFAULT 0,
        "judge_call" TEXT,
        "judge_batch_id" TEXT,
        "judge_custom_id" TEXT,
        "cost_usd" REAL
    )""")
    db.execute_sql('CREATE UNIQUE INDEX "scores_eval_subject" ON "scores" ("eval", "subject")')
    db.execute_sql('CREATE INDEX "scores_eval_judged_at" ON "scores" ("eval", "judged_at")')
    db.execute_sql('CREATE INDEX "scores_answered_at" ON "scores" ("answered_at")')  # velvet evals, the report
    db.execute_sql('CREATE INDEX "scores_call_id" ON "scores" ("call_id")')
    db.execute_sql('CREATE INDEX "scores_batch_id_custom_id" ON "scores" ("batch_id", "custom_id")')
    db.execute_sql("""CREATE INDEX "scores_waiting" ON "scores" ("eval", "id")
        WHERE "status" IN ('pending', 'sent')""")


def _batch_problem(db: Database) -> None:
    # velvet sync: a batch whose file is gone (expired, deleted) says so
    db.execute_sql('ALTER TABLE "batches" ADD COLUMN "problem" TEXT')
    db.execute_sql("DROP VIEW batch_summary")  # (PostgreSQL fixed b.* when the view was made: made again)
    db.execute_sql(VIEW_SUMMARY_V5)


def _line_file_at(db: Database) -> None:
    # the batch tables' partition key (velvet_pg_partitions): when the line's file was first seen; filled from
    # now on, and for older lines when a database is partitioned (storage/partitions.py)
    kind = "DATETIME" if isinstance(db, SqliteDatabase) else "TIMESTAMP"
    for table in ("batch_requests", "batch_results"):
        db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "file_at" {kind}')


# Every REAL column of schema v18. On PostgreSQL a REAL is 4 bytes (7 digits), and sum() over REALs adds in
# 4 bytes: a million calls of $0.000123 summed to $122.19, not $123 (SQLite's REAL is 8 bytes).
_SINGLE_COLUMNS = {
    "calls": "latency_ms ttft_ms cost_usd saved_usd",
    "cache_entries": "cost_usd",
    "batches": "usage_cost_usd queue_s processing_s finalize_s turnaround_s",
    "batch_results": "cost_usd",
    "experiments": "estimated_cost_usd",
    "alerts": "value threshold",
    "scores": "score cost_usd",
}


def _double_precision(db: Database) -> None:
    if isinstance(db, SqliteDatabase):
        return  # a SQLite REAL is already 8 bytes
    from velvet_core.storage import views

    # each value as the shortest text that reads back as the same REAL ("0.0003"), then read as a double: the
    # number that was meant, not the REAL's nearest binary neighbour (0.00030000001)
    db.execute_sql("SET LOCAL extra_float_digits = 1")
    kept = views.saved(db)  # PostgreSQL refuses to retype a column that a view reads
    views.drop(db, kept)
    for table, columns in _SINGLE_COLUMNS.items():
        alters = ", ".join(f'ALTER COLUMN "{c}" TYPE DOUBLE PRECISION USING "{c}"::text::double precision'
                           for c in columns.split())
        db.execute_sql(f'ALTER TABLE "{table}" {alters}')
    views.remake(db, kept)


@dataclass(frozen=True)
class Migration:
    """One step: ``apply`` brings a database at ``version - 1`` to ``version``."""

    version: int
    name: str
    apply: Callable[[Database], None]


# Append only. Schema v1 (velvet before 0.1) was peewee's create_tables plus the views; a v1 database
# takes every step here, a new one starts from the baseline and takes those after it.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "drop_redundant_indexes", _drop_redundant_indexes),
    Migration(3, "unbounded_text", _unbounded_text),
    Migration(4, "proxy_status", _proxy_status),
    Migration(5, "experiments", _experiments),
    Migration(6, "usage_estimated", _usage_estimated),
    Migration(7, "jsonb", _jsonb),
    Migration(8, "alerts", _alerts),
    Migration(9, "derived_counts", _derived_counts),
    Migration(10, "problem_indexes", _problem_indexes),
    Migration(11, "estimated_index", _estimated_index),
    Migration(12, "call_origin", _call_origin),
    Migration(13, "report_indexes", _report_indexes),
    Migration(14, "retention", _retention),
    Migration(15, "cache", _cache),
    Migration(16, "scores", _scores),
    Migration(17, "batch_problem", _batch_problem),
    Migration(18, "line_file_at", _line_file_at),
    Migration(19, "double_precision", _double_precision),
)

SCHEMA_VERSION = MIGRATIONS[-1].version
if SCHEMA_VERSION != velvet_core.SCHEMA:
    raise RuntimeError(f"velvet_core.SCHEMA says v{velvet_core.SCHEMA}, the last migration is v{SCHEMA_VERSION}")


def schema_version(db: Database) -> int:
    """The schema version recorded in the database, 0 for an empty one."""
    if not has_table(db, "velvet_meta"):
        return 0
    row = db.execute_sql(f'SELECT "value" FROM "velvet_meta" WHERE "key" = {db.param}',
                         ("schema_version",)).fetchone()
    return int(row[0]) if row else 0


def _set_version(db: Database, version: int) -> None:
    db.execute_sql(f'INSERT INTO "velvet_meta" ("key", "value") VALUES ({db.param}, {db.param}) '
                   'ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value"',
                   ("schema_version", str(version)))


def migrate(db: Database) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; safe when several proxies start at once."""
    # One transaction under a lock: the first proxy migrates, the others wait, then find nothing to do.
    lock = {"lock_type": "IMMEDIATE"} if isinstance(db, SqliteDatabase) else {}
    done: list[str] = []  # logged once committed: a failing attempt (a full disk, say) retried says nothing
    with db.atomic(**lock):
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(7041995)")
        current = schema_version(db)
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{current} is newer than this velvet (v{SCHEMA_VERSION})")
        new = current == 0
        if new:
            _run(db, BASELINE_SQLITE if isinstance(db, SqliteDatabase) else BASELINE_PG)
            _set_version(db, BASELINE_VERSION)
            current = BASELINE_VERSION
        for step in MIGRATIONS:
            if step.version > current:
                step.apply(db)
                _set_version(db, step.version)
                current = step.version
                done.append(f"velvet: migrated database schema to v{step.version} ({step.name})")
        if new:  # a new database was not upgraded: one line, not the steps it is built with
            done = [f"velvet: created database schema v{current}"]
            from velvet_core.storage import partitions

            if isinstance(db, PostgresqlDatabase) and (period := partitions.requested()):
                from velvet_core import clock

                partitions.partition(db, period, clock.now())
                done.append(f"velvet: calls and batch lines partitioned by {period} (velvet_pg_partitions)")
    for message in done:
        log.info("%s", message)
    return current
