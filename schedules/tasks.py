"""The periodic task beat fires: `tokenpool.schedule(name)` runs one tick of a schedule."""

from __future__ import annotations

import redis
from celery import Celery

from broker.settings import Settings
from schedules.beat import SCHEDULE_TASK
from schedules.runs import Runner


def register(app: Celery, settings: Settings, client: redis.Redis) -> None:
    runner = Runner(client, settings, app)

    @app.task(name=SCHEDULE_TASK, acks_late=True, ignore_result=True)
    def run_schedule(name: str) -> str:
        return runner.tick(name)
