"""What one tick of a schedule does. A tick holds the schedule's lock (no two ticks at once)
and is skipped while the batch of the previous run has not finished (no overlapping runs)."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from broker.batches import BatchOptions, BatchSpec, BatchStore, progress
from broker.keys import Keys
from broker.settings import ScheduleSpec, Settings

log = logging.getLogger("tokenpool.schedules")
# redis.Redis, whose replies are typed as unions of bytes, str and more: read as bytes here.
Client = Any
UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


class Runner:
    def __init__(self, client: Client, settings: Settings, celery: Celery) -> None:
        self.redis, self.settings = client, settings
        self.keys = Keys(settings.key_prefix)
        self.batches = BatchStore(client, settings, celery)
        self._unlock = client.register_script(UNLOCK)

    def tick(self, name: str) -> str:
        spec = self.settings.schedules.get(name)
        if spec is None:
            return "unknown"
        token = uuid.uuid4().hex
        lock = self.keys.schedule_lock(name)
        if not self.redis.set(lock, token, nx=True, px=int(spec.lock_ttl_s * 1000)):
            return self._skip(name, "another tick of this schedule is running")
        try:
            outcome = self._run(name, spec)
        finally:
            self._unlock(keys=[lock], args=[token])
        self.redis.hset(self.keys.schedule(name), mapping={"last_tick": repr(time.time()),
                                                           "last_outcome": outcome})
        log.info("schedule %s: %s", name, outcome)
        return outcome

    def _skip(self, name: str, why: str) -> str:
        self.redis.hincrby(self.keys.schedule(name), "skipped", 1)
        log.info("schedule %s: skipped: %s", name, why)
        return f"skipped: {why}"

    def _run(self, name: str, spec: ScheduleSpec) -> str:
        if spec.action == "housekeeping":
            return "housekeeping: " + json.dumps(housekeeping(self.redis, self.keys,
                                                              self.settings))
        last = self.redis.hget(self.keys.schedule(name), "batch")
        if last and not self._finished(last.decode()):
            return self._skip(name, f"its last batch {last.decode()} has not finished")
        items = list(self._items(name, spec))
        if not items:
            return "no new items"
        batch = BatchSpec(kind="summarize", model=spec.model, priority=spec.priority,
                          options=BatchOptions(instructions=spec.instructions,
                                               max_tokens=spec.max_tokens))
        jobs = ((item_id, batch.job(text)) for item_id, text, _ in items)
        batch_id = self.batches.create(batch, jobs, schedule=name)
        self._remember(name, spec, [seen for _, _, seen in items])
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.schedule(name), "batch", batch_id)
        pipe.hincrby(self.keys.schedule(name), "runs", 1)
        pipe.execute()
        return f"batch {batch_id} of {len(items)} items"

    def _finished(self, batch_id: str) -> bool:
        fields = self.redis.hgetall(self.keys.batch(batch_id))
        if not fields:
            return True
        report = progress({k.decode(): v.decode() for k, v in fields.items()}, time.time())
        return report["status"] in ("completed", "cancelled")

    def _items(self, name: str, spec: ScheduleSpec) -> Iterator[tuple[str, str, str]]:
        """(item id, text, what to remember as seen) of this run."""
        if spec.action == "summarize_dir":
            yield from new_files(self.redis, self.keys.schedule_seen(name), spec)
            return
        assert spec.list_key is not None
        popped = self.redis.lpop(spec.list_key, spec.max_items) or []
        for n, raw in enumerate(popped):
            item = parse_list_item(raw.decode())
            yield item.get("id") or f"{name}-{int(time.time())}-{n}", item["text"], ""

    def _remember(self, name: str, spec: ScheduleSpec, seen: list[str]) -> None:
        if spec.action == "summarize_dir" and seen:
            self.redis.sadd(self.keys.schedule_seen(name), *seen)


def parse_list_item(raw: str) -> dict[str, str]:
    """A list element: JSON {"id", "text"} or plain text."""
    try:
        item = json.loads(raw)
    except json.JSONDecodeError:
        return {"text": raw}
    return item if isinstance(item, dict) and "text" in item else {"text": raw}


def new_files(client: Client, seen_key: str, spec: ScheduleSpec,
              ) -> Iterator[tuple[str, str, str]]:
    """Files under spec.path matching spec.pattern not summarised before (by path, size and
    modification time: an edited file counts as new)."""
    assert spec.path is not None
    root = Path(spec.path)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and fnmatch.fnmatch(p.name, spec.pattern) and not p.name.startswith("."))
    taken = 0
    for path in files:
        stat = path.stat()
        rel = str(path.relative_to(root))
        marker = f"{rel}|{stat.st_size}|{stat.st_mtime_ns}"
        if client.sismember(seen_key, marker):
            continue
        text = path.read_text(errors="replace")
        if not text.strip():
            continue
        yield rel, text, marker
        taken += 1
        if taken >= spec.max_items:
            return


def housekeeping(client: Client, keys: Keys, settings: Settings) -> dict[str, int]:
    """Drop what points at nothing: finished batches past batch_ttl_s (with their item list
    and done stream), index entries of expired jobs (dead letters, running, waiting), gone
    workers."""
    now = time.time()
    swept: dict[str, Any] = {"batches": _sweep_batches(client, keys, settings, now)}
    dead = [m for m in client.zrange(keys.dead_letters(), 0, -1)
            if not client.exists(keys.job(m.decode()))]
    swept["dead_letters"] = client.zrem(keys.dead_letters(), *dead) if dead else 0
    orphans = [j for j in client.hkeys(keys.running()) if not client.exists(keys.job(j.decode()))]
    swept["running"] = client.hdel(keys.running(), *orphans) if orphans else 0
    swept["waiting"] = 0
    for model in settings.models:  # a queued job that expired unstarted leaves its place
        gone = [m for m in client.zrange(keys.waiting(model), 0, -1)
                if not client.exists(keys.job(m.decode()))]
        swept["waiting"] += client.zrem(keys.waiting(model), *gone) if gone else 0
    swept["workers"] = client.zremrangebyscore(keys.workers(), "-inf",
                                               now - settings.worker_gone_retention_s)
    return {k: int(v) for k, v in swept.items()}


def _sweep_batches(client: Client, keys: Keys, settings: Settings, now: float) -> int:
    swept = 0
    for raw, created in client.zrange(keys.batches(), 0, -1, withscores=True):
        batch_id = raw.decode()
        fields = client.hgetall(keys.batch(batch_id))
        report = progress({k.decode(): v.decode() for k, v in fields.items()}, now) \
            if fields else None
        expired = now - created > settings.batch_ttl_s
        if report is None or (expired and report["status"] in ("completed", "cancelled")):
            client.delete(keys.batch(batch_id), keys.batch_items(batch_id),
                          keys.batch_done(batch_id))
            client.zrem(keys.batches(), batch_id)
            swept += 1
    return swept
