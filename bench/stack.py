"""A throwaway tokenpool stack for benchmarks: embedded Redis, one worker, the API."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from cli.supervisor import Supervisor, tokenpool_argv


def start_stack(redis_url: str, port: int, log_dir: Path, model: str = "chat",
                **settings: str) -> Supervisor:
    """One worker for `model` and the API; `settings` are TOKENPOOL_* overrides."""
    env = {**os.environ, "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
           **{f"TOKENPOOL_{k.upper()}": v for k, v in settings.items()}}
    sup = Supervisor(env=env, log_dir=log_dir)
    sup.add(f"worker-{model}", tokenpool_argv("worker", "--model", model, "--gpu", "cpu"))
    sup.add("api", tokenpool_argv("api", "--port", str(port), "--log-level", "WARNING"))
    sup.start()
    return sup


def wait_ready(http: httpx.Client, model: str = "chat", timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = http.get("/ready").json()
            if model not in ready.get("missing_workers", [model]):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the {model} worker never became ready")
