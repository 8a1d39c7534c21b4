"""The ``judge`` metric: an LLM grades each distinct (prompt, answer) against a rubric, 1 to 10, in one
Batch API job sent through the proxy like any other (so its cost is logged too)."""

from __future__ import annotations

import tempfile
from typing import Any, TextIO

import orjson

from velvet_core.api.client import Client
from velvet_core.experiments import replay

SYSTEM = ("You grade an AI assistant's answer to a request against a rubric. Give a score from 1 (does not "
          "meet the rubric at all) to 10 (fully meets it) and one short sentence of reason.")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "grade", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["score", "reason"],
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}}}}}


def request(rubric: str, prompt: str, answer: str, model: str) -> dict[str, Any]:
    user = (f"Rubric:\n{rubric}\n\nRequest:\n<request>\n{prompt}\n</request>\n\n"
            f"Answer:\n<answer>\n{answer}\n</answer>")
    return {"model": model, "temperature": 0, "response_format": SCHEMA,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def score(line: Any) -> float | None:
    """The score in an output-file line, or None (failed line, unreadable or out-of-range grade)."""
    try:
        body = line["response"]["body"]
        text = body["choices"][0]["message"]["content"]
        value = orjson.loads(text)["score"]
    except (KeyError, IndexError, TypeError, orjson.JSONDecodeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 10:
        return None
    return float(value)


def run(client: Client, rubric: str, items: dict[str, tuple[str, str]], model: str, poll_interval: float,
        status: TextIO | None = None) -> tuple[str, dict[str, float | None]]:
    """Grade ``items`` ({key: (prompt, answer)}) in one batch; waits for it. Returns the batch id and a score
    (or None) per key."""
    keys = list(items)
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as f:
        for n, key in enumerate(keys):
            prompt, answer = items[key]
            f.write(orjson.dumps({"custom_id": f"judge-{n}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": request(rubric, prompt, answer, model)}) + b"\n")
        uploaded = client.upload(f, "velvet-judge.jsonl")
    batch = client.create_batch(uploaded["id"], "/v1/chat/completions", {"velvet_judge": "velvet compare"})
    done = replay.wait(client, batch["id"], poll_interval, status)
    files = replay.download(client, done, keep=True)
    scores: dict[str, float | None] = dict.fromkeys(keys)
    for raw in files.get("output", {}).get("content", b"").splitlines():
        try:
            line = orjson.loads(raw)
            n = int(str(line["custom_id"]).removeprefix("judge-"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if 0 <= n < len(keys):
            scores[keys[n]] = score(line)
    return batch["id"], scores
