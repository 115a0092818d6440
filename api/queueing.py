"""A queued job's place in its model's queue, and how long until it starts.

The place is exact for the order tokenpool keeps (broker.keys.waiting: priority, then submit
time, which is the order Celery's priority lists deliver in), with two known differences from
what a worker will really take next: a job queued again after its worker was lost keeps its
first place here but goes to the back of its Celery list, and a job a worker has already
taken from Celery but not started (at most one message per worker at a time) still counts
as waiting. The estimate assumes the model's live workers' slots (`max_batch` each) free up at
the rate the model's jobs have ended so far (the mean of its duration histogram, every job
since its metrics began): a rough guide that improves with a steady mix of jobs, not a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LIVE_STATES = ("loaded", "generating", "loading")


@dataclass(frozen=True)
class Capacity:
    slots: int  # jobs the model's live workers run at once
    running: int
    mean_job_s: float | None  # None: no job of this model has ended yet

    def wait_s(self, ahead: int) -> float | None:
        """Seconds until a job with `ahead` jobs before it starts (None: cannot tell)."""
        if self.slots == 0:
            return None
        free = max(0, self.slots - self.running)
        if ahead < free:
            return 0.0
        if self.mean_job_s is None:
            return None
        return round((ahead - free + 1) * self.mean_job_s / self.slots, 1)


async def capacity(state: Any, model: str, workers: list[dict[str, Any]]) -> Capacity:
    live = [w for w in workers if w.get("state") in LIVE_STATES]
    fields = [f"total_s|{model}|sum", f"total_s|{model}|+Inf"]
    total, count = await state.redis.hmget(state.keys.metrics_histograms(), fields)
    mean = float(total) / float(count) if count and float(count) > 0 else None
    return Capacity(slots=sum(int(w.get("max_batch") or 1) for w in live),
                    running=sum(len(w.get("jobs") or []) for w in live), mean_job_s=mean)


async def place_in_line(state: Any, record: dict[str, Any],
                        workers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`{"position", "waiting", "estimated_start_s"}` of a queued job (position 0: next)."""
    key = state.keys.waiting(record["model"])
    pipe = state.redis.pipeline(transaction=False)
    pipe.zrank(key, record["id"])
    pipe.zcard(key)
    position, waiting = await pipe.execute()
    if position is None:
        return None
    if record.get("fair_key"):
        position = await fair_ahead(state, record)
    room = await capacity(state, record["model"], workers)
    return {"position": int(position), "waiting": int(waiting),
            "estimated_start_s": room.wait_s(int(position))}


async def queue_wait(state: Any, model: str, workers: list[dict[str, Any]],
                     ) -> dict[str, Any]:
    """A model's queue: jobs waiting, and the estimated wait of a job submitted now."""
    waiting = int(await state.redis.zcard(state.keys.waiting(model)))
    room = await capacity(state, model, workers)
    return {"waiting": waiting, "estimated_wait_s": room.wait_s(waiting)}


async def fair_ahead(state: Any, record: dict[str, Any]) -> int:
    """Jobs that start before a queued job on the fair path (broker.fair): the jobs already
    sent to Celery and not started (those sent before it, if it was sent itself), then every
    job waiting at a higher priority, the jobs ahead of it in its key's line, and each other
    key's jobs whose start tags come before its own."""
    sent = await sent_scores(state, record["fair_key"])
    line = record.get("fair_line")
    rank = await state.redis.zrank(line, record["id"]) if line else None
    if line is None or rank is None:  # sent: Celery's order, priority then submit time
        mine = float(record["wait_score"])
        return sum(score < mine for score in sent)
    priority, tenant = line.removeprefix(f"{record['fair_key']}:l:").split(":", 1)
    lines = await waiting_tenants(state, record["fair_key"])
    higher = sum(n for (p, _), (n, _, _) in lines.items() if p > int(priority))
    _, own_tag, own_weight = lines.get((int(priority), tenant), (0, 0.0, 1.0))
    tag = own_tag + int(rank) / own_weight  # its own start tag
    others = sum(ahead_of(tag, tenant, t, *entry) for (p, t), entry in lines.items()
                 if p == int(priority) and t != tenant)
    return len(sent) + higher + int(rank) + others


def ahead_of(tag: float, tenant: str, other: str, jobs: int, start: float,
             weight: float) -> int:
    """How many of `other`'s jobs (start tags start, start + 1/weight, ...) go before a job
    with start tag `tag` (ties go to the name first in order, as the scripts' ZRANGE does)."""
    span = (tag - start) * weight
    if span < -1e-9:
        return 0
    whole = math.ceil(span - 1e-9)
    tie = abs(span - round(span)) < 1e-9 and other < tenant
    return min(jobs, whole + int(tie))


async def sent_scores(state: Any, base: str) -> list[float]:
    """The queue order (wait_score) of the jobs sent to Celery and not yet started."""
    members = list(await state.redis.smembers(base + ":out"))
    pipe = state.redis.pipeline(transaction=False)
    for key in members:
        pipe.hmget(key, "status", "wait_score")
    return [float(score) for status, score in await pipe.execute()
            if status == b"queued" and score is not None]


async def waiting_tenants(state: Any, base: str) -> dict[tuple[int, str], tuple[int, float, float]]:
    """(priority, tenant) -> (jobs waiting, start tag, weight) of every key with a line."""
    pipe = state.redis.pipeline(transaction=False)
    for p in range(10):
        pipe.zrange(f"{base}:t:{p}", 0, -1, withscores=True)
    found = [(p, t.decode(), float(score))
             for p, tenants in enumerate(await pipe.execute()) for t, score in tenants]
    pipe = state.redis.pipeline(transaction=False)
    for p, t, _ in found:
        pipe.zcard(f"{base}:l:{p}:{t}")
        pipe.hget(f"{base}:tag", f"w:{p}:{t}")
    replies = await pipe.execute()
    return {(p, t): (int(replies[2 * i]), score, float(replies[2 * i + 1] or 1.0))
            for i, (p, t, score) in enumerate(found)}
