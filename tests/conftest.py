"""Fixtures on real parts: a redis-server on a free loopback port, worker and API subprocesses."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
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
# Small contexts keep the real models quick: the summary model's 512 tokens force map-reduce.
TEST_CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
sse_keepalive_s = 1
max_body_bytes = 65536
[models.chat]
n_ctx = 1024
max_tokens = 256
[models.summary]
n_ctx = 512
max_tokens = 480
[models.embed]
max_texts = 8
max_text_chars = 500
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

    def wait_final(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not final after {timeout_s}s")


def wait_ready(http: httpx.Client, sup: Supervisor, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [c.name for c in sup.children if not c.alive()]
        assert not dead, f"died while starting: {dead}; logs in {sup.log_dir}"
        try:
            if http.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"stack not ready in {timeout_s}s: {http.get('/ready').text}")


@pytest.fixture(scope="session")
def stack(redis_server: EmbeddedRedis, config_file: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    sup = Supervisor(env=stack_env(redis_server.url, config_file),
                     log_dir=tmp_path_factory.mktemp("logs"))
    for model in ("chat", "summary", "embed"):
        sup.add(f"worker-{model}", tokenpool_argv("worker", "--model", model, "--gpu", "cpu"))
    sup.add("api", tokenpool_argv("api", "--port", str(port)))
    client = redis.Redis.from_url(redis_server.url)
    sup.start()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_ready(http, sup)
        yield Stack(f"http://127.0.0.1:{port}", client, Keys(PREFIX), http, sup)
    finally:
        http.close()
        sup.stop()
        client.close()
