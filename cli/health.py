"""Health checks a container runs on itself (`tokenpool healthcheck ROLE`): a problem, or None."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import httpx

from broker.connection import sync_redis
from broker.fleet import read_heartbeats
from broker.keys import Keys
from broker.settings import Settings

HEALTHY_WORKER_STATES = ("loading", "loaded", "generating")


def api(settings: Settings, url: str) -> str | None:
    try:
        reply = httpx.get(f"{url.rstrip('/')}/health", timeout=5)
    except httpx.HTTPError as exc:
        return f"API unreachable: {exc}"
    return None if reply.status_code == 200 else f"/health answered {reply.status_code}"


def flower(settings: Settings, url: str) -> str | None:
    try:  # no credentials: 401 proves Flower is up and its auth is on
        reply = httpx.get(f"http://127.0.0.1:{settings.flower_port}/", timeout=5)
    except httpx.HTTPError as exc:
        return f"Flower unreachable: {exc}"
    return None if reply.status_code == 401 else f"Flower answered {reply.status_code}, not 401"


def worker(settings: Settings, url: str) -> str | None:
    """A worker of this host beats in Redis with its model loading or loaded."""
    if not settings.redis_address:
        return "no REDIS_URL"
    keys, host = Keys(settings.key_prefix), socket.gethostname()
    with sync_redis(settings.redis_address, socket_timeout=5) as client:
        beats = read_heartbeats(client, keys, settings.heartbeat_ttl_s)
    mine = [b for b in beats if b.get("host") == host]
    if not mine:
        return f"no live heartbeat from a worker on {host}"
    bad = [b["name"] for b in mine if b.get("state") not in HEALTHY_WORKER_STATES]
    return f"workers in a bad state: {bad}" if bad else None


def beat_pidfile(settings: Settings) -> Path:
    return settings.data_dir / "beat.pid"


def beat(settings: Settings, url: str) -> str | None:
    pidfile = beat_pidfile(settings)
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError) as exc:
        return f"no beat process ({pidfile}): {exc}"
    return None


CHECKS: dict[str, Callable[[Settings, str], str | None]] = {
    "api": api, "worker": worker, "flower": flower, "beat": beat,
}
