"""`tokenpool up` where it cannot start: one line on what is wrong and what to do, exit 2, and
nothing left running (it checks before it starts anything)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from broker.redis_server import EmbeddedRedis, free_port
from tests.conftest import stack_env


def up_fails(tmp_path: Path, config_file: Path, **env: str) -> str:
    """Run `tokenpool up`; it must exit 2 at once: its one line of stderr."""
    ports = {f"TOKENPOOL_{k}": str(free_port())
             for k in ("API_PORT", "FLOWER_PORT", "EMBEDDED_REDIS_PORT")}
    full = stack_env("", config_file, **{**ports, "TOKENPOOL_DATA_DIR": str(tmp_path / "data"),
                                         **env})
    if "REDIS_URL" not in env:
        del full["REDIS_URL"]
    before = {p.pid for p in psutil.process_iter()}
    run = subprocess.run([str(Path(sys.executable).parent / "tokenpool"), "up"], env=full,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.startswith("tokenpool up:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "redis-server" not in " ".join(
        " ".join(p.cmdline()) for p in psutil.process_iter() if p.pid not in before
        and p.is_running() and p.status() != psutil.STATUS_ZOMBIE), "something was started"
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_api_port_is_named_with_the_setting_that_moves_it(
    tmp_path: Path, config_file: Path, taken_port: int
) -> None:
    line = up_fails(tmp_path, config_file, TOKENPOOL_API_PORT=str(taken_port))
    assert f"port {taken_port} (api_port) is taken" in line
    assert "TOKENPOOL_API_PORT" in line


def test_a_missing_model_file_names_the_model_and_how_to_point_it_elsewhere(
    tmp_path: Path, config_file: Path
) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    line = up_fails(tmp_path, config_file, TOKENPOOL_MODELS__CHAT__SOURCE=str(missing))
    assert "models.chat.source" in line and str(missing) in line
    assert "TOKENPOOL_MODELS__CHAT__SOURCE" in line and "bundled:gemma3-270m" in line


@pytest.mark.parametrize("given", ["", ":wrong@"])
def test_a_redis_that_refuses_the_password_is_named_without_the_password(
    tmp_path: Path, config_file: Path, given: str
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False, password="right-one").start()
    try:
        url = f"redis://{given}127.0.0.1:{server.port}/0"
        line = up_fails(tmp_path, config_file, REDIS_URL=url)
    finally:
        server.stop()
    assert "password" in line and "REDIS_URL" in line and str(server.port) in line
    assert "wrong" not in line and "right-one" not in line


def test_an_unreachable_redis_says_so_and_how_to_run_without_it(
    tmp_path: Path, config_file: Path
) -> None:
    line = up_fails(tmp_path, config_file, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert "cannot reach Redis" in line and "unset REDIS_URL" in line
