"""The Starlette app: `create_app(settings, redis_url)`; the lifespan owns the Redis client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from api import (
    auth,
    batch,
    batches,
    deadletters,
    files,
    jobs,
    metrics,
    openai_compat,
    openapi,
    ops,
    responses,
    webhooks,
    workers,
)
from api.accesslog import AccessLog
from api.admission import Vocabularies
from api.auth import KeyAuth
from api.errors import ApiError, api_error_handler, store_unavailable
from broker.batches import BatchStore
from broker.celery_app import make_celery
from broker.connection import API_SPARE_CONNECTIONS, api_redis, sync_redis
from broker.events import StreamHub
from broker.fair import AsyncDispatcher
from broker.keys import Keys
from broker.settings import Settings
from broker.store import AsyncJobStore
from broker.webhooks import Outbox

log = logging.getLogger("tokenpool.api")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, type_, str(exc.detail)).response()


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis error on %s: %s", request.url.path, exc)
    return store_unavailable().response()


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up mid-request: nothing was stored, and nobody reads an answer."""
    log.info("client went away during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ApiError(500, "internal_error", "unexpected error; see the API log").response()


WARM_TIMEOUT_S = 5.0
WARM_MAX = 32


def warm_burst(settings: Settings) -> int:
    """How many jobs' worth of connections `warm_up` opens: the biggest `max_batch`."""
    return min(WARM_MAX, max(spec.max_batch for spec in settings.models.values()))


async def warm_up(state: Any, n: int) -> None:
    """Open, right after start, what a burst of `n` jobs would otherwise open on its way:
    `n` Redis connections, Celery producer connections and the threads the sends run in.
    Measured (bench stack, 8 jobs of 64 tokens): the first burst after a start had its worst
    time to first token at 0.32-0.36 s, later bursts 0.10-0.15 s; warmed, the first was
    0.28 s, its API side (every job queued) down from 0.12 to 0.04 s. It runs beside the
    first requests, never before them; Redis being away only skips it."""
    producers = min(n, state.celery.conf.broker_pool_limit or n)  # more would wait for one
    barrier = threading.Barrier(producers, timeout=WARM_TIMEOUT_S)

    def producer() -> None:
        with state.celery.producer_or_acquire() as held:
            held.connection.ensure_connection(max_retries=1)
            barrier.wait()  # hold it until all are open, so each thread opens its own

    try:
        await asyncio.wait_for(asyncio.gather(*(state.redis.ping() for _ in range(n))),
                               WARM_TIMEOUT_S)
        await asyncio.gather(*(anyio.to_thread.run_sync(producer) for _ in range(producers)))
    except Exception as exc:  # a cold pool is slower, not wrong
        log.warning("warm-up skipped: %s", exc)


def create_app(settings: Settings, redis_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = api_redis(
            redis_url, settings.max_sse_followers + API_SPARE_CONNECTIONS
        )
        app.state.followers = 0
        app.state.settings = settings
        app.state.keys = Keys(settings.key_prefix)
        app.state.redis = client
        app.state.store = AsyncJobStore(client, settings)
        app.state.hub = StreamHub(client, app.state.keys)  # one XREAD for every follower
        app.state.celery = make_celery(settings, redis_url)
        app.state.dispatch = AsyncDispatcher(client, app.state.celery, app.state.keys,
                                             settings, anyio.to_thread.run_sync)
        # Batch creation, cancel and retry run in threads, a chunk at a time (broker.batches).
        sync_client = sync_redis(redis_url, client_name="tokenpool-api-batches",
                                 socket_connect_timeout=5)
        app.state.batches = BatchStore(sync_client, settings, app.state.celery)
        app.state.outbox = Outbox(sync_client, settings)
        app.state.vocab = Vocabularies(settings.cache_dir)
        warming = asyncio.create_task(warm_up(app.state, warm_burst(settings)))
        try:
            yield
        finally:
            warming.cancel()
            await app.state.hub.close()
            await client.aclose()
            sync_client.close()

    return Starlette(
        routes=[*ops.routes, *auth.routes, *batch.routes, *batches.routes, *jobs.routes,
                *deadletters.routes, *files.routes, *openai_compat.routes, *responses.routes,
                *webhooks.routes, *workers.routes, *metrics.routes,
                *openapi.routes],
        lifespan=lifespan,
        middleware=[Middleware(AccessLog), Middleware(KeyAuth)],
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error,
            aioredis.RedisError: redis_down,  # the sync client's errors are the same classes
            OperationalError: redis_down,  # kombu: a Celery send that found no Redis
            ClientDisconnect: client_gone,
            Exception: internal_error,
        },
    )
