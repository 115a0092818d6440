"""API keys: bearer tokens `tp_<id>_<secret>`, stored as a SHA-256 of the secret (never the
secret), looked up by id and compared in constant time. Managed with `tokenpool keys`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from broker.keys import Keys

LIMITS = ("requests_per_minute", "max_active_jobs", "max_queued_jobs", "tokens_per_day")
# What a key may do: `jobs` submit, read and follow its own jobs, batches and responses;
# `fleet:read` workers, models' live state and metrics; `metrics` only GET /metrics (a scrape
# token for Prometheus); `admin` everything, everyone's jobs included (hot-swap, unload,
# dead letters).
SCOPES = ("jobs", "fleet:read", "metrics", "admin")
IMPLIES = {"admin": frozenset(SCOPES), "fleet:read": frozenset({"fleet:read", "metrics"}),
           "jobs": frozenset({"jobs"}), "metrics": frozenset({"metrics"})}
DEFAULT_SCOPES = ("jobs",)
# A key stored before keys had scopes keeps what it could do then: everything but the
# scrape-only scope (which `admin` implies anyway).
LEGACY_SCOPES = ("jobs", "fleet:read", "admin")
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0
TOKEN = re.compile(r"^tp_([0-9a-f]{12})_([A-Za-z0-9_-]{32,})$")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    expires_at: float | None = None
    models: list[str] | None = None  # None: every model
    revoked: bool = False
    # Per-key limits; None: the settings' default (key_requests_per_minute, ...)
    requests_per_minute: int | None = None
    max_active_jobs: int | None = None
    max_queued_jobs: int | None = None
    tokens_per_day: int | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    # Endpoints told of this key's jobs' ends: [{"url", "events"}], signed with the key's own
    # webhook secret (kept in Redis beside the key, never shown again after creation).
    webhooks: list[dict[str, Any]] | None = None
    # Its share of a model's slots against other keys with jobs waiting (broker.fair).
    weight: float = 1.0

    def allows(self, scope: str) -> bool:
        return any(scope in IMPLIES[own] for own in self.scopes)

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        return asdict(self)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _decode(raw: dict[Any, Any]) -> tuple[ApiKey, str] | None:
    if not raw:
        return None
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in raw.items()}
    limits = {name: int(f[name]) if f.get(name) else None for name in LIMITS}
    key = ApiKey(id=f["id"], name=f["name"], created_at=float(f["created_at"]),
                 expires_at=float(f["expires_at"]) if f.get("expires_at") else None,
                 models=json.loads(f["models"]) if f.get("models") else None,
                 revoked=f.get("revoked") == "1",
                 scopes=tuple(json.loads(f["scopes"])) if "scopes" in f else LEGACY_SCOPES,
                 webhooks=json.loads(f["webhooks"]) if f.get("webhooks") else None,
                 weight=float(f.get("weight") or 1.0),
                 **limits)
    return key, f["digest"]


def checked_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes: {', '.join(unknown) or 'none given'}; known: "
                         f"{', '.join(SCOPES)}")
    return tuple(dict.fromkeys(scopes))


def checked_weight(weight: float) -> float:
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight: {weight}; between {MIN_WEIGHT} and {MAX_WEIGHT}")
    return float(weight)


class KeyStore:
    """Blocking: for the `tokenpool keys` commands (an operator with Redis access)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis, self.keys = client, keys

    def create(self, name: str, expires_in_s: float | None = None,
               models: list[str] | None = None, requests_per_minute: int | None = None,
               max_active_jobs: int | None = None, max_queued_jobs: int | None = None,
               tokens_per_day: int | None = None,
               scopes: tuple[str, ...] = DEFAULT_SCOPES,
               webhooks: list[dict[str, Any]] | None = None,
               weight: float = 1.0) -> tuple[ApiKey, str]:
        """A new key and its token; the token is shown once and stored only as a digest.
        With webhooks, the key gets its own signing secret (`webhook_secret(key)`)."""
        scopes = checked_scopes(scopes)
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        limits = {"requests_per_minute": requests_per_minute,
                  "max_active_jobs": max_active_jobs, "max_queued_jobs": max_queued_jobs,
                  "tokens_per_day": tokens_per_day}
        key = ApiKey(id=key_id, name=name, created_at=time.time(),
                     expires_at=time.time() + expires_in_s if expires_in_s else None,
                     models=models, requests_per_minute=requests_per_minute,
                     max_active_jobs=max_active_jobs, max_queued_jobs=max_queued_jobs,
                     tokens_per_day=tokens_per_day, scopes=scopes, webhooks=webhooks,
                     weight=checked_weight(weight))
        fields = {"id": key_id, "name": name, "created_at": repr(key.created_at),
                  "digest": digest(secret), "revoked": "0",
                  "expires_at": repr(key.expires_at) if key.expires_at else "",
                  "models": json.dumps(models) if models else "",
                  "scopes": json.dumps(list(scopes)), "weight": repr(key.weight),
                  **({"webhooks": json.dumps(webhooks), "webhook_secret":
                      "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()}
                     if webhooks else {}),
                  **{k: str(v) if v else "" for k, v in limits.items()}}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.api_key(key_id), mapping=fields)  # type: ignore[arg-type]
        pipe.sadd(self.keys.api_keys(), key_id)
        pipe.execute()
        return key, f"tp_{key_id}_{secret}"

    def webhook_secret(self, key_id: str) -> str | None:
        """The secret a key's webhook endpoints are signed with (None: it has none)."""
        value = self.redis.hget(self.keys.api_key(key_id), "webhook_secret")
        return value.decode() if isinstance(value, bytes) else value

    def list(self) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.redis.smembers(self.keys.api_keys()))  # type: ignore[union-attr]
        found = [_decode(self.redis.hgetall(self.keys.api_key(i))) for i in ids]
        return [entry[0] for entry in found if entry]

    def set_weight(self, key_id: str, weight: float) -> bool:
        """A key's fair-share weight, from its next submission on (False: no such key)."""
        if not self.redis.exists(self.keys.api_key(key_id)):
            return False
        self.redis.hset(self.keys.api_key(key_id), "weight", repr(checked_weight(weight)))
        return True

    def revoke(self, key_id: str) -> bool:
        if not self.redis.exists(self.keys.api_key(key_id)):
            return False
        self.redis.hset(self.keys.api_key(key_id), "revoked", "1")
        return True


async def keys_exist(client: aioredis.Redis, keys: Keys) -> bool:
    return bool(await client.scard(keys.api_keys()))


async def authenticate(client: aioredis.Redis, keys: Keys, token: str) -> ApiKey | None:
    """The key this token belongs to, if it is valid, unrevoked and unexpired."""
    match = TOKEN.match(token)
    if not match:
        return None
    key_id, secret = match.groups()
    found = _decode(await client.hgetall(keys.api_key(key_id)))
    if found is None:
        hmac.compare_digest(digest(secret), digest(""))  # the same work as a known id
        return None
    key, stored = found
    if not hmac.compare_digest(digest(secret), stored):
        return None
    return key if key.usable(time.time()) else None
