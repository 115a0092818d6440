"""The queue's order and the start estimate, as pure logic."""

from __future__ import annotations

from api.queueing import Capacity
from broker.store import wait_score


def test_higher_priority_comes_first_then_the_older_job() -> None:
    now = 1_796_000_000.0
    assert wait_score(9, now + 60) < wait_score(5, now) < wait_score(5, now + 0.001)
    assert wait_score(0, now) < 2**53  # exact in a Redis sorted-set score (a double)


def test_a_job_starts_at_once_while_slots_are_free_then_at_the_rate_slots_free_up() -> None:
    room = Capacity(slots=8, running=6, mean_job_s=4.0)
    assert room.wait_s(0) == 0.0 and room.wait_s(1) == 0.0
    assert room.wait_s(2) == 0.5  # the first job past the free slots: one of 8 slots, 4 s each
    assert room.wait_s(9) == 4.0


def test_no_worker_or_no_finished_job_yet_means_no_estimate() -> None:
    assert Capacity(slots=0, running=0, mean_job_s=3.0).wait_s(0) is None
    assert Capacity(slots=2, running=2, mean_job_s=None).wait_s(0) is None
    assert Capacity(slots=2, running=0, mean_job_s=None).wait_s(1) == 0.0


def test_a_queued_jobs_get_reads_the_fleet_at_most_once_in_its_max_age() -> None:
    import asyncio
    import json
    import time
    from types import SimpleNamespace

    from api.ops import fleet
    from broker.keys import Keys
    from broker.settings import Settings

    class Heartbeats:  # the two reads broker.fleet.live_workers makes
        def __init__(self) -> None:
            self.reads = 0

        async def zrangebyscore(self, *_: object) -> list[bytes]:
            self.reads += 1
            return [b"w1"]

        async def mget(self, _: list[str]) -> list[bytes]:
            return [json.dumps({"name": "w1", "model": "chat", "reads": self.reads}).encode()]

    redis = Heartbeats()
    state = SimpleNamespace(redis=redis, keys=Keys("t"), settings=Settings())
    first = asyncio.run(fleet(state, max_age_s=60))
    assert first["chat"] == [{"name": "w1", "model": "chat", "reads": 1}]
    assert asyncio.run(fleet(state, max_age_s=60)) is first and redis.reads == 1
    assert asyncio.run(fleet(state))["chat"][0]["reads"] == 2  # no max age: always fresh
    state.fleet_read = (time.monotonic() - 61, first)
    assert asyncio.run(fleet(state, max_age_s=60))["chat"][0]["reads"] == 3  # too old
