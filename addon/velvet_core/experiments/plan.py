"""A replay's plan: the overrides (``--model``, ``--set``, ``--system-prompt``) applied to every selected
request, the batch input file they make, the line map back to the originals, and the cost estimated from
the logged token counts. Building a plan sends nothing."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from velvet_core.cost.prices import Pricer
from velvet_core.experiments.select import Logged
from velvet_core.parsing.extract import Tokens

BATCH_MAX_LINES = 50_000  # the Batch API's limits for one input file
BATCH_MAX_BYTES = 200 * 1024 * 1024
CUSTOM_ID_MAX = 64
_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


class PlanError(ValueError):
    """An override that does not fit the selected requests: a one-line usage error."""


def parse_set(text: str) -> tuple[tuple[str, ...], Any]:
    """``key=value`` with dotted keys for nested objects; the value is JSON when it parses, else text."""
    key, sep, raw = text.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise ValueError(f"--set {text!r}: use key=value, e.g. temperature=0 or response_format.type=json_object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return path, value


@dataclass(frozen=True)
class Overrides:
    """Applied in this order: ``model``, ``system_prompt``, then each ``--set`` (``null`` removes a key)."""

    model: str | None = None
    sets: tuple[tuple[tuple[str, ...], Any], ...] = ()
    system_prompt: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model:
            out["model"] = self.model
        if self.sets:
            out["set"] = {".".join(p): v for p, v in self.sets}
        if self.system_prompt is not None:
            out["system_prompt"] = self.system_prompt
        return out

    def apply(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """A new request body; streaming is turned off (a batch cannot stream, and a replay wants whole
        answers logged)."""
        out = orjson.loads(orjson.dumps(body))
        out.pop("stream", None)
        out.pop("stream_options", None)
        if self.model:
            out["model"] = self.model
        if self.system_prompt is not None:
            _system_prompt(url, out, self.system_prompt)
        for path, value in self.sets:
            _set(out, path, value)
        return out


def _system_prompt(url: str, body: dict[str, Any], text: str) -> None:
    if url.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise PlanError("--system-prompt: a selected request has no messages")
        for m in messages:
            if isinstance(m, dict) and m.get("role") in ("system", "developer"):
                m["content"] = text
                return
        messages.insert(0, {"role": "system", "content": text})
    elif url.endswith("/responses"):
        body["instructions"] = text
    else:
        raise PlanError(f"--system-prompt applies to chat completions and responses, not {url}")


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    d = body
    for i, key in enumerate(path[:-1]):
        inner = d.get(key)
        if inner is None:
            inner = d[key] = {}
        elif not isinstance(inner, dict):
            raise PlanError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not an object in a selected "
                            "request")
        d = inner
    if value is None:
        d.pop(path[-1], None)
    else:
        d[path[-1]] = value


@dataclass(slots=True)
class PlanLine:
    """One line of the replay and the original it replays (what ``experiment_lines`` stores)."""

    line_no: int
    custom_id: str
    source_batch_id: str | None
    source_custom_id: str | None
    source_call_id: int | None


@dataclass
class Plan:
    """The requests to send (a batch input file, spooled to disk when large) and what they should cost."""

    file: IO[bytes]
    lines: list[PlanLine] = field(default_factory=list)
    bytes: int = 0
    urls: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)  # after the overrides
    from_models: Counter[str] = field(default_factory=Counter)  # as logged
    input_tokens: int = 0  # logged, of the lines that have counts
    output_tokens: int = 0  # logged, capped by a max_tokens override
    cost_batch: float | None = None  # estimated at batch prices
    cost_live: float | None = None  # at the synchronous prices
    unpriced: int = 0  # lines without logged token counts or a known price (not in the estimate)
    example: dict[str, Any] | None = None  # the first request as it will be sent

    @property
    def endpoint(self) -> str | None:
        return next(iter(self.urls)) if len(self.urls) == 1 else None

    def estimated_cost(self, mode: str) -> float | None:
        cost = self.cost_batch if mode == "batch" else self.cost_live
        return None if cost is None else round(cost, 10)

    def requests(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(custom_id, url, body) of every line, read back from the file."""
        self.file.seek(0)
        for raw in self.file:
            line = orjson.loads(raw)
            yield line["custom_id"], line["url"], line["body"]

    def close(self) -> None:
        self.file.close()


def build(items: Iterable[Logged], overrides: Overrides, pricer: Pricer | None = None) -> Plan:
    """Apply the overrides to every selected request and write the batch input file."""
    pricer = pricer or Pricer()
    plan = Plan(file=tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024))  # noqa: SIM115 - Plan.close
    used: set[str] = set()
    for n, item in enumerate(items, 1):
        body = overrides.apply(item.url, item.body)
        cid = _custom_id(item, n, used)
        used.add(cid)
        raw = orjson.dumps({"custom_id": cid, "method": "POST", "url": item.url, "body": body}) + b"\n"
        plan.file.write(raw)
        plan.bytes += len(raw)
        plan.lines.append(PlanLine(n, cid, item.batch_id, item.custom_id, item.call_id))
        plan.urls[item.url] += 1
        plan.models[str(body.get("model"))] += 1
        plan.from_models[str(item.body.get("model"))] += 1
        if plan.example is None:
            plan.example = body
        _estimate(plan, pricer, item, body)
    return plan


def _custom_id(item: Logged, n: int, used: set[str]) -> str:
    """The original custom_id where it is unique, ``call-<id>`` for a live call, else ``line-<n>``."""
    cid = item.custom_id or (f"call-{item.call_id}" if item.call_id is not None else None)
    if cid is None or len(cid) > CUSTOM_ID_MAX or cid in used:
        cid, k = f"line-{n}", 1
        while cid in used:
            k += 1
            cid = f"line-{n}-{k}"
    return cid


def _estimate(plan: Plan, pricer: Pricer, item: Logged, body: dict[str, Any]) -> None:
    if item.input_tokens is None:
        plan.unpriced += 1
        return
    output = item.output_tokens or 0
    caps = [body[k] for k in _LIMITS if isinstance(body.get(k), int) and not isinstance(body.get(k), bool)]
    if caps:  # a lower token limit cuts the answers short
        output = min(output, *caps)
    tokens = Tokens(input=item.input_tokens, output=output, cached=item.cached_tokens)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    batch, live = pricer.cost(model, tokens, batch=True), pricer.cost(model, tokens)
    if batch is None or live is None:
        plan.unpriced += 1
        return
    plan.input_tokens += item.input_tokens
    plan.output_tokens += output
    plan.cost_batch = (plan.cost_batch or 0.0) + batch
    plan.cost_live = (plan.cost_live or 0.0) + live
