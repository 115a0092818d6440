"""Following a job's event stream: replay after a seq, then live until the final event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from broker.keys import Keys, stream_id
from broker.messages import FINAL_TYPES


@dataclass(frozen=True)
class StreamedEvent:
    seq: int
    type: str
    data: str  # the event JSON exactly as stored


def parse_entry(fields: dict[bytes, bytes]) -> StreamedEvent:
    data = fields[b"event"].decode()
    event = json.loads(data)
    return StreamedEvent(seq=int(event["seq"]), type=str(event["type"]), data=data)


async def follow(
    client: aioredis.Redis, keys: Keys, job_id: str, after_seq: int, block_s: float
) -> AsyncIterator[StreamedEvent | None]:
    """Yield events with seq > after_seq, then live ones; None after each idle `block_s`.

    Ends after the final event (done, error or cancelled).
    """
    stream = keys.events(job_id)
    last = stream_id(after_seq) if after_seq >= 0 else "0-0"
    while True:
        reply = await client.xread({stream: last}, count=512, block=int(block_s * 1000))
        if not reply:
            yield None
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id
            event = parse_entry(fields)
            yield event
            if event.type in FINAL_TYPES:
                return
