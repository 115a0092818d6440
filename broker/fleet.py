"""Worker heartbeats in Redis: written by workers, read by the API (/ready, /v1/models)."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from broker.keys import Keys


def write_heartbeat(client: redis.Redis, keys: Keys, beat: dict[str, Any], ttl_s: float,
                    retention_s: float) -> None:
    """The live beat (gone after `ttl_s` of silence) and a copy kept `retention_s` to show the
    worker as gone."""
    name, now = beat["name"], time.time()
    body = json.dumps({**beat, "ts": now})
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker(name), body, px=int(ttl_s * 1000))
    pipe.set(keys.worker_last(name), body, px=int(retention_s * 1000))
    pipe.zadd(keys.workers(), {name: now})
    if beat.get("consuming", True) and beat.get("model") and beat.get("state") != "stopped":
        # Its slots, offered to its model's fair queue (broker.fair) until the beat expires.
        pipe.zadd(keys.fair(beat["model"]) + ":slots", {slots_member(beat): now + ttl_s})
    pipe.execute()


def slots_member(beat: dict[str, Any]) -> str:
    return f"{beat['name']}|{int(beat.get('max_batch') or 1)}"


def remove_heartbeat(client: redis.Redis, keys: Keys, beat: dict[str, Any],
                     retention_s: float) -> None:
    """A clean stop: no live beat any more, and the last one says `stopped`."""
    body = json.dumps({**beat, "state": "stopped", "ts": time.time()})
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker(beat["name"]))
    pipe.set(keys.worker_last(beat["name"]), body, px=int(retention_s * 1000))
    if beat.get("model"):
        pipe.zrem(keys.fair(beat["model"]) + ":slots", slots_member(beat))
    pipe.execute()


def read_heartbeats(client: redis.Redis, keys: Keys, ttl_s: float) -> list[dict[str, Any]]:
    """Workers heard from within `ttl_s` (read only: for health checks and tools)."""
    names = cast(list[bytes], client.zrangebyscore(keys.workers(), time.time() - ttl_s, "+inf"))
    if not names:
        return []
    beats = cast(list[bytes | None], client.mget([keys.worker(n.decode()) for n in names]))
    return [json.loads(b) for b in beats if b]


async def fleet_view(client: aioredis.Redis, keys: Keys, ttl_s: float, retention_s: float,
                     ) -> list[dict[str, Any]]:
    """Every worker heard from within `retention_s`: live ones with their heartbeat, the rest
    with their last one and state `gone` (silent past `ttl_s`) or `stopped` (said goodbye)."""
    now = time.time()
    await client.zremrangebyscore(keys.workers(), "-inf", now - retention_s)
    names = [n.decode() for n in cast(list[bytes], await client.zrange(keys.workers(), 0, -1))]
    if not names:
        return []
    live = await client.mget([keys.worker(n) for n in names])
    last = await client.mget([keys.worker_last(n) for n in names])
    out = []
    for beat, final in zip(live, last, strict=True):
        if beat:
            out.append({**json.loads(beat), "live": True})
        elif final:
            body = json.loads(final)
            state = "stopped" if body.get("state") == "stopped" else "gone"
            out.append({**body, "state": state, "live": False})
    return out


async def live_workers(client: aioredis.Redis, keys: Keys, ttl_s: float) -> list[dict[str, Any]]:
    """Workers heard from within `ttl_s`; older entries are swept from the index."""
    names = cast(list[bytes], await client.zrangebyscore(keys.workers(), time.time() - ttl_s,
                                                         "+inf"))
    if not names:
        return []
    beats = await client.mget([keys.worker(n.decode()) for n in names])
    return [json.loads(b) for b in beats if b]
