"""`tokenpool keys create|list|revoke`: API keys, managed straight in Redis by an operator
(REDIS_URL and the key prefix from settings, like the processes)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.apikeys import SCOPES, KeyStore, checked_scopes, checked_weight
from broker.connection import sync_redis
from broker.keys import Keys
from broker.settings import WEBHOOK_EVENTS, Settings
from broker.webhooks import UnsafeTarget, check_target
from cli.commands import Json, out, print_json

keys_app = typer.Typer(no_args_is_help=True, help="API keys (stored hashed in Redis).")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise typer.BadParameter("a duration like 90m, 12h or 30d", param_hint="--expires-in")
    return float(match[1]) * UNITS[match[2]]


@contextmanager
def store() -> Iterator[KeyStore]:
    settings = Settings()
    if not settings.redis_address:
        raise typer.BadParameter("set REDIS_URL to the deployment's Redis")
    with sync_redis(settings.redis_address, socket_connect_timeout=5) as client:
        yield KeyStore(client, Keys(settings.key_prefix))


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    expires_in: Annotated[str | None, typer.Option(help="e.g. 30d, 12h")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated models it may use")] = None,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    max_active: Annotated[int | None, typer.Option(help="jobs queued or running at once")] = None,
    max_queued: Annotated[int | None, typer.Option(help="jobs waiting to start")] = None,
    tokens_per_day: Annotated[int | None, typer.Option(help="generated tokens per UTC day")]
    = None,
    scopes: Annotated[str, typer.Option(
        help=f"comma-separated, of {', '.join(SCOPES)}: jobs its own jobs, fleet:read workers "
        "and metrics, metrics only /metrics (a scrape token), admin everything")] = "jobs",
    webhook: Annotated[list[str] | None, typer.Option(
        help="an endpoint told when this key's jobs, responses and batches end (repeatable);"
        " the key gets its own signing secret, shown once")] = None,
    webhook_events: Annotated[str | None, typer.Option(
        help=f"comma-separated events its endpoints want (default all: "
        f"{', '.join(WEBHOOK_EVENTS)})")] = None,
    weight: Annotated[float, typer.Option(
        help="its share of a model's slots against other keys with jobs waiting (fair "
        "share; the keyless jobs weigh 1)")] = 1.0,
    as_json: Json = False,
) -> None:
    """Create a key; its token is printed once and stored only as a SHA-256 digest."""
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        granted = checked_scopes([s.strip() for s in scopes.split(",") if s.strip()])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scopes") from None
    hooks = endpoints(webhook or [], webhook_events)
    try:
        checked_weight(weight)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--weight") from None
    with store() as keys:
        key, token = keys.create(name, seconds(expires_in) if expires_in else None, allowed,
                                 requests_per_minute=rpm, max_active_jobs=max_active,
                                 max_queued_jobs=max_queued,
                                 tokens_per_day=tokens_per_day, scopes=granted, webhooks=hooks,
                                 weight=weight)
        signing = keys.webhook_secret(key.id) if hooks else None
    if as_json:
        print_json({**key.public(), "token": token,
                    **({"webhook_secret": signing} if signing else {})})
        return
    print(token)
    if signing:
        typer.echo(f"webhook secret (verify its deliveries with it; not shown again): {signing}",
                   err=True)
    typer.echo(f"key {key.id} ({name}) created; the token above is not shown again", err=True)


def endpoints(urls: list[str], events: str | None) -> list[dict[str, Any]] | None:
    """A key's webhook endpoints, each checked as a job's webhook is."""
    if not urls:
        return None
    wanted = [e.strip() for e in events.split(",") if e.strip()] if events else \
        list(WEBHOOK_EVENTS)
    unknown = sorted(set(wanted) - set(WEBHOOK_EVENTS))
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}; known: {', '.join(WEBHOOK_EVENTS)}",
                                 param_hint="--webhook-events")
    settings = Settings()
    for url in urls:
        try:
            check_target(url, settings)
        except UnsafeTarget as exc:
            raise typer.BadParameter(f"{url}: {exc}", param_hint="--webhook") from None
    return [{"url": url, "events": wanted} for url in urls]


@keys_app.command("weight")
def set_weight(key_id: Annotated[str, typer.Argument(help="the key's id")],
               weight: Annotated[float, typer.Argument(help="its new fair-share weight")],
               ) -> None:
    """Change a key's fair-share weight (its jobs queued from then on carry it)."""
    try:
        checked_weight(weight)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="WEIGHT") from None
    with store() as keys:
        if not keys.set_weight(key_id, weight):
            typer.echo(f"no key {key_id}", err=True)
            raise typer.Exit(1)
    typer.echo(f"key {key_id}: weight {weight}", err=True)


@keys_app.command("list")
def list_keys(as_json: Json = False) -> None:
    """Every key: id, name, models, expiry, revoked (never the token)."""
    with store() as keys:
        found = keys.list()
    if as_json:
        print_json([k.public() for k in found])
        return
    table = Table("id", "name", "scopes", "weight", "models", "expires", "state")
    now = time.time()
    for k in found:
        expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.expires_at)) \
            if k.expires_at else "never"
        table.add_row(k.id, k.name, ",".join(k.scopes), f"{k.weight:g}",
                      ",".join(k.models) if k.models else "all",
                      expires,
                      "revoked" if k.revoked else "expired" if not k.usable(now) else "active")
    out.print(table)


@keys_app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="the key id (from keys list)")]) -> None:
    """Revoke a key at once (within a request or two)."""
    with store() as keys:
        if not keys.revoke(key_id):
            typer.echo(f"no key {key_id!r}", err=True)
            raise typer.Exit(1)
    print(f"revoked {key_id}")
