"""API keys at the door: once any key exists, every route but /health needs
`Authorization: Bearer tp_…` (the OpenAI client's `api_key` sends exactly that). The key
reaches the routes as `request.state.api_key`; each key sees only its own jobs and batches."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError
from broker.apikeys import ApiKey, authenticate, keys_exist

OPEN_PATHS = frozenset({"/health"})
KEYS_CHECK_S = 2.0  # how stale "are there keys at all?" may be


class KeyAuth:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._enabled: tuple[float, bool] = (0.0, False)

    async def enabled(self, state: Any) -> bool:
        checked_at, value = self._enabled
        if time.monotonic() - checked_at > KEYS_CHECK_S:
            value = await keys_exist(state.redis, state.keys)
            self._enabled = (time.monotonic(), value)
        return value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        scope.setdefault("state", {})["api_key"] = None
        if await self.enabled(state):
            key = await self.key_of(scope, state)
            if key is None:
                await self.refuse(scope, receive, send)
                return
            scope["state"]["api_key"] = key
        await self.app(scope, receive, send)

    async def key_of(self, scope: Scope, state: Any) -> ApiKey | None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return await authenticate(state.redis, state.keys, token.strip())

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(401, "unauthorized", "a valid API key is required: "
                         "Authorization: Bearer <key>", "Authorization")
        body = {"error": {"type": error.type, "message": error.message, "field": error.field,
                          "code": "invalid_api_key", "param": None}}
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def key_of(request: Request) -> ApiKey | None:
    return getattr(request.state, "api_key", None)


def owner_of(request: Request) -> dict[str, str]:
    """The record field that ties a new job or batch to its key (none without keys)."""
    key = key_of(request)
    return {"owner": key.id} if key else {}


def may_see(request: Request, owner: str | None) -> bool:
    """A key sees only what it created; without keys everything is visible."""
    key = key_of(request)
    return key is None or owner == key.id


def check_model(request: Request, model: str) -> None:
    key = key_of(request)
    if key is not None and key.models is not None and model not in key.models:
        raise ApiError(403, "model_not_allowed", f"this key may use {', '.join(key.models)}; "
                       f"not {model!r}", "model")
