// The official openai Node SDK as an app would use it, for tests/test_clients.py: a chat call, a streamed
// chat call and a full batch cycle (toFile upload, create, poll, download). Prints one JSON object.
//
//   node clients.mjs reverse   OPENAI_BASE_URL points at velvet in reverse mode (no code change)
//   node clients.mjs agent     HTTPS_PROXY + NODE_EXTRA_CA_CERTS, with undici's EnvHttpProxyAgent installed
//                              as the global dispatcher (the one-line change Node 20 needs)
//   node clients.mjs plain     HTTPS_PROXY alone: one chat call; Node's fetch ignores HTTPS_PROXY
//   node clients.mjs undici-fetch   the SDK given undici's own fetch with a ProxyAgent: a chat call, then
//                              a file upload, which that fetch refuses (FormData)
import OpenAI, { toFile } from "openai";

const mode = process.argv[2];
const options = { apiKey: process.env.VELVET_TEST_KEY, maxRetries: 0, timeout: 30_000 };
if (mode === "agent") {
  const { setGlobalDispatcher, getGlobalDispatcher, EnvHttpProxyAgent } = await import("undici");
  setGlobalDispatcher(new EnvHttpProxyAgent());
  if (!(getGlobalDispatcher() instanceof EnvHttpProxyAgent)) throw new Error("dispatcher not installed");
} else if (mode === "undici-fetch") {
  const { fetch, ProxyAgent } = await import("undici");
  const dispatcher = new ProxyAgent(process.env.HTTPS_PROXY);
  options.fetch = (url, init) => fetch(url, { ...init, dispatcher });
}
const client = new OpenAI(options);
const messages = [{ role: "user", content: "Say hello from Node" }];
const out = { mode };
const attempt = async (what) => {
  try {
    return { ok: true, id: (await what()).id };
  } catch (e) {
    return { ok: false, error: `${e.constructor.name}: ${e.message}`,
             cause: String(e.cause?.cause?.code ?? e.cause?.code ?? e.cause ?? "") };
  }
};
const upload = async () => client.files.create({
  file: await toFile(Buffer.from('{"custom_id":"u-1","method":"POST","url":"/v1/chat/completions","body":{}}\n'),
                     "u.jsonl"),
  purpose: "batch",
});

if (mode === "plain" || mode === "undici-fetch") {
  out.chat = await attempt(() => client.chat.completions.create({ model: "gpt-4o-mini", messages }));
  if (mode === "undici-fetch") out.upload = await attempt(upload);
  console.log(JSON.stringify(out));
  process.exit(0);
}

const { data: chat, response: chatResponse } = await client.chat.completions
  .create({ model: "gpt-4o-mini", messages })
  .withResponse();
out.chat = {
  id: chat.id, model: chat.model, usage: chat.usage, text: chat.choices[0].message.content,
  request_id: chatResponse.headers.get("x-request-id"),
};

const { data: stream, response: streamResponse } = await client.chat.completions
  .create({ model: "gpt-4o-mini", messages, stream: true, stream_options: { include_usage: true } })
  .withResponse();
let text = "";
let usage = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
out.stream = { text, usage, chunks, request_id: streamResponse.headers.get("x-request-id") };

const customIds = Array.from({ length: 12 }, (_, i) => `node-${i + 1}`);
const jsonl = customIds.map((custom_id, i) => JSON.stringify({
  custom_id, method: "POST", url: "/v1/chat/completions",
  body: { model: i === 4 ? "bad-model" : "gpt-4o-mini", messages: [{ role: "user", content: `line ${i + 1}` }] },
})).join("\n") + "\n";
const file = await client.files.create({ file: await toFile(Buffer.from(jsonl), "node-batch.jsonl"), purpose: "batch" });
let batch = await client.batches.create({
  input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h", metadata: { from: "node" },
});
const statuses = [batch.status];
while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
  batch = await client.batches.retrieve(batch.id);
  statuses.push(batch.status);
}
// the server compresses the output file, as the API does for the SDKs' downloads
const download = async (id) => (await client.files.content(id, { headers: { "x-standin-gzip": "1" } })).text();
const ids = (text) => text.split("\n").filter(Boolean).map((line) => JSON.parse(line).custom_id);
const output = batch.output_file_id ? await download(batch.output_file_id) : "";
const errors = batch.error_file_id ? await download(batch.error_file_id) : "";
out.batch = {
  file_id: file.id, file_bytes: file.bytes, id: batch.id, status: batch.status, statuses,
  request_counts: batch.request_counts, custom_ids: customIds,
  output_file_id: batch.output_file_id, error_file_id: batch.error_file_id,
  output_custom_ids: ids(output), error_custom_ids: ids(errors),
};
console.log(JSON.stringify(out));
