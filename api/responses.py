"""OpenAI's Responses API as a second face of generate jobs: `POST /v1/responses` queues an
ordinary job (it shows in `/v1/jobs`, its Redis stream, Flower), whose record also keeps what
the Responses API needs (api/response_events.py derives its objects and events).

Background mode is the native API's submit-then-follow; `previous_response_id` continues a
stored conversation (each response keeps the whole conversation before it, so an older one
expiring or being deleted never breaks a newer one); `store: false` keeps nothing once the
answer is given. Fields OpenAI defines that tokenpool can't honour are a 400 naming them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.admission import admit, check_context, model_for
from api.auth import check_model, enforce_quota, may_see, owner_of
from api.errors import ApiError
from api.jobs import job_record, parse_json, read_body, store_and_send
from api.openai_compat import (
    EXTRAS,
    JOB_HEADER,
    as_job,
    default_max_tokens,
    invalid,
    openai_route,
    until_disconnect,
)
from api.response_events import Derivation, job_of, response_id, response_object
from api.sse import CancelOnDisconnect
from broker.messages import FINAL_STATUSES, FINAL_TYPES, GenerateJob

UNSTORED_KEEP_S = 60  # store: false — the API deletes the job once answered; this if it died
CANCEL_WAIT_S = 10.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Item = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier output's, sent back as given


class InputItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None

    def item(self) -> Item:
        """As stored and shown: content as a list of typed parts."""
        kind = "output_text" if self.role == "assistant" else "input_text"
        parts = ([{"type": kind, "text": self.content}] if isinstance(self.content, str)
                 else [{"type": part.type, "text": part.text} for part in self.content])
        return {"type": "message", "role": self.role, "content": parts}


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def response_format(self) -> dict[str, Any] | None:
        if self.type != "json_schema":
            return {"type": self.type}
        if self.schema_ is None:
            raise ApiError(400, "invalid_request", "text.format.schema: required with type "
                           "json_schema", "text.format.schema")
        spec = {"name": self.name or "output", "schema": self.schema_, "strict": self.strict}
        return {"type": "json_schema", "json_schema": spec}


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponseRequest(_Strict):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    previous_response_id: str | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] = "auto"
    # accepted, with no effect here
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["auto", "none"] | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="no tools on /v1/responses")
    stream_options: dict[str, Any] | None = None
    # tokenpool's own, sent by an OpenAI client as extra_body
    priority: int | None = None
    timeout_s: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("input must not be empty")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512")
        return value

    def items(self) -> list[Item]:
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": self.input}]}]
        return [item.item() for item in self.input]

    def job_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "seed", "stop", *EXTRAS)
        fields = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        form = self.text.format if self.text else None
        if form is not None:
            fields["response_format"] = form.response_format()
        return fields

    def meta(self, history: list[dict[str, Any]], dropped: int) -> dict[str, Any]:
        """What the job's record keeps for the Responses API."""
        form = self.text.format if self.text and self.text.format else TextFormat(type="text")
        return {"instructions": self.instructions, "input": self.items(), "history": history,
                "dropped_turns": dropped, "previous_response_id": self.previous_response_id,
                "metadata": self.metadata or {}, "store": self.store,
                "background": self.background, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p,
                "text": {"format": form.model_dump(by_alias=True, exclude_none=True)},
                "truncation": self.truncation}


def refused(exc: ValidationError) -> ApiError:
    """The first problem, naming the field; a field OpenAI has and we don't, as such."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "extra_forbidden" or first["loc"][:1] == ("tools",):
        name = ".".join(str(part) for part in first["loc"])
        return ApiError(400, "unsupported_parameter", f"{name}: not supported by tokenpool's "
                        "/v1/responses (the docs list the fields it honours)", name)
    return invalid(exc)


def plain(item: Item) -> dict[str, str]:
    """A stored item as our chat message (developer turns are system turns)."""
    role = "system" if item["role"] == "developer" else item["role"]
    return {"role": role, "content": "\n".join(part["text"] for part in item["content"])}


def messages_of(instructions: str | None, turns: list[dict[str, Any]],
                items: list[Item]) -> list[dict[str, str]]:
    head = [{"role": "system", "content": instructions}] if instructions else []
    earlier = [plain(item) for turn in turns for item in turn["items"]]
    return [*head, *earlier, *(plain(item) for item in items)]


# --- the conversation before a response -------------------------------------------------------

async def response_record(request: Request, response: str, param: str = "id",
                          ) -> dict[str, Any]:
    """A response's job record, if it exists, is a response and is the caller's; else 404."""
    job_id = job_of(response)
    record = await request.app.state.store.get(job_id) if job_id else None
    if record is None or not record.get("response") or not may_see(request,
                                                                   record.get("owner")):
        raise ApiError(404, "not_found", f"no response {response!r}", param)
    return record


async def output_text(state: Any, record: dict[str, Any]) -> str | None:
    if record["status"] == "succeeded":
        return str((record.get("result") or {}).get("text") or "")
    if record["status"] == "queued" and not record.get("attempts"):
        return None
    return await state.store.published_text(record["id"])


async def history_after(request: Request, previous: str | None) -> list[dict[str, Any]]:
    """The turns a response continues: the previous one's own history, then its turn (its
    input and its answer)."""
    if previous is None:
        return []
    record = await response_record(request, previous, "previous_response_id")
    if record["status"] not in FINAL_STATUSES:
        raise ApiError(400, "invalid_request", f"previous_response_id: response {previous} is "
                       "still running; continue it once it has ended", "previous_response_id")
    meta = record["response"]
    text = await output_text(request.app.state, record)
    answer = [] if not text else [{"type": "message", "role": "assistant",
                                   "content": [{"type": "output_text", "text": text}]}]
    return [*meta["history"], {"response_id": previous, "items": [*meta["input"], *answer]}]


async def fitted(request: Request, body: ResponseRequest,
                 history: list[dict[str, Any]]) -> tuple[GenerateJob, int]:
    """The job, and how many of the oldest turns it leaves out. With truncation "auto" whole
    earlier turns go, oldest first, until the prompt and max_output_tokens fit the model's
    context; instructions and this request's input always stay."""
    state = request.app.state
    max_tokens = body.max_output_tokens or default_max_tokens(request, body.model)
    fields, items = body.job_fields(), body.items()
    for dropped in range(len(history) + 1):
        messages = messages_of(body.instructions, history[dropped:], items)
        job: GenerateJob = as_job({"kind": "generate", "model": body.model,
                                   "max_tokens": max_tokens, "messages": messages, **fields})
        if body.truncation == "disabled" or dropped == len(history):
            return job, dropped
        spec = model_for(job, state.settings)
        try:
            n = await check_context(job, spec, state.vocab)
        except ApiError as exc:
            if exc.type != "context_length_exceeded":
                raise
            continue
        if n + max_tokens <= spec.n_ctx:
            return job, dropped
    raise AssertionError("unreachable: the last round returns")


async def queue_response(request: Request, body: ResponseRequest) -> dict[str, Any]:
    """Queue the response's job; its record as just stored."""
    state = request.app.state
    if body.background and not body.store:
        raise ApiError(400, "invalid_request", "store: background responses must be stored",
                       "store")
    history = await history_after(request, body.previous_response_id)
    job, dropped = await fitted(request, body, history)
    await admitted(request, job)
    await enforce_quota(request)
    keep_s = state.settings.responses_ttl_s if body.store else UNSTORED_KEEP_S
    record = job_record(state, job, api="responses", response=json.dumps(body.meta(
        history, dropped)), keep_s=str(keep_s), **owner_of(request))
    job_id, _ = await store_and_send(state, job, record)
    return await state.store.get(job_id) or {**record, "id": job_id, "status": "queued"}


async def admitted(request: Request, job: GenerateJob) -> None:
    """Admission as for every job, with OpenAI's names for our fields."""
    try:
        await admit(job, request.app.state.settings, request.app.state.vocab)
    except ApiError as exc:
        names = {"response_format.json_schema": "text.format", "response_format": "text.format",
                 "messages": "input", "max_tokens": "max_output_tokens"}
        for ours, theirs in names.items():
            if (exc.field or "").startswith(ours):
                field = theirs + (exc.field or "")[len(ours):]
                raise ApiError(exc.status, exc.type, exc.message.replace(ours, theirs),
                               field) from None
        raise
    check_model(request, job.model)


# --- following ----------------------------------------------------------------------------

def sse(seq: int, event: dict[str, Any]) -> bytes:
    body = json.dumps({"type": event["type"], "sequence_number": seq,
                       **{k: v for k, v in event.items() if k != "type"}})
    # No `id:` line: the openai package's decoder keeps the last id, and would then take the
    # blank line after a keepalive comment for an event with no data.
    return f"event: {event['type']}\ndata: {body}\n\n".encode()


async def response_events(state: Any, record: dict[str, Any], after: int,
                          ) -> AsyncIterator[bytes]:
    """The Responses stream after sequence number `after`, derived from the job's stream
    replayed from its start, then live until the job ends."""
    job_id, derivation, seq = record["id"], Derivation(record), -1
    async for event in state.hub.follow(job_id, -1, state.settings.sse_keepalive_s):
        if event is None:
            if not await state.redis.exists(state.keys.job(job_id)):
                return
            yield b": keepalive\n\n"
            continue
        if event.type in FINAL_TYPES:
            final = await state.store.get(job_id) or {**record, "status": "cancelled"}
            made = derivation.final(event.type, final)
        else:
            made = derivation.feed(event.type, json.loads(event.data))
        for item in made:
            seq += 1
            if seq > after:
                yield sse(seq, item)
        if event.type in FINAL_TYPES:
            return


async def forget(state: Any, job_id: str) -> None:
    await state.redis.delete(state.keys.job(job_id), state.keys.events(job_id))


def streamed(request: Request, record: dict[str, Any], after: int) -> Response:
    """The events; a response nobody runs in the background is cancelled if its reader goes,
    and one not stored is forgotten once it has been read to the end."""
    state, job_id, meta = request.app.state, record["id"], record["response"]
    headers = {**SSE_HEADERS, JOB_HEADER: job_id}

    async def body() -> AsyncIterator[bytes]:
        async for chunk in response_events(state, record, after):
            yield chunk
        if not meta["store"]:
            await forget(state, job_id)

    if meta["background"]:
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def cancel() -> None:
        await state.store.cancel(job_id)

    return CancelOnDisconnect(body(), cancel, media_type="text/event-stream", headers=headers)


async def until_final(state: Any, job_id: str, limit_s: float | None = None,
                      ) -> dict[str, Any] | None:
    """The job's record once it has ended (None: still running after `limit_s`)."""
    with anyio.move_on_after(limit_s):
        async for event in state.hub.follow(job_id, -1, state.settings.sse_keepalive_s):
            if event is not None and event.type in FINAL_TYPES:
                break
    record = await state.store.get(job_id)
    return record if record and record["status"] in FINAL_STATUSES else None


async def shown(state: Any, record: dict[str, Any]) -> dict[str, Any]:
    return response_object(record, await output_text(state, record))


# --- routes -------------------------------------------------------------------------------

@openai_route
async def create(request: Request) -> Response:
    state = request.app.state
    data = parse_json(await read_body(request, state.settings.max_body_bytes))
    try:
        body = ResponseRequest.model_validate(data)
    except ValidationError as exc:
        raise refused(exc) from None
    record = await queue_response(request, body)
    job_id, headers = record["id"], {JOB_HEADER: record["id"]}
    if body.stream:
        return streamed(request, record, -1)
    if body.background:
        return JSONResponse(response_object(record, None), headers=headers)

    async def whole() -> Response:
        final = await until_final(state, job_id)
        answer = await shown(state, final or {**record, "status": "cancelled"})
        if not body.store:
            await forget(state, job_id)
        return JSONResponse(answer, headers=headers)

    return await until_disconnect(request, job_id, whole)


def starting_after(request: Request) -> int:
    raw = request.query_params.get("starting_after")
    if raw is None:
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", "starting_after: must be an integer sequence "
                       "number", "starting_after") from None
    if value < -1:
        raise ApiError(400, "invalid_request", "starting_after: must be >= -1",
                       "starting_after")
    return value


@openai_route
async def retrieve(request: Request) -> Response:
    record = await response_record(request, request.path_params["response_id"])
    if request.query_params.get("stream", "false").lower() == "true":
        return streamed(request, record, starting_after(request))
    return JSONResponse(await shown(request.app.state, record), headers={JOB_HEADER:
                                                                        record["id"]})


@openai_route
async def cancel(request: Request) -> Response:
    """Cancel a queued or running response; answered once it has stopped (within a token)."""
    state = request.app.state
    record = await response_record(request, request.path_params["response_id"])
    await state.store.cancel(record["id"])
    final = await until_final(state, record["id"], CANCEL_WAIT_S)
    return JSONResponse(await shown(state, final or record))


@openai_route
async def delete(request: Request) -> Response:
    """Forget a response (a running one is cancelled first)."""
    state = request.app.state
    record = await response_record(request, request.path_params["response_id"])
    if record["status"] not in FINAL_STATUSES:
        await state.store.cancel(record["id"])
        if await until_final(state, record["id"], CANCEL_WAIT_S) is None:
            raise ApiError(409, "still_running", f"response {response_id(record['id'])} is "
                           "cancelled but has not stopped yet; retry the delete", "id")
    await forget(state, record["id"])
    return JSONResponse({"id": response_id(record["id"]), "object": "response",
                         "deleted": True})


def listed(items: list[Item], request: Request) -> dict[str, Any]:
    """OpenAI's list page: `order` (desc by default), `after` an item id, `limit` 1-100."""
    params = request.query_params
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_request", "order: asc or desc", "order")
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ApiError(400, "invalid_request", "limit: an integer from 1 to 100", "limit")
    ordered = items if order == "asc" else items[::-1]
    after = params.get("after")
    ids = [item["id"] for item in ordered]
    start = ids.index(after) + 1 if after in ids else 0
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(ordered)}


@openai_route
async def input_items(request: Request) -> Response:
    record = await response_record(request, request.path_params["response_id"])
    items = [{"id": f"msg_{record['id']}_{i}", **item, "status": "completed"}
             for i, item in enumerate(record["response"]["input"])]
    return JSONResponse(listed(items, request))


@openai_route
async def export(request: Request) -> Response:
    """The whole conversation up to this response, as JSONL: one item a line, oldest first,
    each naming the response it belongs to (turns left out of a prompt by truncation too)."""
    state = request.app.state
    name = request.path_params["response_id"]
    record = await response_record(request, name)
    meta = record["response"]
    text = await output_text(state, record)
    answer = [] if text is None else [{"type": "message", "role": "assistant",
                                       "content": [{"type": "output_text", "text": text}]}]
    turns = [*meta["history"], {"response_id": name, "items": [*meta["input"], *answer]}]
    lines = [json.dumps({"response_id": turn["response_id"], **item})
             for turn in turns for item in turn["items"]]
    return Response("".join(line + "\n" for line in lines), media_type="application/jsonl")


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]),
    Route("/v1/responses/{response_id}/export", export, methods=["GET"]),
]
