"""Batches: many items of one kind become ordinary jobs; the batch's state lives in Redis.

The API (POST /v1/batches) and the schedules create them; nothing here holds a whole batch:
items go in and out in chunks of CHUNK, counters are kept by the scripts that start and end
jobs (see broker.store), and the item list is a Redis list of small entries.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Literal, TypeVar, cast

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.constraints import ResponseFormat
from broker.fair import Dispatcher, Tenant
from broker.keys import Keys
from broker.messages import JOB_REQUEST, EmbedJob, GenerateJob, JobRequest, SummarizeJob
from broker.settings import Settings
from broker.store import BATCH_RUNNING, JobStore, new_record
from broker.webhooks import BATCH_EVENTS, record_fields

CHUNK = 500
BATCH_PRIORITY = 2  # below interactive jobs' default 5: a big batch never blocks them
ENDED = ("succeeded", "failed", "cancelled")
# An API key's fields, on its jobs.
OWNER_FIELDS = ("owner", "owner_active", "owner_tokens", "owner_weight", "key_hooks")
T = TypeVar("T")


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200, description="the caller's own id")
    text: str = Field(min_length=1)


class BatchOptions(BaseModel):
    """Shared by every item: the summarize or embed job fields besides the text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instructions: str | None = Field(None, max_length=2000)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    normalize: bool | None = None
    timeout_s: float | None = Field(None, gt=0)
    response_format: ResponseFormat | None = Field(
        None, description="summaries: JSON of a schema (or any object), for every item")


class BatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["summarize", "embed", "generate"]
    model: str | None = Field(None, min_length=1)
    priority: int = Field(BATCH_PRIORITY, ge=0, le=9)
    options: BatchOptions = BatchOptions()
    webhook: str | None = Field(None, min_length=8, max_length=2048,
                                description="an http(s) URL told when every item has ended")

    @model_validator(mode="after")
    def _constraint_for_text(self) -> BatchSpec:
        if self.kind == "embed" and self.options.response_format is not None:
            raise ValueError("options.response_format: embeddings are vectors, not text")
        return self

    def model_name(self) -> str:
        """The model its jobs go to: the given one, else the job kind's default."""
        defaults = {"embed": EmbedJob.model_fields["model"].default,
                    "summarize": SummarizeJob.model_fields["model"].default,
                    "generate": GenerateJob.model_fields["model"].default}
        return self.model or str(defaults[self.kind])

    def job(self, text: str) -> JobRequest:
        """The job of one item (raises ValidationError naming the job's field)."""
        options = self.options.model_dump(exclude_none=True)
        if self.kind == "embed":
            fields = {"texts": [text], **{k: v for k, v in options.items()
                                          if k in ("normalize", "timeout_s")}}
        elif self.kind == "generate":  # an item's text is its prompt
            fields = {"prompt": text, **{k: v for k, v in options.items()
                                         if k not in ("normalize", "instructions")}}
        else:
            fields = {"text": text, **{k: v for k, v in options.items() if k != "normalize"}}
        model = {"model": self.model} if self.model else {}
        return JOB_REQUEST.validate_python(
            {"kind": self.kind, "priority": self.priority, **model, **fields})


def chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def progress(fields: dict[str, str], now: float) -> dict[str, Any]:
    """Counts, tokens, throughput and ETA from a batch hash."""
    n = {k: int(fields.get(k, 0)) for k in ("total", *ENDED, "started", "ended_started",
                                             "tokens", "valid", "invalid")}
    ended = sum(n[k] for k in ENDED)
    running = max(0, n["started"] - n["ended_started"])
    started_at = float(fields.get("first_started_at") or 0)
    elapsed = now - started_at if started_at else 0.0
    rate = ended / elapsed if elapsed > 0 else 0.0
    remaining = n["total"] - ended
    finished = fields.get("status") != "creating" and remaining == 0
    return {
        "id": fields.get("id"), "kind": fields.get("kind"), "model": fields.get("model"),
        "status": ("cancelled" if finished and fields.get("cancel") else
                   "completed" if finished else fields.get("status", "running")),
        "created_at": float(fields.get("created_at", 0)), "total": n["total"],
        "counts": {"queued": max(0, remaining - running), "running": running,
                   **{k: n[k] for k in ENDED}},
        **({"output": {"valid": n["valid"], "invalid": n["invalid"]}}
           if "response_format" in fields.get("options", "") else {}),
        "tokens": n["tokens"], "items_per_s": round(rate, 3),
        "tokens_per_s": round(n["tokens"] / elapsed, 2) if elapsed > 0 else 0.0,
        "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else (0.0 if finished
                                                                            else None),
        "links": {"self": f"/v1/batches/{fields.get('id')}",
                  "results": f"/v1/batches/{fields.get('id')}/results",
                  "events": f"/v1/batches/{fields.get('id')}/events"},
    }


class BatchStore:
    def __init__(self, client: redis.Redis, settings: Settings, celery: Celery) -> None:
        self.redis, self.settings, self.celery = client, settings, celery
        self.keys = Keys(settings.key_prefix)
        self.jobs = JobStore(client, settings)
        self._running = client.register_script(BATCH_RUNNING)
        self.dispatch = Dispatcher(client, celery, self.keys, settings)

    def send(self, ids: list[str], jobs: list[JobRequest], owner: dict[str, str]) -> None:
        """Queue the items' first deliveries: through the owner's fair line (broker.fair),
        or straight to Celery with fair_share off."""
        self.dispatch.send(ids, jobs, Tenant.of(owner))

    def create(self, spec: BatchSpec, items: Iterable[tuple[str, JobRequest]],
               **header: str) -> str:
        """Store and queue every item's job, a chunk at a time; the batch's id."""
        batch_id = uuid.uuid4().hex
        key = self.keys.batch(batch_id)
        key_hooks = header.pop("key_hooks", None)  # its API key's webhook endpoints
        fields: dict[str, str] = {
            "id": batch_id, "kind": spec.kind, "priority": str(spec.priority),
            "options": spec.options.model_dump_json(exclude_none=True), "total": "0",
            "status": "creating", "created_at": repr(time.time()), **header,
            **record_fields(spec.webhook, self.settings, BATCH_EVENTS, key_hooks),
            **({"key_hooks": key_hooks} if key_hooks else {}),  # for its retried items
        }
        self.redis.hset(key, mapping=fields)  # type: ignore[arg-type]
        index, owner = 0, {k: v for k, v in header.items() if k.startswith("owner")}
        if key_hooks:
            owner["key_hooks"] = key_hooks
        for chunk in chunks(items):
            index = self._add(batch_id, chunk, index, owner)
        self._running(keys=[key])
        self.redis.zadd(self.keys.batches(), {batch_id: time.time()})
        return batch_id

    def _add(self, batch_id: str, chunk: list[tuple[str, JobRequest]], index: int,
             extra: dict[str, str]) -> int:
        key = self.keys.batch(batch_id)
        ids = [uuid.uuid4().hex for _ in chunk]
        records = [(job_id, new_record(job, self.settings, batch=batch_id, batch_key=key,
                                       item=item_id, item_index=str(index + i), **extra))
                   for i, (job_id, (item_id, job)) in enumerate(zip(ids, chunk, strict=True))]
        self.jobs.create_many(records)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(self.keys.batch_items(batch_id), *[
            json.dumps({"id": item_id, "job": job_id})
            for job_id, (item_id, _) in zip(ids, chunk, strict=True)])
        pipe.hincrby(key, "total", len(chunk))
        if index == 0:
            pipe.hset(key, "model", chunk[0][1].model)
        pipe.execute()
        self.send(ids, [job for _, job in chunk], extra)
        return index + len(chunk)

    def exists(self, batch_id: str) -> bool:
        return bool(self.redis.exists(self.keys.batch(batch_id)))

    def item_pages(self, batch_id: str) -> Iterator[list[dict[str, str]]]:
        """The item list, a chunk at a time: [{"id", "job"}] in submission order."""
        start = 0
        while page := self.redis.lrange(self.keys.batch_items(batch_id), start,
                                        start + CHUNK - 1):
            yield [json.loads(entry) for entry in page]
            start += len(page)

    def cancel(self, batch_id: str) -> dict[str, int]:
        """Cancel every item not yet ended: {outcome: count}."""
        self.redis.hset(self.keys.batch(batch_id), "cancel", "1")
        outcomes: dict[str, int] = {}
        for page in self.item_pages(batch_id):
            for outcome in self.jobs.cancel_many([entry["job"] for entry in page]):
                name = "already_ended" if outcome.startswith("ended:") else outcome
                outcomes[name] = outcomes.get(name, 0) + 1
        return outcomes

    def retry(self, batch_id: str, options: BatchOptions | None = None) -> int:
        """Queue a new job for every failed item (its request, with `options` over it, e.g. a
        longer timeout_s); how many."""
        override = options.model_dump(exclude_none=True) if options else {}
        key, retried, offset = self.keys.batch(batch_id), 0, 0
        for page in self.item_pages(batch_id):
            pipe = self.redis.pipeline(transaction=False)
            for entry in page:
                pipe.hmget(self.keys.job(entry["job"]), "status", "request")
            for i, (entry, (status, request)) in enumerate(zip(page, pipe.execute(),
                                                               strict=True)):
                if status == b"failed" and request:
                    request = {**json.loads(request), **override}
                    if request["kind"] == "embed":
                        request.pop("instructions", None)
                    self._retry_one(batch_id, key, offset + i, entry["id"], request)
                    retried += 1
            offset += len(page)
        return retried

    def _retry_one(self, batch_id: str, key: str, index: int, item_id: str,
                   request: dict[str, Any]) -> None:
        job = JOB_REQUEST.validate_python(request)
        job_id = uuid.uuid4().hex
        fields = cast(list[bytes | None], self.redis.hmget(key, *OWNER_FIELDS))
        extra = {k: v.decode() for k, v in zip(OWNER_FIELDS, fields, strict=True) if v}
        self.jobs.create_many([(job_id, new_record(job, self.settings, batch=batch_id,
                                                   batch_key=key, item=item_id,
                                                   item_index=str(index), **extra))])
        pipe = self.redis.pipeline(transaction=True)
        pipe.lset(self.keys.batch_items(batch_id), index,
                  json.dumps({"id": item_id, "job": job_id}))
        pipe.hincrby(key, "failed", -1)
        pipe.hincrby(key, "retried", 1)
        pipe.hdel(key, "cancel")
        pipe.execute()
        self.send([job_id], [job], extra)
