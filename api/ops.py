"""Operations routes: health, readiness, models."""

from __future__ import annotations

import time
from typing import Any, cast

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.auth import sees_fleet
from api.errors import store_unavailable
from api.queueing import queue_wait
from broker.fleet import live_workers


async def fleet(state: Any, max_age_s: float = 0.0) -> dict[str, list[dict[str, Any]]]:
    """Live workers' heartbeats by model; with `max_age_s`, the last read if it is younger
    (a queued job's GET, polled by every waiting client, reads the fleet at most once a
    second this way rather than every heartbeat each time; heartbeats are seconds apart)."""
    cached = getattr(state, "fleet_read", None)
    if max_age_s > 0 and cached and time.monotonic() - cached[0] < max_age_s:
        return cast(dict[str, list[dict[str, Any]]], cached[1])
    by_model: dict[str, list[dict[str, Any]]] = {name: [] for name in state.settings.models}
    for beat in await live_workers(state.redis, state.keys, state.settings.heartbeat_ttl_s):
        by_model.setdefault(beat.get("model", "?"), []).append(beat)
    state.fleet_read = (time.monotonic(), by_model)
    return by_model


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        await state.redis.ping()
        by_model = await fleet(state)
    except (aioredis.RedisError, OSError) as exc:
        error = store_unavailable()
        body = {"ready": False, "redis": f"unreachable: {type(exc).__name__}",
                "error": {"type": error.type, "message": error.message, "field": None}}
        return JSONResponse(body, 503, error.headers)
    missing = [
        name for name in state.settings.models
        if not any(w.get("state") in ("loaded", "generating") for w in by_model.get(name, []))
    ]
    body = {"ready": not missing, "redis": "ok", "missing_workers": missing}
    return JSONResponse(body, 200 if not missing else 503)


async def queue_depths(state: Any) -> dict[str, int]:
    """Jobs queued for each model and not started: in its Celery queue, or still in a key's
    fair line (broker.fair); the model's waiting set holds both."""
    pipe = state.redis.pipeline(transaction=False)
    for name in state.settings.models:
        pipe.zcard(state.keys.waiting(name))
    return dict(zip(state.settings.models, map(int, await pipe.execute()), strict=True))


async def models(request: Request) -> JSONResponse:
    state = request.app.state
    by_model = await fleet(state)
    waits = {name: await queue_wait(state, name, by_model.get(name, []))
             for name in state.settings.models}
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "tokenpool",
         "kind": spec.kind, "n_ctx": spec.n_ctx,
         "max_tokens": spec.max_tokens, "chat_format": spec.chat_format,
         "max_batch": spec.max_batch, "queue_depth": waits[name]["waiting"],  # one waiting set
         **waits[name],
         "running": sum(len(w.get("jobs", [])) for w in by_model.get(name, [])),
         "workers": [{k: w.get(k) for k in ("name", "host", "gpu", "state", "jobs", "batches")}
                     for w in by_model.get(name, [])]}
        for name, spec in state.settings.models.items()
    ]
    if not sees_fleet(request):  # a jobs-only key: the models, not the fleet's live state
        data = [{k: v for k, v in model.items() if k not in ("workers", "running")}
                for model in data]
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
]
