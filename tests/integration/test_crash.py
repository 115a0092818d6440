"""Crash safety on real processes: SIGKILLed and stalled workers, a poison job, deadlines,
Redis and API restarts, slow and vanished subscribers, and load.

Its own stack: a redis-server with AOF (restarted by one test), two chat workers that a
watchdog restarts like `tokenpool up` does, and the API. Only loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from broker.redis_server import EmbeddedRedis
from tests.conftest import Stack, running_stack
from tests.integration.test_responses import assert_in_order

PREFIX = "tpcrash"
CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 2
timeout_grace_s = 2
max_attempts = 3
sse_keepalive_s = 1
[models.chat]
n_ctx = 1024
max_tokens = 256
n_threads = 1  # two chat workers share two cores: llama.cpp threads must not oversubscribe
[models.summary]
enabled = false
[models.embed]
enabled = false
[models.idle]  # a model no worker serves: its jobs stay queued
kind = "llm"
source = "bundled:gemma3-270m"
"""
FINAL = {"done", "error", "cancelled"}
STORY = {"kind": "generate", "prompt": "Once upon a time, in a small village by the sea,",
         "max_tokens": 160, "temperature": 0, "seed": 3, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-aof"), appendonly=True).start()
    config = tmp_path_factory.mktemp("crash-config") / "tokenpool.toml"
    config.write_text(CONFIG)
    workers = {"chat-a": "chat", "chat-b": "chat"}
    stop = threading.Event()
    try:
        with running_stack(server.url, config, tmp_path_factory.mktemp("crash-logs"), workers,
                           PREFIX, ready=chat_ready) as stack:
            watchdog = threading.Thread(target=_restart_dead, args=(stack, stop), daemon=True)
            watchdog.start()
            stack.redis_server = server  # type: ignore[attr-defined]
            yield stack
            stop.set()
            watchdog.join()
    finally:
        server.stop()


def _restart_dead(stack: Stack, stop: threading.Event) -> None:
    """What `tokenpool up` does: restart any child that died."""
    while not stop.wait(0.2):
        stack.supervisor.restart_dead()


# --- helpers ---------------------------------------------------------------------------------

def tokens_of(events):
    return "".join(e["text"] for e in events if e["type"] == "token")


def assert_one_clean_stream(events, result_text=None):
    """seq 0..n without gaps or repeats, one final event, last; tokens equal the result."""
    assert [e["seq"] for e in events] == list(range(len(events))), [e["seq"] for e in events]
    assert events[0]["type"] == "queued"
    assert [e["type"] in FINAL for e in events].count(True) == 1 and events[-1]["type"] in FINAL
    if result_text is not None:
        assert tokens_of(events) == result_text


def pid_of(worker_name):
    return int(re.match(r"^chat-cpu-(\d+)@", worker_name)[1])


def wait_for(predicate, timeout_s=60, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def started_attempt(stack, job_id, attempt, min_tokens_after=0):
    """The `started` event of `attempt`, once `min_tokens_after` tokens followed it."""
    def seen():
        events = stack.stream(job_id)
        for i, event in enumerate(events):
            if event["type"] == "started" and event["attempt"] == attempt:
                after = [e for e in events[i + 1:] if e["type"] == "token"]
                return event if len(after) >= min_tokens_after else None
        return None
    return wait_for(seen, 90, f"attempt {attempt} of {job_id}")


def final_job(stack, job_id, timeout_s=120):
    """The job once final, read straight from the API (retrying while the API restarts)."""
    def final():
        try:
            job = stack.http.get(f"/v1/jobs/{job_id}").json()
        except (httpx.HTTPError, json.JSONDecodeError):
            return None
        return job if job.get("status") in ("succeeded", "failed", "cancelled") else None
    return wait_for(final, timeout_s, f"job {job_id} final")


def in_background(fn, *args):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def chat_ready(http):
    """Both chat workers loaded (the `idle` model has none on purpose, so /ready says 503)."""
    try:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return False
    return sum(w["state"] in ("loaded", "generating") for w in models["chat"]["workers"]) == 2


def ready(stack):
    wait_for(lambda: chat_ready(stack.http), 120, "two loaded chat workers")


# --- 1. worker death mid-generation ----------------------------------------------------------

def test_a_worker_killed_mid_generation_is_replaced_and_the_stream_goes_on_without_a_seam(crash):
    ready(crash)
    job_id = crash.submit(STORY)
    follower = in_background(crash.follow, job_id)
    first = started_attempt(crash, job_id, 1, min_tokens_after=15)
    os.kill(pid_of(first["worker"]), signal.SIGKILL)

    job = final_job(crash, job_id, 90)
    events = follower.result(timeout=90)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert_one_clean_stream(events, job["result"]["text"])
    assert events == crash.stream(job_id)
    kinds = [e["type"] for e in events]
    lost, second = kinds.index("requeued"), kinds.index("started", kinds.index("requeued"))
    assert events[lost]["attempt"] == 1 and "heartbeats" in events[lost]["reason"]
    assert events[second]["attempt"] == 2 and events[second]["worker"] != first["worker"]
    before, after = tokens_of(events[:lost]), tokens_of(events[second:])
    assert len(before) > 0 and len(after) > 0
    # The second attempt counted the published tokens against max_tokens: it went on, it did
    # not start over (a restart would have spent the whole budget again).
    assert job["usage"]["completion_tokens"] <= STORY["max_tokens"]
    assert job["result"]["text"].startswith(before)


def test_a_worker_killed_mid_response_leaves_the_responses_stream_exact(crash):
    """The Responses stream is derived from the job's: a SIGKILL mid-response shows no seam."""
    ready(crash)
    client = openai.OpenAI(base_url=f"{crash.url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    made = client.responses.create(model="chat", input=STORY["prompt"], background=True,
                                   max_output_tokens=160, temperature=0,
                                   extra_body={"seed": 3, "repeat_penalty": 1.0})
    job_id = made.id.removeprefix("resp_")
    follower = in_background(lambda: list(client.responses.retrieve(made.id, stream=True)))
    first = started_attempt(crash, job_id, 1, min_tokens_after=15)
    os.kill(pid_of(first["worker"]), signal.SIGKILL)

    events = follower.result(timeout=120)
    job = final_job(crash, job_id, 90)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert assert_in_order(events) == job["result"]["text"] == tokens_of(crash.stream(job_id))
    again = list(client.responses.retrieve(made.id, stream=True))
    assert [e.to_dict() for e in again] == [e.to_dict() for e in events]


def test_a_resumed_job_keeps_every_tokens_log_probability_once(crash):
    """A job asking for logprobs, its worker killed mid-generation: the result's logprobs are
    the earlier attempt's (as published) then the new one's, one per generated token."""
    ready(crash)
    job_id = crash.submit({**STORY, "logprobs": True, "top_logprobs": 2})
    first = started_attempt(crash, job_id, 1, min_tokens_after=10)
    os.kill(pid_of(first["worker"]), signal.SIGKILL)
    job = final_job(crash, job_id, 90)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    published = [entry for e in crash.stream(job_id) if e["type"] == "token"
                 for entry in e.get("logprobs") or []]
    logprobs = job["result"]["logprobs"]
    assert logprobs == published and len(logprobs) == job["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in logprobs) == job["result"]["text"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)


def test_a_worker_that_stalls_loses_its_job_and_its_late_writes_are_refused(crash):
    ready(crash)
    job_id = crash.submit(STORY)
    first = started_attempt(crash, job_id, 1, min_tokens_after=10)
    pid = pid_of(first["worker"])
    os.kill(pid, signal.SIGSTOP)
    try:
        started_attempt(crash, job_id, 2)  # the other worker took it over
    finally:
        os.kill(pid, signal.SIGCONT)  # wakes mid-token: its next write must be refused
    job = final_job(crash, job_id, 90)
    events = crash.stream(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert_one_clean_stream(events, job["result"]["text"])
    workers = {e["attempt"]: e["worker"] for e in events if e["type"] == "started"}
    assert workers[1] == first["worker"] and workers[2] != workers[1]
    assert crash.stream(job_id) == events  # nothing written after the final event


# --- 2. poison jobs --------------------------------------------------------------------------

def test_a_job_that_kills_its_worker_three_times_is_dead_lettered_and_can_be_requeued(crash):
    ready(crash)
    job_id = crash.submit({**STORY, "max_tokens": 256})
    for attempt in (1, 2, 3):
        started = started_attempt(crash, job_id, attempt, min_tokens_after=1)
        os.kill(pid_of(started["worker"]), signal.SIGKILL)

    job = final_job(crash, job_id, 60)
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"]["type"] == "worker_lost"
    assert "3 attempts" in job["error"]["message"]
    events = crash.stream(job_id)
    assert_one_clean_stream(events)
    assert events[-1]["type"] == "error" and events[-1]["error"] == job["error"]
    assert [e["attempt"] for e in events if e["type"] == "requeued"] == [1, 2]

    dead = crash.http.get("/v1/dead-letters").json()["data"]
    assert job_id in [d["id"] for d in dead]
    reply = crash.http.post(f"/v1/dead-letters/{job_id}/requeue")
    assert reply.status_code == 202, reply.text
    again = reply.json()
    assert again["requeued_from"] == job_id and again["id"] != job_id
    ready(crash)
    redone = final_job(crash, again["id"], 90)
    assert redone["status"] == "succeeded" and redone["requeued_from"] == job_id
    assert job_id not in [d["id"] for d in crash.http.get("/v1/dead-letters").json()["data"]]
    missing = crash.http.post(f"/v1/dead-letters/{job_id}/requeue")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"


# --- 3. time limits --------------------------------------------------------------------------

def test_a_job_past_its_deadline_fails_with_a_timeout_and_its_worker_takes_the_next(crash):
    ready(crash)
    job_id = crash.submit({**STORY, "max_tokens": 256, "timeout_s": 0.5})
    job = final_job(crash, job_id, 60)
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"
    assert "0.5s" in job["error"]["message"] and job["timeout_s"] == 0.5
    events = crash.stream(job_id)
    assert_one_clean_stream(events)
    assert job["finished_at"] - job["started_at"] < 30
    worker = next(e["worker"] for e in events if e["type"] == "started")
    # The worker let the job go: its next heartbeat no longer names it, and the next jobs run.
    def released():
        beat = json.loads(crash.redis.get(crash.keys.worker(worker)) or "{}")
        return beat.get("ts", 0) > job["finished_at"] and job_id not in beat["jobs"]
    wait_for(released, 10, "a heartbeat without the timed-out job")
    nxt = [crash.submit({**STORY, "max_tokens": 8}) for _ in range(2)]
    assert all(final_job(crash, j, 60)["status"] == "succeeded" for j in nxt)


def test_a_timeout_over_the_cap_is_refused_naming_the_field(crash):
    reply = crash.http.post("/v1/jobs", json={**STORY, "timeout_s": 10**6})
    assert reply.status_code == 422
    assert reply.json()["error"]["field"] == "timeout_s"


# --- 5. API restart, 6. idempotency -----------------------------------------------------------

def test_a_restarted_api_serves_every_job_and_stream_as_before(crash):
    ready(crash)
    done = crash.submit({**STORY, "max_tokens": 16}, **{"Idempotency-Key": "api-restart-1"})
    done_job = final_job(crash, done)
    running = crash.submit(STORY)
    follower = in_background(crash.follow, running)
    started_attempt(crash, running, 1, min_tokens_after=5)
    api = next(c for c in crash.supervisor.children if c.name == "api")
    os.kill(api.process.pid, signal.SIGKILL)
    ready(crash)  # the watchdog restarted it

    assert final_job(crash, done) == done_job
    assert crash.follow(done) == crash.stream(done)
    events = follower.result(timeout=90)  # resumed with Last-Event-ID across the restart
    job = final_job(crash, running)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert_one_clean_stream(events, job["result"]["text"])
    replay = crash.http.post("/v1/jobs", json={**STORY, "max_tokens": 16},
                             headers={"Idempotency-Key": "api-restart-1"})
    assert replay.status_code == 202 and replay.json()["id"] == done


def test_an_openai_batch_survives_a_killed_worker_and_a_restarted_api(crash):
    """OpenAI's Batch API on native batches: a worker SIGKILLed mid-batch and the API killed
    and restarted; every custom_id is answered exactly once, all succeeded."""
    ready(crash)
    client = openai.OpenAI(base_url=f"{crash.url}/v1", api_key="unused", max_retries=5,
                           timeout=60)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "chat", "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Tell story {i}."}]}}
             for i in range(100)]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = client.files.create(file=("in.jsonl", body), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    job_ids = [json.loads(raw)["job"] for raw in
               crash.redis.lrange(crash.keys.batch_items(batch.id), 0, -1)]
    first = wait_for(lambda: next((crash.stream(j)[1] for j in job_ids
                                   if len(crash.stream(j)) > 5), None), 90, "a running item")
    os.kill(pid_of(first["worker"]), signal.SIGKILL)
    api = next(c for c in crash.supervisor.children if c.name == "api")
    os.kill(api.process.pid, signal.SIGKILL)
    ready(crash)
    deadline = time.monotonic() + 300
    while (done := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline and done.status == "in_progress", done.status
        time.sleep(0.5)
    assert done.request_counts.completed == 100 and done.error_file_id is None
    out = [json.loads(line) for line in client.files.content(done.output_file_id).text
           .splitlines()]
    assert sorted(line["custom_id"] for line in out) == sorted(f"r{i}" for i in range(100))
    requeued = [j for j in job_ids if any(e["type"] == "requeued" for e in crash.stream(j))]
    assert requeued  # the killed worker's items went on elsewhere
    for line in out:
        job = final_job(crash, line["response"]["request_id"])
        message = line["response"]["body"]["choices"][0]["message"]
        assert message["content"] == job["result"]["text"]


def test_concurrent_retries_of_one_post_run_the_job_exactly_once(crash):
    ready(crash)
    body = {**STORY, "max_tokens": 24}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: crash.http.post(
            "/v1/jobs", json=body, headers={"Idempotency-Key": "exactly-once-1"}), range(8)))
    assert {r.status_code for r in replies} == {202}
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 1
    job_id = ids.pop()
    job = final_job(crash, job_id)
    events = crash.stream(job_id)
    assert job["attempts"] == 1 and [e["type"] for e in events].count("started") == 1
    assert_one_clean_stream(events, job["result"]["text"])


# --- 7. slow and vanished subscribers ---------------------------------------------------------

def blocked_api_reads(stack):
    """The API's Redis connections blocked in XREAD: its followers share one."""
    return sum(c.get("name") == "tokenpool-api" and "b" in c.get("flags", "")
               for c in stack.redis.client_list())


def api_followers(stack):
    """The event streams the API is serving, from its own gauge in /metrics."""
    for line in stack.http.get("/metrics").text.splitlines():
        if line.startswith("tokenpool_api_sse_followers "):
            return float(line.split()[1])
    raise AssertionError("no tokenpool_api_sse_followers in /metrics")


def test_slow_subscribers_never_hold_up_the_worker_or_the_others(crash):
    ready(crash)
    job_id = crash.submit({**STORY, "max_tokens": 96})
    # A raw pub/sub subscriber that never reads a byte.
    mute = socket.create_connection(("127.0.0.1", crash.redis_server.port))
    channel = crash.keys.channel(job_id).encode()
    mute.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel))
    slow_events = []

    def slow_reader():  # an SSE client that takes a tenth of a second per event
        with httpx.Client(base_url=crash.url, timeout=60) as http, \
                http.stream("GET", f"/v1/jobs/{job_id}/events") as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    slow_events.append(json.loads(line[6:]))
                    time.sleep(0.1)
                    if slow_events[-1]["type"] in FINAL:
                        return

    slow = in_background(slow_reader)
    fast = crash.follow(job_id)
    job = final_job(crash, job_id)
    assert job["status"] == "succeeded"
    assert_one_clean_stream(fast, job["result"]["text"])
    # The job ended while the slow reader was still far behind: nobody waited for it.
    assert len(slow_events) < len(fast)
    slow.result(timeout=60)
    assert slow_events == fast
    mute.close()
    # An ended job's keys expire: nothing is kept forever.
    assert 0 < crash.redis.ttl(crash.keys.job(job_id)) <= 86_400
    assert 0 < crash.redis.ttl(crash.keys.events(job_id)) <= 86_400


def test_vanished_followers_are_noticed_and_share_one_redis_read(crash):
    job_id = crash.submit({"kind": "generate", "model": "idle", "prompt": "Hi"})  # stays queued
    baseline = api_followers(crash)
    clients = [httpx.Client(base_url=crash.url, timeout=30) for _ in range(20)]
    streams = [c.stream("GET", f"/v1/jobs/{job_id}/events") for c in clients]
    for stream in streams:
        assert stream.__enter__().status_code == 200
    wait_for(lambda: api_followers(crash) >= baseline + 20, 15, "20 followers")
    assert blocked_api_reads(crash) <= 1  # all of them wait on one shared XREAD
    idle = next(m for m in crash.http.get("/v1/models").json()["data"] if m["id"] == "idle")
    assert idle["queue_depth"] == 1 and idle["running"] == 0
    for client in clients:  # gone without a goodbye: sockets closed mid-stream
        client.close()
    wait_for(lambda: api_followers(crash) <= baseline, 15, "the followers to be let go")
    assert crash.http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert 0 < crash.redis.ttl(crash.keys.job(job_id)) <= 86_400


# --- 8. load ---------------------------------------------------------------------------------

async def _follow_raw(client, job_id):
    texts, seqs = [], []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as reply:
        assert reply.status_code == 200, (reply.status_code, await reply.aread())
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seqs.append(event["seq"])
                if event["type"] == "token":
                    texts.append(event["text"])
                if event["type"] in FINAL:
                    break
    return "".join(texts), seqs


@pytest.mark.slow
def test_two_hundred_followers_of_one_job_all_receive_every_token(crash):
    ready(crash)
    job_id = crash.submit({**STORY, "max_tokens": 128})

    async def follow_all():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=crash.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_follow_raw(client, job_id) for _ in range(200)))

    results = asyncio.run(follow_all())
    text = final_job(crash, job_id)["result"]["text"]
    assert len(results) == 200
    for got, seqs in results:
        assert got == text and seqs == list(range(len(seqs)))


@pytest.mark.slow
def test_a_thousand_small_jobs_all_complete_once(crash):
    ready(crash)

    async def submit(client, i):
        # As a careful client does on a busy box: retry a dropped connection with the same
        # Idempotency-Key, so a retry can never make a second job.
        body = {"kind": "generate", "prompt": f"Item {i}:", "max_tokens": 2}
        for attempt in range(5):
            try:
                return await client.post("/v1/jobs", json=body,
                                         headers={"Idempotency-Key": f"load-{i}"})
            except httpx.TransportError:
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError(f"job {i}: the API kept dropping the connection")

    async def submit_all():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=crash.url, timeout=120, limits=limits) as client:
            replies = await asyncio.gather(*(submit(client, i) for i in range(1000)))
        assert all(r.status_code == 202 for r in replies)
        return [r.json()["id"] for r in replies]

    ids = asyncio.run(submit_all())
    assert len(set(ids)) == 1000
    wait_for(lambda: _all_ended(crash, ids), 600, "a thousand jobs to end")
    for job_id in ids:
        events = crash.stream(job_id)
        record = crash.redis.hmget(crash.keys.job(job_id), "status", "attempts")
        assert record == [b"succeeded", b"1"], (job_id, record)
        assert [e["type"] for e in events].count("started") == 1  # executed exactly once
        assert_one_clean_stream(events)


def _all_ended(stack, ids):
    time.sleep(0.5)
    pipe = stack.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(stack.keys.job(job_id), "status")
    return all(status in (b"succeeded", b"failed") for status in pipe.execute())


# --- 4. Redis restart (last: the others need not wait for it) ---------------------------------

def test_every_accepted_job_ends_after_a_redis_restart_and_followers_resume(crash):
    ready(crash)
    ids = [crash.submit({**STORY, "max_tokens": 48, "prompt": f"Story {i}: once upon a time"})
           for i in range(5)]
    followers = [in_background(crash.follow, j, 240) for j in ids]
    started_attempt(crash, ids[0], 1, min_tokens_after=5)

    server = crash.redis_server
    server.stop()  # SIGTERM: redis-server fsyncs its AOF and exits
    time.sleep(3)  # longer than the heartbeat TTL: every heartbeat key is stale on return
    server.start()

    for job_id, follower in zip(ids, followers, strict=True):
        events = follower.result(timeout=240)
        job = final_job(crash, job_id, 120)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job  # none judged lost
        assert_one_clean_stream(events, job["result"]["text"])
        assert events == crash.stream(job_id)
    # The API and the workers reconnected by themselves: a new job runs.
    assert final_job(crash, crash.submit({**STORY, "max_tokens": 8}))["status"] == "succeeded"
