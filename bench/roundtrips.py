"""What a Redis round trip costs the queue's processes, and what sharing one saves.

    python -m bench.roundtrips [--calls 2000]

Client CPU (process time), on an embedded redis-server, side by side in one run:
- token writes: eight jobs that get a token per step, as a batch engine's, each appended with
  the fenced Lua script: by each job's own thread alone, by those threads through
  `GroupCommit` (shared pipelines), or by the engine's thread, a step's appends in one round
  trip (`EventWriter.token_later`, then `settle`);
- event reads: the API's asyncio client reading eight job streams, one XREAD per stream vs
  one XREAD for all eight (what `StreamHub` sends).
On a CPU host this CPU is taken from the model's compute threads.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from bench.stack import bench_redis
from broker.settings import Settings
from broker.store import JobStore
from workers.writer import EventWriter

THREADS = 8


def fresh_jobs(client: redis.Redis, store: JobStore) -> list[str]:
    jobs = [f"bench{i}" for i in range(THREADS)]
    for job_id in jobs:
        client.delete(store.args.keys.events(job_id))
        client.hset(store.args.keys.job(job_id), mapping={
            "status": "running", "attempts": 1, "next_seq": 0, "id": job_id})
    return jobs


def write_cpu_us(client: redis.Redis, calls: int, mode: str) -> tuple[float, float]:
    """Client CPU per token append, and appends per round trip, for eight jobs that each get
    a token per step, as a batch engine's: `alone`, each job's thread takes its token from a
    queue and appends it in a round trip of its own; `grouped`, the same threads through one
    `GroupCommit` (whoever finds no round trip under way sends what is queued); `step`, the
    engine's own thread queues the step's eight appends and sends them in one round trip (what
    a worker does since its jobs' pieces go to sinks)."""
    shared = JobStore(client, Settings())
    stores = [shared] * THREADS if mode != "alone" else \
        [JobStore(client, Settings()) for _ in range(THREADS)]
    jobs = fresh_jobs(client, shared)
    writers = [EventWriter(store, job_id, 1, 0, None, 0.0, 0.0)
               for store, job_id in zip(stores, jobs, strict=True)]
    steps = calls // THREADS
    started = time.process_time()
    if mode == "step":
        for _ in range(steps):
            for writer in writers:
                writer.token_later(" word")
            for writer in writers:
                writer.settle()
    else:
        inboxes: list[queue.SimpleQueue[str]] = [queue.SimpleQueue() for _ in writers]
        written = threading.Semaphore(0)

        def run(writer: EventWriter, inbox: queue.SimpleQueue[str]) -> None:
            for _ in range(steps):
                writer.token(inbox.get())
                written.release()

        threads = [threading.Thread(target=run, args=pair)
                   for pair in zip(writers, inboxes, strict=True)]
        for thread in threads:
            thread.start()
        for _ in range(steps):
            for inbox in inboxes:
                inbox.put(" word")
            for _ in inboxes:
                written.acquire()
        for thread in threads:
            thread.join()
    used = time.process_time() - started
    assert all(writer.next_seq == steps for writer in writers)
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
        server = bench_redis(Path(tmp) / "redis")
        try:
            client = redis.Redis.from_url(server.url)
            write_cpu_us(client, 200, "alone")  # warm: scripts loaded, connections open
            writes = {mode: [statistics.median(x) for x in zip(
                *[write_cpu_us(client, args.calls, mode) for _ in range(3)], strict=True)]
                for mode in ("alone", "grouped", "step")}
            read_alone = asyncio.run(read_cpu_us(server.url, args.calls, False))
            read_shared = asyncio.run(read_cpu_us(server.url, args.calls, True))
        finally:
            server.stop()
    alone = writes["alone"][0]
    print(f"token writes, {THREADS} jobs a token per step, client CPU per append:")
    for mode, (us, per_trip) in writes.items():
        print(f"  {mode:8} {us:6.0f} us ({alone / us:4.1f}x less than alone; "
              f"{per_trip:.1f} appends per round trip)")
    print(f"event reads, {THREADS} streams: {read_alone:.0f} us client CPU per stream with "
          f"one XREAD each, {read_shared:.0f} us in one shared XREAD "
          f"({read_alone / read_shared:.1f}x less)")


if __name__ == "__main__":
    main()
