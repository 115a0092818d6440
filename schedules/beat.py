"""The beat schedule built from settings: what Celery beat fires, and when."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from broker.keys import Keys
from broker.settings import ScheduleSpec, Settings

SCHEDULE_TASK = "tokenpool.schedule"


def when(spec: ScheduleSpec) -> timedelta | crontab:
    if spec.every_s is not None:
        return timedelta(seconds=spec.every_s)
    assert spec.cron is not None
    minute, hour, day_of_month, month, day_of_week = spec.cron.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                   day_of_week=day_of_week)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule`: one entry per configured schedule, each firing
    `tokenpool.schedule(name)` on the schedules queue, which every worker consumes. A tick
    that waits longer than its own interval expires instead of piling up."""
    keys = Keys(settings.key_prefix)
    entries = {}
    for name, spec in settings.schedules.items():
        expires = spec.every_s if spec.every_s is not None else 60.0
        entries[name] = {"task": SCHEDULE_TASK, "schedule": when(spec), "args": [name],
                         "options": {"queue": keys.schedules_queue(), "expires": expires}}
    return entries
