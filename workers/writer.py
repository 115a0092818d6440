"""A running job's events: tokens and stages out, cancel requests in, one final event at the end."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from broker.groupcommit import PendingCall
from broker.messages import Cancelled, Done, Event, Stage, TokenEvent
from broker.store import JobStore


class JobCancelled(Exception):
    """The job's cancel was requested; the runner stops where it is."""


class JobGone(Exception):
    """The job ended, expired or was queued again elsewhere: this attempt may write no more."""


class JobTimedOut(Exception):
    """The job ran past its deadline."""


class EventWriter:
    """The one writer of a running attempt: each write is fenced by the attempt number and
    carries the seq it expects, so a retried write (reply lost in a Redis restart) is a no-op."""

    def __init__(
        self, store: JobStore, job_id: str, attempt: int, next_seq: int,
        deadline: float | None, created_at: float, started_at: float,
        on_token: Callable[[], None] | None = None,
    ) -> None:
        self.on_token = on_token
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.next_seq = next_seq
        self.deadline = deadline
        self.created_at = created_at
        self.started_at = started_at
        self.first_token_at: float | None = None
        self._pending: PendingCall | None = None  # an append queued, its answer not yet read

    def _append(self, event: Event) -> None:
        """Queue the event's append; `settle` sends it (with whatever else is queued) and
        reads its answer. Appended, it takes `next_seq`: the script answers with the seq it was
        given, and a refused append leaves the attempt nothing more to write."""
        self.settle()
        self.check_deadline()
        self._pending = self.store.append_later(self.job_id, event, self.attempt, self.next_seq)
        self.next_seq += 1

    def settle(self) -> None:
        """The last queued append's answer: raises if the attempt may write no more or the
        job's cancel was requested."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        appended = self.store.appended(pending)
        if appended.refused:
            raise JobGone(self.job_id)
        if appended.cancel_requested:
            raise JobCancelled(self.job_id)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise JobTimedOut(self.job_id)

    def token(self, text: str) -> None:
        self.token_later(text)
        self.settle()

    def token_later(self, text: str) -> None:
        """A token event queued, not yet sent: a batch engine settles every job's tokens of a
        step in one round trip. The answer of the one before is checked first."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self._append(TokenEvent(job=self.job_id, text=text))
        if self.on_token is not None:
            self.on_token()

    def stage(self, stage: str, part: int | None, parts: int | None) -> None:
        self._append(Stage(job=self.job_id, stage=stage, part=part, parts=parts))
        self.settle()

    def check_cancel(self) -> None:
        """For stretches that write no events (summary map stages): cancel and deadline."""
        self.check_deadline()
        if self.store.cancel_requested(self.job_id):
            raise JobCancelled(self.job_id)

    def timings(self, completion_tokens: int) -> dict[str, float]:
        now = time.time()
        first = self.first_token_at
        decode_s = now - first if first is not None else 0.0
        rate = (completion_tokens - 1) / decode_s if completion_tokens > 1 and decode_s > 0 else 0.0
        return {
            "queued_s": round(self.started_at - self.created_at, 4),
            "ttft_s": round(first - self.started_at, 4) if first is not None else 0.0,
            "total_s": round(now - self.started_at, 4),
            "tokens_per_s": round(rate, 2),
        }

    def _drain(self) -> None:
        """A final event goes after every token queued before it (whatever their answers:
        the final write is fenced too)."""
        with contextlib.suppress(RedisError, JobGone, JobCancelled):
            self.settle()

    def succeed(self, result: dict[str, Any], usage: dict[str, int]) -> None:
        self._drain()
        timings = self.timings(usage.get("completion_tokens", 0))
        done = Done(job=self.job_id, usage=usage, timings=timings)
        self.store.finish(
            self.job_id, done, "succeeded", self.attempt, result=result, usage=usage,
            timings=timings,
        )

    def cancelled(self) -> None:
        self._drain()
        self.store.finish(self.job_id, Cancelled(job=self.job_id), "cancelled", self.attempt)

    def fail(self, error_type: str, message: str) -> None:
        self._drain()
        self.store.fail(self.job_id, error_type, message, self.attempt)
