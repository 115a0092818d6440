"""Webhooks on the real stack: a chat worker, the API and the `tokenpool webhooks` process;
receivers on loopback (allowed by the settings) check every delivery with the official
`openai` package's `webhooks.unwrap`."""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from broker.redis_server import EmbeddedRedis
from cli.supervisor import tokenpool_argv
from tests.conftest import Stack, chat_only_config, running_stack

PREFIX = "tphooks"
SECRET = "whsec_" + base64.b64encode(b"a test secret of some length").decode()
CONFIG = chat_only_config(PREFIX, n_ctx=512, max_tokens=64, extra=f"""
webhook_secret = "{SECRET}"
webhook_allow_networks = ["127.0.0.0/8"]
webhook_backoff_s = 0.2
webhook_max_attempts = 4
webhook_timeout_s = 2
""")
SHORT = {"kind": "generate", "prompt": "Once upon a time", "max_tokens": 16,
         "temperature": 0}


class Receiver:
    """An HTTP receiver on loopback: verifies, records, answers 500 to the first `fail` tries
    of each delivery (then 200), or holds every request for `hang_s` first."""

    def __init__(self, fail: int = 0, hang_s: float = 0.0, secret: str = SECRET) -> None:
        self.fail, self.hang_s = fail, hang_s
        self.tries: dict[str, list[dict[str, Any]]] = {}
        self.answered: dict[str, int] = {}
        self.unverified = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends a hang at once on close
        self.secret = secret  # what it verifies with (may be set later)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                verifier = openai.OpenAI(api_key="unused", webhook_secret=receiver.secret)
                try:
                    verifier.webhooks.unwrap(body, dict(self.headers))
                except openai.InvalidWebhookSignatureError:
                    receiver.unverified += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                event = json.loads(body)
                receiver.release.wait(receiver.hang_s)
                with receiver.lock:
                    tries = receiver.tries.setdefault(self.headers["webhook-id"], [])
                    tries.append(event)
                    status = 500 if len(tries) <= receiver.fail else 200
                    if status == 200:
                        receiver.answered[self.headers["webhook-id"]] = len(tries)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the sender gave up waiting (a hang): nothing to answer
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close joins them, sockets closed
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, job_id: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Every try of the job's delivery, once one was answered 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if f"msg_{job_id}_0" in self.answered:
                    return list(self.tries[f"msg_{job_id}_0"])
            time.sleep(0.05)
        raise AssertionError(f"no delivery for {job_id}; got {list(self.tries)}")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Receiver]:
    """A receiver named in the settings, for responses' and batches' ends only."""
    made = Receiver()
    yield made
    made.close()


@pytest.fixture(scope="module")
def hooks(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
          endpoint: Receiver) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("hooks") / "tokenpool.toml"
    config.write_text(CONFIG.replace("[models.chat]", f"""[[webhook_endpoints]]
url = "{endpoint.url}"
events = ["response.completed", "response.incomplete", "batch.completed"]
[models.chat]"""))
    with running_stack(redis_server.url, config, tmp_path_factory.mktemp("hooks-logs"),
                       {"chat": "chat"}, PREFIX) as stack:
        child = stack.supervisor.add("webhooks", tokenpool_argv("webhooks"))
        child.start(stack.supervisor.env)
        yield stack


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


def test_a_job_is_told_once_after_dedup_even_when_the_receiver_fails_twice(
    hooks: Stack, receiver: Receiver
) -> None:
    receiver.fail = 2
    job_id = hooks.submit({**SHORT, "webhook": receiver.url})
    tries = receiver.delivered(job_id)
    job = hooks.job(job_id)
    assert len(tries) == 3 and receiver.unverified == 0
    assert all(t == tries[0] for t in tries)  # the same event, the same id, every try
    event = tries[0]
    assert event["type"] == "job.succeeded" and event["id"] == f"msg_{job_id}_0"
    assert event["data"]["result"]["text"] == job["result"]["text"]
    assert event["data"]["usage"] == job["usage"]


def test_the_end_is_told_when_the_worker_that_ended_the_job_is_killed_right_after(
    hooks: Stack, receiver: Receiver
) -> None:
    job_id = hooks.submit({**SHORT, "webhook": receiver.url})
    job = hooks.wait_final(job_id)
    worker = next(c for c in hooks.supervisor.children if c.name == "chat")
    assert worker.process is not None
    os.kill(int(job["worker"].split("-")[2].split("@")[0]), signal.SIGKILL)
    try:
        (event,) = receiver.delivered(job_id)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
    finally:  # a new chat worker, loaded, before the next test (not the dead one's heartbeat)
        worker.process.wait(30)
        hooks.supervisor.restart_dead()
        new = f"-{worker.process.pid}@"
        deadline = time.monotonic() + 120
        while not any(new in w["name"] and w["state"] in ("loaded", "generating")
                      for w in hooks.http.get("/v1/workers").json()["data"]):
            assert time.monotonic() < deadline, "no new chat worker"
            time.sleep(0.3)


def test_a_cancelled_job_is_told_as_cancelled(hooks: Stack, receiver: Receiver) -> None:
    job_id = hooks.submit({**SHORT, "max_tokens": 64, "webhook": receiver.url})
    hooks.http.delete(f"/v1/jobs/{job_id}")
    (event,) = receiver.delivered(job_id)
    assert event["type"] == "job.cancelled" and event["data"]["status"] == "cancelled"


def test_a_receiver_that_never_answers_slows_neither_jobs_nor_other_deliveries(
    hooks: Stack, receiver: Receiver
) -> None:
    mute = Receiver(hang_s=30)
    try:
        plain, muted = [], []
        for _ in range(4):
            plain.append(hooks.submit({**SHORT, "webhook": receiver.url}))
            muted.append(hooks.submit({**SHORT, "webhook": mute.url}))
        for job_id in plain:
            receiver.delivered(job_id, timeout_s=20)
        jobs = {j: hooks.wait_final(j) for j in plain + muted}
        told = [receiver.answered[f"msg_{j}_0"] for j in plain]
        assert told == [1, 1, 1, 1]  # no retries: the mute receiver held nothing up
        plain_s = statistics.median(jobs[j]["timings"]["total_s"] for j in plain)
        muted_s = statistics.median(jobs[j]["timings"]["total_s"] for j in muted)
        assert muted_s < 1.5 * plain_s + 0.2, (muted_s, plain_s)
    finally:
        mute.close()


def test_a_webhook_to_a_private_address_is_refused_at_submit(hooks: Stack) -> None:
    before = hooks.redis.llen(hooks.keys.queue("chat"))
    for url in ("http://10.0.0.7/hook", "http://169.254.169.254/latest", "file:///etc/passwd"):
        reply = hooks.http.post("/v1/jobs", json={**SHORT, "webhook": url})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["field"] == "webhook"
    assert hooks.redis.llen(hooks.keys.queue("chat")) == before


def test_a_delivery_out_of_tries_is_dead_lettered_and_can_be_delivered_again(
    hooks: Stack, receiver: Receiver
) -> None:
    receiver.fail = 100
    job_id = hooks.submit({**SHORT, "webhook": receiver.url})
    hooks.wait_final(job_id)
    delivery = f"msg_{job_id}_0"
    deadline = time.monotonic() + 60
    while True:
        dead = {d["id"]: d for d in hooks.http.get("/v1/webhooks/dead-letters").json()["data"]}
        if delivery in dead:
            break
        assert time.monotonic() < deadline, "never dead-lettered"
        time.sleep(0.2)
    assert dead[delivery]["attempts"] == 4 and "500" in dead[delivery]["last_error"]
    assert len(receiver.tries[delivery]) == 4
    receiver.fail = 0
    again = hooks.http.post(f"/v1/webhooks/dead-letters/{delivery}/redeliver")
    assert again.status_code == 202
    tries = receiver.delivered(job_id)
    assert len(tries) == 5 and tries[-1] == tries[0]
    listed = hooks.http.get("/v1/webhooks/dead-letters").json()["data"]
    assert delivery not in {d["id"] for d in listed}
    missing = hooks.http.post(f"/v1/webhooks/dead-letters/msg_{'0' * 32}_0/redeliver")
    assert missing.status_code == 404


def test_a_batch_tells_its_webhook_once_when_every_item_has_ended(
    hooks: Stack, receiver: Receiver, endpoint: Receiver
) -> None:
    reply = hooks.http.post("/v1/batches", json={
        "kind": "summarize", "model": "chat", "webhook": receiver.url,
        "options": {"max_tokens": 4}, "items": [{"id": f"i{n}", "text": "Hello there."}
                                                 for n in range(3)]})
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]
    deadline = time.monotonic() + 60
    delivery = f"msg_batch_{batch_id}_1_0"
    while delivery not in receiver.answered:
        assert time.monotonic() < deadline, list(receiver.tries)
        time.sleep(0.05)
    (event,) = receiver.tries[delivery]
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch_id
    assert event["data"]["counts"]["succeeded"] == 3 and event["data"]["total"] == 3
    time.sleep(1.0)  # its items are jobs: none of them told this batch's webhook
    assert [k for k in receiver.tries if k != delivery] == []
    while f"msg_batch_{batch_id}_1_1" not in endpoint.answered:  # the endpoint wants it too
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_settings_endpoint_hears_a_response_end_in_openais_terms_and_not_plain_jobs(
    hooks: Stack, endpoint: Receiver
) -> None:
    client = openai.OpenAI(base_url=f"{hooks.url}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    made = client.responses.create(model="chat", input="Hi.", max_output_tokens=4)
    job_id = made.id.removeprefix("resp_")
    (event,) = endpoint.delivered(job_id)
    assert event["type"] in ("response.completed", "response.incomplete")
    assert event["data"]["id"] == made.id
    assert event["type"] == f"response.{made.status}"
    plain = hooks.submit(SHORT)
    hooks.wait_final(plain)
    # job.succeeded is not among its events: nothing is even queued for it
    assert not hooks.redis.exists(hooks.keys.webhook(f"{plain}|0"))
    assert "hooks" not in {k.decode() for k in hooks.redis.hkeys(hooks.keys.job(plain))}


def test_a_keys_own_endpoint_hears_its_jobs_signed_with_the_keys_own_secret(
    hooks: Stack, receiver: Receiver
) -> None:
    """Last in this module: once a key exists, every request needs one."""
    made = subprocess.run(
        tokenpool_argv("keys", "create", "team-a", "--webhook", receiver.url,
                       "--webhook-events", "job.succeeded", "--json"),
        capture_output=True, text=True, env=hooks.supervisor.env, timeout=60)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["webhook_secret"].startswith("whsec_") and key["webhook_secret"] != SECRET
    receiver.secret = key["webhook_secret"]
    refused = subprocess.run(
        tokenpool_argv("keys", "create", "team-b", "--webhook", "http://10.0.0.9/x"),
        capture_output=True, text=True, env=hooks.supervisor.env, timeout=60)
    assert refused.returncode == 2 and "10.0.0.9" in refused.stderr  # named, not stored
    time.sleep(2.5)  # the API looks again for keys every 2 s
    reply = hooks.http.post("/v1/jobs", json=SHORT,
                            headers={"Authorization": f"Bearer {key['token']}"})
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    (event,) = receiver.delivered(job_id)  # verified with the key's secret, not the server's
    assert event["type"] == "job.succeeded" and receiver.unverified == 0
