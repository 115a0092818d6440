"""Worker heartbeats in Redis: written by workers, read by the API (/ready, /v1/models)."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from broker.keys import Keys


def write_heartbeat(client: redis.Redis, keys: Keys, beat: dict[str, Any], ttl_s: float) -> None:
    name, now = beat["name"], time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker(name), json.dumps({**beat, "ts": now}), px=int(ttl_s * 1000))
    pipe.zadd(keys.workers(), {name: now})
    pipe.execute()


def remove_heartbeat(client: redis.Redis, keys: Keys, name: str) -> None:
    client.delete(keys.worker(name))
    client.zrem(keys.workers(), name)


def read_heartbeats(client: redis.Redis, keys: Keys, ttl_s: float) -> list[dict[str, Any]]:
    """Workers heard from within `ttl_s` (read only: for health checks and tools)."""
    names = cast(list[bytes], client.zrangebyscore(keys.workers(), time.time() - ttl_s, "+inf"))
    if not names:
        return []
    beats = cast(list[bytes | None], client.mget([keys.worker(n.decode()) for n in names]))
    return [json.loads(b) for b in beats if b]


async def live_workers(client: aioredis.Redis, keys: Keys, ttl_s: float) -> list[dict[str, Any]]:
    """Workers heard from within `ttl_s`; older entries are swept from the index."""
    cutoff = time.time() - ttl_s
    await client.zremrangebyscore(keys.workers(), "-inf", cutoff)
    names = cast(list[bytes], await client.zrange(keys.workers(), 0, -1))
    if not names:
        return []
    beats = await client.mget([keys.worker(n.decode()) for n in names])
    return [json.loads(b) for b in beats if b]
