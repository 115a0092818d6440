"""OpenAI's Files API, for its Batch API: `POST /v1/files` (multipart, `purpose`), list, get,
content, delete. Files live in Redis (`file:{id}` and its content), at most `max_file_bytes`
each; a batch's output and error files are written here when it is first read finished."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import key_of, may_see
from api.errors import ApiError
from api.openai_compat import openai_route

FILE_ID = re.compile(r"^file-[0-9a-f]{32}(-output|-errors)?$")


def file_object(fields: dict[str, str]) -> dict[str, Any]:
    return {"id": fields["id"], "object": "file", "bytes": int(fields["bytes"]),
            "created_at": int(float(fields["created_at"])), "filename": fields["filename"],
            "purpose": fields["purpose"], "status": "processed", "status_details": None}


async def store_file(state: Any, file_id: str, filename: str, purpose: str, content: bytes,
                     owner: str | None) -> dict[str, Any]:
    fields = {"id": file_id, "bytes": str(len(content)), "created_at": repr(time.time()),
              "filename": filename, "purpose": purpose, **({"owner": owner} if owner else {})}
    ttl_s = state.settings.files_ttl_s
    pipe = state.redis.pipeline(transaction=True)
    pipe.hset(state.keys.file(file_id), mapping=fields)
    pipe.expire(state.keys.file(file_id), ttl_s)
    pipe.set(state.keys.file_content(file_id), content, ex=ttl_s)
    pipe.zadd(state.keys.files(), {file_id: time.time()})
    pipe.zremrangebyscore(state.keys.files(), "-inf", time.time() - ttl_s)
    await pipe.execute()
    return file_object(fields)


async def file_fields(request: Request, file_id: str) -> dict[str, str]:
    state = request.app.state
    raw = await state.redis.hgetall(state.keys.file(file_id)) if FILE_ID.match(file_id) else {}
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if not fields or not may_see(request, fields.get("owner")):
        raise ApiError(404, "not_found", f"no file {file_id!r}", "file_id")
    return fields


async def file_content(request: Request, file_id: str) -> bytes:
    await file_fields(request, file_id)
    content = await request.app.state.redis.get(request.app.state.keys.file_content(file_id))
    return bytes(content or b"")


@openai_route
async def upload(request: Request) -> Response:
    state = request.app.state
    limit = state.settings.max_file_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 65_536:
        raise ApiError(413, "body_too_large", f"file: at most {limit} bytes (max_file_bytes)",
                       "file")
    async with request.form(max_files=1, max_fields=8) as form:
        purpose, upload_ = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise ApiError(400, "invalid_request", "purpose: only \"batch\" files are taken "
                           "here", "purpose")
        if not isinstance(upload_, UploadFile):
            raise ApiError(400, "invalid_request", "file: a file part is required", "file")
        content = await upload_.read(limit + 1)
        if len(content) > limit:
            raise ApiError(413, "body_too_large", f"file: at most {limit} bytes "
                           "(max_file_bytes)", "file")
        key = key_of(request)
        made = await store_file(state, f"file-{uuid.uuid4().hex}", upload_.filename or "upload",
                                "batch", content, key.id if key else None)
    return JSONResponse(made)


@openai_route
async def list_files(request: Request) -> Response:
    state = request.app.state
    purpose = request.query_params.get("purpose")
    ids = [i.decode() for i in await state.redis.zrevrange(state.keys.files(), 0, 999)]
    data = []
    for file_id in ids:
        raw = await state.redis.hgetall(state.keys.file(file_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields and may_see(request, fields.get("owner")) and purpose in (None,
                                                                             fields["purpose"]):
            data.append(file_object(fields))
    return JSONResponse({"object": "list", "data": data, "has_more": False,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


@openai_route
async def get_file(request: Request) -> Response:
    return JSONResponse(file_object(await file_fields(request, request.path_params["file_id"])))


@openai_route
async def get_content(request: Request) -> Response:
    content = await file_content(request, request.path_params["file_id"])
    return Response(content, media_type="application/jsonl")


@openai_route
async def delete_file(request: Request) -> Response:
    state, file_id = request.app.state, request.path_params["file_id"]
    await file_fields(request, file_id)
    await state.redis.delete(state.keys.file(file_id), state.keys.file_content(file_id))
    await state.redis.zrem(state.keys.files(), file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", get_content, methods=["GET"]),
]
