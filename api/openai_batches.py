"""OpenAI's Batch API on tokenpool's own batches: `POST /v1/batches` with an `input_file_id`
(a JSONL file of `{custom_id, method, url, body}` lines uploaded with `POST /v1/files`) makes
each line an ordinary job of a native batch (priority, progress, retry, restart-safety), and
the batch reads back in OpenAI's shape. Told apart from a native batch by its body (a native
one has `items`); `GET /v1/batches/{id}` answers each in its own shape.

The output file (and an error file, if any line's job did not succeed) is written when the
finished batch is first read, in OpenAI's line format, matched by `custom_id`.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from api.admission import admit
from api.auth import check_model, enforce_quota, owner_of
from api.errors import ApiError
from api.files import file_content, store_file
from api.openai_compat import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Shape,
    chat_job,
    completion_job,
    embedding_job,
    embedding_list,
    invalid,
)
from broker.batches import BatchSpec, progress
from broker.messages import JobRequest

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW_S = 86_400


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


def line_job(line: Line, endpoint: str, settings: Any) -> JobRequest:
    """The job of one request line (ApiError naming the field)."""
    if line.url != endpoint:
        raise ApiError(400, "invalid_request", f"url: {line.url!r} is not the batch's "
                       f"endpoint {endpoint!r}", "url")
    try:
        if endpoint == "/v1/embeddings":
            return embedding_job(EmbeddingRequest.model_validate(line.body), settings)
        if endpoint == "/v1/completions":
            body = CompletionRequest.model_validate(line.body)
            if body.stream:
                raise ApiError(400, "invalid_request", "body.stream: not in a batch", "stream")
            return completion_job(body)
        chat = ChatRequest.model_validate(line.body)
    except ValidationError as exc:
        raise invalid(exc) from None
    if chat.stream or chat.tools:
        field = "stream" if chat.stream else "tools"
        raise ApiError(400, "invalid_request", f"body.{field}: not in a batch", field)
    return chat_job(chat, settings)[0]


async def read_lines(request: Request, spec: CreateBatch,
                     ) -> tuple[list[tuple[str, JobRequest]], list[dict[str, Any]]]:
    """Every line's (custom_id, job), and OpenAI-style errors for the lines that are bad."""
    state = request.app.state
    content = await file_content(request, spec.input_file_id)
    items: list[tuple[str, JobRequest]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = Line.model_validate(json.loads(raw))
            if line.custom_id in seen:
                raise ApiError(400, "duplicate_custom_id", f"custom_id {line.custom_id!r} "
                               "is used by an earlier line", "custom_id")
            job = line_job(line, spec.endpoint, state.settings)
            await admit(job, state.settings, state.vocab)
            check_model(request, job.model)
        except json.JSONDecodeError as exc:
            errors.append({"code": "invalid_json_line", "message": str(exc), "param": None,
                           "line": n})
            continue
        except ValidationError as exc:
            error = invalid(exc)
            errors.append({"code": "invalid_request", "message": error.message,
                           "param": error.field, "line": n})
            continue
        except ApiError as exc:
            errors.append({"code": exc.type, "message": exc.message, "param": exc.field,
                           "line": n})
            continue
        seen.add(line.custom_id)
        items.append((line.custom_id, job))
    if not items and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no lines",
                       "param": None, "line": None})
    if len(items) > state.settings.max_batch_items:
        errors.append({"code": "too_many_requests", "message": f"{len(items)} lines; at most "
                       f"{state.settings.max_batch_items}", "param": None, "line": None})
    return items, errors


async def create(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    state = request.app.state
    try:
        spec = CreateBatch.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None
    items, errors = await read_lines(request, spec)
    owner = owner_of(request)
    header = {"openai": "1", "endpoint": spec.endpoint, "input_file_id": spec.input_file_id,
              "completion_window": spec.completion_window,
              "metadata": json.dumps(spec.metadata or {}), **owner}
    kind = "embed" if spec.endpoint == "/v1/embeddings" else "generate"
    if errors:  # as OpenAI: the file's problems fail the whole batch, each line named
        batch_id = await anyio.to_thread.run_sync(functools.partial(
            state.batches.create, BatchSpec(kind=kind), iter(()),
            **header, openai_errors=json.dumps(errors)))
    else:
        await enforce_quota(request, len(items))
        model = items[0][1].model
        batch_id = await anyio.to_thread.run_sync(functools.partial(
            state.batches.create, BatchSpec(kind=kind, model=model, priority=items[0][1].priority),
            iter(items), **header))
    return await batch_object(request, await fields(state, batch_id))


async def fields(state: Any, batch_id: str) -> dict[str, str]:
    raw = await state.redis.hgetall(state.keys.batch(batch_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def status_of(fields_: dict[str, str], report: dict[str, Any]) -> str:
    if fields_.get("openai_errors"):
        return "failed"
    if report["status"] == "cancelled":
        return "cancelled"
    if fields_.get("cancel"):
        return "cancelling"
    if report["status"] == "completed":
        return "completed"
    return "in_progress" if fields_.get("status") != "creating" else "validating"


async def batch_object(request: Request, fields_: dict[str, str]) -> dict[str, Any]:
    """The batch in OpenAI's shape; a finished one with its output and error files."""
    report = progress(fields_, time.time())
    status = status_of(fields_, report)
    created = int(float(fields_.get("created_at", 0)))
    files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
    ended_at = None
    if status in ("completed", "cancelled"):
        files, ended_at = await finished_files(request, fields_)
    counts = report["counts"]
    errors = json.loads(fields_.get("openai_errors") or "null")
    return {
        "id": fields_["id"], "object": "batch", "endpoint": fields_.get("endpoint"),
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": fields_.get("input_file_id"),
        "completion_window": fields_.get("completion_window", "24h"), "status": status,
        **files, "created_at": created, "in_progress_at": created if status != "failed" else None,
        "expires_at": created + WINDOW_S, "finalizing_at": ended_at,
        "completed_at": ended_at if status == "completed" else None,
        "failed_at": created if status == "failed" else None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": ended_at if status == "cancelled" else None,
        "request_counts": {"total": report["total"], "completed": counts["succeeded"],
                           "failed": counts["failed"] + counts["cancelled"]},
        "metadata": json.loads(fields_.get("metadata") or "{}"),
    }


def answer_body(endpoint: str, record: dict[str, Any]) -> dict[str, Any]:
    request = record.get("request") or {}
    if endpoint == "/v1/embeddings":
        return embedding_list(record, record["model"], "float")
    shape = Shape(record["id"], record["model"], chat=endpoint == "/v1/chat/completions",
                  logprobs=bool(request.get("logprobs")))
    return shape.whole(record)


def output_line(endpoint: str, custom_id: str, record: dict[str, Any] | None,
                ) -> tuple[bool, dict[str, Any]]:
    """(succeeded, the line) of one request, in OpenAI's batch output format."""
    job_id = record["id"] if record else None
    head = {"id": f"batch_req_{job_id}", "custom_id": custom_id}
    if record is not None and record["status"] == "succeeded":
        return True, {**head, "response": {"status_code": 200, "request_id": job_id,
                                           "body": answer_body(endpoint, record)},
                      "error": None}
    error = (record or {}).get("error") or {
        "type": (record or {}).get("status", "expired"),
        "message": "the request was cancelled" if record else "the job's record expired"}
    return False, {**head, "response": None,
                   "error": {"code": error["type"], "message": error["message"]}}


async def finished_files(request: Request, fields_: dict[str, str],
                         ) -> tuple[dict[str, str | None], int]:
    """The output and error files of a finished batch, written on its first read."""
    state, batch_id = request.app.state, fields_["id"]
    output_id, error_id = f"file-{batch_id}-output", f"file-{batch_id}-errors"
    ended = await state.redis.hget(state.keys.batch(batch_id), "openai_ended_at")
    if ended is None:
        good: list[str] = []
        bad: list[str] = []
        endpoint = fields_["endpoint"]
        for raw in await state.redis.lrange(state.keys.batch_items(batch_id), 0, -1):
            entry = json.loads(raw)
            ok, line = output_line(endpoint, entry["id"], await state.store.get(entry["job"]))
            (good if ok else bad).append(json.dumps(line, ensure_ascii=False))
        owner = fields_.get("owner")
        await store_file(state, output_id, f"batch_{batch_id}_output.jsonl", "batch_output",
                         "".join(line + "\n" for line in good).encode(), owner)
        if bad:
            await store_file(state, error_id, f"batch_{batch_id}_errors.jsonl", "batch_output",
                             "".join(line + "\n" for line in bad).encode(), owner)
        ended = repr(time.time()).encode()
        await state.redis.hset(state.keys.batch(batch_id), mapping={
            "openai_ended_at": ended, "openai_error_file": "1" if bad else ""})
    has_errors = await state.redis.hget(state.keys.batch(batch_id), "openai_error_file")
    return ({"output_file_id": output_id, "error_file_id": error_id if has_errors else None},
            int(float(ended)))


def is_openai(fields_: dict[str, str]) -> bool:
    return fields_.get("openai") == "1"
