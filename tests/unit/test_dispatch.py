"""How many of a submission's jobs were queued when queueing fails (broker.fair.Dispatcher):
the batch POST's 503 says "after N of M", and every path counts the same way."""

from __future__ import annotations

import asyncio

import pytest
import redis
from celery import Celery

import broker.fair
from broker.fair import AsyncDispatcher, Dispatcher, PartlySent, Tenant
from broker.keys import Keys
from broker.messages import JOB_REQUEST
from broker.settings import Settings

JOBS = [JOB_REQUEST.validate_python({"kind": "generate", "prompt": f"p{i}"}) for i in range(5)]
IDS = [f"{i:032x}" for i in range(5)]


def dispatcher(fair_share: bool) -> Dispatcher:
    # Nothing here reaches Redis or a broker: the sends are replaced below.
    return Dispatcher(redis.Redis(port=1), Celery(), Keys("t"), Settings(fair_share=fair_share))


def test_the_direct_path_counts_the_messages_sent_before_the_failure(monkeypatch):
    sent: list[str] = []

    def send_group(app, keys, group):
        if len(sent) == 3:
            raise redis.ConnectionError("gone")
        sent.extend(job_id for job_id, _ in group)

    monkeypatch.setattr(broker.fair, "send_group", send_group)
    with pytest.raises(PartlySent) as failed:
        dispatcher(False).send(IDS, JOBS, Tenant())
    assert (failed.value.sent, failed.value.total) == (3, 5) and sent == IDS[:3]
    assert isinstance(failed.value.__cause__, redis.ConnectionError)


def test_the_fair_path_counts_whole_models_a_failed_script_call_queues_none():
    fair = dispatcher(True)
    assert fair.fair is not None
    fair.fair.calls = lambda ids, jobs, tenant: [(["a"], 2), (["b"], 3)]  # type: ignore
    calls: list[list[str]] = []

    def enqueue(args):
        if args == ["b"]:
            raise redis.TimeoutError("slow")
        calls.append(args)

    fair._enqueue = enqueue  # type: ignore[assignment]
    with pytest.raises(PartlySent) as failed:
        fair.send(IDS, JOBS, Tenant("k"))
    assert (failed.value.sent, failed.value.total, calls) == (2, 5, [["a"]])


def test_the_api_dispatcher_counts_the_same_way_and_runs_the_blocking_part_off_the_loop():
    ran_off_loop: list[str] = []

    async def run_sync(fn, *args):
        ran_off_loop.append(fn.__name__)
        return fn(*args)

    async def enqueue(args):
        if args == ["b"]:
            raise redis.ConnectionError("gone")

    api = AsyncDispatcher(redis.asyncio.Redis(port=1), Celery(), Keys("t"), Settings(),
                          run_sync)
    assert api.fair is not None
    api.fair.calls = lambda ids, jobs, tenant: [(["a"], 4), (["b"], 1)]  # type: ignore
    api._enqueue = enqueue  # type: ignore[assignment]
    with pytest.raises(PartlySent) as failed:
        asyncio.run(api.send(IDS, JOBS, Tenant()))
    assert (failed.value.sent, failed.value.total) == (4, 5) and ran_off_loop == ["<lambda>"]
