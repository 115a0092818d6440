"""The reaper's judgement of one running job, from its record and its worker's heartbeat."""

from __future__ import annotations

from broker.recovery import judge

NOW = 1_000.0
RECORD = {"attempt_started_at": 900.0, "deadline": None, "timeout_s": 60.0}


def beat(jobs, ts=NOW - 0.5):
    return {"name": "w", "jobs": jobs, "ts": ts}


def test_a_job_whose_worker_beats_and_names_it_is_left_alone():
    assert judge("j", "w", RECORD, beat(["j"]), NOW, 10) is None


def test_a_job_whose_worker_stopped_beating_is_requeued():
    verdict = judge("j", "w", RECORD, None, NOW, 10)
    assert verdict.action == "requeue" and "heartbeats" in verdict.reason


def test_a_job_its_live_worker_no_longer_runs_is_requeued():
    verdict = judge("j", "w", RECORD, beat(["other"]), NOW, 10)
    assert verdict.action == "requeue" and "no longer" in verdict.reason


def test_a_heartbeat_older_than_the_start_does_not_count_against_the_job():
    # The worker beat before it started this attempt; its next beat will name the job.
    assert judge("j", "w", RECORD, beat([], ts=899.0), NOW, 10) is None


def test_a_job_past_its_deadline_and_the_grace_fails_with_a_timeout():
    record = {**RECORD, "deadline": NOW - 11}
    verdict = judge("j", "w", record, beat(["j"]), NOW, 10)
    assert verdict.action == "timeout" and "60.0s" in verdict.reason
    assert judge("j", "w", {**RECORD, "deadline": NOW - 9}, beat(["j"]), NOW, 10) is None
