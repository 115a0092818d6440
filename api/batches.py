"""Batch runs: `POST /v1/batches` (JSON, or a JSONL upload), progress, results, events, cancel
and retry. Items become ordinary jobs at a lower default priority (broker.batches)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from api import openai_batches
from api.admission import admit, check_webhook
from api.auth import check_model, enforce_quota, may_see, owner_of
from api.errors import REDIS_RETRY_AFTER_S, ApiError, field_name, from_validation
from api.jobs import JOB_ID, parse_json, read_body
from api.sse import sse_message
from broker.batches import CHUNK, BatchItem, BatchOptions, BatchSpec, progress
from broker.messages import FINAL_STATUSES, JobRequest

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
POLL_S = 0.5


@dataclass(frozen=True)
class Parsed:
    """What a POST carried: the spec, and the items' raw JSON (parsed again, lazily, when the
    jobs are made, so no request holds every item's job at once)."""

    spec: BatchSpec
    raw_items: list[Any]


def parse_jsonl(body: bytes, request: Request) -> Parsed:
    query = dict(request.query_params)
    options = {k: query.pop(k) for k in list(query)
               if k not in ("kind", "model", "priority", "webhook")}
    try:
        spec = BatchSpec.model_validate({**query, "options": options})
    except ValidationError as exc:
        raise from_validation(exc) from None
    items = []
    for n, line in enumerate(body.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ApiError(400, "invalid_json", f"line {n} is not JSON: {exc}",
                               f"items[{len(items)}]") from None
    if not items:
        raise ApiError(422, "invalid_request", "items: the upload has no lines", "items")
    return Parsed(spec=spec, raw_items=items)


def parse_json_body(body: bytes) -> Parsed:
    data = parse_json(body)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) \
            or not data["items"]:
        raise ApiError(422, "invalid_request", "items: a non-empty list of {id, text} is "
                       "required", "items")
    raw_items = data["items"]
    try:
        spec = BatchSpec.model_validate({k: v for k, v in data.items() if k != "items"})
    except ValidationError as exc:
        raise from_validation(exc) from None
    return Parsed(spec=spec, raw_items=raw_items)


def item_job(spec: BatchSpec, raw: Any, index: int) -> tuple[str, JobRequest]:
    try:
        item = BatchItem.model_validate(raw)
        return item.id, spec.job(item.text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        inner = field_name(tuple(first["loc"])) or ""
        inner = "text" if inner in ("texts[0]", "texts") else inner
        where = f"items[{index}].{inner}" if inner else f"items[{index}]"
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(422, "invalid_request", f"{where}: {message}", where) from None


async def check_items(state: Any, parsed: Parsed) -> None:
    """Every item valid and admitted, ids unique; else a 4xx naming items[i]."""
    if len(parsed.raw_items) > state.settings.max_batch_items:
        raise ApiError(413, "too_many_items", f"{len(parsed.raw_items)} items; at most "
                       f"{state.settings.max_batch_items}", "items")
    seen: set[str] = set()
    for i, raw in enumerate(parsed.raw_items):
        item_id, job = item_job(parsed.spec, raw, i)
        if item_id in seen:
            raise ApiError(422, "duplicate_id", f"items[{i}].id {item_id!r} is used twice",
                           f"items[{i}].id")
        seen.add(item_id)
        try:
            await admit(job, state.settings, state.vocab)
        except ApiError as exc:
            where = f"items[{i}]"
            field = "text" if exc.field in ("texts[0]", "text") else exc.field
            raise ApiError(exc.status, exc.type, f"{where}: {exc.message}",
                           f"{where}.{field}" if field else where) from None


async def create_batch(request: Request) -> JSONResponse:
    state = request.app.state
    body = await read_body(request, state.settings.max_batch_body_bytes)
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type not in JSONL_TYPES:
        data = parse_json(body)
        if isinstance(data, dict) and "input_file_id" in data:  # OpenAI's Batch API
            return JSONResponse(await openai_batches.create(request, data))
    parsed = parse_jsonl(body, request) if content_type in JSONL_TYPES else parse_json_body(body)
    await check_items(state, parsed)
    check_model(request, parsed.spec.model_name())
    await check_webhook(parsed.spec.webhook, state.settings)
    await enforce_quota(request, len(parsed.raw_items))
    owner = owner_of(request)

    def jobs() -> Iterator[tuple[str, JobRequest]]:
        for i, raw in enumerate(parsed.raw_items):
            yield item_job(parsed.spec, raw, i)

    try:
        batch_id = await anyio.to_thread.run_sync(
            functools.partial(state.batches.create, parsed.spec, jobs(), **owner))
    except Exception as exc:
        raise ApiError(503, "unavailable", f"the batch could not be queued ({type(exc).__name__});"
                       " retry later", None, {"Retry-After": str(REDIS_RETRY_AFTER_S)}) from None
    return JSONResponse({"id": batch_id, "status": "running", "total": len(parsed.raw_items),
                         "links": progress({"id": batch_id}, 0)["links"]}, 202)


def batch_id_of(request: Request) -> str:
    batch_id = str(request.path_params["batch_id"])
    if not JOB_ID.match(batch_id):
        raise ApiError(404, "not_found", f"no batch {batch_id!r}", "id")
    return batch_id


async def fields_of(request: Request, batch_id: str) -> dict[str, str]:
    """The batch hash, if it exists and the caller's key may see it; else 404."""
    state = request.app.state
    raw = await state.redis.hgetall(state.keys.batch(batch_id))
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if not fields or not may_see(request, fields.get("owner")):
        raise ApiError(404, "not_found", f"no batch {batch_id!r}", "id")
    return fields


async def shown(request: Request, fields: dict[str, str]) -> dict[str, Any]:
    """A batch in the shape it was made in: OpenAI's for one made from an input file."""
    if openai_batches.is_openai(fields):
        return await openai_batches.batch_object(request, fields)
    return progress(fields, time.time())


async def get_batch(request: Request) -> JSONResponse:
    return JSONResponse(await shown(request, await fields_of(request, batch_id_of(request))))


async def list_batches(request: Request) -> JSONResponse:
    """The last 100 (OpenAI's `after` and `limit` taken), newest first, each in its shape."""
    state = request.app.state
    try:
        limit = min(100, max(1, int(request.query_params.get("limit", "100"))))
    except ValueError:
        raise ApiError(400, "invalid_request", "limit: an integer from 1 to 100",
                       "limit") from None
    ids = [i.decode() for i in await state.redis.zrevrange(state.keys.batches(), 0, 99)]
    after = request.query_params.get("after")
    if after in ids:
        ids = ids[ids.index(after) + 1:]
    data = []
    for batch_id in ids:
        raw = await state.redis.hgetall(state.keys.batch(batch_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields and may_see(request, fields.get("owner")):
            data.append(await shown(request, fields))
        if len(data) > limit:
            break
    page = data[:limit]
    return JSONResponse({"object": "list", "data": page, "has_more": len(data) > limit,
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None})


async def record_line(state: Any, index: int, entry: dict[str, str]) -> dict[str, Any] | None:
    """The item's results line, or None while its job has not ended."""
    status, result, error, usage = await state.redis.hmget(
        state.keys.job(entry["job"]), "status", "result", "error", "usage")
    if status is None or status.decode() not in FINAL_STATUSES:
        return None
    return {"id": entry["id"], "index": index, "job": entry["job"], "status": status.decode(),
            "result": json.loads(result) if result else None,
            "error": json.loads(error) if error else None,
            "usage": json.loads(usage) if usage else None}


def jsonl(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


async def in_submission_order(state: Any, batch_id: str, wait: bool) -> AsyncIterator[bytes]:
    start = 0
    while True:
        page = await state.redis.lrange(state.keys.batch_items(batch_id), start,
                                        start + CHUNK - 1)
        if not page:
            return
        for offset, raw in enumerate(page):
            entry = json.loads(raw)
            line = await record_line(state, start + offset, entry)
            while line is None and wait:
                await asyncio.sleep(POLL_S)
                entry = json.loads(await state.redis.lindex(state.keys.batch_items(batch_id),
                                                             start + offset))
                line = await record_line(state, start + offset, entry)
            if line is not None:
                yield jsonl(line)
        start += len(page)


async def in_completion_order(state: Any, batch_id: str, wait: bool) -> AsyncIterator[bytes]:
    """Items as their jobs end (a retried item when its new job ends), each once."""
    done_key, items_key = state.keys.batch_done(batch_id), state.keys.batch_items(batch_id)
    emitted: set[int] = set()
    last = "0-0"
    while True:
        total = int(await state.redis.hget(state.keys.batch(batch_id), "total") or 0)
        if len(emitted) >= total > 0 or (not wait and last != "0-0"):
            return
        reply = await state.redis.xread({done_key: last}, count=CHUNK,
                                        block=int(POLL_S * 1000) if wait else None)
        if not reply:
            if not wait:
                return
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id.decode()
            index = int(fields[b"index"])
            current = json.loads(await state.redis.lindex(items_key, index))
            if index in emitted or current["job"] != fields[b"job"].decode():
                continue
            line = await record_line(state, index, current)
            if line is not None:
                emitted.add(index)
                yield jsonl(line)


async def batch_results(request: Request) -> StreamingResponse:
    state = request.app.state
    batch_id = batch_id_of(request)
    await fields_of(request, batch_id)
    order = request.query_params.get("order", "submission")
    if order not in ("submission", "completion"):
        raise ApiError(400, "invalid_request", "order is submission or completion", "order")
    wait = request.query_params.get("wait", "true").lower() not in ("false", "0", "no")
    lines = (in_submission_order if order == "submission" else in_completion_order)(
        state, batch_id, wait)
    return StreamingResponse(lines, media_type="application/x-ndjson")


async def progress_events(state: Any, batch_id: str) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n"
    last_entry, last_body, seq = "$", "", 0
    while True:
        raw = await state.redis.hgetall(state.keys.batch(batch_id))
        if not raw:
            return  # swept by housekeeping meanwhile
        report = progress({k.decode(): v.decode() for k, v in raw.items()}, time.time())
        body = json.dumps({k: v for k, v in report.items()
                           if k not in ("eta_s", "items_per_s", "tokens_per_s")})
        if body != last_body:
            seq += 1
            yield sse_message(seq, "progress", json.dumps(report))
            last_body = body
        if report["status"] in ("completed", "cancelled"):
            yield sse_message(seq + 1, "done", json.dumps(report))
            return
        reply = await state.redis.xread({state.keys.batch_done(batch_id): last_entry}, count=CHUNK,
                                        block=1000)
        if reply:
            last_entry = cast(bytes, reply[0][1][-1][0]).decode()


async def batch_events(request: Request) -> StreamingResponse:
    state = request.app.state
    batch_id = batch_id_of(request)
    await fields_of(request, batch_id)
    return StreamingResponse(progress_events(state, batch_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def cancel_batch(request: Request) -> JSONResponse:
    state = request.app.state
    batch_id = batch_id_of(request)
    await fields_of(request, batch_id)
    outcomes = await anyio.to_thread.run_sync(state.batches.cancel, batch_id)
    return JSONResponse({"id": batch_id, "cancelled": outcomes})


async def cancel_batch_openai(request: Request) -> JSONResponse:
    """`POST /v1/batches/{id}/cancel` (OpenAI's way; DELETE is the native one): the batch."""
    state = request.app.state
    batch_id = batch_id_of(request)
    await fields_of(request, batch_id)
    await anyio.to_thread.run_sync(state.batches.cancel, batch_id)
    return JSONResponse(await shown(request, await fields_of(request, batch_id)))


async def retry_batch(request: Request) -> JSONResponse:
    state = request.app.state
    batch_id = batch_id_of(request)
    await fields_of(request, batch_id)
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        options = BatchOptions.model_validate(
            (parse_json(raw) or {}).get("options", {}) if raw.strip() else {})
    except (ValidationError, AttributeError) as exc:
        field = (f"options.{field_name(tuple(exc.errors()[0]['loc']))}"
                 if isinstance(exc, ValidationError) else "options")
        raise ApiError(422, "invalid_request", f"{field}: {exc}", field) from None
    retried = await anyio.to_thread.run_sync(state.batches.retry, batch_id, options)
    return JSONResponse({"id": batch_id, "retried": retried}, 202 if retried else 200)


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}", cancel_batch, methods=["DELETE"]),
    Route("/v1/batches/{batch_id}/results", batch_results, methods=["GET"]),
    Route("/v1/batches/{batch_id}/events", batch_events, methods=["GET"]),
    Route("/v1/batches/{batch_id}/retry", retry_batch, methods=["POST"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch_openai, methods=["POST"]),
]
