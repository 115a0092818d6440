"""`tokenpool up`: one command runs the whole system on one machine and stops it cleanly."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from contextlib import ExitStack
from types import FrameType

from broker.redis_server import EmbeddedRedis, free_port
from broker.settings import Settings
from broker.sources import BUNDLED, resolve
from cli.supervisor import Supervisor, tokenpool_argv
from schedules.beat import beat_schedule

log = logging.getLogger("tokenpool.up")


def plan(sup: Supervisor, settings: Settings, api_port: int, flower_port: int) -> None:
    for name, spec in settings.models.items():
        sup.add(f"worker-{name}", tokenpool_argv("worker", "--model", name, "--gpu", spec.gpu))
    sup.add("api", tokenpool_argv("api", "--port", str(api_port)))
    sup.add("flower", tokenpool_argv("flower", "--port", str(flower_port)))
    if beat_schedule(settings):  # beat runs only when there is something to fire
        sup.add("beat", tokenpool_argv("beat"))


def prepare_bundled(settings: Settings) -> None:
    """Materialise each bundled model once, before the workers and the API all reach for it."""
    for source in sorted({spec.source for spec in settings.models.values()} & set(BUNDLED)):
        resolve(source, settings.cache_dir)


def keep_redis_up(server: EmbeddedRedis) -> None:
    """The embedded Redis is supervised like every other child: restarted at once, on the
    same port, data dir and AOF; workers, API and followers reconnect by themselves."""
    if server.alive():
        return
    code = server.process.returncode if server.process is not None else None
    started = time.monotonic()
    try:
        server.restart()
    except Exception as exc:  # tried again on the next round
        log.error("redis-server exited with %s and did not restart: %s", code, exc)
        return
    log.warning("redis-server exited with %s; restarted in %.2fs (pid %s, same port and AOF)",
                code, time.monotonic() - started, server.process and server.process.pid)


def run_up(settings: Settings, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("got %s; stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    with ExitStack() as cleanup:
        url = settings.redis_address
        server: EmbeddedRedis | None = None
        if not url:
            server = EmbeddedRedis(settings.data_dir / "redis", settings.embedded_redis_port,
                                   appendfsync=settings.embedded_redis_appendfsync)
            url = server.start().url
            cleanup.callback(server.stop)
        prepare_bundled(settings)
        password = settings.flower_password or secrets.token_urlsafe(12)
        api_port = free_port(settings.api_port, settings.api_host)
        flower_port = free_port(settings.flower_port)
        env = {**os.environ, "REDIS_URL": url, "TOKENPOOL_FLOWER_PASSWORD": password}
        sup = Supervisor(env=env, log_dir=settings.data_dir / "logs")
        plan(sup, settings, api_port, flower_port)
        sup.start()
        cleanup.callback(sup.stop)
        print(f"redis   {url}", flush=True)
        print(f"api     http://{settings.api_host}:{api_port}", flush=True)
        print(f"flower  http://127.0.0.1:{flower_port}  (user {settings.flower_user}, "
              f"password {password})", flush=True)
        print(f"logs    {sup.log_dir}", flush=True)
        while not stop.wait(0.5):
            if server is not None:
                keep_redis_up(server)
            sup.restart_dead()
    log.info("stopped")
