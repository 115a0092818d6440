"""A queued job's place in its model's queue and the estimated start, on real workers: the
chat worker runs 8 jobs at once (max_batch), so the ninth and later wait."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Stack

LONG = {"kind": "generate", "model": "chat", "prompt": "Once upon a time", "max_tokens": 200,
        "temperature": 0.9, "repeat_penalty": 1.0}
SLOTS = 8  # the chat model's max_batch in the test config (the default)


def queue_of(stack: Stack, job_id: str) -> dict[str, Any] | None:
    job = stack.job(job_id)
    return job.get("queue") if job["status"] == "queued" else None


def until(predicate: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture
def busy(stack: Stack) -> Any:
    """Twelve long jobs: eight run, each a different length so that they end one by one,
    and four wait. Everything is cancelled afterwards."""
    ids = [stack.submit({**LONG, "max_tokens": 80 + 16 * i}) for i in range(SLOTS)]
    ids += [stack.submit(LONG) for _ in range(4)]
    until(lambda: sum(stack.job(i)["status"] == "running" for i in ids) == SLOTS)
    extra: list[str] = []
    yield ids, extra
    for job_id in ids + extra:
        stack.http.delete(f"/v1/jobs/{job_id}")


def test_a_later_job_of_higher_priority_goes_ahead_and_positions_count_the_queue(
    stack: Stack, busy: Any
) -> None:
    ids, extra = busy
    waiting = [i for i in ids if stack.job(i)["status"] == "queued"]
    assert len(waiting) == 4
    places = [queue_of(stack, i) for i in waiting]
    assert [p["position"] for p in places if p] == [0, 1, 2, 3]
    assert all(p and p["waiting"] == 4 for p in places)
    urgent = stack.submit({**LONG, "priority": 9})
    extra.append(urgent)
    assert queue_of(stack, urgent)["position"] == 0  # type: ignore[index]
    assert [queue_of(stack, i)["position"] for i in waiting] == [1, 2, 3, 4]  # type: ignore[index]
    stack.http.delete(f"/v1/jobs/{waiting[0]}")  # a cancelled job leaves the line
    assert [queue_of(stack, i)["position"] for i in waiting[1:]] == [1, 2, 3]  # type: ignore[index]
    model = next(m for m in stack.http.get("/v1/models").json()["data"] if m["id"] == "chat")
    assert model["waiting"] == 4 and model["estimated_wait_s"] is not None


def test_a_queued_jobs_position_counts_down_as_the_jobs_ahead_finish(
    stack: Stack, busy: Any
) -> None:
    ids, _ = busy
    last = ids[-1]
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        place = queue_of(stack, last)
        if place is None:
            break
        seen.append(place)
        time.sleep(0.2)
    assert stack.job(last)["status"] in ("running", "succeeded")
    positions = [p["position"] for p in seen]
    assert positions[0] == 3 and positions == sorted(positions, reverse=True), positions
    assert set(positions) == {0, 1, 2, 3}  # one at a time, as each job ahead started
    # Once a job of the model has ended there is a mean to go by: with every slot busy, each
    # later reading gives a start some seconds away. (Before that there is none: None.)
    after_first_end = seen[positions.index(2):]
    estimates = [p["estimated_start_s"] for p in after_first_end]
    assert all(e is not None and e > 0 for e in estimates), estimates
