"""velvet's mitmproxy options, declared once: name, type, default, help, choices, and how a value is checked.

The addon's ``load`` declares them from :data:`OPTIONS`, ``configure`` turns each changed value into what the
addon uses with its ``parse`` (an error names the option), and the options reference (docs/options.md) is
generated from the same table. Importing this module is cheap: each ``parse`` imports what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from velvet_core import config


class OptionError(ValueError):
    """A value an option does not take; the message says why (the addon prefixes the option's name)."""


@dataclass(frozen=True)
class Option:
    name: str
    type: Any  # as mitmproxy's loader.add_option takes it: str, int, bool, Sequence[str]
    default: Any
    help: str
    choices: Sequence[str] | None = None
    parse: Callable[[Any, Option], Any] | None = None  # value -> what the addon keeps; raises OptionError


def _db_url(value: str, _: Option) -> str:
    from velvet_core.storage.urls import DatabaseURLError, check_url

    if value:
        try:
            check_url(value)
        except DatabaseURLError as e:
            raise OptionError(str(e)) from None
    return value


def _hosts(value: Sequence[str], _: Option) -> frozenset[str]:
    hosts = [h.strip().lower() for h in value if h.strip()]
    if bad := [h for h in hosts if "/" in h or " " in h or "," in h]:
        raise OptionError(f"{bad[0]!r} is not a host name (repeat --set velvet_hosts=HOST for several)")
    return frozenset(hosts)


def _pricer(value: str, _: Option) -> Any:
    from velvet_core.cost.prices import PriceFileError, Pricer

    try:
        return Pricer.from_file(value)
    except PriceFileError as e:
        raise OptionError(str(e)) from None


def _not_negative(value: int, _: Option) -> int:
    if value < 0:
        raise OptionError("must be >= 0")
    return value


def _choice(value: str, o: Option) -> str:
    if o.choices is not None and value not in o.choices:  # (mitmproxy does not check choices)
        raise OptionError(f"{value!r}: use {', '.join(o.choices[:-1])} or {o.choices[-1]}")
    return value


def _alert_rules(value: str, _: Option) -> Any:
    from velvet_core.alerts.rules import RulesError, load_rules

    try:
        return load_rules(value) if value else None
    except RulesError as e:
        raise OptionError(str(e)) from None


def _evals(value: str, _: Option) -> Any:
    from velvet_core.evals.rules import EvalsError, load_evals

    try:
        return load_evals(value) if value else None
    except EvalsError as e:
        raise OptionError(str(e)) from None


def _retention(value: str, _: Option) -> Any:
    from velvet_core.storage.prune import Retention, RetentionError

    try:
        return Retention.parse(value) if value.strip() else None
    except RetentionError as e:
        raise OptionError(str(e).removeprefix("velvet_retention: ")) from None


def _seconds(value: str, _: Option) -> float:
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not 0 < v < float("inf"):
        raise OptionError(f"must be a number of seconds > 0, got {value!r}")
    return v


def _ttl(value: str, _: Option) -> float:
    from velvet_core.cache.key import parse_ttl

    try:
        return parse_ttl(value)
    except ValueError as e:
        raise OptionError(str(e)) from None


def _bucket(value: int, _: Option) -> int:
    if not 1 <= value <= 20:
        raise OptionError(f"must be from 1 to 20, got {value}")
    return value


OPTIONS: tuple[Option, ...] = (
    Option("velvet_db", str, "",
           "Database URL: sqlite:///relative.db, sqlite:////absolute.db or "
           "postgresql://user:pass@host:port/db. Default: $VELVET_DB, else "
           f"{config.default_db_url()}.", parse=_db_url),
    Option("velvet_hosts", Sequence[str], list(config.DEFAULT_HOSTS),
           "Hosts whose flows are captured (repeat --set for several), e.g. an "
           "Azure OpenAI resource <name>.openai.azure.com. In reverse mode, the target's host.", parse=_hosts),
    Option("velvet_prices", str, "",
           "A TOML or JSON file of prices (USD per million tokens) that override "
           "genai-prices for the models it names.", parse=_pricer),
    Option("velvet_body_limit", int, config.BODY_LIMIT,
           "Bodies larger than this many bytes (decoded) are not stored in calls.", parse=_not_negative),
    Option("velvet_spool_dir", str, "",
           "Where rows wait on disk while the database is unreachable. Default: "
           f"{config.default_spool_dir()}/<12 hex digits of the database URL's hash>: one folder per database."),
    Option("velvet_stream_threshold", int, config.STREAM_THRESHOLD,
           "Batch bodies (uploads, upload parts, file downloads) larger than this many bytes "
           "are streamed through velvet's parser instead of being buffered: no delay to the "
           "transfer, bounded memory, but mitmweb does not show the body (unless "
           "store_streamed_bodies is on). Compressed bodies and downloads of unknown length "
           "are always streamed, and kept for mitmweb when no bigger than this on the wire. "
           "Bodies mitmproxy already streams (stream_large_bodies) are always followed.", parse=_not_negative),
    Option("velvet_journal", bool, True,
           "Journal each finished flow before its response goes to the client, so a proxy killed "
           "with SIGKILL loses nothing: the flows are finished at the next start. Off: the "
           "flows still queued when the process dies are lost."),
    Option("velvet_writer", str, "auto",
           "Where rows are processed and written: 'thread' (in mitmproxy's process), 'process' "
           "(a child process reading the journal: the event loop only journals; needs "
           "velvet_journal), or 'auto' (a process when there is a second core and no flow list "
           "to comment, as in mitmdump; a thread otherwise).",
           choices=("auto", "thread", "process"), parse=_choice),
    Option("velvet_stream_usage", str, "off",
           "Streamed chat/completions calls whose client did not ask for usage: 'off' counts "
           "their tokens with a tokenizer (usage_estimated); 'inject' asks upstream for "
           "stream_options.include_usage and removes the extra usage chunk before the client "
           "sees it, for exact figures.", choices=("off", "inject"), parse=_choice),
    Option("velvet_flush_timeout", int, 30,  # (mitmproxy cannot --set a float option)
           "Seconds to wait at shutdown for queued rows to be written (the rest is "
           "spooled to disk and written at the next start)."),
    Option("velvet_alerts", str, "",
           "A TOML file of alert rules (error rate, latency, spend, batches, velvet's own "
           "health) evaluated in the background, with a webhook or command to notify.", parse=_alert_rules),
    # a str holding a number: mitmproxy's --set cannot parse float options
    Option("velvet_alert_interval", str, "30",
           "Seconds between two evaluations of the alert rules (decimals allowed).", parse=_seconds),
    Option("velvet_evals", str, "",
           "A TOML file of [[eval]] tables (it may be the velvet_alerts file): checks (JSON, JSON Schema, regex, "
           "contains, length, finished, tool arguments) and LLM judges scored on live answers and batch result "
           "lines, in a background process; results in the scores table and velvet evals.", parse=_evals),
    Option("velvet_eval_interval", str, "60",
           "Seconds between two submissions of gathered judge work as a Batch API job (sooner at 10,000 "
           "answers), and between two polls of the open judge batches.", parse=_seconds),
    Option("velvet_eval_key_env", str, "OPENAI_API_KEY",
           "The environment variable that holds the API key judges use (read when needed, never stored)."),
    Option("velvet_refresh", int, 300,
           "Seconds between two refreshes of the batches not final in the logs and created in the last 48 h: each "
           "is retrieved through this proxy (so its state is logged even when no app polls it); 0 turns it off. "
           "Needs the key named by velvet_refresh_key_env.", parse=_not_negative),
    Option("velvet_refresh_key_env", str, "OPENAI_API_KEY",
           "The environment variable that holds the API key the refresh uses (read when needed, never stored); "
           "without it, the refresh is off and velvet status says so."),
    Option("velvet_refresh_download", bool, False,
           "Also download the output and error files of batches that ended (through this proxy), so their "
           "answers are in the logs even when the app reads them elsewhere, or never."),
    Option("velvet_pg_partitions", str, "",
           "PostgreSQL: a NEW database gets calls and batch lines partitioned by time: 'month', 'week' or "
           "'day' (the periods ahead made by the proxy, retention dropping whole partitions). An existing one: "
           "velvet migrate --partition.",
           choices=("", "month", "week", "day"), parse=_choice),
    Option("velvet_retention", str, "",
           "How long to keep what is logged, e.g. bodies=30d,rows=400d (h, d or w): request and answer bodies, "
           "then whole rows, older than that are removed once an hour, in the background (a batch whole, by "
           "when it ended; the rollups and counters stay, so stats and the report stay right). Off by default.",
           parse=_retention),
    Option("velvet_cache", str, "header",
           "The response cache (exact match): 'off'; 'header' (only requests carrying velvet-cache: on or "
           "refresh); 'on' (every cacheable request: POST to chat completions, completions, embeddings, "
           "moderations, and responses with store: false). Per request, velvet-cache: on, off (bypass) or refresh "
           "(ask the API, store the new answer); velvet-cache-ttl: SECONDS; velvet-cache-seed: TEXT (a separate "
           "namespace). velvet removes these headers before the request leaves.",
           choices=("off", "header", "on"), parse=_choice),
    Option("velvet_cache_ttl", str, "7d",
           "How long a cache entry is served: seconds, or e.g. 30m, 2h, 7d (at most 365d).", parse=_ttl),
    Option("velvet_cache_scope", str, "key",
           "Who shares cache entries: 'key' (each API key apart), 'project' (the openai-project header), or "
           "'global' (everyone through this database).", choices=("key", "project", "global"), parse=_choice),
    Option("velvet_cache_bucket", int, 1,
           "Up to this many different answers stored per request (1 to 20), served in turn once all are "
           "stored.", parse=_bucket),
)

BY_NAME = {o.name: o for o in OPTIONS}
