"""The examples in examples/, each run as a user would against the real stack, its output
checked against what the job really produced."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.redis_server import EmbeddedRedis
from tests.conftest import PREFIX, Stack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def env_for(stack: Stack, redis_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    return {**env, "TOKENPOOL_URL": stack.url, "TOKENPOOL_KEY_PREFIX": PREFIX,
            "REDIS_URL": redis_url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def tokens_of(stack: Stack, job_id: str) -> str:
    return "".join(e["text"] for e in stack.stream(job_id) if e["type"] == "token")


class CuttingProxy:
    """A TCP proxy to the API that cuts the first `cuts` event-stream connections after
    `after_bytes` of their answer, as a flaky network or a restarting proxy would."""

    def __init__(self, target: tuple[str, int], cuts: int, after_bytes: int) -> None:
        self.target, self.cuts, self.after_bytes = target, cuts, after_bytes
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Requests may share a kept-alive connection: the answer is cut `after_bytes` after
        an event-stream request went up it."""
        upstream = socket.create_connection(self.target)
        state = {"sent": 0, "limit": -1}

        def requests() -> None:
            for data in self._chunks(client):
                if b"/events" in data and data.startswith(b"GET ") and self.cut < self.cuts:
                    self.cut += 1
                    state["limit"] = state["sent"] + self.after_bytes
                upstream.sendall(data)
            self._close(client, upstream)

        threading.Thread(target=requests, daemon=True).start()
        for data in self._chunks(upstream):
            client.sendall(data)
            state["sent"] += len(data)
            if 0 <= state["limit"] <= state["sent"]:
                break
        self._close(client, upstream)

    @staticmethod
    def _chunks(source: socket.socket) -> Iterator[bytes]:
        try:
            while data := source.recv(256):
                yield data
        except OSError:
            return

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def cutting_proxy(stack: Stack) -> Iterator[CuttingProxy]:
    host, port = stack.url.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), cuts=2, after_bytes=700)
    yield proxy
    proxy.close()


def test_the_python_example_resumes_through_cut_connections_and_prints_the_whole_text(
    stack: Stack, cutting_proxy: CuttingProxy
) -> None:
    env = {**env_for(stack), "TOKENPOOL_URL": f"http://127.0.0.1:{cutting_proxy.port}"}
    run = subprocess.run([sys.executable, str(EXAMPLES / "follow_job.py"), "The lighthouse"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    job_id = run.stderr.split("job ", 1)[1].split()[0]
    assert cutting_proxy.cut == 2 and run.stderr.count("connection lost") == 2, run.stderr
    job = stack.job(job_id)
    assert job["status"] == "succeeded"
    # stdout is the text alone (the end goes to stderr); the text itself may end in newlines
    assert run.stdout == job["result"]["text"] == tokens_of(stack, job_id)


def node_example(stack: Stack, redis_url: str, *args: str, mode: str) -> tuple[str, dict]:
    node_modules = EXAMPLES / "node" / "node_modules"
    assert node_modules.is_dir(), "run `make install` (it runs npm ci in examples/node)"
    run = subprocess.run(["node", str(EXAMPLES / "node" / "follow.mjs"), *args],
                         capture_output=True, text=True, timeout=180,
                         env={**env_for(stack, redis_url), "MODE": mode})
    assert run.returncode == 0, run.stderr
    return run.stdout, json.loads(run.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["pubsub", "stream"])
def test_the_node_example_follows_a_job_from_redis_and_gets_every_event_once(
    stack: Stack, redis_server: EmbeddedRedis, mode: str
) -> None:
    redis_url = redis_server.url
    printed, summary = node_example(stack, redis_url, "Once upon a time", mode=mode)
    job = stack.job(summary["job"])
    assert summary["final"] == "done" and job["status"] == "succeeded"
    # the example prints the text, then one newline; the text itself may end in newlines
    assert summary["text"] == printed.removesuffix("\n") == job["result"]["text"]
    assert summary["events"] == len(stack.stream(summary["job"]))
    # a late joiner, after the job ended, gets the same from the stream
    _, late = node_example(stack, redis_url, "--job", summary["job"], mode=mode)
    assert late["text"] == summary["text"] and late["events"] == summary["events"]


def test_the_cli_batch_example_summarises_every_line_of_its_jsonl(
    stack: Stack, tmp_path: Path
) -> None:
    folder = shutil.copytree(EXAMPLES / "batch", tmp_path / "batch")
    run = subprocess.run(["bash", str(folder / "run.sh")], capture_output=True, text=True,
                         timeout=300, env=env_for(stack))
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (folder / "transcripts.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    for line in lines:
        assert line["status"] == "succeeded" and line["result"]["summary"].strip()
        assert stack.job(line["job"])["result"]["summary"] == line["result"]["summary"]
