"""`tokenpool up` when its embedded Redis is SIGKILLed (the OOM killer, a crash) under running
jobs with followers attached: up restarts it on the same port and AOF, and every job ends
`succeeded` with each follower's text equal to the result."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.conftest import chat_only_config, follow
from tests.e2e.test_up import read_urls, start_up, stop_up, wait_status

CONFIG = chat_only_config("tpupredis", n_ctx=1024, max_tokens=256,
                          extra="sse_keepalive_s = 1\n")
STORY = {"kind": "generate", "max_tokens": 120, "temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture
def up(tmp_path):
    config = tmp_path / "tokenpool.toml"
    config.write_text(CONFIG)
    proc, _ = start_up(tmp_path, config)
    yield proc
    stop_up(proc)


def redis_servers(pid):
    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.is_running() and p.status() != "zombie" and "redis-server" in p.name()]


def first_tokens(http, job_id, n):
    """Read the job's events until `n` tokens came, then hang up."""
    seen = 0
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as reply:
        for line in reply.iter_lines():
            seen += line.startswith("event: token")
            if seen >= n:
                return
    raise AssertionError(f"job {job_id} ended before {n} tokens")


def test_a_sigkilled_embedded_redis_is_restarted_and_every_running_job_succeeds(up):
    urls = read_urls(up)
    api = urls["api"]
    wait_status(f"{api}/ready", 200)
    (server,) = redis_servers(up.pid)
    with httpx.Client(base_url=api, timeout=30) as http:
        ids = [http.post("/v1/jobs", json={**STORY, "prompt": f"Story {i}: once upon a time"}
                         ).json()["id"] for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            followers = [pool.submit(follow, api, job_id) for job_id in ids]
            first_tokens(http, ids[-1], 5)  # the last job queued runs: all four do
            assert {http.get(f"/v1/jobs/{j}").json()["status"] for j in ids} == {"running"}
            server.kill()
            killed_at = time.monotonic()
            deadline = killed_at + 15
            while not [p for p in redis_servers(up.pid) if p.pid != server.pid]:
                assert time.monotonic() < deadline, "up did not restart its redis-server"
                time.sleep(0.05)
            back_s = time.monotonic() - killed_at
            wait_status(f"{api}/ready", 200, timeout_s=30, interval_s=0.05)
            ready_s = time.monotonic() - killed_at
            streams = [f.result(timeout=180) for f in followers]
        attempts = []
        for job_id, events in zip(ids, streams, strict=True):
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job
            attempts.append(job["attempts"])
            assert [e["seq"] for e in events] == list(range(len(events)))
            assert "".join(e["text"] for e in events if e["type"] == "token") == \
                job["result"]["text"]
        late = http.post("/v1/jobs", json={**STORY, "prompt": "After", "max_tokens": 4})
        assert "event: done" in http.get(late.json()["links"]["events"]).text
    print(f"redis-server back {back_s:.2f}s after SIGKILL; /ready 200 after {ready_s:.2f}s; "
          f"attempts {attempts}")
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    log = up.stdout.read()
    assert "redis-server exited with -9; restarted" in log, log[-2000:]
