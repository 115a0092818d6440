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


class FakeInfo:
    def __init__(self) -> None:
        self.server = {"run_id": "a" * 40, "uptime_in_seconds": 3600}

    def info(self, section: str) -> dict:
        assert section == "server"
        return self.server


def test_the_reaper_waits_a_heartbeat_ttl_after_redis_becomes_another_server(monkeypatch):
    import broker.recovery as recovery
    from broker.settings import Settings

    clock = [500.0]
    monkeypatch.setattr(recovery.time, "monotonic", lambda: clock[0])
    fake = FakeInfo()
    reaper = recovery.Reaper(fake, None, None, Settings(heartbeat_ttl_s=10,
                                                        heartbeat_interval_s=2), "w")
    assert not reaper._redis_settled()  # just started: a TTL of its own first
    clock[0] += 12.1
    assert reaper._redis_settled()
    fake.server = {"run_id": "b" * 40, "uptime_in_seconds": 7200}  # a replica promoted
    assert not reaper._redis_settled()
    clock[0] += 26.9  # the TTL and interval, and a stuck connection's socket and connect timeouts
    assert not reaper._redis_settled()
    clock[0] += 0.2
    assert reaper._redis_settled()
    fake.server = {"run_id": "c" * 40, "uptime_in_seconds": 1}  # restarted: uptime decides
    clock[0] += 100
    assert not reaper._redis_settled()
