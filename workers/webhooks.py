"""The `tokenpool webhooks` process: it claims due deliveries (broker.webhooks) and sends each
try as a Celery task on its own queue, which only this process consumes, so a slow or dead
receiver holds one of its threads for at most webhook_timeout_s and never a model worker's.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from celery import Celery

from broker.apikeys import KeyStore
from broker.batches import progress
from broker.keys import Keys
from broker.settings import Settings
from broker.store import JobStore
from broker.webhooks import (
    Outbox,
    UnsafeTarget,
    batch_payload,
    check_target,
    delivery_id,
    event_type,
    payload,
    signed_headers,
)

log = logging.getLogger("tokenpool.webhooks")
WEBHOOK_TASK = "tokenpool.webhook"


class Deliverer:
    def __init__(self, store: JobStore, outbox: Outbox, settings: Settings) -> None:
        self.store, self.outbox, self.settings = store, outbox, settings

    def deliver(self, member: str) -> str:
        """One try of one delivery: its outcome."""
        found = self.event_of(member)
        if found is None:
            return self.outbox.failed(member, self.settings.webhook_max_attempts,
                                      "its job or batch record is gone (expired)")
        event, target = found
        if event["type"] not in target["events"]:
            self.outbox.skipped(member, f"{event['type']} not wanted")
            return "skipped"
        attempts = self.outbox.attempt(member)
        try:
            check_target(target["url"], self.settings)
            secret = self.secret_for(target)
            status = self.post(target["url"], json.dumps(event).encode(), delivery_id(member),
                               secret)
        except (UnsafeTarget, httpx.HTTPError) as exc:
            outcome = self.outbox.failed(member, attempts, f"{type(exc).__name__}: {exc}")
            log.warning("webhook %s to %s: %s; %s", delivery_id(member), target["url"], exc,
                        outcome)
            return outcome
        if 200 <= status < 300:
            self.outbox.delivered(member, status)
            log.info("webhook %s (%s) delivered: %s", delivery_id(member), event["type"],
                     status)
            return "delivered"
        outcome = self.outbox.failed(member, attempts, f"HTTP {status}")
        log.warning("webhook %s to %s: HTTP %s; %s", delivery_id(member), target["url"], status,
                    outcome)
        return outcome

    def event_of(self, member: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The delivery's event and its target (None: the record is gone)."""
        subject, index = member.split("|", 1)
        if subject.startswith("batch:"):
            _, batch_id, _ = subject.split(":")
            raw: Any = self.outbox.redis.hgetall(self.outbox.keys.batch(batch_id))
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            if not fields.get("webhooks"):
                return None
            event = batch_payload(member, progress(fields, time.time()),
                                  float(fields.get("completed_at") or time.time()))
            return event, json.loads(fields["webhooks"])[int(index)]
        record = self.store.get(subject)
        if record is None or event_type(record) is None:
            return None
        return payload(member, record), (record.get("webhooks") or [])[int(index)]

    def secret_for(self, target: dict[str, Any]) -> str:
        """An API key's endpoint is signed with that key's secret, the rest with the
        server's; with neither there is nothing to sign with (UnsafeTarget: dead letter)."""
        key_id = target.get("secret_key")
        secret = (KeyStore(self.outbox.redis, self.outbox.keys).webhook_secret(key_id)
                  if key_id else self.settings.webhook_secret)
        if not secret:
            raise UnsafeTarget("no secret to sign with (the key was removed, or "
                               "webhook_secret is unset)")
        return secret

    def post(self, url: str, body: bytes, message_id: str, secret: str) -> int:
        """POST, no redirects followed, at most webhook_max_response_bytes of the answer read."""
        headers = signed_headers(secret, message_id, body)
        with httpx.Client(timeout=self.settings.webhook_timeout_s, follow_redirects=False) \
                as http, http.stream("POST", url, content=body, headers=headers) as reply:
            read = 0
            for chunk in reply.iter_bytes():
                read += len(chunk)
                if read >= self.settings.webhook_max_response_bytes:
                    break
            return reply.status_code


def register(app: Celery, deliverer: Deliverer) -> None:
    @app.task(name=WEBHOOK_TASK, acks_late=True, ignore_result=True)
    def deliver_webhook(member: str) -> str:
        if not isinstance(member, str) or "|" not in member:
            return "malformed"
        return deliverer.deliver(member)


def pump(app: Celery, outbox: Outbox, keys: Keys) -> Any:
    """One round of the claim loop: every due delivery becomes a task."""
    def run_once() -> int:
        claimed = outbox.claim()
        for member in claimed:
            app.send_task(WEBHOOK_TASK, args=[member], queue=keys.webhooks_queue(),
                          argsrepr=f"delivery={delivery_id(member)}", kwargsrepr="")
        return len(claimed)
    return run_once
