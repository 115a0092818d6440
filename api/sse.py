"""Server-sent events of one job: replay, then live, keepalive comments while idle, then close."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from broker.events import follow

log = logging.getLogger("tokenpool.api")


def sse_message(seq: int, type_: str, data: str) -> bytes:
    return f"id: {seq}\nevent: {type_}\ndata: {data}\n\n".encode()


async def event_stream(state: Any, job_id: str, after: int) -> AsyncIterator[bytes]:
    """The SSE body. If Redis stays away too long the stream just ends: the client reconnects
    (after `retry` ms) with Last-Event-ID and gets exactly the rest."""
    yield b"retry: 1000\n\n"
    keepalive_s = state.settings.sse_keepalive_s
    state.followers += 1
    try:
        async for event in follow(state.redis, state.keys, job_id, after, keepalive_s):
            if event is not None:
                yield sse_message(event.seq, event.type, event.data)
                continue
            if not await state.redis.exists(state.keys.job(job_id)):
                return  # expired while we waited: nothing more will come
            yield b": keepalive\n\n"
    except RedisError as exc:
        log.warning("job %s: event stream ended, Redis unreachable: %s", job_id, exc)
    finally:
        state.followers -= 1
