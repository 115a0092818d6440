"""Batch summarisation: 200 documents through POST /v1/batches vs a plain in-process loop.

The loop is what a team writes without a queue: one llama-cpp-python `Llama` on the same GGUF,
each document rendered with the same summary prompt and generated one after another, greedy,
the same token budget. The batch goes through the API to one summary worker (continuous
batching, max_batch 8). Both in one run; documents/min of each and the ratio.

    python -m bench.batch [--docs 200] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.record import recorded
from bench.stack import bench_redis, start_stack, wait_ready
from broker.prompts import render_summary
from broker.redis_server import free_port
from broker.settings import Settings
from broker.sources import resolve
from workers.summarize import summary_instruction

TOPICS = ["budget", "hiring", "the release", "the outage", "customer feedback", "security",
          "the roadmap", "office moves", "training", "the audit"]


def documents(n: int) -> list[str]:
    """Meeting notes of a few hundred tokens each, all different."""
    return [" ".join(f"Note {i}.{j}: the team discussed {TOPICS[(i + j) % len(TOPICS)]}; "
                     f"{j + 2} actions were agreed and owner {chr(65 + (i * j) % 26)} will "
                     f"report back by day {(i + j) % 28 + 1}." for j in range(8))
            for i in range(n)]


def in_process(docs: list[str], max_tokens: int, settings: Settings) -> float:
    from llama_cpp import Llama

    spec = settings.models["summary"]
    llm = Llama(str(resolve(spec.source, settings.cache_dir)), n_ctx=spec.n_ctx,
                verbose=False)
    instruction = summary_instruction(None)
    started = time.perf_counter()
    for doc in docs:
        prompt = render_summary(instruction, doc, spec.chat_format)
        llm.create_completion(prompt.text, max_tokens=max_tokens, temperature=0.0)
    elapsed = time.perf_counter() - started
    llm.close()
    return len(docs) / elapsed * 60


def through_api(url: str, docs: list[str], max_tokens: int) -> float:
    body = {"kind": "summarize", "options": {"max_tokens": max_tokens, "temperature": 0},
            "items": [{"id": f"doc-{i}", "text": doc} for i, doc in enumerate(docs)]}
    with httpx.Client(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        batch_id = http.post("/v1/batches", json=body).json()["id"]
        lines = http.get(f"/v1/batches/{batch_id}/results").text.splitlines()
        elapsed = time.perf_counter() - started
    ok = sum(json.loads(line)["status"] == "succeeded" for line in lines)
    assert ok == len(docs), f"only {ok} of {len(docs)} succeeded"
    return len(docs) / elapsed * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-chunk", type=int, default=None,
                        help="the summary model's prompt_chunk_tokens for this run")
    parser.add_argument("--api-only", action="store_true", help="skip the in-process loop")
    args = parser.parse_args()
    settings = Settings()
    docs = documents(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        overrides = ({"models__summary__prompt_chunk_tokens": str(args.prompt_chunk)}
                     if args.prompt_chunk else {})
        sup = start_stack(server.url, port, Path(tmp) / "logs", model="summary", **overrides)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(httpx.Client(base_url=url, timeout=30), model="summary")
            through_api(url, documents(4), args.max_tokens)  # warm up
            api_rate = through_api(url, docs, args.max_tokens)
        finally:
            sup.stop()
            server.stop()
    if args.api_only:
        print(f"tokenpool: {api_rate:.1f} documents/min")
        return
    loop_rate = in_process(docs, args.max_tokens, settings)
    with recorded("batch"):
        print(f"batch summarisation: {args.docs} documents, max_tokens {args.max_tokens}, greedy")
        print(f"in-process loop (llama-cpp-python, one at a time): {loop_rate:.1f} documents/min")
        print(f"tokenpool POST /v1/batches (one summary worker):   {api_rate:.1f} documents/min")
        print(f"ratio tokenpool / loop: {api_rate / loop_rate:.2f}")
        print(json.dumps({"docs_per_min_loop": round(loop_rate, 1),
                          "docs_per_min_tokenpool": round(api_rate, 1),
                          "ratio": round(api_rate / loop_rate, 3)}))


if __name__ == "__main__":
    main()
