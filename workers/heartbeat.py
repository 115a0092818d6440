"""Background loops of a worker: its heartbeat every few seconds, and the reaper's rounds."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from broker.fleet import remove_heartbeat, write_heartbeat
from broker.keys import Keys

log = logging.getLogger("tokenpool.worker")


class Outage:
    """One warning when Redis goes away and one line when it is back, however many calls
    fail in between: an outage of an hour is two lines of log, not thousands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.since: float | None = None

    def failed(self, exc: Exception) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: Redis unreachable (%s); retrying until it is back", self.name, exc)

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s: Redis is back after %.1fs", self.name, time.monotonic() - self.since)
            self.since = None


class Periodic:
    """A daemon thread that calls `fn` every `interval_s` until stopped; it never dies of an
    error in `fn` (logged instead: a Redis outage once, see Outage), so a Redis restart only
    pauses it."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        self.name, self.interval_s, self.fn = name, interval_s, fn
        self.outage = Outage(name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval_s)

    def run_once(self) -> None:
        try:
            self.fn()
        except redis.RedisError as exc:
            self.outage.failed(exc)
            return
        except Exception:
            log.exception("%s: unexpected error", self.name)
        self.outage.ok()

    def stop(self) -> None:
        self._stop.set()


class Heartbeat:
    def __init__(
        self, client: redis.Redis, keys: Keys, interval_s: float, ttl_s: float,
        snapshot: Callable[[], dict[str, Any]], retention_s: float = 600.0,
    ) -> None:
        self.client, self.keys = client, keys
        self.ttl_s, self.retention_s = ttl_s, retention_s
        self.snapshot = snapshot
        self._loop = Periodic("heartbeat", interval_s, self.beat)
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def start(self) -> None:
        self._loop.start()

    def beat(self) -> None:
        write_heartbeat(self.client, self.keys, self.full(), self.ttl_s, self.retention_s)

    def beat_now(self) -> None:
        """An extra beat for a state change (loading, unloading): never raises, so nothing a
        worker does for itself (loading its model) waits on Redis; the loop's next beat
        carries the state if this one could not."""
        self._loop.run_once()

    def full(self) -> dict[str, Any]:
        return {**self.identity, **self.snapshot()}

    def stop(self) -> None:
        self._loop.stop()
        with contextlib.suppress(redis.RedisError):
            remove_heartbeat(self.client, self.keys, self.full(), self.retention_s)
