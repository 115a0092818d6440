"""Webhooks: who is told when a job ends, how the message is signed, where it may go, and the
Redis side of delivering it at least once.

A job's record names its targets (its own `webhook`, and the settings' endpoints); the scripts
that end a job put one delivery per target in a due set (broker.keys.webhooks_due), in the
same step as the final event, so a delivery exists once the job has ended, whichever process
ended it and whatever happens to that process next. The `tokenpool webhooks` process claims
due deliveries with a lease and sends each try as a Celery task (workers/webhooks.py); a failed
try puts the delivery back, due after an exponential backoff, and the last one dead-letters it.
Model workers never deliver anything.

Signed as Standard Webhooks (OpenAI's own webhooks use it): `webhook-id` (the same on every try
of one delivery, so receivers can drop repeats), `webhook-timestamp`, and `webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with the secret after `whsec_`, base64-decoded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import redis

from broker.keys import Keys
from broker.settings import Settings

STATUS_EVENT = {"succeeded": "job.succeeded", "failed": "job.failed",
                "cancelled": "job.cancelled"}
RESPONSE_EVENT = {"succeeded": "response.completed", "failed": "response.failed",
                  "cancelled": "response.cancelled"}
JOB_EVENTS = tuple(STATUS_EVENT.values())
RESPONSE_EVENTS = (*RESPONSE_EVENT.values(), "response.incomplete")
BATCH_EVENTS = ("batch.completed", "batch.cancelled")
LEASE_MIN_S = 30.0


class UnsafeTarget(ValueError):
    """A webhook URL that may not be delivered to; the message says why."""


def targets(webhook: str | None, settings: Settings, events: tuple[str, ...] = JOB_EVENTS,
            key_hooks: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Everyone a job's (or a response's, or a batch's) end is told to: its own URL, its
    key's endpoints, then the settings' endpoints; of the endpoints, only those that want one
    of `events` (the others never get a delivery queued)."""
    own = [{"url": webhook, "events": list(events)}] if webhook else []
    endpoints = [*(key_hooks or []),
                 *(endpoint.model_dump() for endpoint in settings.webhook_endpoints)]
    return own + [e for e in endpoints if set(e["events"]) & set(events)]


def record_fields(webhook: str | None, settings: Settings, events: tuple[str, ...] = JOB_EVENTS,
                  key_hooks: str | None = None) -> dict[str, str]:
    """What a job's or batch's record keeps so that the scripts ending it queue its
    deliveries (`key_hooks`: its API key's endpoints, JSON, as auth.owner_of gives them)."""
    found = targets(webhook, settings, events, json.loads(key_hooks) if key_hooks else None)
    if not found:
        return {}
    return {"webhooks": json.dumps(found), "hooks": str(len(found)),
            "hooks_due": Keys(settings.key_prefix).webhooks_due()}


def delivery_id(member: str) -> str:
    """The `webhook-id` of a delivery `<job>|<i>` or `batch:<id>:<n>|<i>` (a batch's n-th
    end): the same on every try."""
    subject, index = member.split("|", 1)
    return f"msg_{subject.replace(':', '_')}_{index}"


def member_of(delivery: str) -> str:
    subject, index = delivery.removeprefix("msg_").rsplit("_", 1)
    if subject.startswith("batch_"):
        _, batch_id, n = subject.split("_")
        subject = f"batch:{batch_id}:{n}"
    return f"{subject}|{index}"


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret_bytes(secret), f"{message_id}.{timestamp}.".encode() + body,
                   hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(secret: str, message_id: str, body: bytes,
                   now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, message_id, timestamp, body),
            "content-type": "application/json", "user-agent": "tokenpool-webhooks"}


def event_type(record: dict[str, Any]) -> str | None:
    """What a job's end is called: a response's in OpenAI's names (None: not ended)."""
    status = record["status"]
    if not record.get("response"):
        return STATUS_EVENT.get(status)
    cut = (record.get("result") or {}).get("finish_reason") == "length"
    return "response.incomplete" if status == "succeeded" and cut else RESPONSE_EVENT.get(status)


def payload(member: str, record: dict[str, Any]) -> dict[str, Any]:
    """The event for a job's end: the same body on every try (its time is the job's end).
    A response's data is as OpenAI's webhooks have it: the response's id (and our job's)."""
    kind = event_type(record)
    assert kind is not None
    if record.get("response"):
        data: dict[str, Any] = {"id": f"resp_{record['id']}", "job": record["id"]}
    else:
        data = {"id": record["id"], "kind": record["kind"], "model": record["model"],
                "status": record["status"], "result": record.get("result"),
                "error": record.get("error"), "usage": record.get("usage")}
    return {"id": delivery_id(member), "object": "event", "type": kind,
            "created_at": int(record.get("finished_at") or time.time()), "data": data}


def batch_payload(member: str, progress: dict[str, Any], completed_at: float,
                  ) -> dict[str, Any]:
    """The event for a batch whose every item has ended: its counts as GET shows them."""
    kind = "batch.cancelled" if progress["status"] == "cancelled" else "batch.completed"
    data = {k: progress.get(k) for k in ("id", "kind", "model", "status", "total", "counts",
                                          "tokens")}
    return {"id": delivery_id(member), "object": "event", "type": kind,
            "created_at": int(completed_at), "data": data}


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise UnsafeTarget(f"its host {host!r} does not resolve ({exc})") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def check_target(url: str, settings: Settings) -> None:
    """Refuse what a webhook must not reach: other schemes, credentials in the URL, and (unless
    allowed by webhook_allow_hosts or webhook_allow_networks) any address that is loopback,
    private, link-local, reserved or multicast. Checked at submit and again before each try,
    so a name that resolves elsewhere later is caught then too."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTarget("only http:// and https:// URLs with a host")
    if parts.username or parts.password:
        raise UnsafeTarget("no credentials in the URL")
    host = parts.hostname
    if host in settings.webhook_allow_hosts:
        return
    allowed = [ipaddress.ip_network(net, strict=False) for net in settings.webhook_allow_networks]
    for address in _addresses(host):
        if any(address in net for net in allowed):
            continue
        if not address.is_global or address.is_multicast:
            raise UnsafeTarget(f"{host} is {address}, not a public address (allow it with "
                               "webhook_allow_networks or webhook_allow_hosts)")


class Outbox:
    """The deliveries' Redis side, for the webhooks process and the API's dead-letter routes."""

    _CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis, self.settings = client, settings
        self.keys = Keys(settings.key_prefix)
        self.lease_s = max(LEASE_MIN_S, 3 * settings.webhook_timeout_s)
        self._claim = client.register_script(self._CLAIM)

    def claim(self, limit: int = 100) -> list[str]:
        """Due deliveries, each leased (due again after the lease unless it ends first)."""
        now = time.time()
        found = self._claim(keys=[self.keys.webhooks_due()],
                            args=[now, now + self.lease_s, limit])
        return [m.decode() if isinstance(m, bytes) else str(m) for m in found]

    def attempt(self, member: str) -> int:
        return int(self.redis.hincrby(self.keys.webhook(member), "attempts", 1))

    def delivered(self, member: str, status: int) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.webhooks_due(), member)
        pipe.hset(self.keys.webhook(member), mapping={"outcome": "delivered",
                                                      "last_status": status})
        pipe.expire(self.keys.webhook(member), self.settings.job_ttl_s)
        pipe.execute()

    def failed(self, member: str, attempts: int, error: str) -> str:
        """Due again after the backoff, or dead after the last try: which."""
        info: Any = {"last_error": error[:500], "last_try_at": repr(time.time())}
        pipe = self.redis.pipeline(transaction=True)
        if attempts >= self.settings.webhook_max_attempts:
            pipe.zrem(self.keys.webhooks_due(), member)
            pipe.zadd(self.keys.webhooks_dead(), {member: time.time()})
            pipe.hset(self.keys.webhook(member), mapping={**info, "outcome": "dead"})
            outcome = "dead"
        else:
            wait_s = self.settings.webhook_backoff_s * 2 ** (attempts - 1)
            pipe.zadd(self.keys.webhooks_due(), {member: time.time() + wait_s})
            pipe.hset(self.keys.webhook(member), mapping=info)
            outcome = f"retry in {wait_s:g}s"
        pipe.execute()
        return outcome

    def skipped(self, member: str, why: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.webhooks_due(), member)
        pipe.hset(self.keys.webhook(member), mapping={"outcome": f"skipped: {why}"})
        pipe.expire(self.keys.webhook(member), self.settings.job_ttl_s)
        pipe.execute()

    def dead(self) -> list[dict[str, Any]]:
        out = []
        found: Any = self.redis.zrange(self.keys.webhooks_dead(), 0, -1, withscores=True)
        for raw, at in found:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            stored: Any = self.redis.hgetall(self.keys.webhook(member))
            info = {k.decode(): v.decode() for k, v in stored.items()}
            out.append({"id": delivery_id(member), "job": member.split("|")[0],
                        "dead_at": at, "attempts": int(info.get("attempts", 0)),
                        "last_error": info.get("last_error")})
        return out

    def redeliver(self, member: str) -> bool:
        """A dead delivery due again now, its tries counted from zero."""
        if self.redis.zscore(self.keys.webhooks_dead(), member) is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.webhooks_dead(), member)
        pipe.hset(self.keys.webhook(member), mapping={"attempts": 0, "outcome": "redelivering"})
        pipe.zadd(self.keys.webhooks_due(), {member: time.time()})
        pipe.execute()
        return True
