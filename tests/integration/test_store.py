"""The job store's scripts on a real redis-server: fencing, idempotent retries, requeue."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.messages import TokenEvent
from broker.settings import Settings
from broker.store import AsyncJobStore, JobStore

SETTINGS = Settings(key_prefix="tpstore", max_attempts=2)
KEYS = Keys("tpstore")


@pytest.fixture
def store(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield JobStore(client, SETTINGS)
    client.close()


def create(url, **fields):
    async def go():
        client = aioredis.Redis.from_url(url)
        try:
            job_id = uuid.uuid4().hex
            record = {"kind": "generate", "model": "chat", "request": {"priority": 5},
                      "timeout_s": "60.0", **fields}
            await AsyncJobStore(client, SETTINGS).create(job_id, record)
            return job_id
        finally:
            await client.aclose()
    return asyncio.run(go())


def events(store, job_id):
    return [json.loads(f[b"event"]) for _, f in store.redis.xrange(KEYS.events(job_id))]


def test_a_retried_append_whose_reply_was_lost_writes_nothing_twice(store, redis_server):
    job_id = create(redis_server.url)
    started = store.start(job_id, "w1", 1, "t1")
    assert started.attempt == 1 and started.next_seq == 2
    first = store.append(job_id, TokenEvent(job=job_id, text="a"), 1, 2)
    again = store.append(job_id, TokenEvent(job=job_id, text="a"), 1, 2)  # the retry
    assert first.seq == again.seq == 2 and not again.refused
    assert [e["seq"] for e in events(store, job_id)] == [0, 1, 2]


def test_a_retried_start_gets_the_same_attempt_and_a_stale_delivery_none(store, redis_server):
    job_id = create(redis_server.url)
    assert store.start(job_id, "w1", 1, "t1").attempt == 1
    assert store.start(job_id, "w1", 1, "t1").attempt == 1  # same token: a retry
    assert store.start(job_id, "w2", 1, "t2") is None  # a redelivery while it runs
    assert store.start(job_id, "w2", 2, "t3") is None  # a dispatch that was never made
    assert [e["type"] for e in events(store, job_id)] == ["queued", "started"]


def test_a_requeued_job_refuses_the_old_attempt_and_takes_only_the_new_dispatch(store,
                                                                               redis_server):
    job_id = create(redis_server.url)
    store.start(job_id, "w1", 1, "t1")
    store.append(job_id, TokenEvent(job=job_id, text="Hello"), 1, 2)
    assert store.running()[job_id] == "w1"
    assert store.requeue(job_id, "w1", 1, 2, "worker w1 stopped sending heartbeats") == (
        "requeued", 2)
    assert job_id not in store.running()
    assert store.append(job_id, TokenEvent(job=job_id, text="late"), 1, 3).refused
    assert store.start(job_id, "w1", 1, "t4") is None  # the old message, redelivered
    second = store.start(job_id, "w2", 2, "t5")
    assert second.attempt == 2
    assert store.published_text(job_id) == "Hello"
    assert store.finish(job_id, TokenEvent(job=job_id, text="x"), "succeeded", 1) == -1
    kinds = [(e["type"], e.get("attempt")) for e in events(store, job_id)]
    assert kinds == [("queued", None), ("started", 1), ("token", None), ("requeued", 1),
                     ("started", 2)]


def test_the_last_allowed_attempt_lost_ends_the_job_failed_and_dead_lettered(store,
                                                                            redis_server):
    job_id = create(redis_server.url)
    store.start(job_id, "w1", 1, "t1")
    store.requeue(job_id, "w1", 1, 2, "lost")
    store.start(job_id, "w2", 2, "t2")
    assert store.requeue(job_id, "w2", 2, 2, "lost again") == ("dead", 0)
    record = store.get(job_id)
    assert record["status"] == "failed" and record["error"]["type"] == "worker_lost"
    assert store.redis.zscore(KEYS.dead_letters(), job_id) is not None
    assert events(store, job_id)[-1]["type"] == "error"
    assert store.requeue(job_id, "w2", 2, 2, "twice") == ("skip", 0)
