"""Schema-constrained generation: 8 constrained jobs against 8 free ones on the same worker,
and against llama-server given the same `json_schema`, side by side in one run.

    python -m bench.structured [--jobs 8] [--rounds 3] [--max-tokens 96]

Every round sends, one after the other, N free jobs and N constrained jobs to tokenpool (one
chat worker, through the API, followed over SSE) and N constrained jobs to llama-server
(`--parallel N`, its `json_schema`), all at once within a group, with new prompts each round.
A constrained answer ends when its JSON closes, a free one runs to `max_tokens`, so the rates
compared are aggregate generated tokens per second of wall time (each side's own count:
the job's usage, llama-server's `tokens_predicted`). Prints the medians and the ratios
constrained/free (target at least 0.85) and tokenpool/llama-server constrained (target at
least 1.0), and how many constrained answers were valid JSON of the schema on each side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from bench.batching import N_CTX, LlamaServer
from bench.llama_server import ensure_llama_server
from bench.record import recorded
from bench.stack import bench_redis, start_stack, wait_ready
from broker.redis_server import free_port
from broker.settings import Settings
from broker.sources import resolve

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "characters": {"type": "array", "items": {"type": "string", "maxLength": 24},
                   "maxItems": 4},
    "summary": {"type": "string", "maxLength": 240}},
    "required": ["title", "characters", "summary"], "additionalProperties": False}
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "repeat_penalty": 1.0}
SUBJECTS = ["a lighthouse", "a fox", "the sea", "a train", "a garden", "a robot", "winter",
            "a market", "the moon", "a violin", "a storm", "a library", "a bridge", "a kite"]


def prompts(round_: int, n: int) -> list[str]:
    return [f"Story {100 * round_ + i}. Describe a short story about "
            f"{SUBJECTS[i % len(SUBJECTS)]} as JSON with a title, its characters and a "
            f"summary.\n" for i in range(n)]


async def ours(client: httpx.AsyncClient, prompt: str, seed: int, max_tokens: int,
               constrained: bool) -> tuple[int, str]:
    body: dict[str, Any] = {"kind": "generate", "prompt": prompt, "max_tokens": max_tokens,
                            "seed": seed, **SAMPLING}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": SCHEMA}}
    job = (await client.post("/v1/jobs", json=body)).json()
    async with client.stream("GET", job["links"]["events"]) as reply:
        async for chunk in reply.aiter_raw():
            if b"event: done" in chunk or b"event: error" in chunk:
                break
    record = (await client.get(f"/v1/jobs/{job['id']}")).json()
    return int(record["usage"]["completion_tokens"]), str(record["result"]["text"])


async def theirs(client: httpx.AsyncClient, prompt: str, seed: int, max_tokens: int,
                 constrained: bool) -> tuple[int, str]:
    body: dict[str, Any] = {"prompt": prompt, "n_predict": max_tokens, "seed": seed,
                            "cache_prompt": True, **SAMPLING}
    if constrained:
        body["json_schema"] = SCHEMA
    reply = (await client.post("/completion", json=body)).json()
    return int(reply["tokens_predicted"]), str(reply["content"])


async def group(url: str, job: Any, texts: list[str], round_: int, max_tokens: int,
                constrained: bool) -> tuple[float, int]:
    """(tokens per second of wall time, answers valid against the schema)."""
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=4 * len(texts))) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(job(client, p, 1000 * round_ + i, max_tokens,
                                             constrained) for i, p in enumerate(texts)))
        wall = time.perf_counter() - started
    return sum(n for n, _ in results) / wall, sum(valid(text) for _, text in results)


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    settings = Settings()
    gguf = resolve(settings.models["chat"].source, settings.cache_dir)
    threads = os.cpu_count() or 1
    binary = ensure_llama_server(settings.cache_dir)
    rates: dict[str, list[float]] = {"free": [], "constrained": [], "llama-server": []}
    valids = {"constrained": 0, "llama-server": 0}
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        sup = start_stack(redis_server.url, port, Path(tmp) / "logs",
                          models__chat__n_ctx=str(N_CTX),
                          models__chat__max_batch=str(max(16, args.jobs)))
        url = f"http://127.0.0.1:{port}"
        server = LlamaServer(binary, gguf, threads, Path(tmp))
        try:
            wait_ready(httpx.Client(base_url=url, timeout=30))
            server.start(args.jobs)
            asyncio.run(group(url, ours, prompts(99, 2), 99, 8, True))  # warm both
            asyncio.run(group(server.url, theirs, prompts(99, 2), 99, 8, True))
            for r in range(args.rounds):
                texts = prompts(r, args.jobs)
                for name, target, job, constrained in (
                        ("free", url, ours, False), ("constrained", url, ours, True),
                        ("llama-server", server.url, theirs, True)):
                    rate, ok = asyncio.run(group(target, job, texts, r, args.max_tokens,
                                                 constrained))
                    rates[name].append(rate)
                    if name in valids:
                        valids[name] += ok
                print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s"
                                                       for k, v in rates.items()), flush=True)
        finally:
            server.stop()
            sup.stop()
            redis_server.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    total = args.rounds * args.jobs
    with recorded("structured"):
        print(f"\nstructured output: {args.jobs} jobs at once, {args.max_tokens} tokens at most, "
              f"{args.rounds} rounds (median), {threads} threads, {gguf.name}")
        print(f"  tokenpool free         {med['free']:8.1f} tok/s")
        print(f"  tokenpool constrained  {med['constrained']:8.1f} tok/s   valid "
              f"{valids['constrained']}/{total}")
        print(f"  llama-server json_schema {med['llama-server']:6.1f} tok/s   valid "
              f"{valids['llama-server']}/{total}")
        print(f"  constrained / free: {med['constrained'] / med['free']:.2f}x (target 0.85); "
              f"tokenpool / llama-server, constrained: "
              f"{med['constrained'] / med['llama-server']:.2f}x (target 1.0)")


if __name__ == "__main__":
    main()
