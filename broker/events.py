"""Following a job's event stream: replay after a seq, then live until the final event.

Every follower of one API process waits on one shared reader (`StreamHub`): one blocking
XREAD names every stream being waited on, and each entry goes to that stream's followers.
One XREAD per follower per token cost the API about 150 µs of CPU each on the 2-core box
(redis-py's asyncio client), against about 25 µs a stream when eight are read in one call,
and a CPU host's model threads are what that CPU is taken from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from broker.keys import Keys, stream_id
from broker.messages import FINAL_TYPES

log = logging.getLogger("tokenpool.api")

# XREAD's reply: [(stream, [(entry id, {field: value})])]
XReadReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


@dataclass(frozen=True)
class StreamedEvent:
    seq: int
    type: str
    data: str  # the event JSON exactly as stored


TYPE_KEY = '"type":"'
RECONNECT_PAUSE_S = 0.25
READ_COUNT = 512
READER_BLOCK_MS = 5000  # the shared read's wait; a joining follower wakes it at once
WAKE_TTL_S = 3600


def event_type(data: str) -> str:
    """The event's type without parsing it all: a follower wakes for every token.

    Events are compact JSON with `job` and `ts` before `type` and any user text after it, so
    the first `"type":"` is the key itself (quotes inside text are escaped).
    """
    start = data.find(TYPE_KEY)
    if start < 0:
        return str(json.loads(data)["type"])
    start += len(TYPE_KEY)
    return data[start : data.index('"', start)]


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamedEvent:
    """An entry `<seq>-1` of a job's stream."""
    data = fields[b"event"].decode()
    return StreamedEvent(seq=int(entry_id.split(b"-", 1)[0]), type=event_type(data), data=data)


Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(eq=False)
class _Watched:
    last: bytes | str  # the shared reader's position in this stream
    queues: set[asyncio.Queue[Entries]] = field(default_factory=set)


class StreamHub:
    """One blocking XREAD for every stream this process's followers are waiting on.

    A follower catches up on its own (non-blocking XREADs), then joins: from then on the
    shared reader hands it every entry past the reader's position, and one more catch-up read
    covers what the reader had passed before it joined. Followers drop entries by seq, so an
    entry seen both ways is yielded once. A joining stream wakes the reader with an entry on
    this process's wake stream. The reader rides out Redis restarts from its positions.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, reconnect_s: float = 30.0) -> None:
        self.client, self.keys, self.reconnect_s = client, keys, reconnect_s
        self.wake_key = keys.reader_wake(uuid.uuid4().hex[:12])
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self.reads = 0  # shared XREADs so far
        self.handed = 0  # entries handed to followers by them (each read serves many)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow(self, job_id: str, after_seq: int,
                     block_s: float) -> AsyncIterator[StreamedEvent | None]:
        """Yield events with seq > after_seq, then live ones; None after each idle `block_s`.

        Ends after the final event (done, error or cancelled). If Redis stays away longer
        than `reconnect_s`, raises ConnectionError.
        """
        stream = self.keys.events(job_id)
        cursor = _Cursor(stream_id(after_seq) if after_seq >= 0 else "0-0", after_seq)
        async for event in self._catch_up(stream, cursor):
            yield event
        if cursor.ended:
            return
        queue: asyncio.Queue[Entries] = asyncio.Queue()
        await self._join(stream, cursor.last, queue)
        try:
            async for event in self._catch_up(stream, cursor):
                yield event
            while not cursor.ended:  # the cursor drops whatever follows the final event
                try:
                    entries = await asyncio.wait_for(queue.get(), block_s)
                except TimeoutError:
                    self._check_up()
                    yield None
                    continue
                for event in cursor.take(entries):
                    yield event
        finally:
            self._leave(stream, queue)

    async def _catch_up(self, stream: str, cursor: _Cursor) -> AsyncIterator[StreamedEvent]:
        """What the stream holds past the cursor, read until a short reply."""
        down_since: float | None = None
        while not cursor.ended:
            try:
                reply = cast(XReadReply, await self.client.xread(
                    {stream: cursor.last}, count=READ_COUNT))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.reconnect_s:
                    raise
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            down_since = None
            entries = reply[0][1] if reply else []
            for event in cursor.take(entries):
                yield event
            if len(entries) < READ_COUNT:
                return

    async def _join(self, stream: str, last: bytes | str, queue: asyncio.Queue[Entries]) -> None:
        watched = self._watched.get(stream)
        if watched is None:
            watched = self._watched[stream] = _Watched(last)
            await self._wake()
        watched.queues.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._read_loop())

    def _leave(self, stream: str, queue: asyncio.Queue[Entries]) -> None:
        watched = self._watched.get(stream)
        if watched is not None:
            watched.queues.discard(queue)
            if not watched.queues:
                del self._watched[stream]

    async def _wake(self) -> None:
        # Without Redis the wake is lost; the reader names the new stream within 5 s anyway.
        with contextlib.suppress(redis_errors.RedisError):
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=8, approximate=False)
            pipe.expire(self.wake_key, WAKE_TTL_S)
            await pipe.execute()

    def _check_up(self) -> None:
        if self._down_since is not None and \
                time.monotonic() - self._down_since > self.reconnect_s:
            raise redis_errors.ConnectionError(
                f"Redis unreachable for over {self.reconnect_s:g}s")

    async def _read_loop(self) -> None:
        wake_last: bytes | str = "0-0"  # ids only grow: no wake is missed, old ones cost a loop
        while True:
            streams: dict[Any, Any] = {k: w.last for k, w in self._watched.items()}
            streams[self.wake_key] = wake_last
            try:
                reply = cast(XReadReply, await self.client.xread(
                    streams, count=READ_COUNT, block=READER_BLOCK_MS))
            except Exception as exc:  # never leave followers without a reader
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py can answer a cancel in the middle of a read with its own
                    # TimeoutError: the reader must stop all the same (else `close` waits)
                    raise asyncio.CancelledError from exc
                if isinstance(exc, redis_errors.RedisError):
                    self._down_since = self._down_since or time.monotonic()
                    log.debug("shared event reader: %s", exc)
                else:
                    log.exception("shared event reader failed; reading again")
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            self._down_since = None
            self.reads += 1
            for key, entries in reply or []:
                name = key.decode()
                if name == self.wake_key:
                    wake_last = entries[-1][0]
                    continue
                watched = self._watched.get(name)
                if watched is not None:
                    watched.last = entries[-1][0]
                    for queue in watched.queues:
                        queue.put_nowait(entries)
                        self.handed += len(entries)


@dataclass
class _Cursor:
    """A follower's place: the last entry id and seq it yielded, and whether it ended."""

    last: bytes | str
    seq: int
    ended: bool = False

    def take(self, entries: Entries) -> list[StreamedEvent]:
        out = []
        for entry_id, fields in entries:
            event = parse_entry(entry_id, fields)
            if event.seq <= self.seq or self.ended:
                continue
            self.last, self.seq = entry_id, event.seq
            self.ended = event.type in FINAL_TYPES
            out.append(event)
        return out
