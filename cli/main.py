"""The `tokenpool` command: processes (up, api, worker, flower, beat, healthcheck) here; the
client commands (submit, follow, status, cancel, embed, workers, models) in cli.commands."""

from __future__ import annotations

import logging
import os
import socket

import typer

from broker.settings import Settings
from cli.batch import batch_app
from cli.commands import COMMANDS
from cli.keys import keys_app

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tokenpool: a message-queue worker pool for local LLM inference.")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def redis_url_of(settings: Settings) -> str:
    """The Redis address (a URL, or the Sentinel group's), with a warning when Redis is
    reached over a network without a password."""
    from broker.connection import warn_if_unauthenticated

    address = settings.redis_address
    if not address:
        raise typer.BadParameter("no Redis: set REDIS_URL (or the redis_sentinel group), or "
                                 "run `tokenpool up` (starts one)")
    warn_if_unauthenticated(address)
    return address


@cli.command()
def up(log_level: str = typer.Option("INFO", help="log level")) -> None:
    """Run everything on this machine: Redis (embedded unless REDIS_URL), workers, API, Flower."""
    from cli.up import NotStartable, run_up

    setup_logging(log_level)
    try:
        run_up(Settings())
    except NotStartable as exc:
        typer.echo(f"tokenpool up: {exc}", err=True)
        raise typer.Exit(2) from None


@cli.command()
def api(
    host: str | None = typer.Option(None, help="bind address (default: settings api_host)"),
    port: int | None = typer.Option(None, help="port (default: settings api_port)"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Serve the HTTP API."""
    hide_gpus()  # before llama.cpp can look for one
    from broker.native import load_llama_first, route_llama_log

    load_llama_first()
    import uvicorn

    from api.app import create_app

    setup_logging(log_level)
    route_llama_log(logging.getLevelName(log_level.upper()))
    logging.getLogger("tokenpool.api").info(
        "GPUs hidden from the API process (CUDA_VISIBLE_DEVICES=''): it counts tokens on the CPU")
    settings = Settings()
    url = redis_url_of(settings)
    bind = host or settings.api_host
    refuse_open_bind(settings, url, bind)
    app = create_app(settings, url)
    # access_log off: uvicorn's prints query strings; api.accesslog logs without them.
    uvicorn.run(app, host=bind, access_log=False, port=port or settings.api_port,
                log_level=log_level.lower(), timeout_graceful_shutdown=5)


def hide_gpus() -> None:
    """The API counts prompt tokens with a vocabulary-only llama.cpp model and needs no GPU;
    on a CUDA build llama.cpp's device scan alone made a CUDA context there (518 MiB on an
    H200). With no device visible it makes none."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def refuse_open_bind(settings: Settings, redis_url: str, host: str) -> None:
    """Without API keys the API serves loopback only, unless a trusted proxy is in front."""
    import ipaddress

    from broker.connection import sync_redis
    from broker.keys import Keys

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or settings.behind_trusted_proxy:
        return
    with sync_redis(redis_url, socket_connect_timeout=5) as client:
        if client.scard(Keys(settings.key_prefix).api_keys()):
            return
    raise typer.BadParameter(
        f"refusing to serve {host} with no API key: anyone who reaches it could use it. "
        "Create a key (tokenpool keys create NAME), bind 127.0.0.1, or set "
        "TOKENPOOL_BEHIND_TRUSTED_PROXY=1 if a proxy in front authenticates", param_hint="--host")


@cli.command()
def worker(
    model: str = typer.Option(..., help="configured model name this worker serves"),
    gpu: str = typer.Option("cpu", help="GPU index to pin to, or 'cpu'"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """A Celery worker holding one resident model, consuming that model's queue."""
    from workers.gpu import pin

    pin(gpu)  # before anything below can initialise CUDA
    from broker.native import load_llama_first, route_llama_log

    load_llama_first()  # before numpy: see broker.native
    from broker.celery_app import make_celery
    from broker.keys import Keys
    from schedules.tasks import register as register_schedules
    from tasks.jobs import register
    from workers.runtime import WorkerRuntime

    setup_logging(log_level)
    route_llama_log(logging.getLevelName(log_level.upper()))
    settings = Settings()
    if model not in settings.models:
        raise typer.BadParameter(f"no model {model!r}; configured: {sorted(settings.models)}")
    url = redis_url_of(settings)
    name = f"{model}-{gpu}-{os.getpid()}@{socket.gethostname()}"
    app = make_celery(settings, url)
    runtime = WorkerRuntime(settings, model, gpu, url, name, celery=app)
    register(app, runtime)
    register_schedules(app, settings, runtime.redis)
    runtime.start()
    keys = Keys(settings.key_prefix)
    try:
        app.worker_main([
            "worker", "-Q", f"{keys.queue(model)},{keys.schedules_queue()}", "-P", "threads",
            "-c", str(settings.models[model].max_batch),
            "-n", name, "--loglevel", log_level, "--without-mingle", "--without-gossip", "-E",
        ])
    finally:
        runtime.stop()


@cli.command()
def flower(
    port: int | None = typer.Option(None),
    address: str = typer.Option("127.0.0.1", help="bind address"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Celery Flower for this app, behind basic auth (flower_user / flower_password)."""
    from broker.celery_app import make_celery

    setup_logging(log_level)
    settings = Settings()
    if not settings.flower_password:
        raise typer.BadParameter("set TOKENPOOL_FLOWER_PASSWORD: Flower never runs without auth")
    app = make_celery(settings, redis_url_of(settings))
    app.start([
        "flower", f"--port={port or settings.flower_port}", f"--address={address}",
        f"--basic-auth={settings.flower_user}:{settings.flower_password}",
    ])


@cli.command()
def beat(log_level: str = typer.Option("INFO")) -> None:
    """Celery beat: fires the schedules configured in settings (one beat per deployment)."""
    from broker.celery_app import make_celery
    from cli.health import beat_pidfile
    from schedules.beat import beat_schedule

    setup_logging(log_level)
    settings = Settings()
    app = make_celery(settings, redis_url_of(settings))
    app.conf.beat_schedule = beat_schedule(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start([
        "beat", f"--schedule={settings.data_dir / 'beat-schedule'}",
        f"--pidfile={beat_pidfile(settings)}", f"--loglevel={log_level}",
    ])


@cli.command()
def webhooks(log_level: str = typer.Option("INFO")) -> None:
    """Deliver webhooks: claim due deliveries and run each try as a Celery task (its own
    queue and threads; model workers never deliver). `up` starts one; run one or more
    anywhere that reaches Redis and the receivers."""
    from broker.celery_app import make_celery
    from broker.connection import worker_redis
    from broker.keys import Keys
    from broker.store import JobStore
    from broker.webhooks import Outbox
    from workers.heartbeat import Periodic
    from workers.webhooks import Deliverer, pump, register

    setup_logging(log_level)
    settings = Settings()
    url = redis_url_of(settings)
    name = f"webhooks-{os.getpid()}@{socket.gethostname()}"
    client = worker_redis(url, settings.worker_redis_retry_s, name)
    keys, outbox = Keys(settings.key_prefix), Outbox(client, settings)
    app = make_celery(settings, url)
    register(app, Deliverer(JobStore(client, settings), outbox, settings))
    claims = Periodic("webhook-claims", 0.2, pump(app, outbox, keys))
    claims.start()
    try:
        app.worker_main(["worker", "-Q", keys.webhooks_queue(), "-P", "threads",
                         "-c", str(settings.webhook_concurrency), "-n", name,
                         "--loglevel", log_level, "--without-mingle", "--without-gossip"])
    finally:
        claims.stop()


@cli.command(name="redis-acl")
def redis_acl(prefix: str | None = typer.Option(None, help="key prefix (default: settings)")
              ) -> None:
    """Print least-privilege Redis ACL users for the API and the workers (see broker/acl.py)."""
    from broker.acl import setuser_lines

    for line in setuser_lines(prefix or Settings().key_prefix):
        typer.echo(line)


@cli.command()
def healthcheck(
    role: str = typer.Argument(..., help="api, worker, flower or beat"),
    url: str = typer.Option("http://127.0.0.1:8000", help="api: its base URL"),
) -> None:
    """Exit 0 when this host's `role` process is healthy: for container healthchecks."""
    from cli.health import CHECKS

    if role not in CHECKS:
        raise typer.BadParameter(f"one of {', '.join(CHECKS)}", param_hint="role")
    problem = CHECKS[role](Settings(), url)
    if problem:
        typer.echo(f"unhealthy: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("healthy")


for command in COMMANDS:
    cli.command()(command)
cli.add_typer(batch_app, name="batch")
cli.add_typer(keys_app, name="keys")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
