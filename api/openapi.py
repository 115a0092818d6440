"""`GET /openapi.json`: the API's OpenAPI 3.1 document, request bodies from the same pydantic
models the routes validate with (so the document cannot drift from them), every error as the
contract's error body. The test suite fuzzes the API against it with schemathesis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.openai_compat import ChatRequest, CompletionRequest, EmbeddingRequest
from api.responses import ResponseRequest
from api.workers import LoadModel, Unload
from broker.batches import BatchItem, BatchOptions, BatchSpec
from broker.messages import JobRequest

REF = "#/components/schemas/{model}"
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["type", "message"],
    "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                   "field": {"type": ["string", "null"]}}}}}
OBJECT = {"type": "object"}
UPLOAD = {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary"},
    "purpose": {"type": "string", "enum": ["batch"]}}}


class BatchBody(BatchSpec):
    items: list[BatchItem]


class JobBatchBody(BaseModel):
    jobs: list[JobRequest]


def schema_of(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(model).json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    return schema


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def op(summary: str, ok: str = "200", body: dict[str, Any] | None = None,
       params: Sequence[str] = (), media: str = "application/json",
       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    content = {media: {"schema": OBJECT if media == "application/json" else {"type": "string"}}}
    out: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "success", "content": content},
                      "default": {"description": "an error: the contract's body",
                                  "content": {"application/json": {"schema": ERROR}}},
                      **(extra or {})},
        "parameters": [{"name": p, "in": "path", "required": True,
                        "schema": {"type": "string"}} for p in params],
    }
    if body is not None:
        out["requestBody"] = json_body(body)
    return out


def document() -> dict[str, Any]:
    c: dict[str, Any] = {}
    job, batch = schema_of(JobRequest, c), schema_of(BatchBody, c)
    ready = {"503": {"description": "not ready", "content": {"application/json": {
        "schema": OBJECT}}}}
    paths = {
        "/health": {"get": op("liveness")},
        "/ready": {"get": op("readiness: Redis and a worker per model", extra=ready)},
        "/v1/models": {"get": op("configured models")},
        "/v1/usage": {"get": op("the caller's key: limits and use")},
        "/v1/jobs": {"post": op("submit a job", "202", job)},
        "/v1/jobs/batch": {"post": op("submit many jobs", "202",
                                      schema_of(JobBatchBody, c))},
        "/v1/jobs/{job_id}": {"get": op("a job", params=["job_id"]),
                              "delete": op("cancel a job", params=["job_id"])},
        "/v1/jobs/{job_id}/events": {"get": op("a job's events (SSE)", params=["job_id"],
                                               media="text/event-stream")},
        "/v1/batches": {"post": op("submit a batch", "202", batch),
                        "get": op("recent batches")},
        "/v1/batches/{batch_id}": {"get": op("a batch's progress", params=["batch_id"]),
                                   "delete": op("cancel a batch", params=["batch_id"])},
        "/v1/batches/{batch_id}/results": {"get": op("results (JSONL)", params=["batch_id"],
                                                     media="application/x-ndjson")},
        "/v1/batches/{batch_id}/events": {"get": op("progress (SSE)", params=["batch_id"],
                                                    media="text/event-stream")},
        "/v1/batches/{batch_id}/retry": {"post": op(
            "retry failed items", params=["batch_id"],
            body={"type": "object", "properties": {"options": schema_of(BatchOptions, c)}})},
        "/v1/dead-letters": {"get": op("dead-lettered jobs")},
        "/v1/dead-letters/{job_id}": {"delete": op("drop a dead letter", params=["job_id"])},
        "/v1/dead-letters/{job_id}/requeue": {"post": op("requeue a dead letter", "202",
                                                         params=["job_id"])},
        "/v1/workers": {"get": op("live and recently gone workers")},
        "/v1/workers/{name}": {"get": op("one worker", params=["name"])},
        "/v1/workers/{name}/model": {"post": op("swap a worker's model", "202",
                                                schema_of(LoadModel, c), params=["name"])},
        "/v1/workers/{name}/unload": {"post": op("unload a worker's model", "202",
                                                 schema_of(Unload, c), params=["name"])},
        "/v1/chat/completions": {"post": op("OpenAI chat completions",
                                            body=schema_of(ChatRequest, c))},
        "/v1/completions": {"post": op("OpenAI completions",
                                       body=schema_of(CompletionRequest, c))},
        "/v1/embeddings": {"post": op("OpenAI embeddings",
                                      body=schema_of(EmbeddingRequest, c))},
        "/v1/responses": {"post": op("OpenAI Responses: create (a generate job)",
                                     body=schema_of(ResponseRequest, c))},
        "/v1/responses/{response_id}": {
            "get": op("a response (?stream=true&starting_after=N: its events)",
                      params=["response_id"]),
            "delete": op("delete a response", params=["response_id"])},
        "/v1/responses/{response_id}/cancel": {"post": op("cancel a response",
                                                          params=["response_id"])},
        "/v1/responses/{response_id}/input_items": {"get": op("a response's input items",
                                                              params=["response_id"])},
        "/v1/responses/{response_id}/export": {"get": op(
            "the conversation up to a response (JSONL)", params=["response_id"],
            media="application/jsonl")},
        "/v1/batches/{batch_id}/cancel": {"post": op("cancel a batch (OpenAI's way)",
                                                     params=["batch_id"])},
        "/v1/files": {"post": {**op("upload a batch input file (OpenAI's Files API)"),
                               "requestBody": {"required": True, "content": {
                                   "multipart/form-data": {"schema": UPLOAD}}}},
                      "get": op("files")},
        "/v1/files/{file_id}": {"get": op("a file", params=["file_id"]),
                                "delete": op("delete a file", params=["file_id"])},
        "/v1/files/{file_id}/content": {"get": op("a file's content (JSONL)",
                                                  params=["file_id"],
                                                  media="application/jsonl")},
        "/v1/webhooks/dead-letters": {"get": op("webhook deliveries that ran out of tries")},
        "/v1/webhooks/dead-letters/{delivery_id}/redeliver": {"post": op(
            "deliver a dead webhook again", "202", params=["delivery_id"])},
        "/metrics": {"get": op("Prometheus metrics", media="text/plain")},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "tokenpool", "version": "0.1.0",
                     "description": "A message-queue worker pool for local LLM inference."},
            "paths": paths, "components": {"schemas": c,
                                           "securitySchemes": {"bearer": {
                                               "type": "http", "scheme": "bearer"}}}}


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document())


routes = [Route("/openapi.json", openapi, methods=["GET"])]
