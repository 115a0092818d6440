"""Schedules on real beat and worker processes, with short intervals: a directory's new files,
a Redis list, no overlapping runs, and housekeeping."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.redis_server import EmbeddedRedis
from cli.supervisor import Supervisor, tokenpool_argv
from tests.conftest import Stack, running_stack, stack_env

PREFIX = "tpsched"
LIST_KEY = f"{PREFIX}:test-inbox"


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inbox")


@pytest.fixture(scope="module")
def scheduled(redis_server: EmbeddedRedis, inbox: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("sched") / "tokenpool.toml"
    config.write_text(f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
batch_ttl_s = 60
[models.chat]
enabled = false
[models.embed]
enabled = false
[models.summary]
n_ctx = 512
max_tokens = 64
[schedules.digest]
action = "summarize_dir"
every_s = 1.0
path = "{inbox}"
pattern = "*.txt"
max_tokens = 6
[schedules.drain]
action = "summarize_list"
every_s = 1.0
list_key = "{LIST_KEY}"
max_tokens = 6
[schedules.housekeeping]
action = "housekeeping"
every_s = 1.0
""")
    logs = tmp_path_factory.mktemp("sched-logs")
    env = stack_env(redis_server.url, config, TOKENPOOL_DATA_DIR=str(logs))
    beat = Supervisor(env=env, log_dir=logs)
    beat.add("beat", tokenpool_argv("beat"))
    with running_stack(redis_server.url, config, logs, {"w-summary": "summary"},
                       prefix=PREFIX) as stack:
        beat.start()
        try:
            yield stack
        finally:
            beat.stop()


def schedule_state(stack: Stack, name: str) -> dict[str, str]:
    raw = stack.redis.hgetall(f"{PREFIX}:schedule:{name}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def wait_for(check: Any, timeout_s: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def batch_lines(stack: Stack, batch_id: str) -> list[dict[str, Any]]:
    reply = stack.http.get(f"/v1/batches/{batch_id}/results", timeout=120)
    return [json.loads(line) for line in reply.text.splitlines()]


def schedule_batches(stack: Stack, name: str) -> list[str]:
    ids = [b.decode() for b in stack.redis.zrange(stack.keys.batches(), 0, -1)]
    return [i for i in ids if stack.redis.hget(stack.keys.batch(i), "schedule") == name.encode()]


def test_new_files_in_a_directory_are_summarised_once(scheduled: Stack, inbox: Path) -> None:
    for i in range(2):
        (inbox / f"day-{i}.txt").write_text(f"Day {i}: the team fixed {i + 2} bugs.")
    (inbox / "ignored.md").write_text("not matching the pattern")
    first = wait_for(lambda: schedule_batches(scheduled, "digest"), what="a digest batch")[0]
    lines = batch_lines(scheduled, first)
    assert sorted(line["id"] for line in lines) == ["day-0.txt", "day-1.txt"]
    assert all(line["status"] == "succeeded" for line in lines)
    (inbox / "day-2.txt").write_text("Day 2: the release went out.")
    second = wait_for(lambda: [b for b in schedule_batches(scheduled, "digest") if b != first],
                      what="a second digest batch")[0]
    assert [line["id"] for line in batch_lines(scheduled, second)] == ["day-2.txt"]


def test_items_pushed_on_a_redis_list_are_drained_into_a_batch(scheduled: Stack) -> None:
    scheduled.redis.rpush(LIST_KEY, json.dumps({"id": "t-1", "text": "Ticket 1: printer."}),
                          json.dumps({"id": "t-2", "text": "Ticket 2: VPN is slow."}),
                          "A plain text ticket about the coffee machine.")
    batch_id = wait_for(lambda: schedule_batches(scheduled, "drain"), what="a drain batch")[0]
    lines = batch_lines(scheduled, batch_id)
    assert [line["id"] for line in lines][:2] == ["t-1", "t-2"] and len(lines) == 3
    assert all(line["status"] == "succeeded" for line in lines)
    assert scheduled.redis.llen(LIST_KEY) == 0


def test_a_schedule_never_overlaps_its_unfinished_run(scheduled: Stack, inbox: Path) -> None:
    before = set(schedule_batches(scheduled, "digest"))
    skipped_before = int(schedule_state(scheduled, "digest").get("skipped", 0))
    for i in range(24):  # enough work to outlast a few one-second ticks
        (inbox / f"bulk-{i:02}.txt").write_text(f"Report {i}: " + "numbers went up. " * 20)
    big = wait_for(lambda: set(schedule_batches(scheduled, "digest")) - before,
                   what="the bulk batch").pop()
    lines = batch_lines(scheduled, big)  # waits for it to finish
    assert len(lines) == 24
    skipped = int(schedule_state(scheduled, "digest").get("skipped", 0)) - skipped_before
    assert skipped >= 1, "no tick came while the run was unfinished: the test proves nothing"
    finished = max(scheduled.job(line["job"])["finished_at"] for line in lines)
    for later in set(schedule_batches(scheduled, "digest")) - before - {big}:
        created = float(scheduled.redis.hget(scheduled.keys.batch(later), "created_at") or 0)
        assert created >= finished - 0.5, "a run started while the last one was unfinished"


def test_housekeeping_sweeps_stale_batches_and_dangling_entries(scheduled: Stack) -> None:
    stale = "f" * 32
    keys = scheduled.keys
    scheduled.redis.hset(keys.batch(stale), mapping={"id": stale, "status": "running",
                                                     "total": "0", "created_at": "1"})
    scheduled.redis.zadd(keys.batches(), {stale: 1.0})
    scheduled.redis.zadd(keys.dead_letters(), {"e" * 32: time.time()})
    scheduled.redis.hset(keys.running(), "d" * 32, "someone")
    scheduled.redis.zadd(keys.waiting("summary"), {"c" * 32: 1.0})
    wait_for(lambda: not scheduled.redis.exists(keys.batch(stale)), what="the stale batch")
    wait_for(lambda: scheduled.redis.zscore(keys.dead_letters(), "e" * 32) is None,
             what="the dangling dead letter")
    assert not scheduled.redis.hexists(keys.running(), "d" * 32)
    wait_for(lambda: scheduled.redis.zscore(keys.waiting("summary"), "c" * 32) is None,
             what="the dangling place in the queue")
    assert scheduled.redis.zscore(keys.batches(), stale) is None
    assert "housekeeping" in schedule_state(scheduled, "housekeeping")["last_outcome"]
