"""The one Celery app: JSON only, acks late, prefetch 1, one queue per model."""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Connection, Queue

from broker.connection import KEEPALIVE_OPTIONS, SOCKET_TIMEOUT_S, celery_broker
from broker.keys import Keys
from broker.messages import JobRequest
from broker.settings import Settings

log = logging.getLogger("tokenpool.worker")

# Task names, one per job kind; tasks/ defines them, the API sends them by name.
TASK_NAMES = {
    "generate": "tokenpool.generate",
    "summarize": "tokenpool.summarize",
    "embed": "tokenpool.embed",
}
# One message for many jobs of one kind (a batch POST): Celery's per-message cost (a handful
# of Redis round trips on the worker's consumer thread) is paid once for all of them.
BULK_TASK_NAMES = {kind: f"{name}_many" for kind, name in TASK_NAMES.items()}


def celery_priority(priority: int) -> int:
    """Contract priority (9 most urgent) -> Celery on Redis (0 most urgent)."""
    return 9 - priority


def task_id_of(job_id: str, dispatch: int) -> str:
    """Celery's id of one delivery: the job id, then `<job id>.<n>` for the n-th requeue."""
    return job_id if dispatch == 1 else f"{job_id}.{dispatch}"


def task_of(job_ids: list[str], kind: str, model: str, dispatch: int = 1,
            ) -> tuple[str, list[Any], str, str]:
    """(task name, args, task id, argsrepr) of one job's delivery, or of a bulk message for
    the first delivery of many jobs of one kind and model; the message carries ids only."""
    if len(job_ids) == 1:
        job_id = job_ids[0]
        return (TASK_NAMES[kind], [job_id, model, dispatch], task_id_of(job_id, dispatch),
                f"job={job_id} model={model} dispatch={dispatch}")
    return (BULK_TASK_NAMES[kind], [job_ids, model], f"bulk-{job_ids[0]}",
            f"jobs={len(job_ids)} first={job_ids[0]} model={model}")


def send_job(
    app: Celery, keys: Keys, job_id: str, kind: str, model: str, priority: int, dispatch: int = 1
) -> None:
    """Queue one delivery of a job on its model's queue."""
    _send(app, keys, task_of([job_id], kind, model, dispatch), model, priority)


def send_bulk(
    app: Celery, keys: Keys, job_ids: list[str], kind: str, model: str, priority: int
) -> None:
    """Queue the first delivery of many jobs of one kind and model as one message."""
    _send(app, keys, task_of(job_ids, kind, model), model, priority)


def _send(app: Celery, keys: Keys, task: tuple[str, list[Any], str, str], model: str,
          priority: int) -> None:
    name, args, task_id, argsrepr = task
    app.send_task(name, args=args, task_id=task_id, queue=keys.queue(model),
                  priority=celery_priority(priority), argsrepr=argsrepr, kwargsrepr="")


def bulk_groups(
    ids: list[str], jobs: list[JobRequest], settings: Settings
) -> list[list[tuple[str, JobRequest]]]:
    """Embedding jobs of one model and priority share a message, up to the model's
    max_batch (they are encoded together anyway); every other job is a message of its own."""
    groups: list[list[tuple[str, JobRequest]]] = []
    open_groups: dict[tuple[str, int], list[tuple[str, JobRequest]]] = {}
    for job_id, job in zip(ids, jobs, strict=True):
        if job.kind != "embed":
            groups.append([(job_id, job)])
            continue
        key = (job.model, job.priority)
        group = open_groups.get(key)
        if group is None or len(group) >= settings.models[job.model].max_batch:
            group = open_groups[key] = []
            groups.append(group)
        group.append((job_id, job))
    return groups


def send_group(app: Celery, keys: Keys, group: list[tuple[str, JobRequest]]) -> None:
    """One message for a group from bulk_groups: the job alone, or a bulk message."""
    first = group[0][1]
    if len(group) == 1:
        send_job(app, keys, group[0][0], first.kind, first.model, first.priority)
    else:
        send_bulk(app, keys, [job_id for job_id, _ in group], first.kind, first.model,
                  first.priority)


# How long a worker's consumer waits between tries while Redis is away. kombu's default backs
# off to 30 s, so a worker found Redis back up to half a minute late; Redis restarts in a
# second or two under `tokenpool up`.
RECONNECT_MAX_S = 2.0


class QuickReconnectConsumer(Consumer):
    """Celery's consumer, with two changes for Redis going away under running jobs:

    - it retries the broker every RECONNECT_MAX_S at most;
    - it survives losing the connection while it holds unacked messages. Closing the lost
      connection makes each kombu channel put its unacked messages back on their queues; but
      the channel drops its Redis pools first and Celery has already cleared the connection's
      address, so making a pool again raised AttributeError, which Celery treats as
      unrecoverable: the worker exited (kombu#582's path, still in kombu 5.7). Redis is away
      anyway, so the channels skip that step: the messages stay in kombu's unacked set in Redis
      and come back after the visibility timeout, and a job's own record, not its message,
      decides whether it runs again."""

    def ensure_connected(self, conn: Connection) -> Connection:
        conn.ensure_connection = functools.partial(  # type: ignore[method-assign]
            conn.ensure_connection, interval_start=0.5, interval_step=0.5,
            interval_max=RECONNECT_MAX_S)
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        conn = self.connection
        transport = getattr(conn, "_connection", None)  # kombu's own; not a new connection
        for channel in [getattr(conn, "_default_channel", None),
                        *getattr(transport, "channels", ()),
                        *getattr(transport, "_avail_channels", ())]:
            if channel is not None:
                channel.do_restore = False
                if getattr(channel, "_qos", None) is not None:
                    _forget_acks_on_lost(channel._qos)
        super().on_connection_error_after_connected(exc)


def _forget_acks_on_lost(qos: Any) -> None:
    """A task that ends after its channel's connection was lost is acked (or rejected) on
    that dead channel: kombu then rebuilds a pool from the cleared connection and raises
    AttributeError, which Celery treats as unrecoverable. Such an answer cannot reach Redis
    any more; the message stays unacked there, comes back after the visibility timeout, and
    the job store refuses a stale delivery (or runs a job that still needs it)."""
    for name in ("ack", "reject"):
        answer = getattr(qos, name)

        def forgetful(delivery_tag: Any, *args: Any, _answer: Any = answer, _name: str = name,
                      **kwargs: Any) -> None:
            try:
                _answer(delivery_tag, *args, **kwargs)
            except Exception as exc:
                log.info("%s of delivery %s on a lost broker connection skipped (%s): Redis "
                         "redelivers it after the visibility timeout", _name, delivery_tag,
                         type(exc).__name__)

        setattr(qos, name, forgetful)


def make_celery(settings: Settings, redis_url: str) -> Celery:
    keys = Keys(settings.key_prefix)
    broker, sentinel_options, use_ssl = celery_broker(redis_url)
    app = Celery("tokenpool", broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live in the job store; Flower reads task events
        worker_cancel_long_running_tasks_on_connection_loss=False,  # fenced writes decide
        broker_connection_max_retries=None,  # a worker waits out a Redis restart
        task_queues=[*(Queue(keys.queue(name)) for name in settings.models),
                     Queue(keys.schedules_queue()), Queue(keys.webhooks_queue())],
        task_default_queue=keys.queue(next(iter(settings.models))),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for such messages every 10 s (kombu's default is every 100 s).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "global_keyprefix": "",
            # A dead or cut-off Redis host: fail the connection within seconds, not never
            # (see broker.connection; kombu's BRPOP waits 1 s at a time).
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "socket_keepalive_options": KEEPALIVE_OPTIONS,
            **sentinel_options,
        },
        broker_connection_retry_on_startup=True,
        broker_use_ssl=use_ssl,
        worker_consumer=f"{__name__}:QuickReconnectConsumer",
        worker_send_task_events=True,
        task_send_sent_event=False,  # a second message per job; Flower sees received onward
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
