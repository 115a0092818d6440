"""Fixtures on real parts: a redis-server on a free loopback port, worker and API subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker.keys import Keys
from broker.messages import FINAL_TYPES
from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import Supervisor, tokenpool_argv

PREFIX = "tptest"


def chat_only_config(prefix: str, n_ctx: int = 512, max_tokens: int = 32, extra: str = "") -> str:
    """A config with just the chat model, quick heartbeats and its own key prefix."""
    return (f'key_prefix = "{prefix}"\nheartbeat_interval_s = 0.5\nheartbeat_ttl_s = 3\n{extra}'
            f"[models.chat]\nn_ctx = {n_ctx}\nmax_tokens = {max_tokens}\n"
            "[models.summary]\nenabled = false\n[models.embed]\nenabled = false\n")


# Small contexts keep the real models quick: the summary model's 512 tokens force map-reduce.
TEST_CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
sse_keepalive_s = 1
max_body_bytes = 65536
visibility_timeout_s = 10
[models.chat]
n_ctx = 1024
max_tokens = 256
[models.summary]
n_ctx = 512
max_tokens = 480
[models.embed]
max_texts = 8
max_text_chars = 500
[models.fast]  # without batch invariance: a unified KV cache, llama.cpp's fastest kernels
kind = "llm"
source = "bundled:gemma3-270m"
n_ctx = 512
max_tokens = 64
batch_invariant = false
"""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tokenpool.toml"
    path.write_text(TEST_CONFIG)
    return path


def stack_env(redis_url: str, config_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    return {**env, "REDIS_URL": redis_url, "TOKENPOOL_CONFIG": str(config_file),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def follow(url: str, job_id: str, timeout_s: float = 180) -> list[dict[str, Any]]:
    """SSE events until the final one, reconnecting with Last-Event-ID whenever the
    connection drops (an API or a Redis restart), as a browser's EventSource does."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=60)) as http:
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": str(out[-1]["seq"])} if out else {}
            try:
                with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
                    if reply.status_code != 200:
                        time.sleep(0.3)
                        continue
                    for line in reply.iter_lines():
                        if line.startswith("data: "):
                            out.append(json.loads(line[len("data: "):]))
                            if out[-1]["type"] in FINAL_TYPES:
                                return out
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    raise AssertionError(f"job {job_id}: no final event in {timeout_s}s; got {out[-3:]}")


@dataclass
class Stack:
    url: str
    redis: redis.Redis
    keys: Keys
    http: httpx.Client
    supervisor: Supervisor

    def submit(self, body: dict[str, Any], **headers: str) -> str:
        reply = self.http.post("/v1/jobs", json=body, headers=headers)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.http.get(f"/v1/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def events(self, job_id: str, stop_after_seq: int | None = None,
               **headers: str) -> list[dict[str, Any]]:
        """SSE events until the final one (or until seq `stop_after_seq`, then disconnect)."""
        out: list[dict[str, Any]] = []
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                              timeout=120) as reply:
            assert reply.status_code == 200, reply.read()
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                out.append(event)
                if event["type"] in FINAL_TYPES or event["seq"] == stop_after_seq:
                    break
        return out

    def follow(self, job_id: str, timeout_s: float = 180) -> list[dict[str, Any]]:
        return follow(self.url, job_id, timeout_s)

    def stream(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events as stored in its Redis Stream."""
        return [json.loads(f[b"event"]) for _, f in self.redis.xrange(self.keys.events(job_id))]

    def wait_final(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not final after {timeout_s}s")


def api_ready(http: httpx.Client) -> bool:
    return http.get("/ready").status_code == 200


def wait_ready(http: httpx.Client, sup: Supervisor, timeout_s: float = 180,
               ready: Callable[[httpx.Client], bool] | None = None) -> None:
    ready = ready or api_ready
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [c.name for c in sup.children if not c.alive()]
        assert not dead, f"died while starting: {dead}; logs in {sup.log_dir}"
        try:
            if ready(http):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"stack not ready in {timeout_s}s: {http.get('/ready').text}")


@contextlib.contextmanager
def running_stack(redis_url: str, config_file: Path, log_dir: Path,
                  workers: dict[str, str], prefix: str = PREFIX,
                  ready: Callable[[httpx.Client], bool] | None = None,
                  env: dict[str, dict[str, str]] | None = None) -> Iterator[Stack]:
    """Worker subprocesses (name -> model) and an API subprocess against `redis_url`;
    `env` adds variables to named workers."""
    port = free_port()
    sup = Supervisor(env=stack_env(redis_url, config_file), log_dir=log_dir, restart_delay_s=0.2)
    for name, model in workers.items():
        sup.add(name, tokenpool_argv("worker", "--model", model, "--gpu", "cpu"),
                (env or {}).get(name))
    sup.add("api", tokenpool_argv("api", "--port", str(port)))
    client = redis.Redis.from_url(redis_url)
    sup.start()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_ready(http, sup, ready=ready)
        yield Stack(f"http://127.0.0.1:{port}", client, Keys(prefix), http, sup)
    finally:
        http.close()
        sup.stop()
        client.close()


@pytest.fixture(scope="session")
def stack(redis_server: EmbeddedRedis, config_file: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workers = {f"worker-{model}": model for model in ("chat", "summary", "embed", "fast")}
    with running_stack(redis_server.url, config_file, tmp_path_factory.mktemp("logs"),
                       workers) as running:
        yield running
