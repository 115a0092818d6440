"""Following a job's event stream: replay after a seq, then live until the final event."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from broker.keys import Keys, stream_id
from broker.messages import FINAL_TYPES

# XREAD's reply: [(stream, [(entry id, {field: value})])]
XReadReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


@dataclass(frozen=True)
class StreamedEvent:
    seq: int
    type: str
    data: str  # the event JSON exactly as stored


TYPE_KEY = '"type":"'
RECONNECT_PAUSE_S = 0.25


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


async def follow(
    client: aioredis.Redis, keys: Keys, job_id: str, after_seq: int, block_s: float,
    reconnect_s: float = 30.0,
) -> AsyncIterator[StreamedEvent | None]:
    """Yield events with seq > after_seq, then live ones; None after each idle `block_s`.

    Ends after the final event (done, error or cancelled). If Redis goes away (a restart) it
    keeps trying from the last seq it yielded for `reconnect_s`, then raises.
    """
    stream = keys.events(job_id)
    last: str | bytes = stream_id(after_seq) if after_seq >= 0 else "0-0"
    down_since: float | None = None
    while True:
        try:
            reply = cast(XReadReply, await client.xread(
                {stream: last}, count=512, block=int(block_s * 1000)
            ))
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > reconnect_s:
                raise
            await asyncio.sleep(RECONNECT_PAUSE_S)
            continue
        down_since = None
        if not reply:
            yield None
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id
            event = parse_entry(entry_id, fields)
            yield event
            if event.type in FINAL_TYPES:
                return
