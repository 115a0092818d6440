"""The fair queue's scripts on a real redis-server, with a simulated worker: it takes messages
from the model's Celery lists as kombu would (highest priority first) and ends each job
(cancel: the same ending script as a finish), which frees its slot for the next fair job.

The stack-level tests (real workers, keys, weights, a SIGKILLed worker) are in
tests/integration/test_fair_share.py."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from broker.celery_app import make_celery, send_job
from broker.fair import Dispatcher, Tenant
from broker.keys import Keys
from broker.messages import JOB_REQUEST, JobRequest
from broker.settings import Settings
from broker.store import JobStore, new_record


@pytest.fixture
def fair(redis_server: Any) -> Iterator[Any]:
    prefix = f"tpfair{uuid.uuid4().hex[:6]}"
    settings = Settings(key_prefix=prefix)
    client = redis.Redis.from_url(redis_server.url)
    app = make_celery(settings, redis_server.url)
    sim = Sim(client, settings, app)
    yield sim
    app.close()
    client.close()


class Sim:
    def __init__(self, client: redis.Redis, settings: Settings, app: Any) -> None:
        self.redis, self.settings, self.app = client, settings, app
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(client, settings)
        self.queue = Dispatcher(client, app, self.keys, settings)
        self.base = self.keys.fair("chat")

    def slots(self, n: int, worker: str = "w1", ttl_s: float = 600) -> None:
        self.redis.zadd(self.base + ":slots", {f"{worker}|{n}": time.time() + ttl_s})

    def submit(self, tenant: Tenant, n: int, priority: int = 5) -> list[str]:
        jobs: list[JobRequest] = [JOB_REQUEST.validate_python(
            {"kind": "generate", "prompt": "hi", "priority": priority}) for _ in range(n)]
        ids = [uuid.uuid4().hex for _ in jobs]
        owner = {"owner": tenant.name} if tenant.name else {}
        self.store.create_many([(i, new_record(j, self.settings, **owner))
                                for i, j in zip(ids, jobs, strict=True)])
        self.queue.send(ids, jobs, tenant)
        return ids

    def sent(self) -> list[str]:
        """Messages in the model's Celery lists, as a worker would take them: job ids."""
        lists = self.keys.queue_lists("chat")
        return [job for key in lists
                for job in map(job_of, reversed(self.redis.lrange(key, 0, -1)))]

    def take(self) -> str | None:
        """A worker takes the next message and ends its job (its slot frees)."""
        for key in self.keys.queue_lists("chat"):
            raw = self.redis.rpop(key)
            if raw is not None:
                job_id = job_of(raw)
                self.store.cancel_many([job_id])
                return job_id
        return None

    def out(self) -> int:
        return int(self.redis.scard(self.base + ":out"))


def job_of(raw: bytes) -> str:
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return str(body[0][0])


def test_a_message_from_the_fair_line_is_the_one_celery_sends(fair: Sim) -> None:
    job_id = uuid.uuid4().hex
    send_job(fair.app, fair.keys, job_id, "generate", "chat", 7)
    sent = json.loads(fair.redis.lpop(fair.keys.queue("chat") + ":2"))  # priority 7 -> step 2
    target, built = fair.queue.fair.messages.build(
        ("tokenpool.generate", [job_id, "chat", 1], job_id, f"job={job_id} model=chat dispatch=1"),
        fair.keys.queue("chat"), 7)
    built_message = json.loads(built)
    assert target == fair.keys.queue("chat") + ":2"
    for message in (sent, built_message):  # per message or per thread; the rest must match
        message["properties"].pop("delivery_tag")
        message["properties"].pop("reply_to")
    assert built_message == sent


def test_a_second_key_does_not_wait_behind_the_first_keys_backlog(fair: Sim) -> None:
    fair.slots(8)
    a = fair.submit(Tenant("a"), 200)
    assert len(fair.sent()) == 8 and fair.out() == 8  # the slots, no more
    first = [fair.take() for _ in range(30)]
    b = fair.submit(Tenant("b"), 20)
    order = first + [job for job in iter(fair.take, None)]
    assert sorted(order) == sorted(a + b)  # everything ran, once
    after = order[30:]
    # B's 20 jobs go out alternating with A's once B waits (the bound: its n-th job within
    # 2n sends of that), behind the 8 messages already sent.
    positions = [after.index(job) for job in b]
    assert all(p < 8 + 2 * (n + 1) for n, p in enumerate(positions)), positions
    assert max(positions) < 8 + 40
    assert fair.out() == 0


def test_weights_3_to_1_give_3_to_1_of_the_slots(fair: Sim) -> None:
    fair.slots(4)
    heavy = set(fair.submit(Tenant("heavy", 3.0), 120))
    light = set(fair.submit(Tenant("light", 1.0), 120))
    window = [fair.take() for _ in range(4 + 80)][4:]  # past the first 4 sent, both waiting
    share = sum(job in heavy for job in window) / len(window)
    assert 0.72 <= share <= 0.78, share
    assert all(job in heavy | light for job in window)


def test_priority_comes_before_fairness(fair: Sim) -> None:
    fair.slots(2)
    fair.submit(Tenant("a"), 10)
    fair.submit(Tenant("b"), 10)
    urgent = fair.submit(Tenant("a"), 1, priority=9)
    taken = [fair.take() for _ in range(3)]
    assert urgent[0] in taken  # right after the two already out


def test_one_key_alone_gets_every_slot_and_a_new_worker_gets_work(fair: Sim) -> None:
    ids = fair.submit(Tenant(), 30)  # no slots: nothing is sent yet
    assert fair.sent() == [] and fair.out() == 0
    fair.slots(8)
    assert fair.store.pump_fair("chat") == 8
    assert fair.sent() == ids[:8]
    fair.slots(4, worker="w2")
    fair.store.pump_fair("chat")
    assert fair.sent() == ids[:12]  # in order: one key alone is first come, first served
    assert [fair.take() for _ in range(30)] == ids


def test_cancelled_waiting_jobs_are_skipped_without_charging_their_key(fair: Sim) -> None:
    fair.slots(1)
    a = fair.submit(Tenant("a"), 10)
    b = fair.submit(Tenant("b"), 5)
    fair.store.cancel_many(a[1:6])  # waiting in the fair line: ended, never sent
    order = [job for job in iter(fair.take, None)]
    assert sorted(order) == sorted([a[0], *a[6:], *b])
    # A's skipped jobs did not count as served: the two keys alternate from the start.
    assert order[:9] == [a[0], b[0], a[6], b[1], a[7], b[2], a[8], b[3], a[9]]


def test_the_heartbeat_pump_forgets_sent_jobs_whose_record_vanished(fair: Sim) -> None:
    fair.slots(2)
    ids = fair.submit(Tenant(), 4)
    assert fair.out() == 2
    fair.redis.delete(fair.keys.job(ids[0]), fair.keys.job(ids[1]))  # expired, never ended
    for key in fair.keys.queue_lists("chat"):
        fair.redis.delete(key)
    assert fair.store.pump_fair("chat") == 2
    assert fair.sent() == ids[2:]


def test_expired_worker_slots_stop_counting(fair: Sim) -> None:
    fair.slots(3, ttl_s=-1)  # its heartbeat expired
    fair.submit(Tenant(), 3)
    assert fair.sent() == [] and fair.store.pump_fair("chat") == 0
