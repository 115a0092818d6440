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

import redis

from broker.connection import sync_redis
from broker.redis_server import EmbeddedRedis, free_port, port_is_free
from broker.settings import Settings
from broker.sources import BUNDLED, resolve
from cli.supervisor import Supervisor, die_with_parent, tokenpool_argv
from schedules.beat import beat_schedule

log = logging.getLogger("tokenpool.up")


def plan(sup: Supervisor, settings: Settings, api_port: int, flower_port: int) -> None:
    for name, spec in settings.models.items():
        sup.add(f"worker-{name}", tokenpool_argv("worker", "--model", name, "--gpu", spec.gpu))
    sup.add("api", tokenpool_argv("api", "--port", str(api_port)))
    sup.add("flower", tokenpool_argv("flower", "--port", str(flower_port)))
    if beat_schedule(settings):  # beat runs only when there is something to fire
        sup.add("beat", tokenpool_argv("beat"))
    sup.add("webhooks", tokenpool_argv("webhooks"))  # jobs', keys' and settings' webhooks


def prepare_bundled(settings: Settings) -> None:
    """Materialise each bundled model once, before the workers and the API all reach for it."""
    for source in sorted({spec.source for spec in settings.models.values()} & set(BUNDLED)):
        resolve(source, settings.cache_dir)


class NotStartable(Exception):
    """What keeps `up` from starting, in one line: what is wrong, and what to do."""


def shown(url: str) -> str:
    """A Redis address without its password."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{userinfo.split(':')[0] + ':***@' if at else ''}{host}"


def check_redis(url: str) -> None:
    client = sync_redis(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise NotStartable(f"Redis at {shown(url)} refused the password ({exc}); put the "
                           "right one in REDIS_URL (redis://:PASSWORD@host:port/0, or "
                           "redis://USER:PASSWORD@… for an ACL user)") from None
    except redis.ResponseError as exc:
        if "NOAUTH" not in str(exc) and "WRONGPASS" not in str(exc):
            raise
        raise NotStartable(f"Redis at {shown(url)} wants a password ({exc}); put it in "
                           "REDIS_URL (redis://:PASSWORD@host:port/0)") from None
    except redis.ConnectionError as exc:
        raise NotStartable(f"cannot reach Redis at {shown(url)} ({exc}); start it, or unset "
                           "REDIS_URL and up runs its own") from None
    finally:
        client.close()


def check_models(settings: Settings) -> None:
    for name, spec in settings.models.items():
        if spec.source in BUNDLED:
            continue
        try:
            resolve(spec.source, settings.cache_dir)
        except (OSError, ValueError) as exc:
            env = f"TOKENPOOL_MODELS__{name.upper()}__SOURCE"
            raise NotStartable(f"models.{name}.source: {exc}; point it at a model file "
                               f"({env}, or the config file), or use one of "
                               f"{', '.join(sorted(BUNDLED))}") from None


PORTS = (("api_port", "api_host"), ("flower_port", None), ("embedded_redis_port", None))


def check_ports(settings: Settings) -> None:
    """A port set on purpose must be free (a client expects it there); a default one that
    is taken is replaced by a free one, and `up` prints which."""
    for field, host_field in PORTS:
        port = getattr(settings, field)
        if field == "embedded_redis_port" and settings.redis_address:
            continue
        host = getattr(settings, host_field) if host_field else "127.0.0.1"
        if port and field in settings.model_fields_set and not port_is_free(port, host):
            raise NotStartable(f"port {port} ({field}) is taken by another process; stop it, "
                               f"or set TOKENPOOL_{field.upper()} to a free port")


def preflight(settings: Settings) -> None:
    """Before anything starts: NotStartable naming the first thing that would stop `up`."""
    check_ports(settings)
    check_models(settings)
    if settings.redis_address:
        check_redis(settings.redis_address)


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
    preflight(settings)
    with ExitStack() as cleanup:
        url = settings.redis_address
        server: EmbeddedRedis | None = None
        if not url:
            server = EmbeddedRedis(settings.data_dir / "redis", settings.embedded_redis_port,
                                   appendfsync=settings.embedded_redis_appendfsync,
                                   preexec=die_with_parent(signal.SIGTERM))
            url = server.start().url
            cleanup.callback(server.stop)
        prepare_bundled(settings)
        password = settings.flower_password or secrets.token_urlsafe(12)
        api_port = free_port(settings.api_port, settings.api_host)
        flower_port = free_port(settings.flower_port)
        env = {**os.environ, "REDIS_URL": url, "TOKENPOOL_FLOWER_PASSWORD": password}
        sup = Supervisor(env=env, log_dir=settings.data_dir / "logs", preexec=die_with_parent())
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
