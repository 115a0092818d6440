"""The contract's error body: {"error": {"type", "message", "field"}}; a 4xx for bad input."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"type": self.type, "message": self.message, "field": self.field}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def field_name(loc: tuple[Any, ...]) -> str | None:
    """`("generate", "messages", 0, "role")` -> `messages[0].role` (the union tag dropped)."""
    parts = [p for p in loc if p not in ("generate", "summarize", "embed")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def from_validation(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    field = field_name(tuple(first["loc"]))
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        field = "kind"
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(422, "invalid_request", f"{field or 'body'}: {message}", field)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


REDIS_RETRY_AFTER_S = 2  # what a 503 for an unreachable Redis tells clients to wait


def store_unavailable() -> ApiError:
    """Redis is unreachable: 503 with Retry-After, for every route that needs it."""
    return ApiError(503, "unavailable", "the job store (Redis) is unreachable; retry later",
                    None, {"Retry-After": str(REDIS_RETRY_AFTER_S)})


def not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id!r}", "id")
