"""What the queue costs: greedy generation in-process vs through API + Celery + Redis + SSE.

    python -m bench.overhead [--runs 7] [--max-tokens 256] [--gpu 0 --model big.gguf]

Both sides run the same prompts (different per run, so neither gets a free prompt-cache hit),
interleaved, on the same GGUF and thread count. Prints p50 decode tokens/s of both, their ratio,
and the time to first token each side sees (request sent -> first token), p50, and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.record import recorded
from bench.stack import add_gpu_arguments, bench_redis, gpu_settings, start_stack, wait_ready
from broker.redis_server import free_port
from broker.settings import Settings
from broker.sources import resolve

# Identical sampling on both sides: greedy, no repeat penalty (llama-cpp-python's defaults).
SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
PROMPTS = [f"Chapter {i}. The old lighthouse keeper looked at the sea and" for i in range(1, 40)]


@dataclass
class Run:
    ttft_s: float
    tokens: int
    decode_s: float  # first token -> last token

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / self.decode_s


def in_process(llm, prompt: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    stamps = []
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, stream=True, **SAMPLING):
        stamps.append(time.perf_counter())
    return Run(stamps[0] - started, len(stamps), stamps[-1] - stamps[0])


def through_queue(http: httpx.Client, prompt: str, max_tokens: int) -> Run:
    body = {"kind": "generate", "prompt": prompt, "max_tokens": max_tokens, **SAMPLING}
    started = time.perf_counter()
    job = http.post("/v1/jobs", json=body).json()
    stamps: list[float] = []
    # A lean client: a timestamp per token counted in each chunk as it arrives, no line parsing
    # (on a 2-core box a heavy client's CPU would come out of the decode it is measuring).
    with http.stream("GET", job["links"]["events"]) as reply:
        for chunk in reply.iter_raw():
            now = time.perf_counter()
            stamps += [now] * chunk.count(b"event: token")
            if b"event: done" in chunk:
                break
    usage = http.get(job["links"]["self"]).json()["usage"]
    return Run(stamps[0] - started, usage["completion_tokens"], stamps[-1] - stamps[0])


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=256)
    add_gpu_arguments(parser, "a GGUF for both sides (default: the bundled Gemma 3 270M)")
    args = parser.parse_args()
    if args.gpu != "cpu":  # the in-process side sees the same one GPU as the worker
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    from llama_cpp import Llama

    settings = Settings()
    spec = settings.models["chat"]
    path = Path(args.model) if args.model else resolve(spec.source, settings.cache_dir)
    args.gguf_name = "Gemma 3 270M Q4_K_M" if args.model is None else path.name
    threads = args.threads = spec.n_threads or os.cpu_count() or 1
    llm = Llama(str(path), n_ctx=spec.n_ctx, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=0 if args.gpu == "cpu" else -1, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        sup = start_stack(server.url, port, Path(tmp) / "logs", gpu=args.gpu,
                          **gpu_settings(args.gpu, "chat", spec.max_batch, args.model))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        try:
            wait_ready(http, sup=sup)
            through_queue(http, "Warm up.", 8)
            in_process(llm, "Warm up.", 8)
            local, queued = [], []
            for i in range(args.runs):
                local.append(in_process(llm, PROMPTS[2 * i], args.max_tokens))
                queued.append(through_queue(http, PROMPTS[2 * i], args.max_tokens))
        finally:
            http.close()
            sup.stop()
            server.stop()
    with recorded("overhead", args.gpu):
        report(local, queued, args)


def report(local: list[Run], queued: list[Run], args: argparse.Namespace) -> None:
    rate_l, rate_q = p50([r.rate for r in local]), p50([r.rate for r in queued])
    ttft_l, ttft_q = p50([r.ttft_s for r in local]), p50([r.ttft_s for r in queued])
    print(f"overhead: greedy generation, max_tokens {args.max_tokens}, {args.runs} runs each, "
          f"interleaved; {args.gguf_name}, {args.threads} llama.cpp threads")
    print(f"{'':28}{'in-process':>14}{'tokenpool':>14}")
    print(f"{'tokens per run (p50)':28}{p50([r.tokens for r in local]):>14.0f}"
          f"{p50([r.tokens for r in queued]):>14.0f}")
    print(f"{'decode tokens/s (p50)':28}{rate_l:>14.1f}{rate_q:>14.1f}")
    print(f"{'time to first token p50 ms':28}{ttft_l * 1000:>14.1f}{ttft_q * 1000:>14.1f}")
    print(f"ratio tokens/s (tokenpool / in-process): {rate_q / rate_l:.3f}   (target >= 0.95)")
    print(f"added time to first token, p50: {(ttft_q - ttft_l) * 1000:.1f} ms   (target <= 15 ms)")
    print(json.dumps({"ratio": round(rate_q / rate_l, 3),
                      "added_ttft_ms": round((ttft_q - ttft_l) * 1000, 1)}))


if __name__ == "__main__":
    main()
