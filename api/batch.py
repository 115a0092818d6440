"""Many jobs in one request: `POST /v1/jobs/batch` with `{"jobs": [job, ...]}`.

Each job is validated and admitted exactly as `POST /v1/jobs` would (an error names
`jobs[i].field`, and then nothing is stored or queued); then all are stored and their Celery
messages are sent in one go. Batch summarisation runs and bulk embedding submit this way:
one HTTP round trip instead of a thousand. Idempotency-Key is per job only: not accepted here.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.admission import admit
from api.auth import check_model, enforce_quota, owner_of
from api.errors import ApiError, from_validation
from api.jobs import job_record, links, parse_json, read_body
from broker.fair import PartlySent, Tenant
from broker.messages import JobRequest


class JobBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1)


async def submit_batch(request: Request) -> JSONResponse:
    state = request.app.state
    if request.headers.get("idempotency-key") is not None:
        raise ApiError(400, "invalid_header", "Idempotency-Key is not accepted on a batch; "
                       "send jobs one by one to use it", "Idempotency-Key")
    data = parse_json(await read_body(request, state.settings.max_body_bytes))
    try:
        batch = JobBatch.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    limit = state.settings.max_batch_jobs
    if len(batch.jobs) > limit:
        raise ApiError(413, "too_many_jobs", f"{len(batch.jobs)} jobs; at most {limit}", "jobs")
    for i, job in enumerate(batch.jobs):
        await admit_item(job, i, state)
        check_model(request, job.model)
    await enforce_quota(request, len(batch.jobs))
    ids = [uuid.uuid4().hex for _ in batch.jobs]
    for job_id, job in zip(ids, batch.jobs, strict=True):
        await state.store.create(job_id, job_record(state, job, **owner_of(request)))
    await enqueue_all(state, ids, batch.jobs, Tenant.of(owner_of(request)))
    data = [{"id": job_id, "status": "queued", "links": links(job_id)} for job_id in ids]
    return JSONResponse({"object": "list", "data": data}, 202)


async def admit_item(job: JobRequest, index: int, state: Any) -> None:
    try:
        await admit(job, state.settings, state.vocab)
    except ApiError as exc:
        where = f"jobs[{index}]"
        raise ApiError(exc.status, exc.type, f"{where}: {exc.message}",
                       f"{where}.{exc.field}" if exc.field else where) from None


async def enqueue_all(state: Any, ids: list[str], jobs: list[JobRequest], tenant: Tenant,
                      ) -> None:
    """Send every first delivery from one thread. If the queue fails midway the whole batch
    ends `enqueue_failed` (a sent message then finds its job ended and never runs), so the
    client's retry of the batch is never a partial duplicate."""
    try:
        await state.dispatch.send(ids, jobs, tenant)
    except PartlySent as exc:
        for job_id in ids:
            await state.store.fail(job_id, "enqueue_failed", "the batch could not be queued")
        raise ApiError(503, "unavailable", f"the queue became unavailable after {exc.sent} of "
                       f"{exc.total} jobs; none of the batch runs, retry it later") from None


routes = [Route("/v1/jobs/batch", submit_batch, methods=["POST"])]
