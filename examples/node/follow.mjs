// Follow a tokenpool job from Node.js, straight from Redis: no API in the way.
//
//   node follow.mjs "Once upon a time"        submit through the API, then follow from Redis
//   node follow.mjs --job 5f0c…               follow a job someone else submitted
//
// Both ways tokenpool publishes every event: the job's Redis Stream (XREAD: from the start,
// so a late joiner misses nothing) and its pub/sub channel (SUBSCRIBE: live only, so we
// subscribe first, then read what the stream already holds, and drop repeats by seq).
// Tokens go to stdout as they come; the last line is a JSON summary on stderr.
//
// Environment: REDIS_URL (redis://127.0.0.1:6379/0), TOKENPOOL_URL (http://127.0.0.1:8000),
// TOKENPOOL_KEY_PREFIX (tokenpool), MODE (pubsub, or stream for XREAD alone).
import { createClient } from "redis";

const redisUrl = process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0";
const apiUrl = process.env.TOKENPOOL_URL ?? "http://127.0.0.1:8000";
const prefix = process.env.TOKENPOOL_KEY_PREFIX ?? "tokenpool";
const mode = process.env.MODE ?? "pubsub";
const FINAL = new Set(["done", "error", "cancelled"]);

async function submit(prompt) {
  const reply = await fetch(`${apiUrl}/v1/jobs`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ kind: "generate", prompt, max_tokens: 48 }),
  });
  const body = await reply.json();
  if (reply.status !== 202) throw new Error(`submit: ${reply.status} ${JSON.stringify(body)}`);
  return body.id;
}

// Hands events on in seq order, each once, whichever way it arrived first.
function inOrder(onEvent) {
  let next = 0;
  const early = new Map();
  return (event) => {
    if (event.seq < next) return; // seen already
    early.set(event.seq, event);
    while (early.has(next)) {
      const ready = early.get(next);
      early.delete(next);
      next += 1;
      onEvent(ready);
    }
  };
}

function parse(entryId, fields) {
  return { seq: Number(entryId.split("-")[0]), ...JSON.parse(fields.event) };
}

async function viaStream(client, stream, deliver, ended) {
  let last = "0-0";
  while (!ended()) {
    const reply = await client.xRead({ key: stream, id: last }, { BLOCK: 5000, COUNT: 512 });
    for (const { messages } of reply ?? []) {
      for (const { id, message } of messages) {
        last = id;
        deliver(parse(id, message));
      }
    }
  }
}

async function viaPubSub(client, stream, channel, deliver, ended) {
  const subscriber = client.duplicate();
  await subscriber.connect();
  await subscriber.subscribe(channel, (message) => deliver(JSON.parse(message)));
  // What was published before we subscribed is in the stream.
  for (const { id, message } of await client.xRange(stream, "-", "+")) deliver(parse(id, message));
  while (!ended()) await new Promise((resolve) => setTimeout(resolve, 20));
  await subscriber.quit();
}

async function main() {
  const args = process.argv.slice(2);
  const jobId = args[0] === "--job" ? args[1] : await submit(args.join(" ") || "Once upon a time");
  const stream = `${prefix}:job:${jobId}:events`;
  const channel = `${prefix}:job:${jobId}`;
  const client = createClient({ url: redisUrl });
  await client.connect();
  const seqs = [];
  let text = "";
  let final = null;
  const deliver = inOrder((event) => {
    seqs.push(event.seq);
    if (event.type === "token") {
      text += event.text;
      process.stdout.write(event.text);
    } else if (FINAL.has(event.type)) {
      final = event.type;
    }
  });
  const ended = () => final !== null;
  if (mode === "stream") await viaStream(client, stream, deliver, ended);
  else await viaPubSub(client, stream, channel, deliver, ended);
  await client.quit();
  process.stdout.write("\n");
  console.error(JSON.stringify({ job: jobId, final, events: seqs.length, text }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
