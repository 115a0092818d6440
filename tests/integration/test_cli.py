"""The `tokenpool` client commands, run as a user runs them, against the real stack."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import tokenpool_argv
from tests.conftest import Stack, stack_env


def tp(stack_url: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    return subprocess.run(tokenpool_argv(*args, *(["--url", stack_url] if stack_url else [])),
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def test_submit_prints_the_job_id_and_status_shows_the_result(stack: Stack) -> None:
    run = tp(stack.url, "submit", "Once upon a time", "-n", "8", "-t", "0")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    job = stack.wait_final(job_id)
    assert job["status"] == "succeeded"
    shown = json.loads(tp(stack.url, "status", job_id, "--json").stdout)
    assert shown["result"]["text"] == job["result"]["text"]
    table = tp(stack.url, "status", job_id).stdout
    assert "succeeded" in table and job_id in table


def test_submit_follow_streams_exactly_the_job_text(stack: Stack) -> None:
    run = tp(stack.url, "submit", "--chat", "--system", "Be brief.", "Say hi.", "-n", "12",
             "-t", "0", "--follow")
    assert run.returncode == 0, run.stderr
    assert "done: " in run.stderr and "tokens/s" in run.stderr
    job_id = run.stderr.split("job ", 1)[1].split()[0]
    assert run.stdout == stack.job(job_id)["result"]["text"] + "\n"


@contextlib.contextmanager
def dropping_proxy(target_port: int, drop_after_bytes: int) -> Iterator[str]:
    """A loopback TCP proxy that cuts its first connection after `drop_after_bytes` of reply;
    later connections pass through whole."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    cuts = {"left": 1}

    def pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(4096):
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    break
        except OSError:
            pass
        for end in (src, dst):  # shutdown first: it wakes the other direction's recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", target_port))
            limit = drop_after_bytes if cuts["left"] > 0 else None
            cuts["left"] -= 1
            threading.Thread(target=pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, limit), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
    assert cuts["left"] < 0, "the proxy never cut a connection"


def test_follow_resumes_after_a_dropped_connection_without_gaps_or_repeats(
    stack: Stack
) -> None:
    job_id = stack.submit({"kind": "generate", "prompt": "List the days of the week:",
                           "max_tokens": 60, "temperature": 0})
    stack.wait_final(job_id)
    port = int(stack.url.rsplit(":", 1)[1])
    with dropping_proxy(port, drop_after_bytes=1500) as url:
        run = tp(url, "follow", job_id, "--json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events == stack.stream(job_id) and events[-1]["type"] == "done"
    with dropping_proxy(port, drop_after_bytes=1500) as url:
        plain = tp(url, "follow", job_id)
    assert plain.stdout == stack.job(job_id)["result"]["text"] + "\n"


def test_cancel_stops_a_running_job_and_follow_exits_2(stack: Stack) -> None:
    job_id = tp(stack.url, "submit", "Write a long story:", "-n", "250").stdout.strip()
    stack.events(job_id, stop_after_seq=3)
    run = tp(stack.url, "cancel", job_id, "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["cancelled"] is True
    follow = tp(stack.url, "follow", job_id)
    assert follow.returncode == 2 and "cancelled" in follow.stderr


def test_embed_prints_vectors_of_the_models_size(stack: Stack) -> None:
    run = tp(stack.url, "embed", "a cat", "a kitten", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dimensions"] == 384 and len(result["embeddings"]) == 2
    assert all(len(v) == 384 for v in result["embeddings"])
    assert "384 dimensions" in tp(stack.url, "embed", "a dog").stdout


def test_workers_and_models_show_the_live_fleet(stack: Stack) -> None:
    listed = json.loads(tp(stack.url, "workers", "--json").stdout)
    fleet = [w for w in listed if w["live"]]  # others may have been killed by earlier tests
    assert {"chat", "summary", "embed"} <= {w["model"] for w in fleet}
    assert all(w["state"] in ("loaded", "generating") and w["gpu"] == "cpu" for w in fleet)
    assert sum(w["jobs_done"] for w in fleet if w["model"] == "chat") >= 1
    table = tp(stack.url, "workers").stdout
    assert all(w["name"][:10] in table for w in listed)
    models = {m["id"]: m for m in json.loads(tp(stack.url, "models", "--json").stdout)}
    assert models["embed"]["kind"] == "embedding" and models["chat"]["workers"]
    assert "queued" in tp(stack.url, "models").stdout


def test_bad_input_and_an_unreachable_api_fail_with_a_clear_message(stack: Stack) -> None:
    run = tp(stack.url, "submit", "hi", "--model", "nope")
    assert run.returncode == 1 and "unknown_model [model]" in run.stderr
    missing = tp(stack.url, "status", "0" * 32)
    assert missing.returncode == 1 and "not_found" in missing.stderr
    down = tp(f"http://127.0.0.1:{free_port()}", "models")
    assert down.returncode == 1 and "cannot reach the API" in down.stderr


def test_healthchecks_pass_for_running_processes_and_fail_for_missing_ones(
    stack: Stack, redis_server: EmbeddedRedis, config_file: Path, tmp_path: Path
) -> None:
    env = stack_env(redis_server.url, config_file, TOKENPOOL_DATA_DIR=str(tmp_path))

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(tokenpool_argv("healthcheck", *args), env=env,
                              capture_output=True, text=True, timeout=60)

    assert check("api", "--url", stack.url).returncode == 0
    assert check("worker").returncode == 0  # the stack's workers beat from this host
    assert check("beat").returncode == 1
    beat = subprocess.Popen(tokenpool_argv("beat"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while check("beat").returncode != 0:
            assert time.monotonic() < deadline and beat.poll() is None, "beat did not start"
            time.sleep(0.5)
    finally:
        beat.terminate()
        beat.wait(15)
    assert check("beat").returncode == 1
    down = check("api", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "unreachable" in down.stderr
    assert check("nonsense").returncode == 2


def test_batch_summarize_writes_every_result_and_resumes_after_ctrl_c(
    stack: Stack, tmp_path: Path
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(4):
        (notes / f"meeting-{i}.txt").write_text(f"Item {i}: the team agreed to ship on day {i}.")
    out = tmp_path / "results.jsonl"
    run = tp(stack.url, "batch", "summarize", str(notes), "--out", str(out), "-n", "8")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"meeting-{i}.txt" for i in range(4)]
    assert all(line["status"] == "succeeded" and line["result"]["summary"] for line in lines)
    assert "succeeded" in run.stderr and "4/4" in run.stderr
    # Ctrl-C while following: the batch goes on; `batch follow` picks it up again. SIGINT
    # back to its default in the child: a parent that runs in the background (an `&` in a
    # script) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    proc = subprocess.Popen(tokenpool_argv("batch", "summarize", str(notes), "-n", "40",
                                           "--url", stack.url),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    first = proc.stderr.readline()
    batch_id = first.split("batch ", 1)[1].split(":")[0].strip()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130 and f"tokenpool batch follow {batch_id}" in rest
    again = tp(stack.url, "batch", "follow", batch_id, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 4
    status = json.loads(tp(stack.url, "batch", "status", batch_id, "--json").stdout)
    assert status["status"] == "completed" and status["counts"]["succeeded"] == 4
