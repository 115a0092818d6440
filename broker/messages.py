"""Frozen JSON messages shared by the API and the workers: job requests and job events."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from broker.constraints import MAX_GRAMMAR_CHARS, ResponseFormat, schema_grammar

FINAL_TYPES = frozenset({"done", "error", "cancelled"})
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class _Job(_Frozen):
    model: str = Field(min_length=1)
    priority: int = Field(5, ge=0, le=9, description="0 least urgent, 9 most")
    timeout_s: float | None = Field(
        None, gt=0, description="run-time limit from its first start; unset: the configured one"
    )
    webhook: str | None = Field(
        None, min_length=8, max_length=2048,
        description="an http(s) URL told when the job ends (signed; docs/webhooks.md)")


class _Constrained(_Frozen):
    """Output held to a JSON schema, any JSON object, or a GBNF grammar (broker.constraints)."""

    response_format: ResponseFormat | None = None
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS,
                                description="a GBNF grammar whose start rule is `root`")

    @model_validator(mode="after")
    def _one_constraint(self) -> Any:
        if self.grammar is not None and self.output_schema() is not None:
            raise ValueError("give at most one of grammar or a JSON response_format")
        if (self.response_format is not None and self.response_format.type == "json_schema"
                and self.response_format.json_schema is None):
            raise ValueError("response_format.json_schema is required with type json_schema")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match (None: any text, or a grammar's)."""
        return self.response_format.output_schema() if self.response_format else None

    def constraint(self) -> str | None:
        """The GBNF grammar the output is sampled under (None: free); ConstraintError names
        the field that cannot be enforced."""
        if self.grammar is not None:
            return self.grammar
        schema = self.output_schema()
        if schema is None:
            return None
        where = ("response_format.json_schema.schema"
                 if self.response_format and self.response_format.type == "json_schema"
                 else "response_format")
        return schema_grammar(schema, where)


class GenerateJob(_Job, _Constrained):
    kind: Literal["generate"]
    model: str = Field("chat", min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, gt=0.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: per count")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: once seen")
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: list[str] = Field(default_factory=list, max_length=16)
    logprobs: bool = Field(False, description="each sampled token's log-probability")
    top_logprobs: int = Field(0, ge=0, le=20, description="and this many most likely tokens")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateJob:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class SummarizeJob(_Job, _Constrained):
    kind: Literal["summarize"]
    model: str = Field("summary", min_length=1)
    text: str = Field(min_length=1)
    instructions: str | None = Field(None, max_length=2000)
    max_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.3, ge=0.0, le=5.0)
    seed: int | None = Field(None, ge=0, lt=2**32)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty")
        return value


class EmbedJob(_Job):
    kind: Literal["embed"]
    model: str = Field("embed", min_length=1)
    texts: list[str] = Field(min_length=1)
    normalize: bool = True


JobRequest = Annotated[GenerateJob | SummarizeJob | EmbedJob, Field(discriminator="kind")]
JOB_REQUEST = TypeAdapter(JobRequest)
MODEL_KIND_OF_JOB = {"generate": "llm", "summarize": "llm", "embed": "embedding"}


class _Event(_Frozen):
    """An event as a worker or the API writes it; Redis adds `seq` (see broker.events)."""

    job: str
    ts: float = Field(default_factory=time.time)


class Queued(_Event):
    type: Literal["queued"] = "queued"


class Started(_Event):
    type: Literal["started"] = "started"
    worker: str
    attempt: int


class Requeued(_Event):
    """The attempt's worker was lost; the job is queued again and goes on where it stopped."""

    type: Literal["requeued"] = "requeued"
    attempt: int
    reason: str


class TokenEvent(_Event):
    type: Literal["token"] = "token"
    text: str
    logprobs: list[dict[str, Any]] | None = None  # the tokens this text came from, when asked


class Stage(_Event):
    """Summaries: which stage runs now (`map` part i of n, or `reduce`)."""

    type: Literal["stage"] = "stage"
    stage: Literal["map", "reduce", "single"]
    part: int | None = None
    parts: int | None = None


class Done(_Event):
    type: Literal["done"] = "done"
    usage: dict[str, int]
    timings: dict[str, float]
    valid: bool | None = None  # a constrained job's: its output matched the schema


class ErrorInfo(_Frozen):
    type: str
    message: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    error: ErrorInfo


class Cancelled(_Event):
    type: Literal["cancelled"] = "cancelled"


Event = Queued | Started | Requeued | TokenEvent | Stage | Done | ErrorEvent | Cancelled
