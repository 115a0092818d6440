"""Redis away, on real processes: every route's answer while it is down (503 with Retry-After,
never a 500), jobs running through an outage longer than worker_redis_retry_s, and a worker
that starts while Redis is down. Its own AOF redis-server, stopped and started by the tests."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from api.app import create_app
from broker.apikeys import KeyStore
from broker.keys import Keys
from broker.redis_server import EmbeddedRedis
from broker.settings import Settings
from cli.supervisor import tokenpool_argv
from tests.conftest import Stack, running_stack

PREFIX = "tpoutage"
RETRY_S = 3
CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
timeout_grace_s = 2
sse_keepalive_s = 1
visibility_timeout_s = 10
worker_redis_retry_s = {RETRY_S}
[models.chat]
n_ctx = 1024
max_tokens = 256
[models.late]  # served only by the worker that starts while Redis is down
kind = "llm"
source = "bundled:gemma3-270m"
n_ctx = 512
max_tokens = 16
n_threads = 1
[models.summary]
enabled = false
[models.embed]
enabled = false
"""
STORY = {"kind": "generate", "max_tokens": 96, "temperature": 0, "repeat_penalty": 1.0}
JOB = "0" * 32
BODIES = {
    "/v1/jobs": {"kind": "generate", "prompt": "Hi", "max_tokens": 4},
    "/v1/jobs/batch": {"jobs": [{"kind": "generate", "prompt": "Hi", "max_tokens": 4}]},
    "/v1/batches": {"kind": "summarize", "model": "chat", "items": [{"id": "a", "text": "Hi"}],
                    "options": {"max_tokens": 4}},
    "/v1/chat/completions": {"model": "chat", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": "chat", "prompt": "Hi", "max_tokens": 4},
    "/v1/embeddings": {"model": "chat", "input": "Hi"},
    "/v1/responses": {"model": "chat", "input": "Hi", "max_output_tokens": 4},
    "/v1/workers/{name}/model": {"model": "chat"},
}


def chat_ready(http: httpx.Client) -> bool:
    try:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return False
    return any(w["state"] == "loaded" for w in models["chat"]["workers"])


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # `always`: these tests SIGKILL Redis and expect every accepted job back; under `everysec`
    # a busy disk lets Redis postpone AOF writes and lose the newest jobs whole (documented;
    # tests/e2e/test_up_redis.py makes that loss on purpose).
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-outage"), appendonly=True,
                           appendfsync="always").start()
    config = tmp_path_factory.mktemp("outage-config") / "tokenpool.toml"
    config.write_text(CONFIG)
    try:
        with running_stack(server.url, config, tmp_path_factory.mktemp("outage-logs"),
                           {"chat": "chat"}, PREFIX, ready=chat_ready) as stack:
            stack.redis_server = server  # type: ignore[attr-defined]
            yield stack
    finally:
        server.stop()


def down(stack: Stack) -> EmbeddedRedis:
    server: EmbeddedRedis = stack.redis_server  # type: ignore[attr-defined]
    assert server.process is not None
    server.process.kill()  # SIGKILL, as the OOM killer would
    server.process.wait()
    return server


def walk_routes(stack: Stack, headers: dict[str, str]) -> dict[str, tuple[int, dict, dict]]:
    """Every route of the app's own table, each method, with a plausible request."""
    app = create_app(Settings(key_prefix=PREFIX), "redis://unused")
    answers = {}
    for route in app.routes:
        for method in sorted(set(route.methods or ()) - {"HEAD"}):
            path = route.path.format(job_id=JOB, batch_id=JOB, name="chat-cpu-1@host",
                                     response_id=f"resp_{JOB}", delivery_id=f"msg_{JOB}_0",
                                     file_id=f"file-{JOB}")
            body = BODIES.get(route.path) if method == "POST" else None
            upload = {"files": {"file": ("in.jsonl", b"{}\n")}, "data": {"purpose": "batch"}} \
                if (method, route.path) == ("POST", "/v1/files") else {"json": body}
            reply = stack.http.request(method, path, headers=headers, timeout=30, **upload)
            try:
                payload = reply.json()
            except json.JSONDecodeError:
                payload = {"raw": reply.text[:200]}
            answers[f"{method} {route.path}"] = (reply.status_code, dict(reply.headers), payload)
    return answers


# Routes that need no Redis once the request is let in (the API looks for keys every 2 s, so
# right after Redis goes away the last answer, "no keys", still stands).
NO_REDIS = {"GET /health", "GET /openapi.json", "GET /v1/usage"}


def assert_unavailable(answers: dict[str, tuple[int, dict, dict]], refused: bool = False
                       ) -> None:
    """503 with Retry-After and the error body; or, for a request with no key where keys
    exist (`refused`), a 401 from the last look at the keys: never a 500, nobody let in."""
    print({name: status for name, (status, _, _) in answers.items()})
    assert answers["GET /health"][0] == 200
    for name, (status, headers, body) in answers.items():
        if (name in NO_REDIS and status == 200 and not refused) or name == "GET /health":
            continue
        if refused and status == 401:
            continue
        assert status == 503, (name, status, body)
        assert int(headers.get("retry-after", 0)) > 0, (name, headers, body)
        assert body["error"]["type"] == "unavailable", (name, body)


def test_every_route_answers_503_with_retry_after_while_redis_is_down_keys_or_not(outage):
    server = down(outage)
    try:
        assert_unavailable(walk_routes(outage, {}))
    finally:
        server.restart()
    store = KeyStore(redis.Redis.from_url(server.url), Keys(PREFIX))
    key, token = store.create("outage-test")
    try:
        time.sleep(2.5)  # the API notices keys exist (it looks every 2 s)
        assert outage.http.get("/v1/models").status_code == 401
        assert outage.http.get("/v1/models", headers={"Authorization": f"Bearer {token}"}
                               ).status_code == 200
        down(outage)
        try:
            assert_unavailable(walk_routes(outage, {}), refused=True)  # never let in
            assert_unavailable(walk_routes(outage, {"Authorization": f"Bearer {token}"}))
        finally:
            server.restart()
    finally:
        store.redis.delete(Keys(PREFIX).api_keys(), Keys(PREFIX).api_key(key.id))  # no keys
        store.redis.close()
    time.sleep(2.5)
    assert outage.http.get("/v1/models").status_code == 200


def follow_all(stack: Stack, ids: list[str]) -> list:
    pool = ThreadPoolExecutor(len(ids))
    futures = [pool.submit(stack.follow, job_id, 240) for job_id in ids]
    pool.shutdown(wait=False)
    return futures


def assert_succeeded_with_whole_streams(stack: Stack, ids: list[str], followers: list) -> None:
    for job_id, follower in zip(ids, followers, strict=True):
        events = follower.result(timeout=240)
        job = stack.wait_final(job_id, 120)
        assert job["status"] == "succeeded", job
        assert [e["seq"] for e in events] == list(range(len(events)))
        text = "".join(e["text"] for e in events if e["type"] == "token")
        assert text == job["result"]["text"]
        assert events == stack.stream(job_id)


def test_jobs_running_through_an_outage_longer_than_the_worker_retry_all_succeed(outage):
    ids = [outage.submit({**STORY, "prompt": f"Tale {i}: long ago"}) for i in range(3)]
    followers = follow_all(outage, ids)
    deadline = time.monotonic() + 60
    while sum(e["type"] == "token" for e in outage.stream(ids[-1])) < 3:
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.05)
    server = down(outage)
    time.sleep(RETRY_S + 3)  # every worker write gives up meanwhile
    server.restart()
    assert_succeeded_with_whole_streams(outage, ids, followers)
    worker = outage.supervisor.children[0]
    assert worker.alive() and worker.restarts == 0  # the worker rode it out
    assert outage.wait_final(outage.submit({**STORY, "prompt": "Then", "max_tokens": 4}))[
        "status"] == "succeeded"


def test_a_worker_started_while_redis_is_down_loads_and_serves_once_it_is_back(outage):
    server = down(outage)
    late = outage.supervisor.add("late", tokenpool_argv("worker", "--model", "late",
                                                        "--gpu", "cpu"))
    late.start(outage.supervisor.env)
    time.sleep(RETRY_S + 5)  # it loads its model meanwhile, and its writes give up
    assert late.alive()
    server.restart()
    job_id = outage.submit({**STORY, "model": "late", "prompt": "Late", "max_tokens": 8})
    job = outage.wait_final(job_id, 120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    states = {w["name"]: w["state"] for w in outage.http.get("/v1/workers").json()["data"]
              if w["model"] == "late"}
    assert list(states.values()) in (["loaded"], ["generating"]), states  # as of its last beat
    log = (outage.supervisor.log_dir / "late.log").read_text()
    assert "Traceback" not in log, log[-3000:]
