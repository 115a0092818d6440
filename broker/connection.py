"""Redis clients that ride out a Redis restart: reconnect and retry with capped backoff.

Every script a worker calls is idempotent (see broker.store), so a command retried after its
reply was lost writes nothing twice. Workers retry for long (a token waits rather than a job
failing); the API retries briefly and then answers 503, so a client is never left hanging.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

BACKOFF_CAP_S = 1.0
API_RETRIES = 3
API_SPARE_CONNECTIONS = 64  # beside the followers' catch-up reads, for every other request
# A worker's threads each take a connection per command: Celery's `max_batch` task threads,
# and for a bulk message (one per `max_batch` embedding jobs) up to `max_batch` more each.
# redis-py 8 caps a pool at 100 and raises "Too many connections" past it, which the retry
# took for Redis being away (an embed worker on a 10,000-item batch left jobs to the reaper).
# Redis itself allows 10,000 clients.
WORKER_MAX_CONNECTIONS = 4096


def retries_for(retry_s: float) -> int:
    """Attempts that, with backoff capped at one second, span about `retry_s` seconds."""
    return max(1, int(retry_s / BACKOFF_CAP_S) + 4)


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=BACKOFF_CAP_S)


def worker_redis(url: str, retry_s: float, name: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, retry=Retry(_backoff(), retries_for(retry_s)), health_check_interval=30,
        client_name=name, socket_connect_timeout=5, socket_keepalive=True,
        max_connections=WORKER_MAX_CONNECTIONS,
    )


def api_redis(url: str, max_connections: int, name: str = "tokenpool-api") -> aioredis.Redis:
    """Followers wait on one shared blocking XREAD (broker.events.StreamHub), but each one
    catches up on its own when it joins, all at once in a burst: the pool allows a connection
    per follower allowed plus spare ones (redis-py's default is 100)."""
    return aioredis.Redis.from_url(
        url, retry=AsyncRetry(_backoff(), API_RETRIES), health_check_interval=30,
        client_name=name, socket_connect_timeout=5, socket_keepalive=True,
        max_connections=max_connections,
    )
