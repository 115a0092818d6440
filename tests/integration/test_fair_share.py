"""Fair share between API keys on a stack of its own: one chat worker (8 slots), keys
created in Redis, jobs submitted over HTTP, and when each job started and ended read from its
record. The bound we guarantee (docs/fair-share.md): once a key has jobs waiting at a
priority, its n-th job is sent to Celery within n * W / w_key sends of that priority (W: the
weights waiting there), plus one per other key for ties, behind the messages already sent (at
most the model's slots)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker.apikeys import KeyStore
from broker.keys import Keys
from broker.redis_server import EmbeddedRedis
from tests.conftest import Stack, running_stack

PREFIX = "tpfairshare"
SLOTS = 8  # one chat worker of max_batch 8 (two would share these 2 cores, each slower)
KEYS = {"team-a": 1.0, "team-b": 1.0, "heavy": 3.0, "light": 1.0, "kill-a": 1.0, "kill-b": 1.0}
TOKENS: dict[str, str] = {}
SMALL = {"kind": "generate", "model": "chat", "prompt": "Hi", "max_tokens": 3,
         "temperature": 0.0}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fair") / "tokenpool.toml"
    path.write_text(f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
max_batch_jobs = 1000
[models.chat]
n_ctx = 256
max_tokens = 16
[models.summary]
enabled = false
[models.embed]
enabled = false
""")
    return path


@pytest.fixture(scope="module")
def fair(redis_server: EmbeddedRedis, config: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def both(http: httpx.Client) -> bool:
        workers = http.get("/v1/workers", headers=admin).json()["data"]
        return sum(w.get("state") == "loaded" for w in workers) == 1

    client = redis.Redis.from_url(redis_server.url)
    for name, weight in KEYS.items():  # before the API starts: it is open while no key exists
        _, TOKENS[name] = KeyStore(client, Keys(PREFIX)).create(name, weight=weight)
    _, ops = KeyStore(client, Keys(PREFIX)).create("ops", scopes=("admin",))
    admin = {"Authorization": f"Bearer {ops}"}
    client.close()
    workers = {"w-chat": "chat"}
    with running_stack(redis_server.url, config, tmp_path_factory.mktemp("fair-logs"),
                       workers, prefix=PREFIX, ready=both) as stack:
        stack.http.headers.update(admin)
        yield stack


def new_key(stack: Stack, name: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=60,
                        headers={"Authorization": f"Bearer {TOKENS[name]}"})


def submit(client: httpx.Client, n: int, **body: Any) -> list[str]:
    reply = client.post("/v1/jobs/batch", json={"jobs": [{**SMALL, **body}] * n})
    assert reply.status_code == 202, reply.text
    return [job["id"] for job in reply.json()["data"]]


def records(stack: Stack, ids: list[str], timeout_s: float = 300) -> dict[str, dict[str, Any]]:
    """Each job's status, start and end, once every one has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        pipe = stack.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(stack.keys.job(job_id), "status", "started_at", "finished_at")
        rows = pipe.execute()
        if all(status in (b"succeeded", b"failed", b"cancelled") for status, _, _ in rows):
            return {job_id: {"status": status.decode(), "started_at": float(start or 0),
                             "finished_at": float(end or 0)}
                    for job_id, (status, start, end) in zip(ids, rows, strict=True)}
        assert time.monotonic() < deadline, "jobs not ended in time"
        time.sleep(0.2)


def drained(stack: Stack) -> None:
    """Nothing left behind: no job counted as sent, no line, nothing waiting."""
    base = stack.keys.fair("chat")
    deadline = time.monotonic() + 10
    while stack.redis.scard(base + ":out") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.redis.scard(base + ":out") == 0
    assert [k for k in stack.redis.scan_iter(match=f"{base}:l:*")] == []
    assert stack.redis.zcard(stack.keys.waiting("chat")) == 0


def test_a_second_key_does_not_wait_behind_the_first_keys_backlog(fair: Stack) -> None:
    with new_key(fair, "team-a") as a, new_key(fair, "team-b") as b:
        backlog(fair, a, b)


def backlog(fair: Stack, a: httpx.Client, b: httpx.Client) -> None:
    a_ids = submit(a, 200)
    time.sleep(0.5)  # A's backlog is running
    b_ids = submit(b, 20)
    a_last_job, b_first_job = a.get(f"/v1/jobs/{a_ids[-1]}").json(), \
        b.get(f"/v1/jobs/{b_ids[0]}").json()
    assert a_last_job["status"] == "queued", a_last_job
    a_last_position = a_last_job["queue"]["position"]
    done = records(fair, a_ids + b_ids)
    assert all(r["status"] == "succeeded" for r in done.values())
    a_order = sorted(a_ids, key=lambda j: done[j]["finished_at"])
    b_last_end = max(done[j]["finished_at"] for j in b_ids)
    assert b_last_end < done[a_order[99]]["finished_at"]  # the bound, with room
    # The guaranteed bound: after B queued, at most SLOTS (already sent) + 20 + 1 (ties) of
    # A's jobs start before B's last one.
    b_submitted = min(fair.redis.hget(fair.keys.job(j), "created_at") and
                      float(fair.redis.hget(fair.keys.job(j), "created_at")) for j in b_ids)
    b_last_start = max(done[j]["started_at"] for j in b_ids)
    a_between = sum(b_submitted < done[j]["started_at"] < b_last_start for j in a_ids)
    assert a_between <= SLOTS + 20 + 1, a_between
    # Queue positions follow the rule: B's first job is near the front, A's last far back.
    if b_first_job["status"] == "queued":
        assert b_first_job["queue"]["position"] <= SLOTS + 1
    assert a_last_position > 100
    drained(fair)


def test_weights_3_to_1_give_about_3_to_1_of_the_slots(fair: Stack) -> None:
    with new_key(fair, "heavy") as heavy, new_key(fair, "light") as light:
        heavy_ids = submit(heavy, 150)
        light_ids = submit(light, 150)
    done = records(fair, heavy_ids + light_ids)
    light_submitted = min(float(fair.redis.hget(fair.keys.job(j), "created_at"))
                          for j in light_ids)
    order = sorted(heavy_ids + light_ids, key=lambda j: done[j]["started_at"])
    after = [j for j in order if done[j]["started_at"] > light_submitted]
    window = after[SLOTS:SLOTS + 120]  # past what was sent before light queued; both waiting
    share = sum(j in set(heavy_ids) for j in window) / len(window)
    assert 0.68 <= share <= 0.82, share  # 0.75 by the rule; start order jitters a little
    drained(fair)


def test_a_worker_sigkilled_while_jobs_are_being_dispatched_loses_nothing(fair: Stack) -> None:
    with new_key(fair, "kill-a") as a, new_key(fair, "kill-b") as b:
        ids = submit(a, 80, max_tokens=12) + submit(b, 80, max_tokens=12)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        for worker in fair.http.get("/v1/workers").json()["data"]:
            if worker.get("live") and len(worker.get("jobs") or []) >= 4:
                victim = worker
                break
        time.sleep(0.05)
    assert victim is not None, "no worker got busy"
    os.kill(int(victim["pid"]), signal.SIGKILL)
    time.sleep(1)
    assert fair.supervisor.restart_dead() == ["w-chat"]  # as `tokenpool up` would
    done = records(fair, ids, timeout_s=300)
    assert all(r["status"] == "succeeded" for r in done.values()), \
        {j: r["status"] for j, r in done.items() if r["status"] != "succeeded"}
    for job_id in ids[::10]:  # streamed tokens still equal the stored result
        job = fair.job(job_id)
        text = "".join(e["text"] for e in fair.stream(job_id) if e["type"] == "token")
        assert text == job["result"]["text"]
    assert sum(int(fair.redis.hget(fair.keys.job(j), "attempts") or 0) > 1 for j in ids) >= 4
    drained(fair)
