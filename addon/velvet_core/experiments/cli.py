"""The arguments of ``velvet replay``, ``compare`` and ``export`` (what they do:
:mod:`velvet_core.experiments.commands`
and :mod:`velvet_core.experiments.export`, imported when one runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from velvet_core.clock import since_arg
from velvet_core.experiments.metrics import DEFAULT_METRICS, JUDGE_MODEL, METRICS

RUN = "velvet_core.experiments.commands:"
LIVE_DEFAULT_MAX = 30  # without --mode, up to this many lines go live (a --batch selection always a batch)
FORMATS = ("jsonl", "csv", "finetune")  # velvet export --format


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``replay`` and ``compare`` with the CLI's ``command(name, func, help)`` helper."""
    p = command("replay", RUN + "cmd_replay", "replay logged requests with another model or settings, as a "
                                              "Batch API job or live, through the proxy")
    what = p.add_argument_group("selection (one of)").add_mutually_exclusive_group(required=True)
    what.add_argument("--batch", metavar="ID", help="the input lines of this batch")
    what.add_argument("--calls", action="store_true", help="live calls, picked by the filters below")
    what.add_argument("--sql", metavar="QUERY",
                      help="a read-only query returning request_body (or body), and optionally id / call_id, "
                           "batch_id and custom_id, url or endpoint")
    what.add_argument("--file", metavar="FILE", help="a batch input file (JSONL)")
    p.add_argument("--allow-powerful-role", action="store_true",
                   help="--sql on PostgreSQL: run even as a role that can do more than read (see velvet sql)")
    what.add_argument("--resume", metavar="NAME", help="wait for an experiment's batch and download its results")
    f = p.add_argument_group("filters (--calls; --from-model, --endpoint and --since also --batch)")
    f.add_argument("--from-model", metavar="M", help="only requests to this model")
    f.add_argument("--endpoint", help="chat.completions, responses, embeddings, completions, moderations")
    f.add_argument("--since", type=since_arg, metavar="WHEN")
    f.add_argument("--status", help="a status code (429), a class (4xx) or 'error'")
    f.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="only calls with this velvet-metadata tag (repeatable)")
    f.add_argument("--limit", type=int, metavar="N", help="at most N requests")
    o = p.add_argument_group("overrides")
    o.add_argument("--model", metavar="M", help="the model to replay on")
    o.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set a request field (JSON value, dotted keys: response_format.type=json_object; "
                        "null removes it); repeatable")
    o.add_argument("--system-prompt", metavar="TEXT", help="replace (or add) the system prompt / instructions")
    r = p.add_argument_group("run")
    r.add_argument("--mode", choices=("batch", "live"),
                   help=f"default: batch for --batch or more than {LIVE_DEFAULT_MAX} requests, else live")
    r.add_argument("--concurrency", type=int, default=4, metavar="N", help="live requests in flight (default 4)")
    r.add_argument("--name", help="the experiment's name (default replay-<UTC time>)")
    r.add_argument("--wait", action="store_true", help="wait for the batch, then download its output and errors")
    r.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between batch polls (default 30)")
    r.add_argument("--dry-run", action="store_true", help="show the plan and the estimated cost; send nothing")
    r.add_argument("--max-lines", type=int, default=1000, metavar="N",
                   help="more requests than this need --yes (default 1,000)")
    r.add_argument("--yes", action="store_true", help="replay more than --max-lines requests")

    p = command("compare", RUN + "cmd_compare", "compare two runs of the same requests: batches or "
                                                "experiments (one experiment: against what it replayed)")
    p.add_argument("a", metavar="A", help="a batch id or an experiment name")
    p.add_argument("b", metavar="B", nargs="?", help="a batch id or an experiment name")
    p.add_argument("--metric", action="append", metavar="NAME[=VALUE]",
                   help=f"repeatable: {', '.join(METRICS)} (contains=TEXT, regex=PATTERN, judge=RUBRIC or "
                        f"judge=@FILE), eval=NAME (an [[eval]] of --rules: its check's mean score); default "
                        f"{', '.join(DEFAULT_METRICS)}")
    p.add_argument("--rules", metavar="FILE",
                   help="the rules file whose [[eval]] tables --metric eval=NAME names (default $VELVET_EVALS, "
                        "else evals.toml in the data dir)")
    p.add_argument("--judge-model", default=JUDGE_MODEL, metavar="M",
                   help=f"the grading model (default {JUDGE_MODEL})")
    p.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between polls of the judge's batch (default 30)")
    p.add_argument("--lines", type=int, default=20, metavar="N", help="lines shown for people (default 20)")


def add_export(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("export", "velvet_core.experiments.export:cmd_export",
                "stream live calls or batch lines as JSONL or CSV, or successful chat answers as fine-tuning data",
                json=False)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--batch", metavar="ID", help="this batch's lines (request and answer)")
    what.add_argument("--lines", action="store_true", help="every batch line instead of live calls")
    p.add_argument("--since", type=since_arg, metavar="WHEN")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--model", help="finetune: only requests to this model")
    p.add_argument("--endpoint", help="finetune: chat.completions or responses")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="finetune: only calls with this velvet-metadata tag (repeatable)")
