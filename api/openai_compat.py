"""OpenAI-compatible routes: each request becomes an ordinary queued job, answered in OpenAI's
shapes (chat completions, completions, embeddings; streamed as chunks ending `data: [DONE]`).

The job is a normal one: it shows in `/v1/jobs`, its Redis stream and Flower; the reply's
`X-Tokenpool-Job-Id` header names it. A client that hangs up cancels it. Structured output
(`response_format`), tools (api/tools.py) and logprobs are honoured; parameters a model served
here can't honour (n > 1, echo, suffix) are refused naming the parameter, not silently
dropped; tokenpool's own ones (priority, timeout_s, top_k, min_p, repeat_penalty) are
accepted as extras (`extra_body` in the openai package).
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.admission import admit
from api.auth import check_model, enforce_quota, owner_of
from api.errors import ApiError, field_name
from api.jobs import job_record, parse_json, read_body, store_and_send
from api.sse import CancelOnDisconnect
from api.tools import (
    Function,
    Lenient,
    Tool,
    ToolCall,
    ToolChoice,
    answer_schema,
    call_text,
    calls_of,
    chosen,
    with_tools,
)
from broker.constraints import ResponseFormat
from broker.events import StreamedEvent
from broker.messages import FINAL_TYPES, JOB_REQUEST, EmbedJob, GenerateJob

JOB_HEADER = "X-Tokenpool-Job-Id"
OPENAI_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
Body = TypeVar("Body", bound=BaseModel)
EXTRAS = ("priority", "timeout_s", "top_k", "min_p", "repeat_penalty")


class _Request(BaseModel):
    """Fields OpenAI defines that we do not use are ignored, as llama-server and Ollama do."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)


class _Sampled(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = Field(1, description="one choice per request: a job is one sequence")
    response_format: ResponseFormat | None = None
    # tokenpool's own, sent by an OpenAI client as extra_body
    priority: int | None = None
    timeout_s: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None

    def job_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed",
                 "stop", "response_format", *EXTRAS)
        fields = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        top = self.top_count()
        return fields if top is None else {**fields, "logprobs": True, "top_logprobs": top}

    def top_count(self) -> int | None:
        """How many top log-probabilities each token wants (None: no logprobs at all)."""
        return None


class ContentPart(Lenient):
    type: Literal["text"]
    text: str


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call

    def plain(self) -> dict[str, str]:
        """Our chat message: tool results become user turns, earlier calls their JSON."""
        text = self.content if isinstance(self.content, str) else "\n".join(
            part.text for part in self.content or [])
        if self.role == "tool":
            return {"role": "user", "content": f"Result of tool call {self.tool_call_id}:\n{text}"}
        if self.role == "assistant" and self.tool_calls:
            return {"role": "assistant", "content": call_text(self.tool_calls)}
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "invalid_request", "top_logprobs: needs logprobs: true",
                           "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def functions(self) -> list[Function] | None:
        """The functions the answer may call; None: an ordinary answer."""
        functions = chosen(self.tools or [], self.tool_choice)
        if functions is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ApiError(400, "invalid_request", "response_format: not with tools (the "
                           "tools' answer is JSON of its own)", "response_format")
        return functions


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probabilities")

    def top_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a job is one sequence)")
            return value[0]
        return value


class EmbeddingRequest(_Request):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("token arrays are not supported; send text")
        return value


def openai_error(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    status, code = exc.status, exc.type
    if code == "unknown_model":
        status, code = 404, "model_not_found"
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": exc.message, "type": kind, "param": exc.field, "code": code}}
    return JSONResponse(body, status, headers={**(exc.headers or {}), **(headers or {})})


def invalid(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    param = field_name(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, "invalid_request", f"{param or 'body'}: {message}", param)


def openai_route(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return openai_error(exc)

    return route


async def parsed(request: Request, model: type[Body]) -> Body:
    data = parse_json(await read_body(request, request.app.state.settings.max_body_bytes))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


def as_job(fields: dict[str, Any]) -> Any:
    """Our job from mapped fields; an error names our field, which mirrors OpenAI's here."""
    try:
        return JOB_REQUEST.validate_python(fields)
    except ValidationError as exc:
        raise invalid(exc) from None


async def queue(request: Request, job: Any) -> str:
    state = request.app.state
    await admit(job, state.settings, state.vocab)
    check_model(request, job.model)
    await enforce_quota(request)
    record = job_record(state, job, api="openai", **owner_of(request))
    job_id, _ = await store_and_send(state, job, record)
    return job_id


async def final_record(state: Any, job_id: str) -> dict[str, Any]:
    async for event in state.hub.follow(job_id, -1, state.settings.sse_keepalive_s):
        if event is not None and event.type in FINAL_TYPES:
            break
    record = await state.store.get(job_id)
    if record is None:
        raise ApiError(500, "job_expired", f"job {job_id} expired before it could be read")
    return dict(record)


async def until_disconnect(request: Request, job_id: str,
                           work: Callable[[], Awaitable[Response]]) -> Response:
    """Run `work`; if the client hangs up first, cancel the job and answer nobody."""
    answer: Response = Response(status_code=499)

    async def run(cancel: anyio.CancelScope) -> None:
        nonlocal answer
        answer = await work()
        cancel.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run, group.cancel_scope)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await request.app.state.store.cancel(job_id)
    return answer


def finish_reason(record: dict[str, Any]) -> str:
    if record["status"] == "cancelled":
        return "cancelled"
    return str((record.get("result") or {}).get("finish_reason") or "stop")


def usage_of(record: dict[str, Any]) -> dict[str, int]:
    usage = record.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class Shape:
    """How one endpoint names and fills its objects (chat and plain completions differ; a
    tools answer is JSON to turn into calls; logprobs when asked)."""

    def __init__(self, job_id: str, model: str, chat: bool, tools: bool = False,
                 logprobs: bool = False) -> None:
        self.job_id, self.chat, self.tools, self.logprobs = job_id, chat, tools, logprobs
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}",
                     "created": int(time.time()), "model": model}

    def choice(self, text: str | None, reason: str | None, first: bool = False,
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": reason,
                    "logprobs": legacy_logprobs(logprobs) if self.logprobs else None}
        delta = ({"role": "assistant", "content": text or ""} if first
                 else {} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "finish_reason": reason,
                "logprobs": {"content": logprobs or [], "refusal": None}
                if self.logprobs and text is not None and not first else None}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {**self.head, "object": kind, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    def answer(self, record: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None,
                                                      str]:
        """(content, tool calls, finish reason) of a finished job."""
        text = str((record.get("result") or {}).get("text") or "")
        reason = finish_reason(record)
        if not self.tools:
            return text, None, reason
        calls, content = calls_of(self.job_id, text)
        return content, calls, "tool_calls" if calls and reason == "stop" else reason

    def whole(self, record: dict[str, Any]) -> dict[str, Any]:
        content, calls, reason = self.answer(record)
        logprobs = (record.get("result") or {}).get("logprobs") or []
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": reason,
                      "logprobs": {"content": logprobs, "refusal": None}
                      if self.logprobs else None}
            kind = "chat.completion"
        else:
            choice = self.choice(content, reason, logprobs=logprobs)
            kind = "text_completion"
        return {**self.head, "object": kind, "choices": [choice], "usage": usage_of(record)}


def legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The completions endpoint's older logprobs object, from per-token entries."""
    entries = entries or []
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


async def chunks(state: Any, job_id: str, shape: Shape, with_usage: bool) -> AsyncIterator[bytes]:
    """A tools answer is JSON until it ends: its calls (or its answer) come as whole deltas
    then, in OpenAI's chunk format; any other answer streams token by token."""
    if shape.chat:
        yield shape.chunk([shape.choice("", None, first=True)])
    keepalive_s = state.settings.sse_keepalive_s
    async for event in state.hub.follow(job_id, -1, keepalive_s):
        if event is None:
            yield b": keepalive\n\n"
        elif event.type == "token" and not shape.tools:
            data = json.loads(event.data)
            yield shape.chunk([shape.choice(data["text"], None, logprobs=data.get("logprobs"))])
        elif event.type in FINAL_TYPES:
            async for tail in ending(state, job_id, shape, event, with_usage):
                yield tail
            return


async def ending(state: Any, job_id: str, shape: Shape, event: StreamedEvent,
                 with_usage: bool) -> AsyncIterator[bytes]:
    if event.type == "error":
        error = json.loads(event.data)["error"]
        body = {"error": {"message": error["message"], "type": "server_error", "param": None,
                          "code": error["type"]}}
        yield f"data: {json.dumps(body)}\n\n".encode()
        return
    record = await state.store.get(job_id) or {"status": "cancelled"}
    content, calls, reason = shape.answer(record)
    if shape.tools and calls:
        deltas = [{"index": i, **call, "function": dict(call["function"])}
                  for i, call in enumerate(calls)]
        yield shape.chunk([{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None,
                            "finish_reason": None}])
    elif shape.tools and content:
        yield shape.chunk([shape.choice(content, None)])
    yield shape.chunk([shape.choice(None, reason)])
    if with_usage:
        yield shape.chunk([], usage=usage_of(record))
    yield b"data: [DONE]\n\n"


async def complete(request: Request, job_id: str, shape: Shape, body: _Sampled) -> Response:
    state, headers = request.app.state, {JOB_HEADER: job_id}
    if body.stream:
        with_usage = bool((body.stream_options or {}).get("include_usage"))

        async def cancel() -> None:
            await state.store.cancel(job_id)

        return CancelOnDisconnect(
            chunks(state, job_id, shape, with_usage), cancel, media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def whole() -> Response:
        record = await final_record(state, job_id)
        if record["status"] == "failed":
            error = record.get("error") or {}
            return openai_error(ApiError(500, error.get("type", "failed"),
                                         error.get("message", "the job failed")), headers)
        return JSONResponse(shape.whole(record), headers=headers)

    return await until_disconnect(request, job_id, whole)


def default_max_tokens(request: Request, model: str) -> int:
    """No max_tokens: up to the model's cap, as OpenAI's chat endpoint goes to the context."""
    return model_cap(request.app.state.settings, model)


def model_cap(settings: Any, model: str) -> int:
    spec = settings.models.get(model)
    return spec.max_tokens if spec is not None else 1


def chat_job(body: ChatRequest, settings: Any) -> tuple[GenerateJob, list[Function] | None]:
    """The job of a chat request, and the functions its answer may call (None: plain text)."""
    max_tokens = body.max_completion_tokens or body.max_tokens or model_cap(settings,
                                                                            body.model)
    messages, fields = [m.plain() for m in body.messages], body.job_fields()
    functions = body.functions()
    if functions is not None:
        messages = with_tools(messages, body.tools or [])
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "tool_calls",
            "schema": answer_schema(functions, body.tool_choice, body.parallel_tool_calls)}}
    job: GenerateJob = as_job({"kind": "generate", "model": body.model,
                               "max_tokens": max_tokens, "messages": messages, **fields})
    return job, functions


def completion_job(body: CompletionRequest) -> GenerateJob:
    job: GenerateJob = as_job({
        "kind": "generate", "model": body.model, "prompt": body.prompt,
        "max_tokens": body.max_tokens or OPENAI_COMPLETIONS_MAX_TOKENS, **body.job_fields(),
    })
    return job


def embedding_job(body: EmbeddingRequest, settings: Any) -> EmbedJob:
    texts = [body.input] if isinstance(body.input, str) else body.input
    job: EmbedJob = as_job({"kind": "embed", "model": body.model, "texts": texts})
    spec = settings.models.get(body.model)
    dims = spec.dimensions if spec is not None else None
    if body.dimensions is not None and dims is not None and body.dimensions != dims:
        raise ApiError(400, "invalid_request", f"dimensions: model {body.model!r} gives "
                       f"{dims} dimensions, not {body.dimensions}", "dimensions")
    return job


def embedding_list(record: dict[str, Any], model: str, encoding: str) -> dict[str, Any]:
    """OpenAI's embeddings answer from a finished embed job."""
    data = [{"object": "embedding", "index": i, "embedding": encoded(v, encoding)}
            for i, v in enumerate(record["result"]["embeddings"])]
    tokens = (record.get("usage") or {}).get("prompt_tokens", 0)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@openai_route
async def chat_completions(request: Request) -> Response:
    body = await parsed(request, ChatRequest)
    job, functions = chat_job(body, request.app.state.settings)
    try:
        job_id = await queue(request, job)
    except ApiError as exc:  # the tools' schema is ours: name the tools, not response_format
        if functions is not None and (exc.field or "").startswith("response_format"):
            raise ApiError(exc.status, exc.type, "tools: a function's parameters: "
                           f"{exc.message}", "tools") from None
        raise
    shape = Shape(job_id, body.model, chat=True, tools=functions is not None,
                  logprobs=job.logprobs)
    return await complete(request, job_id, shape, body)


@openai_route
async def completions(request: Request) -> Response:
    body = await parsed(request, CompletionRequest)
    job = completion_job(body)
    job_id = await queue(request, job)
    shape = Shape(job_id, body.model, chat=False, logprobs=job.logprobs)
    return await complete(request, job_id, shape, body)


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@openai_route
async def embeddings(request: Request) -> Response:
    body = await parsed(request, EmbeddingRequest)
    job = embedding_job(body, request.app.state.settings)
    job_id = await queue(request, job)
    headers = {JOB_HEADER: job_id}

    async def whole() -> Response:
        record = await final_record(request.app.state, job_id)
        if record["status"] != "succeeded":
            error = record.get("error") or {"type": record["status"], "message": "not done"}
            return openai_error(ApiError(500, error["type"], error["message"]), headers)
        return JSONResponse(embedding_list(record, body.model, body.encoding_format),
                            headers=headers)

    return await until_disconnect(request, job_id, whole)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
