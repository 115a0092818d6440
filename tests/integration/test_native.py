"""llama.cpp in real processes: a worker loads libllama before numpy (CUDA builds crashed
the other way round), the API hides the GPUs, and llama.cpp's log reaches the worker's log
only as warnings and errors."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import tokenpool_argv
from tests.conftest import Stack, stack_env

LLAMA = re.compile(r"file=\S*/libllama\.so \[0\];  dynamically loaded")
NUMPY = re.compile(r"file=\S*/_multiarray_umath\S*\.so \[0\];  dynamically loaded")


def loaded_libraries(argv: list[str], env: dict[str, str], out: Path, timeout_s: float = 90,
                     while_running: Callable[[], None] | None = None) -> list[str]:
    """The dynamic linker's record (LD_DEBUG=files) of what the process loads, in order,
    until it has loaded both libllama and numpy's core (then it is stopped)."""
    prefix = out / "ld"
    proc = subprocess.Popen(argv, env={**env, "LD_DEBUG": "files",
                                       "LD_DEBUG_OUTPUT": str(prefix)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        if while_running is not None:
            while_running()
        while time.monotonic() < deadline:
            own = prefix.with_name(f"ld.{proc.pid}")
            text = own.read_text(errors="replace") if own.exists() else ""
            lines = [line for line in text.splitlines() if LLAMA.search(line)
                     or NUMPY.search(line)]
            if any(LLAMA.search(x) for x in lines) and any(NUMPY.search(x) for x in lines):
                return lines
            assert proc.poll() is None, f"exited with {proc.returncode}"
            time.sleep(0.2)
        raise AssertionError("libllama and numpy were not both loaded in time")
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_process_loads_libllama_before_numpy(redis_server: EmbeddedRedis,
                                                      config_file: Path, tmp_path: Path):
    # Its own key prefix: it must not take the session stack's jobs.
    env = stack_env(redis_server.url, config_file, TOKENPOOL_KEY_PREFIX="tpnative")
    lines = loaded_libraries(tokenpool_argv("worker", "--model", "chat", "--gpu", "cpu"), env,
                             tmp_path)
    assert LLAMA.search(lines[0]), lines  # numpy after it (it loads with the model)


def test_an_api_process_loads_libllama_first_and_no_cuda_library(
        redis_server: EmbeddedRedis, config_file: Path, tmp_path: Path, stack: Stack):
    port = free_port()
    env = stack_env(redis_server.url, config_file, CUDA_VISIBLE_DEVICES="0",
                    TOKENPOOL_KEY_PREFIX="tpnative")

    def count_a_prompt() -> None:  # the API loads its token counter at the first count
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    reply = http.post("/v1/jobs", json={"kind": "generate", "prompt": "Hi"})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the API never answered"
                    time.sleep(0.2)
            assert reply.status_code == 202, reply.text
            assert http.delete(f"/v1/jobs/{reply.json()['id']}").status_code == 200

    lines = loaded_libraries(tokenpool_argv("api", "--port", str(port)), env, tmp_path,
                             while_running=count_a_prompt)
    assert LLAMA.search(lines[0]), lines
    text = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    assert not re.search(r"file=\S*(libcuda|libcudart|libggml-cuda)", text)
    log = (stack.supervisor.log_dir / "api.log").read_text()
    assert "GPUs hidden from the API process (CUDA_VISIBLE_DEVICES='')" in log


def test_the_worker_log_has_llama_cpp_warnings_only_and_no_stray_stderr(stack: Stack):
    log = (stack.supervisor.log_dir / "worker-chat.log").read_text().splitlines()
    assert any("model chat loaded" in line for line in log)
    llama = [line for line in log if " tokenpool.llama " in line]
    assert llama, "llama.cpp's warnings at load (the SWA cache, the context size) are logged"
    assert all(re.search(r" (WARNING|ERROR) tokenpool\.llama \[\d+\] ", x) for x in llama)
    # Nothing of llama.cpp reaches the log but through that logger: not as bare lines on
    # stderr, not as Celery's redirected stderr (one line per step on CUDA, before).
    stray = re.compile(r"^(llama_|load|print_info|graph_|sched_|state_|set_abort)")
    assert not [line for line in log if stray.match(line)]
    assert not [line for line in log if "celery.redirected" in line and "llama" in line]
