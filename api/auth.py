"""API keys at the door: once any key exists, every route but /health needs
`Authorization: Bearer tp_…` (the OpenAI client's `api_key` sends exactly that). The key
reaches the routes as `request.state.api_key`; each key sees only its own jobs and batches."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError, store_unavailable
from broker.apikeys import LIMITS, ApiKey, authenticate, keys_exist

log = logging.getLogger("tokenpool.api")
OPEN_PATHS = frozenset({"/health"})
KEYS_CHECK_S = 2.0  # how stale "are there keys at all?" may be
ANY_KEY: tuple[str, ...] = ()
JOBS, FLEET, ADMIN, METRICS = ("jobs",), ("fleet:read",), ("admin",), ("metrics",)
# The scopes a key needs for each route (any one of them; ANY_KEY: any valid key). Every
# route of the app is here: a test walks the app's route table against it.
ROUTE_SCOPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", "/ready"): ANY_KEY,
    ("GET", "/openapi.json"): ANY_KEY,
    ("GET", "/v1/usage"): ANY_KEY,
    ("GET", "/v1/models"): ("jobs", "fleet:read"),  # live state with fleet:read only
    **{(method, path): JOBS for method, path in (
        ("POST", "/v1/jobs"), ("POST", "/v1/jobs/batch"), ("GET", "/v1/jobs/{job_id}"),
        ("DELETE", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/events"),
        ("POST", "/v1/batches"), ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
        ("DELETE", "/v1/batches/{batch_id}"), ("GET", "/v1/batches/{batch_id}/results"),
        ("GET", "/v1/batches/{batch_id}/events"), ("POST", "/v1/batches/{batch_id}/retry"),
        ("GET", "/v1/dead-letters"), ("POST", "/v1/dead-letters/{job_id}/requeue"),
        ("DELETE", "/v1/dead-letters/{job_id}"),
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"), ("POST", "/v1/responses"),
        ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}"),
        ("POST", "/v1/responses/{response_id}/cancel"),
        ("GET", "/v1/responses/{response_id}/input_items"),
        ("GET", "/v1/responses/{response_id}/export"), ("POST", "/v1/batches/{batch_id}/cancel"),
        ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
        ("DELETE", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"))},
    ("GET", "/v1/workers"): FLEET,
    ("GET", "/v1/workers/{name}"): FLEET,
    ("POST", "/v1/workers/{name}/model"): ADMIN,
    ("POST", "/v1/workers/{name}/unload"): ADMIN,
    ("GET", "/metrics"): METRICS,
    ("GET", "/v1/webhooks/dead-letters"): ADMIN,
    ("POST", "/v1/webhooks/dead-letters/{delivery_id}/redeliver"): ADMIN,
}


def route_of(scope: Scope) -> tuple[str, str] | None:
    """(method, path template) of the route this request reaches (None: no route; the app
    answers 404 or 405 itself)."""
    for route in scope["app"].routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            method = "GET" if scope["method"] == "HEAD" else scope["method"]
            return method, route.path
    return None


def missing_scope(scope: Scope, key: ApiKey) -> ApiError | None:
    found = route_of(scope)
    needed = ROUTE_SCOPES[found] if found else ANY_KEY
    if not needed or any(key.allows(name) for name in needed):
        return None
    method, path = found or ("", "")
    return ApiError(403, "insufficient_scope", f"{method} {path} needs a key with the scope "
                    f"{' or '.join(needed)}; this key has {', '.join(key.scopes)}",
                    "Authorization")


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
        try:
            refusal = await self.admit(scope, state)
        except RedisError as exc:
            # Before any route runs, so the app's own 503 handler cannot: with the key store
            # unreadable no key can be checked, and nobody gets in.
            log.warning("redis error checking keys on %s: %s", scope["path"], exc)
            refusal = store_unavailable()
        if refusal is not None:
            await self.refuse(scope, receive, send, refusal)
            return
        await self.app(scope, receive, send)

    async def admit(self, scope: Scope, state: Any) -> ApiError | None:
        """None to let the request in (its key, if any, set on the scope), else the refusal."""
        if not await self.enabled(state):
            return None
        key = await self.key_of(scope, state)
        if key is None:
            return ApiError(401, "unauthorized", "a valid API key is required: "
                            "Authorization: Bearer <key>", "Authorization",
                            {"WWW-Authenticate": "Bearer"})
        scope["state"]["api_key"] = key
        refused = missing_scope(scope, key)
        if refused is not None:
            return refused
        wait_s = await over_rate(state, key)
        if wait_s is None:
            return None
        return ApiError(429, "rate_limited", f"over {limit_of(state, key, 'requests_per_minute')} "
                        "requests per minute for this key", "Authorization",
                        {"Retry-After": str(wait_s)})

    async def key_of(self, scope: Scope, state: Any) -> ApiKey | None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return await authenticate(state.redis, state.keys, token.strip())

    async def refuse(self, scope: Scope, receive: Receive, send: Send,
                     error: ApiError) -> None:
        """The error in a body both our clients and OpenAI's can read."""
        code = "invalid_api_key" if error.status == 401 else error.type
        body = {"error": {"type": error.type, "message": error.message, "field": error.field,
                          "code": code, "param": None}}
        headers = [(b"content-type", b"application/json")] + [
            (k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def limit_of(state: Any, key: ApiKey, name: str) -> int | None:
    """The key's own limit, else the settings' default for every key."""
    own = getattr(key, name)
    return int(own) if own is not None else getattr(state.settings, f"key_{name}")


def utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


async def over_rate(state: Any, key: ApiKey) -> int | None:
    """Seconds to wait if this request is over the key's requests per minute, else None."""
    limit = limit_of(state, key, "requests_per_minute")
    if limit is None:
        return None
    now = time.time()
    counter = state.keys.key_requests(key.id, int(now // 60))
    pipe = state.redis.pipeline(transaction=True)
    pipe.incr(counter)
    pipe.expire(counter, 120)
    used, _ = await pipe.execute()
    return None if used <= limit else 60 - int(now % 60)


async def usage_of(state: Any, key: ApiKey, count_queued: bool = True) -> dict[str, Any]:
    """The key's use now. Counting its queued jobs reads each job in flight, so a submit
    does that only when the key has a max_queued_jobs limit."""
    now = time.time()
    pipe = state.redis.pipeline(transaction=False)
    pipe.get(state.keys.key_requests(key.id, int(now // 60)))
    pipe.get(state.keys.key_tokens(key.id, utc_day(now)))
    if count_queued:
        pipe.smembers(state.keys.key_active(key.id))
    else:
        pipe.scard(state.keys.key_active(key.id))
    requests, tokens, active = await pipe.execute()
    use = {"requests_this_minute": int(requests or 0), "tokens_today": int(tokens or 0)}
    if not count_queued:
        return {**use, "active_jobs": int(active)}
    statuses = state.redis.pipeline(transaction=False)
    for job_id in active:
        statuses.hget(state.keys.job(job_id.decode()), "status")
    queued = sum(s == b"queued" for s in await statuses.execute()) if active else 0
    return {**use, "active_jobs": len(active), "queued_jobs": queued}


async def enforce_quota(request: Request, n_jobs: int = 1) -> None:
    """Before anything is stored: 429 with Retry-After when the key's jobs in flight or its
    tokens of the day are used up."""
    key = key_of(request)
    if key is None:
        return
    state = request.app.state
    queued = limit_of(state, key, "max_queued_jobs")
    use = await usage_of(state, key, count_queued=queued is not None)
    active = limit_of(state, key, "max_active_jobs")
    if active is not None and use["active_jobs"] + n_jobs > active:
        raise ApiError(429, "too_many_active_jobs", f"this key has {use['active_jobs']} jobs "
                       f"queued or running; at most {active} (max_active_jobs)", None,
                       {"Retry-After": "5"})
    if queued is not None and use["queued_jobs"] + n_jobs > queued:
        raise ApiError(429, "too_many_queued_jobs", f"this key has {use['queued_jobs']} jobs "
                       f"waiting to start; at most {queued} (max_queued_jobs)", None,
                       {"Retry-After": "5"})
    tokens = limit_of(state, key, "tokens_per_day")
    if tokens is not None and use["tokens_today"] >= tokens:
        wait = 86_400 - int(time.time() % 86_400)
        raise ApiError(429, "token_quota_exceeded", f"this key generated {use['tokens_today']} "
                       f"tokens today (UTC); at most {tokens} (tokens_per_day)", None,
                       {"Retry-After": str(wait)})


async def usage(request: Request) -> JSONResponse:
    """The caller's key: its limits and what it uses now."""
    key = key_of(request)
    if key is None:
        return JSONResponse({"key": None, "detail": "no API keys configured: no limits"})
    state = request.app.state
    limits = {name: limit_of(state, key, name) for name in LIMITS}
    return JSONResponse({"key": {"id": key.id, "name": key.name, "models": key.models,
                                 "expires_at": key.expires_at},
                         "limits": limits, "use": await usage_of(state, key)})


routes = [Route("/v1/usage", usage, methods=["GET"])]


def key_of(request: Request) -> ApiKey | None:
    return getattr(request.state, "api_key", None)


def owner_of(request: Request) -> dict[str, str]:
    """The record fields that tie a new job or batch to its key (none without keys): the
    owner, and where the job-ending scripts keep the key's jobs in flight and its tokens."""
    key = key_of(request)
    if key is None:
        return {}
    keys = request.app.state.keys
    hooks = {"key_hooks": json.dumps([{**hook, "secret_key": key.id} for hook in key.webhooks])
             } if key.webhooks else {}
    weight = {"owner_weight": repr(key.weight)} if key.weight != 1.0 else {}
    return {"owner": key.id, "owner_active": keys.key_active(key.id),
            "owner_tokens": keys.key_tokens(key.id, utc_day(time.time())), **weight, **hooks}


def may_see(request: Request, owner: str | None) -> bool:
    """A key sees only what it created, an admin key everything; without keys everything is
    visible."""
    key = key_of(request)
    return key is None or owner == key.id or key.allows("admin")


def sees_fleet(request: Request) -> bool:
    key = key_of(request)
    return key is None or key.allows("fleet:read")


def check_model(request: Request, model: str) -> None:
    key = key_of(request)
    if key is not None and key.models is not None and model not in key.models:
        raise ApiError(403, "model_not_allowed", f"this key may use {', '.join(key.models)}; "
                       f"not {model!r}", "model")
