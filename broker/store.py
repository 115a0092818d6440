"""The job store and event stream writer: Lua scripts that keep a job's record and events in step.

Each script runs atomically in Redis, so `seq` is assigned, the event appended to the job's
stream (entry id `<seq>-1`) and published on its channel in one step: no gaps, no repeats, and
exactly one final event per job, whoever (worker or API) writes it. The same scripts serve the
sync client of the workers (`JobStore`) and the asyncio client of the API (`AsyncJobStore`);
the helpers below build their arguments and read their replies once for both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.messages import Cancelled, ErrorEvent, ErrorInfo, Event, Queued
from broker.settings import Settings

_APPEND_FN = """
local FINAL = {succeeded=true, failed=true, cancelled=true}
local function append(job_key, stream_key, channel, body, maxlen)
  local seq = redis.call('HINCRBY', job_key, 'next_seq', 1) - 1
  local event = '{"seq":' .. seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, seq .. '-1', 'event', event)
  redis.call('PUBLISH', channel, event)
  return seq
end
local function seal(job_key, stream_key, ttl)
  redis.call('EXPIRE', job_key, ttl)
  redis.call('EXPIRE', stream_key, ttl)
end
"""

# KEYS: job, stream[, idempotency]  ARGV: channel, body, maxlen, live_ttl, idem_ttl, id, fields…
_CREATE = _APPEND_FN + """
if #KEYS == 3 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
seal(KEYS[1], KEYS[2], ARGV[4])
return {ARGV[6], 1}
"""

# KEYS: job  ARGV: worker, started_at.  Returns the attempt number, or -1 if the job must not run.
_START = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if (not st) or FINAL[st] then return -1 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
return attempt
"""

# KEYS: job, stream  ARGV: channel, body, maxlen.  Returns {seq, flag}: 1 cancel asked, 2 refused.
_APPEND = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if (not st) or FINAL[st] then return {-1, 2} end
local seq = append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {seq, 1} end
return {seq, 0}
"""

# KEYS: job, stream  ARGV: channel, body, maxlen, ttl, status, fields…  Returns seq or -1.
_FINISH = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if (not st) or FINAL[st] then return -1 end
local seq = append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[5], unpack(ARGV, 6))
seal(KEYS[1], KEYS[2], ARGV[4])
return seq
"""

# KEYS: job, stream  ARGV: channel, body, maxlen, ttl, finished_at.
_CANCEL = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if FINAL[st] then return 'ended:' .. st end
if st == 'queued' then
  append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5])
  seal(KEYS[1], KEYS[2], ARGV[4])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 'cancelling'
"""

_JSON_FIELDS = ("request", "result", "error", "usage", "timings")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class Appended:
    seq: int
    cancel_requested: bool
    refused: bool


def _pairs(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        if value is None:
            continue
        out += [name, value if isinstance(value, str) else json.dumps(value)]
    return out


def _body(event: Event) -> str:
    return event.model_dump_json(exclude_none=True)


def _read_record(raw: dict[Any, Any]) -> dict[str, Any] | None:
    """A job hash as the API shows it, or None if there is no such job."""
    if not raw:
        return None
    rec = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in raw.items()}
    out: dict[str, Any] = {name: rec.get(name) for name in ("id", "kind", "model", "status")}
    for name in _FLOAT_FIELDS:
        out[name] = float(rec[name]) if name in rec else None
    out["worker"] = rec.get("worker")
    out["attempts"] = int(rec.get("attempts", 0))
    for name in _JSON_FIELDS:
        out[name] = json.loads(rec[name]) if name in rec else None
    out["cancel_requested"] = rec.get("cancel") == "1"
    out["fingerprint"] = rec.get("fingerprint")
    return out


class _Args:
    """Keys and arguments of each script call, shared by the sync and the async store."""

    def __init__(self, settings: Settings, keys: Keys) -> None:
        self.keys = keys
        self.maxlen = settings.stream_maxlen
        self.ttl_s = settings.job_ttl_s
        self.live_ttl_s = settings.live_ttl_s
        self.idem_ttl_s = settings.idempotency_ttl_s

    def job_keys(self, job_id: str) -> list[str]:
        return [self.keys.job(job_id), self.keys.events(job_id)]

    def event(self, job_id: str, event: Event) -> list[Any]:
        return [self.keys.channel(job_id), _body(event), self.maxlen]

    def create(
        self, job_id: str, record: dict[str, Any], idem_key: str | None
    ) -> tuple[list[str], list[Any]]:
        keys = self.job_keys(job_id) + ([self.keys.idempotency(idem_key)] if idem_key else [])
        args = [*self.event(job_id, Queued(job=job_id)), self.live_ttl_s, self.idem_ttl_s, job_id]
        return keys, args + _pairs({"id": job_id, "status": "queued", **record})

    def finish(
        self, job_id: str, event: Event, status: str, fields: dict[str, Any]
    ) -> list[Any]:
        fields = {"finished_at": repr(time.time()), **fields}
        return [*self.event(job_id, event), self.ttl_s, status, *_pairs(fields)]

    def fail(self, job_id: str, error_type: str, message: str) -> tuple[list[str], list[Any]]:
        info = ErrorInfo(type=error_type, message=message)
        event = ErrorEvent(job=job_id, error=info)
        args = self.finish(job_id, event, "failed", {"error": info.model_dump()})
        return self.job_keys(job_id), args

    def cancel(self, job_id: str) -> list[Any]:
        return [*self.event(job_id, Cancelled(job=job_id)), self.ttl_s, repr(time.time())]


class JobStore:
    """Blocking store for worker processes."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.args = _Args(settings, Keys(settings.key_prefix))
        self._start = client.register_script(_START)
        self._append = client.register_script(_APPEND)
        self._finish = client.register_script(_FINISH)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return _read_record(self.redis.hgetall(self.args.keys.job(job_id)))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.args.keys.job(job_id), "cancel") == b"1"

    def start(self, job_id: str, worker: str) -> int:
        """Mark the job running; the attempt number, or -1 if it ended (e.g. cancelled) already."""
        args = [worker, repr(time.time())]
        return int(self._start(keys=[self.args.keys.job(job_id)], args=args))

    def append(self, job_id: str, event: Event) -> Appended:
        keys, args = self.args.job_keys(job_id), self.args.event(job_id, event)
        seq, flag = self._append(keys=keys, args=args)
        return Appended(seq=int(seq), cancel_requested=flag == 1, refused=flag == 2)

    def finish(self, job_id: str, event: Event, status: str, **fields: Any) -> int:
        args = self.args.finish(job_id, event, status, fields)
        return int(self._finish(keys=self.args.job_keys(job_id), args=args))

    def fail(self, job_id: str, error_type: str, message: str) -> int:
        keys, args = self.args.fail(job_id, error_type, message)
        return int(self._finish(keys=keys, args=args))


class AsyncJobStore:
    """The API's store on redis.asyncio."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self.args = _Args(settings, Keys(settings.key_prefix))
        self._create = client.register_script(_CREATE)
        self._cancel = client.register_script(_CANCEL)
        self._finish = client.register_script(_FINISH)

    async def create(
        self, job_id: str, record: dict[str, Any], idem_key: str | None = None
    ) -> tuple[str, bool]:
        """Write a queued job; with an idempotency key already used, the earlier job's id."""
        keys, args = self.args.create(job_id, record, idem_key)
        found, created = await self._create(keys=keys, args=args)
        return (found.decode() if isinstance(found, bytes) else found), bool(created)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return _read_record(await self.redis.hgetall(self.args.keys.job(job_id)))

    async def fail(self, job_id: str, error_type: str, message: str) -> int:
        keys, args = self.args.fail(job_id, error_type, message)
        return int(await self._finish(keys=keys, args=args))

    async def cancel(self, job_id: str) -> str:
        """`cancelled` (was queued), `cancelling` (running), `ended:<status>`, or `missing`."""
        reply = await self._cancel(keys=self.args.job_keys(job_id), args=self.args.cancel(job_id))
        return reply.decode() if isinstance(reply, bytes) else str(reply)
