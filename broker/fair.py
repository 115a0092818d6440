"""Fair share between API keys: each model's queued jobs wait in per-key lists in Redis, and
Lua scripts move the next fair one into the model's Celery queue whenever a slot frees.

Why: Celery's priority lists are first come, first served inside a priority, so one key's
20,000-item batch would hold every slot of a model for hours. Here Celery stays the engine
(workers consume the model's queue exactly as before, one message a job or a bulk group), but
a job's message reaches that queue only when the model's live workers have a slot for it.

The rule (start-time fair queuing, per model and per priority): every key ("tenant"; jobs
without a key share the tenant "") waiting at a priority has a start tag; the next slot goes
to the highest priority that has jobs waiting and, inside it, to the tenant with the lowest
tag (ties by name), whose tag then grows by jobs/weight. A tenant that starts waiting gets
the priority's virtual time (the tag last served), so waiting earlier or idling earns no
credit. With weights w_k the slots of a window go in proportion to the weights; a tenant alone
gets every slot. Bound: a tenant's n-th job at a priority, once it waits, is sent after at
most n * W / w_k other sends of that priority (W: the weights of the tenants waiting there),
plus one per other tenant for ties.

Crash safety: the message is built by Celery at submit time (broker.celery_app) and stored with
the job in its list, and the same Lua script that takes it from the list pushes it onto
Celery's list, so no process can die between the choice and the send. Slots are counted from
the live workers' heartbeats (broker.fleet writes each worker's `max_batch` with an expiry); a
job counts against them from its send until its end (the job-ending scripts take it out and
send the next one in the same step). Every worker's heartbeat also runs the pump: it sends
work when a worker joins and heals a count left behind by a job whose record expired.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu.utils.json import dumps

from broker.celery_app import bulk_groups, celery_priority, send_group, task_of
from broker.keys import Keys
from broker.messages import JobRequest
from broker.settings import Settings

SHARED_TENANT = ""  # jobs without an API key

# Lua, included in the job store's scripts: `fair_pump(base)` sends queued jobs of one model
# while its live slots allow. Keys under base (broker.keys.fair):
#   :slots     zset "<worker>|<slots>" by expiry (heartbeats)
#   :out       set of job keys sent to Celery and not ended
#   :t:<p>     zset tenant -> start tag of its next job at priority p
#   :q:<p>:<t> list of entries {"ids", "keys", "w", "list", "msg"} of tenant t at priority p
#   :l:<p>:<t> zset: the queued jobs of that list, in order (left by cancelled ones at once,
#              where the list drops their entry only when it comes up; api.queueing counts it)
#   :tag       hash: v:<p> virtual time; f:<p>:<t> tenant's finish tag; w:<p>:<t> its weight;
#              n:<p>:<t> jobs it queued so far
FAIR_FN = """
local function fair_slots(base, now)
  local key = base .. ':slots'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local cap = 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    cap = cap + tonumber(string.match(member, '|(%d+)$'))
  end
  return cap
end
local function fair_next(base)
  for p = 9, 0, -1 do
    local top = redis.call('ZRANGE', base .. ':t:' .. p, 0, 0, 'WITHSCORES')
    if top[1] then return p, top[1], tonumber(top[2]) end
  end
end
local function fair_take(base, p, tenant, tag)
  local tk, qk = base .. ':t:' .. p, base .. ':q:' .. p .. ':' .. tenant
  local raw = redis.call('LPOP', qk)
  if not raw then redis.call('ZREM', tk, tenant); return 0 end
  local entry = cjson.decode(raw)
  redis.call('ZREM', base .. ':l:' .. p .. ':' .. tenant, unpack(entry.ids))
  local live = {}
  for i, key in ipairs(entry.keys) do
    if redis.call('HGET', key, 'status') == 'queued' then live[#live + 1] = key end
  end
  local finish = tag
  if #live > 0 then
    finish = tag + #live / tonumber(entry.w)
    redis.call('HSET', base .. ':tag', 'v:' .. p, tag, 'f:' .. p .. ':' .. tenant, finish)
    redis.call('SADD', base .. ':out', unpack(live))
    redis.call('LPUSH', entry.list, entry.msg)
  end
  if redis.call('LLEN', qk) == 0 then redis.call('ZREM', tk, tenant)
  else redis.call('ZADD', tk, finish, tenant) end
  return #live
end
local function fair_pump(base)
  local t = redis.call('TIME')
  local cap = fair_slots(base, tonumber(t[1]) + tonumber(t[2]) / 1e6)
  local sent, taken = 0, 0
  while taken < 1000 and redis.call('SCARD', base .. ':out') < cap do
    local p, tenant, tag = fair_next(base)
    if not p then break end
    sent = sent + fair_take(base, p, tenant, tag)
    taken = taken + 1
  end
  return sent
end
-- A job that ended leaves its line, or frees its slot for the next fair job.
local function fair_done(job_key)
  local base, line, id = unpack(redis.call('HMGET', job_key, 'fair_key', 'fair_line', 'id'))
  if line then redis.call('ZREM', line, id) end
  if base and redis.call('SREM', base .. ':out', job_key) == 1 then fair_pump(base) end
end
"""

# ARGV: base, then (tenant, priority, entry) triples.  Queue each entry at the back of its
# tenant's line (a tenant that starts waiting gets the priority's virtual time), then pump.
ENQUEUE = FAIR_FN + """
local base = ARGV[1]
for i = 2, #ARGV, 3 do
  local tenant, p, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local tk, line = base .. ':t:' .. p, base .. ':l:' .. p .. ':' .. tenant
  local e = cjson.decode(entry)
  redis.call('RPUSH', base .. ':q:' .. p .. ':' .. tenant, entry)
  local n = redis.call('HINCRBY', base .. ':tag', 'n:' .. p .. ':' .. tenant, #e.ids)
  redis.call('HSET', base .. ':tag', 'w:' .. p .. ':' .. tenant, e.w)
  for j, id in ipairs(e.ids) do
    redis.call('ZADD', line, n - #e.ids + j, id)
    redis.call('HSET', e.keys[j], 'fair_line', line)
  end
  if not redis.call('ZSCORE', tk, tenant) then
    local v, f = unpack(redis.call('HMGET', base .. ':tag', 'v:' .. p, 'f:' .. p .. ':' .. tenant))
    redis.call('ZADD', tk, math.max(tonumber(v or 0), tonumber(f or 0)), tenant)
  end
end
return fair_pump(base)
"""

# ARGV: base.  Forget sent jobs whose record ended or expired without the ending scripts
# (a lost key), then send what the slots allow: every heartbeat runs this.
PUMP = FAIR_FN + """
local base = ARGV[1]
for _, key in ipairs(redis.call('SMEMBERS', base .. ':out')) do
  local st = redis.call('HGET', key, 'status')
  if st ~= 'queued' and st ~= 'running' then redis.call('SREM', base .. ':out', key) end
end
return fair_pump(base)
"""


@dataclass(frozen=True)
class Tenant:
    """Whose line a job waits in, and how many slots it gets against the others."""

    name: str = SHARED_TENANT
    weight: float = 1.0

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Tenant:
        """From a job's owner fields (api.auth.owner_of): its key id and weight."""
        return cls(str(fields.get("owner") or SHARED_TENANT),
                   float(fields.get("owner_weight") or 1.0))


class MessageBuilder:
    """Celery's own message for a job, built without sending it: Celery's send_task runs as
    usual (headers, protocol, priority), with the channel's publish step captured. The result
    is the list kombu's Redis transport would LPUSH onto and the exact bytes it would push
    (tests/integration/test_fair.py compares them with a real send)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._producer: Any = None
        self._captured: tuple[str, str] | None = None

    def _capture(self, message: dict[str, Any], exchange: str, routing_key: str,
                 **_: Any) -> None:
        channel = self._producer.channel
        channel._inplace_augment_message(message, exchange, routing_key)
        priority = channel._get_message_priority(message, reverse=False)
        self._captured = (channel._q_for_pri(routing_key, priority), dumps(message))

    def _ready(self) -> Any:
        if self._producer is None:
            connection = self.app.connection_for_write()
            channel = connection.default_channel
            channel.basic_publish = self._capture
            self._producer = self.app.amqp.Producer(channel, auto_declare=False)
        return self._producer

    def build(self, task: tuple[str, list[Any], str, str], queue: str, priority: int,
              ) -> tuple[str, str]:
        name, args, task_id, argsrepr = task
        with self._lock:
            self.app.send_task(name, args=args, task_id=task_id, queue=queue,
                               priority=celery_priority(priority), argsrepr=argsrepr,
                               kwargsrepr="", producer=self._ready())
            assert self._captured is not None
            captured, self._captured = self._captured, None
            return captured


class Fair:
    """Queues jobs on the fair path: builds each group's message, then one script call puts
    them in their tenant's line and sends what the slots allow."""

    def __init__(self, app: Celery, keys: Keys, settings: Settings) -> None:
        self.keys, self.settings = keys, settings
        self.messages = MessageBuilder(app)

    def entry(self, group: list[tuple[str, JobRequest]], tenant: Tenant) -> str:
        ids, first = [job_id for job_id, _ in group], group[0][1]
        target, message = self.messages.build(task_of(ids, first.kind, first.model),
                                              self.keys.queue(first.model), first.priority)
        return json.dumps({"ids": ids, "keys": [self.keys.job(i) for i in ids],
                           "w": tenant.weight, "list": target, "msg": message})

    def calls(self, ids: list[str], jobs: list[JobRequest], tenant: Tenant,
              ) -> list[tuple[list[str], int]]:
        """The ENQUEUE script's ARGV per model, each with its count of jobs (CPU only:
        messages are built here)."""
        by_model: dict[str, tuple[list[str], list[int]]] = {}
        for group in bulk_groups(ids, jobs, self.settings):
            first = group[0][1]
            args, count = by_model.setdefault(first.model, ([self.keys.fair(first.model)], [0]))
            args += [tenant.name, str(first.priority), self.entry(group, tenant)]
            count[0] += len(group)
        return [(args, count[0]) for args, count in by_model.values()]


class PartlySent(Exception):
    """Queueing a submission's jobs stopped after `sent` of them (the cause is chained)."""

    def __init__(self, sent: int, total: int) -> None:
        super().__init__(f"queued {sent} of {total} jobs")
        self.sent, self.total = sent, total


class _Dispatch:
    """What both dispatchers share: the fair path's messages, and the direct path."""

    def __init__(self, app: Celery, keys: Keys, settings: Settings) -> None:
        self.app, self.keys, self.settings = app, keys, settings
        self.fair = Fair(app, keys, settings) if settings.fair_share else None

    def direct(self, ids: list[str], jobs: list[JobRequest]) -> None:
        """fair_share off: each group's message straight onto Celery's list."""
        sent = 0
        try:
            for group in bulk_groups(ids, jobs, self.settings):
                send_group(self.app, self.keys, group)
                sent += len(group)
        except Exception as exc:
            raise PartlySent(sent, len(ids)) from exc


class Dispatcher(_Dispatch):
    """A submission's first deliveries, blocking (batches, schedules): through each job's
    key's fair line (one script call a model: all of that model's jobs or none), or, with
    fair_share off, straight onto Celery's queue (a message a group). Raises PartlySent."""

    def __init__(self, client: redis.Redis, app: Celery, keys: Keys, settings: Settings
                 ) -> None:
        super().__init__(app, keys, settings)
        self._enqueue = client.register_script(ENQUEUE)

    def send(self, ids: list[str], jobs: list[JobRequest], tenant: Tenant) -> None:
        if self.fair is None:
            self.direct(ids, jobs)
            return
        sent = 0
        try:
            for args, count in self.fair.calls(ids, jobs, tenant):
                self._enqueue(args=args)
                sent += count
        except Exception as exc:
            raise PartlySent(sent, len(ids)) from exc


class AsyncDispatcher(_Dispatch):
    """The API's: the fair scripts on its asyncio client; what blocks (building messages,
    Celery's own sends) runs in `run_sync` (anyio's to_thread.run_sync), off the loop."""

    def __init__(self, client: aioredis.Redis, app: Celery, keys: Keys, settings: Settings,
                 run_sync: Any) -> None:
        super().__init__(app, keys, settings)
        self.run_sync = run_sync
        self._enqueue = client.register_script(ENQUEUE)

    async def send(self, ids: list[str], jobs: list[JobRequest], tenant: Tenant) -> None:
        if self.fair is None:
            await self.run_sync(self.direct, ids, jobs)
            return
        sent = 0
        try:
            for args, count in await self.run_sync(self.fair.calls, ids, jobs, tenant):
                await self._enqueue(args=args)
                sent += count
        except Exception as exc:
            raise PartlySent(sent, len(ids)) from exc
