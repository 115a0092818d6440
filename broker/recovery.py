"""The reaper: finds running jobs whose worker is lost and queues them again, or fails them.

Celery on Redis redelivers an unacknowledged message only after the visibility timeout (an
hour), so a SIGKILLed worker's job would wait that long. Instead every worker runs a reaper;
one of them per round (a lock with a TTL) looks at each running job:

- its worker's heartbeat expired, or the worker beats but no longer names the job: the
  attempt is lost. The job is queued again with a new dispatch number (a stale redelivery of
  an older message is then refused by the start script), and the next attempt goes on after
  the tokens already published. After `max_attempts` lost attempts the job ends `failed`
  (`worker_lost`) and goes to the dead-letter set instead (a poison job never loops).
- it is past its deadline by `timeout_grace_s` (its worker is stuck in one long step): it ends
  `failed` with a timeout; the worker's next write is refused and it moves on.

Right after Redis restarts every heartbeat may have expired while the workers are fine, so
the reaper waits until Redis has been up for a full heartbeat TTL before it judges anyone. The
same after a Sentinel failover: the promoted replica has been up for long, but the workers
could not beat while there was no master, so a reaper that sees another server (its run_id)
than before waits from then a heartbeat TTL plus the time a worker's stuck connection takes
to fail and reconnect (socket and connect timeouts: 27 s with the defaults); a reaper that has
just started waits a heartbeat TTL (it may have started just after a failover). Every reaper
looks at the server every round, its turn or not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from broker.celery_app import send_job
from broker.connection import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S
from broker.keys import Keys
from broker.settings import Settings
from broker.store import JobStore

log = logging.getLogger("tokenpool.reaper")


@dataclass(frozen=True)
class Verdict:
    action: str  # "requeue" (the attempt is lost) or "timeout"
    reason: str


def judge(
    job_id: str, worker: str, record: dict[str, Any], beat: dict[str, Any] | None,
    now: float, grace_s: float,
) -> Verdict | None:
    """What to do with one running job, from its record and its worker's last heartbeat."""
    deadline = record.get("deadline")
    if deadline is not None and now > deadline + grace_s:
        return Verdict("timeout", f"the job ran past its time limit of {record['timeout_s']}s "
                       f"and its worker {worker} did not stop it")
    if beat is None:
        return Verdict("requeue", f"worker {worker} stopped sending heartbeats")
    started = record.get("attempt_started_at") or 0.0
    if job_id not in beat.get("jobs", []) and beat.get("ts", 0.0) > started + 1.0:
        return Verdict("requeue", f"worker {worker} is alive but no longer runs the job")
    return None


class Reaper:
    def __init__(
        self, client: redis.Redis, store: JobStore, celery: Celery, settings: Settings,
        owner: str,
    ) -> None:
        self.redis, self.store, self.celery = client, store, celery
        self.settings, self.owner = settings, owner
        self.keys = Keys(settings.key_prefix)
        self._server: tuple[str, float] | None = None  # run_id, and when it was first seen

    def run_once(self) -> list[tuple[str, str]]:
        """One round; returns (job id, outcome) for every job it acted on."""
        settled = self._redis_settled()  # every round, so that a failover is seen by all
        if not self._my_turn() or not settled:
            return []
        running = self.store.running()
        if not running:
            return []
        beats = self._heartbeats(set(running.values()))
        acted = []
        for job_id, worker in running.items():
            outcome = self._reap(job_id, worker, beats.get(worker))
            if outcome:
                acted.append((job_id, outcome))
        return acted

    def _my_turn(self) -> bool:
        ttl_ms = max(100, int(self.settings.heartbeat_interval_s * 900))
        return bool(self.redis.set(self.keys.reaper_lock(), self.owner, nx=True, px=ttl_ms))

    def _redis_settled(self) -> bool:
        info = self.redis.info("server")
        window_s = self.settings.heartbeat_ttl_s + self.settings.heartbeat_interval_s
        # A live worker's threads may still be stuck on the old server's connections: they
        # fail within SOCKET_TIMEOUT_S, reconnect (CONNECT_TIMEOUT_S a try) and beat again.
        moved_s = window_s + SOCKET_TIMEOUT_S + CONNECT_TIMEOUT_S
        run_id, now = str(info.get("run_id", "")), time.monotonic()
        if self._server is None:  # a new reaper judges no one before a TTL of its own
            self._server = (run_id, now - moved_s + window_s)
        elif self._server[0] != run_id:  # restarted, or another server after a failover
            log.warning("Redis is another server now (run_id %s); judging no worker for %.1fs",
                        run_id[:8], moved_s)
            self._server = (run_id, now)
        uptime_s = float(info.get("uptime_in_seconds", 0))
        return uptime_s >= window_s and now - self._server[1] >= moved_s

    def _heartbeats(self, workers: set[str]) -> dict[str, dict[str, Any]]:
        names = sorted(workers)
        raw = self.redis.mget([self.keys.worker(name) for name in names])
        return {name: json.loads(b) for name, b in zip(names, raw, strict=True) if b}

    def _reap(self, job_id: str, worker: str, beat: dict[str, Any] | None) -> str | None:
        record = self.store.get(job_id)
        if record is None or record["status"] != "running" or record["worker"] != worker:
            self.redis.hdel(self.keys.running(), job_id)  # ended meanwhile, or expired
            return None
        verdict = judge(job_id, worker, record, beat, time.time(), self.settings.timeout_grace_s)
        if verdict is None:
            return None
        if verdict.action == "timeout":
            self.store.fail(job_id, "timeout", verdict.reason, record["attempts"])
            log.warning("job %s: %s", job_id, verdict.reason)
            return "timed_out"
        return self._requeue(job_id, worker, record, verdict.reason)

    def _requeue(self, job_id: str, worker: str, record: dict[str, Any], reason: str) -> str:
        return requeue_attempt(self.store, self.celery, self.keys, self.settings, job_id, worker,
                               record, reason)


def requeue_attempt(
    store: JobStore, celery: Celery, keys: Keys, settings: Settings, job_id: str, worker: str,
    record: dict[str, Any], reason: str,
) -> str:
    """End `worker`'s attempt at a running job and queue the job again (a new dispatch), or
    dead-letter it after max_attempts: the reaper for a lost worker, a swap for its own jobs."""
    attempt = record["attempts"]
    outcome, dispatch = store.requeue(job_id, worker, attempt, settings.max_attempts, reason)
    if outcome == "requeued":
        request = record["request"] or {}
        send_job(celery, keys, job_id, record["kind"], record["model"],
                 int(request.get("priority", 5)), dispatch)
        log.warning("job %s: attempt %d ended (%s); queued again", job_id, attempt, reason)
    elif outcome == "dead":
        log.error("job %s: attempt %d ended (%s); dead-lettered after %d attempts",
                  job_id, attempt, reason, attempt)
    return outcome
