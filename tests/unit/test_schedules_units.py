"""Schedules from settings: beat entries, validation, list items, and batch progress maths."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.schedules import crontab
from pydantic import ValidationError

from broker.batches import progress
from broker.settings import ScheduleSpec, Settings
from schedules.beat import SCHEDULE_TASK, beat_schedule
from schedules.runs import parse_list_item


def test_each_schedule_becomes_a_beat_entry_on_the_schedules_queue() -> None:
    settings = Settings(key_prefix="tp", schedules={
        "nightly": {"action": "summarize_dir", "cron": "0 3 * * *", "path": "/data/in"},
        "sweep": {"action": "housekeeping", "every_s": 60}})
    entries = beat_schedule(settings)
    assert entries["sweep"]["schedule"] == timedelta(seconds=60)
    assert isinstance(entries["nightly"]["schedule"], crontab)
    assert entries["nightly"]["schedule"].hour == {3}
    assert all(e["task"] == SCHEDULE_TASK and e["options"]["queue"] == "tp.schedules"
               for e in entries.values())
    assert entries["sweep"]["args"] == ["sweep"]
    assert beat_schedule(Settings()) == {}


@pytest.mark.parametrize("bad", [
    {"action": "housekeeping"},
    {"action": "housekeeping", "every_s": 5, "cron": "* * * * *"},
    {"action": "housekeeping", "cron": "* * *"},
    {"action": "summarize_dir", "every_s": 5},
    {"action": "summarize_list", "every_s": 5},
])
def test_incomplete_schedules_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ScheduleSpec.model_validate(bad)


def test_list_items_are_json_or_plain_text() -> None:
    assert parse_list_item('{"id": "a", "text": "b"}') == {"id": "a", "text": "b"}
    assert parse_list_item("just words") == {"text": "just words"}
    assert parse_list_item('{"no_text": 1}') == {"text": '{"no_text": 1}'}


def test_batch_progress_counts_eta_and_status() -> None:
    fields = {"id": "b", "total": "10", "succeeded": "3", "failed": "1", "started": "6",
              "ended_started": "4", "tokens": "80", "first_started_at": "100",
              "status": "running"}
    report = progress(fields, now=110.0)
    assert report["counts"] == {"queued": 4, "running": 2, "succeeded": 3, "failed": 1,
                                "cancelled": 0}
    assert report["items_per_s"] == 0.4 and report["eta_s"] == 15.0
    assert report["tokens_per_s"] == 8.0 and report["status"] == "running"
    done = progress({**fields, "succeeded": "9", "ended_started": "10", "started": "10"}, 120)
    assert done["status"] == "completed" and done["eta_s"] == 0.0
    creating = progress({"total": "0", "status": "creating"}, 1.0)
    assert creating["status"] == "creating"
