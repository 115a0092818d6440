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
    room = await capacity(state, record["model"], workers)
    return {"position": int(position), "waiting": int(waiting),
            "estimated_start_s": room.wait_s(int(position))}


async def queue_wait(state: Any, model: str, workers: list[dict[str, Any]],
                     ) -> dict[str, Any]:
    """A model's queue: jobs waiting, and the estimated wait of a job submitted now."""
    waiting = int(await state.redis.zcard(state.keys.waiting(model)))
    room = await capacity(state, model, workers)
    return {"waiting": waiting, "estimated_wait_s": room.wait_s(waiting)}
