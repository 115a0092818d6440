"""Start child processes, restart any that die, stop them all: used by `up`, tests and bench."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tokenpool.up")


PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """Linux's prctl, looked up before any fork (a child between fork and exec may do
    little more than call it)."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child `sig` when the process that started
    it dies, however it dies: children run in sessions of their own (a terminal's Ctrl-C goes
    to `up`, which stops them in order), so a SIGKILLed `up` (the OOM killer, kill -9) would
    otherwise leave its workers holding their models, its API its port and its Redis its
    data, with nobody to stop them. SIGKILL for our own processes: nothing of theirs needs
    saving (a running job is queued again when the system is back), and a Celery worker or
    Flower told SIGTERM while their Redis goes too can retry the broker for ever instead of
    exiting; SIGTERM for Redis, which writes its AOF and exits. None where the kernel has no
    such call. The signal follows the thread that started the child: `up` starts and restarts
    every child from its main thread."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # it died before the call: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


def tokenpool_argv(*args: str) -> list[str]:
    """Our own CLI, run by the same interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's
    preexec: Callable[[], None] | None = None  # die_with_parent() under `up`

    def start(self, env: dict[str, str]) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.argv, env={**env, **self.env}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out else None, start_new_session=True,
                preexec_fn=self.preexec,
            )
        finally:
            if out:
                out.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)


@dataclass
class Supervisor:
    env: dict[str, str]
    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    restart_delay_s: float = 1.0
    preexec: Callable[[], None] | None = None  # for every child (see die_with_parent)

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        child = Child(name, argv, log_path, env=env or {}, preexec=self.preexec)
        self.children.append(child)
        return child

    def start(self) -> None:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            child.start(self.env)
            log.info("started %s (pid %s)", child.name, child.process and child.process.pid)

    def restart_dead(self) -> list[str]:
        """Restart every child that exited; returns their names."""
        restarted = []
        for child in self.children:
            if child.process is not None and not child.alive():
                code = child.process.returncode
                time.sleep(self.restart_delay_s if child.restarts else 0)
                child.restarts += 1
                child.start(self.env)
                log.warning("%s exited with %s; restarted (restart %d, pid %s)",
                            child.name, code, child.restarts, child.process.pid)
                restarted.append(child.name)
        return restarted

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child's process group, then SIGKILL what is left after `timeout_s`."""
        for child in self.children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, timeout_s)
            child.signal(signal.SIGKILL)
            child.process.wait()
