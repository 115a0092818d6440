"""The least-privilege ACL users of broker/acl.py, on a real redis-server: an API and a worker
logged in as them run jobs end to end (submit, follow, cancel, fleet, metrics, a hot-swap's
control reply), and what they must not do is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker.acl import api_rules, worker_rules
from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import Supervisor, tokenpool_argv
from tests.conftest import chat_only_config, follow, stack_env, wait_ready

PREFIX = "tpacl"
ADMIN_PASSWORD, API_PASSWORD, WORKER_PASSWORD = "admin-pw", "api-pw", "worker-pw"
CONFIG = chat_only_config(PREFIX)


@pytest.fixture(scope="module")
def acl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EmbeddedRedis]]:
    base = tmp_path_factory.mktemp("acl")
    server = EmbeddedRedis(base / "redis", appendonly=False, password=ADMIN_PASSWORD).start()
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "tp-api", *api_rules(PREFIX), f">{API_PASSWORD}")
    admin.execute_command("ACL", "SETUSER", "tp-worker", *worker_rules(PREFIX),
                          f">{WORKER_PASSWORD}")
    config = base / "tokenpool.toml"
    config.write_text(CONFIG)
    port = free_port()
    sup = Supervisor(env=stack_env("", config), log_dir=base / "logs", restart_delay_s=0.2)
    sup.add("worker", tokenpool_argv("worker", "--model", "chat", "--gpu", "cpu"),
            {"REDIS_URL": url_as(server, "tp-worker", WORKER_PASSWORD)})
    sup.add("api", tokenpool_argv("api", "--port", str(port)),
            {"REDIS_URL": url_as(server, "tp-api", API_PASSWORD)})
    sup.start()
    api = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=api, timeout=30) as http:
            wait_ready(http, sup, timeout_s=120)
        yield api, server
    finally:
        sup.stop()
        admin.close()
        server.stop()
        assert_no_permission_errors(base / "logs")


def url_as(server: EmbeddedRedis, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def assert_no_permission_errors(logs: Path) -> None:
    for log in logs.glob("*.log"):
        text = log.read_text()
        assert "NOPERM" not in text and "NoPermission" not in text, (log.name, text[-2000:])


def test_an_api_and_a_worker_with_the_documented_acl_users_run_jobs_end_to_end(acl_stack):
    api, _ = acl_stack
    with httpx.Client(base_url=api, timeout=60) as http:
        job = http.post("/v1/jobs", json={"kind": "generate", "prompt": "Once upon a time",
                                          "max_tokens": 12, "temperature": 0})
        assert job.status_code == 202, job.text
        events = follow(api, job.json()["id"])
        record = http.get(f"/v1/jobs/{job.json()['id']}").json()
        assert record["status"] == "succeeded"
        assert "".join(e["text"] for e in events if e["type"] == "token") == \
            record["result"]["text"]
        queued = http.post("/v1/jobs", json={"kind": "generate", "prompt": "x",
                                              "model": "chat", "max_tokens": 32})
        assert http.delete(f"/v1/jobs/{queued.json()['id']}").status_code in (200, 202)
        assert follow(api, queued.json()["id"])[-1]["type"] == "cancelled"
        assert http.get("/metrics").status_code == 200
        (worker,) = http.get("/v1/workers").json()["data"]
        # Unload, then load again: Celery's remote control (cancel_consumer, add_consumer)
        # and its reply lists, under the worker's user.
        name = worker["name"]
        for action, body, want in (("unload", None, {"parked": True}),
                                   ("model", {"model": "chat"}, {"state": "loaded"})):
            reply = http.post(f"/v1/workers/{name}/{action}", json=body)
            assert reply.status_code == 202, reply.text
            deadline = time.monotonic() + 60
            while True:
                now = http.get(f"/v1/workers/{name}").json()
                if now["swap"] is None and all(now[k] == v for k, v in want.items()):
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.3)
        assert now["consuming"] is True
        again = http.post("/v1/jobs", json={"kind": "generate", "prompt": "Again",
                                            "max_tokens": 4})
        assert follow(api, again.json()["id"])[-1]["type"] == "done"


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"), ("SHUTDOWN",),
    ("REPLICAOF", "NO", "ONE"), ("SET", "someone-else:key", "1"), ("GET", "session:42"),
])
def test_the_api_user_may_not_touch_other_keys_or_run_dangerous_commands(acl_stack, command):
    _, server = acl_stack
    with redis.Redis.from_url(url_as(server, "tp-api", API_PASSWORD)) as client:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
        assert client.set(f"{PREFIX}:probe", "1")  # its own keys it may write


def test_only_the_worker_user_may_read_info_for_the_reaper(acl_stack):
    _, server = acl_stack
    with redis.Redis.from_url(url_as(server, "tp-worker", WORKER_PASSWORD)) as worker:
        assert worker.info("server")["run_id"]
    with (redis.Redis.from_url(url_as(server, "tp-api", API_PASSWORD)) as api,
          pytest.raises(redis.exceptions.NoPermissionError)):
        api.info("server")
