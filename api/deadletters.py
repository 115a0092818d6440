"""Dead letters: jobs whose worker died `max_attempts` times. Inspect, requeue, or drop them.

Requeueing makes a new job from the same request (a dead letter has ended `failed` with its
one final event, and a stream never gets a second one); the new job names the old one in
`requeued_from`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.auth import enforce_quota, may_see, owner_of
from api.errors import ApiError
from api.jobs import create_and_enqueue, job_id_of, public
from broker.messages import JOB_REQUEST


def not_a_dead_letter(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no dead-lettered job {job_id!r}", "id")


async def list_dead_letters(request: Request) -> JSONResponse:
    records = await request.app.state.store.dead_letters()
    data = [public(rec) for rec in records if may_see(request, rec.get("owner"))]
    return JSONResponse({"object": "list", "data": data})


async def requeue_dead_letter(request: Request) -> JSONResponse:
    state = request.app.state
    job_id = job_id_of(request)
    record = await state.store.get(job_id)
    if (record is None or not may_see(request, record.get("owner"))
            or not await state.store.is_dead_letter(job_id)):
        raise not_a_dead_letter(job_id)
    job = JOB_REQUEST.validate_python(record["request"])
    await enforce_quota(request)
    reply = await create_and_enqueue(state, job, requeued_from=job_id, **owner_of(request))
    await state.store.forget_dead_letter(job_id)
    return reply


async def drop_dead_letter(request: Request) -> JSONResponse:
    job_id = job_id_of(request)
    record = await request.app.state.store.get(job_id)
    if (record is not None and not may_see(request, record.get("owner"))) or \
            not await request.app.state.store.forget_dead_letter(job_id):
        raise not_a_dead_letter(job_id)
    return JSONResponse({"id": job_id, "dropped": True})


routes = [
    Route("/v1/dead-letters", list_dead_letters, methods=["GET"]),
    Route("/v1/dead-letters/{job_id}/requeue", requeue_dead_letter, methods=["POST"]),
    Route("/v1/dead-letters/{job_id}", drop_dead_letter, methods=["DELETE"]),
]
