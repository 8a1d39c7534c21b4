"""The peewee models the code reads and writes through, one set for SQLite and PostgreSQL.

The tables themselves are made by migrations.py; a schema change is a new step there and the matching
change here. Strings are unbounded text, timestamps naive UTC ``datetime``, JSON documents
:class:`JSONField` (``jsonb`` on PostgreSQL, TEXT on SQLite), handed over and read back as JSON text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BlobField,
    BooleanField,
    CharField,
    Database,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    Field,
    ForeignKeyField,
    IntegerField,
    Model,
    Node,
    TextField,
)


class ThreadDatabase(DatabaseProxy):
    """A database proxy bound per thread: the writer thread and any reader each use their own."""

    __slots__ = ("_local",)

    def __init__(self) -> None:
        object.__setattr__(self, "_local", threading.local())
        super().__init__()

    @property
    def obj(self) -> Database | None:
        return getattr(self._local, "obj", None)

    @obj.setter
    def obj(self, value: Database | None) -> None:
        self._local.obj = value

    def __setattr__(self, attr: str, value: Any) -> None:  # peewee's Proxy allows only its own slots
        object.__setattr__(self, attr, value)


db = ThreadDatabase()


@contextmanager
def use(database: Database) -> Iterator[Database]:
    """Run the models against ``database`` in this thread."""
    previous = db.obj
    db.obj = database
    try:
        yield database
    finally:
        db.obj = previous



# the JSON escape of U+0000 (not an escaped backslash followed by "u0000"): PostgreSQL's jsonb refuses it
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def json_text(value: Any) -> Any:
    """A value for a JSON column: JSON text as it is (dicts and lists are serialised), with any ``\\u0000``
    escape replaced by ``\\ufffd`` (U+FFFD) on every backend, so that PostgreSQL takes it and both
    backends store the same document."""
    if value is None or isinstance(value, Node):
        return value
    if not isinstance(value, str):
        value = orjson.dumps(value).decode()
    if "\\" in value and "\\u0000" in value:  # rare: a cheap test first (one character: memchr)
        value = _NUL_ESCAPE.sub(r"\1\\ufffd", value)
    return value


class JSONField(Field):
    """A JSON document as JSON text: ``jsonb`` on PostgreSQL (``->``, ``->>``), TEXT on SQLite
    (``json_extract``). Every stored value is JSON: a body that is not JSON is stored as a JSON string."""

    field_type = "JSON"  # peewee's type map: TEXT on SQLite, JSONB on PostgreSQL

    def db_value(self, value: Any) -> Any:
        return json_text(value)

    def python_value(self, value: Any) -> Any:
        # JSON text from either backend (database.py reads jsonb as text); a parsed value if another
        # connection handed one over
        return value if value is None or isinstance(value, str) else orjson.dumps(value).decode()


class Base(Model):
    class Meta:
        database = db
        legacy_table_names = False


class Meta(Base):
    """Key/value facts about the database itself, such as ``schema_version``."""

    key = CharField(primary_key=True)
    value = TextField()

    class Meta:
        table_name = "velvet_meta"


class Call(Base):
    """One HTTP call to the API as seen by the proxy."""

    id = AutoField()
    flow_id = TextField(unique=True)
    started_at = DateTimeField(index=True)
    request_end_at = DateTimeField(null=True)
    first_byte_at = DateTimeField(null=True)
    ended_at = DateTimeField(null=True)
    latency_ms = DoubleField(null=True)
    ttft_ms = DoubleField(null=True)
    processing_ms = IntegerField(null=True)
    method = TextField()
    host = TextField()
    path = TextField()
    endpoint = TextField(index=True)
    action = TextField()
    object_id = TextField(null=True, index=True)
    model_requested = TextField(null=True)
    model = TextField(null=True, index=True)
    deployment = TextField(null=True)
    status_code = IntegerField(null=True, index=True)
    stream = BooleanField(default=False)
    complete = BooleanField(default=True)
    service_tier = TextField(null=True)
    request_id = TextField(null=True, index=True)
    organization = TextField(null=True)
    project = TextField(null=True)
    key_fingerprint = TextField(null=True, index=True)
    rl_limit_requests = BigIntegerField(null=True)
    rl_limit_tokens = BigIntegerField(null=True)
    rl_remaining_requests = BigIntegerField(null=True)
    rl_remaining_tokens = BigIntegerField(null=True)
    rl_reset_requests = TextField(null=True)
    rl_reset_tokens = TextField(null=True)
    input_tokens = BigIntegerField(null=True)
    output_tokens = BigIntegerField(null=True)
    cached_tokens = BigIntegerField(null=True)
    reasoning_tokens = BigIntegerField(null=True)
    total_tokens = BigIntegerField(null=True)
    cost_usd = DoubleField(null=True)
    error_type = TextField(null=True)
    error_code = TextField(null=True)
    error_message = TextField(null=True)
    finish_reason = TextField(null=True)
    response_text = TextField(null=True)
    problem = TextField(null=True)
    tags = JSONField(null=True)
    request_headers = JSONField(null=True)
    response_headers = JSONField(null=True)
    request_bytes = BigIntegerField(null=True)
    response_bytes = BigIntegerField(null=True)
    request_body = JSONField(null=True)
    response_body = JSONField(null=True)
    usage_estimated = BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])  # tokens counted by velvet
    scheme = TextField(null=True)  # as the call went upstream (migration 12; NULL before: https)
    port = IntegerField(null=True)
    pruned_at = DateTimeField(null=True)  # its bodies were removed then (velvet prune, velvet_retention)
    cache_hit = BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])  # answered by the proxy's cache
    saved_usd = DoubleField(null=True)  # a hit: the cost of the answer it gave again

    class Meta:
        table_name = "calls"


# the calls whose tokens velvet estimated (migration 11): `velvet stats` counts them beside the rollups
Call.add_index(Call.started_at, name="calls_usage_estimated", where=Call.usage_estimated)
# the tagged calls, for the report's top tags (migration 13)
Call.add_index(Call.started_at, name="calls_tagged", where=Call.tags.is_null(False))
# the calls the cache answered, for velvet cache stats and velvet stats (migration 15)
Call.add_index(Call.started_at, name="calls_cache_hit", where=Call.cache_hit)


class File(Base):
    """A file known to the API (batch input, output or error file, or another purpose)."""

    id = TextField(primary_key=True)
    purpose = TextField(null=True, index=True)
    filename = TextField(null=True)
    bytes = BigIntegerField(null=True)
    created_at = DateTimeField(null=True)
    expires_at = DateTimeField(null=True)
    status = TextField(null=True)
    deleted = BooleanField(default=False)
    role = TextField(null=True)  # input, output, error
    batch_id = TextField(null=True, index=True)
    upload_id = TextField(null=True)
    lines = IntegerField(null=True)
    bad_lines = IntegerField(null=True)
    content_seen = BooleanField(default=False)
    complete = BooleanField(null=True)
    problem = TextField(null=True)
    first_seen_at = DateTimeField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "files"


class Batch(Base):
    """A Batch API job with every lifecycle timestamp the API gave and derived durations."""

    id = TextField(primary_key=True)
    status = TextField(index=True)
    endpoint = TextField(null=True)
    model = TextField(null=True, index=True)
    completion_window = TextField(null=True)
    input_file_id = TextField(null=True, index=True)
    output_file_id = TextField(null=True)
    error_file_id = TextField(null=True)
    metadata = JSONField(null=True)
    output_expires_after = JSONField(null=True)
    created_at = DateTimeField(null=True, index=True)
    in_progress_at = DateTimeField(null=True)
    expires_at = DateTimeField(null=True)
    finalizing_at = DateTimeField(null=True)
    completed_at = DateTimeField(null=True)
    failed_at = DateTimeField(null=True)
    expired_at = DateTimeField(null=True)
    cancelling_at = DateTimeField(null=True)
    cancelled_at = DateTimeField(null=True)
    request_total = IntegerField(null=True)
    request_completed = IntegerField(null=True)
    request_failed = IntegerField(null=True)
    errors = JSONField(null=True)
    usage = JSONField(null=True)
    input_tokens = BigIntegerField(null=True)
    output_tokens = BigIntegerField(null=True)
    cached_tokens = BigIntegerField(null=True)
    reasoning_tokens = BigIntegerField(null=True)
    total_tokens = BigIntegerField(null=True)
    usage_cost_usd = DoubleField(null=True)
    queue_s = DoubleField(null=True)
    processing_s = DoubleField(null=True)
    finalize_s = DoubleField(null=True)
    turnaround_s = DoubleField(null=True)
    key_fingerprint = TextField(null=True)
    first_seen_at = DateTimeField()
    last_seen_at = DateTimeField()
    pruned = TextField(null=True)  # 'bodies' (its lines' bodies removed) or 'rows' (its lines, files, events)
    pruned_at = DateTimeField(null=True)
    problem = TextField(null=True)  # what went wrong fetching it (velvet sync: a file gone), migration 17

    class Meta:
        table_name = "batches"


class BatchEvent(Base):
    """A status we observed for a batch, the time we saw it and the API's own timestamp for it."""

    id = AutoField()
    batch_id = TextField(index=True)
    status = TextField()
    previous_status = TextField(null=True)
    observed_at = DateTimeField()
    api_at = DateTimeField(null=True)
    source = TextField()

    class Meta:
        table_name = "batch_events"
        indexes = ((("batch_id", "status"), True),)


class BatchError(Base):
    """A batch-level error (validation), with the input line it points at."""

    id = AutoField()
    batch_id = TextField(index=True)
    code = TextField(null=True)
    message = TextField(null=True)
    param = TextField(null=True)
    line = IntegerField(null=True)

    class Meta:
        table_name = "batch_errors"
        indexes = ((("batch_id", "code", "line", "message"), True),)


class BatchRequest(Base):
    """One line of a batch input file: the exact request."""

    id = AutoField()
    file_id = TextField(null=True)  # indexed by (file_id, line_no)
    upload_part_id = TextField(null=True)  # indexed by (upload_part_id, part_line_no)
    part_line_no = IntegerField(null=True)
    line_no = IntegerField(null=True)
    custom_id = TextField(null=True)
    method = TextField(null=True)
    url = TextField(null=True)
    model = TextField(null=True)
    body = JSONField(null=True)
    problem = TextField(null=True)
    batch_id = TextField(null=True)  # indexed by (batch_id, custom_id)
    file_at = DateTimeField(null=True)  # when its file was first seen: the partition key (storage/partitions.py)

    class Meta:
        table_name = "batch_requests"
        indexes = (
            (("file_id", "line_no"), True),
            (("upload_part_id", "part_line_no"), True),
            (("batch_id", "custom_id"), False),
        )


# the lines with a problem (migration 10): counted at each poll of a batch, listed by `velvet batch`
BatchRequest.add_index(BatchRequest.file_id, name="batch_requests_file_problems",
                       where=BatchRequest.problem.is_null(False))
BatchRequest.add_index(BatchRequest.batch_id, BatchRequest.line_no, name="batch_requests_batch_problems",
                       where=BatchRequest.problem.is_null(False))


class BatchResult(Base):
    """One line of a batch output or error file, linked to its request once both are known."""

    id = AutoField()
    file_id = TextField()  # indexed by (file_id, line_no)
    line_no = IntegerField()
    batch_id = TextField(null=True)  # indexed by (batch_id, custom_id)
    custom_id = TextField(null=True)
    request = ForeignKeyField(BatchRequest, null=True, backref="results", on_delete="SET NULL",
                              column_name="request_row_id")
    result_id = TextField(null=True)
    status_code = IntegerField(null=True)
    request_id = TextField(null=True)
    model = TextField(null=True)
    body = JSONField(null=True)
    error_code = TextField(null=True)
    error_message = TextField(null=True)
    input_tokens = BigIntegerField(null=True)
    output_tokens = BigIntegerField(null=True)
    cached_tokens = BigIntegerField(null=True)
    reasoning_tokens = BigIntegerField(null=True)
    total_tokens = BigIntegerField(null=True)
    cost_usd = DoubleField(null=True)
    failed = BooleanField(default=False)
    problem = TextField(null=True)
    seen_at = DateTimeField()
    file_at = DateTimeField(null=True)  # when its file was first seen: the partition key (storage/partitions.py)

    class Meta:
        table_name = "batch_results"
        indexes = ((("file_id", "line_no"), True), (("batch_id", "custom_id"), False))


# the failed lines, for the report's error codes (migration 13)
BatchResult.add_index(BatchResult.batch_id, BatchResult.error_code, name="batch_results_failed",
                      where=BatchResult.failed)


class Upload(Base):
    """An Uploads API upload, its ordered parts once completed, and the file it became."""

    id = TextField(primary_key=True)
    filename = TextField(null=True)
    bytes = BigIntegerField(null=True)
    purpose = TextField(null=True)
    status = TextField(null=True)
    file_id = TextField(null=True)
    part_ids = JSONField(null=True)
    created_at = DateTimeField(null=True)
    updated_at = DateTimeField()

    class Meta:
        table_name = "uploads"


class UploadPart(Base):
    """A part of an upload: its lines are stored as requests; the partial lines at its edges here."""

    id = TextField(primary_key=True)
    upload_id = TextField(index=True)
    head = BlobField(null=True)
    tail = BlobField(null=True)
    lines = IntegerField(default=0)
    bytes = BigIntegerField(null=True)
    seen_at = DateTimeField()

    class Meta:
        table_name = "upload_parts"


class ProxyStatus(Base):
    """The health of a proxy writing to this database, updated by its writer every few seconds."""

    proxy = TextField(primary_key=True)  # hostname:pid:start
    hostname = TextField()
    pid = IntegerField()
    db = TextField(null=True)  # the URL it writes to, password removed
    started_at = DateTimeField()
    updated_at = DateTimeField()
    stopped_at = DateTimeField(null=True)
    last_write_at = DateTimeField(null=True)
    failing_since = DateTimeField(null=True)  # writes have failed since then (None: healthy)
    last_error = TextField(null=True)
    last_error_at = DateTimeField(null=True)
    queue_depth = IntegerField(default=0)
    pending = IntegerField(default=0)
    spooled = IntegerField(default=0)
    dead_lettered = IntegerField(default=0)
    written = BigIntegerField(default=0)

    class Meta:
        table_name = "velvet_proxies"


class Experiment(Base):
    """A ``velvet replay``: what it replayed, with which overrides, how, and the batch it became."""

    name = TextField(primary_key=True)
    created_at = DateTimeField()
    source = TextField()  # JSON: the selection ({"batch": id}, {"calls": filters}, {"sql": q}, {"file": path})
    overrides = TextField()  # JSON: {"model", "set", "system_prompt"}
    mode = TextField()  # batch or live
    endpoint = TextField(null=True)
    model = TextField(null=True)
    lines = IntegerField()
    estimated_cost_usd = DoubleField(null=True)
    batch_id = TextField(null=True, index=True)
    input_file_id = TextField(null=True)
    key_fingerprint = TextField(null=True)

    class Meta:
        table_name = "experiments"


class ExperimentLine(Base):
    """One replayed line: its custom_id in the experiment, the original it replays, and (live) its answer."""

    id = AutoField()
    experiment = TextField()
    line_no = IntegerField()
    custom_id = TextField()
    source_batch_id = TextField(null=True)
    source_custom_id = TextField(null=True)
    source_call_id = IntegerField(null=True)  # calls.id
    request_id = TextField(null=True)  # live mode: the answer's x-request-id, to find its calls row
    status_code = IntegerField(null=True)

    class Meta:
        table_name = "experiment_lines"
        indexes = ((("experiment", "custom_id"), True),)


class Comparison(Base):
    """A ``velvet compare`` summary, for ``velvet report``."""

    id = AutoField()
    a = TextField()
    b = TextField()
    created_at = DateTimeField(index=True)
    pairs = IntegerField()
    unpaired = IntegerField()
    metrics = TextField()  # JSON: {metric: {"a", "b", "delta"}}
    judge_batch_id = TextField(null=True)

    class Meta:
        table_name = "comparisons"


class Alert(Base):
    """An alert's state change: firing, warning or resolved, for one rule and subject (a batch, a proxy)."""

    id = AutoField()
    at = DateTimeField(index=True)
    rule = TextField()
    kind = TextField()
    subject = TextField()  # "" for a rule on all traffic, else a batch id or a proxy
    state = TextField()
    value = DoubleField(null=True)
    threshold = DoubleField(null=True)
    rule_window = TextField(null=True)
    text = TextField()
    details = TextField(null=True)  # JSON
    source = TextField(null=True)  # who evaluated it: a proxy (host:pid) or "velvet alerts check"

    class Meta:
        table_name = "alerts"
        indexes = ((("rule", "subject"), False),)


class CacheEntry(Base):
    """A response cache entry: a request's canonical key and the answer it is served (migration 15)."""

    id = AutoField()
    key = TextField(index=True)
    flow_id = TextField()  # the call whose answer this is (calls.flow_id)
    created_at = DateTimeField()
    expires_at = DateTimeField(index=True)
    hits = IntegerField()
    last_hit_at = DateTimeField(null=True)
    endpoint = TextField()
    model = TextField(null=True)
    key_fingerprint = TextField(null=True)
    content_type = TextField()
    body = TextField()  # the answer's exact bytes (calls.response_body is jsonb on PostgreSQL: rewritten)
    size = BigIntegerField()
    stream = BooleanField()  # the original was a stream (body: the answer reassembled)
    input_tokens = BigIntegerField(null=True)
    output_tokens = BigIntegerField(null=True)
    cost_usd = DoubleField(null=True)

    class Meta:
        table_name = "cache_entries"


class Score(Base):
    """An answer's score by one eval (velvet_evals, migration 16): a call or a batch result line, from the moment
    it was chosen (``pending``; ``sent`` to a judge) to ``scored``, ``error`` or ``skipped``."""

    id = AutoField()
    eval = TextField()
    check = TextField()
    source = TextField()  # live | batch
    subject = TextField()  # the call's flow_id, or batch_id/custom_id: unique per eval
    call_id = BigIntegerField(null=True, index=True)
    result_id = BigIntegerField(null=True)
    batch_id = TextField(null=True)
    custom_id = TextField(null=True)
    answered_at = DateTimeField(null=True, index=True)
    status = TextField()  # pending | sent | scored | error | skipped
    score = DoubleField(null=True)
    passed = BooleanField(null=True)
    reason = TextField(null=True)
    created_at = DateTimeField()
    judged_at = DateTimeField(null=True)
    attempts = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    judge_call = TextField(null=True)  # a live judge's call: its request id (calls.request_id)
    judge_batch_id = TextField(null=True)
    judge_custom_id = TextField(null=True)
    cost_usd = DoubleField(null=True)

    class Meta:
        table_name = "scores"
        indexes = ((("eval", "subject"), True), (("eval", "judged_at"), False), (("batch_id", "custom_id"), False))


Score.add_index(Score.eval, Score.id, name="scores_waiting", where=Score.status.in_(["pending", "sent"]))


class BatchCount(Base):
    """Counters of a batch's logged lines, kept by the store in the transaction that links them.

    ``batch_summary`` reads them instead of counting lines on every read; ``velvet rebuild`` recomputes them.
    """

    batch_id = TextField(primary_key=True)
    lines = BigIntegerField(default=0)  # input lines bound to the batch
    answered = BigIntegerField(default=0)  # result lines matched to an input line, not failed
    failed = BigIntegerField(default=0)  # result lines matched to an input line, failed
    results = BigIntegerField(default=0)  # result lines bound to the batch, matched or not
    input_tokens = BigIntegerField(null=True)  # sums over those result lines
    output_tokens = BigIntegerField(null=True)
    cost_usd = DoubleField(null=True)

    class Meta:
        table_name = "batch_counts"


class CallRollup(Base):
    """Live calls summed per hour (``hours`` 1) and per day (``hours`` 24), model, endpoint and key.

    Kept by the store as calls are inserted; ``velvet stats`` reads them. Latency and TTFT are kept as
    histograms (JSON ``{bucket: count}``, bucket ``round(50 ln ms)``: within 1 %) since percentiles cannot
    be summed.
    """

    id = AutoField()
    hours = IntegerField()
    period = DateTimeField()  # the hour's or day's start, UTC
    model = TextField()  # the model that answered, else the one asked for; '' when neither
    endpoint = TextField()
    key_fingerprint = TextField()  # '' when none
    calls = BigIntegerField(default=0)
    errors = BigIntegerField(default=0)
    input_tokens = BigIntegerField(default=0)
    output_tokens = BigIntegerField(default=0)
    cost_usd = DoubleField(default=0.0)
    latency_hist = TextField(null=True)
    ttft_hist = TextField(null=True)

    class Meta:
        table_name = "call_rollups"
        indexes = ((("hours", "period", "model", "endpoint", "key_fingerprint"), True),)


MODELS = [Meta, Call, CacheEntry, File, Batch, BatchEvent, BatchError, BatchRequest, BatchResult, Upload,
          UploadPart, ProxyStatus, Experiment, ExperimentLine, Comparison, Alert, BatchCount, CallRollup, Score]
