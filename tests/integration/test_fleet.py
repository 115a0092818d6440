"""The fleet on real worker processes: heartbeats, model states, hot-swap, unload, keep-alive,
a swap refused for memory, a worker gone, and /metrics counting what ran."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.redis_server import EmbeddedRedis
from tests.conftest import Stack, running_stack

PREFIX = "tpfleet"
CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
sse_keepalive_s = 1
worker_gone_retention_s = 120
[models.chat]
n_ctx = 512
max_tokens = 256
max_batch = 4
[models.summary]
n_ctx = 512
max_tokens = 128
max_batch = 4
[models.embed]
keep_alive_s = 2
"""
LOW_MEMORY_MB = 50


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("fleet") / "tokenpool.toml"
    config.write_text(CONFIG)
    workers = {"w-swap": "chat", "w-summary": "summary", "w-embed": "embed"}

    def three_live(http: httpx.Client) -> bool:
        """Three live workers that have each loaded their model once ("idle" alone is also the
        state before the first load; the embed worker may be idle again after keep_alive_s)."""
        data = http.get("/v1/workers").json()["data"]
        return sum(w["live"] and ["loading", "loaded"] in [t[1:] for t in w["transitions"]]
                   for w in data) == 3

    with running_stack(redis_server.url, config, tmp_path_factory.mktemp("fleet-logs"),
                       workers, prefix=PREFIX, ready=three_live,
                       env={"w-embed": {"TOKENPOOL_WORKER_MEMORY_LIMIT_MB":
                                        str(LOW_MEMORY_MB)}}) as stack:
        yield stack


def worker(stack: Stack, model: str, live: bool = True) -> dict[str, Any]:
    """The worker started for `model` (they are named <model>-cpu-<pid>@host)."""
    for w in stack.http.get("/v1/workers").json()["data"]:
        if w["name"].startswith(f"{model}-cpu-") and w["live"] == live:
            return dict(w)
    raise AssertionError(f"no {'live' if live else 'gone'} worker for {model}")


def beat_of(stack: Stack, name: str) -> dict[str, Any]:
    reply = stack.http.get(f"/v1/workers/{name}")
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def wait_beat(stack: Stack, name: str, check: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        beat = beat_of(stack, name)
        if check(beat):
            return beat
        assert time.monotonic() < deadline, f"worker {name} never got there: {beat}"
        time.sleep(0.2)


def test_heartbeats_carry_identity_model_state_and_memory(fleet: Stack) -> None:
    beat = beat_of(fleet, worker(fleet, "chat")["name"])
    assert beat["host"] == socket.gethostname()
    process = psutil.Process(beat["pid"])
    assert "worker" in process.cmdline()
    assert beat["model"] == "chat" and beat["kind"] == "llm" and beat["queue"] == "tpfleet.chat"
    assert beat["gpu"] == "cpu" and beat["device"] == "cpu"
    assert beat["state"] in ("loaded", "generating")
    # Gemma's weights and KV cache sit in this process.
    assert 100 * 2**20 < beat["rss_bytes"] < beat["host_memory_total_bytes"]
    assert 0 < beat["host_memory_available_bytes"] <= beat["host_memory_total_bytes"]
    assert [t[1:] for t in beat["transitions"][:2]] == [["idle", "loading"], ["loading", "loaded"]]
    assert isinstance(beat["jobs_done"], int) and beat["tokens_per_s"] >= 0
    assert time.time() - beat["ts"] < 3


def test_a_job_moves_the_worker_to_generating_and_back(fleet: Stack) -> None:
    name = worker(fleet, "chat")["name"]
    job_id = fleet.submit({"kind": "generate", "prompt": "Count: one, two,", "max_tokens": 80,
                           "temperature": 0})
    seen = wait_beat(fleet, name, lambda b: b["state"] == "generating")
    assert job_id in seen["jobs"]
    job = fleet.wait_final(job_id)
    beat = wait_beat(fleet, name, lambda b: b["state"] == "loaded")
    moves = [(ts, old, new) for ts, old, new in beat["transitions"]]
    generating = [ts for ts, old, new in moves if (old, new) == ("loaded", "generating")]
    back = [ts for ts, old, new in moves if (old, new) == ("generating", "loaded")]
    assert any(job["started_at"] - 1 <= ts <= job["finished_at"] for ts in generating)
    assert any(ts >= job["finished_at"] - 1 for ts in back)
    assert beat["jobs_done"] >= 1


def follow_in_thread(stack: Stack, job_id: str) -> tuple[threading.Thread, list[Any]]:
    """Follow in the background; a failure shows up as a missing final event, not as an
    exception in a thread (which pytest would pin on a later test)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.extend(stack.follow(job_id, timeout_s=120))
        except AssertionError as exc:
            out.append({"type": "follow_failed", "error": str(exc)})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_worker_swaps_to_summary_and_back_while_a_follower_streams_and_loses_nothing(
    fleet: Stack,
) -> None:
    name = worker(fleet, "chat")["name"]
    long_job = fleet.submit({"kind": "generate", "prompt": "Write a story about a ship:",
                             "max_tokens": 150, "temperature": 0.7, "seed": 3})
    thread, events = follow_in_thread(fleet, long_job)
    wait_beat(fleet, name, lambda b: long_job in b["jobs"])
    reply = fleet.http.post(f"/v1/workers/{name}/model", json={"model": "summary"})
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"worker": name, "accepted": True, "from": "chat", "to": "summary"}
    waiting_chat = fleet.submit({"kind": "generate", "prompt": "Hello", "max_tokens": 8})
    swapped = wait_beat(fleet, name, lambda b: b["model"] == "summary" and b["state"] == "loaded"
                        and b["swap"] is None)
    assert swapped["queue"] == "tpfleet.summary"
    thread.join(60)
    assert events[-1]["type"] == "done" and fleet.job(long_job)["status"] == "succeeded"
    assert "".join(e["text"] for e in events if e["type"] == "token") == \
        fleet.job(long_job)["result"]["text"]
    states = [t[2] for t in swapped["transitions"]]
    assert states[-4:] == ["unloading", "idle", "loading", "loaded"]
    assert fleet.job(waiting_chat)["status"] == "queued"  # nobody serves chat now
    # Park the other summary worker so these summaries can only run on the swapped one.
    others = [w["name"] for w in fleet.http.get("/v1/workers").json()["data"]
              if w["live"] and w["model"] == "summary" and w["name"] != name]
    for other in others:
        assert fleet.http.post(f"/v1/workers/{other}/unload").status_code == 202
        wait_beat(fleet, other, lambda b: b["parked"] and not b["consuming"])
    summaries = [fleet.submit({"kind": "summarize", "text": f"Note {i}: the ship sails at dawn "
                               "and returns at dusk.", "max_tokens": 16}) for i in range(4)]
    assert all(fleet.wait_final(j)["status"] == "succeeded" for j in summaries)
    assert {fleet.job(j)["worker"] for j in summaries} == {name}
    for other in others:
        assert fleet.http.post(f"/v1/workers/{other}/model",
                               json={"model": "summary"}).status_code == 202
        wait_beat(fleet, other, lambda b: b["consuming"] and b["state"] == "loaded")
    back = fleet.http.post(f"/v1/workers/{name}/model", json={"model": "chat"})
    assert back.status_code == 202, back.text
    assert fleet.wait_final(waiting_chat)["status"] == "succeeded"
    assert fleet.job(waiting_chat)["worker"] == name
    wait_beat(fleet, name, lambda b: b["model"] == "chat" and b["swap"] is None)


def test_a_swap_with_requeue_hands_running_jobs_back_and_they_finish_after(
    fleet: Stack,
) -> None:
    name = worker(fleet, "chat")["name"]
    job_id = fleet.submit({"kind": "generate", "prompt": "A long list of fruits:",
                           "max_tokens": 200, "temperature": 0})
    thread, events = follow_in_thread(fleet, job_id)
    wait_beat(fleet, name, lambda b: job_id in b["jobs"])
    reply = fleet.http.post(f"/v1/workers/{name}/model",
                            json={"model": "summary", "requeue": True})
    assert reply.status_code == 202, reply.text
    wait_beat(fleet, name, lambda b: b["model"] == "summary" and b["swap"] is None)
    assert fleet.job(job_id)["status"] == "queued"  # handed back, waiting for a chat worker
    assert fleet.http.post(f"/v1/workers/{name}/model",
                           json={"model": "chat"}).status_code == 202
    thread.join(90)
    job = fleet.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert "requeued" in [e["type"] for e in events]
    assert "".join(e["text"] for e in events if e["type"] == "token") == job["result"]["text"]


def test_a_swap_that_does_not_fit_is_refused_and_the_old_model_stays(fleet: Stack) -> None:
    name = worker(fleet, "embed")["name"]
    reply = fleet.http.post(f"/v1/workers/{name}/model", json={"model": "chat"})
    assert reply.status_code == 409, reply.text
    error = reply.json()["error"]
    assert error["type"] == "insufficient_memory" and error["field"] == "model"
    assert f"worker_memory_limit_mb {LOW_MEMORY_MB}" in error["message"]
    assert "keeping 'embed'" in error["message"]
    job = fleet.wait_final(fleet.submit({"kind": "embed", "texts": ["still here"]}))
    assert job["status"] == "succeeded" and job["worker"] == name
    assert beat_of(fleet, name)["model"] == "embed"


def test_bad_control_requests_name_the_field(fleet: Stack) -> None:
    name = worker(fleet, "chat")["name"]
    unknown = fleet.http.post(f"/v1/workers/{name}/model", json={"model": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "model"
    missing = fleet.http.post("/v1/workers/nobody@nowhere/model", json={"model": "chat"})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "name"
    extra = fleet.http.post(f"/v1/workers/{name}/model", json={"model": "chat", "x": 1})
    assert extra.status_code == 422 and extra.json()["error"]["field"] == "x"


def test_keep_alive_unloads_an_idle_model_and_the_next_job_loads_it(fleet: Stack) -> None:
    name = worker(fleet, "embed")["name"]
    fleet.wait_final(fleet.submit({"kind": "embed", "texts": ["warm"]}))
    idle = wait_beat(fleet, name, lambda b: b["state"] == "idle", timeout_s=20)
    assert ["loaded", "unloading"] in [t[1:] for t in idle["transitions"]]
    job = fleet.wait_final(fleet.submit({"kind": "embed", "texts": ["wake up"]}))
    assert job["status"] == "succeeded" and len(job["result"]["embeddings"][0]) == 384
    woke = beat_of(fleet, name)
    assert ["idle", "loading"] in [t[1:] for t in woke["transitions"][-4:]]


def test_unload_frees_the_model_and_a_load_brings_it_back(fleet: Stack) -> None:
    name = worker(fleet, "summary")["name"]
    before = beat_of(fleet, name)["rss_bytes"]
    assert fleet.http.post(f"/v1/workers/{name}/unload").status_code == 202
    parked = wait_beat(fleet, name, lambda b: b["parked"] and b["state"] == "idle")
    assert not parked["consuming"] and parked["rss_bytes"] < before
    assert fleet.http.post(f"/v1/workers/{name}/model",
                           json={"model": "summary"}).status_code == 202
    wait_beat(fleet, name, lambda b: b["state"] == "loaded" and b["consuming"])


def samples(stack: Stack) -> dict[str, list[Any]]:
    text = stack.http.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_count_the_jobs_that_ran(fleet: Stack) -> None:
    ran = [fleet.submit({"kind": "generate", "prompt": f"Item {i}:", "max_tokens": 5})
           for i in range(3)]
    assert all(fleet.wait_final(j)["status"] == "succeeded" for j in ran)
    succeeded = [k for k in fleet.redis.scan_iter(match=f"{PREFIX}:job:*")
                 if k.count(b":") == 2 and fleet.redis.hget(k, "status") == b"succeeded"
                 and fleet.redis.hget(k, "kind") == b"generate"
                 and fleet.redis.hget(k, "model") == b"chat"]
    found = samples(fleet)
    jobs = {tuple(sorted(s.labels.items())): s.value for s in found["tokenpool_jobs"]}
    key = (("kind", "generate"), ("model", "chat"), ("status", "succeeded"))
    assert jobs[key] == len(succeeded) >= 3
    ttft = {s.name: s.value for s in found["tokenpool_job_time_to_first_token_seconds"]
            if s.labels.get("model") == "chat"}
    assert ttft["tokenpool_job_time_to_first_token_seconds_count"] == len(succeeded)
    buckets = [s.value for s in found["tokenpool_job_time_to_first_token_seconds"]
               if s.name.endswith("_bucket") and s.labels["model"] == "chat"]
    assert buckets == sorted(buckets) and buckets[-1] == len(succeeded)
    depth = {s.labels["model"]: s.value for s in found["tokenpool_queue_depth"]}
    assert set(depth) == {"chat", "summary", "embed"}
    current = [s for s in found["tokenpool_worker_state"] if s.value == 1]
    assert len(current) == 3
    tokens = {s.labels["model"]: s.value for s in found["tokenpool_generated_tokens"]}
    assert tokens["chat"] >= 15


def test_a_killed_worker_is_shown_gone_within_seconds(fleet: Stack) -> None:
    beat = worker(fleet, "embed")
    os.kill(beat["pid"], signal.SIGKILL)
    started = time.monotonic()
    gone = wait_gone(fleet, beat["name"])
    assert time.monotonic() - started < 6
    assert gone["state"] == "gone" and gone["model"] == "embed"
    metrics = samples(fleet)
    up = {s.labels["worker"]: s.value for s in metrics["tokenpool_worker_up"]}
    assert up[beat["name"]] == 0


def wait_gone(stack: Stack, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        beat = beat_of(stack, name)
        if not beat["live"]:
            return beat
        time.sleep(0.2)
    raise AssertionError(f"{name} still live")


def test_the_grafana_dashboard_only_queries_metrics_we_export(fleet: Stack) -> None:
    import json
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "grafana" /
                            "tokenpool-dashboard.json").read_text())
    exported = set(samples(fleet))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in exprs:
        for name in re.findall(r"tokenpool_[a-z_]+", expr):
            base = re.sub(r"_(bucket|total|count|sum)$", "", name)
            assert base in exported, f"{name} in the dashboard is not exported"
