"""Server-sent events of one job: replay, then live, keepalive comments while idle, then close."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

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
        async for event in state.hub.follow(job_id, after, keepalive_s):
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


class CancelOnDisconnect(StreamingResponse):
    """A stream that calls `on_disconnect` if the client leaves before the stream ends.

    Starlette only watches for a disconnect on ASGI servers older than spec 2.4, and there it
    just stops the body; this watches always, so a job nobody reads any more is cancelled at
    once instead of at the next write that fails.
    """

    def __init__(self, content: AsyncIterator[bytes], on_disconnect: Callable[[], Awaitable[Any]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False

        async def body(cancel: anyio.CancelScope) -> None:
            nonlocal gone
            try:
                await self.stream_response(send)
            except OSError:
                gone = True
            cancel.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(body, group.cancel_scope)
            await self.listen_for_disconnect(receive)
            gone = True
            group.cancel_scope.cancel()
        if gone:
            with anyio.CancelScope(shield=True):
                await self.on_disconnect()
