"""Every Redis name tokenpool uses, built in one place from the configured prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "tokenpool"

    def job(self, job_id: str) -> str:
        """Hash: the job record (status, request, result, error, usage, timings, seq counter)."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: every event of the job, entry id `<seq>-1`, field `event` = the JSON."""
        return f"{self.prefix}:job:{job_id}:events"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel: every event of the job, published as it is written."""
        return f"{self.prefix}:job:{job_id}"

    def channel_pattern(self) -> str:
        """PSUBSCRIBE pattern for the events of every job."""
        return f"{self.prefix}:job:*"

    def idempotency(self, key: str) -> str:
        """String: the job id a client's Idempotency-Key maps to."""
        return f"{self.prefix}:idem:{key}"

    def worker(self, name: str) -> str:
        """String (JSON, with a TTL): a worker's last heartbeat."""
        return f"{self.prefix}:worker:{name}"

    def worker_last(self, name: str) -> str:
        """String (JSON, kept `worker_gone_retention_s`): a worker's last heartbeat, read to
        show it as gone (or stopped) after its live heartbeat expired."""
        return f"{self.prefix}:worker:{name}:last"

    def worker_commands(self, name: str) -> str:
        """List: control commands for one worker (swap its model, unload), JSON, BLPOPed."""
        return f"{self.prefix}:worker:{name}:commands"

    def command_reply(self, command_id: str) -> str:
        """List (short TTL): a worker's answer to one control command."""
        return f"{self.prefix}:command:{command_id}:reply"

    def workers(self) -> str:
        """Sorted set: worker name -> time of its last heartbeat."""
        return f"{self.prefix}:workers"

    def metrics_jobs(self) -> str:
        """Hash: `kind|model|status` -> jobs that ended so; `tokens|model` -> tokens made."""
        return f"{self.prefix}:metrics:jobs"

    def metrics_histograms(self) -> str:
        """Hash: `metric|model|le` -> count of finished jobs at or under `le` (cumulative, as
        Prometheus wants), `metric|model|sum` and `metric|model|count`."""
        return f"{self.prefix}:metrics:histograms"

    def running(self) -> str:
        """Hash: job id -> name of the worker running its current attempt (the reaper's index)."""
        return f"{self.prefix}:running"

    def dead_letters(self) -> str:
        """Sorted set: job id -> time it was dead-lettered (its worker died max_attempts times)."""
        return f"{self.prefix}:dead-letters"

    def replication_mark(self) -> str:
        """Counter the API bumps after a submit, on the connection it then WAITs on, so that
        the replicas' acknowledgement covers the job and its Celery message before it."""
        return f"{self.prefix}:replicated"

    def reaper_lock(self) -> str:
        """String with a TTL: held by the one worker whose reaper runs this round."""
        return f"{self.prefix}:reaper"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's kind, model, options, total and counters (succeeded, failed,
        cancelled, started, ended_started, tokens), kept by the scripts that start and end
        its jobs (a job names this key in its `batch_key` field)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_items(self, batch_id: str) -> str:
        """List: the batch's items in submission order, JSON {"id": item id, "job": job id}
        (a retried item's entry names its new job)."""
        return f"{self.prefix}:batch:{batch_id}:items"

    def batch_done(self, batch_id: str) -> str:
        """Stream: one entry per job of the batch that ended (index, item, job, status), in
        the order they ended; written by the job-ending scripts as `<batch key>:done`."""
        return f"{self.batch(batch_id)}:done"

    def batches(self) -> str:
        """Sorted set: batch id -> time it was created (listing and housekeeping)."""
        return f"{self.prefix}:batches"

    def schedule(self, name: str) -> str:
        """Hash: a schedule's last run (batch id, time, outcome) and how many ticks it skipped."""
        return f"{self.prefix}:schedule:{name}"

    def schedule_lock(self, name: str) -> str:
        """String with a TTL: held while one tick of a schedule runs (no two at once)."""
        return f"{self.prefix}:schedule:{name}:lock"

    def schedule_seen(self, name: str) -> str:
        """Set: files a directory schedule has already summarised (path, size, mtime)."""
        return f"{self.prefix}:schedule:{name}:seen"

    def api_key(self, key_id: str) -> str:
        """Hash: one API key (name, SHA-256 digest of its secret, expiry, models, revoked)."""
        return f"{self.prefix}:apikey:{key_id}"

    def api_keys(self) -> str:
        """Set: every API key id; none means the API needs no key (and binds loopback only)."""
        return f"{self.prefix}:apikeys"

    def key_requests(self, key_id: str, minute: int) -> str:
        """Counter (expires): requests of one API key in one minute (epoch minutes)."""
        return f"{self.prefix}:apikey:{key_id}:rpm:{minute}"

    def key_active(self, key_id: str) -> str:
        """Set: the key's jobs not yet ended (added by the create script, removed by the
        job-ending scripts, which find this name in the job's `owner_active` field)."""
        return f"{self.prefix}:apikey:{key_id}:active"

    def key_tokens(self, key_id: str, day: str) -> str:
        """Counter (expires): tokens generated for the key's jobs created on one UTC day."""
        return f"{self.prefix}:apikey:{key_id}:tokens:{day}"

    def reader_wake(self, reader: str) -> str:
        """Stream (a few entries, expires): wakes one API process's shared event reader when
        a follower joins, so its blocking XREAD starts again with the new job's stream."""
        return f"{self.prefix}:reader:{reader}:wake"

    def queue(self, model: str) -> str:
        """Celery queue (a Redis list) of one model's jobs."""
        return f"{self.prefix}.{model}"

    def waiting(self, model: str) -> str:
        """Sorted set: a model's queued jobs, by priority then submit time (score
        `(9 - priority) * 1e13 + created_ms`): ZRANK is a job's place in the queue."""
        return f"{self.prefix}:waiting:{model}"

    def fair(self, model: str) -> str:
        """Prefix of a model's fair queue (broker.fair): `:slots` the live workers' slots,
        `:out` jobs sent to Celery and not ended, `:t:<p>` waiting tenants by start tag,
        `:q:<p>:<tenant>` each tenant's messages, `:l:<p>:<tenant>` its queued jobs in order,
        `:tag` virtual times, weights and counters."""
        return f"{self.prefix}:fair:{model}"

    def file(self, file_id: str) -> str:
        """Hash: an uploaded (or a batch's output) file's metadata (OpenAI's Files API)."""
        return f"{self.prefix}:file:{file_id}"

    def file_content(self, file_id: str) -> str:
        """String: that file's bytes."""
        return f"{self.prefix}:file:{file_id}:content"

    def files(self) -> str:
        """Sorted set: file ids by creation time."""
        return f"{self.prefix}:files"

    def webhooks_due(self) -> str:
        """Sorted set: deliveries `<job id>|<target>` by when they are next due (the webhooks
        process claims due ones with a lease, and puts failed ones back for later)."""
        return f"{self.prefix}:webhooks:due"

    def webhook(self, delivery: str) -> str:
        """Hash: one delivery's attempts, last answer or error, and outcome."""
        return f"{self.prefix}:webhook:{delivery}"

    def webhooks_dead(self) -> str:
        """Sorted set: deliveries that failed webhook_max_attempts times, by when."""
        return f"{self.prefix}:webhooks:dead"

    def webhooks_queue(self) -> str:
        """Celery queue of webhook deliveries (only `tokenpool webhooks` consumes it)."""
        return f"{self.prefix}.webhooks"

    def schedules_queue(self) -> str:
        """Celery queue of the schedules' periodic tasks (every worker consumes it)."""
        return f"{self.prefix}.schedules"

    def queue_lists(self, model: str) -> list[str]:
        """The Redis lists behind a model's queue: kombu keeps one per priority step (Celery
        priority 0 in the plain name, n in `<queue>:n`); their lengths sum to its depth."""
        queue = self.queue(model)
        return [queue] + [f"{queue}:{step}" for step in range(1, 10)]


def stream_id(seq: int) -> str:
    """The stream entry id of event `seq`: resuming after seq N is XREAD from `N-1`."""
    return f"{seq}-1"
