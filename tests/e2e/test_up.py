"""`tokenpool up` as a user runs it: embedded Redis, workers, API, Flower; Ctrl-C stops them all."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from broker.redis_server import free_port
from tests.conftest import chat_only_config, stack_env


def start_up(tmp_path, config_file):
    """`tokenpool up` on free ports with `config_file`: the process and its ports."""
    ports = {name: str(free_port()) for name in ("API_PORT", "FLOWER_PORT", "EMBEDDED_REDIS_PORT")}
    env = stack_env("", config_file, **{f"TOKENPOOL_{k}": v for k, v in ports.items()},
                    TOKENPOOL_DATA_DIR=str(tmp_path / "data"), TOKENPOOL_FLOWER_PASSWORD="s3cret")
    del env["REDIS_URL"]
    # The console script pip installed beside this interpreter: the command the README runs.
    tokenpool = str(Path(sys.executable).parent / "tokenpool")
    proc = subprocess.Popen([tokenpool, "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, ports


def stop_up(proc):
    """Kill up and everything it started, the embedded Redis too (in a session of its own, so
    the process group does not reach it: a failed test must not leave a redis-server behind)."""
    if proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait()
    proc.stdout.close()


@pytest.fixture
def up(tmp_path, config_file):
    proc, ports = start_up(tmp_path, config_file)
    yield proc, ports
    stop_up(proc)


def read_urls(proc, timeout_s=30):
    urls, deadline = {}, time.monotonic() + timeout_s
    while len(urls) < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.match(r"^(redis|api|flower)\s+(\S+)", line)
        if match:
            urls[match[1]] = match[2]
    return urls


def wait_status(url, status, timeout_s=180, interval_s=0.5, **kw):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5, **kw).status_code == status:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(interval_s)


def chat_workers(pid):
    """Live `tokenpool worker --model chat` processes under `pid` (zombies left out)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "worker" in argv and "chat" in argv:
            found.append(child)
    return found


def test_up_runs_the_system_and_ctrl_c_leaves_no_process_behind(up):
    proc, ports = up
    urls = read_urls(proc)
    assert urls["api"] == f"http://127.0.0.1:{ports['API_PORT']}"
    assert urls["redis"] == f"redis://127.0.0.1:{ports['EMBEDDED_REDIS_PORT']}/0"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 6  # redis-server, three workers, API, Flower
    wait_status(f"{urls['api']}/ready", 200)
    with httpx.Client(base_url=urls["api"], timeout=30) as http:
        job = http.post("/v1/jobs", json={"kind": "generate", "prompt": "Hi", "max_tokens": 4})
        events = http.get(job.json()["links"]["events"]).text
        assert "event: done" in events
    wait_status(urls["flower"], 401, timeout_s=30)
    wait_status(f"{urls['flower']}/workers", 200, timeout_s=10, auth=("admin", "s3cret"))

    # A worker that dies is restarted, and the restart is logged.
    (chat,) = chat_workers(proc.pid)
    chat.kill()
    deadline = time.monotonic() + 30
    while not [c for c in chat_workers(proc.pid) if c.pid != chat.pid]:
        assert time.monotonic() < deadline, "the chat worker was not restarted"
        time.sleep(0.2)
    wait_status(f"{urls['api']}/ready", 200, timeout_s=60)
    with httpx.Client(base_url=urls["api"], timeout=30) as http:
        job = http.post("/v1/jobs", json={"kind": "generate", "prompt": "Hi", "max_tokens": 4})
        assert "event: done" in http.get(job.json()["links"]["events"]).text
    children = psutil.Process(proc.pid).children(recursive=True)

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert "worker-chat exited with -9; restarted" in proc.stdout.read()
    time.sleep(0.5)
    assert [c.pid for c in children if c.is_running() and c.status() != "zombie"] == []


def test_a_sigkilled_up_takes_every_process_it_started_with_it(tmp_path):
    """`up` killed with SIGKILL (the OOM killer, kill -9) cannot stop its children itself:
    the kernel signals each when up dies (cli.supervisor's die_with_parent: SIGKILL for ours,
    SIGTERM for Redis), so no worker keeps its model, no API its port, no Redis its data."""
    config = tmp_path / "tokenpool.toml"
    config.write_text(chat_only_config("tporphans"))
    proc, _ = start_up(tmp_path, config)
    try:
        urls = read_urls(proc)
        wait_status(f"{urls['api']}/ready", 200)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(" ".join(c.cmdline()[2:4]) if "cli.main" in c.cmdline() else c.name()
                       for c in children)
        assert names == ["cli.main api", "cli.main flower", "cli.main webhooks",
                         "cli.main worker", "redis-server"], names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while left := [c for c in children if c.is_running() and c.status() != "zombie"]:
            assert time.monotonic() < deadline, f"still running after up died: {left}"
            time.sleep(0.2)
    finally:
        stop_up(proc)
