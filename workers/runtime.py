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

from broker.connection import worker_redis
from broker.keys import Keys
from broker.messages import JOB_REQUEST, MODEL_KIND_OF_JOB, EmbedJob, GenerateJob
from broker.recovery import Reaper
from broker.settings import ModelSpec, Settings
from broker.sources import resolve
from broker.store import JobStore, Started
from workers.engine import EmbeddingModel, TextModel
from workers.gpu import layers_on, torch_device
from workers.heartbeat import Heartbeat, Periodic
from workers.runners import Outcome, run_embed, run_generate, run_summarize
from workers.writer import EventWriter, JobCancelled, JobGone, JobTimedOut

log = logging.getLogger("tokenpool.worker")


def load_model(spec: ModelSpec, settings: Settings, gpu: str) -> TextModel | EmbeddingModel:
    path = resolve(spec.source, settings.cache_dir)
    if spec.kind == "llm":
        from workers.llama_model import LlamaModel

        return LlamaModel(path, spec.n_ctx, layers_on(gpu, spec.n_gpu_layers), spec.n_threads,
                          spec.max_batch, spec.prompt_chunk_tokens, spec.batch_invariant)
    from workers.microbatch import MicroBatcher
    from workers.st_model import SentenceTransformerModel

    model = SentenceTransformerModel(path, torch_device(gpu))
    return MicroBatcher(model, spec.batch_wait_ms / 1000, spec.max_batch * spec.max_texts)


class WorkerRuntime:
    """One worker: `model_name` resident on `gpu`, jobs run one after another."""

    def __init__(
        self, settings: Settings, model_name: str, gpu: str, redis_url: str, name: str,
        celery: Celery | None = None,
    ) -> None:
        self.settings, self.model_name, self.gpu, self.name = settings, model_name, gpu, name
        self.spec = settings.models[model_name]
        self.keys = Keys(settings.key_prefix)
        self.redis = worker_redis(redis_url, settings.worker_redis_retry_s, name)
        self.store = JobStore(self.redis, settings)
        self.model_state = "idle"  # idle, loading, loaded or error
        self.counts = {"jobs_done": 0, "jobs_failed": 0}
        self.jobs: set[str] = set()  # running now: up to max_batch, one per Celery thread
        self._jobs_lock = threading.Lock()
        self._model: TextModel | EmbeddingModel | None = None
        self._load_error: str | None = None
        self._lock = threading.Lock()
        self.heartbeat = Heartbeat(
            self.redis, self.keys, settings.heartbeat_interval_s, settings.heartbeat_ttl_s,
            self.snapshot,
        )
        # Every worker takes part in reaping lost jobs (one per round, by a lock in Redis).
        self.reaper = (
            Periodic("reaper", settings.heartbeat_interval_s,
                     Reaper(self.redis, self.store, celery, settings, name).run_once)
            if celery is not None else None
        )

    @property
    def state(self) -> str:
        return "generating" if self.jobs and self.model_state == "loaded" else self.model_state

    def _count(self, name: str) -> None:
        with self._jobs_lock:
            self.counts[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._jobs_lock:
            jobs = sorted(self.jobs)
        return {
            "name": self.name, "model": self.model_name, "kind": self.spec.kind,
            "gpu": self.gpu, "queue": self.keys.queue(self.model_name), "state": self.state,
            "current_job": min(jobs) if jobs else None, "error": self._load_error,
            **self.counts, "jobs": jobs, "max_batch": self.spec.max_batch,
            "batches": getattr(self._model, "batches", None),
        }

    def start(self) -> None:
        """Begin heartbeats and load the model in the background; jobs wait for it."""
        self.heartbeat.start()
        if self.reaper is not None:
            self.reaper.start()
        threading.Thread(target=self.model, name="model-load", daemon=True).start()

    def model(self) -> TextModel | EmbeddingModel:
        with self._lock:
            if self._model is None:
                self.model_state = "loading"
                self.heartbeat.beat()
                started = time.monotonic()
                try:
                    self._model = load_model(self.spec, self.settings, self.gpu)
                except Exception as exc:
                    self.model_state = "error"
                    self._load_error = f"{type(exc).__name__}: {exc}"
                    raise
                log.info("model %s loaded in %.2fs", self.model_name, time.monotonic() - started)
                self.model_state, self._load_error = "loaded", None
            return self._model

    def stop(self) -> None:
        if self.reaper is not None:
            self.reaper.stop()
        self.heartbeat.stop(self.name)
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    def run(self, job_id: str, kind: str, dispatch: int = 1) -> str:
        """Run one delivery of a job to a final event; returns the job's final status, or
        `skipped` when this delivery must not run, or `lost` when Redis stayed away."""
        with self._jobs_lock:
            self.jobs.add(job_id)
        try:
            started = self.store.start(job_id, self.name, dispatch, uuid.uuid4().hex)
            if started is None:
                log.info("job %s: delivery %d is stale (ended, running or requeued); not run",
                         job_id, dispatch)
                return "skipped"
            return self._run(job_id, kind, started)
        except redis.RedisError as exc:
            log.error("job %s: Redis unreachable for %.0fs (%s); left to the reaper", job_id,
                      self.settings.worker_redis_retry_s, exc)
            return "lost"
        finally:
            # The next heartbeat says so; the reaper judges a job only by a heartbeat written
            # a second after its start, which names every job this worker runs by then.
            with self._jobs_lock:
                self.jobs.discard(job_id)

    def run_many(self, job_ids: list[str], kind: str) -> list[str]:
        """The jobs of one bulk message, side by side (they batch together in the model)."""
        with ThreadPoolExecutor(max_workers=min(len(job_ids), self.spec.max_batch)) as pool:
            return list(pool.map(lambda job_id: self.run(job_id, kind, 1), job_ids))

    def _run(self, job_id: str, kind: str, started: Started) -> str:
        record = self.store.get(job_id) or {}
        first_start = record.get("started_at") or time.time()
        out = EventWriter(self.store, job_id, started.attempt, started.next_seq,
                          started.deadline, record.get("created_at") or first_start, first_start)
        resume = self.store.published_text(job_id) if started.attempt > 1 else ""
        log.info("job %s: %s attempt %d%s", job_id, kind, started.attempt,
                 f", going on after {len(resume)} published characters" if resume else "")
        try:
            outcome = self._execute(record, kind, out, resume)
        except JobCancelled:
            out.cancelled()
            log.info("job %s: cancelled", job_id)
            return "cancelled"
        except JobGone:
            log.info("job %s: ended or requeued elsewhere while running", job_id)
            return "gone"
        except redis.RedisError:
            raise
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

    def _execute(
        self, record: dict[str, Any], kind: str, out: EventWriter, resume: str
    ) -> Outcome:
        job = JOB_REQUEST.validate_python(record.get("request"))
        if job.kind != kind or MODEL_KIND_OF_JOB[kind] != self.spec.kind:
            raise WrongModelKind(f"{kind} job on {self.spec.kind} model {self.model_name!r}")
        model = self.model()
        out.check_deadline()
        if isinstance(job, EmbedJob):
            return run_embed(job, model, out)  # type: ignore[arg-type]
        if isinstance(job, GenerateJob):
            return run_generate(job, model, self.spec, out, resume)  # type: ignore[arg-type]
        overlap = self.settings.summary_chunk_overlap_tokens
        return run_summarize(job, model, self.spec, out, overlap, resume)  # type: ignore[arg-type]


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
