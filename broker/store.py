"""The job store and event stream writer: Lua scripts that keep a job's record and events in step.

Each script runs atomically in Redis, so `seq` is assigned, the event appended to the job's
stream (entry id `<seq>-1`) and published on its channel in one step: no gaps, no repeats, and
exactly one final event per job, whoever (worker or API) writes it. The same scripts serve the
sync client of the workers (`JobStore`) and the asyncio client of the API (`AsyncJobStore`);
the helpers below build their arguments and read their replies once for both.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from broker.fair import FAIR_FN, PUMP
from broker.groupcommit import GroupCommit, PendingCall
from broker.keys import Keys
from broker.messages import (
    Cancelled,
    ErrorEvent,
    ErrorInfo,
    Event,
    JobRequest,
    Queued,
    Requeued,
)
from broker.messages import Started as StartedEvent
from broker.settings import Settings
from broker.webhooks import JOB_EVENTS, RESPONSE_EVENTS, record_fields

# Histogram buckets of finished jobs' timings (seconds; tokens/s), as Prometheus `le` labels.
BUCKETS = {
    "queued_s": ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
                 "10", "30", "60", "120", "300"),
    "ttft_s": ("0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30"),
    "total_s": ("0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "300",
                "600"),
    "tokens_per_s": ("1", "2", "5", "10", "20", "50", "100", "200", "500", "1000", "2000"),
}
_BUCKETS_LUA = "local BUCKETS = {" + ", ".join(
    f"{metric} = {{{', '.join(repr(le) for le in bounds)}}}" for metric, bounds in BUCKETS.items()
) + "}"

_APPEND_FN = _BUCKETS_LUA + FAIR_FN + """
local FINAL = {succeeded=true, failed=true, cancelled=true}
local function append(job_key, stream_key, channel, body, maxlen)
  local seq = redis.call('HINCRBY', job_key, 'next_seq', 1) - 1
  local event = '{"seq":' .. seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, seq .. '-1', 'event', event)
  redis.call('PUBLISH', channel, event)
  return seq
end
-- A queued job's place in its model's queue (broker.keys.waiting), kept by the scripts that
-- create, start, requeue and end jobs.
local function wait_in_line(job_key, id)
  local wait_key, score = unpack(redis.call('HMGET', job_key, 'wait_key', 'wait_score'))
  if wait_key then redis.call('ZADD', wait_key, score, id) end
end
local function leave_line(job_key, id)
  local wait_key = redis.call('HGET', job_key, 'wait_key')
  if wait_key then redis.call('ZREM', wait_key, id) end
end
-- Due now: deliveries `<prefix><i>` of a job's or batch's webhooks (broker.webhooks).
local function hooks_due_now(record_key, prefix)
  local hooks, hooks_due = unpack(redis.call('HMGET', record_key, 'hooks', 'hooks_due'))
  if not hooks then return end
  local t = redis.call('TIME')
  for i = 0, tonumber(hooks) - 1 do
    redis.call('ZADD', hooks_due, tonumber(t[1]) + tonumber(t[2]) / 1e6, prefix .. i)
  end
end
-- A batch whose every item has ended (and that is done being created) tells its webhooks;
-- each time it gets there (a retry can end it again) under a new delivery id.
local function batch_maybe_done(bk)
  local st, total, s, f, c, id = unpack(redis.call('HMGET', bk, 'status', 'total',
                                                   'succeeded', 'failed', 'cancelled', 'id'))
  if st == 'creating' or redis.call('HEXISTS', bk, 'hooks') == 0 then return end
  if tonumber(s or 0) + tonumber(f or 0) + tonumber(c or 0) < tonumber(total or 0) then
    return
  end
  local n = redis.call('HINCRBY', bk, 'completions', 1)
  local t = redis.call('TIME')
  redis.call('HSET', bk, 'completed_at', tostring(tonumber(t[1]) + tonumber(t[2]) / 1e6))
  hooks_due_now(bk, 'batch:' .. id .. ':' .. n .. '|')
end
local function count_final(metrics_key, hist_key, job_key, status, body)
  local kind, model, bk, item, index, started, id = unpack(redis.call('HMGET', job_key, 'kind',
    'model', 'batch_key', 'item', 'item_index', 'started_at', 'id'))
  local owner_active, owner_tokens = unpack(redis.call('HMGET', job_key, 'owner_active',
                                                       'owner_tokens'))
  if owner_active then redis.call('SREM', owner_active, id) end
  leave_line(job_key, id)
  fair_done(job_key)  -- its slot goes to the next fair job, in the same step
  hooks_due_now(job_key, id .. '|')  -- in the same step as its end
  kind, model = kind or '?', model or '?'
  redis.call('HINCRBY', metrics_key, kind .. '|' .. model .. '|' .. status, 1)
  if bk then
    redis.call('HINCRBY', bk, status, 1)
    if started then redis.call('HINCRBY', bk, 'ended_started', 1) end
    redis.call('XADD', bk .. ':done', '*', 'index', index, 'item', item, 'job', id,
               'status', status)
    batch_maybe_done(bk)
  end
  if status ~= 'succeeded' then return end
  local ok, event = pcall(cjson.decode, body)
  if not ok then return end
  if bk and type(event.valid) == 'boolean' then
    redis.call('HINCRBY', bk, event.valid and 'valid' or 'invalid', 1)
  end
  if type(event.usage) == 'table' and tonumber(event.usage.completion_tokens) then
    local tokens = tonumber(event.usage.completion_tokens)
    redis.call('HINCRBY', metrics_key, 'tokens|' .. model, tokens)
    if bk then redis.call('HINCRBY', bk, 'tokens', tokens) end
    if owner_tokens then
      redis.call('INCRBY', owner_tokens, tokens)
      redis.call('EXPIRE', owner_tokens, 172800)
    end
  end
  if type(event.timings) ~= 'table' then return end
  for metric, bounds in pairs(BUCKETS) do
    local value = tonumber(event.timings[metric])
    if value then
      local field = metric .. '|' .. model .. '|'
      for _, le in ipairs(bounds) do
        if value <= tonumber(le) then redis.call('HINCRBY', hist_key, field .. le, 1) end
      end
      redis.call('HINCRBY', hist_key, field .. '+Inf', 1)
      redis.call('HINCRBYFLOAT', hist_key, field .. 'sum', value)
    end
  end
end
local function seal(job_key, stream_key, ttl)
  redis.call('EXPIRE', job_key, ttl)
  redis.call('EXPIRE', stream_key, ttl)
end
-- An ended job keeps the life its record asks for (a stored response's), else job_ttl_s.
local function seal_final(job_key, stream_key, ttl)
  seal(job_key, stream_key, redis.call('HGET', job_key, 'keep_s') or ttl)
end
"""

# KEYS: batch.  A created batch starts running; if its items all ended meanwhile, it is done.
BATCH_RUNNING = _APPEND_FN + """
redis.call('HSET', KEYS[1], 'status', 'running')
batch_maybe_done(KEYS[1])
return 1
"""

# KEYS: job, stream[, idempotency]  ARGV: channel, body, maxlen, live_ttl, idem_ttl, id, fields…
_CREATE = _APPEND_FN + """
if #KEYS == 3 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
local owner_active = redis.call('HGET', KEYS[1], 'owner_active')
if owner_active then redis.call('SADD', owner_active, ARGV[6]) end
wait_in_line(KEYS[1], ARGV[6])
append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
seal(KEYS[1], KEYS[2], ARGV[4])
return {ARGV[6], 1}
"""

# KEYS: job, stream, running  ARGV: channel, started body (no attempt), maxlen, worker, now,
# dispatch, start token.  Only the current dispatch of a queued job starts; a retried call with
# the same token gets the same answer.  Returns {attempt, next seq, deadline} or {-1}.
_START = _APPEND_FN + """
local st, disp, token, att = unpack(redis.call('HMGET', KEYS[1], 'status', 'dispatch',
                                               'start_token', 'attempts'))
if st == 'running' and token == ARGV[7] then
  local seq, deadline = unpack(redis.call('HMGET', KEYS[1], 'next_seq', 'deadline'))
  return {tonumber(att), tonumber(seq), deadline}
end
if st ~= 'queued' or disp ~= ARGV[6] then return {-1} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local batch_key = redis.call('HGET', KEYS[1], 'batch_key')
if batch_key and attempt == 1 then
  redis.call('HINCRBY', batch_key, 'started', 1)
  redis.call('HSETNX', batch_key, 'first_started_at', ARGV[5])
end
local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout_s') or '0')
if timeout > 0 then
  redis.call('HSETNX', KEYS[1], 'deadline', tostring(tonumber(ARGV[5]) + timeout))
end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[5])
leave_line(KEYS[1], redis.call('HGET', KEYS[1], 'id'))
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[4], 'attempt_started_at',
           ARGV[5], 'start_token', ARGV[7])
redis.call('HSET', KEYS[3], redis.call('HGET', KEYS[1], 'id'), ARGV[4])
local body = string.sub(ARGV[2], 1, -2) .. ',"attempt":' .. attempt .. '}'
append(KEYS[1], KEYS[2], ARGV[1], body, ARGV[3])
local seq, deadline = unpack(redis.call('HMGET', KEYS[1], 'next_seq', 'deadline'))
return {attempt, tonumber(seq), deadline}
"""

# KEYS: job, stream  ARGV: channel, body, maxlen, attempt, seq the writer expects.
# Returns {seq, flag}: flag 1 cancel asked, 2 refused (not this attempt's any more), 3 a gap:
# the stream ends before the expected seq (Redis lost its last writes: a crash between AOF
# fsyncs, a failover), and seq is where it ends, for the writer to write the rest again.
# A retried call (its reply lost) finds the seq taken and writes nothing twice.
_APPEND = _APPEND_FN + """
local st, att, nxt, cancel = unpack(redis.call('HMGET', KEYS[1], 'status', 'attempts',
                                               'next_seq', 'cancel'))
if st ~= 'running' or att ~= ARGV[4] then return {-1, 2} end
if tonumber(nxt) < tonumber(ARGV[5]) then return {tonumber(nxt), 3} end
local flag = 0
if cancel == '1' then flag = 1 end
if tonumber(nxt) > tonumber(ARGV[5]) then return {tonumber(ARGV[5]), flag} end
local seq = append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return {seq, flag}
"""

# KEYS: job, stream, running, metrics, histograms
# ARGV: channel, body, maxlen, ttl, status, attempt or '', seq the writer expects or '', fields…
# Returns seq, or -1 if the job ended already (or, with an attempt, is not that attempt's), or
# {-2, seq} for a gap before the expected seq (see _APPEND): nothing is written.
_FINISH = _APPEND_FN + """
local st, att, nxt = unpack(redis.call('HMGET', KEYS[1], 'status', 'attempts', 'next_seq'))
if (not st) or FINAL[st] then return -1 end
if ARGV[6] ~= '' and (st ~= 'running' or att ~= ARGV[6]) then return -1 end
if ARGV[7] ~= '' and tonumber(nxt) < tonumber(ARGV[7]) then return {-2, tonumber(nxt)} end
local seq = append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[5], unpack(ARGV, 8))
count_final(KEYS[4], KEYS[5], KEYS[1], ARGV[5], ARGV[2])
redis.call('HDEL', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
seal_final(KEYS[1], KEYS[2], ARGV[4])
return seq
"""

# KEYS: job, stream, metrics, histograms  ARGV: channel, body, maxlen, ttl, finished_at.
_CANCEL = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if FINAL[st] then return 'ended:' .. st end
if st == 'queued' then
  append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5])
  count_final(KEYS[3], KEYS[4], KEYS[1], 'cancelled', '')
  seal_final(KEYS[1], KEYS[2], ARGV[4])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 'cancelling'
"""

# The reaper, for a running job whose worker is lost.
# KEYS: job, stream, running, dead letters, metrics, histograms
# ARGV: channel, maxlen, worker, attempt, max attempts, now, ttl, dead-letter ttl,
#       requeued body, error body, error JSON, cancelled body.
# Returns {'requeued', dispatch}, {'dead'}, {'cancelled'} or {'skip'} (the job moved on).
_REQUEUE = _APPEND_FN + """
local st, worker, att, cancel = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker',
                                                  'attempts', 'cancel'))
if st ~= 'running' or worker ~= ARGV[3] or att ~= ARGV[4] then
  if (not st) or FINAL[st] then redis.call('HDEL', KEYS[3], ARGV[13]) end
  return {'skip'}
end
redis.call('HDEL', KEYS[3], ARGV[13])
if cancel == '1' then
  append(KEYS[1], KEYS[2], ARGV[1], ARGV[12], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[6])
  count_final(KEYS[5], KEYS[6], KEYS[1], 'cancelled', '')
  seal_final(KEYS[1], KEYS[2], ARGV[7])
  return {'cancelled'}
end
if tonumber(att) >= tonumber(ARGV[5]) then
  append(KEYS[1], KEYS[2], ARGV[1], ARGV[10], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[11], 'finished_at', ARGV[6])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[13])
  count_final(KEYS[5], KEYS[6], KEYS[1], 'failed', '')
  seal_final(KEYS[1], KEYS[2], ARGV[8])
  return {'dead'}
end
local dispatch = redis.call('HINCRBY', KEYS[1], 'dispatch', 1)
redis.call('HSET', KEYS[1], 'status', 'queued')
wait_in_line(KEYS[1], ARGV[13])
append(KEYS[1], KEYS[2], ARGV[1], ARGV[9], ARGV[2])
return {'requeued', dispatch}
"""

StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
_JSON_FIELDS = ("request", "result", "error", "usage", "timings", "response", "webhooks")
_FLOAT_FIELDS = ("created_at", "started_at", "attempt_started_at", "finished_at", "deadline",
                 "timeout_s")


@dataclass(frozen=True)
class Appended:
    seq: int
    cancel_requested: bool
    refused: bool
    gap: bool = False  # the stream ends at `seq`, before the seq the writer expected


@dataclass(frozen=True)
class Finished:
    """A final write's answer: its seq; -1 if the job ended already or moved on; or, with
    `gap`, where the stream ends (before the seq the writer expected), nothing written."""

    seq: int
    gap: bool = False


def token_events(entries: StreamEntries) -> list[dict[str, Any]]:
    """The token events of a job's stream entries (XRANGE's reply), in seq order."""
    events = (json.loads(fields[b"event"]) for _, fields in entries)
    return [event for event in events if event.get("type") == "token"]


def _finished(reply: Any) -> Finished:
    if isinstance(reply, list):
        return Finished(int(reply[1]), gap=True)
    return Finished(int(reply))


@dataclass(frozen=True)
class Started:
    """A started attempt: its number, the seq its next event gets, and its deadline if any."""

    attempt: int
    next_seq: int
    deadline: float | None


def _pairs(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        if value is None:
            continue
        out += [name, value if isinstance(value, str) else json.dumps(value)]
    return out


def timeout_of(job: JobRequest, settings: Settings) -> float:
    """The job's run-time limit: its own timeout_s, else the configured default."""
    return job.timeout_s if job.timeout_s is not None else settings.job_timeout_s


def new_record(job: JobRequest, settings: Settings, **extra: str) -> dict[str, Any]:
    """The fields a new job's record starts with (the create script adds id and status);
    `key_hooks` in `extra` (its API key's webhook endpoints) go into its webhook targets."""
    key_hooks = extra.pop("key_hooks", None)
    request_json = job.model_dump(mode="json")
    fingerprint = hashlib.sha256(json.dumps(request_json, sort_keys=True).encode()).hexdigest()
    now, keys = time.time(), Keys(settings.key_prefix)
    return {"kind": job.kind, "model": job.model, "created_at": repr(now),
            "request": request_json, "fingerprint": fingerprint,
            "timeout_s": repr(timeout_of(job, settings)),
            "wait_key": keys.waiting(job.model),
            "wait_score": str(wait_score(job.priority, now)),
            **({"fair_key": keys.fair(job.model)} if settings.fair_share else {}),
            **record_fields(job.webhook, settings,
                            RESPONSE_EVENTS if "response" in extra else JOB_EVENTS, key_hooks),
            **extra}


def wait_score(priority: int, created_at: float) -> int:
    """A queued job's order in its model's queue: higher priority first, then older first
    (the order Celery's priority lists deliver in). Exact in a double: under 2**53."""
    return (9 - priority) * 10**13 + int(created_at * 1000)


def _body(event: Event) -> str:
    return event.model_dump_json(exclude_none=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_record(raw: dict[Any, Any]) -> dict[str, Any] | None:
    """A job hash as the API shows it, or None if there is no such job."""
    if not raw:
        return None
    rec = {_text(k): _text(v) for k, v in raw.items()}
    out: dict[str, Any] = {name: rec.get(name) for name in ("id", "kind", "model", "status")}
    for name in _FLOAT_FIELDS:
        out[name] = float(rec[name]) if name in rec else None
    out["worker"] = rec.get("worker")
    out["attempts"] = int(rec.get("attempts", 0))
    out["dispatch"] = int(rec.get("dispatch", 1))
    for name in _JSON_FIELDS:
        out[name] = json.loads(rec[name]) if name in rec else None
    out["cancel_requested"] = rec.get("cancel") == "1"
    out["fingerprint"] = rec.get("fingerprint")
    out["requeued_from"] = rec.get("requeued_from")
    out["owner"] = rec.get("owner")
    for name in ("wait_score", "fair_key", "fair_line"):  # its place in line (api.queueing)
        out[name] = rec.get(name)
    return out


class _Args:
    """Keys and arguments of each script call, shared by the sync and the async store."""

    def __init__(self, settings: Settings, keys: Keys) -> None:
        self.keys = keys
        self.maxlen = settings.stream_maxlen
        self.ttl_s = settings.job_ttl_s
        self.live_ttl_s = settings.live_ttl_s
        self.idem_ttl_s = settings.idempotency_ttl_s
        self.dead_ttl_s = settings.dead_letter_ttl_s

    def job_keys(self, job_id: str) -> list[str]:
        return [self.keys.job(job_id), self.keys.events(job_id)]

    def event(self, job_id: str, event: Event) -> list[Any]:
        return [self.keys.channel(job_id), _body(event), self.maxlen]

    def create(
        self, job_id: str, record: dict[str, Any], idem_key: str | None
    ) -> tuple[list[str], list[Any]]:
        keys = self.job_keys(job_id) + ([self.keys.idempotency(idem_key)] if idem_key else [])
        args = [*self.event(job_id, Queued(job=job_id)), self.live_ttl_s, self.idem_ttl_s, job_id]
        fields = {"id": job_id, "status": "queued", "dispatch": "1", **record}
        return keys, args + _pairs(fields)

    def finish(
        self, job_id: str, event: Event, status: str, attempt: int | None, fields: dict[str, Any],
        seq: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        fields = {"finished_at": repr(time.time()), **fields}
        args = [*self.event(job_id, event), self.ttl_s, status,
                "" if attempt is None else str(attempt), "" if seq is None else str(seq),
                *_pairs(fields)]
        return [*self.job_keys(job_id), self.keys.running(), *self.metric_keys()], args

    def metric_keys(self) -> list[str]:
        return [self.keys.metrics_jobs(), self.keys.metrics_histograms()]

    def fail(
        self, job_id: str, error_type: str, message: str, attempt: int | None,
        seq: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        info = ErrorInfo(type=error_type, message=message)
        event = ErrorEvent(job=job_id, error=info)
        return self.finish(job_id, event, "failed", attempt, {"error": info.model_dump()}, seq)

    def cancel(self, job_id: str) -> list[Any]:
        return [*self.event(job_id, Cancelled(job=job_id)), self.ttl_s, repr(time.time())]

    def requeue(
        self, job_id: str, worker: str, attempt: int, max_attempts: int, reason: str
    ) -> tuple[list[str], list[Any]]:
        keys = [*self.job_keys(job_id), self.keys.running(), self.keys.dead_letters(),
                *self.metric_keys()]
        error = ErrorInfo(type="worker_lost", message=f"{reason}; gave up after {attempt} "
                          f"attempts (max_attempts {max_attempts})")
        args = [
            self.keys.channel(job_id), self.maxlen, worker, str(attempt), max_attempts,
            repr(time.time()), self.ttl_s, self.dead_ttl_s,
            _body(Requeued(job=job_id, attempt=attempt, reason=reason)),
            _body(ErrorEvent(job=job_id, error=error)), error.model_dump_json(),
            _body(Cancelled(job=job_id)), job_id,
        ]
        return keys, args


class JobStore:
    """Blocking store for worker processes (and the reaper that runs in them)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.args = _Args(settings, Keys(settings.key_prefix))
        self._start = client.register_script(_START)
        self._append = client.register_script(_APPEND)
        self.appends = GroupCommit(client)  # a batch engine's jobs share round trips
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._create = client.register_script(_CREATE)
        self._cancel = client.register_script(_CANCEL)
        self._pump = client.register_script(PUMP)

    def pump_fair(self, model: str) -> int:
        """Send a model's queued jobs while its live slots allow (broker.fair); every
        worker's heartbeat runs it: a new worker gets work, a lost count heals."""
        return int(self._pump(args=[self.args.keys.fair(model)]))

    def get(self, job_id: str) -> dict[str, Any] | None:
        return _read_record(self.redis.hgetall(self.args.keys.job(job_id)))

    def create_many(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        """Write many queued jobs in one round trip (a batch, a schedule's run)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, record in records:
            keys, args = self.args.create(job_id, record, None)
            self._create(keys=keys, args=args, client=pipe)
        pipe.execute()

    def cancel_many(self, job_ids: list[str]) -> list[str]:
        """Cancel many jobs in one round trip; each answer as AsyncJobStore.cancel's."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            keys = [*self.args.job_keys(job_id), *self.args.metric_keys()]
            self._cancel(keys=keys, args=self.args.cancel(job_id), client=pipe)
        return [_text(reply) for reply in pipe.execute()]

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.args.keys.job(job_id), "cancel") == b"1"

    def start(self, job_id: str, worker: str, dispatch: int, token: str) -> Started | None:
        """Start an attempt and write its `started` event; None if this delivery must not run
        (the job ended, is running elsewhere, or was queued again since this message)."""
        keys = [*self.args.job_keys(job_id), self.args.keys.running()]
        # The script adds the attempt number, which only it knows, as the last field.
        body = _body(StartedEvent(job=job_id, worker=worker, attempt=0))
        body = body.removesuffix(',"attempt":0}') + "}"
        args: list[Any] = [self.args.keys.channel(job_id), body, self.args.maxlen,
                           worker, repr(time.time()), dispatch, token]
        reply = self._start(keys=keys, args=args)
        if int(reply[0]) < 0:
            return None
        deadline = float(reply[2]) if len(reply) > 2 and reply[2] else None
        return Started(attempt=int(reply[0]), next_seq=int(reply[1]), deadline=deadline)

    def append(self, job_id: str, event: Event, attempt: int, seq: int) -> Appended:
        return self.appended(self.append_later(job_id, event, attempt, seq))

    def append_later(self, job_id: str, event: Event, attempt: int, seq: int) -> PendingCall:
        """Queue an append for the next shared round trip (`appended` sends it if need be)."""
        keys, args = self.args.job_keys(job_id), self.args.event(job_id, event)
        return self.appends.submit(self._append, keys, [*args, attempt, seq])

    def appended(self, pending: PendingCall) -> Appended:
        got, flag = self.appends.wait(pending)
        return Appended(seq=int(got), cancel_requested=flag == 1, refused=flag == 2,
                        gap=flag == 3)

    def finish(
        self, job_id: str, event: Event, status: str, attempt: int | None = None,
        seq: int | None = None, **fields: Any,
    ) -> Finished:
        keys, args = self.args.finish(job_id, event, status, attempt, fields, seq)
        return _finished(self._finish(keys=keys, args=args))

    def fail(self, job_id: str, error_type: str, message: str, attempt: int | None = None,
             seq: int | None = None) -> Finished:
        keys, args = self.args.fail(job_id, error_type, message, attempt, seq)
        return _finished(self._finish(keys=keys, args=args))

    def published_tokens(self, job_id: str) -> list[dict[str, Any]]:
        """Every token event so far, in seq order: where a new attempt goes on."""
        return token_events(cast(StreamEntries,
                                 self.redis.xrange(self.args.keys.events(job_id))))

    def published_text(self, job_id: str) -> str:
        return "".join(event["text"] for event in self.published_tokens(job_id))

    def running(self) -> dict[str, str]:
        """Job id -> worker, for every job with a running attempt."""
        return {_text(k): _text(v) for k, v in self.redis.hgetall(self.args.keys.running()).items()}

    def requeue(
        self, job_id: str, worker: str, attempt: int, max_attempts: int, reason: str
    ) -> tuple[str, int]:
        """Queue a lost attempt's job again: (`requeued`, dispatch), or (`dead`|`cancelled`|
        `skip`, 0) when it failed for good, was cancelled meanwhile, or has moved on."""
        keys, args = self.args.requeue(job_id, worker, attempt, max_attempts, reason)
        reply = self._requeue(keys=keys, args=args)
        outcome = _text(reply[0])
        return outcome, int(reply[1]) if len(reply) > 1 else 0


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
        return _text(found), bool(created)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return _read_record(await self.redis.hgetall(self.args.keys.job(job_id)))

    async def fail(self, job_id: str, error_type: str, message: str) -> int:
        keys, args = self.args.fail(job_id, error_type, message, None)
        return int(await self._finish(keys=keys, args=args))

    async def cancel(self, job_id: str) -> str:
        """`cancelled` (was queued), `cancelling` (running), `ended:<status>`, or `missing`."""
        keys = [*self.args.job_keys(job_id), *self.args.metric_keys()]
        reply = await self._cancel(keys=keys, args=self.args.cancel(job_id))
        return _text(reply)

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Dead-lettered jobs still on record, oldest first."""
        ids = [_text(i) for i in await self.redis.zrange(self.args.keys.dead_letters(), 0, -1)]
        records = [await self.get(job_id) for job_id in ids]
        gone = [job_id for job_id, rec in zip(ids, records, strict=True) if rec is None]
        if gone:
            await self.redis.zrem(self.args.keys.dead_letters(), *gone)
        return [rec for rec in records if rec is not None]

    async def published_text(self, job_id: str) -> str:
        """The tokens the job's stream holds: the output of a job not (or not well) ended."""
        entries = await self.redis.xrange(self.args.keys.events(job_id))
        return "".join(event["text"] for event in token_events(cast(StreamEntries, entries)))

    async def is_dead_letter(self, job_id: str) -> bool:
        return await self.redis.zscore(self.args.keys.dead_letters(), job_id) is not None

    async def forget_dead_letter(self, job_id: str) -> bool:
        return bool(await self.redis.zrem(self.args.keys.dead_letters(), job_id))
