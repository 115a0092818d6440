"""Job routes: submit, read, follow (SSE), cancel."""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from api.admission import admit
from api.auth import check_model, enforce_quota, may_see, owner_of
from api.errors import REDIS_RETRY_AFTER_S, ApiError, from_validation, not_found
from api.ops import fleet
from api.queueing import place_in_line
from api.sse import event_stream
from broker.fair import PartlySent, Tenant
from broker.messages import FINAL_STATUSES, JOB_REQUEST, JobRequest
from broker.store import new_record

log = logging.getLogger("tokenpool.api")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
PUBLIC_FIELDS = ("id", "kind", "model", "status", "created_at", "started_at", "finished_at",
                 "worker", "attempts", "result", "error", "usage", "timings", "timeout_s",
                 "requeued_from")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body is {declared} bytes; at most {limit}", "body")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"body is over {limit} bytes", "body")
    return body


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}", "body") from None


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record.get(name) for name in PUBLIC_FIELDS} | {"links": links(record["id"])}


def job_id_of(request: Request) -> str:
    job_id = request.path_params["job_id"]
    if not JOB_ID.match(job_id):
        raise not_found(job_id)
    return str(job_id)


async def submit(request: Request) -> JSONResponse:
    state = request.app.state
    data = parse_json(await read_body(request, state.settings.max_body_bytes))
    try:
        job = JOB_REQUEST.validate_python(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    await admit(job, state.settings, state.vocab)
    check_model(request, job.model)
    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None and not IDEMPOTENCY_KEY.match(idem_key):
        raise ApiError(400, "invalid_header", "Idempotency-Key must be 1-200 visible ASCII "
                       "characters", "Idempotency-Key")
    await enforce_quota(request)
    owner = owner_of(request)
    if idem_key is not None and owner:  # one key's retries never find another key's job
        idem_key = f"{owner['owner']}:{idem_key}"
    return await create_and_enqueue(state, job, idem_key, **owner)


def job_record(state: Any, job: JobRequest, **extra: str) -> dict[str, Any]:
    """The fields a new job's record starts with."""
    return new_record(job, state.settings, **extra)


async def create_and_enqueue(
    state: Any, job: JobRequest, idem_key: str | None = None, **extra: str
) -> JSONResponse:
    """Store a queued job and send its first delivery: 202, or the earlier job of the key."""
    record = job_record(state, job, **extra)
    job_id, created = await store_and_send(state, job, record, idem_key)
    if not created:
        return await _replayed(state, job_id, record["fingerprint"])
    shown = {k: v for k, v in extra.items() if k == "requeued_from"}  # not the key's fields
    body = {"id": job_id, "status": "queued", "links": links(job_id), **shown}
    return JSONResponse(body, 202)


async def store_and_send(
    state: Any, job: JobRequest, record: dict[str, Any], idem_key: str | None = None
) -> tuple[str, bool]:
    """Store a queued job and send its first delivery: (job id, created); with a known
    Idempotency-Key, (the earlier job's id, False) and nothing is sent."""
    job_id, created = await state.store.create(uuid.uuid4().hex, record, idem_key)
    if not created:
        return job_id, False
    try:
        await enqueue(state, job_id, job, record)
    except ApiError:
        if idem_key:  # a retry with the same key must get a new job, not this failed one
            await state.redis.delete(state.keys.idempotency(idem_key))
        raise
    await confirm_replicated(state, job_id)
    log.info("job %s: queued %s on %s", job_id, job.kind, job.model)
    return job_id, True


async def confirm_replicated(state: Any, job_id: str) -> None:
    """With redis_confirm_replicas, answer only once that many replicas have the job: Redis
    replicates asynchronously, so a primary that dies right after a 202 could take the job
    with it into a failover. One write of ours after the Celery send, then WAIT on the same
    connection (a pipeline): the replication stream is in order, so a replica that has the
    write has the record and the message sent before it."""
    needed, timeout_ms = (state.settings.redis_confirm_replicas,
                          state.settings.redis_confirm_timeout_ms)
    if needed == 0:
        return
    pipe = state.redis.pipeline(transaction=False)
    pipe.incr(state.keys.replication_mark())
    pipe.execute_command("WAIT", needed, timeout_ms)
    _, acked = await pipe.execute()
    if int(acked) < needed:
        log.warning("job %s: on %s of %s replicas after %s ms", job_id, acked, needed, timeout_ms)
        raise ApiError(503, "unavailable", f"job {job_id} was stored but reached {acked} of "
                       f"{needed} replicas within {timeout_ms} ms, so a failover could lose it; "
                       "retry with the same Idempotency-Key to get it (or a new one if it was "
                       "lost)", None, {"Retry-After": "1"})


async def _replayed(state: Any, job_id: str, fingerprint: str) -> JSONResponse:
    existing = await state.store.get(job_id)
    if existing is None:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key named a job that has expired", "Idempotency-Key")
    if existing["fingerprint"] != fingerprint:
        raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used for a "
                       "different request", "Idempotency-Key")
    body = {"id": job_id, "status": existing["status"], "links": links(job_id)}
    return JSONResponse(body, 202, headers={"Idempotent-Replayed": "true"})


async def enqueue(state: Any, job_id: str, job: JobRequest, record: dict[str, Any]) -> None:
    """Send the job's first delivery (through its key's fair line, broker.fair, unless
    fair_share is off); if the queue is unreachable the job ends failed."""
    try:
        await state.dispatch.send([job_id], [job], Tenant.of(record))
    except PartlySent as exc:
        log.error("job %s: enqueue failed: %s", job_id, exc.__cause__)
        await state.store.fail(job_id, "enqueue_failed", "the job could not be queued")
        raise ApiError(503, "unavailable", "the queue is unavailable; retry later", None,
                       {"Retry-After": str(REDIS_RETRY_AFTER_S)}) from None


async def visible_record(request: Request, job_id: str) -> dict[str, Any]:
    """The job's record if it exists and the caller's key may see it; else 404."""
    record = await request.app.state.store.get(job_id)
    if record is None or not may_see(request, record.get("owner")):
        raise not_found(job_id)
    return dict(record)


async def get_job(request: Request) -> JSONResponse:
    """The job; a queued one with its place in its model's queue (api/queueing.py)."""
    state = request.app.state
    record = await visible_record(request, job_id_of(request))
    body = public(record)
    if record["status"] == "queued":
        workers = (await fleet(state, max_age_s=1.0)).get(record["model"], [])
        body["queue"] = await place_in_line(state, record, workers)
    return JSONResponse(body)


async def cancel_job(request: Request) -> JSONResponse:
    job_id = job_id_of(request)
    await visible_record(request, job_id)
    outcome = await request.app.state.store.cancel(job_id)
    if outcome == "missing":
        raise not_found(job_id)
    if outcome == "cancelled":
        return JSONResponse({"id": job_id, "status": "cancelled", "cancelled": True})
    if outcome == "cancelling":
        body = {"id": job_id, "status": "running", "cancelled": True,
                "detail": "cancel requested; the job stops within one token"}
        return JSONResponse(body, 202)
    ended = outcome.removeprefix("ended:")
    assert ended in FINAL_STATUSES
    return JSONResponse({"id": job_id, "status": ended, "cancelled": False,
                         "detail": f"job already {ended}; nothing to cancel"})


def after_seq(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None or raw == "":
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", "Last-Event-ID / after must be an integer seq",
                       "Last-Event-ID") from None
    if value < -1:
        raise ApiError(400, "invalid_request", "seq must be >= -1", "Last-Event-ID")
    return value


async def job_events(request: Request) -> StreamingResponse:
    job_id = job_id_of(request)
    after = after_seq(request)
    state = request.app.state
    if state.followers >= state.settings.max_sse_followers:
        raise ApiError(503, "too_many_followers", f"this API serves at most "
                       f"{state.settings.max_sse_followers} event streams; retry later or "
                       "read the Redis stream directly")
    await visible_record(request, job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        event_stream(state, job_id, after), media_type="text/event-stream", headers=headers
    )


routes = [
    Route("/v1/jobs", submit, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
]
