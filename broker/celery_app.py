"""The one Celery app: JSON only, acks late, prefetch 1, one queue per model."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from broker.keys import Keys
from broker.settings import Settings

# Task names, one per job kind; tasks/ defines them, the API sends them by name.
TASK_NAMES = {
    "generate": "tokenpool.generate",
    "summarize": "tokenpool.summarize",
    "embed": "tokenpool.embed",
}


def celery_priority(priority: int) -> int:
    """Contract priority (9 most urgent) -> Celery on Redis (0 most urgent)."""
    return 9 - priority


def make_celery(settings: Settings, redis_url: str) -> Celery:
    keys = Keys(settings.key_prefix)
    app = Celery("tokenpool", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=settings.job_ttl_s,
        task_queues=[Queue(keys.queue(name)) for name in settings.models],
        task_default_queue=keys.queue(next(iter(settings.models))),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "global_keyprefix": "",
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
