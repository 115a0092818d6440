"""Where a burst's worst time to first token goes: N jobs posted at once, then each job's
record read back.

    python -m bench.ttft [--jobs 16] [--rounds 4] [--gpu 0 --model big.gguf] [--threads 1]

For the job whose first token came last (as its client saw it, from the burst's start):
when the API created it, how long it waited for a worker to start it (`queued_s`: Celery's
delivery), and how long from its start to its first token (`ttft_s`: its start, its prompt,
the step it joins); and over all N, the spread of creation and the longest wait of each kind.
The first round warms the stack and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.record import recorded
from bench.stack import add_gpu_arguments, bench_redis, gpu_settings, start_stack, wait_ready
from broker.redis_server import free_port


async def burst(url: str, n: int, round_: int, max_tokens: int) -> tuple[float, list[tuple]]:
    limits = httpx.Limits(max_connections=4 * n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.time()

        async def one(i: int) -> tuple[str, float]:
            body = {"kind": "generate", "prompt": f"Story {100 * round_ + i}. Once upon a time",
                    "max_tokens": max_tokens, "seed": i, "temperature": 0.8,
                    "repeat_penalty": 1.0}
            job = (await client.post("/v1/jobs", json=body)).json()
            first = 0.0
            async with client.stream("GET", job["links"]["events"]) as reply:
                async for chunk in reply.aiter_raw():
                    if not first and b"event: token" in chunk:
                        first = time.time() - started
                    if b"event: done" in chunk or b"event: error" in chunk:
                        break
            return job["id"], first

        return started, await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    add_gpu_arguments(parser, "a GGUF (default: the bundled Gemma 3 270M)")
    args = parser.parse_args()
    extra = {"models__chat__n_threads": str(args.threads)} if args.threads else {}
    rows: list[tuple[float, float, float, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        sup = start_stack(redis_server.url, port, Path(tmp) / "logs", gpu=args.gpu,
                          **gpu_settings(args.gpu, "chat", max(16, args.jobs), args.model),
                          **extra)
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=60)
        try:
            wait_ready(http, sup=sup)
            for round_ in range(args.rounds + 1):
                started, done = asyncio.run(burst(url, args.jobs, round_, args.max_tokens))
                jobs = []
                for job_id, first in done:
                    record = http.get(f"/v1/jobs/{job_id}").json()
                    jobs.append((first, record["created_at"] - started,
                                 record["timings"]["queued_s"], record["timings"]["ttft_s"]))
                if round_ == 0:
                    continue  # warm-up
                worst = max(jobs)
                rows.append((*worst, max(j[1] for j in jobs), max(j[2] for j in jobs),
                             max(j[3] for j in jobs)))
        finally:
            http.close()
            sup.stop()
            redis_server.stop()
    with recorded("ttft", args.gpu):
        ms = [round(1000 * statistics.median(r[k] for r in rows)) for k in range(7)]
        print(f"ttft: {args.jobs} jobs posted at once, {args.max_tokens} tokens each, "
              f"{args.rounds} rounds (medians), on {args.gpu}")
        print(f"worst first token {ms[0]} ms: created at {ms[1]} ms, queued {ms[2]} ms, "
              f"start to first token {ms[3]} ms")
        print(f"over all jobs: created within {ms[4]} ms, longest queued {ms[5]} ms, "
              f"longest start to first token {ms[6]} ms")


if __name__ == "__main__":
    main()
