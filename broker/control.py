"""Control commands for one worker, over Redis: the API pushes, the worker answers at once.

A command is JSON on the worker's command list; the worker BLPOPs it, answers on the
command's reply list (accepted, or an error naming why), and carries on with the slow part
(draining, loading) in the background, which its heartbeat shows.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from broker.keys import Keys

COMMAND_TTL_S = 60  # a command nobody took in this long is dropped with its list
REPLY_TTL_S = 60


def command(action: str, **args: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "action": action, "ts": time.time(), **args}


async def send(client: aioredis.Redis, keys: Keys, worker: str, cmd: dict[str, Any],
               wait_s: float) -> dict[str, Any] | None:
    """Push `cmd` to `worker` and wait up to `wait_s` for its answer (None: no answer)."""
    queue = keys.worker_commands(worker)
    pipe = client.pipeline(transaction=True)
    pipe.rpush(queue, json.dumps(cmd))
    pipe.expire(queue, COMMAND_TTL_S)
    await pipe.execute()
    reply = await client.blpop([keys.command_reply(cmd["id"])], timeout=wait_s)
    if reply is None:
        return None
    return cast(dict[str, Any], json.loads(reply[1]))


def receive(client: redis.Redis, keys: Keys, worker: str, block_s: float,
            ) -> dict[str, Any] | None:
    """The worker's next command, or None after `block_s`; stale ones are dropped."""
    reply = client.blpop([keys.worker_commands(worker)], timeout=block_s)
    if reply is None:
        return None
    cmd = cast(dict[str, Any], json.loads(reply[1]))
    return cmd if time.time() - float(cmd.get("ts", 0)) < COMMAND_TTL_S else None


def answer(client: redis.Redis, keys: Keys, cmd: dict[str, Any], reply: dict[str, Any]) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.rpush(keys.command_reply(cmd["id"]), json.dumps(reply))
    pipe.expire(keys.command_reply(cmd["id"]), REPLY_TTL_S)
    pipe.execute()
