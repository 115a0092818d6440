"""A running job's events: tokens and stages out, cancel requests in, one final event at the end."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from broker.groupcommit import PendingCall
from broker.messages import Cancelled, Done, Event, Stage, TokenEvent
from broker.store import Appended, Finished, JobStore

log = logging.getLogger("tokenpool.worker")


class JobCancelled(Exception):
    """The job's cancel was requested; the runner stops where it is."""


class JobGone(Exception):
    """The job ended, expired or was queued again elsewhere: this attempt may write no more."""


class JobTimedOut(Exception):
    """The job ran past its deadline."""


class EventWriter:
    """The one writer of a running attempt: each write is fenced by the attempt number and
    carries the seq it expects, so a retried write (reply lost in a Redis restart) is a no-op.

    It keeps every event it wrote (a job's events are small and few), so that when Redis
    comes back without its last writes (killed between two AOF fsyncs, or a replica promoted
    that had not got them) the writer sees the gap in the script's answer and writes the
    missing events again, the same events at the same seq: followers that saw them before
    the loss see them again unchanged, and the stream's text stays equal to the result."""

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
        self.first_seq = next_seq  # this attempt's first own event; before it, its `started`
        self.written: list[Event] = []  # this attempt's events, from first_seq on
        self.deadline = deadline
        self.created_at = created_at
        self.started_at = started_at
        self.first_token_at: float | None = None
        self.rewritten = 0  # appends made again after a gap: the lost ones, the one that found it
        self._pending: PendingCall | None = None  # an append queued, its answer not yet read

    def _append(self, event: Event) -> None:
        """Queue the event's append; `settle` sends it (with whatever else is queued) and
        reads its answer. Appended, it takes `next_seq`: the script answers with the seq it was
        given, and a refused append leaves the attempt nothing more to write."""
        self.settle()
        self.check_deadline()
        self._pending = self.store.append_later(self.job_id, event, self.attempt, self.next_seq)
        self.written.append(event)
        self.next_seq += 1

    def settle(self) -> None:
        """The last queued append's answer: raises if the attempt may write no more or the
        job's cancel was requested."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        appended = self.store.appended(pending)
        if appended.gap:
            appended = self._fill(appended.seq)
        if appended.refused:
            raise JobGone(self.job_id)
        if appended.cancel_requested:
            raise JobCancelled(self.job_id)

    def send(self) -> None:
        """Send the queued append (and whatever else is queued) without waiting for its
        answer, which the next `settle` reads: a batch engine sends a step's appends before
        its next decode, so the round trip runs while llama.cpp computes. A cancel or a
        refusal is then seen one step later."""
        if self._pending is not None:
            self.store.appends.send()

    def _fill(self, end: int) -> Appended:
        """Redis's stream ends at `end`, before events this attempt wrote: write them again,
        one at a time, each at its own seq. Events before the attempt's first are not ours to
        write: if those are gone too, so is the attempt (its start was lost with them)."""
        if end < self.first_seq:
            return Appended(seq=end, cancel_requested=False, refused=True)
        log.warning("job %s: Redis lost events %d-%d; writing them again", self.job_id, end,
                    self.next_seq - 1)
        appended = Appended(seq=end, cancel_requested=False, refused=False)
        for seq in range(end, self.next_seq):
            event = self.written[seq - self.first_seq]
            appended = self.store.append(self.job_id, event, self.attempt, seq)
            if appended.refused or appended.gap:  # lost again, or moved on: the attempt ends
                return Appended(seq=seq, cancel_requested=False, refused=True)
            self.rewritten += 1
        return appended

    def check_deadline(self) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise JobTimedOut(self.job_id)

    def token(self, text: str) -> None:
        self.token_later(text)
        self.settle()

    def token_later(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        """A token event queued, not yet sent: a batch engine settles every job's tokens of a
        step in one round trip. The answer of the one before is checked first."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self._append(TokenEvent(job=self.job_id, text=text, logprobs=logprobs))
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

    def _final(self, write: Callable[[int], Finished]) -> None:
        """Write the final event at `next_seq`; if Redis lost events before it, write those
        again first, then the final event."""
        finished = write(self.next_seq)
        if finished.gap and self._fill(finished.seq).refused is False:
            write(self.next_seq)

    def succeed(self, result: dict[str, Any], usage: dict[str, int]) -> None:
        self._drain()
        timings = self.timings(usage.get("completion_tokens", 0))
        done = Done(job=self.job_id, usage=usage, timings=timings, valid=result.get("valid"))
        self._final(lambda seq: self.store.finish(
            self.job_id, done, "succeeded", self.attempt, seq, result=result, usage=usage,
            timings=timings))

    def cancelled(self) -> None:
        self._drain()
        self._final(lambda seq: self.store.finish(
            self.job_id, Cancelled(job=self.job_id), "cancelled", self.attempt, seq))

    def fail(self, error_type: str, message: str) -> None:
        self._drain()
        self._final(lambda seq: self.store.fail(
            self.job_id, error_type, message, self.attempt, seq))
