"""What a Redis round trip costs the queue's processes, and what sharing one saves.

    python -m bench.roundtrips [--calls 2000]

Client CPU (process time), on an embedded redis-server, side by side in one run:
- token writes: eight threads, as a worker's batched jobs, each appending events to its own
  job with the fenced Lua script, each call alone vs through `GroupCommit` (shared pipelines);
- event reads: the API's asyncio client reading eight job streams, one XREAD per stream vs
  one XREAD for all eight (what `StreamHub` sends).
On a CPU host this CPU is taken from the model's compute threads.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from broker.messages import TokenEvent
from broker.redis_server import EmbeddedRedis
from broker.settings import Settings
from broker.store import JobStore

THREADS = 8


def write_cpu_us(client: redis.Redis, calls: int, shared: bool) -> tuple[float, float]:
    """Client CPU per append, eight threads appending at once, and appends per round trip.
    Alone, each thread has a store of its own, so its calls never find company."""
    jobs = [f"bench{i}" for i in range(THREADS)]
    stores = [JobStore(client, Settings())] * THREADS if shared else \
        [JobStore(client, Settings()) for _ in jobs]
    for job_id in jobs:
        client.delete(stores[0].args.keys.events(job_id))
        client.hset(stores[0].args.keys.job(job_id), mapping={
            "status": "running", "attempts": 1, "next_seq": 0, "id": job_id})

    def run(store: JobStore, job_id: str) -> None:
        for seq in range(calls // THREADS):
            store.append(job_id, TokenEvent(job=job_id, text=" word"), 1, seq)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(stores, jobs, strict=True)]
    started = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    used = time.process_time() - started
    trips = sum(store.appends.round_trips for store in set(stores))
    return used / calls * 1e6, calls / trips


async def read_cpu_us(url: str, calls: int, shared: bool) -> float:
    """Client CPU per stream read, eight streams."""
    client = aioredis.Redis.from_url(url)
    streams = {f"benchread{i}": "0-0" for i in range(THREADS)}
    for name in streams:
        await client.delete(name)
        await client.xadd(name, {"event": "x" * 100}, id="1-1")
    started = time.process_time()
    for _ in range(calls // THREADS):
        if shared:
            await client.xread(dict(streams), count=512)
        else:
            for name, last in streams.items():
                await client.xread({name: last}, count=512)
    used = time.process_time() - started
    await client.aclose()
    return used / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", appendonly=False).start()
        try:
            client = redis.Redis.from_url(server.url)
            write_cpu_us(client, 200, shared=False)  # warm: scripts loaded, connections open
            alone = statistics.median([write_cpu_us(client, args.calls, False)[0]
                                       for _ in range(3)])
            grouped, per_trip = (statistics.median(x) for x in zip(
                *[write_cpu_us(client, args.calls, True) for _ in range(3)], strict=True))
            read_alone = asyncio.run(read_cpu_us(server.url, args.calls, False))
            read_shared = asyncio.run(read_cpu_us(server.url, args.calls, True))
        finally:
            server.stop()
    print(f"token writes, {THREADS} threads: {alone:.0f} us client CPU per append alone, "
          f"{grouped:.0f} us with GroupCommit ({alone / grouped:.1f}x less; "
          f"{per_trip:.1f} appends per round trip)")
    print(f"event reads, {THREADS} streams: {read_alone:.0f} us client CPU per stream with "
          f"one XREAD each, {read_shared:.0f} us in one shared XREAD "
          f"({read_alone / read_shared:.1f}x less)")


if __name__ == "__main__":
    main()
