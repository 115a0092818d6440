"""The API's shared event reader on a real redis-server: followers joining early, late and
mid-stream each get exactly their events, in order, from one XREAD shared by all of them."""

from __future__ import annotations

import asyncio
import json
import uuid

import redis.asyncio as aioredis

from broker.events import StreamedEvent, StreamHub
from broker.keys import Keys, stream_id

KEYS = Keys(f"tpevents{uuid.uuid4().hex[:6]}")
TOKENS = 30


async def write(client: aioredis.Redis, job_id: str, pause_s: float) -> None:
    """A job's events as the store writes them: seq in the entry id, a final `done`."""
    for seq in range(TOKENS + 1):
        kind = "done" if seq == TOKENS else "token"
        event = {"seq": seq, "job": job_id, "ts": 0, "type": kind, "text": f" t{seq}"}
        await client.xadd(KEYS.events(job_id), {"event": json.dumps(event)}, id=stream_id(seq))
        await asyncio.sleep(pause_s)


async def collect(hub: StreamHub, job_id: str, after: int) -> list[StreamedEvent]:
    return [e async for e in hub.follow(job_id, after, block_s=5) if e is not None]


def test_followers_of_many_streams_get_exactly_their_events_through_one_shared_read(
        redis_server):
    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        hub = StreamHub(client, KEYS)
        jobs = [uuid.uuid4().hex for _ in range(6)]
        try:
            writers = [asyncio.create_task(write(client, job_id, 0.01)) for job_id in jobs]
            early = [asyncio.create_task(collect(hub, job_id, -1)) for job_id in jobs]
            await asyncio.sleep(0.12)  # these join mid-stream, some events already written
            middle = [asyncio.create_task(collect(hub, job_id, -1)) for job_id in jobs[:3]]
            resumed = [asyncio.create_task(collect(hub, job_id, 4)) for job_id in jobs[3:]]
            await asyncio.gather(*writers)
            late = [await collect(hub, job_id, -1) for job_id in jobs[:2]]  # after the end
            return jobs, [await t for t in early], [await t for t in middle], \
                [await t for t in resumed], late, (hub.reads, hub.handed)
        finally:
            await hub.close()
            await client.aclose()

    jobs, early, middle, resumed, late, reads = asyncio.run(go())
    whole = list(range(TOKENS + 1))
    for events in [*early, *middle, *late]:
        assert [e.seq for e in events] == whole
        assert [e.type for e in events][-1] == "done"
        assert "".join(json.loads(e.data)["text"] for e in events) == \
            "".join(f" t{seq}" for seq in whole)
    for events in resumed:
        assert [e.seq for e in events] == whole[5:]
    for job_id, events in zip(jobs, early, strict=True):
        assert all(json.loads(e.data)["job"] == job_id for e in events)
    shared_reads, handed = reads
    assert handed > 2 * shared_reads > 0  # live events came through reads shared by many


def test_a_follower_waiting_on_a_quiet_stream_gets_keepalives_then_the_events(redis_server):
    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        hub = StreamHub(client, KEYS)
        job_id = uuid.uuid4().hex
        seen: list[StreamedEvent | None] = []
        try:
            async def follow():
                async for event in hub.follow(job_id, -1, block_s=0.2):
                    seen.append(event)

            task = asyncio.create_task(follow())
            await asyncio.sleep(0.7)
            await write(client, job_id, 0)
            await asyncio.wait_for(task, 10)
            return seen
        finally:
            await hub.close()
            await client.aclose()

    seen = asyncio.run(go())
    keepalives = [i for i, e in enumerate(seen) if e is None]
    assert len(keepalives) >= 2 and keepalives[-1] < len(keepalives)  # all before the events
    assert [e.seq for e in seen if e is not None] == list(range(TOKENS + 1))
