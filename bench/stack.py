"""A throwaway tokenpool stack for benchmarks: embedded Redis, one worker, the API."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import httpx

from broker.redis_server import EmbeddedRedis
from cli.supervisor import Supervisor, die_with_parent, tokenpool_argv


def start_stack(redis_url: str, port: int, log_dir: Path, model: str = "chat",
                gpu: str = "cpu", **settings: str) -> Supervisor:
    """One worker for `model` pinned to `gpu` (an index, or cpu) and the API; `settings` are
    TOKENPOOL_* overrides."""
    env = {**os.environ, "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
           **{f"TOKENPOOL_{k.upper()}": v for k, v in settings.items()}}
    sup = Supervisor(env=env, log_dir=log_dir, preexec=die_with_parent())
    sup.add(f"worker-{model}", tokenpool_argv("worker", "--model", model, "--gpu", gpu))
    sup.add("api", tokenpool_argv("api", "--port", str(port), "--log-level", "WARNING"))
    sup.start()
    return sup


def bench_redis(data_dir: Path) -> EmbeddedRedis:
    """A started Redis without persistence that goes when the benchmark does, however it ends
    (a time limit's signal skips the benchmark's own cleanup)."""
    return EmbeddedRedis(data_dir, appendonly=False,
                         preexec=die_with_parent(signal.SIGTERM)).start()


def wait_ready(http: httpx.Client, model: str = "chat", timeout_s: float = 120,
               sup: Supervisor | None = None) -> None:
    """Until the API says `model` has a loaded worker; else an error with the end of each of
    `sup`'s logs (a stack's logs go with its temporary folder, and a GPU host's run is dear)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = http.get("/ready").json()
            if model not in ready.get("missing_workers", [model]):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    tails = []
    for child in sup.children if sup else []:
        if child.log_path and child.log_path.exists():
            lines = child.log_path.read_text(errors="replace").splitlines()[-25:]
            tails.append(f"--- {child.name} (exit {child.process and child.process.poll()}):\n"
                         + "\n".join(lines))
    raise RuntimeError("\n".join([f"the {model} worker never became ready", *tails]))


def gpu_settings(gpu: str, model: str, max_batch: int, source: str | None = None
                 ) -> dict[str, str]:
    """TOKENPOOL_* overrides that put `model` on `gpu` with `max_batch` (and, if given,
    another GGUF or model directory as its source)."""
    out = {f"models__{model}__gpu": gpu, f"models__{model}__max_batch": str(max_batch)}
    if source:
        out[f"models__{model}__source"] = source
    return out


def add_gpu_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--gpu", default="cpu",
                        help="GPU index for tokenpool's worker (and llama-server's -ngl), or cpu")
    parser.add_argument("--model", default=None, help=model_help)
