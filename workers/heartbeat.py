"""A daemon thread that publishes this worker's heartbeat every few seconds."""

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


class Heartbeat:
    def __init__(
        self, client: redis.Redis, keys: Keys, interval_s: float, ttl_s: float,
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.client, self.keys = client, keys
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.snapshot = snapshot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        write_heartbeat(self.client, self.keys, {**self.identity, **self.snapshot()}, self.ttl_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(self.interval_s)

    def stop(self, name: str) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            remove_heartbeat(self.client, self.keys, name)
