"""What lives in a worker process: its settings, its one resident model, the job lifecycle."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery import Celery

from broker.celery_app import send_job
from broker.connection import worker_redis
from broker.keys import Keys
from broker.messages import JOB_REQUEST, MODEL_KIND_OF_JOB, EmbedJob, GenerateJob
from broker.recovery import Reaper, requeue_attempt
from broker.settings import ModelSpec, Settings
from broker.sources import resolve
from broker.store import JobStore, Started
from workers.control import ControlLoop
from workers.engine import EmbeddingModel, TextModel
from workers.gpu import layers_on, prompt_chunk, torch_device
from workers.heartbeat import Heartbeat, Periodic
from workers.runners import (
    NOTHING,
    Outcome,
    Published,
    run_embed,
    run_generate,
    run_summarize,
)
from workers.state import IllegalTransition, StateMachine
from workers.telemetry import TokenRate, gpu_memory, host_memory
from workers.writer import EventWriter, JobCancelled, JobGone, JobTimedOut

log = logging.getLogger("tokenpool.worker")


def batch_invariant_on(spec: ModelSpec, gpu: str) -> bool:
    """Whether the model runs batch-invariant here. The invariant settings are the CPU
    backend's (row-invariant kernels, steps in whole groups of rows); llama.cpp's CUDA kernels
    pick their algorithms by batch shape, and on an H200 a greedy job alone gave another text
    on its second run and beside 7 others (issue 22). So a model with layers on a GPU runs
    without it, and says so, rather than promise what it cannot keep."""
    return spec.kind == "llm" and spec.batch_invariant and layers_on(gpu, spec.n_gpu_layers) == 0


def load_model(spec: ModelSpec, settings: Settings, gpu: str) -> TextModel | EmbeddingModel:
    path = resolve(spec.source, settings.cache_dir)
    if spec.kind == "llm":
        from workers.llama_model import LlamaModel

        if spec.batch_invariant and not batch_invariant_on(spec, gpu):
            log.warning("batch_invariant is not kept on a GPU (llama.cpp's CUDA kernels depend "
                        "on the batch): GPU %s runs this model without it", gpu)
        layers = layers_on(gpu, spec.n_gpu_layers)
        return LlamaModel(path, spec.n_ctx, layers, spec.n_threads, spec.max_batch,
                          prompt_chunk(spec.prompt_chunk_tokens, layers),
                          batch_invariant_on(spec, gpu), spec.fast_prefill)
    from workers.microbatch import MicroBatcher
    from workers.st_model import SentenceTransformerModel

    model = SentenceTransformerModel(path, torch_device(gpu))
    return MicroBatcher(model, spec.batch_wait_ms / 1000, spec.max_batch * spec.max_texts)


class WorkerRuntime:
    """One worker: one resident model at a time on `gpu`, up to max_batch jobs at once; its
    model can be swapped for another configured one, or unloaded, while the process lives."""

    def __init__(
        self, settings: Settings, model_name: str, gpu: str, redis_url: str, name: str,
        celery: Celery | None = None,
    ) -> None:
        self.settings, self.model_name, self.gpu, self.name = settings, model_name, gpu, name
        self.spec = settings.models[model_name]
        self.keys = Keys(settings.key_prefix)
        self.celery = celery
        self.redis = worker_redis(redis_url, settings.worker_redis_retry_s, name)
        self.store = JobStore(self.redis, settings)
        self.machine = StateMachine()
        self.rate = TokenRate()
        self.counts = {"jobs_done": 0, "jobs_failed": 0}
        self.jobs: set[str] = set()  # running now: up to max_batch, one per Celery thread
        self._jobs_lock = threading.Lock()
        self._model: TextModel | EmbeddingModel | None = None
        self._load_error: str | None = None
        self._lock = threading.Lock()
        self.accepting = True  # False while a swap or an unload drains: deliveries go back
        self.consuming = True  # whether Celery consumes our model's queue
        self.parked = False  # unloaded by an operator: idle until told to load a model
        self.swap: dict[str, Any] | None = None  # the swap under way, for the heartbeat
        self.last_active = time.monotonic()
        self.heartbeat = Heartbeat(
            self.redis, self.keys, settings.heartbeat_interval_s, settings.heartbeat_ttl_s,
            self.snapshot, settings.worker_gone_retention_s,
        )
        self.loops = [Periodic("control", 0.0, ControlLoop(self).run_once),
                      Periodic("keep-alive", 1.0, self.unload_if_idle),
                      Periodic("fair-pump", settings.heartbeat_interval_s,
                               lambda: self.store.pump_fair(self.model_name))]
        # Every worker takes part in reaping lost jobs (one per round, by a lock in Redis).
        if celery is not None:
            self.loops.append(Periodic("reaper", settings.heartbeat_interval_s,
                                       Reaper(self.redis, self.store, celery, settings,
                                              name).run_once))

    @property
    def state(self) -> str:
        return self.machine.state

    def _count(self, name: str) -> None:
        with self._jobs_lock:
            self.counts[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._jobs_lock:
            jobs = sorted(self.jobs)
        return {
            "name": self.name, "model": self.model_name, "kind": self.spec.kind,
            "gpu": self.gpu, "queue": self.keys.queue(self.model_name), "state": self.state,
            "state_since": round(self.machine.since, 3), "transitions": self.machine.recent(),
            "current_job": min(jobs) if jobs else None, "error": self._load_error,
            **self.counts, "jobs": jobs, "max_batch": self.spec.max_batch,
            "batches": getattr(self._model, "batches", None),
            "batch_invariant": batch_invariant_on(self.spec, self.gpu),
            "tokens_per_s": self.rate.rate(), "consuming": self.consuming,
            "parked": self.parked, "swap": self.swap, "keep_alive_s": self.spec.keep_alive_s,
            **gpu_memory(self.gpu), **host_memory(),
        }

    def start(self) -> None:
        """Begin heartbeats and load the model in the background; jobs wait for it."""
        self.heartbeat.start()
        for loop in self.loops:
            loop.start()
        threading.Thread(target=self.model, name="model-load", daemon=True).start()

    def model(self) -> TextModel | EmbeddingModel:
        with self._lock:
            if self._model is None:
                self.machine.to("loading")
                self.heartbeat.beat_now()
                started = time.monotonic()
                try:
                    self._model = load_model(self.spec, self.settings, self.gpu)
                except Exception as exc:
                    self.machine.to("error")
                    self._load_error = f"{type(exc).__name__}: {exc}"
                    raise
                log.info("model %s loaded in %.2fs", self.model_name, time.monotonic() - started)
                self._load_error = None
                self.machine.to("loaded")
                self.last_active = time.monotonic()
            return self._model

    def unload(self) -> bool:
        """Free the model if it is loaded and no job runs (loaded -> unloading -> idle)."""
        with self._lock:
            if self._model is None or not self.machine.to_if("loaded", "unloading"):
                return False
            self.heartbeat.beat_now()
            try:
                self._model.close()
            finally:
                self._model = None
                self.machine.to("idle")
            log.info("model %s unloaded", self.model_name)
            return True

    def unload_if_idle(self) -> None:
        """Ollama's keep-alive: unload after keep_alive_s without a job; the next job loads."""
        keep_alive_s = self.spec.keep_alive_s
        if (keep_alive_s is None or self.swap is not None or self.jobs
                or time.monotonic() - self.last_active < keep_alive_s):
            return
        if self.unload():
            log.info("model %s idle for %.0fs: unloaded (keep_alive_s)", self.model_name,
                     keep_alive_s)

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        self.heartbeat.stop()
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    def run(self, job_id: str, kind: str, dispatch: int = 1) -> str:
        """Run one delivery of a job to a final event; returns the job's final status, or
        `skipped` when this delivery must not run, or `lost` when Redis stayed away."""
        if not self.accepting or self.redis.hget(self.keys.job(job_id), "model") not in (
                None, self.model_name.encode()):
            log.info("job %s: not for this worker now (draining, or its model was swapped "
                     "out); back to the queue", job_id)
            return "rejected"
        try:
            started = self.store.start(job_id, self.name, dispatch, uuid.uuid4().hex)
        except redis.RedisError as exc:
            return self._lost(job_id, exc)
        if started is None:
            # A stale delivery: ended, requeued, or (a redelivery after the visibility
            # timeout) running right now, perhaps on this very worker, which must go on
            # naming it in its heartbeat: so a job joins `jobs` only once it has started.
            log.info("job %s: delivery %d is stale (ended, running or requeued); not run",
                     job_id, dispatch)
            return "skipped"
        with self._jobs_lock:
            self.jobs.add(job_id)
        try:
            status = self._run(job_id, kind, started)
            if status == "gone":
                self._resend_if_start_lost(job_id, dispatch)
            return status
        except redis.RedisError as exc:
            return self._lost(job_id, exc)
        finally:
            # The reaper judges a job only by a heartbeat written a second after its start,
            # which names every job this worker runs by then.
            with self._jobs_lock:
                self.jobs.discard(job_id)
                if not self.jobs:
                    self.machine.to_if("generating", "loaded")
            self.last_active = time.monotonic()

    def _resend_if_start_lost(self, job_id: str, dispatch: int) -> None:
        """A job back to `queued` under this very dispatch lost our start with Redis's last
        writes (a failover to a replica that had not got them): its message was taken by us,
        so nothing would run it. Send it again (a second copy is refused by the start script)."""
        record = self.store.get(job_id)
        if record is not None and record["status"] == "queued" and record["dispatch"] == dispatch:
            log.warning("job %s: Redis lost this worker's start of it; queued again", job_id)
            self.resend(job_id)

    def _lost(self, job_id: str, exc: Exception) -> str:
        log.error("job %s: Redis unreachable for %.0fs (%s); left to the reaper", job_id,
                  self.settings.worker_redis_retry_s, exc)
        return "lost"

    def run_many(self, job_ids: list[str], kind: str) -> list[str]:
        """The jobs of one bulk message, side by side (they batch together in the model)."""
        with ThreadPoolExecutor(max_workers=min(len(job_ids), self.spec.max_batch)) as pool:
            statuses = list(pool.map(lambda job_id: self.run(job_id, kind, 1), job_ids))
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status == "rejected":  # the message is acked: send this job on its own
                self.resend(job_id)
        return statuses

    def resend(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if self.celery is None or record is None or record["status"] != "queued":
            return
        priority = int((record["request"] or {}).get("priority", 5))
        send_job(self.celery, self.keys, job_id, record["kind"], record["model"], priority,
                 record["dispatch"])

    def _run(self, job_id: str, kind: str, started: Started) -> str:
        record = self.store.get(job_id) or {}
        first_start = record.get("started_at") or time.time()
        out = EventWriter(self.store, job_id, started.attempt, started.next_seq,
                          started.deadline, record.get("created_at") or first_start, first_start,
                          on_token=self.rate.add)
        earlier = (Published.of(self.store.published_tokens(job_id)) if started.attempt > 1
                   else NOTHING)
        log.info("job %s: %s attempt %d%s", job_id, kind, started.attempt,
                 f", going on after {len(earlier.text)} published characters"
                 if earlier.text else "")
        try:
            outcome = self._execute(record, kind, out, earlier)
        except JobCancelled:
            out.cancelled()
            log.info("job %s: cancelled", job_id)
            return "cancelled"
        except JobGone:
            log.info("job %s: ended or requeued elsewhere while running", job_id)
            return "gone"
        except redis.RedisError:
            raise
        except IllegalTransition as exc:
            return self._hand_back(job_id, record, exc)
        except Exception as exc:
            self._count("jobs_failed")
            error_type, message = _error_of(exc, record)
            out.fail(error_type, message)
            log.warning("job %s: failed: %s: %s", job_id, error_type, message)
            return "failed"
        out.succeed(outcome.result, outcome.usage)
        self._count("jobs_done")
        log.info("job %s: succeeded %s", job_id, outcome.usage)
        return "succeeded"

    def _hand_back(self, job_id: str, record: dict[str, Any], exc: Exception) -> str:
        """The worker's own state (not the job) stopped this attempt: the job goes back to the
        queue for another worker, or this one once it is ready; it is never failed for it."""
        log.warning("job %s: this worker cannot run it now (%s); back to the queue", job_id, exc)
        record = self.store.get(job_id) or record
        if self.celery is not None and record.get("status") == "running":
            requeue_attempt(self.store, self.celery, self.keys, self.settings, job_id,
                            self.name, record, f"worker {self.name} was not ready ({exc})")
        return "handed_back"

    def _execute(
        self, record: dict[str, Any], kind: str, out: EventWriter, earlier: Published
    ) -> Outcome:
        job = JOB_REQUEST.validate_python(record.get("request"))
        if job.kind != kind or MODEL_KIND_OF_JOB[kind] != self.spec.kind:
            raise WrongModelKind(f"{kind} job on {self.spec.kind} model {self.model_name!r}")
        model = self.model()
        self.machine.to_if("loaded", "generating")
        out.check_deadline()
        if isinstance(job, EmbedJob):
            return run_embed(job, model, out)  # type: ignore[arg-type]
        if isinstance(job, GenerateJob):
            return run_generate(job, model, self.spec, out, earlier)  # type: ignore[arg-type]
        overlap = self.settings.summary_chunk_overlap_tokens
        return run_summarize(job, model, self.spec, out, overlap,  # type: ignore[arg-type]
                             earlier.text)


class WrongModelKind(ValueError):
    pass


_ERROR_TYPES = {
    "ContextOverflow": "context_length_exceeded",
    "ValidationError": "invalid_request",
    "WrongModelKind": "invalid_request",
    "JobTimedOut": "timeout",
}


def _error_of(exc: Exception, record: dict[str, Any]) -> tuple[str, str]:
    """The error type and message a failed job ends with."""
    error_type = _ERROR_TYPES.get(type(exc).__name__, "worker_error")
    if isinstance(exc, JobTimedOut):
        return error_type, f"the job ran past its time limit of {record.get('timeout_s')}s"
    return error_type, str(exc) or type(exc).__name__
