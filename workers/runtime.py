"""What lives in a worker process: its settings, its one resident model, the job lifecycle."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from broker.keys import Keys
from broker.messages import JOB_REQUEST, MODEL_KIND_OF_JOB, EmbedJob, GenerateJob, Started
from broker.settings import ModelSpec, Settings
from broker.sources import resolve
from broker.store import JobStore
from workers.engine import EmbeddingModel, TextModel
from workers.gpu import layers_on, torch_device
from workers.heartbeat import Heartbeat
from workers.runners import Outcome, run_embed, run_generate, run_summarize
from workers.writer import EventWriter, JobCancelled, JobGone

log = logging.getLogger("tokenpool.worker")


def load_model(spec: ModelSpec, settings: Settings, gpu: str) -> TextModel | EmbeddingModel:
    path = resolve(spec.source, settings.cache_dir)
    if spec.kind == "llm":
        from workers.llama_model import LlamaModel

        return LlamaModel(path, spec.n_ctx, layers_on(gpu, spec.n_gpu_layers), spec.n_threads)
    from workers.st_model import SentenceTransformerModel

    return SentenceTransformerModel(path, torch_device(gpu))


class WorkerRuntime:
    """One worker: `model_name` resident on `gpu`, jobs run one after another."""

    def __init__(
        self, settings: Settings, model_name: str, gpu: str, redis_url: str, name: str
    ) -> None:
        self.settings, self.model_name, self.gpu, self.name = settings, model_name, gpu, name
        self.spec = settings.models[model_name]
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(redis_url, health_check_interval=30)
        self.store = JobStore(self.redis, settings)
        self.state = "idle"
        self.counts = {"jobs_done": 0, "jobs_failed": 0}
        self.current_job: str | None = None
        self._model: TextModel | EmbeddingModel | None = None
        self._load_error: str | None = None
        self._lock = threading.Lock()
        self.heartbeat = Heartbeat(
            self.redis, self.keys, settings.heartbeat_interval_s, settings.heartbeat_ttl_s,
            self.snapshot,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model_name, "kind": self.spec.kind,
            "gpu": self.gpu, "queue": self.keys.queue(self.model_name), "state": self.state,
            "current_job": self.current_job, "error": self._load_error, **self.counts,
        }

    def start(self) -> None:
        """Begin heartbeats and load the model in the background; jobs wait for it."""
        self.heartbeat.start()
        threading.Thread(target=self.model, name="model-load", daemon=True).start()

    def model(self) -> TextModel | EmbeddingModel:
        with self._lock:
            if self._model is None:
                self.state = "loading"
                self.heartbeat.beat()
                started = time.monotonic()
                try:
                    self._model = load_model(self.spec, self.settings, self.gpu)
                except Exception as exc:
                    self.state, self._load_error = "error", f"{type(exc).__name__}: {exc}"
                    raise
                log.info("model %s loaded in %.2fs", self.model_name, time.monotonic() - started)
                self.state, self._load_error = "loaded", None
            return self._model

    def stop(self) -> None:
        self.heartbeat.stop(self.name)
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    def run(self, job_id: str, kind: str) -> str:
        """Run one job to a final event; returns the job's final status (or `skipped`)."""
        attempt = self.store.start(job_id, self.name)
        if attempt < 0:
            log.info("job %s: already ended or unknown; not run", job_id)
            return "skipped"
        self.current_job, self.state = job_id, "generating"
        try:
            return self._run(job_id, kind, attempt)
        finally:
            self.current_job, self.state = None, "loaded" if self._model else self.state

    def _run(self, job_id: str, kind: str, attempt: int) -> str:
        record = self.store.get(job_id) or {}
        self.store.append(job_id, Started(job=job_id, worker=self.name, attempt=attempt))
        out = EventWriter(self.store, job_id, record.get("created_at") or time.time(), time.time())
        log.info("job %s: %s attempt %d", job_id, kind, attempt)
        try:
            outcome = self._execute(record, kind, out)
        except JobCancelled:
            out.cancelled()
            log.info("job %s: cancelled", job_id)
            return "cancelled"
        except JobGone:
            log.info("job %s: ended elsewhere while running", job_id)
            return "gone"
        except Exception as exc:
            self.counts["jobs_failed"] += 1
            self.store.fail(job_id, _error_type(exc), str(exc) or type(exc).__name__)
            log.warning("job %s: failed: %s: %s", job_id, type(exc).__name__, exc)
            return "failed"
        out.succeed(outcome.result, outcome.usage)
        self.counts["jobs_done"] += 1
        log.info("job %s: succeeded %s", job_id, outcome.usage)
        return "succeeded"

    def _execute(self, record: dict[str, Any], kind: str, out: EventWriter) -> Outcome:
        job = JOB_REQUEST.validate_python(record.get("request"))
        if job.kind != kind or MODEL_KIND_OF_JOB[kind] != self.spec.kind:
            raise WrongModelKind(f"{kind} job on {self.spec.kind} model {self.model_name!r}")
        model = self.model()
        if isinstance(job, EmbedJob):
            return run_embed(job, model, out)  # type: ignore[arg-type]
        if isinstance(job, GenerateJob):
            return run_generate(job, model, self.spec, out)  # type: ignore[arg-type]
        overlap = self.settings.summary_chunk_overlap_tokens
        return run_summarize(job, model, self.spec, out, overlap)  # type: ignore[arg-type]


class WrongModelKind(ValueError):
    pass


_ERROR_TYPES = {
    "ContextOverflow": "context_length_exceeded",
    "ValidationError": "invalid_request",
    "WrongModelKind": "invalid_request",
}


def _error_type(exc: Exception) -> str:
    return _ERROR_TYPES.get(type(exc).__name__, "worker_error")
