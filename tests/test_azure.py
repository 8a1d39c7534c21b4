"""Azure OpenAI and an OpenAI-compatible host end to end: the official SDK (``AzureOpenAI``, ``OpenAI``
with another base URL) through a real mitmdump whose ``velvet_hosts`` lists them, at the stand-in."""

from __future__ import annotations

import io
import os
from decimal import Decimal

import openai
import orjson
import pytest
from support.pg import fresh_pg_url
from support.rig import Proxy, bound, call_row, stored_batch, wait_for
from velvet_core.parsing.extract import key_fingerprint
from velvet_core.storage import models

AZURE = "velvetres.openai.azure.com"
COMPAT = "llm.example.internal"
AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure keys are 32 hex digits
API_VERSION = "2024-10-21"
MSG = [{"role": "user", "content": "Say hello to the proxy"}]
PRICES = """
[models."acme-chat-1"]
input = 2.0
output = 6.0
batch_input = 0.5
batch_output = 1.5
"""


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hosts_proxy(request, standin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"azure-{request.param}")
    (tmp / "prices.toml").write_text(PRICES)
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    hosts = ["api.openai.com", AZURE, COMPAT]
    p = Proxy(url, standin.url, tmp, hosts=hosts, extra=[
        *[a for h in hosts for a in ("--set", f"velvet_hosts={h}")],
        "--set", f"velvet_prices={tmp / 'prices.toml'}"]).start()
    yield p
    p.stop()


def env_for(proxy: Proxy, monkeypatch) -> None:
    for k in [k for k in os.environ if "proxy" in k.lower() or k.startswith(("OPENAI_", "AZURE_OPENAI_"))]:
        monkeypatch.delenv(k)
    for k, v in proxy.env().items():
        monkeypatch.setenv(k, v)


def azure_client(proxy: Proxy, monkeypatch, key: str = AZURE_KEY) -> openai.AzureOpenAI:
    env_for(proxy, monkeypatch)
    return openai.AzureOpenAI(azure_endpoint=f"https://{AZURE}", api_key=key, api_version=API_VERSION,
                              max_retries=0, timeout=30)


def no_secret(url: str, secret: str) -> None:
    with bound(url):
        for row in models.Call.select().dicts():
            assert secret not in orjson.dumps(row, default=str).decode()


def test_azure_chat_and_stream(hosts_proxy, monkeypatch):
    client = azure_client(hosts_proxy, monkeypatch)
    r = client.chat.completions.with_raw_response.create(model="chat-prod", messages=MSG)
    c = r.parse()
    row = call_row(hosts_proxy.db_url, r.headers["x-request-id"])
    assert row.host == AZURE
    assert row.path == f"/openai/deployments/chat-prod/chat/completions?api-version={API_VERSION}"
    assert (row.endpoint, row.action, row.deployment) == ("chat.completions", "create", "chat-prod")
    assert row.model_requested == "chat-prod" and row.model == c.model == "gpt-4o-mini-2024-07-18"
    assert row.input_tokens == c.usage.prompt_tokens and row.output_tokens == c.usage.completion_tokens
    assert row.cost_usd is not None and row.cost_usd > 0
    assert row.key_fingerprint == key_fingerprint({"api-key": AZURE_KEY})
    assert "api-key" not in orjson.loads(row.request_headers)

    with client.chat.completions.with_streaming_response.create(
            model="chat-prod", messages=MSG, stream=True, stream_options={"include_usage": True}) as s:
        rid = s.headers["x-request-id"]
        chunks = list(s.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    row = call_row(hosts_proxy.db_url, rid)
    assert row.stream and row.complete and row.deployment == "chat-prod" and row.response_text == text
    assert row.output_tokens == chunks[-1].usage.completion_tokens and row.cost_usd > 0

    bad = azure_client(hosts_proxy, monkeypatch, key="bad" + AZURE_KEY[3:])
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.chat.completions.create(model="chat-prod", messages=MSG)
    assert ei.value.status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-deployment", messages=MSG)
    def failed_calls() -> dict[str, models.Call] | None:
        with bound(hosts_proxy.db_url):
            rows = {r.deployment: r for r in models.Call.select().where(models.Call.status_code >= 400)}
        return rows if len(rows) >= 2 else None

    failed = wait_for(failed_calls, what="the two refused calls")
    assert failed["chat-prod"].status_code == 401 and "Access denied" in failed["chat-prod"].error_message
    assert failed["no-such-deployment"].error_code == "DeploymentNotFound"
    no_secret(hosts_proxy.db_url, AZURE_KEY[3:])


def test_azure_batch_cycle(hosts_proxy, monkeypatch):
    """Azure's batch flavour: /openai/files and /openai/batches with api-version, lines naming a deployment."""
    client = azure_client(hosts_proxy, monkeypatch)
    lines = [{"custom_id": f"az-{i}", "method": "POST", "url": "/chat/completions",
              "body": {"model": "bad-model" if i == 3 else "chat-prod",
                       "messages": [{"role": "user", "content": f"azure line {i}"}]}} for i in range(1, 9)]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    f = client.files.create(file=("az.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/chat/completions", completion_window="24h")
    statuses = [b.status]
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        b = client.batches.retrieve(b.id)
        statuses.append(b.status)
    out = client.files.content(b.output_file_id, extra_headers={"x-standin-gzip": "1"}).read()
    err = client.files.content(b.error_file_id).read()
    ids = [orjson.loads(x)["custom_id"] for x in (out + err).splitlines()]

    got = stored_batch(hosts_proxy.db_url, b.id, len(ids))
    assert got["batch"].status == "completed" and got["events"] == statuses
    assert got["batch"].endpoint == "/chat/completions" and got["batch"].model == b.model
    assert got["request_counts"] == b.request_counts.model_dump()
    assert got["custom_ids"] == [x["custom_id"] for x in lines]
    assert sorted(got["results"]) == sorted(ids) and got["matched"] == {c: c for c in ids}
    assert [c for c, r in got["results"].items() if r.failed] == ["az-3"]
    ok = got["results"]["az-1"]
    assert ok.model == "gpt-4o-mini-2024-07-18" and ok.cost_usd > 0
    assert got["files"][f.id].role == "input" and got["files"][f.id].lines == 8
    assert got["files"][f.id].problem is None  # "/chat/completions" is the batch's endpoint, Azure-style
    with bound(hosts_proxy.db_url):
        upload = models.Call.get(models.Call.object_id.is_null() & (models.Call.path.startswith("/openai/files?")))
    assert upload.endpoint == "files" and upload.action == "upload" and upload.host == AZURE
    no_secret(hosts_proxy.db_url, AZURE_KEY[3:])


def test_openai_compatible_host_with_price_override(hosts_proxy, monkeypatch):
    """Another host in velvet_hosts, a model genai-prices does not know, priced by velvet_prices."""
    env_for(hosts_proxy, monkeypatch)
    client = openai.OpenAI(base_url=f"https://{COMPAT}/v1", api_key="sk-compat-" + "c" * 20, max_retries=0)
    r = client.chat.completions.with_raw_response.create(model="acme-chat-1", messages=MSG)
    c = r.parse()
    row = call_row(hosts_proxy.db_url, r.headers["x-request-id"])
    assert row.host == COMPAT and row.model == "acme-chat-1"
    want = (Decimal(c.usage.prompt_tokens) * 2 + Decimal(c.usage.completion_tokens) * 6) / 1_000_000
    assert row.cost_usd == pytest.approx(float(want), rel=1e-9)
    unpriced = client.chat.completions.with_raw_response.create(model="acme-other", messages=MSG)
    assert call_row(hosts_proxy.db_url, unpriced.headers["x-request-id"]).cost_usd is None  # unknown: NULL, not 0

    lines = [{"custom_id": f"cp-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "acme-chat-1", "messages": [{"role": "user", "content": f"w {i}"}]}}
             for i in range(1, 5)]
    f = client.files.create(file=("cp.jsonl", io.BytesIO(b"".join(orjson.dumps(x) + b"\n" for x in lines))),
                            purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status != "completed":
        b = client.batches.retrieve(b.id)
    out = [orjson.loads(x) for x in client.files.content(b.output_file_id).read().splitlines()]
    got = stored_batch(hosts_proxy.db_url, b.id, len(out))
    for o in out:
        u = o["response"]["body"]["usage"]
        want = (Decimal(u["prompt_tokens"]) * Decimal("0.5") + Decimal(u["completion_tokens"]) * Decimal("1.5")) \
            / 1_000_000
        assert got["results"][o["custom_id"]].cost_usd == pytest.approx(float(want), rel=1e-9)  # batch prices
    assert got["matched"] == {x["custom_id"]: x["custom_id"] for x in lines}
