"""Embedding micro-batching: 1,000 single-text jobs through the API vs one direct `encode`.

    python -m bench.embeddings [--jobs 1000] [--rounds 2]

The same kind of texts, alternating, in one run: sentence-transformers' batched `encode` in
this process, and `--jobs` embed jobs of one text each submitted at once through the API to
one embedding worker (its micro-batcher gathers concurrent jobs into shared encode calls),
once as one `POST /v1/jobs/batch` and once as one POST per job. A pub/sub subscriber counts
the final events. Prints texts/s of each and the ratios to the direct encode.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from bench.record import recorded
from bench.stack import add_gpu_arguments, bench_redis, gpu_settings, start_stack, wait_ready
from broker.redis_server import free_port
from broker.settings import Settings
from broker.sources import resolve

WORDS = ["ship", "harbour", "storm", "lantern", "garden", "violin", "market", "river", "bridge",
         "kite", "winter", "baker", "library", "robot", "fox", "moon", "train", "sea"]


def texts(n: int, round_: int) -> list[str]:
    return [f"{round_}-{i}: the {WORDS[i % len(WORDS)]} and the {WORDS[(i * 7) % len(WORDS)]} "
            f"met at dawn near the {WORDS[(i * 3) % len(WORDS)]}" for i in range(n)]


Submit = Callable[[httpx.AsyncClient, list[str]], Awaitable[set[str]]]


def direct(model, batch: list[str]) -> float:
    started = time.perf_counter()
    model.encode(batch, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    return len(batch) / (time.perf_counter() - started)


async def post_once(client: httpx.AsyncClient, body: dict[str, object], key: str) -> str:
    """POST a job, retrying a dropped connection under the same Idempotency-Key."""
    for attempt in range(5):
        try:
            reply = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            return str(reply.json()["id"])
        except httpx.TransportError:
            await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"{key}: the API kept dropping the connection")


async def submit_each(client: httpx.AsyncClient, batch: list[str]) -> set[str]:
    ids = await asyncio.gather(*(
        post_once(client, {"kind": "embed", "texts": [text]},
                  "bench-" + hashlib.sha1(text.encode()).hexdigest())
        for text in batch))
    return set(ids)


async def submit_batch(client: httpx.AsyncClient, batch: list[str]) -> set[str]:
    jobs = [{"kind": "embed", "texts": [text]} for text in batch]
    reply = await client.post("/v1/jobs/batch", json={"jobs": jobs})
    return {job["id"] for job in reply.json()["data"]}


async def through_api(url: str, redis_url: str, prefix: str, batch: list[str],
                      submit: Submit) -> float:
    """Submit every job at once; count final events as a pub/sub subscriber sees them."""
    subscriber = aioredis.Redis.from_url(redis_url)
    pubsub = subscriber.pubsub()
    await pubsub.psubscribe(f"{prefix}:job:*")
    limits = httpx.Limits(max_connections=64)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            started = time.perf_counter()
            pending = await submit(client, batch)
            while pending:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
                if message is None:
                    continue
                event = json.loads(message["data"])
                if event["type"] in ("done", "error", "cancelled"):
                    assert event["type"] == "done", event
                    pending.discard(event["job"])
            return len(batch) / (time.perf_counter() - started)
    finally:
        await pubsub.aclose()
        await subscriber.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the embed worker's max_batch (default: the setting's)")
    add_gpu_arguments(parser, "a sentence-transformers directory (default: bundled MiniLM)")
    args = parser.parse_args()
    if args.gpu != "cpu":  # the direct side sees the same one GPU as the worker
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    from sentence_transformers import SentenceTransformer

    settings = Settings()
    spec = settings.models["embed"]
    max_batch = args.max_batch or spec.max_batch
    source = args.model or str(resolve(spec.source, settings.cache_dir))
    model = SentenceTransformer(source, device="cpu" if args.gpu == "cpu" else "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        sup = start_stack(server.url, port, Path(tmp) / "logs", model="embed", gpu=args.gpu,
                          **gpu_settings(args.gpu, "embed", max_batch, args.model))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(httpx.Client(base_url=url, timeout=30), model="embed", sup=sup)
            asyncio.run(through_api(url, server.url, settings.key_prefix, texts(16, 99),
                                    submit_batch))
            direct(model, texts(16, 99))
            each, batched, theirs = [], [], []
            for r in range(args.rounds):
                theirs.append(direct(model, texts(args.jobs, r)))
                batched.append(asyncio.run(through_api(
                    url, server.url, settings.key_prefix, texts(args.jobs, 100 + r),
                    submit_batch)))
                each.append(asyncio.run(through_api(
                    url, server.url, settings.key_prefix, texts(args.jobs, 200 + r),
                    submit_each)))
        finally:
            sup.stop()
            server.stop()
    base = statistics.median(theirs)
    one, many = statistics.median(batched), statistics.median(each)
    with recorded("embeddings", args.gpu):
        print(f"embeddings: {args.jobs} single-text jobs, {args.rounds} rounds (median), "
              f"max_batch {max_batch}, batch_wait_ms {spec.batch_wait_ms:g}, "
              f"{'CPU' if args.gpu == 'cpu' else f'GPU {args.gpu}'}")
        print(f"direct encode {base:.0f} texts/s")
        print(f"tokenpool, one POST /v1/jobs/batch: {one:.0f} texts/s, ratio {one / base:.3f} "
              f"(target >= 0.5)")
        print(f"tokenpool, one POST per job:        {many:.0f} texts/s, ratio {many / base:.3f}")
        print(json.dumps({"ratio_batch_post": round(one / base, 3),
                          "ratio_post_per_job": round(many / base, 3), "direct": round(base)}))


if __name__ == "__main__":
    main()
