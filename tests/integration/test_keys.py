"""API keys on a real stack of its own: open until a key exists, then bearer tokens only,
each key seeing only its own jobs and batches; the OpenAI client's api_key works; a bind
beyond loopback without keys is refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from api.app import create_app
from broker.redis_server import EmbeddedRedis, free_port
from broker.settings import Settings
from cli.supervisor import tokenpool_argv
from tests.conftest import Stack, running_stack, stack_env

PREFIX = "tpkeys"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "tokenpool.toml"
    path.write_text(f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 3
[models.chat]
n_ctx = 512
max_tokens = 64
[models.summary]
enabled = false
[models.embed2]  # configured, never served: a key limited to `embed` must not reach it
kind = "embedding"
source = "bundled:all-minilm-l6-v2"
""")
    return path


@pytest.fixture(scope="module")
def open_stack(redis_server: EmbeddedRedis, config: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def live(http: httpx.Client) -> bool:
        missing = http.get("/ready").json().get("missing_workers", ["embed"])
        return "embed" not in missing and "chat" not in missing

    with running_stack(redis_server.url, config, tmp_path_factory.mktemp("keys-logs"),
                       {"w-embed": "embed", "w-chat": "chat"}, prefix=PREFIX,
                       ready=live) as stack:
        yield stack


def keys_cli(redis_server: EmbeddedRedis, config: Path, *args: str,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tokenpool_argv("keys", *args), capture_output=True, text=True,
                          env=stack_env(redis_server.url, config), timeout=60)


def test_without_keys_the_api_is_open_but_refuses_to_bind_beyond_loopback(
    open_stack: Stack, redis_server: EmbeddedRedis, config: Path,
) -> None:
    assert open_stack.http.get("/v1/models").status_code == 200
    env = stack_env(redis_server.url, config)
    refused = subprocess.run(tokenpool_argv("api", "--host", "0.0.0.0", "--port",
                                            str(free_port())),
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "refusing to serve 0.0.0.0 with no API key" in \
        " ".join(refused.stderr.split())
    port = free_port()
    proxied = subprocess.Popen(tokenpool_argv("api", "--host", "0.0.0.0", "--port", str(port)),
                               env={**env, "TOKENPOOL_BEHIND_TRUSTED_PROXY": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proxied.poll() is None
            time.sleep(0.3)
    finally:
        proxied.terminate()
        proxied.wait(15)


@pytest.fixture(scope="module")
def tokens(open_stack: Stack, redis_server: EmbeddedRedis, config: Path) -> dict[str, str]:
    made = {}
    for name, extra in (("alice", []), ("bob", ["--models", "embed", "--expires-in", "1d"])):
        run = keys_cli(redis_server, config, "create", name, *extra)
        assert run.returncode == 0, run.stderr
        made[name] = run.stdout.strip()
    time.sleep(2.5)  # the API re-checks "are there keys?" every 2 s
    return made


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_keys_are_stored_as_digests_and_listed_without_secrets(
    open_stack: Stack, tokens: dict[str, str], redis_server: EmbeddedRedis, config: Path,
) -> None:
    listed = json.loads(keys_cli(redis_server, config, "list", "--json").stdout)
    assert {k["name"] for k in listed} == {"alice", "bob"}
    bob = next(k for k in listed if k["name"] == "bob")
    assert bob["models"] == ["embed"] and bob["expires_at"] > time.time() + 80_000
    for token in tokens.values():
        _, key_id, secret = token.split("_", 2)
        stored = open_stack.redis.hgetall(f"{PREFIX}:apikey:{key_id}")
        assert stored[b"digest"].decode() == hashlib.sha256(secret.encode()).hexdigest()
        assert not any(secret.encode() in value for value in stored.values())
        assert secret not in json.dumps(listed)


def test_with_keys_every_route_but_health_wants_a_valid_bearer_token(
    open_stack: Stack, tokens: dict[str, str],
) -> None:
    http = open_stack.http
    assert http.get("/health").status_code == 200
    for headers in ({}, bearer("tp_000000000000_" + "x" * 43), {"Authorization": "Basic eA=="},
                    bearer(tokens["alice"] + "x")):
        reply = http.get("/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["field"] == "Authorization"
    assert http.get("/v1/models", headers=bearer(tokens["alice"])).status_code == 200


def test_a_key_sees_only_its_own_jobs_and_batches(open_stack: Stack,
                                                  tokens: dict[str, str]) -> None:
    http, alice, bob = open_stack.http, bearer(tokens["alice"]), bearer(tokens["bob"])
    job_id = http.post("/v1/jobs", json={"kind": "embed", "texts": ["mine"]},
                       headers=alice).json()["id"]
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                         ("GET", f"/v1/jobs/{job_id}/events")):
        assert http.request(method, path, headers=bob).status_code == 404
    assert http.get(f"/v1/jobs/{job_id}", headers=alice).status_code == 200
    batch = http.post("/v1/batches", headers=alice, json={
        "kind": "embed", "items": [{"id": "a", "text": "one"}]}).json()["id"]
    assert http.get(f"/v1/batches/{batch}", headers=bob).status_code == 404
    assert batch not in {b["id"] for b in http.get("/v1/batches", headers=bob).json()["data"]}
    assert http.get(f"/v1/batches/{batch}", headers=alice).status_code == 200


def test_a_key_sees_and_continues_only_its_own_responses(open_stack: Stack,
                                                         tokens: dict[str, str]) -> None:
    http, alice, bob = open_stack.http, bearer(tokens["alice"]), bearer(tokens["bob"])
    made = http.post("/v1/responses", headers=alice, json={
        "model": "chat", "input": "Say hi.", "max_output_tokens": 4, "background": True})
    assert made.status_code == 200, made.text
    rid = made.json()["id"]
    for method, path in (("GET", f"/v1/responses/{rid}"), ("DELETE", f"/v1/responses/{rid}"),
                         ("POST", f"/v1/responses/{rid}/cancel"),
                         ("GET", f"/v1/responses/{rid}/input_items"),
                         ("GET", f"/v1/responses/{rid}/export")):
        reply = http.request(method, path, headers=bob)
        assert reply.status_code == 404, (method, path, reply.text)
    hijack = http.post("/v1/responses", headers=bob, json={
        "model": "chat", "input": "And then?", "previous_response_id": rid})
    assert hijack.status_code == 404
    assert hijack.json()["error"]["param"] == "previous_response_id"
    assert http.get(f"/v1/responses/{rid}", headers=alice).json()["id"] == rid


def test_a_key_limited_to_some_models_is_refused_others(open_stack: Stack,
                                                        tokens: dict[str, str]) -> None:
    reply = open_stack.http.post("/v1/jobs", headers=bearer(tokens["bob"]),
                                 json={"kind": "embed", "model": "embed", "texts": ["ok"]})
    assert reply.status_code == 202
    before = open_stack.redis.llen(f"{PREFIX}.embed2")
    refused = open_stack.http.post("/v1/jobs", headers=bearer(tokens["bob"]),
                                   json={"kind": "embed", "model": "embed2", "texts": ["x"]})
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "model"
    assert refused.json()["error"]["type"] == "model_not_allowed"
    assert open_stack.redis.llen(f"{PREFIX}.embed2") == before
    alice = open_stack.http.post("/v1/jobs", headers=bearer(tokens["alice"]),
                                 json={"kind": "embed", "model": "embed2", "texts": ["x"]})
    assert alice.status_code == 202  # no model list: every model


def test_the_openai_clients_api_key_is_the_bearer_token(open_stack: Stack,
                                                        tokens: dict[str, str]) -> None:
    good = openai.OpenAI(base_url=f"{open_stack.url}/v1", api_key=tokens["alice"],
                         max_retries=0, timeout=60)
    vectors = good.embeddings.create(model="embed", input="hello", encoding_format="float")
    assert len(vectors.data[0].embedding) == 384
    bad = openai.OpenAI(base_url=f"{open_stack.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="embed", input="hello")


# What each scope may reach, written out here as the contract (the code's table is
# api.auth.ROUTE_SCOPES; a unit test checks that it covers every route).
REACHES = {
    "jobs": {"/ready", "/openapi.json", "/v1/usage", "/v1/models", "/v1/jobs", "/v1/batches",
             "/v1/files",
             "/v1/dead-letters", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
             "/v1/responses"},
    "fleet:read": {"/ready", "/openapi.json", "/v1/usage", "/v1/models", "/v1/workers",
                   "/metrics"},
    "metrics": {"/ready", "/openapi.json", "/v1/usage", "/metrics"},
    "admin": {"everything"},
}
ADMIN_ONLY = {"/v1/workers/{name}/model", "/v1/workers/{name}/unload"}


def allowed(scope: str, method: str, path: str) -> bool:
    if scope == "admin":
        return True
    if path in ADMIN_ONLY:
        return False
    return any(path == p or path.startswith(p + "/") for p in REACHES[scope])


@pytest.fixture(scope="module")
def scoped(open_stack: Stack, tokens: dict[str, str], redis_server: EmbeddedRedis,
           config: Path) -> dict[str, str]:
    made = {}
    for scope in REACHES:
        run = keys_cli(redis_server, config, "create", f"only-{scope}", "--scopes", scope)
        assert run.returncode == 0, run.stderr
        made[scope] = run.stdout.strip()
    refused = keys_cli(redis_server, config, "create", "x", "--scopes", "jobs,root")
    assert refused.returncode == 2 and "root" in refused.stderr
    listed = keys_cli(redis_server, config, "list").stdout
    assert "fleet:read" in listed and "metrics" in listed
    return made


def test_scopes_are_enforced_on_every_route_of_the_app(open_stack: Stack,
                                                       scoped: dict[str, str]) -> None:
    """Each scope's key against each route and method: 403 naming the scope exactly where
    the contract says, never a 401, and the request otherwise reaches the route (an empty
    body's 4xx, a 404 of an unknown id, or a 2xx)."""
    app = create_app(Settings(key_prefix=PREFIX), "redis://unused")
    checked = 0
    for route in app.routes:
        if route.path == "/health":
            continue
        path = route.path.format(job_id="0" * 32, batch_id="0" * 32, name="nobody@host",
                                 response_id="resp_" + "0" * 32,
                                 delivery_id=f"msg_{'0' * 32}_0",
                                 file_id=f"file-{'0' * 32}")
        for method in sorted(set(route.methods or ()) - {"HEAD"}):
            for scope, token in scoped.items():
                reply = open_stack.http.request(method, path, headers=bearer(token),
                                                json={} if method == "POST" else None)
                where = (scope, method, route.path, reply.status_code, reply.text[:200])
                assert reply.status_code != 401, where
                if allowed(scope, method, route.path):
                    assert reply.status_code != 403, where
                else:
                    error = reply.json()["error"]
                    assert reply.status_code == 403 and error["type"] == "insufficient_scope", \
                        where
                    assert f"has {scope}" in error["message"], where
                checked += 1
    assert checked > 120


def test_a_jobs_key_sees_models_but_not_the_fleet_and_an_admin_key_sees_everyones_jobs(
    open_stack: Stack, tokens: dict[str, str], scoped: dict[str, str]
) -> None:
    http = open_stack.http
    models = http.get("/v1/models", headers=bearer(scoped["jobs"])).json()["data"]
    assert models and all("workers" not in m and "queue_depth" in m for m in models)
    fleet = http.get("/v1/models", headers=bearer(scoped["fleet:read"])).json()["data"]
    assert all("workers" in m for m in fleet)
    job_id = http.post("/v1/jobs", headers=bearer(tokens["alice"]),
                       json={"kind": "embed", "texts": ["mine"]}).json()["id"]
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(scoped["jobs"])).status_code == 404
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(scoped["admin"])).status_code == 200
    scrape = http.get("/metrics", headers=bearer(scoped["metrics"]))
    assert scrape.status_code == 200 and "tokenpool_queue_depth" in scrape.text


def test_a_revoked_key_stops_working_at_once(open_stack: Stack, tokens: dict[str, str],
                                             redis_server: EmbeddedRedis,
                                             config: Path) -> None:
    run = keys_cli(redis_server, config, "create", "temp")
    temp = run.stdout.strip()
    assert open_stack.http.get("/v1/models", headers=bearer(temp)).status_code == 200
    key_id = temp.split("_")[1]
    assert keys_cli(redis_server, config, "revoke", key_id).returncode == 0
    assert open_stack.http.get("/v1/models", headers=bearer(temp)).status_code == 401
    assert keys_cli(redis_server, config, "revoke", "nope").returncode == 1
    assert "revoked" in keys_cli(redis_server, config, "list").stdout


def test_quotas_answer_429_with_retry_after_and_show_the_use(
    open_stack: Stack, tokens: dict[str, str], redis_server: EmbeddedRedis, config: Path,
) -> None:
    http = open_stack.http
    carol = bearer(keys_cli(redis_server, config, "create", "carol", "--rpm", "5")
                   .stdout.strip())
    codes = [http.get("/v1/usage", headers=carol).status_code for _ in range(6)]
    if codes != [200] * 5 + [429]:  # the minute turned mid-way: once more
        codes = [http.get("/v1/usage", headers=carol).status_code for _ in range(6)]
    assert codes[-1] == 429 and codes.count(429) >= 1
    limited = http.get("/v1/usage", headers=carol)
    assert limited.json()["error"]["type"] == "rate_limited"
    assert 0 < int(limited.headers["retry-after"]) <= 60

    dave = bearer(keys_cli(redis_server, config, "create", "dave", "--max-active", "2",
                           "--tokens-per-day", "5").stdout.strip())
    parked = {"kind": "embed", "model": "embed2", "texts": ["waits: embed2 has no worker"]}
    first = http.post("/v1/jobs", json=parked, headers=dave).json()["id"]
    http.post("/v1/jobs", json=parked, headers=dave)
    third = http.post("/v1/jobs", json=parked, headers=dave)
    assert third.status_code == 429 and third.json()["error"]["type"] == "too_many_active_jobs"
    assert int(third.headers["retry-after"]) > 0
    use = http.get("/v1/usage", headers=dave).json()
    assert use["limits"]["max_active_jobs"] == 2 and use["use"]["active_jobs"] == 2
    assert http.delete(f"/v1/jobs/{first}", headers=dave).status_code == 200
    assert http.get("/v1/usage", headers=dave).json()["use"]["active_jobs"] == 1

    erin = bearer(keys_cli(redis_server, config, "create", "erin", "--max-queued", "1")
                  .stdout.strip())
    assert http.post("/v1/jobs", json=parked, headers=erin).status_code == 202
    waiting = http.post("/v1/jobs", json=parked, headers=erin)
    assert waiting.status_code == 429 and waiting.json()["error"]["type"] == \
        "too_many_queued_jobs"
    assert http.get("/v1/usage", headers=erin).json()["use"]["queued_jobs"] == 1

    job = http.post("/v1/jobs", headers=dave, json={
        "kind": "generate", "prompt": "Count: one, two,", "max_tokens": 8, "temperature": 0})
    assert job.status_code == 202
    deadline = time.monotonic() + 60
    while http.get(f"/v1/jobs/{job.json()['id']}", headers=dave).json()["status"] != \
            "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    generated = http.get(f"/v1/jobs/{job.json()['id']}", headers=dave).json()["usage"]
    assert http.get("/v1/usage", headers=dave).json()["use"]["tokens_today"] == \
        generated["completion_tokens"] >= 5
    over = http.post("/v1/jobs", headers=dave, json={"kind": "generate", "prompt": "More",
                                                      "max_tokens": 4})
    assert over.status_code == 429 and over.json()["error"]["type"] == "token_quota_exceeded"
    assert int(over.headers["retry-after"]) <= 86_400


def test_the_stack_runs_on_a_redis_with_an_acl_user_and_password(
    tmp_path_factory: pytest.TempPathFactory, config: Path,
) -> None:
    server = EmbeddedRedis(tmp_path_factory.mktemp("acl-redis"), appendonly=False,
                           password="s3cret-pass", user="tokenpool").start()
    try:
        anonymous = redis.Redis(port=server.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        with running_stack(server.url, config, tmp_path_factory.mktemp("acl-logs"),
                           {"w-embed": "embed"}, prefix=PREFIX,
                           ready=lambda http: http.get("/v1/workers").json()["data"] != []) \
                as stack:
            job = stack.wait_final(stack.submit({"kind": "embed", "texts": ["behind a password"]}))
            assert job["status"] == "succeeded" and len(job["result"]["embeddings"][0]) == 384
    finally:
        server.stop()


def test_logs_carry_neither_keys_nor_prompts(open_stack: Stack, tokens: dict[str, str]) -> None:
    alice = bearer(tokens["alice"])
    marker = f"secret-instructions-{time.time_ns()}"
    reply = open_stack.http.post(
        f"/v1/batches?kind=embed&instructions={marker}", headers={
            **alice, "Content-Type": "application/x-ndjson"},
        content=json.dumps({"id": "a", "text": f"private text {marker}"}))
    assert reply.status_code in (202, 422)
    job = open_stack.http.post("/v1/jobs", headers=alice, json={
        "kind": "embed", "texts": [f"another private text {marker}"]})
    assert job.status_code == 202
    time.sleep(1.0)
    assert open_stack.supervisor.log_dir is not None
    logs = "".join(p.read_text() for p in open_stack.supervisor.log_dir.glob("*.log"))
    assert "POST /v1/jobs 202" in logs  # the access log is there, just without queries
    assert marker not in logs
    assert not any(token.split("_", 2)[2] in logs for token in tokens.values())
