"""The database ``velvet ask``'s tests query: traffic the official SDK sends through a real mitmdump with velvet to
the stand-in (velvet's own capture and ingest wrote every row): tagged live calls on several models, streamed
calls without usage (estimated tokens), errors, an embeddings call, and two batches (one with failed lines, one
cancelled)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import openai
import orjson

from support.rig import Proxy, wait_for

ASK = [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]
BATCH_LINES = 20
BAD_LINES = (7, 13)  # custom_ids review-7 and review-13 ask for a model that does not exist


def workload(client: openai.OpenAI) -> dict[str, Any]:
    """What an app would do; returns the ids made (``batch``, ``cancelled``)."""
    for model, team in (("gpt-4o-mini", "search"), ("gpt-4o-mini", "search"), ("gpt-4o-mini", "support"),
                        ("gpt-4o", "support"), ("gpt-4o", "ranking"), ("gpt-4.1-mini", None)):
        headers = {"velvet-metadata-team": team} if team else {}
        client.chat.completions.create(model=model, messages=ASK, extra_headers=headers)
    for _ in range(2):  # streamed without usage: velvet counts the tokens itself
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True,
                                                extra_headers={"velvet-metadata-team": "search"}):
            pass
    for _ in client.chat.completions.create(model="gpt-4o", messages=ASK, stream=True,
                                            stream_options={"include_usage": True}):
        pass
    client.embeddings.create(model="text-embedding-3-small", input=["velvet", "proxy"])
    for scenario, exc in (("429", openai.RateLimitError), ("429", openai.RateLimitError),
                          ("500", openai.InternalServerError)):
        with contextlib.suppress(exc):
            client.chat.completions.create(model="gpt-4o-mini", messages=ASK,
                                           extra_headers={"x-standin-scenario": scenario,
                                                          "velvet-metadata-team": "search"})
    lines = b"".join(orjson.dumps({
        "custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "bad-model" if i in BAD_LINES else "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"Classify review #{i}: 'great product'"}]}}) + b"\n"
        for i in range(1, BATCH_LINES + 1))
    f = client.files.create(file=("reviews.jsonl", io.BytesIO(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "review-classifier"})
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        b = client.batches.retrieve(b.id)
    if b.output_file_id:
        client.files.content(b.output_file_id).read()
    if b.error_file_id:
        client.files.content(b.error_file_id).read()
    emb = b"".join(orjson.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"model": "text-embedding-3-small", "input": f"document {i}"}}) + b"\n"
                   for i in range(1, 4))
    f2 = client.files.create(file=("docs.jsonl", io.BytesIO(emb)), purpose="batch")
    c = client.batches.create(input_file_id=f2.id, endpoint="/v1/embeddings", completion_window="24h",
                              metadata={"job": "embed-docs"})
    c = client.batches.cancel(c.id)
    client.batches.retrieve(c.id)
    return {"batch": b.id, "cancelled": c.id}


def fill(proxy: Proxy, monkeypatch: Any) -> dict[str, Any]:
    """Run the workload through ``proxy`` and wait until velvet has written it."""
    made = workload(proxy.client(monkeypatch))
    from velvet_core.storage.database import open_db

    def written() -> bool:
        db = open_db(proxy.db_url)
        try:
            n = db.execute_sql("SELECT count(*) FROM batch_results").fetchone()[0]
            c = db.execute_sql(f"SELECT count(*) FROM calls WHERE object_id = {db.param}", (made["cancelled"],)
                               ).fetchone()[0]
            return n >= BATCH_LINES and c >= 2
        finally:
            db.close()

    wait_for(written, 30, "the workload written")
    return made
